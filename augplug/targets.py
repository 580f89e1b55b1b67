"""Targets: normalize class indices / one-hot / Mixup-CutMix soft targets, and soft-target losses.

All losses are computed in fp32 from ``log_softmax`` of the logits, whatever the logits' dtype.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .errors import ClassCountMismatchError, ConfigurationError, NonFiniteError, ShapeError, TargetError
from .finite import tensor_leaves

__all__ = ["check_logits", "check_target_structure", "check_row_tensor", "to_soft_targets", "value_problems",
           "soft_cross_entropy", "weighted_soft_ce"]

_PROB_TOL = 1e-3


def _no_meta(t: torch.Tensor, what: str) -> None:
    """A :class:`ShapeError` for a tensor on the meta device (shapes without values)."""
    if t.device.type == "meta":
        raise ShapeError(f"the {what} are on the meta device: they have a shape but no values",
                         "pass tensors with values (a model materialized with to_empty() and loaded weights, "
                         "not one built under torch.device('meta'))")


def check_logits(logits: torch.Tensor, *, values: bool = True) -> None:
    """Raise a typed error unless ``logits`` is a finite floating (B, C) tensor with C >= 2.

    ``values=False`` checks type and shape only (no look at the values, so no device sync).
    """
    if not isinstance(logits, torch.Tensor):
        raise ShapeError(f"logits must be a torch.Tensor, got {type(logits).__name__}",
                         "pass the model's output tensor (for dict/tuple outputs, pass the logits entry)")
    _no_meta(logits, "logits")
    if logits.dim() != 2:
        shape = tuple(logits.shape)
        if logits.dim() < 2:
            fix = ("a binary task needs two logits per sample, (batch, 2), with class-index targets: "
                   "e.g. torch.stack([torch.zeros_like(z), z], 1) turns one logit z into two")
        elif all(d == 1 for d in shape[2:]):
            fix = f"drop the trailing size-1 dimensions: logits.reshape({shape[0]}, {shape[1]})"
        else:
            fix = ("one row per classified sample: for per-token or per-pixel logits move the class dimension "
                   "last and flatten the rest, e.g. logits.movedim(1, -1).flatten(0, -2), with matching targets")
        raise ShapeError(f"logits must have shape (batch, classes), got {shape}", fix)
    if not logits.is_floating_point():
        raise TargetError(f"logits must be floating point, got {logits.dtype}",
                          "pass the raw model outputs, not predicted class indices")
    if logits.shape[1] < 2:
        raise ShapeError(f"logits need at least 2 classes, got {logits.shape[1]}",
                         "a binary task needs two logits per sample, (batch, 2), with class-index targets: "
                         "e.g. torch.cat([torch.zeros_like(z), z], 1) turns one logit column z into two")
    if not values:
        return
    finite = torch.isfinite(logits.detach())
    if not bool(finite.all()):
        bad = (~finite).any(dim=1).nonzero().flatten().tolist()
        raise NonFiniteError(
            f"logits contain NaN/inf in {len(bad)} sample(s) (rows {bad[:8]}{'...' if len(bad) > 8 else ''})",
            "lower the learning rate, enable gradient clipping, or check the inputs; "
            "under fp16 use a GradScaler")


def check_target_structure(targets: torch.Tensor, num_classes: int, *, batch_size: Optional[int] = None,
                           what: str = "targets") -> None:
    """Raise a typed error unless ``targets`` has a type and shape :func:`to_soft_targets` accepts
    (class indices ``(B,)`` of an integer dtype, or floating ``(B, C)``). Looks at no values."""
    if not isinstance(targets, torch.Tensor):
        raise TargetError(f"{what} must be a torch.Tensor, got {type(targets).__name__}",
                          "pass a tensor of class indices (B,) or probabilities (B, C)")
    _no_meta(targets, what)
    if batch_size is not None and (targets.dim() == 0 or targets.shape[0] != batch_size):
        raise ShapeError(
            f"{what} have {targets.shape[0] if targets.dim() else 'no'} rows but logits have {batch_size}",
            "pass one target per logits row (after Mixup/CutMix pass the mixed targets)")
    if targets.dim() == 1 and not targets.is_floating_point() and targets.dtype != torch.bool:
        return
    if targets.dim() == 1 and targets.is_floating_point():
        raise TargetError(f"{what} are a 1-D floating tensor",
                          "pass class indices as an integer tensor (targets.long()) or probabilities (B, C)")
    if targets.dim() == 2 and targets.is_floating_point():
        if targets.shape[1] != num_classes:
            err = ClassCountMismatchError if what.startswith("validation") else ShapeError
            raise err(f"{what} have {targets.shape[1]} columns but there are {num_classes} classes",
                      "make the soft targets' width equal the classifier's number of outputs")
        return
    raise TargetError(
        f"{what} must be class indices (B,) or probabilities (B, C); got shape {tuple(targets.shape)} dtype {targets.dtype}",
        "pass labels as a LongTensor of shape (B,) or a float tensor of shape (B, C)")


def check_row_tensor(t, batch_size: int, name: str, *, integer: bool = False, width: Optional[int] = None) -> None:
    """Raise :class:`ShapeError` unless ``t`` is a tensor with one row per sample of the batch.

    ``integer=True``: a ``(B,)`` tensor of an integer dtype (ids, dataset positions). Otherwise a
    floating ``(B, ...)`` tensor whose rows flatten to ``width`` values when ``width`` is given (the
    classifier's input size). Looks at no values."""
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name}= must be a torch.Tensor, got {type(t).__name__}", f"pass {name} as a tensor")
    _no_meta(t, f"{name}=")
    if integer:
        if t.dim() != 1 or t.shape[0] != batch_size or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ShapeError(f"{name}= must be an integer tensor of shape ({batch_size},), got {t.dtype} "
                             f"{tuple(t.shape)}", f"pass one integer {name} id per row of the batch (e.g. .long())")
        return
    if t.dim() < 2 or t.shape[0] != batch_size or not t.is_floating_point():
        raise ShapeError(f"{name}= must be a floating tensor of shape ({batch_size}, ...), got {t.dtype} {tuple(t.shape)}",
                         "pass the classifier's inputs for the batch's rows, one row each")
    flat = t[0].numel() if batch_size else 0
    if width is not None and batch_size and flat != width:
        raise ShapeError(f"{name}= rows have {flat} values but the classifier takes {width} inputs",
                         "pass what the classifier head receives (its input, flattened per row)")


