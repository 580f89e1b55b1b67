"""AugmentationRefiner: the two-line integration.

    refiner = AugmentationRefiner(model, optimizer, val_loader, method="saflex")
    ...
    loss = refiner(logits, targets)        # instead of criterion(logits, targets)

The refiner keeps the validation stream, the cached validation direction ``v``, hooks on the model
(to see the classifier's features and the model's inputs of the training forward) and on the
optimizer (to count real updates), and a private RNG. Everything else is stateless and lives in
:mod:`augplug.scores` and :mod:`augplug.methods`.
"""
from __future__ import annotations

import copy

import operator
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .core import (_CHECKPOINT_FIX, RefinerCore, _warn_at_caller, check_part_presence, nonfinite,
                   num_val_batches, optimizer_problem, unwrap_optimizer)
from .distributed import all_reduce_sum_, rank as dist_rank, world_size as dist_world_size
from .checks import validate
from .errors import (AugplugError, ConfigurationError, ModelModeError, NonFiniteError, ShapeError,
                     UnsupportedHeadError)
from .heads import (NON_REENTRANT, ActivationCapture, GradientSlot, check_closed_form_head, find_classifier,
                    is_compiled, other_captures, reentrant_checkpoint, tied_names, unwrap_model)
from .methods import WEIGHT_NORMS, Policy, class_renormalize, create_policy, renormalize
from .methods.base import Mixing, RefineContext, Scoring, ValidationSource
from .options import is_integer, is_real
from .schedule import BAD_VAL_BATCH, Schedule, resolve_schedule
from .scores import SCORE_MODES, GradSum, half_mask, head_features, head_gradient, validation_gradient
from .share import FLOAT32_MAX, RESIDUAL_FLOOR, resolve_share
from .valve import apply_strength, cross_fit_statistics, resolve_strength
from .stats import SPREAD_KEYS, StepStats, weight_spread
from .targets import (check_logits, check_row_tensor, check_target_structure, soft_cross_entropy, to_soft_targets,
                      value_problems)
from .transfer import to_device
from .validation import check_batch_rows

__all__ = ["AugmentationRefiner", "DEFAULTS", "BAD_VAL_BATCH", "Schedule", "build_policy", "num_val_batches", "refiner_kwargs",
           "resolve_share", "resolve_strength", "unwrap_optimizer"]

#: The shell's defaults (the method's own options and defaults live on the method class, e.g.
#: :class:`~augplug.methods.SAflex`; the validation schedule's on :class:`~augplug.schedule.Schedule`).
DEFAULTS: Dict[str, Any] = dict(method="saflex", mode="last_layer", bn_mode="eval", orig_weight=1.0)
#: calls of views alone that came before the backward pass of the last one (two calls, one backward)
#: after which the refiner warns once (``AugmentationRefiner._note_second_call``)
SECOND_CALLS_WARNED = 3


def check_shell_options(bn_mode: str, weight_norm: str, orig_weight: float, aug_weight,
                        weight_norms: Tuple[str, ...] = WEIGHT_NORMS, why: str = "") -> None:
    """Reject invalid options shared by every refiner shell (before anything is built).

    ``aug_weight`` is the starting share (a number). ``weight_norms``: the values of the policy's
    ``weight_norm`` this shell accepts, and ``why`` a reason the error gives when a value of
    :data:`~augplug.methods.WEIGHT_NORMS` is left out."""
    if bn_mode not in ("eval", "train"):
        raise ConfigurationError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}", "use 'eval' or 'train'")
    if weight_norm not in weight_norms:
        reason = f" ({why})" if why and weight_norm in WEIGHT_NORMS else ""
        raise ConfigurationError(f"weight_norm must be one of {weight_norms}{reason}, got {weight_norm!r}",
                                 "set the method's weight_norm to " + ", ".join(repr(w) for w in weight_norms if w != "none")
                                 .replace("'augmented'", "'augmented' (the paper)"))
    if isinstance(orig_weight, bool) or not isinstance(orig_weight, (int, float)):
        raise ConfigurationError(f"orig_weight must be a number, got {orig_weight!r}", "use orig_weight=1.0")
    if not (abs(orig_weight) <= FLOAT32_MAX and abs(aug_weight) <= FLOAT32_MAX):   # NaN fails too
        raise ConfigurationError(f"orig_weight and aug_weight must be finite float32 numbers, got {orig_weight!r} "
                                 f"and {aug_weight!r}", "use orig_weight=1, aug_weight=1")
    if orig_weight < 0 or aug_weight < 0 or orig_weight + aug_weight == 0:
        raise ConfigurationError("orig_weight and aug_weight must be >= 0 and not both 0",
                                 "use orig_weight=1, aug_weight=1")


def refiner_kwargs(flat: Optional[Dict[str, Any]] = None, /, *, refiner: Optional[type] = None,
                   **more: Any) -> Dict[str, Any]:
    """Constructor keywords from one flat set of options (configuration files, command lines):
    :class:`~augplug.schedule.Schedule` fields go to ``schedule``, the refiner's own options stay,
    and everything else goes to ``method_options`` (where an option the method does not take is an
    error). ``refiner_kwargs(refresh_every=1, beta=1.0, seed=3)`` gives
    ``{"schedule": {"refresh_every": 1}, "method_options": {"beta": 1.0}, "seed": 3}``. ``refiner``:
    the class whose own options stay (default :class:`AugmentationRefiner`)."""
    import dataclasses
    import inspect

    flat = {**(flat or {}), **more}
    params = inspect.signature((refiner or AugmentationRefiner).__init__).parameters.values()
    shell = {p.name for p in params if p.kind is not p.VAR_KEYWORD} - {"self"}
    fields = {f.name for f in dataclasses.fields(Schedule)}
    out: Dict[str, Any] = {}
    schedule = dict(flat.pop("schedule", None) or {})
    options = dict(flat.pop("method_options", None) or {})
    for key, value in flat.items():
        if key in fields:
            schedule[key] = value
        elif key in shell:
            out[key] = value
        else:
            options[key] = value
    if schedule:
        out["schedule"] = schedule
    if options:
        out["method_options"] = options
    return out


def augmented_rows(batch: int, num_original: int, augmented, device, unit: str = "rows"):
    """``(mask (B,), rows, n_aug)`` from a call's ``num_original=`` / ``augmented=``: the augmented
    rows as a bool mask, as an index usable on any (B, ...) tensor (a slice when they are the tail
    of the batch, so indexing needs no device sync), and their number. ``unit`` names a row in errors."""
    if augmented is not None and num_original:
        raise ConfigurationError("pass either num_original= or augmented=, not both", "keep one of them")
    if augmented is not None:
        try:
            m = torch.as_tensor(augmented, device=device)
        except (TypeError, ValueError, RuntimeError):
            m = None
        if m is None or m.dtype != torch.bool or m.shape != (batch,):
            got = f"{m.dtype} {tuple(m.shape)}" if m is not None else type(augmented).__name__
            raise ShapeError(f"augmented= must be a bool tensor of shape ({batch},), got {got}",
                             f"pass a boolean mask marking the augmented {unit}")
        if m.is_inference():   # built under torch.inference_mode: indexing the logits with it must be saved
            m = m.clone()
        return m, m, int(m.sum())
    if isinstance(num_original, bool) or (isinstance(num_original, torch.Tensor) and num_original.dtype == torch.bool):
        raise ShapeError(f"num_original must be an integer count, got the boolean {num_original!r}",
                         f"pass the number of original (non-augmented) {unit} at the start of the batch, "
                         "or a mask as augmented=")
    try:
        k = operator.index(num_original)  # an int (numpy and 0-dim integer tensors too), never a float
    except TypeError:
        raise ShapeError(f"num_original must be an integer count, got {num_original!r}",
                         f"pass the number of original (non-augmented) {unit} at the start of the batch") from None
    if not 0 <= k <= batch:
        raise ShapeError(f"num_original={num_original} is outside 0..{batch}",
                         f"pass the number of original (non-augmented) {unit} at the start of the batch")
    mask = torch.zeros(batch, dtype=torch.bool, device=device)
    mask[k:] = True  # a fill, a kernel the call runs anyway (an arange and a comparison would be two more)
    return mask, slice(k, None), batch - k


def reject_moved_options(moved: Dict[str, Any], shell: str) -> None:
    """A clear error for keyword arguments a refiner shell does not take, naming where an option that
    used to be one now lives (a :class:`~augplug.schedule.Schedule` field or a method option)."""
    if not moved:
        return
    import dataclasses

    fields = {f.name for f in dataclasses.fields(Schedule)}
    key = sorted(moved)[0]
    if key in fields:
        fix = f"pass schedule=augplug.Schedule({key}=...) (or schedule={{'{key}': ...}})"
    elif key in ("beta", "tau", "gumbel", "weighting", "weight_tau", "prior", "normalize", "threshold",
                 "weight_signal", "weight_norm", "aug_weight", "strength"):
        fix = f"it is an option of the method: method_options={{'{key}': ...}} or method=SAflex({key}=...)"
    elif key == "val_params":
        fix = "drop it: with val_params='head' a full-model mode gave the last-layer scores; use mode='last_layer'"
    else:
        fix = "see the constructor's arguments (help(augplug.AugmentationRefiner)); augplug.refiner_kwargs() sorts flat options"
    raise ConfigurationError(f"{shell} got an unexpected keyword argument {key!r}", fix)


