"""What counts as a number, an integer and a flag in a user's options (a leaf module).

Options come from code, from config files and from hyper-parameter sweeps, so numpy scalars
(``np.int64(4)``, ``np.float32(0.5)``, ``np.bool_(True)``) are accepted wherever the Python type
is; bools are not numbers here, and strings are never coerced (``"false"`` is not False).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["is_real", "is_integer", "is_flag"]


def is_real(value: Any) -> bool:
    """A real number that is not NaN: an int or float (numpy's included), not a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    return is_integer(value) or not math.isnan(float(value))


def is_integer(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_flag(value: Any) -> bool:
    """True or False (Python's or numpy's bool)."""
    return isinstance(value, (bool, np.bool_))
