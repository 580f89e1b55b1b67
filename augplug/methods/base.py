"""The policy interface and the weight renormalisation shared by the policies."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["Policy", "renormalize"]


def renormalize(weights: torch.Tensor) -> torch.Tensor:
    """Scale non-negative weights to mean 1 over the batch; an all-zero batch stays all zero.

    Mean 1 keeps the loss scale (and so the effective learning rate) of an unweighted batch.
    """
    total = weights.sum()
    if float(total) <= 0:
        return torch.zeros_like(weights)
    return weights * (weights.shape[0] / total)


class Policy:
    """A refinement policy. ``needs_scores=False`` lets the refiner skip computing ``g``.

    ``__call__`` returns weights on their absolute scale (1 = an ordinary sample); the refiner applies
    the normalisation chosen by its ``weight_norm`` option.
    """

    needs_scores: bool = True
    name: str = "policy"

    def __call__(self, scores: Optional[torch.Tensor], targets: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
