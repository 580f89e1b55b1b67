"""Policies: turn class scores ``g`` and upstream targets into per-sample weights and soft targets.

Each policy is a small object with ``needs_scores`` and ``__call__(scores, targets, generator)``
returning ``(weights, soft_targets)``; the matching stateless function lives in the same file.
"""
from .base import Policy, renormalize
from .none import NoRefinement
from .saflex import SAFLEX_PAPER, SAflex, saflex_targets
from .l2rw import L2RW, l2rw_weights

POLICIES = {"none": NoRefinement, "saflex": SAflex, "l2rw": L2RW}

__all__ = ["SAFLEX_PAPER", "Policy", "renormalize", "NoRefinement", "SAflex", "saflex_targets", "L2RW", "l2rw_weights",
           "POLICIES"]
