"""A private random stream, so that augplug never shifts the user's global RNG.

Inside ``with stream:`` the global CPU generator runs on augplug's own state (seeded once); on exit
the user's state is restored and augplug's advanced state is kept. The state is part of the
refiner's ``state_dict``, which makes resumed runs bit-for-bit identical.
"""
from __future__ import annotations

import torch

__all__ = ["PrivateRNG"]


class PrivateRNG:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(int(seed))
        self.state = g.get_state()
        self._saved = []

    def __enter__(self) -> "PrivateRNG":
        self._saved.append(torch.get_rng_state())
        torch.set_rng_state(self.state)
        return self

    def __exit__(self, *exc) -> None:
        self.state = torch.get_rng_state()
        torch.set_rng_state(self._saved.pop())

    def generator(self) -> torch.Generator:
        """A CPU generator positioned at the current private state (advance with ``commit``)."""
        g = torch.Generator()
        g.set_state(self.state)
        return g

    def commit(self, g: torch.Generator) -> None:
        self.state = g.get_state()
