"""The augmented rows' share of the loss, learned online from the class scores.

With originals and augmented rows in one batch the refiner's loss is

    L(lam) = (sum_orig l_i + lam * sum_aug w_i l_i) / (n_orig + lam * sum_aug w_i)

(``lam`` is ``aug_weight``; ``lam -> 0`` is training on the originals alone, ``lam = 1`` the
upstream mixture). After one SGD step ``theta' = theta - eta * grad L`` the validation loss moves, to
first order, by

    d L_val(theta') / d lam = -eta * (W_aug / N) * (n_orig / N) * (a_aug - a_orig)

with ``N = n_orig + lam * W_aug``, ``W_aug = sum_aug w_i`` and ``a = mean of y_i^T g_i`` (the
class-score agreement ``grad l_i . grad L_val``, weighted by ``w`` over the augmented rows). So the
validation loss falls by raising ``lam`` exactly when the (refined) augmented rows' gradients agree
with the validation gradient more than the originals' do. :class:`AdaptiveShare` follows the sign of
that derivative in log space, with steps normalized by a running RMS of ``d = a_aug - a_orig`` (the
agreements shrink by orders of magnitude during training, the step size should not):

    log lam <- clip(log lam + lr * d / rms(d), log min_share, log max_share),   d = a_aug - a_orig

With ``evidence=k`` the step is taken only while the running (bias-corrected exponential) mean ``m``
of ``d`` lies at least ``k`` standard errors ``se`` from zero, ``|m| >= k * se``.

Which agreement of the augmented rows enters ``d`` (``signal``):

- ``"direction"`` (default): their upstream targets, unweighted, each row's agreement divided by the size of
  its residual, ``y^T g / |y - p|`` (and the originals' likewise). Since ``y^T g = (y - p)^T u``
  (``u`` the change of the row's logits along the validation direction), this is the first-order
  effect per unit of the row's residual: the direction a row pushes in, not how hard. The plain
  derivative weighs each row by how far from fitted it is, so early in training views that are fitted
  less than the originals (noisy, but with their true labels) can outweigh them although they pull
  toward a worse solution, which shows only as training converges (a short-horizon bias; measured on
  ``docs/trust.md``'s Satellite table). Not the exact derivative; measured against it in
  ``docs/trust.md`` (it ties or gains on average in every table there, and closes that blind spot).
- ``"upstream"``: their upstream targets, unweighted, as they are: the derivative above for the
  augmented rows as the upstream pipeline gave them (the default before the direction signal; the
  contrastive refiner's, whose logits are similarities). With either of these two the policy's
  weights and targets only move weight within the augmented rows.
- ``"refined"``: the policy's soft targets, weighted by its weights: the exact derivative of the
  refined loss at the measured scores. It is biased upward: the policy picked those weights and
  targets because their agreement with this noisy validation gradient is high, so the same
  agreement overstates how much they help (a winner's curse; with augmented rows drawn exactly like
  the originals the refined signal is positive on average, the upstream one zero:
  ``tests/test_share.py``; measured on tables in ``docs/saflex.md``).

The signal is first order and one step ahead: it sees label noise at once but not the slower benefit
of augmentation as a regulariser, so it leans toward the originals (``docs/saflex.md``).

The evidence test (``evidence=``, off by default): when the two kinds of rows help equally, ``d`` is
pure noise, and a step on every update turns it into a random walk of ``log lam``; held below
``max_share``, that walk drifts down; the test stops it (``tests/test_share.py``). It is off by
default: no benchmark gained from it, and it holds back the first steps of a real signal until the
evidence is in (``docs/saflex.md``).
"""
from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Dict, Optional, Tuple

import torch

from .distributed import all_reduce_sum_, is_distributed
from .errors import ConfigurationError, NonFiniteError, ShapeError
from .online import NormalizedWalk, significant

__all__ = ["AdaptiveShare", "FLOAT32_MAX", "RESIDUAL_FLOOR", "SIGNALS", "WANDER", "resolve_share", "share_agreements"]