def build_policy(method, method_options: Optional[Dict[str, Any]] = None, *, allowed: Optional[tuple] = None,
                 unknown: Optional[tuple] = None, presets: Optional[Dict[str, Dict[str, Any]]] = None) -> Policy:
    """The policy a refiner shell runs: ``method`` itself when it is a :class:`Policy`, or the
    registered policy named ``method`` built from ``method_options`` (an option it does not use is an
    error). ``allowed`` limits the names a shell accepts and ``unknown`` is the ``(message, fix)`` of
    the error for any other name; ``presets[name]``: options a shell sets unless given."""
    if isinstance(method, type) and issubclass(method, Policy):
        raise ConfigurationError(f"method is the class {method.__name__}, not a policy",
                                 f"pass an instance, method={method.__name__}(...), or a registered name")
    if isinstance(method, Policy):
        if method_options:
            raise ConfigurationError("method_options were given with a Policy instance",
                                     "pass the options to the policy's constructor, e.g. method=SAflex(beta=1.0)")
        return method
    if not isinstance(method, str) or (allowed is not None and method not in allowed):
        message, fix = unknown or (f"unknown method {method!r}", "use a registered name or a Policy")
        raise ConfigurationError(message, fix)
    if method_options is not None and not isinstance(method_options, dict):
        raise ConfigurationError(f"method_options must be a dict, got {type(method_options).__name__}",
                                 "pass e.g. method_options={'beta': 1.0}")
    return create_policy(method, **{**((presets or {}).get(method) or {}), **(method_options or {})})



def _stepped_ids(optimizer) -> Optional[set]:
    """Ids of the parameters ``optimizer`` (an unwrapped one, or None) steps: held in a group whose
    learning rate is not 0 (a scheduler's warm-up from 0 counts by its ``initial_lr``); None without
    parameter groups."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    return {id(p) for g in groups if _group_lr(g) != 0 for p in g.get("params", [])}


def _group_lr(group) -> Optional[float]:
    """A parameter group's learning rate as a number (None when it has none, or it is not a number):
    its scheduler's base rate where one set it (``initial_lr``: a warm-up may start at 0), else ``lr``."""
    lr = group.get("initial_lr", group.get("lr"))
    try:
        return float(lr)
    except (TypeError, ValueError):
        return None


