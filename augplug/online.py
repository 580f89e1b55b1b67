"""The step rule shared by the learned share (:mod:`augplug.share`) and the refinement strength
(:mod:`augplug.valve`): follow the sign of a noisy signal ``d`` with steps normalized by its running
RMS, optionally only while its running mean is significant. A leaf module (imports only torch).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["normalized_step", "significant", "state_tensor", "assign_state", "NormalizedWalk"]


#: the boost (:func:`normalized_step`) starts where the running mean lies this many standard errors from
#: zero (the evidence test's default threshold: pure noise passes it about 0.3 % of the time) ...
BOOST_FROM = 3.0
#: ... once this many updates are in (the first few give a standard error too rough to trust)
BOOST_AFTER = 8

#: a signal beyond this many running RMS is clipped to it (once :data:`CLIP_AFTER` updates are in) before
#: it enters the RMS and the step: one outlier (a loss spike, a batch of broken views, a step at a
#: diverging learning rate) would otherwise inflate the RMS for hundreds of updates and freeze the walk
CLIP_RMS = 10.0
CLIP_AFTER = 8


def normalized_step(d: torch.Tensor, updates: torch.Tensor, mean_square: torch.Tensor, test_mean: torch.Tensor,
                    test_square: torch.Tensor, *, lr, decay: float, evidence: Optional[float],
                    boost: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(step, mean_square, test_mean, test_square)`` after one signal ``d`` (0-dim fp64 tensors).

    The step is ``lr * d / rms(d)`` (``lr`` a number or a 0-dim tensor). From update
    :data:`CLIP_AFTER` on, ``d`` is first clipped to :data:`CLIP_RMS` times the RMS so far: one outlier
    (a loss spike; a step at a learning rate that diverged) then raises the RMS by at most a factor
    of about 1.4 instead of by its own size, which kept every later step near 0 for hundreds of
    updates. ``mean_square`` is an
    exponential average of ``d**2`` (decay ``decay``) started at 0; the RMS divides it by
    ``1 - decay**n`` after ``n`` updates, so that it is the weighted mean of the squares seen so far
    (the bias correction of Adam's second moment). Without the correction an average started at the
    first square stays near that one value for about ``1 / (1 - decay)`` updates, and a small first
    signal inflates every early step. With ``evidence=k`` the step is 0 unless the bias-corrected
    running mean of ``d`` lies ``k`` standard errors from zero (:func:`significant`).

    With ``boost=c`` the step is multiplied by ``clip(|z| / BOOST_FROM, 1, c)``, ``z`` the running
    mean of ``d`` over its standard error, from update :data:`BOOST_AFTER` on: a consistent signal
    moves the scalar up to ``c`` times faster, while pure noise, whose ``|z|`` rarely passes
    ``BOOST_FROM``, walks as without it (``benchmarks/share_walk.py``)."""
    if decay > 0:   # the RMS so far (bias-corrected; 0 before the first update), on the device: no host read
        seen = -torch.expm1(updates.double() * math.log(decay))
        limit = CLIP_RMS * (mean_square / seen.clamp_min(1e-300)).sqrt()
        d = torch.where(updates >= CLIP_AFTER, torch.minimum(torch.maximum(d, -limit), limit), d)
    ms = decay * mean_square + (1 - decay) * d * d
    # 1 - decay**n as -expm1(n log decay): exact for small n, and no power kernel of its own
    corrected = ms / -torch.expm1((updates + 1).double() * math.log(decay)) if decay > 0 else ms
    # ms is 0 only while every signal has been 0, and then d is 0 and so is the step
    step = lr * d / corrected.clamp_min(1e-300).sqrt()
    tm, ts = test_mean, test_square
    if evidence is not None or boost is not None:
        # bias-corrected exponential averages of d and d^2 (update s of n weighted (1-b) b^(n-s) / (1-b^n))
        count = updates + 1
        alpha = (1 - decay) / (1 - decay ** count.double())
        tm, ts = test_mean + alpha * (d - test_mean), test_square + alpha * (d * d - test_square)
    if evidence is not None:
        step = torch.where(significant(tm, ts, count, decay, evidence), step, torch.zeros_like(step))
    if boost is not None:
        z = tm.abs() / standard_error(tm, ts, count, decay).clamp_min(1e-300)
        gain = (z / BOOST_FROM).clamp(1.0, float(boost))
        step = torch.where(count >= BOOST_AFTER, step * gain, step)
    return step, ms, tm, ts


def standard_error(mean: torch.Tensor, ms: torch.Tensor, count: torch.Tensor, decay: float) -> torch.Tensor:
    """The standard error of the running mean (:func:`significant`; 0 after one update)."""
    b, n = decay, count.double()
    q = (1 - b) * (1 - b ** (2 * n)) / ((1 + b) * (1 - b ** n) ** 2)
    var = (ms - mean * mean).clamp_min(0) / (1 - q).clamp_min(1e-300)
    return (q * var).sqrt()


