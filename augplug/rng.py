"""A private random stream, so that augplug never shifts the user's global RNG.

Inside ``with stream:`` the global CPU generator runs on augplug's own state (seeded once); on exit
the user's state is restored and augplug's advanced state is kept. The state is part of the
refiner's ``state_dict``, which makes resumed runs bit-for-bit identical.
"""
from __future__ import annotations

import torch

__all__ = ["PrivateRNG", "is_generator_state"]


def is_generator_state(state, like: torch.Tensor) -> bool:
    """Whether ``state`` has the form of a torch CPU generator state like ``like`` (a uint8 tensor of
    its shape): what a saved RNG state must be before it is set."""
    return torch.is_tensor(state) and state.dtype == torch.uint8 and state.shape == like.shape


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
