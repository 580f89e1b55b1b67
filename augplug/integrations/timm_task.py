"""A ``timm.task`` training task whose loss is an :class:`augplug.AugmentationRefiner`.

timm (1.0.23 and later) runs its training loop through a task: ``result = task(input, target)``,
``result["loss"].backward()``. :class:`RefinedClassificationTask` is timm's
``ClassificationTask`` with the refiner as its criterion, so the loop, Mixup/CutMix soft targets,
AMP, gradient accumulation, EMA and ``torch.compile`` stay timm's:

    from augplug.integrations.timm_task import RefinedClassificationTask

    optimizer = create_optimizer_v2(model, ...)
    refiner = augplug.AugmentationRefiner(model, optimizer, loader_holdout)
    task = RefinedClassificationTask(model, refiner, device=device)
    ...
    loss = task(input, target)["loss"]           # = refiner(model(input), target)

The refiner's state travels with the task. With timm 1.0.27 and later it is the task state that
timm's own ``CheckpointSaver(task=task)`` writes under ``"task_state"`` and
``resume_task_checkpoint(task, path)`` restores, so checkpoints and resumes need no extra code; on
every version it is also in ``task.state_dict()`` (as the module's extra state).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

import timm

from augplug.errors import ConfigurationError

__all__ = ["MIN_TIMM", "TimmVersionError", "RefinedClassificationTask"]

_logger = logging.getLogger(__name__)

#: the first timm release with ``timm.task``
MIN_TIMM = "1.0.23"


class TimmVersionError(ConfigurationError, ImportError):
    """The installed timm is older than this integration needs. A :class:`ConfigurationError` (with
    ``problem`` and ``fix``) and an ``ImportError``, so optional imports can skip on it."""


try:
    from timm.task import ClassificationTask
except ImportError as e:  # timm < 1.0.23
    raise TimmVersionError(
        f"augplug.integrations.timm_task subclasses timm.task.ClassificationTask, which timm "
        f"{getattr(timm, '__version__', '?')} does not have (it came with timm {MIN_TIMM})",
        f"pip install -U \"timm>={MIN_TIMM}\"") from e


def _unwrap(module: nn.Module) -> nn.Module:
    # DDP / DataParallel (.module) and torch.compile (._orig_mod) wrappers
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


class RefinedClassificationTask(ClassificationTask):
    """timm's ``ClassificationTask`` with ``loss = refiner(model(input), target, **kwargs)``.

    Args:
        model: the model being trained (the one the refiner was built on).
        refiner: an :class:`augplug.AugmentationRefiner` over ``model`` and its optimizer; it is the
            task's ``criterion``. It accepts class indices ``(B,)`` or the ``(B, C)`` soft targets
            of timm's Mixup/CutMix and label smoothing.
        stateful: other objects with ``state_dict()`` / ``load_state_dict()`` (an
            :class:`~augplug.report.AugmentationAudit`, a :class:`~augplug.sources.BatchMixer`)
            checkpointed with the refiner under their names.
        device, dtype, verbose: as for timm's tasks.

    ``task(input, target, **kwargs)`` returns ``{"loss", "output"}``; extra keyword arguments go
    to the refiner (``index=``, ``num_original=``, ``augmented=``). The last step's diagnostics
    are in ``task.refiner.stats``. The EMA copy (``setup_ema``) holds weights only: the refiner
    belongs to the trained model, so EMA checkpoints carry no refiner state.
    """

    def __init__(self, model: nn.Module, refiner, *, stateful: Optional[Mapping[str, Any]] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, verbose: bool = True):
        self._check_refiner(model, refiner)
        stateful = dict(stateful or {})
        for name, obj in stateful.items():
            if name == "refiner" or not (callable(getattr(obj, "state_dict", None))
                                         and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigurationError(
                    f"stateful[{name!r}] must be an object with state_dict() and load_state_dict() under a name "
                    f"other than 'refiner', got {type(obj).__name__}",
                    "pass only checkpointable objects (an AugmentationAudit, a BatchMixer, ...)")
        super().__init__(model, criterion=refiner, device=device, dtype=dtype, verbose=verbose)
        self.stateful = stateful

    @staticmethod
    def _check_refiner(model: nn.Module, refiner) -> None:
        if not (callable(refiner) and callable(getattr(refiner, "state_dict", None))
                and callable(getattr(refiner, "load_state_dict", None)) and hasattr(refiner, "model")):
            raise ConfigurationError(
                f"refiner must be an augplug.AugmentationRefiner, got {type(refiner).__name__}",
                "build one with augplug.AugmentationRefiner(model, optimizer, val_loader); for a plain "
                "loss use timm.task.ClassificationTask(model, criterion=...)")
        if _unwrap(refiner.model) is not _unwrap(model):
            raise ConfigurationError(
                "the refiner was built on a different model than the task trains, so it would see none of "
                "this task's forwards",
                "build the refiner on the same model: AugmentationRefiner(model, optimizer, val_loader)")

    @property
    def refiner(self):
        """The refiner (the task's criterion)."""
        return self.criterion

    def _trained_module(self) -> nn.Module:
        # timm >= 1.0.27 keeps the model as ``trainable_module``; 1.0.23 - 1.0.26 as ``model``
        if hasattr(self, "trainable_module"):
            return self.trainable_module
        return self.model

    def forward(self, input: torch.Tensor, target: torch.Tensor, **refiner_kwargs) -> Dict[str, torch.Tensor]:
        """Forward ``input`` and return ``{"loss": refiner(output, target, **refiner_kwargs), "output": output}``."""
        output = self._trained_module()(input)
        loss = self.criterion(output, target, **refiner_kwargs)
        return {"loss": loss, "output": output}

    # ------------------------------------------------------------------ state
    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """``{"refiner": refiner.state_dict(), <name>: ...}``; empty for the EMA copy."""
        if ema:
            return {}
        return {"refiner": self.criterion.state_dict(), **{k: v.state_dict() for k, v in self.stateful.items()}}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        """Restore :meth:`get_task_state`. A checkpoint without task state (a plain timm one)
        leaves the refiner as built, with a warning, as timm's own tasks do."""
        if ema:
            return
        if not state:
            _logger.warning("the checkpoint holds no refiner state: the refiner starts fresh (its validation "
                            "direction, refresh schedule and random stream), so the run does not continue exactly")
            return
        missing = [k for k in ("refiner", *self.stateful) if k not in state]
        if missing and strict:
            raise ConfigurationError(
                f"the checkpoint's task state lacks {missing} (it has {sorted(state)})",
                "resume with the same refiner and stateful objects that wrote it, or load with strict=False")
        if "refiner" in state:
            self.criterion.load_state_dict(state["refiner"])
        for name, obj in self.stateful.items():
            if name in state:
                obj.load_state_dict(state[name])

    def get_extra_state(self) -> Dict[str, Any]:
        """The task state, so that ``task.state_dict()`` holds the refiner's state too."""
        return self.get_task_state()

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.load_task_state(state)
