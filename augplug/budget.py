"""An overhead budget: the refiner times its own work against the training step and spaces its
validation refreshes so that its share of the step stays within the budget.

Measured (running medians of the last ``window`` measurements): ``P`` the plain part of an iteration
(the time from one refiner call's start to the next, minus the first call's own time), ``c`` the
refiner's own time in a call without a refresh, and ``R`` the time of a refresh (validation reads and
gradients). With refreshes every ``k`` updates the refiner costs ``c + R / k`` per iteration; the
budget ``b`` asks for ``c + R / k <= b * P``, so

    k = ceil(R / (b * P - c)),   clipped to [refresh_every of the schedule, max_interval].

When ``c`` alone exceeds ``b * P`` (a full-model score pass costs more than the budget) ``k`` goes to
``max_interval`` and ``stats["overhead"]`` reports the measured share above the budget.

Medians, not averages: the time between two calls also holds whatever the loop does besides
training steps now and then (an evaluation pass, a checkpoint, logging, a slow batch from the
loader). One such gap in an average inflates ``P`` for many iterations, so the budget would allow
more validation work than it should; the median of recent iterations ignores it.

The schedule then depends on measured time, so a run with a budget is not bit-reproducible across
machines or resumes (``budget=None`` is). In a process group the processes average their
measurements at each refresh, inside the refresh's collectives, so they all choose the same ``k``.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional

from .errors import ConfigurationError

__all__ = ["OverheadBudget"]


class OverheadBudget:
    """Chooses the refresh interval from measured times (see the module docstring).

    ``fraction``: the refiner's allowed share of a plain training step (0.1: at most 10 % on top).
    ``clock``: a function returning seconds (tests pass a fake one). ``window``: how many recent
    measurements of each kind the medians are taken over.
    """

    def __init__(self, fraction: float, *, min_interval: int = 1, max_interval: int = 1024,
                 window: int = 16, clock: Callable[[], float] = time.perf_counter):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not fraction > 0:
            raise ConfigurationError(f"budget must be a positive fraction of a training step, got {fraction!r}",
                                     "use e.g. budget=0.1 (10 % on top of a plain step), or None for a fixed schedule")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigurationError(f"the budget's window must be a positive number of measurements, got {window!r}",
                                     "use e.g. window=16")
        self.fraction = float(fraction)
        self.min_interval, self.max_interval = int(min_interval), int(max_interval)
        self.window, self.clock = window, clock
        self.interval = int(min_interval)
        self._plain: Deque[float] = deque(maxlen=window)     # P
        self._call: Deque[float] = deque(maxlen=window)      # c
        self._refresh: Deque[float] = deque(maxlen=window)   # R
        self._last_start: Optional[float] = None
        self._last_own: Optional[float] = None

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

    # ------------------------------------------------------------------ measurements
    def call_started(self) -> float:
        """Mark the start of a refiner call (the end of the previous iteration); returns the time."""
        now = self.clock()
        if self._last_start is not None and self._last_own is not None:
            self._plain.append(max(now - self._last_start - self._last_own, 0.0))
        self._last_start, self._last_own = now, None
        return now

    def call_finished(self, started: float, refresh_seconds: Optional[float]) -> None:
        """Record the call's own time, and the refresh's when it refreshed."""
        own = self.clock() - started
        self._last_own = own
        if refresh_seconds is None:
            self._call.append(own)
        else:
            self._refresh.append(refresh_seconds)
            if not self._call:  # until a call without a refresh is measured: the rest of this one
                self._call.append(max(own - refresh_seconds, 0.0))

    # ------------------------------------------------------------------ the decision
    def measurements(self):
        """``(P, c, R)`` or None until each has been measured once."""
        if self.plain is None or self.call is None or self.refresh is None:
            return None
        return self.plain, self.call, self.refresh

    def choose(self, measured=None) -> int:
        """The refresh interval for the measurements ``(P, c, R)`` (default: this process's)."""
        measured = measured if measured is not None else self.measurements()
        if measured is None:
            return self.interval
        plain, c, r = measured
        room = self.fraction * plain - c
        k = self.max_interval if room <= 0 else math.ceil(r / room)
        self.interval = int(min(max(k, self.min_interval), self.max_interval))
        return self.interval

    def overhead(self) -> float:
        """The refiner's measured share of a plain iteration at the current interval (NaN before)."""
        m = self.measurements()
        if m is None:
            return float("nan")
        plain, c, r = m
        return (c + r / max(self.interval, 1)) / max(plain, 1e-12)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The interval and the medians (a loaded state starts each window from its median)."""
        return {"interval": self.interval, "plain": self.plain, "call": self.call, "refresh": self.refresh}

    def check_state(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"interval", "plain", "call", "refresh"}:
            raise ConfigurationError("the budget state has the wrong keys", "load a state saved by this refiner")
        if not isinstance(state["interval"], int) or state["interval"] < 1:
            raise ConfigurationError(f"the budget state's interval is {state['interval']!r}", "load an intact checkpoint")
        for k in ("plain", "call", "refresh"):
            v = state[k]
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise ConfigurationError(f"the budget state's {k!r} is {v!r}", "load an intact checkpoint")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_state(state)
        self.interval = int(state["interval"])
        for window, value in ((self._plain, state["plain"]), (self._call, state["call"]),
                              (self._refresh, state["refresh"])):
            window.clear()
            if value is not None:
                window.append(float(value))
        self._last_start = self._last_own = None
