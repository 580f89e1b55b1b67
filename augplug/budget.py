"""An overhead budget: the refiner times its own work against the training step and spaces its
validation work so that its share of the step stays within the budget.

Measured (running medians of the last ``window`` measurements): ``P`` the plain part of an iteration
(the time from one refiner call's start to the next, minus the first call's own time; kept once the
call that ends the iteration succeeds, so a rejected call changes no measurement), ``c`` the
refiner's own time in a call without a refresh (a call starts after its input check, the one point
where, on a GPU, it waits for the training forward: that wait is the step's time, not the
refiner's), and ``R`` the time of a refresh that reads validation batches (reads and gradients).
With reads every ``k`` updates the refiner costs ``c + R / k`` per iteration. The budget ``b`` is a
ceiling, and the controller plans for ``a = (1 - headroom) * b`` (``headroom`` 0.25 by default,
:data:`HEADROOM`), asking for ``c + R / k <= a * P``, so

    k = ceil(R / (a * P - c)),   clipped to [refresh_every of the schedule, max_interval].

The headroom is for what the plan cannot see: the medians move between windows by about a fifth of
the refiner's share, and part of the refiner's cost falls outside its own calls (the backward of its
loss, and caches its work evicts, which the next training step pays). A controller that planned for
``b`` itself would sit on the ceiling and cross it about every other measurement.

``max_interval`` is ``16 * refresh_every`` for a refiner (:data:`augplug.schedule.MAX_INTERVAL_FACTOR`),
so the direction is renewed however slow a read is. When ``c`` alone leaves no room in the plan
(``c >= a * P``) ``k`` goes to ``max_interval``; when it exceeds the budget itself (``c >= b * P``)
``call_over_budget`` is also set (an explicit budget warns once, the default ``"auto"`` does not) and
``stats["overhead"]`` reports the measured share above the budget.

What ``k`` spaces out depends on the window (``Schedule.fresh_batches``). In last-layer mode the
window keeps the validation features, so a refresh every ``refresh_every`` updates rebuilds the head
gradient from them with the current head (exact for the head) and only every ``k`` updates also
reads a fresh batch of features: the budget then trades the features' age, not the head's. A call
whose refresh only rebuilt (a product of the cached features with the head) is timed as its own
kind, ``c_r``, and the rebuilds are spaced like the model's score passes below (``E = c_r - c`` per
rebuild, every ``j`` updates; :meth:`OverheadBudget.choose`). Elsewhere a refresh always reads,
and ``k`` is the refresh interval.

In the model-forward score modes (``mode="full"`` and the others that run the model to score) a
score pass costs about a forward, often more than the whole budget. There the budget also spaces out
those passes (``model_scores=True``): a call scores with the model every ``s`` calls and with the
closed-form last layer between. It measures both kinds of call, ``c`` (closed form) and ``c_m``
(model scores), and with ``D = c_m - c`` asks for ``c + D / s + R / k <= a * P``:

    k = clip(ceil((D + R) / (a * P - c)), min_interval, max_interval),
    s = clip(ceil(D / (a * P - c - R / k)), min_score_interval, max_interval),

the refresh interval first (as if both kinds of work shared one interval), then the smallest score
interval the room left at that ``k`` allows. Until a closed-form call has been measured ``c`` is
taken as 0, and where the closed-form calls measured no cheaper (``c >= c_m``, only possible while
``c`` is stale) ``D`` is ``c_m``: with ``s = 1`` no closed-form call would run again to correct it.

Medians, not averages: the time between two calls also holds whatever the loop does besides
training steps now and then (an evaluation pass, a checkpoint, logging, a slow batch from the
loader). One such gap in an average inflates ``P`` for many iterations, so the budget would allow
more validation work than it should; the median of recent iterations ignores it.

The schedule then depends on measured time, so a run with a budget is not bit-reproducible across
runs, machines or resumes (``budget=None`` is; ``stats`` reports the intervals chosen, which
``Schedule(refresh_every=..., model_scores_every=..., budget=None)`` can then fix). In a process group the processes average their
measurements at each refresh, inside the refresh's collectives, so they all choose the same ``k``.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional

from .errors import ConfigurationError
from .options import is_integer, is_real

__all__ = ["OverheadBudget", "HEADROOM"]

#: The share of the budget the controller leaves unplanned (see the module docstring).
HEADROOM = 0.25


class OverheadBudget:
    """Chooses the refresh interval from measured times (see the module docstring).

    ``fraction``: the refiner's allowed share of a plain training step (0.1: at most 10 % on top).
    ``headroom``: the share of ``fraction`` left unplanned (the controller plans for
    ``(1 - headroom) * fraction``). ``clock``: a function returning seconds (tests pass a fake one). ``window``: how many recent
    measurements of each kind the medians are taken over. ``model_scores``: also choose
    ``score_interval``, the calls between model score passes (at least ``min_score_interval``).
    """

    def __init__(self, fraction: float, *, min_interval: int = 1, max_interval: int = 1024,
                 window: int = 16, clock: Callable[[], float] = time.perf_counter, model_scores: bool = False,
                 min_score_interval: int = 1, headroom: float = HEADROOM):
        if not is_real(fraction) or not fraction > 0:
            raise ConfigurationError(f"budget must be a positive fraction of a training step, got {fraction!r}",
                                     "use e.g. budget=0.1 (10 % on top of a plain step), or None for a fixed schedule")
        if not is_integer(window) or window < 1:
            raise ConfigurationError(f"the budget's window must be a positive number of measurements, got {window!r}",
                                     "use e.g. window=16")
        if not is_real(headroom) or not 0 <= headroom < 1:
            raise ConfigurationError(f"the budget's headroom must be in [0, 1), got {headroom!r}",
                                     "use e.g. headroom=0.25 (plan for three quarters of the budget)")
        self.fraction = float(fraction)
        self.headroom = float(headroom)
        self.min_interval, self.max_interval = int(min_interval), int(max_interval)
        self.window, self.clock = int(window), clock
        self.interval = int(min_interval)
        #: whether the last choice found the call alone above the budget itself (``c >= b * P``)
        self.call_over_budget = False
        #: whether the budget also spaces out model score passes (``score_interval``)
        self.model_scores = bool(model_scores)
        self.min_score_interval = int(min_score_interval)
        self.score_interval = int(min_score_interval)
        self._model_call: Deque[float] = deque(maxlen=window)   # c_m
        self._rebuild_call: Deque[float] = deque(maxlen=window)  # c_r
        #: updates between refreshes that only rebuild the direction from a window (the core uses it
        #: where its window rebuilds; at least ``min_interval``)
        self.rebuild_interval = int(min_interval)
        self._plain: Deque[float] = deque(maxlen=window)     # P
        self._call: Deque[float] = deque(maxlen=window)      # c
        self._refresh: Deque[float] = deque(maxlen=window)   # R
        self._last_start: Optional[float] = None
        self._last_own: Optional[float] = None
        self._pending_plain: Optional[float] = None

    @staticmethod
    def _median(values: Deque[float]) -> Optional[float]:
        return statistics.median(values) if values else None

    @property
    def plain(self) -> Optional[float]:
        """``P``: the median plain part of recent iterations (seconds; None before one is measured)."""
        return self._median(self._plain)

    @property
    def call(self) -> Optional[float]:
        """``c``: the median own time of recent calls without a refresh."""
        return self._median(self._call)

    @property
    def refresh(self) -> Optional[float]:
        """``R``: the median time of recent refreshes."""
        return self._median(self._refresh)

    @property
    def rebuild_call(self) -> Optional[float]:
        """``c_r``: the median own time of recent calls whose refresh only rebuilt the direction."""
        return self._median(self._rebuild_call)

    @property
    def model_call(self) -> Optional[float]:
        """``c_m``: the median own time (without a refresh) of recent calls that scored with the model."""
        return self._median(self._model_call)

    # ------------------------------------------------------------------ measurements
    def call_started(self) -> float:
        """Mark the start of a refiner call (the end of the previous iteration); returns the time."""
        now = self.clock()
        # the plain part of the iteration that ends here; kept when this call succeeds (a rejected
        # call changes no measurement, and the next call measures from the last successful one)
        self._pending_plain = (max(now - self._last_start - self._last_own, 0.0)
                               if self._last_start is not None and self._last_own is not None else None)
        return now

    def call_finished(self, started: float, refresh_seconds: Optional[float], model_scored: bool = False,
                      own: Optional[float] = None, rebuilt: bool = False) -> None:
        """Record the call's own time, and the refresh's when it refreshed. ``model_scored``: the call
        scored with a model pass (recorded apart from the closed-form calls when ``model_scores``).
        ``own``: the call's own time when measured otherwise (on a GPU, by device events); default
        the clock's time since ``started``. ``rebuilt``: the call's refresh only rebuilt the direction
        from the window (recorded as ``c_r``, apart from the other kinds)."""
        own = self.clock() - started if own is None else float(own)
        if self._pending_plain is not None:
            self._plain.append(self._pending_plain)
            self._pending_plain = None
        self._last_start, self._last_own = started, own
        if rebuilt:
            self._rebuild_call.append(own)
            return
        if self.model_scores and model_scored:
            self._model_call.append(max(own - (refresh_seconds or 0.0), 0.0))
            if refresh_seconds is not None:
                self._refresh.append(refresh_seconds)
            return
        if refresh_seconds is None:
            self._call.append(own)
        else:
            self._refresh.append(refresh_seconds)
            if not self._call:  # until a call without a refresh is measured: the rest of this one
                self._call.append(max(own - refresh_seconds, 0.0))

    # ------------------------------------------------------------------ the decision
    def measurements(self):
        """``(P, c, R)`` or None until each has been measured once; with ``model_scores``
        ``(P, c, R, c_m)``, ``c`` taken as 0 until a closed-form call has been measured."""
        if self.model_scores:
            if self.plain is None or self.refresh is None or self.model_call is None:
                return None
            return self.plain, self.call if self.call is not None else 0.0, self.refresh, self.model_call
        if self.plain is None or self.call is None or self.refresh is None:
            return None
        return self.plain, self.call, self.refresh

    @staticmethod
    def _score_extra(c: float, c_m: float) -> float:
        """``D``, what a model score pass adds to a call: ``c_m - c``, or ``c_m`` itself when the
        closed-form calls measured no cheaper. A closed-form call does part of a model-scored call's
        work, so ``c >= c_m`` means ``c`` is stale (measured while the caches were cold); taking it
        at face value would choose a model pass every call, after which no closed-form call would
        ever measure ``c`` again."""
        return c_m - c if c_m > c else c_m

    def _clip(self, k: float, low: int) -> int:
        return int(min(max(k, low), self.max_interval))

    def choose(self, measured=None, rebuild_call: Optional[float] = None) -> int:
        """The refresh interval (and with ``model_scores`` the score interval, with a measured
        ``rebuild_call`` the rebuild interval) for the measurements ``(P, c, R)`` or ``(P, c, R, c_m)``
        (default: this process's); returns the refresh interval.

        A rebuild (``c_r``) is the second kind of work as a model score pass is: ``E = c_r - c`` per
        rebuild, rebuilds every ``j`` updates, ``c + E / j + R / k <= a * P`` (``a`` the planned share,
        ``(1 - headroom) * fraction``), ``k`` first, then the least ``j`` the room left allows."""
        if measured is None:
            measured = self.measurements()
            rebuild_call = self.rebuild_call if rebuild_call is None else rebuild_call
        if measured is None:
            return self.interval
        plain, c, r = measured[:3]
        extra = self._score_extra(c, measured[3]) if self.model_scores else 0.0   # D
        rebuild = self._score_extra(c, rebuild_call) if rebuild_call is not None else 0.0   # E
        room = (1.0 - self.headroom) * self.fraction * plain - c
        self.call_over_budget = c >= self.fraction * plain
        k = self.max_interval if room <= 0 else math.ceil((extra + rebuild + r) / room)
        self.interval = self._clip(k, self.min_interval)
        left = room - r / self.interval
        if self.model_scores:
            s = 1 if extra <= 0 else self.max_interval if left <= 0 else math.ceil(extra / left)
            self.score_interval = self._clip(s, self.min_score_interval)
        j = 1 if rebuild <= 0 else self.max_interval if left <= 0 else math.ceil(rebuild / left)
        self.rebuild_interval = self._clip(j, self.min_interval)
        return self.interval

    def overhead(self) -> float:
        """The refiner's measured share of a plain iteration at the current intervals (NaN before)."""
        m = self.measurements()
        if m is None:
            return float("nan")
        plain, c, r = m[:3]
        extra = self._score_extra(c, m[3]) / max(self.score_interval, 1) if self.model_scores else 0.0
        if self.rebuild_call is not None:
            extra += self._score_extra(c, self.rebuild_call) / max(self.rebuild_interval, 1)
        return (c + extra + r / max(self.interval, 1)) / max(plain, 1e-12)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The intervals and the medians (a loaded state starts each window from its median)."""
        return {"interval": self.interval, "plain": self.plain, "call": self.call, "refresh": self.refresh,
                "score_interval": self.score_interval, "model_call": self.model_call,
                "rebuild_interval": self.rebuild_interval, "rebuild_call": self.rebuild_call}

    @staticmethod
    def check_state(state: Any) -> None:
        """Raise unless ``state`` is an intact budget state (one saved before the score interval or
        the rebuild interval existed, without their two keys each, is accepted)."""
        base = {"interval", "plain", "call", "refresh"}
        scores = base | {"score_interval", "model_call"}
        if not isinstance(state, dict) or set(state) not in (base, scores, scores | {"rebuild_interval", "rebuild_call"}):
            raise ConfigurationError("the budget state has the wrong keys", "load a state saved by this refiner")
        for k in ("interval", "score_interval", "rebuild_interval"):
            v = state.get(k, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigurationError(f"the budget state's {k} is {v!r}", "load an intact checkpoint")
        for k in ("plain", "call", "refresh", "model_call", "rebuild_call"):
            if k not in state:
                continue
            v = state[k]
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise ConfigurationError(f"the budget state's {k!r} is {v!r}", "load an intact checkpoint")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_state(state)
        self.interval = int(state["interval"])
        self.score_interval = int(state.get("score_interval", self.min_score_interval))
        self.rebuild_interval = int(state.get("rebuild_interval", self.min_interval))
        for window, value in ((self._plain, state["plain"]), (self._call, state["call"]),
                              (self._refresh, state["refresh"]), (self._model_call, state.get("model_call")),
                              (self._rebuild_call, state.get("rebuild_call"))):
            window.clear()
            if value is not None:
                window.append(float(value))
        self._last_start = self._last_own = self._pending_plain = None
