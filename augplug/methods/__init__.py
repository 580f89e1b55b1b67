"""Policies: turn class scores ``g`` and upstream targets into per-sample weights and soft targets.

Each policy is a small object with ``needs_scores`` and ``__call__(scores, targets, generator)``
returning ``(weights, soft_targets)``; the matching stateless function lives in the same file.
"""
from .base import Policy, RefineContext, class_renormalize, renormalize
from .none import NoRefinement
from .saflex import SAFLEX_PAPER, SAflex, saflex_targets
from .l2rw import L2RW, l2rw_weights


def _autodo(**options):
    from .autodo import AutoDO
    return AutoDO(**options)


def _influence(**options):
    from .influence import InfluencePolicy
    return InfluencePolicy(**options)


#: Policy factories by method name (``AugmentationRefiner(method=name, method_options={...})``).
POLICIES = {"none": NoRefinement, "saflex": SAflex, "l2rw": L2RW, "autodo": _autodo, "influence": _influence}

__all__ = ["SAFLEX_PAPER", "Policy", "RefineContext", "renormalize", "class_renormalize", "NoRefinement", "SAflex", "saflex_targets", "L2RW", "l2rw_weights",
           "POLICIES"]
