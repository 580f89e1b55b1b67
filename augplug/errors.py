"""Typed errors, and warnings attributed to the user's call (a leaf module: it imports nothing from
the package).

Every error augplug raises derives from :class:`AugplugError` and carries two strings: ``problem``
(what is wrong) and ``fix`` (what to do about it). Each also derives from the closest built-in
exception (``ValueError``, ``TypeError``, ...) so existing ``except`` clauses keep working.

A call that raises one of these errors leaves the refiner's state exactly as it was.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import List

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


__all__ = [
    "AugplugError",
    "ConfigurationError",
    "UnsupportedHeadError",
    "UnsupportedModelError",
    "TargetError",
    "ClassCountMismatchError",
    "ShapeError",
    "NonFiniteError",
    "EmptyValidationError",
    "ModelModeError",
    "PeerBatchError",
    "ValidationFailed",
    "warn_at_caller",
]


def warn_at_caller(message: str) -> None:
    """A ``RuntimeWarning`` attributed to the first frame outside augplug's modules (the user's
    call), however deep in the refiner the condition was found. Integration scripts, which are in
    the package's ``integrations`` folder, count as callers."""
    level, frame = 2, sys._getframe(1)   # stacklevel 2 is the frame that called this function
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_PACKAGE_DIR + os.sep) or os.sep + "integrations" + os.sep in path:
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


class AugplugError(Exception):
    """Base class: ``problem`` says what is wrong, ``fix`` what to do about it."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(problem + (f"\n  fix: {fix}" if fix else ""))


class ConfigurationError(AugplugError, ValueError):
    """An option or a combination of options is invalid."""


class UnsupportedHeadError(AugplugError, TypeError):
    """The classifier head cannot be used in last-layer mode (not a linear map, a tuple, missing)."""


class UnsupportedModelError(AugplugError, TypeError):
    """The model cannot be differentiated the way the chosen mode needs."""


class TargetError(AugplugError, ValueError):
    """Targets have the wrong dtype, shape, range, or are not probabilities."""


class ClassCountMismatchError(TargetError):
    """Training logits and validation targets disagree on the number of classes."""


class ShapeError(AugplugError, ValueError):
    """Tensors have incompatible shapes."""


class NonFiniteError(AugplugError, FloatingPointError):
    """A tensor that must be finite holds NaN or inf."""


class EmptyValidationError(AugplugError, ValueError):
    """The validation loader yields no samples."""


class ModelModeError(AugplugError, RuntimeError):
    """The model is in the wrong mode (for example left in eval mode during training)."""


class PeerBatchError(AugplugError, ValueError):
    """In a process group: another process's batch was rejected, so every process rejects the step
    (each process's own error names its own problem)."""


class ValidationFailed(AugplugError, ValueError):
    """Raised by ``validate(..., strict=True)``: holds every problem found in ``problems``."""

    def __init__(self, problems: List[AugplugError]):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) found:"]
        for i, p in enumerate(self.problems, 1):
            lines.append(f"  {i}. [{type(p).__name__}] {p.problem}")
            if p.fix:
                lines.append(f"     fix: {p.fix}")
        super().__init__("\n".join(lines), "")