def significant(mean: torch.Tensor, ms: torch.Tensor, count: torch.Tensor, decay: float, evidence: float
                ) -> torch.Tensor:
    """Whether the running mean lies ``evidence`` standard errors from zero after ``count`` updates.

    ``mean``, ``ms``: the bias-corrected running averages of ``d`` and ``d**2``. With ``q`` the sum of
    their squared weights, the signal's variance is estimated by ``(ms - mean**2) / (1 - q)`` and that
    of its running mean is ``q`` times it. One update gives no variance, so no evidence."""
    return (count >= 2) & (mean.abs() >= evidence * standard_error(mean, ms, count, decay)) & (mean != 0)


def state_tensor(value, dtype: torch.dtype, device) -> torch.Tensor:
    """A state entry as a 0-dim tensor: a tensor (a committed proposal) is kept where it is (no copy,
    so no device sync); a number (a loaded state) is placed on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def assign_state(obj, state, fields, device) -> None:
    """``obj.<name> = state_tensor(state[name], dtype, device)`` for each ``(name, dtype, default)`` of
    ``fields`` (``default`` None: the entry is required; otherwise used when it is missing)."""
    for name, dtype, default in fields:
        value = state[name] if default is None else state.get(name, default)
        setattr(obj, name, state_tensor(value, dtype, device))


class NormalizedWalk:
    """A learned scalar that :func:`normalized_step` moves, with the running statistics of its signal.

    The scalar (named ``VALUE`` in the state: the share's ``log_share``, the strength's ``gamma``),
    the signal's mean square, the update count and the evidence test's averages are 0-dim tensors
    on one device, updated there, so a learned scalar adds no host read to a training step. A
    subclass calls :meth:`_init_walk`, computes its signal ``d`` and whether it is ``valid``, and
    returns :meth:`_propose_walk`; committing is :meth:`load_state_dict`.
    """

    #: the scalar's name in the state
    VALUE = "value"
    #: the evidence averages of a state that lacks them (None: a state must hold them)
    EVIDENCE_DEFAULT: Optional[float] = None

    def _init_walk(self, value: float, decay: float, evidence: Optional[float]) -> None:
        self.decay = float(decay)
        self.evidence = None if evidence is None else float(evidence)
        self.boost: Optional[float] = None   # a subclass may set it (normalized_step's boost)
        setattr(self, self.VALUE, torch.tensor(float(value), dtype=torch.float64))
        self.mean_square = torch.tensor(0.0, dtype=torch.float64)
        self.updates = torch.tensor(0, dtype=torch.int64)
        self.test_mean = torch.tensor(0.0, dtype=torch.float64)
        self.test_square = torch.tensor(0.0, dtype=torch.float64)

    def _fields(self) -> Tuple[str, ...]:
        return (self.VALUE, "mean_square", "updates", "test_mean", "test_square")

    def step_size(self, updates: torch.Tensor):
        """The step ``lr`` of the next update after ``updates`` updates (a number or a 0-dim tensor)."""
        return self.lr

    def _propose_walk(self, d: torch.Tensor, valid: torch.Tensor, low: float, high: float,
                      base: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
        """The state after one update with signal ``d`` (0-dim fp64), the scalar clipped to
        ``[low, high]``; an invalid signal leaves the state as it is. ``base``: a proposed state to
        start from (default: the current one)."""
        value, ms_old, updates, tm_old, ts_old = ((base[k] if base is not None else getattr(self, k)).to(d.device)
                                                  for k in self._fields())
        # an invalid signal's results (NaN or inf included) are dropped by keep() below
        step, ms, tm, ts = normalized_step(d, updates, ms_old, tm_old, ts_old, lr=self.step_size(updates),
                                           decay=self.decay, evidence=self.evidence, boost=self.boost)

        def keep(new, old):
            return torch.where(valid, new, old)

        return {self.VALUE: keep((value + step).clamp(low, high), value), "mean_square": keep(ms, ms_old),
                "updates": updates + valid.long(), "test_mean": keep(tm, tm_old), "test_square": keep(ts, ts_old)}

    def _walk_state(self) -> Dict[str, torch.Tensor]:
        """The current state as tensors (what :meth:`propose` returns when nothing changes)."""
        return {k: getattr(self, k) for k in self._fields()}

    def to(self, device):
        """Move the state to ``device`` (the refiner puts it beside the model's parameters)."""
        for k in self._fields():
            setattr(self, k, getattr(self, k).to(device))
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {self.VALUE: float(getattr(self, self.VALUE)), "mean_square": float(self.mean_square),
                "updates": int(self.updates), "test_mean": float(self.test_mean),
                "test_square": float(self.test_square)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (numbers, placed on the current state's device) or commit a
        proposal (tensors, kept where they are: no copy, so no device sync)."""
        assign_state(self, state, ((self.VALUE, torch.float64, None), ("mean_square", torch.float64, None),
                                   ("updates", torch.int64, None), ("test_mean", torch.float64, self.EVIDENCE_DEFAULT),
                                   ("test_square", torch.float64, self.EVIDENCE_DEFAULT)),
                     getattr(self, self.VALUE).device)
