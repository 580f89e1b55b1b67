"""Multi-process reductions (Accelerate / torch.distributed), no-ops in a single process.

Accelerate starts its processes with an initialised ``torch.distributed`` process group, so the
helpers here work the same under ``accelerate launch``, ``torchrun`` and plain DDP. Every reduction
packs its tensors into one flat fp64 buffer and issues a single ``all_reduce``, so statistics
(sums, cross-products, counts) add up exactly as in one process up to fp64 rounding.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum_", "all_reduce_sum"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _reduce_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (CPU) reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place (one collective for the whole list)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or not is_distributed():
        return
    dev = _reduce_device(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t).to(t.device, t.dtype))
        offset += n


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Out-of-place :func:`all_reduce_sum_`: returns reduced copies."""
    out = [t.detach().clone() for t in tensors]
    all_reduce_sum_(out)
    return out
