"""The control arm: plain soft-target cross-entropy on the upstream targets."""
from __future__ import annotations

import torch

from ..errors import ConfigurationError
from .base import Policy


class NoRefinement(Policy):
    """Weights 1 and the upstream targets unchanged (``method="none"``)."""

    needs_scores = False
    name = "none"

    def __init__(self, *, weight_norm: str = "augmented", aug_weight=1.0):
        """``aug_weight``: a fixed share of the augmented rows; ``weight_norm``: see
        :class:`~augplug.methods.Policy` (weights are all 1, so it matters only for ``"batch"``)."""
        if isinstance(aug_weight, str) or not isinstance(aug_weight, (int, float)):
            raise ConfigurationError(f"method 'none' takes a fixed aug_weight, got {aug_weight!r}",
                                     "pass a number; only policies that score rows learn the share")
        self._set_mixing(weight_norm, aug_weight)

    def extra_repr(self) -> str:
        return f"weight_norm={self.weight_norm!r}, aug_weight={self.aug_weight!r}"

    def __call__(self, scores, targets, generator=None):
        return torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device), targets.float()
