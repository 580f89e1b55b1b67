"""L2RW (Ren et al., ICML 2018): weight ``max(y^T g, 0)``, normalized.

``y^T g`` equals L2RW's raw example weight ``grad l_i . grad L_val`` (the derivative of the
validation loss after a zero-weight look-ahead step). The paper normalizes the weights to sum 1
and trains on ``sum_i w_i l_i``; here they are scaled to mean 1 and the batch loss is the mean,
which is the same objective. An all-zero batch gets all-zero weights (L2RW divides by 1 then).
The raw ``y^T g`` has no scale of its own, so unlike the other policies L2RW returns weights already
normalized (mean 1); the refiner's ``weight_norm`` leaves them as they are or rescales them again.
"""
from __future__ import annotations

import torch

from ..targets import check_soft_pair
from .base import Policy, renormalize


def l2rw_weights(scores: torch.Tensor, targets: torch.Tensor, *, distributed: bool = False) -> torch.Tensor:
    """``renormalize(max(y_i^T g_i, 0))`` for scores (B, C) and target probabilities (B, C).

    ``distributed=True``: normalized over the global batch of all processes."""
    check_soft_pair(scores, targets)
    raw = (targets.float() * scores.float()).sum(-1)
    return renormalize(raw.clamp_min(0), distributed=distributed)


class L2RW(Policy):
    """Weights from L2RW, targets unchanged.

    Options: how the refiner mixes the rows (:class:`~augplug.methods.Policy`): ``weight_norm``
    (default ``"augmented"``), ``aug_weight`` (default 1.0), ``strength`` (default 1.0)."""

    name = "l2rw"

    def __init__(self, *, weight_norm: str = "augmented", aug_weight=1.0, strength=1.0):
        self._set_mixing(weight_norm, aug_weight, strength)

    def extra_repr(self) -> str:
        return self.mixing_repr()

    def __call__(self, scores, targets, generator=None):
        return l2rw_weights(scores, targets, distributed=True), targets.float()
