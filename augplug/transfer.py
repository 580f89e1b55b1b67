"""Host-to-device copies that do not make the host wait for the device.

A copy from ordinary (pageable) host memory to a GPU first waits for all work queued on the stream,
so a refiner call that moved a validation batch or a few random numbers that way would stall the
training loop once per copy. Copies from page-locked memory are queued like kernels; small host
tensors are therefore staged through PyTorch's cached pinned-memory pool first.

``accelerate.utils.send_to_device(..., non_blocking=True)`` does not pin, so from pageable memory its
copies wait for the stream; :func:`to_device` is kept for that (``tests/test_host_sync.py`` counts the
device syncs of a refiner call on CUDA).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

__all__ = ["to_device"]


def to_device(x: Any, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> Any:
    """``x`` (a tensor, or tuples/lists/dicts or other mappings of them; other leaves unchanged) on
    ``device``; with ``float_dtype``, its floating tensors in that dtype too (integer ones, such as
    uint8 images or token ids, keep theirs).

    CPU tensors headed for CUDA are pinned (when not already) and copied asynchronously; the pinned
    block stays reserved until the copy has run, so the source may be dropped at once.
    """
    if torch.is_tensor(x):
        if float_dtype is not None and x.is_floating_point() and x.dtype != float_dtype:
            x = to_device(x, device).to(float_dtype)
        if x.device == device:
            return x
        if device.type == "cuda" and x.device.type == "cpu":
            if not x.is_pinned():
                x = x.pin_memory()
            return x.to(device, non_blocking=True)
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device, float_dtype) for t in x)
    if isinstance(x, dict):
        return {k: to_device(t, device, float_dtype) for k, t in x.items()}
    if isinstance(x, Mapping):   # a tokenizer's BatchEncoding moves itself, keeping its type
        move = getattr(x, "to", None)
        return move(device) if callable(move) else {k: to_device(t, device, float_dtype) for k, t in x.items()}
    return x