def to_soft_targets(
    targets: torch.Tensor,
    num_classes: int,
    *,
    batch_size: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    what: str = "targets",
    check_values: bool = True,
) -> torch.Tensor:
    """Return targets as a ``(B, C)`` fp32 probability matrix.

    Accepts class indices of shape ``(B,)`` (any integer dtype) or probabilities of shape
    ``(B, C)`` (one-hot, label smoothing, Mixup/CutMix). Raises :class:`TargetError` (or a subclass)
    naming the problem otherwise. ``check_values=False`` skips the checks of the values (labels in
    range, finite probabilities), for callers that check them with :func:`value_problems` before
    using the result: out-of-range labels are then clamped into range (no out-of-bounds index, no
    device assert on CUDA), and NaN passes through.
    """
    check_target_structure(targets, num_classes, batch_size=batch_size, what=what)
    if targets.dim() == 1:
        if check_values and targets.numel():
            lo, hi = torch.stack(torch.aminmax(targets)).tolist()  # one device sync
            if lo < 0 or hi >= num_classes:
                err = ClassCountMismatchError if hi >= num_classes and what.startswith("validation") else TargetError
                raise err(
                    f"{what} contain labels in [{lo}, {hi}] but there are {num_classes} classes "
                    f"(valid: 0..{num_classes - 1})",
                    "check the label encoding and the classifier's number of outputs; "
                    "ignore_index-style labels (e.g. -100) are not supported: drop those samples")
        # zeros + scatter rather than F.one_hot, which on the CPU checks the labels' range again
        # with two reductions and two host reads; unchecked labels are clamped into range, so a bad
        # one cannot index out of bounds (a device assert on CUDA) before the caller's check reads it
        index = targets.long() if check_values else targets.long().clamp(0, num_classes - 1)
        index = index.unsqueeze(1)
        return torch.zeros(targets.shape[0], num_classes, dtype=dtype, device=targets.device).scatter_(1, index, 1.0)
    t = targets.detach().to(dtype)
    if check_values:
        non_finite, not_prob = _soft_target_flags(t, _prob_tolerance(targets.dtype)).tolist()  # one device sync
        if non_finite:
            raise NonFiniteError(f"{what} contain NaN/inf", "check the target pipeline (Mixup lambda, smoothing)")
        if not_prob:
            raise TargetError(f"{what} (B, C) must be probabilities: non-negative rows summing to 1",
                              "apply softmax to logits-like targets, or pass class indices; multi-label "
                              "(multi-hot) targets are not supported: augplug refines single-label "
                              "classification")
    return t.clamp_min(0)


