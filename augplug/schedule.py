"""When and how the refiner computes its validation direction: :class:`Schedule`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

from .errors import ConfigurationError
from .options import is_integer, is_real

__all__ = ["Schedule", "BAD_VAL_BATCH", "AUTO_BUDGET", "budget_fraction", "budget_from_text", "resolve_schedule"]

#: Values of ``Schedule.bad_val_batch``.
BAD_VAL_BATCH = ("skip", "raise")


@dataclass(frozen=True)
class Schedule:
    """The validation work of a refiner.

    Args:
        refresh_every: recompute the validation direction every k optimizer updates.
        val_batches: validation minibatches averaged per refresh (``"all"``: one pass of the loader).
        warmup_steps: optimizer updates before refinement starts (plain soft-target CE until then).
        cache_validation: read the validation loader once and keep its batches on the model's device
            (targets checked and converted once). Saves the loader's per-batch work and the copies on
            every refresh, which dominates small validation batches on a GPU. The first pass's order
            and any random validation transform are then fixed for the rest of training.
        bad_val_batch: a validation batch holding NaN/inf is skipped and counted (``"skip"``) or
            rejected with :class:`~augplug.errors.NonFiniteError` (``"raise"``).
        fresh_batches: validation batches recomputed per refresh; the direction still covers all
            ``val_batches`` (a window over the loader): the other batches' parts are kept from earlier
            refreshes. ``None``: every refresh recomputes all of them (exact). ``"auto"`` (default):
            1 where the window is exact for what it scores (last-layer mode), ``None`` elsewhere. In
            last-layer mode the window keeps the batches' classifier *features* and rebuilds the head
            gradient from them with the current head at every refresh (exact for the head, stale only
            in the body's features, which are renewed ``fresh_batches`` batches at a time); in other
            modes it keeps each batch's gradient as computed (stale in every parameter, and memory of
            one gradient per batch). The first refresh reads the whole window.
        budget: the refiner's allowed share of a plain training step (e.g. 0.1), a ceiling. The
            refiner then times its own work and the iteration and spaces its validation work to stay
            within three quarters of it (:mod:`augplug.budget`; the rest is headroom for the noise of
            its measurements and for costs it cannot time): the validation reads (at least ``refresh_every`` updates apart),
            and in the model-forward score modes the model's score passes (see
            ``model_scores_every``). In last-layer mode with the validation window a refresh between
            two reads rebuilds the head gradient from the cached features with the current head
            (exact for the head), every ``refresh_every`` updates where the budget leaves room for
            those rebuilds, less often where it does not. Every interval stays at most
            ``16 * refresh_every`` updates (calls for score passes), so the direction is renewed
            even where the refiner's call alone exceeds the budget (``stats["overhead"]`` then says by
            how much). ``stats["read_interval"]``, ``stats["model_scores_every"]`` and
            ``stats["overhead"]`` report the choice and the measured share. The schedule then depends on
            measured time, so runs are not bit-reproducible. ``"auto"`` (default): the method's own
            default (``Policy.auto_budget``): for SAflex, the default method, a budget of 0.1 that
            does not warn when the call alone exceeds it (a small model's step can be shorter than
            any refiner call); for L2RW, AutoDO, influence and the contrastive refiner the exact
            schedule (L2RW lost 4.2 and 5.9 points under a budget on the digits demo; the others were
            not measured under one). ``None``: the exact schedule (validation work every
            ``refresh_every`` updates, model scores every ``model_scores_every`` calls),
            bit-reproducible.
        model_scores_every: in the score modes that run the model (``mode="full"``,
            ``"double_backward"``, ``"auto"``), score with the model on every k-th call and with the
            closed-form last layer (the direction's classifier part, as ``mode="last_layer"`` scores)
            on the calls between; needs a linear classifier head. 1 (default): the model scores
            every call. With a budget, the least interval the budget may choose.
    """

    refresh_every: int = 4
    val_batches: Union[int, str] = "all"
    warmup_steps: int = 0
    cache_validation: bool = False
    bad_val_batch: str = "skip"
    fresh_batches: Union[None, int, str] = "auto"
    budget: Union[None, float, str] = "auto"
    model_scores_every: int = 1

    def __post_init__(self):
        def integer(name, value, low):
            if not is_integer(value) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}",
                                         f"use e.g. {name}={max(low, 1)}")
            object.__setattr__(self, name, int(value))   # numpy integers from a sweep become ints
        integer("refresh_every", self.refresh_every, 1)
        if self.val_batches != "all":
            integer("val_batches", self.val_batches, 1)
        integer("warmup_steps", self.warmup_steps, 0)
        integer("model_scores_every", self.model_scores_every, 1)
        if self.fresh_batches not in (None, "auto"):
            integer("fresh_batches", self.fresh_batches, 1)
            if self.val_batches != "all" and self.fresh_batches > self.val_batches:
                raise ConfigurationError(f"fresh_batches={self.fresh_batches} exceeds val_batches={self.val_batches}",
                                         "recompute at most the batches the direction covers")
        if self.budget is not None and not (isinstance(self.budget, str) and self.budget == "auto") and (
                not is_real(self.budget) or not self.budget > 0):
            raise ConfigurationError(f"budget must be a positive fraction of a training step, 'auto' or None, got "
                                     f"{self.budget!r}", "use e.g. budget=0.1 (10 % on top of a plain step), 'auto' "
                                     "(the default, 0.1) or None for the exact, bit-reproducible schedule")
        if self.bad_val_batch not in BAD_VAL_BATCH:
            raise ConfigurationError(f"bad_val_batch must be one of {BAD_VAL_BATCH}, got {self.bad_val_batch!r}",
                                     "use 'skip' (skip and count non-finite validation batches) or 'raise'")
        if not isinstance(self.cache_validation, bool):
            raise ConfigurationError(f"cache_validation must be True or False, got {self.cache_validation!r}",
                                     "pass a bool")


#: What ``Schedule(budget="auto")`` allows for a method whose default is a budget (SAflex, the
#: default method; ``Policy.auto_budget``): a tenth of a plain training step.
AUTO_BUDGET = 0.1
#: The longest interval a budget may choose, in units of ``refresh_every``.
MAX_INTERVAL_FACTOR = 16


def budget_fraction(schedule: Schedule, auto: Optional[float] = AUTO_BUDGET) -> Optional[float]:
    """The schedule's budget as a fraction of a step, or None without one; ``"auto"`` resolves to
    ``auto`` (the method's own default, ``Policy.auto_budget``; None: the exact schedule)."""
    return auto if schedule.budget == "auto" else None if schedule.budget is None else float(schedule.budget)


def budget_from_text(text: str) -> Union[None, float, str]:
    """A command line's budget: ``"auto"``, ``"none"`` (the exact schedule) or a positive fraction."""
    word = str(text).strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    try:
        value = float(word)
    except ValueError:
        raise ConfigurationError(f"budget must be 'auto', 'none' or a positive fraction, got {text!r}",
                                 "pass e.g. 0.1, auto (the default) or none (the exact schedule)") from None
    Schedule(budget=value)   # the schedule's own check names the problem
    return value


def resolve_schedule(schedule: Union[None, Schedule, Dict[str, Any]]) -> Schedule:
    """A :class:`Schedule` from ``None`` (the defaults), a ``Schedule`` or a dict of its fields."""
    if schedule is None:
        return Schedule()
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, dict):
        fields = {f.name for f in dataclasses.fields(Schedule)}
        unknown = sorted(set(schedule) - fields)
        if unknown:
            raise ConfigurationError(f"schedule has no option(s) {unknown}", f"use {sorted(fields)}")
        return Schedule(**schedule)
    raise ConfigurationError(f"schedule must be a Schedule, a dict of its fields or None, got {type(schedule).__name__}",
                             "pass augplug.Schedule(refresh_every=..., val_batches=...)")
