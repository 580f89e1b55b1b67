"""Policies: turn class scores ``g`` and upstream targets into per-sample weights and soft targets.

Each policy is a small object with ``needs_scores`` and ``__call__(scores, targets, generator)``
returning ``(weights, soft_targets)``, holding its own options and defaults; the matching stateless
function lives in the same file with the same defaults. Policies are registered by name
(:func:`register_policy`, :func:`create_policy`).
"""
from .base import WEIGHT_NORMS, Policy, RefineContext, class_renormalize, renormalize
from .none import NoRefinement
from .saflex import SAFLEX_PAPER, SAflex, saflex_targets
from .l2rw import L2RW, l2rw_weights
from .registry import POLICIES, create_policy, list_policies, policy_options, register_policy

register_policy("none", NoRefinement)
register_policy("saflex", SAflex)
register_policy("l2rw", L2RW)
register_policy("autodo", "augplug.methods.autodo:AutoDO")
register_policy("influence", "augplug.methods.influence:InfluencePolicy")

__all__ = ["SAFLEX_PAPER", "WEIGHT_NORMS", "Policy", "RefineContext", "renormalize", "class_renormalize",
           "NoRefinement", "SAflex", "saflex_targets", "L2RW", "l2rw_weights", "POLICIES", "create_policy",
           "list_policies", "policy_options", "register_policy"]