SIGNALS = ("upstream", "refined", "direction")
#: With ``horizon=T`` the step is ``WANDER / sqrt(T)``: under a signal of pure noise the normalized
#: steps add up to a random walk of ``log lam`` whose spread after the ``T`` updates of the run is
#: about ``WANDER`` (a factor ``e^0.4 = 1.5``) whatever ``T``, while a consistent signal moves it by
#: about ``WANDER * sqrt(T)`` times its mean: a longer run can afford smaller steps. 0.4 puts the two
#: rates measured in ``docs/trust.md`` on one rule (0.03 for an 8-epoch, 0.01 for a 30-epoch run).
#: Without a horizon (the default) the ``t``-th update steps ``WANDER / (2 sqrt(t))``: after any
#: number ``T`` of updates its steps average ``WANDER / sqrt(T)``, the horizon rule's rate for a run
#: of that length, so a consistent signal has moved the share as far as the horizon rule would have;
#: the steps come earlier (about 70 % of the movement in the first half of the updates), and the
#: spread of the noise walk grows slowly with ``T`` (``WANDER / 2 * sqrt(ln T + 0.58)``: 0.46 after
#: 190 updates, 0.58 after 2,370).
WANDER = 0.4
#: the smallest residual ``|y - p|`` the direction signal divides by (a row fitted to float precision)
RESIDUAL_FLOOR = 1e-12
#: the largest finite float32: a loss weight beyond it overflows (to inf, then NaN) in the loss
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def share_agreements(agree_aug: torch.Tensor, weights_aug: Optional[torch.Tensor], agree_orig: torch.Tensor,
                     *, distributed: bool = False) -> torch.Tensor:
    """The share's batch statistics as one fp64 tensor on the rows' device:
    ``[sum_aug w*a, sum_aug w, sum_orig a, n_orig]``, summed over all processes when ``distributed``.
    ``a_aug = [0] / [1]`` and ``a_orig = [2] / [3]`` (:meth:`AdaptiveShare.propose` divides on the
    device, so a training step never waits for these values). ``weights_aug=None``: every augmented
    row has weight 1 (``sum_aug w`` is their count)."""
    dev = agree_orig.device

    def count(t):
        return torch.full((), float(t.shape[0]), dtype=torch.float64, device=dev)

    a = agree_aug.double()
    weighted = (a.sum(), count(a)) if weights_aug is None else ((weights_aug.double() * a).sum(),
                                                                weights_aug.double().sum())
    stats = torch.stack([*weighted, agree_orig.double().sum(), count(agree_orig)])
    if distributed and is_distributed():
        all_reduce_sum_([stats])
    return stats


