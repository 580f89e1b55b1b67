"""Finiteness of nested tensor structures (a leaf module: imports nothing from the package)."""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["tensor_leaves", "nonfinite"]


def tensor_leaves(x) -> Iterable[torch.Tensor]:
    """The tensors in ``x``: a tensor, or tuples/lists/dicts of them (other leaves are ignored)."""
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (tuple, list)):
        for t in x:
            yield from tensor_leaves(t)
    elif isinstance(x, dict):
        for t in x.values():
            yield from tensor_leaves(t)


def nonfinite(*values) -> bool:
    """Whether any floating-point tensor in ``values`` (tensors, or tuples/lists/dicts of them) holds
    NaN or inf. Reads one value per tensor back to the host."""
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all())
               for v in values for t in tensor_leaves(v))