class AugmentationRefiner(RefinerCore):
    """Refine augmented samples (weights and soft targets) against a clean validation set.

    Args:
        model: the classifier being trained (timm, torchvision, ``nn.Sequential``, an MLP, ...).
        optimizer: its optimizer; its steps are counted (refresh interval, warm-up).
            ``None``: every refiner call counts as one update.
        val_loader: iterable of clean ``(inputs, targets)`` batches (or dicts); cycled forever.
        method: a registered name (``"saflex"``, ``"l2rw"``, ``"none"``, ``"autodo"``,
            ``"influence"``; :func:`~augplug.methods.list_policies`) or a
            :class:`~augplug.methods.Policy` instance such as ``SAflex(beta=1.0)`` or
            ``SAflex.paper()``. The method holds its options and defaults, including how its rows
            are mixed into the loss: ``weight_norm``, ``aug_weight`` (the augmented rows' share;
            SAflex learns it by default) and ``strength`` (SAflex: ``"auto"``, refinement only
            beside originals); see :class:`~augplug.methods.SAflex` and ``docs/api.md``.
        method_options: options of the method named by ``method`` (e.g. ``{"beta": 1.0}``); an option
            the method does not take is an error.
        mode: how class scores are computed: ``"last_layer"`` (closed form on the linear head),
            ``"full"`` (forward-mode AD through the model), ``"double_backward"``, or ``"auto"``
            (full, falling back to double backward).
        classifier: the head module or its dotted name (found automatically otherwise).
        bn_mode: BatchNorm in scoring passes: ``"eval"`` (running statistics) or ``"train"`` (batch
            statistics; running statistics restored). Dropout is off in scoring passes, except the
            rerun of the training forward with ``mode="full", bn_mode="train"``, which replays that
            forward's dropout masks.
        schedule: the validation work, a :class:`~augplug.schedule.Schedule` (or a dict of its
            fields): ``refresh_every`` (4), ``val_batches`` (``"all"``), ``warmup_steps`` (0),
            ``cache_validation`` (False), ``bad_val_batch`` (``"skip"``).
        orig_weight: the weight of original rows in the loss (the augmented rows': the method's
            ``aug_weight``).
        isda: add ISDA (implicit semantic data augmentation) to the loss: ``True``, a dict of
            :class:`~augplug.isda.ISDALoss` options, or an ``ISDALoss``. Needs a linear head.
        accelerator: an ``accelerate.Accelerator``: extra forwards run under ``accelerator.autocast()``
            and the refiner registers itself with ``accelerator.register_for_checkpointing`` (so
            ``save_state``/``load_state`` include it). Multi-process reductions need no accelerator:
            they use the initialised ``torch.distributed`` process group (Accelerate, torchrun, DDP).
        seed: seed of the refiner's private randomness (validation shuffling; per-call noise such as
            Gumbel draws is derived from the seed, the process rank and the call count).
        check_train_mode: raise :class:`~augplug.errors.ModelModeError` when called with the model
            in eval mode.

    How the method's mixing options act (SAflex and L2RW take all three, ``"none"`` the first two):

    - ``aug_weight="adaptive"`` (or an :class:`~augplug.share.AdaptiveShare`) learns the augmented
      rows' share online from the class scores: it falls while the augmented rows agree with the
      validation gradient less than the originals do (batches with originals, ``num_original=`` /
      ``augmented=``). For batches of augmented rows alone it compares them with the rest of the
      loss, when that trains other forwards of the classifier head (the originals' own term,
      ``refiner(model(x_aug), y_aug) + F.cross_entropy(model(x), y)``): gradient hooks on the head's
      output give that term's agreement with the validation direction (``stats["against_rest"]``,
      ``docs/trust.md``). Views alone with nothing else in the loss are unaffected.
    - ``strength`` ``gamma`` in [0, 1]: the augmented rows are trained with ``w = 1 + gamma (w' - 1)``
      and ``y = y~ + gamma (y' - y~)`` (``w'``, ``y'``: the policy's weights and targets; 0 is plain
      upstream augmentation, 1 the full refinement). ``"auto"``: 1 for batches that hold originals,
      0 for batches of augmented rows alone, which are then trained with their upstream weights and
      targets (measured: per-sample weights without originals cost accuracy, ``docs/trust.md``;
      they are scored only where the share weighs them against the rest of the loss). ``"adaptive"`` (or a
      :class:`~augplug.valve.RefinementStrength`): learned online from a cross-fitted first-order
      signal (:mod:`augplug.valve`).
    - ``weight_norm``: ``"augmented"`` (the paper: mean 1 over the augmented rows), ``"class"``
      (mean 1 within each upstream class of the augmented rows), ``"auto"`` (``"class"`` for a batch
      of augmented rows alone, ``"augmented"`` beside originals), ``"batch"`` (weights stay
      absolute; the loss is divided by the batch's total weight, originals included) or ``"none"``.
    """

    _V2_KEYS = RefinerCore._V2_KEYS + ("rest",)   # the separate-term state (None when not tracked)

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        val_loader=None,
        method: Union[str, Policy] = DEFAULTS["method"],
        *,
        method_options: Optional[Dict[str, Any]] = None,
        mode: str = DEFAULTS["mode"],
        classifier: Union[None, str, nn.Module] = None,
        bn_mode: str = DEFAULTS["bn_mode"],
        schedule: Union[None, Schedule, Dict[str, Any]] = None,
        orig_weight: float = DEFAULTS["orig_weight"],
        isda=None,
        accelerator=None,
        seed: int = 0,
        check_train_mode: bool = True,
        **moved: Any,
    ):
        reject_moved_options(moved, type(self).__name__)
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}",
                                     "pass the model being trained (the module whose logits the refiner sees)")
        if optimizer is not None:
            problem = optimizer_problem(model.parameters(), optimizer)
            if problem is not None:
                raise problem
        if mode not in SCORE_MODES:
            raise ConfigurationError(f"unknown mode {mode!r}", f"use one of {SCORE_MODES}")
        schedule = resolve_schedule(schedule)
        self.policy = build_policy(method, method_options)
        policy = self.policy
        aug_weight, self.share = resolve_share(policy.aug_weight, signal="direction")
        self.fixed_strength, self.strength = resolve_strength(policy.strength)
        weight_norm = policy.weight_norm
        check_shell_options(bn_mode, weight_norm, orig_weight, aug_weight)
        scores_rows = policy.needs_scores and type(policy).refine is Policy.refine
        if self.share is not None and not scores_rows:
            raise ConfigurationError(
                f"aug_weight='adaptive' needs a policy that scores the augmented rows with class scores; "
                f"{policy.name!r} does not",
                "use method='saflex' or 'l2rw' (or a Policy that keeps Policy.refine), or a fixed aug_weight")
        if (self.strength is not None or self.fixed_strength is None or self.fixed_strength != 1.0) and not scores_rows:
            raise ConfigurationError(
                f"a refinement strength other than 1 needs a policy that refines rows from their class scores; "
                f"{policy.name!r} does not", "use method='saflex' or 'l2rw', or strength=1.0")
        if weight_norm in ("auto", "class") and not policy.refiner_renormalizes:
            raise ConfigurationError(f"weight_norm={weight_norm!r} rescales the policy's weights by class, but "
                                     f"{policy.name!r} keeps its weights on their own scale",
                                     "use weight_norm='augmented' (or 'batch') with this method")
        self.method = policy.name
        self.model = model
        self.net = unwrap_model(model)
        self.mode = mode
        self.bn_mode = bn_mode
        self.orig_weight = float(orig_weight)
        # the augmented rows' share: a float, or (adaptive) a 0-dim tensor updated on the device
        if self.share is not None:
            self.share.to(self._device())
        self.aug_weight = self.share.value if self.share is not None else float(aug_weight)
        self.weight_norm = weight_norm
        if not isinstance(check_train_mode, bool):
            raise ConfigurationError(f"check_train_mode must be True or False, got {check_train_mode!r}",
                                     "use check_train_mode=True (the default)")
        self.check_train_mode = check_train_mode

        self.head_name, self.head = None, None   # found below, where the refiner reads the classifier
        alternate = self._alternates_scores(schedule, scores_rows, classifier)
        # the default budget found the head on its own: a head that turns out not to give the logits (a
        # projection before a cosine classifier) stops the closed-form calls instead of failing a call
        self._head_optional = (alternate and classifier is None and schedule.model_scores_every == 1 and
                               schedule.budget == "auto" and isda in (None, False) and
                               not getattr(self.policy, "needs_features", False))
        needs_features = (mode == "last_layer" or alternate or isda not in (None, False)
                          or getattr(self.policy, "needs_features", False))
        if accelerator is not None and not callable(getattr(accelerator, "register_for_checkpointing", None)):
            raise ConfigurationError(f"accelerator= must be an accelerate.Accelerator, got {type(accelerator).__name__}",
                                     "pass the Accelerator of the run (accelerator=accelerator), or leave it out")
        if needs_features:
            try:
                self.head_name, self.head = find_classifier(self.net, classifier)
                if mode == "last_layer" and self.policy.needs_scores:   # closed-form scores assume W a + b
                    check_closed_form_head(self.head_name, self.head)
            except UnsupportedHeadError as e:
                if mode == "last_layer" or not getattr(self.policy, "needs_features", False):
                    raise
                raise UnsupportedHeadError(
                    f"method {self.policy.name!r} reads the classifier's input features, so it needs an nn.Linear "
                    f"classifier in every mode: {e.problem}",
                    "pass the final nn.Linear as classifier=, or use method='saflex' or 'l2rw' with "
                    "mode='full'") from e
            if mode == "last_layer" and self.policy.needs_scores:
                self._warn_about_the_head(optimizer)
                tied = tied_names(self.net, self.head_name, self.head)
                if tied:
                    _warn_at_caller(
                        f"the classifier {self.head_name!r} shares its parameters with {', '.join(map(repr, tied))} "
                        f"(tied weights): last-layer scores see only the classifier's use of them, not the other, "
                        f"so they would be wrong. Use mode='full', which scores through every use exactly")
        self.isda = self._build_isda(isda)
        self._check_val_loader(val_loader)
        # the hooks come last, so that a rejected option leaves none behind
        self._init_core(optimizer, val_loader, schedule, seed=seed, needs_validation=self.policy.needs_scores,
                        auto_budget=self.policy.auto_budget,
                        model_scores=alternate)
        self.split_validation = self.strength is not None
        if self.strength is not None:
            self.strength.to(self._device())
        self.accelerator = accelerator
        self.stats: Dict[str, Any] = {}
        self._rest_mode = False     # this call weighs views alone against the rest of the loss
        self._rest_pending = None   # what the last such call leaves for the next (see _rest_signal)
        self._rest_loaded = None    # the rest's signal read from a state, for the next call
        self._last_call_step = None  # the update count at the last committed call (None: not known)
        self._second_calls, self._warned_second_call = 0, False   # see _note_second_call
        #: (update, share) of the last views-alone call weighed against the rest: the share the later
        #: calls (micro-batches) of that update use
        self._held_share = None
        self._warned_pool_alone = False   # warned once: pooled sources on views alone gather nothing
        self._warned_rest_early = False   # warned once: the rest's backward came before the refiner call
        self._warned_reentrant = False    # warned once: views alone through a reentrant checkpoint
        self._closed_form_off = False   # closed-form calls stopped: the logits are not the head's output
        self._context_parts = None
        # full-model scores on the training forward itself (RefineContext decides per call)
        self._replay_forward = mode == "full" and bn_mode == "train" and not is_compiled(model)
        # last-layer scores need a classifier that trains: warned at the first call that finds it frozen
        self._head_trains = mode == "last_layer" and self.policy.needs_scores and self.head is not None and \
            any(p.requires_grad for p in self.head.parameters())
        try:   # the classifier's path in the model, checked at every call (_check_head_in_place)
            self._head_path = self.head is not None and self.net.get_submodule(self.head_name) is self.head
        except AttributeError:
            self._head_path = False
        if other_captures(self.net, self.head):
            _warn_at_caller(
                "this model already carries the hooks of another refiner that was not removed: they go on "
                "recording its training forwards and, after views-alone calls, rescaling the rest of the loss "
                "in updates that call that refiner. Call old_refiner.remove_hooks() before building a new one")
        self._capture = ActivationCapture(self.net, self.head if needs_features else None,
                                          capture_inputs=mode != "last_layer" and self.policy.needs_scores,
                                          keep_graph=getattr(self.policy, "needs_feature_graph", False),
                                          record_replay=self._replay_forward, of_refiner=True)
        try:
            if accelerator is not None:
                accelerator.register_for_checkpointing(self)
        except BaseException:
            self.remove_hooks()
            raise
        if self.share is not None:
            self.share.bind(self)
        self._warn_if_nothing_steps()

    def set_optimizer(self, optimizer) -> None:
        super().set_optimizer(optimizer)
        if optimizer is not None and self.mode == "last_layer" and self.policy.needs_scores:
            self._warn_about_the_head(optimizer)
        self._warn_if_nothing_steps()

    def _warn_if_nothing_steps(self) -> None:
        """Model-scoring modes score the parameters the optimizer steps: warn where it steps none of
        the trainable ones (every group at lr=0), which are then all scored."""
        if self.mode == "last_layer" or not self.policy.needs_scores:
            return
        stepped = _stepped_ids(self._optimizer)
        if stepped is not None and not any(id(p) in stepped for p in self.net.parameters() if p.requires_grad):
            _warn_at_caller(f"the optimizer steps none of the model's trainable parameters (every group has lr=0): "
                            f"mode={self.mode!r} scores what a step on them would do, and none is taken. Give the "
                            "groups that train a learning rate")

    set_optimizer.__doc__ = RefinerCore.set_optimizer.__doc__ + """
        In last-layer mode, warns as the constructor does when the new optimizer does not train the
        classifier (holds none of its parameters, or only with lr=0) or the classifier is frozen."""

    def _warn_about_the_head(self, optimizer) -> None:
        """Last-layer scores measure what a step on the classifier does: warn (at construction and at
        :meth:`set_optimizer`) when the classifier cannot train, frozen or outside the optimizer."""
        head_params = [p for p in self.head.parameters()]
        if head_params and not any(p.requires_grad for p in head_params):
            _warn_at_caller(f"the classifier {self.head_name!r} is frozen (requires_grad=False): last-layer scores "
                            "measure what a step on it would do, and it takes none. Unfreeze it, or use "
                            "mode='full' to score through the parameters that train")
            return
        inner = unwrap_optimizer(optimizer) if optimizer is not None else None
        groups = getattr(inner, "param_groups", None)
        if groups is not None:
            held = {id(p) for g in groups for p in g.get("params", [])}
            moving = _stepped_ids(inner)
            if not any(id(p) in held for p in head_params if p.requires_grad):
                _warn_at_caller(f"the optimizer holds none of the classifier {self.head_name!r}'s parameters: "
                                "last-layer scores measure what a step on it would do, and it takes none. Pass an "
                                "optimizer over the classifier too, or use mode='full'")
            elif not any(id(p) in moving for p in head_params if p.requires_grad):
                _warn_at_caller(f"the optimizer holds the classifier {self.head_name!r} only in groups with lr=0: "
                                "last-layer scores measure what a step on it would do, and it takes none. Give its "
                                "group a learning rate, or use mode='full'")

    def _alternates_scores(self, schedule: Schedule, scores_rows: bool, classifier) -> bool:
        """Whether calls alternate model score passes with closed-form last-layer scores: asked for
        by ``Schedule.model_scores_every > 1``, or chosen by a budget in a mode that runs the model
        to score (where a linear head makes the closed form possible; without one the budget can
        only space out refreshes, and says so once)."""
        runs_model = self.mode != "last_layer" and self.policy.needs_scores
        if schedule.model_scores_every > 1 and not (runs_model and scores_rows):
            raise ConfigurationError(
                f"Schedule(model_scores_every={schedule.model_scores_every}) alternates model score passes with "
                f"closed-form ones, which needs a score mode that runs the model and a policy that scores rows "
                f"(mode={self.mode!r}, method={self.policy.name!r})",
                "drop model_scores_every, or use mode='full' with method='saflex' or 'l2rw'")
        if not runs_model or not scores_rows or (schedule.model_scores_every == 1 and schedule.budget is None):
            return False
        # the default budget alternates only where it can: no warning, no error without a linear head
        quiet = schedule.model_scores_every == 1 and schedule.budget == "auto"
        try:
            head_name, head_module = find_classifier(self.net, classifier)
            check_closed_form_head(head_name, head_module)   # the calls between passes use the closed form
        except UnsupportedHeadError as e:
            if schedule.model_scores_every > 1:   # the generic fix ("use mode='full'") does not apply here
                raise UnsupportedHeadError(
                    f"Schedule(model_scores_every={schedule.model_scores_every}) scores the calls between model "
                    f"passes with the linear head, but {e.problem}",
                    "pass classifier= naming the model's nn.Linear head, or drop model_scores_every") from e
            if quiet:
                return False
            _warn_at_caller(f"budget={schedule.budget}: without a linear classifier head ({e.problem}) every call "
                            f"scores with the model, and the budget only spaces out refreshes; pass classifier= "
                            f"to let it alternate with closed-form last-layer scores")
            return False
        weight = getattr(head_module, "weight", None)   # by identity: a tied weight has another owner's name
        if not any(p is weight for p in self.score_params().values()):
            if quiet:
                return False
            raise ConfigurationError(f"the classifier {head_name!r} is frozen, so the validation direction has no "
                                     f"part for closed-form scores between model score passes",
                                     "unfreeze the head, or use Schedule(model_scores_every=1) without a budget")
        return True

    # ------------------------------------------------------------------ hooks and helpers
    def _watched_parameter(self) -> Optional[torch.Tensor]:
        """The classifier's weight where there is a head (every update trains it), else the first
        trainable parameter."""
        weight = getattr(self.head, "weight", None)
        return weight if isinstance(weight, nn.Parameter) and weight.requires_grad else super()._watched_parameter()

    def remove_hooks(self) -> None:
        """Detach every hook the refiner installed on the model and optimizer; later calls raise a
        :class:`~augplug.errors.ConfigurationError` (build a new refiner, and load this one's
        :meth:`state_dict` into it to go on). A refiner registered with an ``accelerator=`` leaves
        its checkpoints (``accelerator.save_state`` would write this refiner's stale state beside the new
        one's, and a resumed run with one refiner would fail to match the count)."""
        self._capture.remove()
        self._remove_step_hook()
        self._hooks_removed = True
        registered = getattr(self.accelerator, "_custom_objects", None)   # accelerate has no public removal
        if isinstance(registered, list):
            registered[:] = [o for o in registered if o is not self]

    def _check_val_loader(self, val_loader) -> None:
        if dist_world_size() <= 1:
            return
        if type(val_loader).__name__ in ("DataLoaderShard", "DataLoaderDispatcher"):
            raise ConfigurationError(
                "the validation loader was passed through accelerator.prepare(), which shards it per process "
                "and pads the last batch with duplicates",
                "pass the plain DataLoader: the refiner splits the validation batches across processes "
                "itself and sums gradients with true counts")
        batch_sampler = getattr(val_loader, "batch_sampler", None)
        for sampler in (getattr(val_loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
            # torch's DistributedSampler, timm's OrderedDistributedSampler: each process sees a shard
            if "DistributedSampler" in type(sampler).__name__ and getattr(sampler, "num_replicas", 1) > 1:
                raise ConfigurationError(
                    f"the validation loader's sampler ({type(sampler).__name__}) gives each process only its "
                    "shard of the validation set (padded with duplicates to equal length), so the direction "
                    "would be each process's own",
                    "pass a loader over the whole validation set on every process (no distributed sampler, "
                    "e.g. timm's create_loader(..., distributed=False)): the refiner splits the batches across "
                    "processes itself and sums gradients with true counts")

    def _autocast(self):
        return self.accelerator.autocast() if self.accelerator is not None else nullcontext()

    def _device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def score_params(self) -> Dict[str, nn.Parameter]:
        """The parameters a full-model validation direction covers: every trainable one the optimizer
        steps (a step's first-order effect moves only those: a backbone left out of the optimizer or in
        a group with ``lr=0`` is not scored; every trainable one where it steps none, with a warning, or
        without an optimizer), the classifier's under the classifier's names (``named_parameters``
        names a weight tied to another layer after its first owner; the closed-form scores read the
        head's names)."""
        named = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        stepped = _stepped_ids(getattr(self, "_optimizer", None))
        if stepped is not None:
            named = {n: p for n, p in named.items() if id(p) in stepped} or named
        if self.head is not None:
            for attr in ("weight", "bias"):
                p, key = getattr(self.head, attr, None), f"{self.head_name}.{attr}"
                owner = next((n for n, q in named.items() if q is p), None) if isinstance(p, nn.Parameter) else None
                if owner is not None and owner != key:
                    named = {(key if n == owner else n): q for n, q in named.items()}
        return named

    def _to_device(self, x):
        return to_device(x, self._device())

    def _prepare_val_batch(self, x, y, num_classes: int):
        """Inputs on the model's device and (B, C) soft targets, checked where they are (on the
        host for a CPU loader, so the check costs no device sync) and then copied."""
        check_batch_rows(x, y)
        # floating inputs in the model's dtype: a model converted with .double() / .to(torch.bfloat16) is
        # fed converted training inputs, while the validation loader still yields fp32 (a model whose
        # parameters mix dtypes gets its inputs as they are)
        dtypes = {q.dtype for q in self.net.parameters() if q.is_floating_point()}
        return (to_device(x, self._device(), dtypes.pop() if len(dtypes) == 1 else None),
                self._to_device(to_soft_targets(y, num_classes, what="validation targets")))

    def compute_validation_direction(self, num_classes: int) -> GradSum:
        """Sum the validation gradient over one refresh's batches (advances the stream; non-finite
        batches are skipped or rejected as ``bad_val_batch`` says, see :mod:`augplug.core`).
        ``num_classes``: the model's number of outputs. A call that raises changes nothing."""
        classes, _ = self._head_shape()
        if not is_integer(num_classes) or num_classes < 2 or (classes is not None and num_classes != classes):
            raise ShapeError(f"num_classes must be the model's number of outputs (an integer >= 2"
                             f"{'' if classes is None else f', here {classes}'}), got {num_classes!r}",
                             "pass the width of the logits the model returns")
        num_classes = int(num_classes)
        snapshot = self._snapshot()
        try:
            return self._compute_validation_direction(num_classes)
        except BaseException:
            self._restore(snapshot)
            raise

    def _compute_validation_direction(self, num_classes: int) -> GradSum:
        params = None if self.mode == "last_layer" else self.score_params()

        def gradient(x, y):
            if self.mode == "last_layer":
                return validation_gradient(self.net, x, y, head=self.head, head_name=self.head_name, bn=self.bn_mode,
                                           halves=self.split_validation)
            return validation_gradient(self.net, x, y, params=params, bn=self.bn_mode, halves=self.split_validation)

        with self._capture.paused(), self._autocast():
            return self._validation_sum(lambda x, y: self._prepare_val_batch(x, y, num_classes), gradient,
                                        lambda y: y.shape[0])

    def _window_is_exact(self) -> bool:
        return self.mode == "last_layer"

    def _window_entry(self, x, y, gradient):
        """Last-layer mode keeps a validation batch's classifier features (and its targets and half
        mask), so every refresh rebuilds the head gradient of the whole window with the current head."""
        if self.mode != "last_layer":
            return gradient(x, y)
        a, z = head_features(self.net, x, self.head, bn=self.bn_mode)
        rows, width = y.shape[0], self.head.weight.shape[1]
        if a.shape != (rows, width) or z.shape != (rows, self.head.weight.shape[0]):
            raise ShapeError(
                f"on a validation batch of {rows} samples the classifier received {tuple(a.shape)} features and "
                f"the model returned {tuple(z.shape)} logits; the validation window keeps one feature row of "
                f"{width} per sample", "give validation batches the training batches' layout (one sample per "
                "row, logits (B, C)), or use Schedule(fresh_batches=None) / mode='full'")
        mask = half_mask(x, rows, y.device) if self.split_validation else None
        return {"features": a, "targets": y.float(), "half": mask}

    def _window_sum(self, entries) -> GradSum:
        if self.mode != "last_layer" or not entries:
            return super()._window_sum(entries)
        a = torch.cat([e["features"] for e in entries])
        y = torch.cat([e["targets"] for e in entries])
        mask = torch.cat([e["half"] for e in entries]) if self.split_validation else None
        return head_gradient(a, y, self.head, self.head_name, mask)

    def _direction_shapes(self) -> Dict[str, torch.Size]:
        if self.mode == "last_layer":
            shapes = {f"{self.head_name}.weight": self.head.weight.shape}
            if self.head.bias is not None:
                shapes[f"{self.head_name}.bias"] = self.head.bias.shape
            return shapes
        return {n: p.shape for n, p in self.score_params().items()}

    # ------------------------------------------------------------------ the loss
    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, *, num_original: int = 0,
                 augmented: Optional[torch.Tensor] = None, inputs=None, features: Optional[torch.Tensor] = None,
                 index: Optional[torch.Tensor] = None, sources: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return the refined loss (a scalar) for a batch.

        Args:
            logits: (B, C) model outputs for the batch.
            targets: class indices (B,) or probabilities (B, C) (Mixup/CutMix/label smoothing).
            num_original: the first ``num_original`` rows are originals (trained on as given, with
                ``orig_weight``); the rest are augmented samples to refine.
            augmented: alternatively, a bool mask (B,) marking the augmented rows.
            inputs: the model inputs of the batch (full/double-backward modes); captured from the
                model's forward automatically when omitted.
            features: the classifier's input features (last-layer mode, ISDA); captured
                automatically when omitted.
            index: dataset positions of the rows (``IndexedDataset``), for policies with per-point
                state such as AutoDO.
            sources: (B,) integer ids of what produced each row (a RandAugment op, a generator),
                for policies that pool evidence by source (``SAflex(pool=...)``).
        """
        started = self._budget_begin()
        world = dist_world_size()
        try:
            batch, num_classes, features, inputs, problems, (aug, rows, n_aug) = self._checked_call(
                logits, targets, num_original, augmented, inputs, features, index, sources)
        except AugplugError:
            if world > 1:  # the other processes must reject this step too
                self._group_rejects(torch.ones((), dtype=torch.float64, device=logits.device))
            raise
        # The values are checked with one device sync. Between refreshes it comes at the end of the
        # call, just before anything is committed, so that on a GPU the call's work is queued behind
        # the training forward instead of waiting for it. Labels and soft targets are used unchecked
        # until then: out-of-range labels are clamped where they index (no device assert), NaN only
        # makes numbers that are thrown away. The values are checked first when the call refreshes
        # (it reads the user's validation loader, and syncs anyway), when ``index=`` / ``sources=``
        # index the policy's tables, with ISDA (its statistics update within the call), and in a
        # process group (every process agrees on the check at the same point of the call).
        refreshes = self.direction_is_due()
        deferred = (world == 1 and index is None and sources is None and self.isda is None and not refreshes)
        if refreshes:   # a refresh syncs anyway: compare the logits with the head's output again (once more)
            self._capture.recheck_values()
        if not deferred:
            self._reject_bad_values(problems, logits, targets, num_classes, batch)
        y = to_soft_targets(targets, num_classes, batch_size=batch, check_values=False).to(logits.device)
        active = self.step_count >= self.warmup_steps
        used_strength = self.fixed_strength
        auto_strength = self.strength is None and self.fixed_strength is None
        n_orig_all = self._global_count(batch - n_aug) if auto_strength or self.share is not None else None
        views_alone = self.share is not None and n_orig_all == 0
        if views_alone and self._capture.slices_a_forward(logits):
            raise ShapeError(
                "the logits are some of the rows of a larger forward of the model (views sliced out of one "
                "forward of originals and views): the adaptive share weighs views passed alone against the rest "
                "of the loss, and the rest of that forward cannot be told apart from the views",
                "pass the whole forward's logits in one call with num_original= (or augmented=), or give the "
                "views a forward of their own: refiner(model(x_aug), y_aug) + F.cross_entropy(model(x), y)")
        # views alone, but the last step's loss also trained other forwards of the model (originals
        # through the user's own loss term): the share then weighs the views against that term
        self._rest_mode, rest_stats = (self._rest_signal(world) if views_alone and self._capture.track_gradients
                                       else (False, None))
        if views_alone and not self._rest_mode and not self._warned_reentrant and \
                self._capture.recorded_nothing and reentrant_checkpoint(logits):
            self._warned_reentrant = True
            _warn_at_caller("the views' logits come through torch.utils.checkpoint(..., use_reentrant=True), whose "
                            "forward runs under no_grad: the refiner's hooks record no training forward, so the "
                            "share cannot weigh the views against the rest of the loss (an originals' term) and "
                            f"the views are trained as given. Use {NON_REENTRANT}")
        if self._rest_mode and not self._warned_rest_early and self._capture.rest_backward_early():
            self._warned_rest_early = True
            _warn_at_caller("the rest of the loss (the originals' term) was backpropagated before this update's "
                            "refiner call, so it was not rescaled by 2 / (1 + share) while the views were: the "
                            "step is not the documented one. Backpropagate after the refiner call: one "
                            "(refiner(model(x_aug), y_aug) + F.cross_entropy(model(x), y)).backward()")
        if auto_strength:
            # "auto": per-sample refinement only beside originals; views weighed against the rest of
            # the loss keep their upstream weights and targets and are scored for the share alone
            used_strength = 1.0 if n_orig_all > 0 else 0.0
            active = active and (used_strength > 0 or self._rest_mode)
            if sources is not None and used_strength == 0 and self.policy.reads_sources and \
                    not self._warned_pool_alone:
                self._warned_pool_alone = True
                _warn_at_caller("sources= on views alone under strength='auto': the views are trained as given, "
                                "so SAflex(pool=...) gathers no evidence from them. Pass SAflex(pool=..., "
                                "strength=1.0), or put the originals in the batch (num_original=)")
        if self._rest_mode and self.share is not None:
            # views weighed against the rest: the statistics the share steps on are the last call's,
            # gathered at this call's end, so the share is not moved before the loss here (an early
            # gather would step on an update's first micro-batches alone), and every call of one
            # update uses the share its first call used
            prior_share, early = self.aug_weight, None
            held = self._held_share
            self.aug_weight = held[1] if held is not None and held[0] == self.step_count else self.share.value
        else:
            prior_share, early = self._begin_share()   # the share this call uses, from its mixing to its loss
        try:
            ctx = self._context(logits, y, aug, active, inputs=inputs, features=features, index=index, rows=rows,
                                n_augmented=n_aug, sources=sources)
        except BaseException:
            self.aug_weight = prior_share
            raise
        ctx.closed_form = not self.model_scores_due() and not self._closed_form_off
        if ctx.closed_form and self.mode != "last_layer" and not self._capture.logits_are_head_outputs(batch, logits):
            # closed-form scores assume the logits are the head's output: score with the model from here on
            ctx.closed_form, self._closed_form_off = False, True
            _warn_at_caller(
                f"the logits passed are not, row for row, the output of the classifier {self.head_name!r} (changed "
                f"after it, e.g. by a temperature, or another head's): the closed-form scores between model score "
                f"passes would be wrong, so every call now scores with the model (mode={self.mode!r}). Pass "
                f"classifier= naming the head whose output the logits are, or drop the budget / model_scores_every")
        # the adaptive share scores the originals too: in the model-forward modes one pass over the
        # whole batch costs about what a pass over the augmented rows does (rows are independent
        # with BatchNorm in eval mode; with batch statistics each group keeps its own pass)
        ctx.score_all_rows = (self.share is not None and self.mode != "last_layer" and self.bn_mode == "eval"
                              and 0 < n_aug < batch)
        snapshot = (self._snapshot(), self.isda.state_snapshot() if self.isda is not None else None)
        try:
            if self.isda is not None:  # reject bad ISDA inputs before a stateful policy runs
                self.isda._check_inputs(ctx.features(), logits, y, self.head, update=torch.is_grad_enabled())
            weights, soft, scores = self.policy.refine(ctx)
            strength_state = None
            if self.strength is not None:
                used_strength = self.strength.value
                strength_state = self._propose_strength(ctx, y, aug, rows, n_aug)
            if self.strength is not None or used_strength != 1.0:
                weights, soft = apply_strength(weights, soft, y, aug, used_strength)
            per_sample = (self.isda.per_sample_loss(ctx.features(), logits, soft, self.head, defer=True)
                          if self.isda is not None else soft_cross_entropy(logits, soft))
            weights, denom = self._normalize(weights, aug, rows, n_aug, y)
            share_state, used_share = None, self.aug_weight
            if self.share is not None:
                stats, stats_step = self._share_statistics(ctx, weights, soft, scores, aug, rows, n_aug, rest_stats)
                share_state = self._gather_share(early, stats, stats_step)
            if deferred:
                self._budget_mark()
                deferred = False   # checked from here on, whatever the check says
                self._reject_bad_values(problems, logits, targets, num_classes, batch)
        except BaseException:
            self.aug_weight = prior_share
            self.policy.rollback()
            self._restore(snapshot[0])
            if self.isda is not None:
                self.isda.discard_pending()   # its statistics are written only at the commit below
                self.isda.restore_snapshot(snapshot[1])
            if deferred:  # something failed before the check: a bad batch is reported as such
                self._reject_bad_values(problems, logits, targets, num_classes, batch)
            raise

        coef = (used_share * weights if n_aug == batch else
                torch.where(aug, used_share * weights, torch.full_like(weights, self.orig_weight)))
        loss = (coef * per_sample).sum() / denom

        # commit
        self.policy.commit()
        if self.isda is not None:
            self.isda.commit_pending()
        if strength_state is not None:
            self.strength.load_state_dict(strength_state)
        self._commit_share(share_state)
        self._held_share = (self.step_count, used_share) if self._rest_mode and self.share is not None else None
        self._commit_direction(ctx.v_new)
        self._last_call_step = self.step_count
        self._count_call()
        self._capture.clear()
        self._commit_rest(views_alone, ctx, soft, scores, weights, aug, loss, used_share)
        # "active": the warm-up is over and the batch has rows to refine (for every method)
        self.stats = self._summarise(weights, soft, scores, y, aug, ctx.active and n_aug > 0, ctx.refreshed,
                                     used_share, used_strength, ctx.score_pass)
        self._budget_end(started, model_scored=ctx.scored and ctx.score_pass != "closed_form")
        return loss

    def _checked_call(self, logits, targets, num_original, augmented, inputs, features, index, sources):
        """The call's checks that look at no values (a typed error names the first problem), and the
        queued value check: ``(batch, num_classes, features, inputs, problems, augmented rows)``."""
        self._check_can_train()
        self._check_head_in_place()
        if self._head_trains and self.head is not None and not any(p.requires_grad for p in self.head.parameters()):
            self._head_trains = False   # warned once: frozen after construction
            _warn_at_caller(f"the classifier {self.head_name!r} has been frozen (requires_grad=False): last-layer "
                            "scores measure what a step on it would do, and it takes none. Unfreeze it, or build "
                            "a refiner with mode='full' for this stage")
        if self.check_train_mode and not self.model.training:
            raise ModelModeError(
                "the refiner was called with the model in eval mode",
                "call model.train() before training steps (use a plain criterion for evaluation); to train "
                "a model in eval mode on purpose pass check_train_mode=False, and then features= (last-layer "
                "mode) or inputs= (full mode), which the hooks do not record from evaluation forwards")
        check_logits(logits, values=False)
        if torch.is_grad_enabled() and not logits.requires_grad:
            raise ModelModeError(
                "the logits do not require grad (detached, or computed under torch.no_grad()), so the "
                "refined loss could not train the model",
                "pass the training forward's logits as they come out of the model, with grad enabled")
        batch, num_classes = logits.shape
        classes, width = self._head_shape()
        if classes is not None and num_classes != classes and self._head_optional:
            self._closed_form_off = True   # not the logits' head: every call scores with the model
        elif classes is not None and num_classes != classes:
            raise ShapeError(f"the logits have {num_classes} classes, but the classifier {self.head_name!r} the "
                             f"refiner reads has {classes} outputs",
                             "pass all of that classifier's outputs as the logits, or name the layer that "
                             "produces them with classifier=")
        if batch == 0:
            raise ShapeError("the batch has no rows", "skip empty batches (e.g. DataLoader(drop_last=True)) "
                             "before calling the refiner")
        check_target_structure(targets, num_classes, batch_size=batch)
        if features is not None:
            check_row_tensor(features, batch, "features", width=width)
        if sources is not None:
            check_row_tensor(sources, batch, "sources", integer=True)
            if not self.policy.reads_sources and not self._warned_sources:
                self._warned_sources = True
                _warn_at_caller(f"sources= is read only by a method that pools evidence by source "
                                f"(SAflex(pool=S)); {type(self.policy).__name__} here ignores it. Pass "
                                "method=augplug.SAflex(pool=<number of source ids>) to pool it, or drop sources=")
        if index is not None and not self.policy.checks_index:
            check_row_tensor(index, batch, "index", integer=True)
        # the policy's own checks of index= / sources= values, here where a rejection is agreed by a
        # process group (inside the policy one process would raise and the others go on)
        self.policy.check_call(index=index, sources=sources, batch=batch)
        # what scoring and ISDA will read besides the logits: checked in the same device sync
        if features is None:
            self._check_feature_rows()
            features = self._capture.features(batch, logits)
        elif self._capture.track_gradients:  # the forward is this call's, not the rest of the loss
            self._capture.claim(batch, logits)
        if inputs is None:
            inputs = self._capture.inputs(batch, logits)
        rows = augmented_rows(batch, num_original, augmented, logits.device)
        return batch, num_classes, features, inputs, value_problems(logits, targets, (features, inputs)), rows

    def _reject_bad_values(self, problems: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                           num_classes: int, batch: int) -> None:
        """Read the batch's value check (:func:`~augplug.targets.value_problems`; the call's one
        device sync) and raise the error naming the problem when it failed.

        In a process group the check is agreed by every process (one all-reduce of one flag per
        process): when any batch is bad every process raises, so a loop that skips rejected steps
        skips the same step everywhere and the processes' collectives stay paired. The process
        whose batch is bad names its problem; the others raise :class:`PeerBatchError`."""
        if dist_world_size() > 1:
            bad = self._group_rejects(problems)
            if dist_rank() not in bad:
                self._raise_for_peers(bad)
                return
        elif not bool(problems):
            return
        check_logits(logits)
        to_soft_targets(targets, num_classes, batch_size=batch)
        raise NonFiniteError("the classifier features or model inputs of this batch hold NaN/inf, or fp64 "
                             "values beyond fp32's range, in which scores are computed (the logits are finite)",
                             "check the batch's inputs and the features= / inputs= passed; skip the batch")

    def _check_feature_rows(self) -> None:
        """Last-layer scores need one feature row per logit row: a linear classifier applied to each
        of several positions of a row (tokens, pixels) whose outputs are pooled after it has none."""
        shape = self._capture.last_feature_shape()
        if self.mode == "last_layer" and shape is not None and len(shape) > 2 and isinstance(self.head, nn.Linear):
            raise UnsupportedHeadError(
                f"the classifier {self.head_name!r} receives inputs of shape {tuple(shape)}: it runs on each of "
                f"{shape[1:-1].numel()} positions per row and its outputs are pooled after it, so there is no "
                "one feature row per logit row for last-layer scores",
                "pool before the classifier (as timm's heads do), or pass mode='full' (scores from the whole "
                "model's gradients)")

    def _check_head_in_place(self) -> None:
        """A :class:`ConfigurationError` when the classifier the refiner hooked is no longer the model's
        layer of that name (``model.fc = nn.Linear(...)``, timm's ``reset_classifier``): its hooks would
        record nothing, and its weights are not the ones trained."""
        if self.head is None or not self._head_path:
            return
        try:
            current = self.net.get_submodule(self.head_name)
        except AttributeError:
            current = None
        if current is not self.head:
            raise ConfigurationError(
                f"the classifier {self.head_name!r} this refiner was built on has been replaced in the model "
                "(a new layer assigned, or reset_classifier())",
                "build a new refiner on the model as it is now (pass the new optimizer); load this one's "
                "state_dict() into it only if the classifier kept its shape")

    def _head_shape(self) -> Tuple[Optional[int], Optional[int]]:
        """The classifier head's numbers of outputs and inputs (None, None when there is no 2-D
        weight to read them from)."""
        weight = getattr(self.head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0]), int(weight.shape[1])
        return None, None

    def _scoring(self) -> Scoring:
        """What the policy scores: the model, mode, classifier and scored parameters."""
        if self._context_parts is not None:
            return self._context_parts[0]
        return Scoring(net=self.net, mode=self.mode, bn_mode=self.bn_mode, head=self.head,
                       head_name=self.head_name, capture=self._capture, params=self.score_params,
                       replay_forward=self._replay_forward)

    def _context(self, logits, y, aug, active, **kw) -> RefineContext:
        """The per-call context a policy works from: what it needs, passed in."""
        if self._context_parts is None:  # fixed for the refiner's life: built on the first call
            scoring = self._scoring()
            validation = ValidationSource(is_due=self.direction_is_due, compute=self._compute_validation_direction,
                                          current=lambda: self.validation_direction,
                                          halves=lambda: self.half_directions, loss=lambda: self.val_loss)
            self._context_parts = (scoring, validation)
        scoring, validation = self._context_parts
        mixing = Mixing(orig_weight=self.orig_weight, aug_weight=self.aug_weight, weight_norm=self.weight_norm)
        return RefineContext(logits, y, aug, active, scoring=scoring, validation=validation, mixing=mixing,
                             step=self.step_count, noise=self.noise_generator, **kw)

    def _propose_strength(self, ctx: RefineContext, y, aug, rows, n_aug: int):
        """The refinement strength's next state from this batch's cross-fitted signal (None: not
        active, no rows to refine, or no half directions yet). In a process group every process
        takes part, whatever its rows."""
        distributed = dist_world_size() > 1
        if not (ctx.active and ctx.scored) or (n_aug == 0 and not distributed):
            return None
        halves = ctx.half_directions()
        if halves is None:
            return None
        ya = y[rows]
        picks = []
        for k, v_half in enumerate(halves):
            g = ctx.scores(rows, v_half)
            w, s = self.policy(g, ya, self.noise_generator(stream=1000 + k), **self.policy.call_inputs(ctx))
            full = torch.ones(aug.shape[0], dtype=torch.float32, device=y.device)
            full[rows] = w.to(full)
            w, _ = self._normalize(full, aug, rows, n_aug, y)
            picks.append((w[rows], s.to(ya), g))
        (w_a, s_a, g_a), (w_b, s_b, g_b) = picks
        return self.strength.propose(cross_fit_statistics(ya, w_a, s_a, g_b, w_b, s_b, g_a, distributed=distributed))

    def _share_statistics(self, ctx: RefineContext, weights, soft, scores, aug, rows, n_aug: int, rest_stats=None):
        """``(statistics, update)``: what this call gives the adaptive share (:meth:`AdaptiveShare.gather`;
        None when not active or nothing to compare) and the update count of the rows they are about.

        Agreements ``y^T g`` on the augmented rows (whose scores the policy returned): with their
        upstream targets and weight 1 (``signal="upstream"``; per unit of each row's residual
        ``|y - p|`` for ``"direction"``), or with the policy's soft targets and weights
        (``"refined"``); on the originals (scored here) with their targets. In a process group
        every process takes part, whatever its rows. Views weighed against the rest of the loss
        are judged one call late (``rest_stats``, :meth:`_rest_signal`): their statistics are the
        previous call's."""
        if not (ctx.active and ctx.scored):
            return None, self.step_count
        distributed = dist_world_size() > 1
        if self._rest_mode:   # rest_stats: from _rest_signal (None while the last call left nothing to judge)
            last = self._last_call_step if self._last_call_step is not None else self.step_count - 1
            return rest_stats, last
        n_orig = aug.shape[0] - n_aug
        if not distributed and (n_orig == 0 or n_aug == 0):
            return None, self.step_count
        orig = slice(0, rows.start) if isinstance(rows, slice) else ~aug
        probs = self._share_probs(ctx)
        a_orig = self.share.agreement(ctx.targets[orig], ctx.scores(orig), None if probs is None else probs[orig])
        return self.share.batch_statistics(ctx.targets, scores, soft, weights, rows, a_orig,
                                           distributed=distributed, probs=probs), self.step_count

    def _share_probs(self, ctx: RefineContext) -> Optional[torch.Tensor]:
        """The batch's probabilities when the share's signal needs them (``signal="direction"``)."""
        return ctx.logits.detach().float().softmax(-1) if self.share.needs_probs else None

    def _rest_signal(self, world: int):
        """For a batch of views alone: ``(whether the last step's loss trained another forward of the
        head, the share's statistics or None)``.

        The capture's gradient hooks give, for each head forward no refiner call used, the gradient
        ``G`` (n, C) its output received and its features ``h``; the rest of the loss then moved the
        head along the validation direction ``v`` of the last call by ``<grad L_rest, v> = sum_i
        G_i^T (V_W h_i + v_b)``. The gradient the refiner's own loss received, ``s`` (a hook on the
        returned loss: 1 for ``loss.backward()``, the scale of a GradScaler or of the user's factor),
        puts it on the scale of the refiner's loss, and ``a_rest = -<grad L_rest, v> / s`` is the
        rest's agreement, the quantity the share compares the views with (for a mean cross-entropy
        on originals it equals their mean ``y_i^T g_i``, as if they had been in the batch). The
        statistics ``[sum over the last call's views of y~^T g, their number, a_rest, 1]`` are
        summed over a process group (data-parallel training averages the rest's gradient)."""
        local, ready, seen = self._rest_local()
        if world > 1:   # whether any process saw a rest: one read-back, in a process group only
            all_reduce_sum_([local])
            ready, seen = bool(local[3] > 0), bool(local[4] > 0)
        return seen, (local[:4] if ready else None)

    def _rest_local(self):
        """This process's ``[sum of y~^T g over the last call's views, their number, a_rest, ready,
        seen]`` (float64; :meth:`_rest_signal`), with ``ready`` and ``seen`` also as Python bools
        (known on the host: no device sync), from the capture's gradients or, after
        :meth:`load_state_dict` and until a call commits, from the state."""
        dev = self._device()
        if self._rest_loaded is not None:   # cleared when a call commits (_commit_rest); on the CPU
            loaded = self._rest_loaded
            return loaded.to(dev), bool(loaded[3] > 0), bool(loaded[4] > 0)
        graded = self._capture.other_gradients()
        pending = self._rest_pending
        if graded and pending is not None and pending[3].grad is not None:
            aug_stats, v_w, v_b, scale = pending
            a_rest, count = self._rest_agreement(graded, v_w, v_b, scale)
            local = torch.cat([aug_stats.to(dev), torch.stack([a_rest.to(dev), count.to(dev)]),
                               torch.ones(1, dtype=torch.float64, device=dev)])
            return local, True, True
        local = torch.zeros(5, dtype=torch.float64, device=dev)
        if graded:
            local[4] = 1.0
        return local, False, bool(graded)

    def _rest_agreement(self, graded, v_w, v_b, scale) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(a, n)`` (0-dim fp64 each) from the rest's head forwards ``graded`` (features, output
        gradient), whose ratio ``a / n`` is the rest's agreement: ``(-<grad L_rest, v> / s, 1)``; for
        the share's direction signal the sum over the rest's rows of ``-G_i^T u_i / |G_i|`` and their
        number (``u_i = V_W h_i + v_b``; ``-G_i / |G_i|`` is the row's residual direction, whatever the
        loss's scale, so ``s`` drops out). Sums, so that a process group pools its rows: the mean over
        every process's rows, not a mean of the processes' means."""
        def pushes(h, G):
            return G.float() * (h.float() @ v_w.t() + (0.0 if v_b is None else v_b))
        if not self.share.needs_probs:
            pushed = sum(pushes(h, G).sum() for h, G in graded)
            a = -pushed.double() / scale.grad.double().to(pushed.device)
            return a, torch.ones((), dtype=torch.float64, device=a.device)
        total, rows = 0.0, 0
        for h, G in graded:
            norm = G.float().norm(dim=-1)
            total = total + (pushes(h, G).sum(-1) / norm.clamp_min(RESIDUAL_FLOOR)).sum()
            rows = rows + (norm > 0).sum()
        total = -torch.as_tensor(total).double()
        return total, torch.as_tensor(rows, device=total.device).double()

    def _commit_rest(self, views_alone: bool, ctx, soft, scores, weights, aug, loss, used_share) -> None:
        """After a committed call: forget the forwards whose backward has come; for views alone, hook
        the head's output gradients from now on and, when this call weighed the views against the
        rest of the loss, keep what the next call needs to judge them (:meth:`_rest_signal`)."""
        self._capture.drop_graded()
        pending = self._rest_pending
        if views_alone and pending is not None and pending[3].grad is None:
            self._note_second_call()
        self._rest_pending = self._rest_loaded = None
        self._capture.arm_rest(None)
        if not views_alone or not self._capture.records_features:
            return
        if self._rest_mode:
            share = torch.as_tensor(used_share, dtype=torch.float32, device=self._device())
            self._capture.arm_rest(2 / (1 + share), self._steps)
        self._capture.track_gradients = True
        if self._rest_mode and ctx.scored and loss.requires_grad:
            v = ctx.direction()
            stats = self.share.batch_statistics(ctx.targets, scores, soft, weights, aug, scores.new_zeros(0),
                                                probs=self._share_probs(ctx))[:2]
            scale = GradientSlot()
            loss.register_hook(scale.receive)
            bias = v.get(f"{self.head_name}.bias")
            self._rest_pending = (stats, v[f"{self.head_name}.weight"].detach().float(),
                                  None if bias is None else bias.detach().float(), scale)

    def _by_class(self, n_orig) -> bool:
        """Whether the augmented rows' weights are normalized by class, given the originals in the
        (global) batch: always for ``weight_norm="class"``, without originals for ``"auto"``."""
        return self.weight_norm == "class" or (self.weight_norm == "auto" and n_orig == 0)

    def _normalize(self, weights: torch.Tensor, aug: torch.Tensor, rows, n_aug: int, targets: torch.Tensor):
        """Renormalized weights and the loss denominator, over the global batch of all processes.

        ``targets``: the upstream soft targets (B, C), for the class normalization. Each process
        returns ``sum_local / (denominator_global / world)``; data-parallel gradient averaging then
        yields exactly the loss of one process holding the whole global batch.
        """
        renorm = self.weight_norm in ("auto", "class", "augmented") and self.policy.refiner_renormalizes
        world = dist_world_size()
        if world == 1:  # one process: plain fp32 arithmetic on the batch, no device sync
            if renorm and n_aug:
                by_class = self._by_class(aug.shape[0] - n_aug)
                if n_aug == aug.shape[0]:  # every row augmented: no copy, no scatter
                    weights = class_renormalize(weights, targets) if by_class else renormalize(weights)
                else:
                    weights = weights.clone()
                    weights[rows] = (class_renormalize(weights[rows], targets[rows]) if by_class
                                     else renormalize(weights[rows]))
            if self._rest_mode:
                mass = weights.sum().clamp_min(1e-12) if self.weight_norm == "batch" else float(n_aug)
                return weights, self._rest_denominator(mass, 1)
            if self.weight_norm == "batch":
                coef = torch.where(aug, self.aug_weight * weights, torch.full_like(weights, self.orig_weight))
                return weights, coef.sum().clamp_min(1e-12)
            return weights, self._loss_denominator(n_aug, aug.shape[0] - n_aug, 1)
        w_aug = weights[aug].sum() if n_aug else weights.new_zeros(())
        (w_sum,), n_all, n_orig_all = self._global_weight_sums([w_aug], n_aug, aug.shape[0], weights.device)
        if renorm and self._by_class(n_orig_all):
            # every process reads the same global count, so all of them take part in the class sums
            weights = weights.clone()
            weights[aug] = class_renormalize(weights[aug], targets[aug], distributed=True)
        elif renorm and n_aug:
            weights = weights.clone()
            weights[aug] = weights[aug] * (n_all / w_sum) if w_sum > 0 else 0.0
            w_sum = n_all if w_sum > 0 else 0.0
        mass = w_sum if self.weight_norm == "batch" else n_all
        if self._rest_mode:
            return weights, self._rest_denominator(max(mass, 1e-12), world)
        return weights, self._loss_denominator(mass, n_orig_all, world)

    def _note_second_call(self) -> None:
        """A call of views alone came before the backward pass of the last one, which was weighed
        against the rest of the loss (two augmentation pipelines through two calls, one backward):
        only the first call of each step is weighed against the rest, and the rest's rescaling is
        the last call's. After :data:`SECOND_CALLS_WARNED` such calls, one warning names the fix (a
        call whose backward never came, such as a skipped batch, is one)."""
        self._second_calls += 1
        if self._second_calls >= SECOND_CALLS_WARNED and not self._warned_second_call:
            self._warned_second_call = True
            _warn_at_caller(
                "the refiner was called more than once with augmented rows alone before one backward pass: "
                "only the first call of each step is weighed against the rest of the loss. Pass all the views "
                "in one call (refiner(model(torch.cat([x_aug1, x_aug2])), torch.cat([y1, y2]))), or put the "
                "originals in each call's batch (num_original=)")

    def _rest_denominator(self, aug_mass, world: int):
        """The loss denominator of views weighed against the rest of the loss: the views' loss carries
        ``2 lam / (1 + lam)`` of their weighted mean (the rest's gradient is scaled by ``2 / (1 + lam)``
        in its backward pass, :meth:`_commit_rest`), one process's share of it in a process group."""
        return aug_mass / world * (1 + self.aug_weight) / 2

    def augment(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply the policy's learned differentiable augmentation (AutoDO) to a batch."""
        fn = getattr(self.policy, "augment", None)
        if fn is None:
            raise ConfigurationError(f"method {self.method!r} has no learned augmentation",
                                     "use method='autodo' for refiner.augment(x, index)")
        return fn(x, index, self.noise_generator)

    def _build_isda(self, isda):
        if isda is None or isda is False:
            return None
        from .isda import ISDALoss
        if isinstance(isda, ISDALoss):
            return isda
        if isda is not True and not isinstance(isda, dict):
            raise ConfigurationError(f"isda must be None, True, an ISDALoss or a dict of its options, got {isda!r}",
                                     "use isda=True, or isda={'lambda0': 0.5}")
        opts = {} if isda is True else dict(isda)
        try:
            return ISDALoss.for_head(self.head, **opts)
        except TypeError as e:   # an option ISDALoss does not take
            raise ConfigurationError(f"isda={isda!r}: {e}", "pass options of augplug.isda.ISDALoss.for_head "
                                     "(e.g. lambda0=, covariance=)") from e

    def _summarise(self, weights, soft, scores, y, aug, active, refreshed, aug_weight, strength,
                   score_pass=None) -> StepStats:
        weights, soft, scores, aug = weights.detach(), soft.detach(), scores.detach(), aug.detach()
        val_loss = self._val_loss

        def summaries() -> Dict[str, float]:
            wa, sa, ya, ga = weights[aug], soft[aug], y[aug], scores[aug]
            n = max(int(aug.sum()), 1)
            agree = (ya * ga).sum(-1)
            return {
                "weight_mean": float(wa.mean()) if wa.numel() else float("nan"),
                "weight_std": float(wa.std(unbiased=False)) if wa.numel() else float("nan"),
                "kept_fraction": float((wa > 0).float().sum() / n),
                "relabel_rate": float((sa.argmax(-1) != ya.argmax(-1)).float().sum() / n),
                "agreement_mean": float(agree.mean()) if agree.numel() else float("nan"),
                **weight_spread(wa, ya),
                "val_loss": float(val_loss),
                "aug_weight": float(aug_weight),
                "strength": float(strength),
            }

        return StepStats({"weights": weights, "soft_targets": soft, "scores": scores, "augmented": aug,
                          "active": bool(active), "refreshed": bool(refreshed), "step": self.step_count,
                          "score_pass": score_pass, "skipped_val_batches": self.skipped_val_batches,
                          "against_rest": self._rest_mode, **self._schedule_stats()},
                         summaries, summary_keys=StepStats.SUMMARY_KEYS + SPREAD_KEYS + ("aug_weight", "strength"))

    # ------------------------------------------------------------------ checks and state
    def validate(self, logits: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                 strict: bool = False):
        """List every problem with this refiner's model, optimizer, validation loader (and a batch)."""
        return validate(self.model, self._optimizer, self.val_loader if self.policy.needs_scores else None,
                        mode=self.mode, classifier=self.head, logits=logits, targets=targets, strict=strict)

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume bit-for-bit (with the model's and optimizer's own state), as
        copies: training on does not change a state taken earlier."""
        return {
            **self._core_state(),
            "policy": self.policy.state_dict() if self.policy.has_state else None,
            # a module's state_dict() shares its buffers' storage: copied, like every other part
            "isda": copy.deepcopy(self.isda.state_dict()) if self.isda is not None else None,
            "share": self.share.state_dict() if self.share is not None else None,
            "strength": self.strength.state_dict() if self.strength is not None else None,
            "rest": self._rest_state(),
            "model": self._model_layout(),
        }

    def _model_layout(self) -> List[List[Any]]:
        """The model's parameters as ``[name, shape]`` pairs (plain lists: ``weights_only`` loads them):
        a state of another model with a classifier of the same shape would otherwise load, its window
        of another backbone's features and its policy's tables kept until later refreshes."""
        return [[n, list(p.shape)] for n, p in self.net.named_parameters()]

    def _rest_state(self) -> Optional[Dict[str, Any]]:
        """The separate-term state (views alone beside the rest of the loss): whether the head's
        output gradients are tracked and, computed now from the last backward pass, the signal the
        next call reads (:meth:`_rest_local`); None when the capture does not track them."""
        if not self._capture.track_gradients:
            return None
        held = self._held_share
        return {"tracking": True, "signal": self._rest_local()[0].detach().cpu(), "step": self._last_call_step,
                "share_used": None if held is None or held[0] != self._last_call_step else float(held[1])}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The whole state is checked first (:meth:`check_state_dict`):
        a rejected state changes nothing."""
        self.check_state_dict(state)
        policy, isda, share, strength = state.get("policy"), state.get("isda"), state.get("share"), state.get("strength")
        rest = state.get("rest")
        self._load_core_state(state)
        if policy is not None:
            self.policy.load_state_dict(policy)
        if isda is not None:
            self.isda.load_state_dict(isda)
        if share is not None:
            self._load_share(share)
        if strength is not None:
            self.strength.load_state_dict(strength)
        # the update count at the last call before the save: the rest's signal read next is that call's
        self._last_call_step = None if rest is None else rest.get("step")
        used = None if rest is None else rest.get("share_used")
        self._held_share = None if used is None else (self._last_call_step, float(used))
        self._rest_pending = None
        self._capture.drop_graded()
        self._capture.track_gradients = rest is not None
        self._rest_loaded = None if rest is None else rest["signal"].to(torch.float64).clone()

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise the error :meth:`load_state_dict` would raise for ``state`` (keys, version, refiner kind,
        method, shapes, dtypes, the policy's, ISDA's, the share's and the stream's parts, finiteness),
        and change nothing. A run resumed by ``accelerator.load_state`` can check the refiner's part
        first: accelerate loads the model and optimizer before the refiner, so a refiner that refuses
        its state there leaves them loaded."""
        self._check_core_state(state)
        check_part_presence(state, "policy", self.policy.has_state, "the method's state")
        check_part_presence(state, "isda", self.isda is not None, "ISDA statistics (isda=)")
        check_part_presence(state, "share", self.share is not None, "an adaptive share (aug_weight='adaptive')")
        if state.get("version") != 1:  # states before the refinement strength hold no such entry
            check_part_presence(state, "strength", self.strength is not None,
                                "an adaptive refinement strength (strength='adaptive')")
        policy, isda, share, strength = state.get("policy"), state.get("isda"), state.get("share"), state.get("strength")
        if strength is not None:
            self.strength.check_state(strength)
        if policy is not None:
            set_scoring = getattr(self.policy, "set_scoring", None)
            if set_scoring is not None:   # a policy that checks a state against what it scores (influence)
                set_scoring(self._scoring(), self._head_shape()[0])
            self.policy.check_state(policy)
        if isda is not None:
            self.isda.check_state_dict(isda)
        if share is not None:
            self.share.check_state(share)
        rest = state.get("rest")
        if rest is not None:
            signal = rest.get("signal") if isinstance(rest, dict) else None
            step = rest.get("step") if isinstance(rest, dict) else None
            used = rest.get("share_used") if isinstance(rest, dict) else None
            if not isinstance(rest, dict) or set(rest) - {"step", "share_used"} != {"tracking", "signal"} \
                    or rest["tracking"] is not True or not (used is None or (is_real(used) and 0 <= used < float("inf"))) \
                    or not torch.is_tensor(signal) or signal.shape != (5,) \
                    or not (step is None or (isinstance(step, int) and not isinstance(step, bool)
                                             and 0 <= step <= state["step_count"])):
                raise ConfigurationError("the refiner state's 'rest' is not a separate-term state", _CHECKPOINT_FIX)
            if self.share is None:
                check_part_presence(state, "rest", False, "a separate-term signal for an adaptive share")
            if nonfinite([signal]):
                raise NonFiniteError("the saved separate-term signal holds NaN/inf", "load an intact checkpoint")
        # last: the checks above name what differs in their own parts (classes, widths, options)
        layout = state.get("model")   # states before it was recorded do not say
        if layout is not None:
            own = self._model_layout()
            try:
                if not isinstance(layout, (list, tuple)):
                    raise TypeError(type(layout).__name__)
                saved = [[str(n), [int(d) for d in shape]] for n, shape in layout]
            except (TypeError, ValueError):   # not pairs of a name and a list of integer sizes
                raise ConfigurationError("the refiner state's 'model' is not a parameter layout", _CHECKPOINT_FIX) \
                    from None
            if saved != own:
                diff = next((f"{a[0]} {tuple(a[1])} saved, {b[0]} {tuple(b[1])} here" for a, b in zip(saved, own)
                             if a != b), f"{len(saved)} parameters saved, {len(own)} here")
                raise ConfigurationError(f"the refiner state was saved for another model ({diff})",
                                         "load it into a refiner built on the model the state was saved with "
                                         "(the same architecture), or start this refiner afresh")

    def __repr__(self) -> str:
        isda = self.isda
        isda = "None" if isda is None else (
            f"ISDALoss(covariance={isda.covariance!r}, lambda0={isda.lambda0}, decay={isda.decay}, "
            f"stats_targets={isda.stats_targets!r})")
        return (f"AugmentationRefiner(method={self.policy!r}, mode={self.mode!r}, bn_mode={self.bn_mode!r}, "
                f"schedule={self.schedule!r}, orig_weight={self.orig_weight!r}, isda={isda}, seed={self.seed!r})")