class AdaptiveShare(NormalizedWalk):
    """The augmented rows' weight ``lam`` in the loss, moved by its first-order validation hypergradient.

    The state (``log lam``, the signal's running mean square, the number of updates, the running
    averages behind the evidence test) is kept as
    0-dim tensors on the model's device and updated there, so the share adds no host read to a step.

    Args:
        lr: a fixed step of ``log lam`` per optimizer update, in units of the running RMS of the
            signal (0.01: about 100 consistent updates to change ``lam`` by a factor e). Default
            (None): ``WANDER / sqrt(horizon)`` when ``horizon`` is given, otherwise the step of the
            ``t``-th update is ``WANDER / (2 sqrt(t))``, which needs no run length (:data:`WANDER`).
        horizon: the number of optimizer updates the run will make (epochs times steps per epoch),
            for a fixed step that suits its length (:data:`WANDER`); an explicit ``lr`` wins.
        init: starting share (1: the upstream mixture).
        min_share, max_share: bounds of ``lam`` (``max_share > 1`` lets augmented rows outweigh
            the originals).
        decay: EMA decay of the signal's running mean and mean square (0.99: about 200 updates
            of evidence).
        signal: which agreement of the augmented rows the share follows: ``"direction"`` (their
            upstream targets, unweighted, per unit of each row's residual ``|y - p|``, the originals'
            too; batches must pass ``probs=``), ``"upstream"`` (the same agreements
            without the division: the exact derivative for the rows as given) or ``"refined"`` (the
            policy's soft targets, weighted by its weights: the exact derivative of the refined
            loss, but biased upward, because the policy chose those weights and targets from the
            same noisy scores). ``None`` (the default): the refiner's choice when it is built,
            ``"direction"`` for the classification refiners and ``"upstream"`` for the contrastive
            one (:func:`resolve_share`); a share used on its own reads ``None`` as ``"direction"``.
        evidence: the share moves only while the running mean of the signal is at least this many
            standard errors from zero (3: once a few dozen updates are in, a signal of pure noise
            passes about 0.3 % of the time). ``None``: every update moves it, and the running
            averages behind the test are not kept (they stay at 0) unless ``boost`` needs them.
        boost: steps grow with the evidence: each is multiplied by ``clip(|z| / 3, 1, boost)``, ``z``
            the running mean of the signal over its standard error, from the 8th update on
            (:func:`augplug.online.normalized_step`). Pure noise walks as without it; a consistent
            signal moves the share up to ``boost`` times faster. ``None`` (the default): off; on the
            trust study ``boost=4`` tied the default overall and lost under SGD (``docs/trust.md``).
    """

    VALUE = "log_share"
    #: older checkpoints lack the evidence averages: they restart from 0, which holds the share still
    #: until a few hundred updates have rebuilt the evidence
    EVIDENCE_DEFAULT = 0.0

    def __init__(self, lr: Optional[float] = None, init: float = 1.0, min_share: float = 1e-3, max_share: float = 1.0,
                 decay: float = 0.99, signal: Optional[str] = None, evidence: Optional[float] = None,
                 horizon: Optional[int] = None, boost: Optional[float] = None):
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral)
                                    or horizon < 1):
            raise ConfigurationError(f"the share's horizon must be a positive number of updates, got {horizon!r}",
                                     "pass the run's optimizer updates (epochs x steps per epoch), or None")
        self.horizon = None if horizon is None else int(horizon)
        if lr is None and horizon is not None:
            lr = WANDER / math.sqrt(horizon)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real)
                               or not (lr > 0 and math.isfinite(lr))):
            raise ConfigurationError(f"the share's lr must be a positive number or None, got {lr!r}",
                                     "use lr=None (a step that shrinks with the updates), or e.g. lr=0.01")
        for name, value in (("init", init), ("min_share", min_share), ("max_share", max_share), ("decay", decay),
                            ("evidence", 0.0 if evidence is None else evidence)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigurationError(f"the share's {name} must be a number, got {value!r}",
                                         "use AdaptiveShare(init=1.0, min_share=1e-3, max_share=1.0)")
        if not (0 < min_share <= init <= max_share and math.isfinite(max_share)):
            raise ConfigurationError(
                f"the share needs 0 < min_share <= init <= max_share < inf, got {min_share}, {init}, {max_share}",
                "use AdaptiveShare(init=1.0, min_share=1e-3, max_share=1.0)")
        if not 0 <= decay < 1:
            raise ConfigurationError(f"decay must be in [0, 1), got {decay}", "use decay=0.99")
        if signal is not None and signal not in SIGNALS:
            raise ConfigurationError(f"signal must be one of {SIGNALS} or None, got {signal!r}",
                                     "use signal=None (the refiner's default) or signal='direction'")
        if evidence is not None and not (evidence >= 0 and math.isfinite(evidence)):
            raise ConfigurationError(f"evidence must be None or a number >= 0, got {evidence}",
                                     "use evidence=3.0 (standard errors), or None to step on every update")
        self.signal = signal
        #: the fixed step, or None for the step that shrinks as ``WANDER / (2 sqrt(t))``
        self.lr = None if lr is None else float(lr)
        self.init, self.min_share, self.max_share = float(init), float(min_share), float(max_share)
        if boost is not None and (isinstance(boost, bool) or not isinstance(boost, numbers.Real)
                                  or not (1 <= boost and math.isfinite(boost))):
            raise ConfigurationError(f"the share's boost must be None or a number >= 1, got {boost!r}",
                                     "use boost=None (steps as the walk's), or e.g. boost=4.0")
        self._init_walk(math.log(self.init), decay, evidence)
        self.boost = None if boost is None else float(boost)
        #: a weak reference to the refiner that learns this share (:meth:`bind`), or None
        self._owner: Optional[weakref.ref] = None
        #: the statistics gathered for the optimizer update ``pending_step`` (-1: none), summed over its
        #: calls (:meth:`gather`); ``pending_failed``: the failed optimizer steps counted when they began
        self.pending = torch.zeros(4, dtype=torch.float64)
        self.pending_step, self.pending_failed = -1, 0

    def bind(self, refiner: Any) -> None:
        """Mark this share as ``refiner``'s (a refiner calls it when its construction has succeeded):
        :func:`resolve_share` then rejects it for any other refiner while that one is alive."""
        self._owner = weakref.ref(refiner)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_owner"] = None   # a copy belongs to no refiner yet (a weak reference cannot be pickled)
        return state

    @property
    def value(self) -> torch.Tensor:
        """The current share: a 0-dim fp32 tensor on the device of the last update (fp32, so that
        the loss it scales keeps its dtype)."""
        return self.value_of({"log_share": self.log_share})

    @staticmethod
    def value_of(state: Dict[str, Any]) -> torch.Tensor:
        """The share a state of :meth:`propose` / :meth:`gather` holds, as :attr:`value` gives it."""
        return state["log_share"].exp().float()

    @property
    def needs_probs(self) -> bool:
        """Whether :meth:`agreement` and :meth:`batch_statistics` need the rows' probabilities
        (``signal="direction"``, or ``None`` not yet resolved by a refiner)."""
        return self.signal in ("direction", None)

    def agreement(self, targets: torch.Tensor, scores: torch.Tensor,
                  probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rows' agreements as this share's signal compares them: ``y^T g`` (``(n, C)`` targets and
        scores), divided by ``|y - p|`` (``probs``: the rows' ``(n, C)`` probabilities) for
        ``signal="direction"``."""
        a = (targets * scores).sum(-1)
        if not self.needs_probs:
            return a
        if probs is None or probs.shape != targets.shape:
            raise ShapeError(f"the share's direction signal needs the rows' (n, C) probabilities, got "
                             f"{None if probs is None else tuple(probs.shape)} for targets {tuple(targets.shape)}",
                             "pass probs=logits.softmax(-1) of the same rows")
        return a / (targets.float() - probs.float()).norm(dim=-1).clamp_min(RESIDUAL_FLOOR).to(a.dtype)

    def batch_statistics(self, targets: torch.Tensor, scores: torch.Tensor, soft: torch.Tensor,
                         weights: torch.Tensor, aug_rows, agree_orig: torch.Tensor, *,
                         distributed: bool = False, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`share_agreements` for this share's ``signal``: the augmented rows ``aug_rows`` (a
        mask or a slice of the batch's ``(B, C)`` ``targets``, ``scores`` and ``soft`` targets and
        ``(B,)`` ``weights``) agree through their upstream targets with weight 1 (``"upstream"``; per
        unit of residual for ``"direction"``, with the batch's ``(B, C)`` ``probs``) or through the
        policy's soft targets and weights (``"refined"``); ``agree_orig``: the originals' agreements
        as :meth:`agreement` gives them."""
        if not (targets.shape == scores.shape == soft.shape and targets.dim() == 2
                and weights.shape == targets.shape[:1]):
            raise ShapeError(f"batch_statistics needs (B, C) targets, scores and soft targets and (B,) weights, got "
                             f"{tuple(targets.shape)}, {tuple(scores.shape)}, {tuple(soft.shape)}, {tuple(weights.shape)}",
                             "pass the whole batch's tensors and pick the augmented rows with aug_rows")
        g = scores[aug_rows]
        if self.signal == "refined":
            return share_agreements((soft[aug_rows] * g).sum(-1), weights[aug_rows], agree_orig, distributed=distributed)
        rows_probs = None if probs is None else probs[aug_rows]
        return share_agreements(self.agreement(targets[aug_rows], g, rows_probs), None, agree_orig,
                                distributed=distributed)

    def propose(self, stats: Optional[torch.Tensor], base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The state after one update from :func:`share_agreements` (None: unchanged), without
        changing this object; :meth:`load_state_dict` commits it. Batches without originals or
        without augmented weight, and non-finite signals, leave the state as it is. ``base``: a
        proposed state to start from (default: the current one)."""
        walk = self._walk_state() if base is None else {k: base[k] for k in self._fields()}
        if stats is None:
            return walk
        d, valid = self._signal(stats)
        return self._propose_walk(d, valid, math.log(self.min_share), math.log(self.max_share), base=walk)

    @staticmethod
    def _signal(stats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(d, valid)`` from :func:`share_agreements`: ``d = a_aug - a_orig`` (0-dim fp64), and whether
        the batch had originals, augmented weight and a finite ``d``."""
        wa_sum, w_sum, ao_sum, n_orig = stats.double().unbind()
        d = wa_sum / w_sum.clamp_min(1e-300) - ao_sum / n_orig.clamp_min(1.0)
        # both sums are >= 0, and d * 0 + 1 is 1 for a finite d, NaN otherwise: one comparison
        return d, w_sum * n_orig * (d * 0 + 1) > 0

    def gather(self, stats: Optional[torch.Tensor], stats_step: int, now: int, failed: int = 0,
               base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The state after a refiner call, without changing this object (:meth:`load_state_dict`
        commits it): the share steps once per optimizer update, on the statistics of all the calls
        of that update summed (:func:`share_agreements` are sums: micro-batches of one update count
        as one batch of their rows, as the processes of a group do).

        ``stats``: this call's statistics (None: none), of rows trained in the update the refiner's
        count was ``stats_step`` at (the call's own count; for views weighed against the rest of
        the loss, the previous call's, whose backward they need). ``now``: the refiner's count of
        updates at this call. Once ``now`` has passed the update the pending statistics were
        gathered for, the share steps on them (:meth:`propose`). ``failed``: the refiner's count
        of optimizer steps that failed without updating anything; when one failed since the
        pending statistics began and no update came, the update they were for never happened,
        and they are dropped (a retried batch is not counted twice). ``base``: a state :meth:`gather`
        proposed earlier in the same call, to go on from (default: the current state).

        A refiner gathers twice per call: first with no statistics, before its loss, so that the
        statistics completed by earlier calls move the share this call's loss uses; then with the
        call's own statistics, from that proposal."""
        if base is None:
            base = {**self._walk_state(), "pending": self.pending, "pending_step": self.pending_step,
                    "pending_failed": self.pending_failed}
        pending, pstep, pfailed = base["pending"], base["pending_step"], base["pending_failed"]
        if pstep >= 0 and now == pstep and failed > pfailed:
            pstep = -1
        flush = None
        if stats is not None:
            stats = stats.to(pending.device, torch.float64)
            if pstep >= 0 and pstep != stats_step:   # statistics of a later update: the earlier ones are complete
                flush, pending, pstep, pfailed = pending, stats, stats_step, failed
            elif pstep < 0:
                pending, pstep, pfailed = stats, stats_step, failed
            else:
                pending = pending + stats
        if pstep >= 0 and now > pstep:   # the update these statistics were gathered for has come
            flush = pending if flush is None else flush + pending
            pending, pstep = torch.zeros_like(pending), -1
        return {**self.propose(flush, base), "pending": pending, "pending_step": pstep, "pending_failed": pfailed}

    def to(self, device):
        super().to(device)
        self.pending = self.pending.to(device)
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "pending": self.pending.tolist(), "pending_step": int(self.pending_step)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (numbers) or commit a proposal of :meth:`gather` (tensors, kept
        where they are). A state without pending statistics (an older checkpoint, a proposal of
        :meth:`propose`) has none."""
        device = self.log_share.device
        super().load_state_dict(state)
        pending = state.get("pending", [0.0] * 4)   # a state without any: nothing pending
        self.pending = torch.as_tensor(pending, dtype=torch.float64).to(device)
        self.pending_step = int(state.get("pending_step", -1))
        self.pending_failed = int(state.get("pending_failed", 0))

    def step_size(self, updates: torch.Tensor):
        """``lr``, or without one ``WANDER / (2 sqrt(t))`` for the ``t = updates + 1``-th update."""
        return self.lr if self.lr is not None else (WANDER / 2) / (updates.double() + 1).sqrt()

    def _significant(self, mean: torch.Tensor, ms: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """:func:`augplug.online.significant` with this share's decay and evidence."""
        return significant(mean, ms, count, self.decay, self.evidence)

    def check_state(self, state: Any) -> None:
        """Raise (changing nothing) unless ``state`` is a complete, finite :meth:`state_dict`."""
        keys = ("log_share", "mean_square", "updates")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ConfigurationError(f"an adaptive share state needs the keys {keys}",
                                     "load a state saved by AdaptiveShare.state_dict()")
        for k in keys + ("test_mean", "test_square"):
            v = state.get(k, 0.0)
            if isinstance(v, torch.Tensor):
                v = float(v)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise NonFiniteError(f"the adaptive share state's {k!r} is {state.get(k)!r}",
                                     "load an intact checkpoint")
        updates = state["updates"]
        updates = updates.item() if isinstance(updates, torch.Tensor) and updates.dim() == 0 else updates
        if isinstance(updates, bool) or float(updates) != int(updates) or int(updates) < 0 \
                or float(state["mean_square"]) < 0 or float(state.get("test_square", 0.0)) < 0:
            raise ConfigurationError("the adaptive share state has a count that is not a whole number >= 0, or a "
                                     "negative mean square", "load a state saved by AdaptiveShare.state_dict()")
        pending, pstep = state.get("pending", [0.0] * 4), state.get("pending_step", -1)
        if isinstance(pstep, bool) or not isinstance(pstep, int) or pstep < -1:
            raise ConfigurationError(f"the adaptive share state's 'pending_step' is {pstep!r}, not an update count",
                                     "load a state saved by AdaptiveShare.state_dict()")
        values = pending.tolist() if isinstance(pending, torch.Tensor) else pending
        if not isinstance(values, (list, tuple)) or len(values) != 4 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigurationError("the adaptive share state's 'pending' is not four numbers",
                                     "load a state saved by AdaptiveShare.state_dict()")
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteError("the adaptive share state's pending statistics hold NaN/inf", "load an intact checkpoint")
        log_share, low, high = float(state["log_share"]), math.log(self.min_share), math.log(self.max_share)
        if isinstance(state["log_share"], bool) or not low - 1e-6 <= log_share <= high + 1e-6:
            raise ConfigurationError(
                f"the adaptive share state's share {math.exp(min(log_share, 700.0)):.4g} is outside this share's "
                f"bounds [{self.min_share:g}, {self.max_share:g}]",
                "load the state into a refiner built with the same AdaptiveShare(min_share=, max_share=)")

    def __repr__(self) -> str:
        return (f"AdaptiveShare(lr={self.lr}, init={self.init}, min_share={self.min_share}, "
                f"max_share={self.max_share}, decay={self.decay}, signal={self.signal!r}, evidence={self.evidence}, "
                f"horizon={self.horizon})")


def resolve_share(aug_weight, signal: Optional[str] = None):
    """``(starting aug_weight, AdaptiveShare or None)`` from a policy's ``aug_weight`` option: a
    number >= 0 (fixed), ``"adaptive"`` (:class:`AdaptiveShare` defaults) or an ``AdaptiveShare``.
    A refiner passes its default ``signal`` (``"direction"``; the contrastive refiner ``"upstream"``),
    which a share whose ``signal`` is ``None`` takes and one that names its own ignores; without it
    (validating an option) nothing is changed."""
    if isinstance(aug_weight, str):
        if aug_weight != "adaptive":
            raise ConfigurationError(f"aug_weight must be a number, 'adaptive' or an AdaptiveShare, got {aug_weight!r}",
                                     "use aug_weight=1.0 or aug_weight='adaptive'")
        aug_weight = AdaptiveShare(signal=signal)
    if isinstance(aug_weight, AdaptiveShare):
        owner = aug_weight._owner() if aug_weight._owner is not None else None
        if owner is not None:
            raise ConfigurationError(
                f"this AdaptiveShare already belongs to another refiner ({type(owner).__name__} at "
                f"{id(owner):#x}); one share object learns one refiner's share, and two would step it twice",
                "give each refiner its own: SAflex(aug_weight=AdaptiveShare(...)) per refiner, or "
                "aug_weight='adaptive'")
        if aug_weight.signal is None and signal is not None:
            aug_weight.signal = signal
        return aug_weight.init, aug_weight
    if isinstance(aug_weight, bool) or not isinstance(aug_weight, (int, float)) or not 0 <= aug_weight <= FLOAT32_MAX:
        raise ConfigurationError(f"aug_weight must be a finite number >= 0, 'adaptive' or an AdaptiveShare, got {aug_weight!r}",
                                 "use a finite aug_weight such as 1.0 (the upstream mixture), or aug_weight='adaptive'")
    return float(aug_weight), None
