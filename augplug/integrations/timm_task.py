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

import copy
import logging
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional

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
        """Restore :meth:`get_task_state`, all or nothing: a part that does not fit (another refiner,
        an audit over another class count, a missing part under ``strict``) raises and leaves the
        refiner and every stateful object as they were. A checkpoint without task state (a plain timm
        one) leaves the refiner as built, with a warning, as timm's own tasks do."""
        if ema:
            return
        if not state:
            _logger.warning("the checkpoint holds no refiner state: the refiner starts fresh (its validation "
                            "direction, refresh schedule and random stream), so the run does not continue exactly")
            return
        if not isinstance(state, Mapping):
            raise ConfigurationError(f"the task state must be a dict of parts, got {type(state).__name__}",
                                     "pass what RefinedClassificationTask.get_task_state() returned")
        missing = [k for k in ("refiner", *self.stateful) if k not in state]
        if missing and strict:
            err = ConfigurationError(
                f"the checkpoint's task state lacks {missing} (it has {sorted(state)})",
                "resume with the same refiner and stateful objects that wrote it, or load with strict=False "
                "(the missing parts then keep their current state)")
            err.missing_parts = missing   # for callers that word the fix their own way (augplug-timm-train)
            raise err
        parts = [(name, obj, state[name], _state_check(obj)) for name, obj in self.stateful.items() if name in state]
        # 1. the stateful parts that can be checked without loading (audits, ...): a refusal changes nothing
        for _, _, part, check in parts:
            if check is not None:
                check(part)
        # 2. those that cannot: their current state is copied, then the new one loaded; the copies are
        #    put back if a later part refuses. 3. the refiner, which checks its whole state before it
        #    assigns any of it (so a refused one changed nothing of its own)
        undo = []
        try:
            for name, obj, part, check in parts:
                if check is None:
                    undo.append((name, obj, copy.deepcopy(obj.state_dict())))
                    obj.load_state_dict(part)
            if "refiner" in state:
                self.criterion.load_state_dict(state["refiner"])
        except BaseException:
            for name, obj, before in reversed(undo):
                try:
                    obj.load_state_dict(before)
                except Exception as restore_error:  # pragma: no cover - an object that refuses its own state
                    _logger.error("could not put back the state of stateful[%r] after a refused load: %s",
                                  name, restore_error)
            raise
        # 4. the parts checked in step 1
        for _, obj, part, check in parts:
            if check is not None:
                obj.load_state_dict(part)

    def load_checkpoint_state(self, state_dict: Dict[str, Any], task_state: Optional[Dict[str, Any]] = None,
                              ema: bool = False, strict: bool = True) -> None:
        """timm's checkpoint load (``resume_task_checkpoint``), with the task state first: a task state
        this task refuses raises before the model's weights are touched."""
        if ema:
            return super().load_checkpoint_state(state_dict, task_state, ema=ema, strict=strict)
        eval_model = self.get_eval_model()
        if eval_model is None:
            raise RuntimeError("Cannot load checkpoint state without an eval model.")
        self.load_task_state(task_state, strict=strict)
        _unwrap(eval_model).load_state_dict(state_dict, strict=strict)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; the task state (``"_extra_state"``) is loaded before the weights
        and refused as a whole (see :meth:`load_task_state`), so a refused one changes nothing. A state
        dict without it (a plain ``ClassificationTask``'s) loads the weights and leaves the refiner as
        built, with a warning, ``strict`` or not. The weights themselves load as in torch (a missing or
        mis-shaped weight is reported after the others were copied)."""
        if _EXTRA_STATE not in state_dict:
            with_none = OrderedDict(state_dict)
            metadata = getattr(state_dict, "_metadata", None)
            if metadata is not None:
                with_none._metadata = metadata
            with_none[_EXTRA_STATE] = None     # set_extra_state(None): the fresh-refiner warning
            state_dict = with_none
        self._loading_strict = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._loading_strict = True

    def get_extra_state(self) -> Dict[str, Any]:
        """The task state, so that ``task.state_dict()`` holds the refiner's state too."""
        return self.get_task_state()

    def set_extra_state(self, state: Optional[Dict[str, Any]]) -> None:
        self.load_task_state(state, strict=getattr(self, "_loading_strict", True))


_EXTRA_STATE = "_extra_state"   # nn.Module's key for get_extra_state() in a state dict


def _state_check(obj) -> Optional[Callable[[Any], Any]]:
    """A function that raises, changing nothing, when ``obj`` would refuse a state; None when ``obj``
    has none (its state is then loaded and put back if another part refuses)."""
    from augplug.report import AugmentationAudit

    if isinstance(obj, AugmentationAudit):   # SourceAudit too: parses the whole state before it uses any
        return partial(obj._parse_state, replacing=True)
    for name in ("check_state", "check_state_dict"):
        check = getattr(obj, name, None)
        if callable(check):
            return check
    return None
