"""The control arm: plain soft-target cross-entropy on the upstream targets."""
from __future__ import annotations

import torch

from .base import Policy


class NoRefinement(Policy):
    """Weights 1 and the upstream targets unchanged (``method="none"``)."""

    needs_scores = False
    name = "none"

    def __call__(self, scores, targets, generator=None):
        return torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device), targets.float()
