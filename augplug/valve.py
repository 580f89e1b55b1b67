"""The refinement strength: a safety valve that scales the refinement toward the upstream targets
when the validation set says it does not help.

With refinement strength ``gamma`` in [0, 1] the augmented rows are trained with

    w_eff = 1 + gamma * (w - 1),        y_eff = y~ + gamma * (y' - y~)

(``w``, ``y'``: the policy's normalized weights and soft targets; ``y~``: the upstream targets), so
``gamma = 0`` is plain upstream augmentation and ``gamma = 1`` the policy's full refinement.

Whether refinement helps is measured by **cross-fitting**. Each refresh splits the validation
samples into two disjoint halves A and B (alternate rows of every validation batch) and keeps their
directions ``v_A``, ``v_B`` besides the full ``v``. On every call the policy is applied once more
with the scores along ``v_A`` alone, giving ``(w^A, y'^A)``, and that choice is judged with the
agreements along ``v_B``; and the other way round:

    d = 1/2 [ mean_i (w^A_i y'^A_i - y~_i)^T g^B_i  +  mean_i (w^B_i y'^B_i - y~_i)^T g^A_i ]

``y^T g`` is the first-order drop of the validation loss after a step on a row with target ``y``
(:mod:`augplug.scores`), so ``d`` estimates how much more the refined rows lower the validation loss
than the upstream rows would, per row. For kept labels (``beta=inf``) it is ``mean (w - 1) y~^T g``,
the derivative of that drop in ``gamma``. Using one half to choose and the other to judge removes the
winner's curse of judging weights with the same noisy scores that chose them (:mod:`augplug.share`
documents that bias): when the weights carry no information about what helps, ``w^A`` is independent
of the noise in ``g^B`` and ``E[d] = 0``; the test in ``tests/test_valve.py`` draws augmented rows
exactly like the validation rows and checks that ``gamma`` stays where it started on average, and
that oracle weights raise it.

``gamma`` follows the sign of ``d`` with steps normalized by a running RMS of ``d`` (the scores
shrink by orders of magnitude during training; the step should not), clipped to ``[0, 1]``:

    gamma <- clip(gamma + lr * d / rms(d), 0, 1)

The state lives on the model's device as 0-dim tensors; a training step reads nothing back.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from .distributed import all_reduce_sum_, is_distributed
from .errors import ConfigurationError, NonFiniteError
from .online import NormalizedWalk
from .options import is_real

__all__ = ["RefinementStrength", "STRENGTHS", "apply_strength", "cross_fit_statistics", "resolve_strength"]

#: Named values of a policy's ``strength`` option.
STRENGTHS = ("auto", "adaptive")


def cross_fit_statistics(upstream: torch.Tensor, weights_a: torch.Tensor, soft_a: torch.Tensor, scores_b: torch.Tensor,
                         weights_b: torch.Tensor, soft_b: torch.Tensor, scores_a: torch.Tensor, *,
                         distributed: bool = False) -> torch.Tensor:
    """``[sum_i d_i, n]`` (fp64, on the rows' device; summed over processes when ``distributed``) with

        d_i = 1/2 [ (w^A_i y'^A_i - y~_i)^T g^B_i + (w^B_i y'^B_i - y~_i)^T g^A_i ]

    over the augmented rows: ``upstream`` (n, C) targets, the policy's normalized weights (n,) and
    soft targets (n, C) chosen with the scores along one half's direction, and the other half's
    scores (n, C)."""
    y = upstream.double()
    judged_b = ((weights_a.double()[:, None] * soft_a.double() - y) * scores_b.double()).sum(-1)
    judged_a = ((weights_b.double()[:, None] * soft_b.double() - y) * scores_a.double()).sum(-1)
    d = 0.5 * (judged_b + judged_a)
    stats = torch.stack([d.sum(), torch.full((), float(d.shape[0]), dtype=torch.float64, device=d.device)])
    if distributed and is_distributed():
        all_reduce_sum_([stats])
    return stats


class RefinementStrength(NormalizedWalk):
    """The refinement strength ``gamma`` in [0, 1], moved by the cross-fitted signal (module docstring).

    Args:
        init: starting strength (1: the policy's full refinement; 0: upstream).
        lr: step of ``gamma`` per update in units of the running RMS of the signal.
        decay: EMA decay of the signal's running mean square (and of the evidence averages).
        evidence: move only while the running mean of the signal lies at least this many standard
            errors from zero; ``None``: every update moves it.
    """

    VALUE = "gamma"

    def __init__(self, init: float = 1.0, lr: float = 0.02, decay: float = 0.99, evidence: Optional[float] = None):
        if not (is_real(init) and 0.0 <= init <= 1.0):
            raise ConfigurationError(f"the strength's init must be a number in [0, 1], got {init!r}", "use init=1.0")
        if not (is_real(lr) and 0 < lr < math.inf):
            raise ConfigurationError(f"the strength's lr must be a positive number, got {lr!r}", "use lr=0.02")
        if not (is_real(decay) and 0 <= decay < 1):
            raise ConfigurationError(f"decay must be a number in [0, 1), got {decay!r}", "use decay=0.99")
        if evidence is not None and not (is_real(evidence) and 0 <= evidence < math.inf):
            raise ConfigurationError(f"evidence must be None or a number >= 0, got {evidence!r}", "use evidence=None")
        self.init, self.lr = float(init), float(lr)
        self._init_walk(self.init, decay, evidence)

    @property
    def value(self) -> torch.Tensor:
        """The current strength, a 0-dim fp32 tensor on the state's device."""
        return self.gamma.float()

    def propose(self, stats: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The state after one update from :func:`cross_fit_statistics` (None: unchanged), without
        changing this object (:meth:`load_state_dict` commits it). A batch without rows or with a
        non-finite signal leaves the state as it is."""
        if stats is None:
            return self._walk_state()
        total, n = stats.double().unbind()
        d = total / n.clamp_min(1.0)
        valid = (n > 0) & torch.isfinite(d)
        return self._propose_walk(d, valid, 0.0, 1.0)

    # ------------------------------------------------------------------ state
    def check_state(self, state: Any) -> None:
        """Raise (changing nothing) unless ``state`` is a complete, finite :meth:`state_dict`."""
        keys = ("gamma", "mean_square", "updates", "test_mean", "test_square")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ConfigurationError(f"a refinement-strength state needs the keys {keys}",
                                     "load a state saved by RefinementStrength.state_dict()")
        for k in keys:
            v = float(state[k]) if isinstance(state[k], (torch.Tensor, int, float)) else float("nan")
            if not math.isfinite(v):
                raise NonFiniteError(f"the refinement-strength state's {k!r} is {state[k]!r}", "load an intact checkpoint")
        if not 0.0 <= float(state["gamma"]) <= 1.0 or int(state["updates"]) < 0 or float(state["mean_square"]) < 0:
            raise ConfigurationError("the refinement-strength state is out of range (gamma outside [0, 1], or a "
                                     "negative count or mean square)", "load an intact checkpoint")

    def __repr__(self) -> str:
        return f"RefinementStrength(init={self.init}, lr={self.lr}, decay={self.decay}, evidence={self.evidence})"


def resolve_strength(strength):
    """``(fixed strength, RefinementStrength or None)`` from a policy's ``strength`` option: a number
    in [0, 1] (fixed), ``"auto"`` (fixed strength None: 1 for batches that hold originals, 0
    without), ``"adaptive"`` (:class:`RefinementStrength` defaults) or a ``RefinementStrength``."""
    if isinstance(strength, str):
        if strength not in STRENGTHS:
            raise ConfigurationError(f"strength must be a number in [0, 1], 'auto', 'adaptive' or a RefinementStrength, "
                                     f"got {strength!r}", "use strength='auto' or strength=1.0")
        if strength == "auto":
            return None, None
        strength = RefinementStrength()
    if isinstance(strength, RefinementStrength):
        return strength.init, strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ConfigurationError(f"strength must be a number in [0, 1], 'auto', 'adaptive' or a RefinementStrength, got "
                                 f"{strength!r}", "use strength='adaptive' or strength=1.0 (full refinement)")
    return float(strength), None


def apply_strength(weights: torch.Tensor, soft: torch.Tensor, upstream: torch.Tensor, augmented: torch.Tensor, gamma):
    """``w_eff = 1 + gamma (w - 1)`` and ``y_eff = y~ + gamma (y' - y~)`` on the ``augmented`` rows
    (before the weights are normalized); other rows unchanged."""
    # a Python number stays one (a tensor made from it would be a host-to-device copy on a GPU)
    gamma = gamma.to(torch.float32) if torch.is_tensor(gamma) else float(gamma)
    weights = torch.where(augmented, 1 + gamma * (weights - 1), weights)
    soft = torch.where(augmented[:, None], upstream + gamma * (soft - upstream), soft)
    return weights, soft
