"""The policy interface, the per-call context policies work from, and the shared weight renormalization.

A policy turns class scores ``g`` (and whatever else the context offers) into per-row weights and soft
targets. Simple policies (SAflex, L2RW) only implement ``__call__(scores, targets, generator)`` and
inherit :meth:`Policy.refine`, which scores the augmented rows with the refiner's validation
direction. Richer policies (AutoDO, influence) override :meth:`Policy.refine` and use the
:class:`RefineContext` to get features, other validation directions, the batch's dataset indices or
scores for any subset of rows.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..distributed import all_reduce_sum_, is_distributed
from ..errors import ConfigurationError, ShapeError, UnsupportedModelError
from ..heads import hidden_by_checkpoint, reentrant_checkpoint
from ..share import resolve_share
from ..valve import resolve_strength

__all__ = ["Policy", "RefineContext", "Scoring", "ValidationSource", "Mixing", "renormalize", "class_renormalize", "WEIGHT_NORMS"]

#: Values of a policy's ``weight_norm`` option (``"auto"`` and ``"class"``: AugmentationRefiner only).
WEIGHT_NORMS = ("auto", "class", "augmented", "batch", "none")


def renormalize(weights: torch.Tensor, *, distributed: bool = False) -> torch.Tensor:
    """Scale non-negative weights to mean 1 over the batch; an all-zero batch stays all zero.

    Mean 1 keeps the loss scale (and so the effective learning rate) of an unweighted batch.
    ``distributed=True``: the mean is over the global batch of all processes (one all-reduce).
    """
    total, count = weights.sum(), float(weights.shape[0])
    if distributed and is_distributed():
        stats = torch.stack([total.detach().double().cpu(), torch.tensor(count, dtype=torch.float64)])
        all_reduce_sum_([stats])
        total, count = float(stats[0]), float(stats[1])
        if total <= 0:
            return torch.zeros_like(weights)
        return weights * (count / total)
    # on the device, without a sync: count / total in the weights' dtype (the same rounding as the
    # host division, whose double result rounds to the same fp32 value), 0 for an all-zero batch
    factor = torch.where(total > 0, torch.full_like(total, count) / total, torch.zeros_like(total))
    return weights * factor


def class_renormalize(weights: torch.Tensor, targets: torch.Tensor, *, distributed: bool = False) -> torch.Tensor:
    """Scale non-negative weights so that every class keeps its upstream share of the batch.

    With upstream targets ``y`` (B, C) (one-hot or soft), class ``c`` holds mass ``n_c = sum_i y_ic``
    upstream and ``m_c = sum_i y_ic w_i`` after weighting; row ``i`` is scaled by
    ``sum_c y_ic n_c / m_c`` (a class whose rows all have weight 0 stays at 0). For one-hot targets
    the weights then have mean 1 within each class present, so the weights choose rows within a
    class but do not move weight between classes; for any targets the total is the batch size
    (``sum_i w'_i = sum_c n_c``), as with :func:`renormalize`, unless a class is dropped whole.
    ``distributed=True``: the class sums are those of the global batch (one all-reduce).
    """
    if weights.dim() != 1 or targets.dim() != 2 or targets.shape[0] != weights.shape[0]:
        raise ShapeError(f"class_renormalize needs weights (B,) and targets (B, C), got {tuple(weights.shape)} "
                         f"and {tuple(targets.shape)}", "pass one weight and one target row per sample "
                         "(class indices as one-hot probabilities)")
    y = targets.to(torch.float64)
    w = weights.to(torch.float64)
    count, mass = y.sum(0), w @ y  # (C,) each: upstream and weighted class mass
    if distributed and is_distributed():
        sums = torch.stack([count, mass])
        all_reduce_sum_([sums])
        count, mass = sums.unbind()
    # count / mass; a class without mass (0/0 = NaN, or n/0 = inf) gets 0
    ratio = torch.nan_to_num(count / mass, nan=0.0, posinf=0.0)
    return weights * (y @ ratio).to(weights.dtype)


#: the error of a call before which the refiner's hooks recorded no training forward at all
_NOTHING_RECORDED = (
    "no training forward of the model this refiner was built on was recorded since the last call (each "
    "call drops the forwards recorded before it: with two forwards and then two calls, the second finds "
    "none); otherwise the logits come from another model (one rebuilt or reloaded mid-run), or from a "
    "forward in eval mode or under torch.no_grad()",
    "call the refiner right after its own training forward, with the model in train mode and autograd "
    "on; for a model built anew, build a new refiner on it (with its optimizer) and load this one's "
    "state_dict() into it; to train on a forward the hooks do not see on purpose, pass features= "
    "(last-layer mode) or inputs= (full mode) for the rows you pass")


@dataclass(frozen=True)
class Scoring:
    """How class scores are computed for a call (set up by the refiner shell).

    ``net``: the unwrapped model; ``mode``: ``"last_layer"``, ``"full"``, ``"double_backward"`` or
    ``"auto"``; ``bn_mode``: BatchNorm in scoring passes; ``head`` / ``head_name``: the linear
    classifier and its dotted name (None when not needed); ``capture``: the
    :class:`~augplug.heads.ActivationCapture` of the training forward; ``params``: the named
    parameters a full-model direction covers."""

    net: Any
    mode: str
    bn_mode: str
    head: Any
    head_name: Optional[str]
    capture: Any
    params: Callable[[], Dict[str, Any]]
    #: full-model scores may rerun the training forward: one-sided finite differences on the training
    #: forward's own log-probabilities (set by the refiner for ``mode="full"`` with ``bn_mode="train"``
    #: on a model that is not compiled; :meth:`RefineContext.scores` checks the rest per call)
    replay_forward: bool = False


@dataclass(frozen=True)
class ValidationSource:
    """The refiner core's validation direction, as a policy may read it: ``is_due()`` (a refresh is
    due on this call), ``compute(num_classes)`` (a fresh :class:`~augplug.scores.GradSum`; advances
    the stream), ``current()`` (the cached direction), ``halves()`` (the cached half directions or
    None) and ``loss()`` (the last validation loss)."""

    is_due: Callable[[], bool]
    compute: Callable[[int], Any]
    current: Callable[[], Optional[Dict[str, torch.Tensor]]]
    halves: Callable[[], Any]
    loss: Callable[[], float]


@dataclass(frozen=True)
class Mixing:
    """How the refiner mixes rows into the loss on this call: ``coef_i = orig_weight`` for originals,
    ``aug_weight * w_i`` for augmented rows; the loss is ``sum_i coef_i l_i / denominator`` with the
    denominator ``sum_i coef_i`` for ``weight_norm="batch"``, else the unweighted count."""

    orig_weight: float
    aug_weight: Any
    weight_norm: str


class RefineContext:
    """Everything a policy may use for one refiner call; expensive parts are computed on demand.

    Attributes:
        logits: ``(B, C)`` training logits (still attached to the graph).
        targets: ``(B, C)`` upstream soft targets (fp32).
        augmented: ``(B,)`` bool mask of the rows to refine.
        active: True once the warm-up is over.
        index: the batch's dataset positions (``index=`` of the call) or None.
        sources: the rows' source ids (``sources=`` of the call: which operation or generator made
            each row) or None.
        rows: the augmented rows as an index for (B, ...) tensors: a slice when they are the tail of
            the batch (``num_original=``; indexing needs no device sync), else the bool mask.
        step: optimizer updates so far.
        scoring: :class:`Scoring`; validation: :class:`ValidationSource`; mixing: :class:`Mixing`.
    """

    def __init__(self, logits, targets, augmented, active: bool, *, scoring: Scoring, validation: ValidationSource,
                 mixing: Mixing, step: int, noise: Callable[..., torch.Generator], inputs=None, features=None,
                 index=None, rows=None, n_augmented: Optional[int] = None, sources=None):
        self.logits = logits
        self.sources = sources
        self.targets = targets
        self.augmented = augmented
        self.rows = augmented if rows is None else rows
        self._n_augmented = n_augmented
        self.active = bool(active)
        self.index = index
        self.scoring, self.validation, self.mixing = scoring, validation, mixing
        self.step = int(step)
        self._noise = noise
        self._inputs = inputs
        self._features = features
        self._direction = None
        self.v_new = None          # a GradSum when this call recomputed the validation direction
        self.refreshed = False
        self.scored = False        # set when scores were computed
        #: score every row in one pass and slice (set by the refiner when the originals are scored
        #: too, in modes where a pass costs a model forward and rows are scored independently)
        self.score_all_rows = False
        #: score with the closed-form last layer (the direction's classifier part) although the mode
        #: runs the model: set by the refiner on the calls between model score passes
        #: (``Schedule.model_scores_every``, or a budget's choice)
        self.closed_form = False
        self._all_scores: Optional[torch.Tensor] = None
        self._generator: Optional[torch.Generator] = None
        #: how the scores of this call were computed (:data:`SCORE_PASSES`), None before any
        self.score_pass: Optional[str] = None
        self._replayed: list = []  # (direction, scores of all rows) of the training-forward pass

    @property
    def batch(self) -> int:
        return self.logits.shape[0]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def n_augmented(self) -> int:
        if self._n_augmented is None:
            self._n_augmented = int(self.augmented.sum())
        return self._n_augmented

    @property
    def generator(self) -> torch.Generator:
        """A CPU generator for this call's random draws (Gumbel noise, ...).

        Seeded from the refiner's seed, the process rank and the call count, so draws are
        reproducible after a resume and independent across processes; it never touches the global
        RNG or the validation stream's RNG (which must stay identical on every process).
        """
        if self._generator is None:
            self._generator = self._noise()
        return self._generator

    def noise(self, stream: int) -> torch.Generator:
        """A fresh generator for another independent stream of this call's draws."""
        return self._noise(stream)

    def features(self, required: bool = True) -> Optional[torch.Tensor]:
        """``(B, A)`` inputs of the classifier head for this batch (captured or passed as ``features=``)."""
        if self._features is None:
            self._features = self.scoring.capture.features(self.batch, self.logits)
        f = self._features
        if f is None:
            if required:
                self._check_not_checkpointed("the classifier's input features")
            if required and self.scoring.capture.recorded_nothing:
                raise ShapeError(*_NOTHING_RECORDED)
            if required:
                raise ShapeError(
                    f"no classifier features for the {self.batch} rows of this batch were captured (no training "
                    f"forward since the last call had {self.batch} rows; each call drops the forwards recorded "
                    f"before it, and forwards under torch.no_grad() or in eval mode are not recorded)",
                    "call the refiner right after the training forward (model in train mode, autograd on), "
                    "before the next forward that another refiner call will use, once per forward, with all of "
                    "that forward's rows: drop or select rows (ignore_index labels) before the forward, not "
                    "after it, or pass features= for the rows you pass")
            return None
        if f.shape[0] != self.batch:
            raise ShapeError(f"features have {f.shape[0]} rows, logits {self.batch}", "pass matching features")
        return f.flatten(1)

    def inputs(self) -> Any:
        """The model inputs of this batch (captured or passed as ``inputs=``)."""
        x = self._inputs if self._inputs is not None else self.scoring.capture.inputs(self.batch, self.logits)
        odd = self.scoring.capture.odd_input if x is None else None if torch.is_tensor(x) else type(x).__name__
        if odd is not None:
            raise UnsupportedModelError(
                f"full-model scores run the model on each sample's input, which must be one tensor with a row per "
                f"sample; this model's input is a {odd}",
                "use mode='last_layer' (the default: it reads the classifier's input features, whatever the model "
                "takes), or give the model one input tensor")
        if x is None:
            self._check_not_checkpointed("the model's inputs")
            if self.scoring.capture.recorded_nothing:
                raise ShapeError(*_NOTHING_RECORDED)
            raise ShapeError(f"no model inputs for the {self.batch} rows of this batch were captured",
                             "pass inputs= (the tensor fed to the model) to the refiner")
        if x.shape[0] != self.batch:
            raise ShapeError(f"inputs have {x.shape[0]} rows, logits {self.batch}", "pass the batch fed to the model")
        self._inputs = x
        return x

    def _check_not_checkpointed(self, what: str) -> None:
        """Name reentrant activation checkpointing as the cause of a capture that found nothing."""
        if reentrant_checkpoint(self.logits):
            raise hidden_by_checkpoint(what)

    def check_score_inputs(self) -> None:
        """Raise now (before any validation pass) when the scoring inputs are missing."""
        if self.scoring.mode == "last_layer" or self.closed_form:
            self.features()
        else:
            self.inputs()

    def direction(self) -> Dict[str, torch.Tensor]:
        """The validation direction ``v = -grad L_val``, refreshed on the refiner's schedule."""
        if self._direction is None:
            self.refreshed = self.validation.is_due()
            if self.refreshed:
                self.v_new = self.validation.compute(self.num_classes)
                self._direction = self.v_new.direction()
            else:
                self._direction = self.validation.current()
        return self._direction

    def val_loss(self) -> float:
        """The validation loss of the direction in use on this call."""
        self.direction()
        return self.validation.loss() if self.v_new is None else self.v_new.loss_sum / max(self.v_new.count, 1)

    def half_directions(self):
        """The directions of the two validation halves (refreshed with :meth:`direction`), or None
        when the refiner does not split its validation samples."""
        self.direction()
        if self.v_new is not None:
            halves = self.v_new.halves
            return None if halves is None else tuple(half.direction() for half in halves)
        return self.validation.halves()

    def scores(self, rows: Optional[torch.Tensor] = None, v: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Class scores ``g`` (fp32) of ``rows`` (a bool mask or any index; default: the augmented rows)
        along ``v`` (default: the validation direction)."""
        rows = self.rows if rows is None else rows
        if self.score_all_rows and v is None:
            if self._all_scores is None:
                self._all_scores = self._scores_of(slice(None), None)
            return self._all_scores[rows]
        return self._scores_of(rows, v)

    def _scores_of(self, rows, v: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
        from ..scores import class_scores  # local: scores imports heads, heads is light

        self.check_score_inputs()
        v = self.direction() if v is None else v
        sc = self.scoring
        self.scored = True
        if sc.mode == "last_layer" or self.closed_form:
            self.score_pass = "closed_form"
            # detached: features passed by the user may carry the training graph; scores are constants
            return class_scores(sc.net, v=v, mode="last_layer", features=self.features()[rows].detach(),
                                logits=self.logits[rows], head_name=sc.head_name).float()
        if sc.replay_forward and sc.mode == "full":
            g = self._training_forward_scores(v)
            if g is not None:
                return g[rows]
        self.score_pass = {"full": "forward_mode"}.get(sc.mode, sc.mode)
        with sc.capture.paused():
            if sc.bn_mode == "train":   # the whole batch, so BatchNorm normalizes with the training batch's
                return class_scores(sc.net, self.inputs(), v, mode=sc.mode, bn="train").float()[rows]
            return class_scores(sc.net, self.inputs()[rows], v, mode=sc.mode, bn=sc.bn_mode).float()

    def _training_forward_scores(self, v: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Scores of every row by one more forward: the training forward rerun at ``theta + eps v``
        (same batch statistics, same dropout masks), differenced against the training logits.

        None (forward mode is used) unless one fp32 forward without autocast produced the whole
        batch. When the logits passed to the refiner are not that forward's output (transformed by
        the caller), the difference would be meaningless: a one-time warning, and forward mode."""
        from ..scores import REPLAY_TOLERANCE, BaseMismatchError, finite_difference_scores

        for done, g in self._replayed:
            if done is v:
                return g
        sc = self.scoring
        replay = sc.capture.replay(self.batch, self.logits)
        if replay is None or replay.autocast or self.logits.dtype != torch.float32:
            return None
        base = torch.log_softmax(self.logits.detach(), -1)
        try:
            with sc.capture.paused():
                g = finite_difference_scores(sc.net, self.inputs(), v, base_log_probs=base, replay=replay,
                                             base_tolerance=REPLAY_TOLERANCE)
        except BaseMismatchError as e:
            _warn_once("replay", f"full-model scores use forward mode: the logits passed to the refiner are not the "
                                 f"model's output for its captured inputs ({e.args[0]})")
            return None
        self._replayed.append((v, g))
        self.score_pass = "finite_difference"
        return g


#: Values of ``RefineContext.score_pass`` (and ``refiner.stats["score_pass"]``).
#: ``"auto"``: forward mode, or double backward where an operation has no forward-mode formula.
SCORE_PASSES = ("closed_form", "forward_mode", "finite_difference", "double_backward", "auto")
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class Policy:
    """A refinement policy. ``needs_scores=False`` lets the refiner skip computing ``g``.

    ``__call__`` returns weights on their absolute scale (1 = an ordinary sample); the refiner applies
    the normalization chosen by its ``weight_norm`` option. Policies that keep state (tables, networks)
    also implement ``state_dict`` / ``load_state_dict``; the refiner saves and restores it.
    """

    needs_scores: bool = True
    name: str = "policy"
    #: What ``Schedule(budget="auto")`` (the default) means for this policy: a fraction of a plain
    #: step, or None for the exact schedule. None unless the policy's quality under a budget was
    #: measured: SAflex sets :data:`augplug.schedule.AUTO_BUDGET`; L2RW keeps None (on the digits
    #: demo the budget's spaced-out reads cost it 4.2 and 5.9 points, seeds 0-2 and 3-9); AutoDO and influence were
    #: not measured under a budget. An explicit ``budget=`` applies to every policy.
    auto_budget: Optional[float] = None
    #: The policy reads ``index=`` (dataset positions, for per-point state) and checks it itself, with
    #: its own error; for the others the refiner checks only that it has one integer per row.
    checks_index: bool = False

    @property
    def reads_sources(self) -> bool:
        """Whether the policy reads ``sources=`` (evidence pooled by source); the refiner warns once (a
        ``RuntimeWarning``) when a call passes them to a policy that does not."""
        return False

    def __call__(self, scores: Optional[torch.Tensor], targets: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    #: The refiner rescales the weights of augmented rows to mean 1 (over all processes) when its
    #: ``weight_norm`` is ``"augmented"``; policies whose weights are meaningful on their absolute
    #: scale set this to False.
    refiner_renormalizes: bool = True

    #: How the refiner mixes the rows into the loss. Policies that choose per-row weights from class
    #: scores (SAflex, L2RW) and ``"none"`` take these as options; the others keep these values.
    #: ``weight_norm``: how the augmented rows' weights are normalized (:data:`WEIGHT_NORMS`);
    #: ``aug_weight``: the augmented rows' share of the loss (a number, ``"adaptive"`` or an
    #: :class:`~augplug.share.AdaptiveShare`); ``strength``: the refinement strength (a number in
    #: [0, 1], ``"auto"``, ``"adaptive"`` or a :class:`~augplug.valve.RefinementStrength`).
    weight_norm: str = "augmented"
    aug_weight: Any = 1.0
    strength: Any = 1.0

    def _set_mixing(self, weight_norm: Optional[str] = None, aug_weight: Any = None, strength: Any = None) -> None:
        """Check and keep the mixing options a subclass takes (None: the class's default)."""
        if weight_norm is not None:
            if weight_norm not in WEIGHT_NORMS:
                raise ConfigurationError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}",
                                         "use 'auto', 'class', 'augmented' (the paper) or 'batch'")
            self.weight_norm = weight_norm
        if aug_weight is not None:
            resolve_share(aug_weight)
            self.aug_weight = aug_weight
        if strength is not None:
            resolve_strength(strength)
            self.strength = strength

    def mixing_repr(self) -> str:
        return f"weight_norm={self.weight_norm!r}, aug_weight={self.aug_weight!r}, strength={self.strength!r}"

    def observe(self, ctx: RefineContext, scores: torch.Tensor) -> None:
        """Called by :meth:`refine` with the augmented rows' scores along the validation direction,
        after ``__call__`` chose their weights, for policies that learn from the scores they see
        (default: nothing). A change must wait for :meth:`commit` (and be dropped by :meth:`rollback`)."""

    def call_inputs(self, ctx: RefineContext) -> Dict[str, Any]:
        """Extra keyword arguments :meth:`refine` passes to ``__call__`` (default: none)."""
        return {}

    def refine(self, ctx: RefineContext) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-batch absolute ``(weights (B,), soft_targets (B, C), scores (B, C))`` for one call.

        The default scores the augmented rows once the warm-up is over and applies ``__call__`` to
        them; other rows keep weight 1, their upstream target and zero scores.
        """
        y, aug = ctx.targets, ctx.rows
        if ctx.active and self.needs_scores and ctx.n_augmented == ctx.batch:  # every row refined
            g = ctx.scores(aug)
            w, s = self(g, y[aug], ctx.generator, **self.call_inputs(ctx))
            self.observe(ctx, g)
            return w.to(torch.float32), s.to(y.dtype), g.to(torch.float32)
        weights = torch.ones(ctx.batch, dtype=torch.float32, device=y.device)
        soft = y.clone()
        scores = torch.zeros(ctx.batch, ctx.num_classes, dtype=torch.float32, device=y.device)
        # in a process group every process must reach the same collectives (validation refresh,
        # batch statistics), so a process without augmented rows still scores its empty set
        if ctx.n_augmented == 0 and not is_distributed():
            return weights, soft, scores
        if not self.needs_scores:
            w, s = self(None, y[aug])
        elif not ctx.active:
            return weights, soft, scores
        else:
            g = ctx.scores(aug)
            w, s = self(g, y[aug], ctx.generator, **self.call_inputs(ctx))
            self.observe(ctx, g)
            scores[aug] = g.to(scores)
        weights[aug], soft[aug] = w.to(weights), s.to(soft)
        return weights, soft, scores

    # ------------------------------------------------------------------ transactions and state
    # A policy that changes its own state inside refine() (tables, buffers) makes the change undoable:
    # the refiner calls commit() once the whole call has succeeded and rollback() when any part of it
    # (the policy's or the refiner's) raised, so a rejected call leaves the policy as it was.
    @property
    def has_state(self) -> bool:
        """Whether the refiner saves this policy's state (``state_dict`` / ``load_state_dict``)."""
        return hasattr(self, "state_dict")

    def commit(self) -> None:
        """Make this call's changes final (default: nothing to do)."""

    def rollback(self) -> None:
        """Undo the changes of the call in progress (default: nothing to undo)."""

    def check_state(self, state: Any) -> None:
        """Raise (changing nothing) unless ``state`` can be loaded by ``load_state_dict``."""

    def check_call(self, *, index=None, sources=None, batch: int = 0) -> None:
        """Raise a typed error for a call's ``index=`` / ``sources=`` the policy would refuse (checked
        by the refiner before anything runs, so that in a process group every process rejects the
        step together). Default: nothing to check."""

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
