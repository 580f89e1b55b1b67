"""The bookkeeping every refiner shell shares: update counting, the validation stream and the cached
validation direction with its refresh schedule, bad validation batches, and the resumable state.

:class:`RefinerCore` is a base class of :class:`~augplug.AugmentationRefiner` and
:class:`~augplug.contrastive.ContrastiveRefiner`. The shells say how one validation batch is prepared
and differentiated and which parameters the direction covers; the core decides how many batches a
refresh reads, skips or rejects non-finite ones, checks the result before it is kept, and saves and
restores its state atomically (a rejected state changes nothing).

Bad validation batches: a batch whose inputs or targets hold NaN/inf, or that holds no samples (0
rows: a collate function that filtered a whole batch out), is skipped when ``bad_val_batch="skip"``
(the default; counted in ``stats["skipped_val_batches"]``, with a warning that names which) or
rejected with :class:`~augplug.errors.NonFiniteError` / :class:`~augplug.errors.EmptyValidationError`
(``"raise"``), in every schedule (exact, window, cached). A skipped batch is replaced by the next one:
with an integer ``val_batches`` a refresh still averages that many good batches; with ``"all"`` it
averages the good batches of one pass, a pass ending where the loader's iterator ends (not after
``len(loader)`` batches where that over-reports). A validation gradient that is not finite although its
batch is (the model itself overflows) is always an error. Either way, nothing non-finite is ever kept.

A failed call rolls the stream back without reading the loader (the pass is re-opened at the next
read), so the rollback cannot fail half-way and the caller sees the error that failed the call. A
validation window whose entries cover other parameters than the shell now scores (a backbone unfrozen
or frozen mid-run in full mode) is dropped and read again whole at the next refresh.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .distributed import all_reduce_sum_
from .distributed import rank as dist_rank
from .distributed import world_size as dist_world_size
from .errors import (AugplugError, ConfigurationError, EmptyValidationError, ModelModeError, NonFiniteError,
                     PeerBatchError, ShapeError)
from .errors import warn_at_caller as _warn_at_caller
from .budget import OverheadBudget
from .finite import nonfinite, tensor_leaves
from .options import is_integer, option_fields
from .rng import PrivateRNG, is_generator_state
from .schedule import BAD_VAL_BATCH, MAX_INTERVAL_FACTOR, Schedule, budget_fraction
from .scores import GradSum
from .steps import StepCounter
from .validation import (CachedValidationStream, ValidationStream, empty_batch, generator_states, len_is_exact,
                         open_as, opens_by_reset, set_generator_states)

__all__ = ["RefinerCore", "STATE_VERSION", "BAD_VAL_BATCH", "check_part_presence", "nonfinite", "num_val_batches", "unwrap_optimizer"]

#: Version of the refiners' ``state_dict`` layout (version 1 states load too: they lack only the
#: count of skipped validation batches, which restarts at 0).
STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)


_CORE_KEYS = ("version", "method", "step_count", "calls", "v", "v_step", "val_loss", "rng_state", "stream")
_CHECKPOINT_FIX = "load a state saved by state_dict() of a refiner built with the same model and options"


#: After this many calls in a row whose model was updated in place without a step of the optimizer
#: the refiner counts (a run that built a new optimizer), such updates count as steps, with a warning.
UNCOUNTED_UPDATES = 3


def check_part_presence(state: Dict[str, Any], key: str, expected: bool, what: str) -> None:
    """Raise unless ``state[key]`` is there exactly when this refiner keeps ``what`` (a state saved
    with other options, or a truncated one, must not load half-way)."""
    saved = state.get(key) is not None
    if saved != expected:
        if expected:
            problem = f"the refiner state has no {key!r} entry, but this refiner keeps {what}"
        else:
            problem = f"the refiner state holds {what} ({key!r}), which this refiner does not keep"
        raise ConfigurationError(problem, "build the refiner with the options the state was saved with "
                                          "(method, isda, aug_weight) before loading")


def _visit_batch(visit: Callable, j: int, x, y) -> None:
    """``visit(j, x, y)`` on a validation batch, a model that fails on it (a clash in its forward)
    reported as the :class:`ShapeError` that names the fix."""
    try:
        visit(j, x, y)
    except (AugplugError, NotImplementedError):
        raise
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ShapeError(f"the model failed on a validation batch: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}",
                         "make the validation loader yield inputs like the training inputs (tensors of the "
                         "same shape, channels, dtype and device placement; with bn_mode='train', batches "
                         "of at least 2 rows: DataLoader(..., drop_last=True))") from e


def num_val_batches(val_batches, pass_length: Callable[[], int]) -> int:
    """Validation batches per refresh: ``val_batches``, or for ``"all"`` the batches of one pass
    (``pass_length()``, e.g. ``len`` of the loader)."""
    if val_batches == "all":
        try:
            return max(pass_length(), 1)
        except TypeError:
            raise ConfigurationError("val_batches='all' needs a validation loader with len()",
                                     "pass an integer val_batches") from None
    return int(val_batches)


def unwrap_optimizer(optimizer):
    """The innermost optimizer that supports step hooks, through wrappers that hold it as
    ``.optimizer`` / ``.original_optimizer`` / ``.base_optimizer`` / ``._optimizer`` (Accelerate,
    Opacus, Lookahead, SAM). The innermost one steps once per real update: SAM's ``second_step``
    calls only it, and a wrapper that skips an update (a GradScaler's inf step, Opacus's virtual
    steps) does not call it."""
    seen = set()
    opt, found = optimizer, None
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "_optimizer_step_pre_hooks"):
            found = opt
        opt = next((getattr(opt, a) for a in ("optimizer", "original_optimizer", "base_optimizer", "_optimizer")
                    if getattr(opt, a, None) is not None), None)
    if found is not None:
        return found
    raise ConfigurationError(
        f"cannot register a step hook on {type(optimizer).__name__} or any optimizer it wraps",
        "pass the underlying torch.optim.Optimizer, or optimizer=None (then every refiner call counts as a step)")


def optimizer_problem(parameters, optimizer) -> Optional[ConfigurationError]:
    """The error for an optimizer that holds none of ``parameters`` (the trainable ones of the
    model(s) being refined), or None. An optimizer that cannot be unwrapped is the other error."""
    inner = unwrap_optimizer(optimizer)
    trainable = {id(p) for p in parameters if p.requires_grad}
    if trainable and not any(id(p) in trainable for g in inner.param_groups for p in g["params"]):
        return ConfigurationError("the optimizer holds none of the model's trainable parameters",
                                  "pass the optimizer that updates this model")
    return None


class RefinerCore:
    """Shared state and schedule of a refiner shell (see the module docstring).

    A shell calls :meth:`_init_core` in its constructor and implements :meth:`_direction_shapes`
    (the parameter names and shapes a validation direction covers). Public attributes:
    ``step_count`` (optimizer updates, or calls without an optimizer), ``calls``,
    ``skipped_val_batches``.
    """

    method: str
    refresh_every: int
    val_batches: Any
    #: the keys a version-2 state has besides :data:`_CORE_KEYS` (each may hold None): a state without
    #: one was cut short; a shell adds those of its own parts
    _V2_KEYS: Tuple[str, ...] = ("skipped_val_batches", "v_halves", "window", "budget")

    def __reduce_ex__(self, protocol):
        # copy.copy, copy.deepcopy and pickle all come here: a copy would share the model's hooks,
        # the optimizer's step hook and the validation loader's open iterator with this refiner
        raise ConfigurationError(
            f"a refiner ({type(self).__name__}) cannot be copied or pickled: it holds hooks on its model and optimizer "
            "and the validation loader's open pass",
            "save refiner.state_dict() (torch.save takes it) and load it into a refiner built on the copied "
            "model and optimizer")
    #: the shell's learned share of the augmented rows (an ``AdaptiveShare``), or None for a fixed
    #: ``aug_weight``; :meth:`_begin_share`, :meth:`_gather_share` and :meth:`_load_share` drive it
    share: Any = None

    # ------------------------------------------------------------------ construction
    def _init_core(self, optimizer, val_loader, schedule: Schedule, *, seed: int, needs_validation: bool,
                   model_scores: bool = False, auto_budget: Optional[float] = None) -> None:
        try:
            if isinstance(seed, bool):
                raise TypeError
            seed = operator.index(seed)  # ints, NumPy integers and 0-dim integer tensors
            if not -2 ** 63 <= seed < 2 ** 64:   # torch.Generator.manual_seed's range
                raise TypeError
        except TypeError:
            raise ConfigurationError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}",
                                     "pass e.g. seed=0") from None
        self.schedule = schedule
        self.refresh_every, self.val_batches = schedule.refresh_every, schedule.val_batches
        self.warmup_steps, self.bad_val_batch = schedule.warmup_steps, schedule.bad_val_batch
        cache_validation = schedule.cache_validation
        self.seed = int(seed)
        self._rng = PrivateRNG(seed)   # the validation stream's RNG: identical on every process
        self.val_loader = val_loader
        self.cache_validation = bool(cache_validation)
        stream_cls = CachedValidationStream if self.cache_validation else ValidationStream
        self._stream = stream_cls(val_loader, self._rng) if needs_validation else None
        if needs_validation and schedule.val_batches == "all" and not self.cache_validation:
            self._pass_length()   # a loader without len(): say so now, not at the first refresh
        if needs_validation and schedule.val_batches != "all":
            try:
                length = len(val_loader)
            except TypeError:   # a loader without len(): it cycles, and the count cannot be checked
                length = None
            if length is not None and int(schedule.val_batches) > length:
                raise ConfigurationError(
                    f"val_batches={schedule.val_batches} but the validation loader has {length} batches: a refresh "
                    "would count some of them twice",
                    f"use val_batches='all' (one pass, the default) or at most {length}")
        self._count_steps_of(optimizer)
        self._call_steps = 0
        self._hooks_removed = False   # remove_hooks() was called: the refiner refuses calls
        #: (the watched parameter's in-place version, the counted steps) at the last committed call, and
        #: the calls in a row that found the model updated without a counted step (_note_updates)
        self._update_probe: Optional[Tuple[int, int]] = None
        self._uncounted_in_a_row = 0
        self._warned_uncounted = False
        self._warned_sources = False
        self.calls = 0
        self.skipped_val_batches = 0
        self._v: Optional[Dict[str, torch.Tensor]] = None
        self._v_halves: Optional[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]] = None
        self._v_step = -1
        self._val_loss = float("nan")
        #: (slots, next slot, update of the last read) of the validation window (Schedule.fresh_batches)
        self._window = None
        #: whether calls alternate model score passes with closed-form ones (the shell decides)
        self.model_scores = bool(model_scores)
        # "auto": the method's own default (a budget for SAflex, the exact schedule for the others)
        fraction = budget_fraction(schedule, auto_budget) if needs_validation else None
        self.budget = (OverheadBudget(fraction, min_interval=schedule.refresh_every, model_scores=model_scores,
                                      min_score_interval=schedule.model_scores_every,
                                      max_interval=MAX_INTERVAL_FACTOR * schedule.refresh_every)
                       if fraction is not None else None)
        self._refresh_seconds: Optional[float] = None
        self._rebuild_only = False   # the current call's refresh rebuilt the direction without reading
        self._call_events = None     # the budget's [start, end] timing events of the current call (GPU)
        #: makes the budget's device timing events: "auto" (CUDA events on a CUDA device, else None:
        #: time on the host) or a callable
        self._event_factory: Any = "auto"
        self._timed_calls = [0, 0]   # calls seen by the budget: closed-form scores, model scores
        # the default budget does not warn when the call alone exceeds it
        self._warned_call_over_budget = schedule.budget == "auto"
        #: also keep the directions of two disjoint halves of the validation samples (the refinement
        #: strength's cross-fitting, :mod:`augplug.valve`); set by the shell
        self.split_validation = False

    def noise_generator(self, stream: int = 0) -> torch.Generator:
        """A fresh CPU generator for this call's random draws (Gumbel noise, ...): seeded from the seed,
        the process rank, the call count and ``stream``, so draws are reproducible after a resume and
        independent across processes; the global RNG and the validation stream's RNG are untouched."""
        key = hash((self.seed, dist_rank(), self.calls, int(stream))) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(key)

    @staticmethod
    def _global_count(count: int) -> int:
        """``count`` summed over the processes of a process group (itself in one process)."""
        if dist_world_size() == 1:
            return count
        t = torch.tensor([float(count)], dtype=torch.float64)
        all_reduce_sum_([t])
        return int(t.item())

    @staticmethod
    def _group_rejects(problem: torch.Tensor) -> List[int]:
        """In a process group: the processes whose call is rejected, from each one's ``problem`` (a
        0-dim tensor, nonzero or NaN when its call is rejected). One all-reduce, one host read;
        every process must call it at the same point of its call."""
        flags = torch.zeros(dist_world_size(), dtype=torch.float64, device=problem.device)
        flags[dist_rank()] = problem
        all_reduce_sum_([flags])
        return [r for r, v in enumerate(flags.tolist()) if v != 0]  # NaN != 0 too

    @staticmethod
    def _raise_for_peers(bad: List[int]) -> None:
        """Raise :class:`PeerBatchError` when other processes (``bad``) rejected their call."""
        if bad:
            raise PeerBatchError(f"the call of process(es) {bad} in the process group was rejected, so this "
                                 "step is rejected on every process",
                                 "skip this step on every process (catch augplug.AugplugError around the "
                                 "refiner call); the rejecting process's error names the problem")

    @property
    def optimizer(self):
        """The optimizer whose steps are counted (the innermost one of a wrapper), or None."""
        return self._optimizer

    @property
    def step_count(self) -> int:
        """Optimizer updates so far (every call counts as one when there is no optimizer)."""
        return self._steps.count if self._steps is not None else self._call_steps

    @step_count.setter
    def step_count(self, value: int) -> None:
        if self._steps is not None:
            self._steps.count = int(value)
        else:
            self._call_steps = int(value)

    @property
    def failed_steps(self) -> int:
        """Optimizer steps that raised before updating anything (0 without an optimizer)."""
        return self._steps.failed if self._steps is not None else 0

    def _begin_share(self) -> Tuple[Any, Optional[Dict[str, Any]]]:
        """At the start of a call, for a shell with an adaptive share (``self.share``): ``(the share
        held so far, the early proposal)``. The statistics earlier calls completed
        (:meth:`~augplug.share.AdaptiveShare.gather`) move the share this call uses, which
        ``self.aug_weight`` then holds; a failing call puts the first back. Without an adaptive
        share: ``(aug_weight, None)``."""
        prior = self.aug_weight
        if self.share is None:
            return prior, None
        early = self.share.gather(None, self.step_count, self.step_count, self.failed_steps)
        self.aug_weight = self.share.value_of(early)
        return prior, early

    def _gather_share(self, early: Optional[Dict[str, Any]], stats, stats_step: int) -> Optional[Dict[str, Any]]:
        """The share's state after this call (None without an adaptive share): this call's statistics
        ``stats`` of rows trained at update ``stats_step``, going on from :meth:`_begin_share`'s
        proposal; committed with the call."""
        if self.share is None:
            return None
        return self.share.gather(stats, stats_step, self.step_count, self.failed_steps, base=early)

    def _commit_share(self, state: Optional[Dict[str, Any]]) -> None:
        """Commit :meth:`_gather_share`'s proposal (None: nothing to commit)."""
        if state is not None:
            self.share.load_state_dict(state)
            self.aug_weight = self.share.value

    def _load_share(self, state: Dict[str, Any]) -> None:
        """Restore the adaptive share from a checked state; failed optimizer steps count from now."""
        self._commit_share(state)
        self.share.pending_failed = self.failed_steps

    def set_optimizer(self, optimizer) -> None:
        """Count the updates of ``optimizer`` from now on, in place of the optimizer given so far: for a
        run that builds a new one (a second stage after unfreezing the backbone, a new learning-rate
        recipe). The count goes on from where it is; ``None`` counts every call as an update.

        Raises :class:`~augplug.errors.ConfigurationError`, and changes nothing, for an optimizer that
        cannot be hooked or that holds none of the model's trainable parameters."""
        if optimizer is not None:
            problem = optimizer_problem(self.model.parameters(), optimizer)  # raises for one it cannot hook
            if problem is not None:
                raise problem
        count = self.step_count
        self._remove_step_hook()
        self._count_steps_of(optimizer)
        self.step_count = count
        self._update_probe, self._uncounted_in_a_row = None, 0

    def _count_steps_of(self, optimizer) -> None:
        """Hook the innermost optimizer of ``optimizer`` to count its updates (None: count calls)."""
        self._optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self._steps = StepCounter(self._optimizer) if self._optimizer is not None else None

    def _watched_parameter(self) -> Optional[torch.Tensor]:
        """A parameter that every update of the model changes in place (the first trainable one; a shell
        may name a better one), or None."""
        return next((p for p in self.model.parameters() if p.requires_grad), None)

    def _note_updates(self) -> None:
        """At a committed call: whether the model was updated in place since the last one without a step
        of the counted optimizer. After :data:`UNCOUNTED_UPDATES` such calls in a row (a checkpoint load
        or a weight swap is one, a replaced optimizer is every call) each one counts as an update (in one
        process; a process group only warns), and a warning names :meth:`set_optimizer`; a counted step
        starts the run of calls again."""
        p = self._watched_parameter()
        if self._steps is None or not isinstance(p, torch.nn.Parameter):
            return
        version, last = p._version, self._update_probe
        if (last is not None and self._steps.count != last[1]) or self._steps.in_step:
            # a counted step since the last call, or a call inside the optimizer's own step (LBFGS's
            # closure), whose updates are that step's
            self._uncounted_in_a_row = 0
        elif last is not None and version != last[0]:
            self._uncounted_in_a_row += 1
            if self._uncounted_in_a_row >= UNCOUNTED_UPDATES:
                # in a process group each process sees only itself: counting there could set the
                # processes' schedules apart, so they only warn
                alone = dist_world_size() == 1
                if not self._warned_uncounted:
                    self._warned_uncounted = True
                    _warn_at_caller(
                        f"the model was updated in {UNCOUNTED_UPDATES} steps in a row without a step of the "
                        f"optimizer this refiner counts ({type(self._optimizer).__name__}); "
                        + ("such updates now count as steps. " if alone else
                           "the refiner's schedule is not advancing. ")
                        + "If you built a new optimizer, pass it: refiner.set_optimizer(optimizer)"
                        + ("" if alone else " on every process"))
                if alone:
                    self._steps.count += 1
        self._update_probe = (version, self._steps.count)

    def _remove_step_hook(self) -> None:
        if self._steps is not None:
            self._steps.remove()

    def _check_can_train(self) -> None:
        """Refuse a call that could not train, before anything changes: after :meth:`remove_hooks`
        (no forward or optimizer step is seen any more) or with gradients disabled (the call would
        still move the refiner's state, from features of an earlier training forward)."""
        if self._hooks_removed:
            raise ConfigurationError(
                "this refiner's hooks were removed (remove_hooks()): it no longer sees the model's forwards "
                "or the optimizer's updates",
                "build a new refiner for the model; load this one's state_dict() into it to continue where "
                "it stopped")
        if not torch.is_grad_enabled():
            raise ModelModeError(
                "the refiner was called with gradients disabled (under torch.no_grad() or "
                "torch.inference_mode())",
                "call it only in training steps, with grad enabled: each call trains the model and moves the "
                "refiner's own state; to log or evaluate a loss use a plain criterion such as F.cross_entropy")

    @property
    def validation_direction(self) -> Optional[Dict[str, torch.Tensor]]:
        """The cached ``v = -grad L_val`` (parameter name -> tensor), or None before the first refresh."""
        return self._v

    @property
    def half_directions(self) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
        """The cached directions of the two validation halves (``split_validation``), or None."""
        return self._v_halves

    @property
    def val_loss(self) -> float:
        """Mean validation loss of the last refresh (NaN before the first)."""
        return float(self._val_loss)

    # ------------------------------------------------------------------ the refresh schedule
    @property
    def fresh_batches(self) -> Optional[int]:
        """Validation batches a refresh recomputes (None: all of them, the exact schedule); the
        schedule's ``"auto"`` resolves to 1 where the shell's window is exact for what it scores."""
        fresh = self.schedule.fresh_batches
        if fresh == "auto":
            return 1 if self._window_is_exact() else None
        return fresh

    def _window_is_exact(self) -> bool:
        """Whether this shell's validation window stays exact for what it scores (default: no)."""
        return False

    def _window_rebuilds(self) -> bool:
        """Whether a refresh can rebuild the direction from the window without reading (the window
        keeps what the direction is rebuilt from with the current parameters: last-layer features)."""
        return self.fresh_batches is not None and self._window_is_exact()

    @property
    def refresh_interval(self) -> int:
        """Updates between refreshes of the direction: the schedule's ``refresh_every``, or the
        budget's choice (its rebuild interval where a refresh can rebuild from the window without
        reading, else its read interval)."""
        if self.budget is None:
            return self.refresh_every
        return self.budget.rebuild_interval if self._window_rebuilds() else self.budget.interval

    @property
    def read_interval(self) -> int:
        """Updates between validation reads: the refresh interval, or with a budget over a window that
        rebuilds, the budget's choice (refreshes between only rebuild the direction)."""
        return self.budget.interval if self.budget is not None else self.refresh_every

    def _reads_spaced(self) -> bool:
        """Whether a budget spaces the reads of a filled window that rebuilds (refreshes between
        reads only rebuild the direction)."""
        return self._window is not None and self.budget is not None and self._window_rebuilds()

    def _read_due(self) -> bool:
        """Whether this refresh reads validation batches (always, unless the reads are spaced)."""
        return not self._reads_spaced() or self.step_count - self._window[2] >= self.budget.interval

    @property
    def model_score_interval(self) -> int:
        """Calls between model score passes: ``Schedule.model_scores_every``, or the budget's choice."""
        if self.budget is not None and self.model_scores:
            return self.budget.score_interval
        return self.schedule.model_scores_every

    def model_scores_due(self) -> bool:
        """Whether this call scores with the model (always, unless the calls alternate)."""
        return not self.model_scores or self.calls % self.model_score_interval == 0

    def direction_is_due(self) -> bool:
        """Whether a call now recomputes the validation direction (rebuilds it, or reads for it)."""
        return (self._v is None or self.step_count - self._v_step >= self.refresh_interval
                or (self._reads_spaced() and self._read_due()))

    # ------------------------------------------------------------------ the loss over the global batch
    @staticmethod
    def _global_weight_sums(sums, n_aug: int, batch: int, device) -> Tuple[list, float, float]:
        """Sum over the process group, in one all-reduce read back on the host: each of ``sums`` (this
        process's augmented rows' weight sums, one per loss), its augmented rows and its originals.
        Returns ``(weight sums, augmented rows, originals)`` of the global batch."""
        counts = torch.tensor([float(n_aug), float(batch - n_aug)], dtype=torch.float64, device=device)
        stats = torch.cat([torch.stack([s.double() for s in sums]), counts]) if sums else counts
        stats = stats.cpu()
        all_reduce_sum_([stats])
        return [float(v) for v in stats[:-2]], float(stats[-2]), float(stats[-1])

    def _loss_denominator(self, aug_mass, n_orig: float, world: int):
        """One process's share of the global loss denominator, ``orig_weight`` per original plus
        ``aug_weight`` per unit of ``aug_mass`` (the augmented rows' count, or their weight sum with
        ``weight_norm="batch"``), divided by the ``world`` size: data-parallel gradient averaging then
        yields exactly the loss of one process holding the whole global batch."""
        total = self.orig_weight * n_orig + self.aug_weight * aug_mass
        # a learned share is a 0-dim tensor: clamped on its device, without a host read
        total = total.clamp_min(1e-12) if isinstance(total, torch.Tensor) else max(total, 1e-12)
        return total / world if world != 1 else total

    # ------------------------------------------------------------------ the overhead budget
    def _sync(self) -> None:
        dev = self._device()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def _schedule_stats(self) -> Dict[str, float]:
        """``refresh_interval`` (updates between refreshes); ``model_scores_every`` (calls between
        model score passes) where those are spaced out; with a budget ``overhead`` (the refiner's
        measured share of a plain iteration at those intervals)."""
        out = {"refresh_interval": self.refresh_interval, "read_interval": self.read_interval}
        if self.model_scores:
            out["model_scores_every"] = self.model_score_interval
        if self.budget is not None:
            out["overhead"] = self.budget.overhead()
        return out

    def _budget_begin(self) -> Optional[float]:
        """At a call's start: the time (None without a budget). On a GPU also a timing event on the
        current stream, which the device reaches when the training forward queued before it is done."""
        self._refresh_seconds = None
        self._rebuild_only = False
        self._call_events = None
        if self.budget is None:
            return None
        if self._event_factory == "auto":
            self._event_factory = (partial(torch.cuda.Event, enable_timing=True)
                                   if self._device().type == "cuda" else None)
        if self._event_factory is not None:
            self._call_events = [self._event_factory(), None]
            self._call_events[0].record()
        return self.budget.call_started()

    def _budget_mark(self) -> None:
        """The end of the call's device work, marked just before a device sync the call makes anyway."""
        if self._call_events is not None:
            self._call_events[1] = self._event_factory()
            self._call_events[1].record()

    def _budget_end(self, started: Optional[float], model_scored: bool = False) -> None:
        """At a successful call's end: record its own time (``model_scored``: the call scored with a
        model pass).

        On a GPU the call's own time is its device time from the start event to the end mark: what
        the call adds to the device's timeline, its kernels and the idle gaps while they are
        launched, without the training forward it may wait for. It is read after a sync the call
        made anyway (a marked call); otherwise the end is marked and waited for on refresh calls
        (reads and rebuilds) and on every 8th call of each kind only."""
        if started is None:
            return
        kind = int(bool(model_scored) and self.model_scores)
        self._timed_calls[kind] += 1
        own = None
        if self._call_events is not None:
            if self._call_events[1] is None:
                if self._refresh_seconds is None and not self._rebuild_only and (self._timed_calls[kind] - 1) % 8:
                    return
                self._budget_mark()
            first, last = self._call_events
            last.synchronize()
            own = first.elapsed_time(last) / 1000.0
        self.budget.call_finished(started, self._refresh_seconds, model_scored=bool(kind), own=own,
                                  rebuilt=self._rebuild_only)

    def _num_val_batches(self) -> Optional[int]:
        """Good batches per refresh for an integer ``val_batches``; None for ``"all"`` (one pass)."""
        return None if self.val_batches == "all" else int(self.val_batches)

    def _pass_length(self) -> int:
        return num_val_batches("all", self._stream.pass_length if self.cache_validation
                               else (lambda: len(self.val_loader)))

    def _validation_sum(self, prepare: Callable, gradient: Callable, rows: Callable[[Any], int]) -> GradSum:
        """Sum the validation gradient over one refresh's batches (``skipped``: the batches skipped).

        ``prepare(x, y)`` places and checks a raw batch (on the reading process only, or once by a
        cached stream), ``gradient(x, y)`` returns its :class:`~augplug.scores.GradSum`, ``rows(y)``
        its number of samples. Every process reads every batch; good batch ``j`` is differentiated by
        process ``j % world``. With ``fresh_batches`` only that many batches are read (the first
        refresh reads the whole window) and the rest of the window is kept (:meth:`_window_entry`,
        :meth:`_window_sum`); the new window travels in ``GradSum.window`` until the call commits.
        Advances the stream; changes nothing else.
        """
        read = self._read_due()
        timed = self.budget is not None and read
        self._rebuild_only = self.budget is not None and not read   # its call is timed as a rebuild
        if timed:
            self._sync()
            t0 = self.budget.clock()
        total = self._validation_sum_untimed(prepare, gradient, rows, read)
        if timed:
            self._sync()
            self._refresh_seconds = self.budget.clock() - t0
            self._choose_interval()
        return total

    def _choose_interval(self) -> None:
        """The budget's next refresh interval, from measurements averaged over the processes (inside
        the refresh, which every process reaches), so every process chooses the same one."""
        m, cr = self.budget.measurements(), self.budget.rebuild_call
        t, c, cm = (m[0], m[1], m[3] if len(m) > 3 else 0.0) if m is not None else (0.0, 0.0, 0.0)
        stats = torch.tensor([t, c, float(self._refresh_seconds), cm, cr or 0.0, float(m is not None),
                              float(cr is not None)], dtype=torch.float64)
        world = dist_world_size()
        if world > 1:
            all_reduce_sum_([stats])
        if float(stats[5]) == world:
            mean = [float(v) / world for v in stats[:5]]
            # (P, c, R, c_m); c_m is read only where model scores are spaced, c_r where the window rebuilds
            self.budget.choose(tuple(mean[:4]), rebuild_call=mean[4] if float(stats[6]) == world else None)
            if self.budget.call_over_budget and not self._warned_call_over_budget:
                self._warned_call_over_budget = True
                _warn_at_caller(
                    f"budget={self.budget.fraction}: the refiner's call alone takes {mean[1] / max(mean[0], 1e-12):.2f} "
                    f"of a training step, more than the budget, so validation reads"
                    f"{' and model score passes' if self.budget.model_scores else ''} are spaced to their maximum "
                    f"interval ({self.budget.max_interval} updates, 16 x refresh_every) and the refiner costs more "
                    f"than the budget; raise the budget (stats['overhead'] is the measured share) or pass budget=None")

    def _validation_sum_untimed(self, prepare: Callable, gradient: Callable, rows: Callable[[Any], int],
                                read: bool) -> GradSum:
        if self.cache_validation:  # a non-finite batch is kept raw, to be skipped (or rejected) when it is read
            self._stream.prepare = lambda x, y: (x, y) if nonfinite(x, y) else prepare(x, y)
        fresh = self.fresh_batches
        if fresh is None:
            parts = []
            good, skipped, empty = self._read_validation(prepare, self._num_val_batches(), rows,
                                                         lambda j, x, y: parts.append(gradient(x, y)))
            return self._finish_sum(GradSum.sum_of(parts), skipped, empty)
        # the window: every process keeps every slot (identical windows, identical states); process
        # r sums the slots k with k % world == r. The first refresh fills it as the exact schedule
        # reads (val_batches good batches, or the good batches of one pass); its size is then fixed.
        # A window kept for other parameters than the shell scores now is filled again the same way.
        read_step = self.step_count
        if self._window is None or self._window_stale():
            slots, pos, size, want = {}, 0, None, self._num_val_batches()
        elif read:
            slots, pos, _ = self._window
            slots, size = dict(slots), len(slots)
            want = min(fresh, size)
        else:   # rebuild from the kept entries with the current parameters, read nothing
            slots, pos, read_step = self._window
            slots, size, want = dict(slots), len(slots), 0

        def keep(j, x, y):
            slots[j if size is None else (pos + j) % size] = self._window_entry(x, y, gradient) if rows(y) > 0 else None

        good, skipped, empty = (self._read_validation(prepare, want, rows, keep, every_process=True)
                                if want != 0 else (0, 0, 0))
        size = size or good
        world, rank = dist_world_size(), dist_rank()
        total = self._window_sum([e for k, e in sorted(slots.items()) if e is not None and k % world == rank])
        total = self._finish_sum(total, skipped, empty)
        return dataclasses.replace(total, window=(slots, (pos + good) % size, read_step))

    def _read_validation(self, prepare: Callable, want: Optional[int], rows: Callable, visit: Callable,
                         every_process: bool = False):
        """Read ``want`` good batches (None: one pass, ending where the loader's pass ends), skipping or
        rejecting non-finite and empty ones, and call ``visit(j, x, y)`` on good batch ``j`` on the
        process that differentiates it (``j % world``; on every process for ``every_process``).
        Returns ``(good, skipped, empty)``: ``skipped`` counts every skipped batch, ``empty`` those
        among them that held no samples."""
        cached = self.cache_validation
        world, rank = dist_world_size(), dist_rank()
        good, skipped, empty = 0, 0, 0
        if want is None:
            batches = self._stream.one_pass(self._pass_length())
        else:
            limit = want + self._skip_limit()

            def more():   # reads until ``want`` good batches (``good`` is read as the loop below counts)
                for _ in range(limit):
                    if good >= want:
                        return
                    yield self._stream.next()

            batches = more()
        # in a process group each batch is checked and differentiated on one process: a rejection
        # there is agreed by every process after the loop (a raise on one alone would leave the
        # others waiting in the refresh's all-reduce)
        agreed = world > 1 and not every_process
        failure = None
        for x, y in batches:
            if nonfinite(x, y):
                if self.bad_val_batch == "raise":
                    raise NonFiniteError("a validation batch holds NaN/inf in its inputs or targets",
                                         "clean the validation set, or pass bad_val_batch='skip' to skip such "
                                         "batches")
                skipped += 1
                continue
            if empty_batch(x, y):
                if self.bad_val_batch == "raise":
                    raise EmptyValidationError(
                        "a validation batch holds no samples (0 rows)",
                        "leave empty batches out of the validation loader (a collate_fn that drops samples can "
                        "empty a whole batch: filter the dataset instead), or pass bad_val_batch='skip' to skip "
                        "such batches")
                skipped += 1
                empty += 1
                continue
            j = good
            good += 1
            if not every_process and j % world != rank:
                continue
            try:
                if not cached:
                    x, y = prepare(x, y)
                if rows(y) == 0 and not every_process:
                    continue
                _visit_batch(visit, j, x, y)
            except AugplugError as e:
                if not agreed:
                    raise
                failure = e
                break
        if agreed:
            bad = self._group_rejects(torch.tensor(float(failure is not None), dtype=torch.float64,
                                                   device=self._device()))
            if failure is not None:
                raise failure
            self._raise_for_peers(bad)
        if good == 0:
            if skipped and not empty:
                raise NonFiniteError(f"all {skipped} validation batches read for this refresh hold NaN/inf",
                                     "clean the validation set: no finite batch is left to compute the direction from")
            if skipped:
                error = NonFiniteError if skipped > empty else EmptyValidationError
                raise error(f"all {skipped} validation batches read for this refresh are unusable ({empty} empty, "
                            f"{skipped - empty} holding NaN/inf)",
                            "leave empty and non-finite batches out of the validation set (a collate_fn that drops "
                            "samples can empty a whole batch: filter the dataset instead)")
            raise EmptyValidationError("the validation batches drawn hold no samples",
                                       "pass a loader over at least one clean labelled sample")
        if want is not None and good < want:
            if not empty:
                raise NonFiniteError(f"only {good} of {want} validation batches were finite after skipping {skipped}",
                                     "clean the validation set, or lower val_batches")
            error = NonFiniteError if skipped > empty else EmptyValidationError
            raise error(f"only {good} of {want} validation batches were usable after skipping {empty} empty and "
                        f"{skipped - empty} non-finite one(s)",
                        "leave empty and non-finite batches out of the validation set, or lower val_batches")
        return good, skipped, empty

    def _finish_sum(self, total: GradSum, skipped: int, empty: int = 0) -> GradSum:
        """All-reduce a refresh's local sum and check it (see :meth:`_validation_sum`)."""
        world = dist_world_size()
        if world > 1:
            total = self._all_reduce(total)
        if total.count == 0:
            raise EmptyValidationError("the validation batches drawn hold no samples",
                                       "pass a loader over at least one clean labelled sample")
        if nonfinite(list(total.sums.values()), torch.as_tensor(total.loss_sum)):
            raise NonFiniteError("the validation gradient is not finite although the validation batches are",
                                 "the model overflows on clean data: lower the learning rate, or check the "
                                 "model's weights for NaN/inf")
        if skipped and not empty:
            _warn_at_caller(f"augplug skipped {skipped} validation batch(es) holding NaN/inf "
                            "(counted in stats['skipped_val_batches'])")
        elif skipped:
            kinds = f"{empty} empty (0 rows: a collate_fn that drops samples?)" + (
                f" and {skipped - empty} holding NaN/inf" if skipped > empty else "")
            _warn_at_caller(f"augplug skipped {skipped} validation batch(es): {kinds} "
                            "(counted in stats['skipped_val_batches'])")
        return dataclasses.replace(total, skipped=skipped)

    # ------------------------------------------------------------------ the validation window
    def _window_entry(self, x, y, gradient: Callable) -> Any:
        """What the window keeps of one validation batch (default: its gradient sum, as computed).
        Shells override it to keep something cheaper to refresh (last-layer features)."""
        return gradient(x, y)

    def _window_sum(self, entries) -> GradSum:
        """The gradient sum of the window's entries this process owns (default: the kept sums)."""
        return GradSum.sum_of(entries)

    def _window_stale(self) -> bool:
        """Whether the validation window keeps gradient sums over other parameters than the shell
        scores now (full mode: a backbone unfrozen or frozen mid-run changes ``score_params()``). Such
        a window cannot be summed with new entries: the next refresh reads it again whole."""
        if self._window is None:
            return False
        sums = [e for e in self._window[0].values() if isinstance(e, GradSum)]
        if not sums:   # kept features (last-layer mode), rebuilt with the current head
            return False
        names = set(self._direction_shapes())
        return any(set(e.sums) != names for e in sums)

    def _all_reduce(self, total: GradSum, with_halves: bool = True) -> GradSum:
        """Sum a validation-gradient sum over processes (processes without a batch contribute zeros)."""
        dev = self._device()
        sums = {k: (total.sums[k].float().clone() if k in total.sums
                    else torch.zeros(shape, dtype=torch.float32, device=dev))
                for k, shape in self._direction_shapes().items()}
        meta = torch.tensor([float(total.count), float(total.loss_sum)], dtype=torch.float64)
        all_reduce_sum_(list(sums.values()) + [meta])
        halves = None
        if self.split_validation and with_halves:
            empty = GradSum({}, 0)
            halves = tuple(self._all_reduce(h, with_halves=False) for h in (total.halves or (empty, empty)))
        return GradSum(sums, int(round(float(meta[0]))), float(meta[1]), halves=halves)

    def _skip_limit(self) -> int:
        """Consecutive bad batches an integer ``val_batches`` refresh reads past: one pass (or 1000)."""
        try:
            return self._pass_length()
        except ConfigurationError:
            return 1000

    def _commit_direction(self, v_new: Optional[GradSum]) -> None:
        """Keep a freshly computed (and checked) direction as of this update."""
        if v_new is None:
            return
        self._v = v_new.direction()
        self._v_halves = None if v_new.halves is None else tuple(h.direction() for h in v_new.halves)
        self._v_step = self.step_count
        self._val_loss = v_new.loss_sum / max(v_new.count, 1)
        self.skipped_val_batches += int(v_new.skipped)
        if v_new.window is not None:
            self._window = v_new.window

    def _count_call(self) -> None:
        self.calls += 1
        if self._steps is None:
            self._call_steps += 1
        else:
            self._note_updates()

    def _snapshot(self) -> Tuple[Any, ...]:
        """What a failing call must put back: the private RNG, the stream's position, the loader's
        own generators (``generator=``), which opening a pass draws from, and whether its next pass
        resets a persistent-worker iterator (one the failed call may have created)."""
        stream = self._stream
        if stream is None:
            return self._rng.state.clone(), None, 0, None, False
        return (self._rng.state.clone(), stream.state_dict(), stream.reads, generator_states(stream.loader),
                opens_by_reset(stream.loader))

    def _restore(self, snap: Tuple[Any, ...]) -> None:
        self._rng.state = snap[0]
        # a stream that was not read is left alone. The position is put back without reading the
        # loader (its pass is re-opened at the next read): a rollback that read could fail again half-
        # way (a flaky file, a loader whose later passes are empty) and replace the call's own error
        if self._stream is not None and snap[1] is not None and self._stream.reads != snap[2]:
            self._stream.restore(snap[1])
            # a pass opened by the failed call (none was open before it) moved the generators, and
            # may have started the loader's persistent workers
            open_as(self._stream.loader, snap[4])
            set_generator_states(self._stream.loader, snap[3])

    # ------------------------------------------------------------------ resumable state
    def _direction_shapes(self) -> Dict[str, torch.Size]:
        """Names and shapes of the parameters a validation direction covers (shell specific)."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _core_state(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "refiner": type(self).__name__,
            "method": self.method,
            "step_count": self.step_count,
            "calls": self.calls,
            "v": None if self._v is None else {k: t.detach().clone() for k, t in self._v.items()},
            "v_step": self._v_step,
            "val_loss": float(self._val_loss),
            "rng_state": self._rng.state.clone(),
            "stream": self._stream.state_dict() if self._stream is not None else None,
            "skipped_val_batches": self.skipped_val_batches,
            "v_halves": None if self._v_halves is None else [{k: t.detach().clone() for k, t in h.items()}
                                                              for h in self._v_halves],
            "window": self._window_state(),
            "budget": self.budget.state_dict() if self.budget is not None else None,
            # the seed of the per-call noise (with the call count): restored, as the RNG state is
            "seed": self.seed,
            # the options the refiner was built with, as its repr lists them: a resume under others warns
            "options": option_fields(repr(self)),
        }

    def _window_state(self) -> Optional[Dict[str, Any]]:
        """The validation window as plain tensors and dicts (``torch.load(weights_only=True)`` reads it)."""
        if self._window is None:
            return None
        slots, pos, read_step = self._window

        def plain(e):
            if e is None or isinstance(e, dict):
                return None if e is None else {k: (t.detach().clone() if torch.is_tensor(t) else t) for k, t in e.items()}
            return {"sums": {k: t.detach().clone() for k, t in e.sums.items()}, "count": int(e.count),
                    "loss_sum": torch.as_tensor(e.loss_sum, dtype=torch.float64).detach().clone(),
                    "halves": None if e.halves is None else [plain(h) for h in e.halves]}

        return {"position": int(pos), "slots": {int(k): plain(e) for k, e in slots.items()}, "read_step": int(read_step)}

    def _direction_from_state(self, v: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A saved direction (or a window's sums) as copies on the model's device."""
        dev = self._device()
        return {k: t.to(dev).clone() for k, t in v.items()}

    def _check_direction_dtypes(self, what: str, tensors) -> None:
        """Directions are computed in fp32 (closed forms, process groups) or in the model's parameter
        dtype (autograd): a state in another dtype was converted after the save (``.half()``,
        ``.double()``) and would keep it until later refreshes replaced it."""
        p = next((q for q in self.model.parameters() if q.is_floating_point()), None)
        allowed = {torch.float32} | ({p.dtype} if p is not None else set())
        bad = sorted({str(t.dtype) for t in tensor_leaves(tensors) if t.is_floating_point() and t.dtype not in allowed})
        if bad:
            raise ConfigurationError(f"the saved {what} is in {', '.join(bad)}, which this refiner does not compute "
                                     f"it in ({', '.join(sorted(map(str, allowed)))}): a state converted after the save",
                                     "load the state as state_dict() returned it (torch.save / torch.load keep dtypes)")

    def _window_from_state(self, state: Dict[str, Any], v_step: int):
        dev = self._device()

        def entry(e):
            if e is None:
                return None
            if "sums" in e:
                return GradSum(self._direction_from_state(e["sums"]), int(e["count"]),
                               e["loss_sum"].to(dev).clone(),
                               halves=None if e["halves"] is None else tuple(entry(h) for h in e["halves"]))
            return {k: (t.to(dev).clone() if torch.is_tensor(t) else t) for k, t in e.items()}

        # a window saved before reads were spaced out was read at every refresh: at the direction's update
        read_step = state.get("read_step", v_step)
        return {int(k): entry(e) for k, e in state["slots"].items()}, int(state["position"]), int(read_step)

    def _check_core_state(self, state: Any) -> None:
        """Raise (changing nothing) unless ``state`` is a complete, finite state for this refiner."""
        if not isinstance(state, dict):
            raise ConfigurationError(f"a refiner state must be a dict, got {type(state).__name__}", _CHECKPOINT_FIX)
        if "version" not in state:
            keys = sorted(map(str, state))
            raise ConfigurationError(
                "this is not a refiner state: it has no 'version' key "
                f"({'no keys' if not keys else 'keys: ' + ', '.join(keys[:8]) + (', ...' if len(keys) > 8 else '')}; "
                "a model's or an optimizer's state_dict?)", _CHECKPOINT_FIX)
        if state.get("version") not in _READABLE_VERSIONS:
            raise ConfigurationError(f"refiner state version {state.get('version')!r} is not one of "
                                     f"{_READABLE_VERSIONS}", "load a state saved by this version of augplug")
        kind = state.get("refiner", type(self).__name__)   # older states do not say; first: its keys are another kind's
        if kind != type(self).__name__:
            raise ConfigurationError(f"the state was saved by a {kind}, this is a {type(self).__name__}",
                                     f"load it into a {kind} built with the same options")
        missing = [k for k in _CORE_KEYS + (self._V2_KEYS if state["version"] >= 2 else ()) if k not in state]
        if missing:
            raise ConfigurationError(f"the refiner state lacks {missing} (truncated or not a refiner state)",
                                     _CHECKPOINT_FIX)
        if any(t.is_meta for t in tensor_leaves(state)):
            raise ConfigurationError("the refiner state holds tensors without values (loaded with "
                                     "map_location='meta')", "load it with map_location='cpu' or the model's device")
        if state["method"] != self.method:
            raise ConfigurationError(f"state was saved by method {state['method']!r}, this refiner is "
                                     f"{self.method!r}", "build the refiner with the same method before loading")
        for key in ("step_count", "calls", "v_step"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < (-1 if key == "v_step" else 0):
                raise ConfigurationError(f"the refiner state's {key!r} is {state[key]!r}, not a count", _CHECKPOINT_FIX)
        if state["v_step"] > state["step_count"]:
            raise ConfigurationError(f"the refiner state's direction was computed at update {state['v_step']}, after "
                                     f"its last update {state['step_count']} (an edited or mixed-up state)",
                                     _CHECKPOINT_FIX)
        skipped = state.get("skipped_val_batches", 0)
        if not isinstance(skipped, int) or skipped < 0:
            raise ConfigurationError(f"the refiner state's 'skipped_val_batches' is {skipped!r}", _CHECKPOINT_FIX)
        v = state["v"]
        if v is not None:
            expected = self._direction_shapes()
            if not isinstance(v, dict) or set(v) != set(expected):
                names = sorted(v) if isinstance(v, dict) else type(v).__name__
                raise ConfigurationError(
                    f"the saved validation direction covers {names}, this refiner scores {sorted(expected)}",
                    "build the refiner with the same model, mode and scored parameters (score_params= for the "
                    "contrastive refiner) before loading")
            for k, t in v.items():
                if not torch.is_tensor(t) or t.shape != expected[k]:
                    raise ShapeError(
                        f"the saved validation direction's {k!r} has shape {tuple(getattr(t, 'shape', ()))}, this "
                        f"model's is {tuple(expected[k])} (another number of classes or features?)",
                        "load a state saved with the same model architecture and number of classes")
            self._check_direction_dtypes("validation direction", [v, state.get("v_halves")])
            if nonfinite(list(v.values())):
                raise NonFiniteError("the saved validation direction holds NaN/inf",
                                     "load an intact checkpoint (an earlier one), or drop the refiner's state: "
                                     "the direction is recomputed at the next refresh")
            saved = state["val_loss"]
            if torch.is_tensor(saved) and saved.numel() == 1 and saved.is_floating_point():
                saved = float(saved)
            if not isinstance(saved, (int, float)) or isinstance(saved, bool):
                raise ConfigurationError(f"the saved validation loss is {state['val_loss']!r}, not a number",
                                         _CHECKPOINT_FIX)
            if not math.isfinite(saved):
                raise NonFiniteError(f"the saved validation loss is {state['val_loss']!r}", "load an intact checkpoint")
        halves = state.get("v_halves")
        if state["version"] >= 2 and v is not None:   # each is kept with the direction exactly when the options say
            check_part_presence(state, "v_halves", self.split_validation,
                                "the direction's two validation halves (strength='adaptive')")
            if self.fresh_batches is not None:
                check_part_presence(state, "window", True, "a validation window (Schedule.fresh_batches)")
        if halves is not None:
            if v is None or not isinstance(halves, (list, tuple)) or len(halves) != 2 or \
                    any(not isinstance(h, dict) or set(h) != set(v) for h in halves):
                raise ConfigurationError("the saved half directions do not match the saved direction", _CHECKPOINT_FIX)
            if any(not torch.is_tensor(t) or t.shape != v[k].shape for h in halves for k, t in h.items()):
                raise ShapeError("the saved half directions have other shapes than the direction", _CHECKPOINT_FIX)
            if nonfinite(list(halves)):
                raise NonFiniteError("the saved half directions hold NaN/inf", "load an intact checkpoint")
        window = state.get("window")
        if window is not None:
            if self.fresh_batches is None:
                raise ConfigurationError("the state holds a validation window (Schedule.fresh_batches) but this "
                                         "refiner recomputes the whole direction", "build the refiner with the same "
                                         "schedule before loading")
            if not isinstance(window, dict) or set(window) - {"read_step"} != {"position", "slots"} or \
                    not isinstance(window["position"], int) or not isinstance(window["slots"], dict) or \
                    not isinstance(window.get("read_step", 0), int) or isinstance(window.get("read_step"), bool):
                raise ConfigurationError("the refiner state's 'window' is not a validation window", _CHECKPOINT_FIX)
            keys = list(window["slots"])
            if any(not isinstance(k, int) or isinstance(k, bool) for k in keys) or not keys or \
                    sorted(keys) != list(range(len(keys))) or \
                    not 0 <= window["position"] < len(window["slots"]):
                raise ConfigurationError("the refiner state's validation window has missing slots or a position "
                                         "outside them", _CHECKPOINT_FIX)
            if nonfinite(window["slots"]):
                raise NonFiniteError("the saved validation window holds NaN/inf", "load an intact checkpoint")
            self._check_direction_dtypes("validation window", [e.get("sums") if isinstance(e, dict) else None
                                                               for e in window["slots"].values()])
            self._check_window_size(len(window["slots"]), state.get("skipped_val_batches", 0))
            try:
                self._window_from_state(window, state["v_step"])
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ConfigurationError(f"the refiner state's 'window' is malformed ({e})", _CHECKPOINT_FIX) from None
        budget = state.get("budget")
        if budget is not None:   # checked whole even where it is dropped (a refiner without a budget)
            OverheadBudget.check_state(budget)
        seed = state.get("seed", 0)
        if not is_integer(seed):
            raise ConfigurationError(f"the refiner state's 'seed' is {seed!r}, not an integer", _CHECKPOINT_FIX)
        options = state.get("options")
        if options is not None and (not isinstance(options, dict) or
                                    any(not isinstance(x, str) for kv in options.items() for x in kv)):
            raise ConfigurationError("the refiner state's 'options' is not a table of option names and values",
                                     _CHECKPOINT_FIX)
        rng = state["rng_state"]
        if not is_generator_state(rng, self._rng.state):
            raise ConfigurationError("the refiner state's 'rng_state' is not a generator state", _CHECKPOINT_FIX)
        if state["stream"] is not None and self._stream is None:
            raise ConfigurationError("the state holds a validation stream but this refiner reads none",
                                     "build the refiner with the same method before loading")
        if self._stream is not None and state["stream"] is not None:
            if not isinstance(state["stream"], dict):
                raise ConfigurationError("the refiner state's 'stream' is not a stream state", _CHECKPOINT_FIX)
            self._stream.check_state(state["stream"])

    def _check_window_size(self, slots: int, skipped: int) -> None:
        """A saved window holds the good batches of the first refresh: ``val_batches`` of them, or one
        pass of the loader (fewer only where batches were skipped). A window of another size was
        saved with another loader (batch size) or ``val_batches``, and would fix that size for good."""
        try:
            expected = self._num_val_batches() or len(self.val_loader)
        except TypeError:   # a loader without len(): its pass is not known without reading it
            return
        # "all" reads one pass, which ends where the loader's iterator ends: fewer batches than a len()
        # that is only a claim (an IterableDataset's) is that pass, not another loader
        short_ok = self.val_batches == "all" and not len_is_exact(self.val_loader)
        if slots > expected or (slots < expected and skipped == 0 and not short_ok):
            raise ConfigurationError(
                f"the saved validation window holds {slots} batches, but this refiner reads {expected} per refresh "
                f"(val_batches={self.val_batches!r} over a loader of {len(self.val_loader)} batches)"
                if self.val_batches == "all" else
                f"the saved validation window holds {slots} batches, but this refiner reads {expected} per refresh "
                f"(val_batches={self.val_batches!r})",
                "build the validation loader (its batch size) and Schedule(val_batches=) as they were when the "
                "state was saved")

    def _warn_other_options(self, saved: Optional[Dict[str, str]]) -> None:
        """Warn when a state was saved by a refiner built with other options (states of earlier
        versions do not record them): it loads, and the run goes on under this refiner's options,
        which can train otherwise than the saved run would have (e.g. another ``weighting``)."""
        if saved is None:
            return
        own = option_fields(repr(self))
        # the seed is state (restored at load), not an option to differ
        keys = [k for k in sorted(set(saved) | set(own)) if saved.get(k) != own.get(k) and k != "seed"]
        if keys:
            horizon = any(k.endswith("aug_weight.horizon") for k in keys)
            changed = [f"{k}: saved {saved.get(k, '(not an option)')}, here {own.get(k, '(not an option)')}"
                       for k in keys]
            _warn_at_caller("the refiner state was saved by a refiner built with other options ("
                            + "; ".join(changed) + "); it is loaded and training goes on under this refiner's "
                            "options. To resume the saved run as it was, build the refiner with the saved options"
                            + (" (the learned share's horizon is the run's length in updates: a run resumed for "
                               "another length, e.g. other epochs, steps the share at that length's rate)"
                               if horizon else ""))

    def _load_core_state(self, state: Dict[str, Any]) -> None:
        """Assign a state :meth:`_check_core_state` accepted (the stream first: re-opening its pass is
        the one step that can still fail, and it leaves the stream as it was when it does)."""
        if self._stream is not None and state.get("stream") is not None:
            self._stream.load_state_dict(state["stream"])
        self.step_count = int(state["step_count"])
        self._update_probe, self._uncounted_in_a_row = None, 0
        self.calls = int(state["calls"])
        self._v = None if state["v"] is None else self._direction_from_state(state["v"])
        halves = state.get("v_halves")
        self._v_halves = None if halves is None else tuple(self._direction_from_state(h) for h in halves)
        self._v_step = int(state["v_step"])
        self._val_loss = float(state["val_loss"])   # a number, or a one-element tensor (checked)
        self._rng.state = state["rng_state"].clone().cpu()
        self.skipped_val_batches = int(state.get("skipped_val_batches", 0))
        window = state.get("window")
        self._window = None if window is None else self._window_from_state(window, self._v_step)
        if "seed" in state:   # states before it was saved keep this refiner's
            self.seed = int(state["seed"])
        self._warn_other_options(state.get("options"))
        if state.get("budget") is not None:
            if self.budget is not None:
                self.budget.load_state_dict(state["budget"])
            else:
                _warn_at_caller("the state's overhead budget measurements are dropped: this refiner has "
                                "budget=None and keeps the exact schedule from here on")