def _prob_tolerance(dtype: torch.dtype) -> float:
    """How far soft targets stored in ``dtype`` may be from probabilities: ``_PROB_TOL``, or two
    units of rounding of the dtype where that is coarser (bf16 rounds each entry by up to 0.4 %, so
    a Mixup row that sums to 1 in fp32 may sum to 1 +- 0.004 after the cast)."""
    return max(_PROB_TOL, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else _PROB_TOL


def _soft_target_flags(t: torch.Tensor, tol: float = _PROB_TOL) -> torch.Tensor:
    """``[any non-finite, not probabilities]`` of (B, C) soft targets, as a bool tensor on their
    device; ``tol``: the tolerance of the row sums and of negative entries."""
    finite = torch.isfinite(t).all()
    bad = (t < -tol).any() | ((t.sum(1, dtype=torch.float32) - 1).abs() > tol).any()
    return torch.stack([~finite, finite & bad])


def value_problems(logits: torch.Tensor, targets: torch.Tensor, extra=()) -> torch.Tensor:
    """A 0-dim fp64 tensor (on the logits' device) that is exactly 0 when the batch's values are
    fine, and NaN or positive (so ``bool()`` of it is True) when the values of a batch that passed
    the type and shape checks would be rejected by :func:`check_logits` / :func:`to_soft_targets`,
    or when a floating-point tensor in ``extra`` (features, model inputs; nested structures and None
    allowed) holds NaN/inf.

    Computing it queues a few reductions and no host transfer; reading it is the single device sync
    of a checked refiner call. When it is True, the eager checks name the problem. It is built from
    arithmetic the refiner's call runs anyway (sums, products, clamps) rather than from comparison
    kernels of its own: right after a training step every kernel a call uses for the first time
    costs tens of microseconds on a CPU, whatever its size.
    """
    total = _finite_probe(logits)
    for e in tensor_leaves(extra):
        if e.is_floating_point():
            # scores are computed in fp32: fp64 values beyond its range would become inf there
            total = total + _finite_probe(e.detach().float() if e.dtype == torch.float64 else e).to(total.device)
    flag = total * 0.0  # 0 for a finite sum, NaN when any entry was NaN/inf
    t = targets.detach()
    if t.dim() == 1:
        if t.numel():
            # the number of labels outside 0..C-1: the clamp that indexes the one-hot targets moves them
            flag = flag + (t.clamp(0, logits.shape[1] - 1) != t).sum(dtype=torch.float64).to(flag)
    else:
        flag = flag + _soft_target_flags(t.float(), _prob_tolerance(t.dtype)).any().to(flag)
    return flag


def _finite_probe(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp64 tensor that is finite exactly when every value of ``x`` is.

    For fp32/fp16/bf16 tensors it is their sum in fp64: a NaN or inf entry makes it non-finite, and
    finite entries (at most 3.4e38 each) cannot overflow fp64 in any tensor that fits in memory. One
    reduction, against the three of ``isfinite(x).all()``. fp64 tensors, whose sum could overflow,
    get the exact test (0 or NaN)."""
    x = x.detach()
    if x.dtype == torch.float64:
        return torch.where(torch.isfinite(x).all(), 0.0, float("nan")).to(torch.float64)
    return x.sum(dtype=torch.float64)


def check_soft_pair(scores: torch.Tensor, targets: torch.Tensor, what: str = "targets") -> None:
    """A typed error unless ``targets`` are floating ``(B, C)`` probabilities beside ``(B, C)``
    ``scores`` or logits (shapes and dtypes only: no device sync). The functional API takes
    probabilities; class indices go through :func:`to_soft_targets` first."""
    if not (isinstance(scores, torch.Tensor) and scores.dim() == 2):
        raise ShapeError(f"expected (B, C) scores or logits, got {_describe(scores)}", "pass a (batch, classes) tensor")
    if not (isinstance(targets, torch.Tensor) and targets.is_floating_point() and targets.shape == scores.shape):
        raise TargetError(f"{what} must be (B, C) = {tuple(scores.shape)} floating probabilities, got "
                          f"{_describe(targets)}",
                          "convert class indices with augplug.functional.to_soft_targets(labels, num_classes)")


def check_row_weights(weights: Optional[torch.Tensor], batch: int) -> None:
    """A :class:`ShapeError` unless ``weights`` is None or a ``(B,)`` tensor (a ``(B, 1)`` column would
    broadcast against the ``(B,)`` losses into a ``(B, B)`` matrix)."""
    if weights is not None and not (isinstance(weights, torch.Tensor) and weights.shape == (batch,)):
        raise ShapeError(f"per-sample weights must be ({batch},), got {_describe(weights)}",
                         "pass one weight per row, e.g. weights.flatten()")


def _describe(x: Any) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy ``-sum_c y_c log softmax(z)_c`` in fp32 (fp64 for fp64 logits),
    shape ``(B,)``: torch's ``F.cross_entropy`` with probability targets (bit-identical to the
    written-out sum on the CPU, ``tests/test_targets.py``), after casting half-precision logits to
    fp32 so that they are not rounded.
    ``soft_targets``: ``(B, C)`` probabilities (class indices: :func:`to_soft_targets` first)."""
    check_soft_pair(logits, soft_targets, "soft_targets")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.to(dtype), soft_targets.to(dtype), reduction="none")


def weighted_soft_ce(
    logits: torch.Tensor,
    soft_targets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft-target cross-entropy with optional per-sample weights (treated as constants).

    ``reduction``: ``"mean"`` divides the weighted sum by the batch size (so weights with mean 1
    keep the loss scale), ``"sum"`` returns the weighted sum, ``"none"`` the weighted per-sample losses.
    """
    if reduction not in ("mean", "sum", "none"):   # before any work
        raise ConfigurationError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}",
                                 "pass reduction='mean' (the default), 'sum' or 'none'")
    losses = soft_cross_entropy(logits, soft_targets)
    check_row_weights(weights, losses.shape[0])
    if weights is not None:
        losses = losses * weights.detach().float()
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(losses.shape[0], 1)
