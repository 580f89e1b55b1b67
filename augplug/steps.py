"""Counting real optimizer updates.

A refiner's schedule (refresh interval, warm-up, AutoDO's hyper-steps) runs on optimizer updates, not
on calls. Counting post-step hooks is fragile: torch wraps ``step`` of every optimizer class that has
an instance, so a subclass whose ``step`` calls ``super().step()`` fires the hooks twice; an exception
in another post-step hook skips ours although the parameters were updated; a step that raises before
touching anything must not count at all.

:class:`StepCounter` counts what actually happened instead. A pre-step hook records the version
counters of the optimizer's parameters (every in-place write, as an optimizer's update is, bumps a
tensor's ``_version``); the update is counted when the versions are next seen to differ: at the next
step's pre-hook or when the count is read. Hence:

- nested ``step`` calls of one update (a subclass calling ``super().step()``, wrappers) count once:
  the inner pre-hook sees the same versions as the outer one;
- a step that raises after writing the parameters (a failing post-step hook) still counts;
- a step that raises before writing anything, or that updates no parameter (an AMP step skipped by
  the grad scaler never reaches ``step`` at all), does not count.

Known limit: an in-place write to a parameter outside the optimizer (``with torch.no_grad():
p.clamp_(...)``) between a step that wrote nothing and the next read counts as that step's update.
Writes through ``p.data`` do not bump the version and are not seen.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["StepCounter"]


class StepCounter:
    """Counts the real parameter updates of ``optimizer`` (a ``torch.optim.Optimizer``)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._count = 0
        self._open: Optional[int] = None  # parameter versions when the pending step began
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    def _versions(self) -> int:
        return sum(p._version for group in self.optimizer.param_groups for p in group["params"])

    def _before_step(self, optimizer, args, kwargs) -> None:
        now = self._versions()
        if self._open is not None:
            if now == self._open:  # a nested call of the same update, or a retry after a step that wrote nothing
                return
            self._count += 1
        self._open = now

    def _settle(self) -> None:
        if self._open is not None and self._versions() != self._open:
            self._count += 1
            self._open = None

    @property
    def count(self) -> int:
        """Updates so far (a step still running, e.g. one whose closure calls the refiner, is not counted)."""
        self._settle()
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._settle()
        self._count = int(value)

    def remove(self) -> None:
        """Detach the hook (a pending update is counted first)."""
        self._settle()
        self._open = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
