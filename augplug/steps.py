"""Counting real optimizer updates.

A refiner's schedule (refresh interval, warm-up, AutoDO's hyper-steps) runs on optimizer updates, not
on calls. Counting post-step hooks is fragile: torch wraps ``step`` of every optimizer class that has
an instance, so a subclass whose ``step`` calls ``super().step()`` fires the hooks twice; an exception
in another post-step hook skips ours although the parameters were updated.

:class:`StepCounter` wraps the optimizer *instance's* ``step`` instead (as torch's LR schedulers do),
so it sees each call from outside exactly once, whatever the class hierarchy does inside:

- a call that returns counts as one update (a subclass calling ``super().step()`` runs inside it);
- a call that raises counts only if it wrote something before raising: the version counters of the
  parameters and of the optimizer's state tensors (every in-place write bumps a tensor's
  ``_version``), and the number of state tensors, are compared with their values at the start;
  one that wrote nothing is counted as ``failed`` (the adaptive share drops what it gathered for
  that update);
- an AMP step skipped by the grad scaler never calls ``step`` and is not counted; wrappers
  (Accelerate, timm's Lookahead) call the inner optimizer's ``step`` once per real update;
- inside a ``step`` (a closure that calls the refiner, as LBFGS does) the count is the number of
  completed steps.
"""
from __future__ import annotations

import types
from typing import Tuple

import torch

__all__ = ["StepCounter"]


def _fingerprint(optimizer) -> Tuple[int, int, int]:
    params = sum(p._version for group in optimizer.param_groups for p in group["params"])
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return params, sum(t._version for t in state), len(state)


class StepCounter:
    """Counts the parameter updates of ``optimizer`` (a ``torch.optim.Optimizer``)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.count = 0
        #: calls of ``step`` that raised before writing anything (no update happened)
        self.failed = 0
        #: True while the optimizer's step runs: a closure-driven optimizer (LBFGS) evaluates the loss,
        #: and so calls the refiner, inside its step, between updates of its own
        self.in_step = False
        self._active = True
        self._had_own_step = "step" in vars(optimizer)
        inner = optimizer.step
        counter = self

        def step(opt, *args, **kwargs):
            if not counter._active:
                return inner(*args, **kwargs)
            before = _fingerprint(opt)
            counter.in_step = True
            try:
                out = inner(*args, **kwargs)
            except BaseException:
                if _fingerprint(opt) != before:  # it wrote before failing: the update happened
                    counter.count += 1
                else:
                    counter.failed += 1
                raise
            finally:
                counter.in_step = False
            counter.count += 1
            return out

        if getattr(inner, "_wrapped_by_lr_sched", False):
            # an LR scheduler wrapped step before us; it checks for its mark on every step
            step._wrapped_by_lr_sched = True
        self._inner = inner
        self._step = step
        optimizer.step = types.MethodType(step, optimizer)

    def remove(self) -> None:
        """Stop counting and give the optimizer its ``step`` back (when nobody wrapped it since)."""
        self._active = False
        current = vars(self.optimizer).get("step")
        if getattr(current, "__func__", None) is self._step:
            if self._had_own_step:
                self.optimizer.step = self._inner
            else:
                del self.optimizer.step
