"""Finiteness of nested tensor structures (a leaf module: imports nothing from the package)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterable, List

import torch

__all__ = ["tensor_leaves", "nonfinite"]


def tensor_leaves(x) -> Iterable[torch.Tensor]:
    """The tensors in ``x``: a tensor, or tuples/lists/mappings of them (other leaves are ignored)."""
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (tuple, list)):
        for t in x:
            yield from tensor_leaves(t)
    elif isinstance(x, Mapping):
        for t in x.values():
            yield from tensor_leaves(t)


def nonfinite(*values) -> bool:
    """Whether any floating-point tensor in ``values`` (tensors, or tuples/lists/dicts of them) holds
    NaN or inf. The per-tensor answers are gathered on each tensor's device and read back once per
    device (on a GPU: one sync, however many tensors)."""
    flags: Dict[torch.device, List[torch.Tensor]] = {}
    for v in values:
        for t in tensor_leaves(v):
            if t.is_floating_point():
                flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return any(not bool(torch.stack(f).all()) for f in flags.values())
