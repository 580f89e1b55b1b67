"""What counts as a number, an integer and a flag in a user's options (a leaf module).

Options come from code, from config files and from hyper-parameter sweeps, so numpy scalars
(``np.int64(4)``, ``np.float32(0.5)``, ``np.bool_(True)``) are accepted wherever the Python type
is; bools are not numbers here, and strings are never coerced (``"false"`` is not False).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List

import numpy as np

__all__ = ["is_real", "is_integer", "is_flag", "option_fields"]


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


_OPEN, _CLOSE = "([{", ")]}"


def _top_level_parts(text: str) -> List[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote is not None:
            quote = None if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def option_fields(text: str, prefix: str = "") -> Dict[str, str]:
    """The options a ``Name(key=value, ...)`` repr lists, as ``{key: value}`` strings; an option whose
    value is itself such a repr gives its class name under its key and its own options under
    ``key.option`` (``method=SAflex(beta=inf)`` gives ``{"method": "SAflex", "method.beta": "inf"}``).
    A part without ``=`` is kept under its position (``"#0"``)."""
    _, sep, rest = text.partition("(")
    if not sep or not text.endswith(")"):
        return {}
    fields: Dict[str, str] = {}
    for i, part in enumerate(_top_level_parts(rest[:-1])):
        key, eq, value = part.partition("=")
        if not eq or not key.strip().isidentifier():
            key, value = f"#{i}", part
        key, value = prefix + key.strip(), value.strip()
        nested = option_fields(value, key + ".")
        if nested:
            fields[key] = value.partition("(")[0]
            fields.update(nested)
        else:
            fields[key] = value
    return fields
