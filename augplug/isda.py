"""ISDA: implicit semantic data augmentation (Wang et al., NeurIPS 2019) as a loss.

ISDA augments every training feature ``a`` of class ``y`` along the directions in which features of
that class vary, ``a + delta`` with ``delta ~ N(0, lam * Sigma_y)``, without sampling: it minimises a
closed-form upper bound of the expected cross-entropy over those augmented features. With classifier
weights ``W`` (C x A, rows ``w_j``), the bound is the cross-entropy of the *surrogate logits*

    z~_j = z_j + (lam / 2) * (w_j - w_y)^T Sigma_y (w_j - w_y)          (z = W a + b, the usual logits)

The extra term is 0 for the target class and >= 0 for the others (``Sigma_y`` is PSD), so ISDA only
raises the competing logits. ``Sigma_y`` is the covariance of the (detached) features of class ``y``
seen so far; gradients reach ``W`` through both ``z`` and the quadratic term (the paper's eq. 5) and
the backbone through ``z``.

Two ways to use it, sharing one implementation (:meth:`ISDALoss.per_sample_loss`):

    criterion = ISDALoss.for_model(model, lambda0=0.5)          # standalone: hooks the classifier
    loss = criterion(model(x), y)                                # class indices or probabilities

    refiner = AugmentationRefiner(model, opt, val_loader, method="saflex", isda=True)   # composed

Soft targets (Mixup/CutMix, label smoothing, refined labels) give ``sum_k y_k * CE(z~(k), k)``: the
loss is linear in the target, so per-sample weights and mixed targets compose with it unchanged.
See ``docs/isda.md`` for the equations, the memory modes, the lambda schedule and measurements.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum_, is_distributed, rank, world_size
from .errors import ConfigurationError, NonFiniteError, ShapeError, UnsupportedHeadError
from .heads import ActivationCapture, find_classifier, hidden_by_checkpoint, reentrant_checkpoint, unwrap_model
from .targets import check_logits, to_soft_targets

__all__ = ["ISDALoss", "DEFAULT_MEMORY_BUDGET", "choose_covariance", "class_quadratic_terms", "isda_logits",
           "isda_per_sample_loss", "head_weight"]

logger = logging.getLogger(__name__)

#: Default budget (bytes) for the covariance table in ``covariance="auto"``: full covariances when
#: ``4 * C * A * A`` fits, diagonal ones otherwise (e.g. 100 classes x 512 features: 105 MB, full;
#: 1000 x 512: 1.05 GB, diagonal; ResNet-50 on ImageNet, 1000 x 2048: 16.8 GB, diagonal).
DEFAULT_MEMORY_BUDGET = 256 * 2 ** 20

_PAIR_BLOCK = 1 << 22   # elements of one (pairs, C) block of surrogate logits
_COVARIANCE_MODES = ("auto", "full", "diagonal")
_STATS_TARGETS = ("soft", "argmax")
_STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- heads
def head_weight(head) -> torch.Tensor:
    """The ``(C, A)`` weight matrix of a linear classifier head.

    Accepts ``nn.Linear`` and 1x1 ``nn.Conv2d`` heads (groups 1, no padding) applied to pooled
    ``(B, A, 1, 1)`` features; anything else raises :class:`~augplug.errors.UnsupportedHeadError`.
    """
    if isinstance(head, nn.Linear):
        return head.weight
    if isinstance(head, nn.Conv2d):
        if head.kernel_size == (1, 1) and head.groups == 1 and tuple(head.padding) == (0, 0) \
                and tuple(head.stride) == (1, 1):
            return head.weight.flatten(1)
        raise UnsupportedHeadError(
            f"the classifier is a Conv2d with kernel {head.kernel_size}, groups {head.groups}, padding {head.padding}; "
            "ISDA needs a linear map of the features",
            "use an nn.Linear head (or a 1x1 Conv2d with groups=1 and no padding on pooled features)")
    if isinstance(head, (tuple, list)):
        raise UnsupportedHeadError(
            f"the model has {len(head)} classifier heads (a distilled model such as DeiT/LeViT-distilled)",
            "build ISDALoss.for_model(model, classifier=model.head) for the head whose logits you pass, "
            "and pass that head's logits only")
    if head is None:
        raise UnsupportedHeadError("no classifier head was given",
                                   "pass the model's final nn.Linear (ISDALoss.for_head(head)) or use ISDALoss.for_model")
    raise UnsupportedHeadError(
        f"the classifier is a {type(head).__name__}; ISDA needs a linear map of the features (nn.Linear)",
        "pass the final nn.Linear as classifier=, or compute features yourself and use ISDALoss.for_head")


def _find_head(model: nn.Module, classifier) -> nn.Module:
    if isinstance(classifier, nn.Conv2d):
        head_weight(classifier)  # raises unless it is a usable 1x1 conv
        return classifier
    try:
        return find_classifier(model, classifier)[1]
    except UnsupportedHeadError as e:
        raise UnsupportedHeadError(e.problem, "ISDA needs a linear classifier: pass the final nn.Linear as "
                                   "classifier= (a module or its dotted name)") from None


# ---------------------------------------------------------------------------------- stateless maths
def choose_covariance(num_classes: int, feature_dim: int, covariance: str = "auto",
                      memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """``"full"`` or ``"diagonal"``: the requested mode, or for ``"auto"`` full covariances when the
    fp32 table (``4 * C * A * A`` bytes) fits in ``memory_budget`` bytes, diagonal ones otherwise."""
    if covariance not in _COVARIANCE_MODES:
        raise ConfigurationError(f"covariance must be one of {_COVARIANCE_MODES}, got {covariance!r}",
                                 "use 'full', 'diagonal' or 'auto'")
    if covariance != "auto":
        return covariance
    return "full" if 4 * num_classes * feature_dim * feature_dim <= memory_budget else "diagonal"


class _FullQuadratic(torch.autograd.Function):
    """``q[k, j] = (w_j - w_c)^T S_c (w_j - w_c)`` for ``c = classes[k]`` and symmetric
    ``S_c = scale_c * table[c] + G_c^T G_c`` (a pending update: see :class:`_Pending`).

    ``parts``: ``None`` (``S_c = table[c]``), a list of ``(scale_c, G_c)`` (class by class:
    ``table[c]`` is read in place, never gathered into a copy; a few kernels per class), or a tuple
    ``(scale (K,), G (K, R, A))`` with zero-padded factors (batched: the K covariances gathered into
    one ``(K, A, A)`` copy, a handful of kernels in all; the way to go on a GPU). The backward reuses
    the forward's ``M_c = (W - w_c) S_c``: ``dq/dw_j = 2 M_c[j]`` and ``dq/dw_c = -2 sum_j M_c[j]``,
    so the gradient costs no second matrix product.
    """

    @staticmethod
    def forward(ctx, weight, table, classes, parts):
        if isinstance(parts, tuple):
            d = weight.unsqueeze(0) - weight[classes].unsqueeze(1)       # (K, C, A)
            m = torch.bmm(d, table[classes].to(weight.dtype))
            scale, factor = parts
            if scale is not None:
                m.mul_(scale.to(weight.dtype)[:, None, None])
            if factor is not None:
                f = factor.to(weight.dtype)
                m.baddbmm_(torch.bmm(d, f.transpose(1, 2)), f)
            ctx.save_for_backward(m, classes)
            return (m * d).sum(-1)
        c_all, a = weight.shape
        cls = classes.tolist()
        m = weight.new_empty(len(cls), c_all, a)
        q = weight.new_empty(len(cls), c_all)
        for k, c in enumerate(cls):
            d = weight - weight[c]                                        # (C, A)
            scale, factor = parts[k] if parts is not None else (1.0, None)
            if scale != 0:
                torch.matmul(d, table[c].to(weight.dtype), out=m[k])
                if scale != 1:
                    m[k].mul_(scale)
            else:
                m[k].zero_()
            if factor is not None and factor.shape[0]:
                f = factor.to(weight.dtype)
                m[k].addmm_(d @ f.t(), f)
            q[k] = (m[k] * d).sum(-1)
        ctx.save_for_backward(m, classes)
        return q

    @staticmethod
    def backward(ctx, grad_q):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        m, classes = ctx.saved_tensors
        g = m * (2 * grad_q).unsqueeze(-1)                                # dL/d(w_j - w_c)
        grad_w = g.sum(0)
        grad_w.index_add_(0, classes, -g.sum(1))
        return grad_w, None, None, None


def _diagonal_quadratic(weight: torch.Tensor, var: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    wk = weight[classes]
    var = var.to(weight.dtype)
    q = var @ (weight * weight).t() - 2 * (var * wk) @ weight.t() + (var * wk * wk).sum(-1, keepdim=True)
    # the expansion can round slightly below 0 where w_j ~ w_c; the exact value is >= 0 and 0 at j = c
    return q.clamp_min(0).scatter(1, classes.unsqueeze(1), 0.0)


def class_quadratic_terms(weight: torch.Tensor, table: torch.Tensor, classes: torch.Tensor,
                          pending: Optional["_Pending"] = None, batched: Optional[bool] = None) -> torch.Tensor:
    """``q[k, j] = (w_j - w_c)^T Sigma_c (w_j - w_c)`` for each class ``c = classes[k]``: a ``(K, C)`` tensor.

    Args:
        weight: ``(C, A)`` classifier weights (gradients flow into it).
        table: covariances of all classes, ``(C, A, A)`` (full, symmetric) or ``(C, A)`` (diagonal
            variances); treated as constants. Only the rows in ``classes`` are read.
        classes: ``(K,)`` class indices.
        pending: an update of ``table`` not yet written (internal).
        batched: full covariances only: all classes in batched matrix products (a ``(K, A, A)``
            copy of their covariances; few kernel launches) or, ``False``, class by class (no copy).
            ``None``: batched on a GPU, class by class on the CPU.

    Cost: ``K * C * A^2`` multiply-adds (full) or ``3 * K * C * A`` (diagonal), never a per-sample
    ``(N, C, C)`` product. ``q[k, classes[k]]`` is exactly 0.
    """
    classes = classes.to(weight.device, torch.long)
    table = table.detach()
    if table.dim() == 3:
        if batched is None:
            batched = weight.is_cuda
        if batched:
            parts = pending.batched_parts(classes) if pending is not None else (None, None)
        else:
            parts = pending.full_parts(classes) if pending is not None else None
        return _FullQuadratic.apply(weight, table, classes, parts)
    var = table[classes]
    if pending is not None:
        var = pending.diagonal_rows(classes, var)
    return _diagonal_quadratic(weight, var, classes)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def isda_logits(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                lam: float) -> torch.Tensor:
    """Surrogate logits ``z + (lam/2) q[y]`` (B, C) for class indices ``labels`` (B,).

    ``table`` holds every class's covariance (``(C, A, A)``) or variances (``(C, A)``). The
    cross-entropy of these logits with ``labels`` is the ISDA loss of each sample.
    """
    dtype = _compute_dtype(logits)
    classes, pos = torch.unique(labels, return_inverse=True)
    q = class_quadratic_terms(weight.to(dtype), table, classes)
    return logits.to(dtype) + (0.5 * lam) * q[pos]


def isda_per_sample_loss(logits: torch.Tensor, soft_targets: torch.Tensor, weight: torch.Tensor,
                         table: torch.Tensor, lam: float, pending: Optional["_Pending"] = None,
                         batched: Optional[bool] = None) -> torch.Tensor:
    """Per-sample ISDA loss ``sum_k y_k * CE(z + (lam/2) q[k], k)``, shape ``(B,)``.

    ``soft_targets`` is a ``(B, C)`` probability matrix; only its non-zero entries cost anything
    (one surrogate row per (sample, class) pair, computed in blocks). Computed in fp32 (fp64 for
    fp64 logits); ``lam == 0`` returns the soft-target cross-entropy exactly.
    """
    dtype = _compute_dtype(logits)
    z = logits.to(dtype)
    y = soft_targets.to(dtype)
    if lam == 0:
        return -(y * F.log_softmax(z, dim=-1)).sum(-1)
    rows, cls = y.nonzero(as_tuple=True)
    classes, pos = torch.unique(cls, return_inverse=True)
    q = class_quadratic_terms(weight.to(dtype), table, classes, pending, batched)   # (K, C)
    half = 0.5 * float(lam)
    out = z.new_zeros(z.shape[0])
    block = max(1, _PAIR_BLOCK // z.shape[1])
    for s in range(0, rows.numel(), block):
        r, c, p = rows[s:s + block], cls[s:s + block], pos[s:s + block]
        zr = z[r]
        ce = torch.logsumexp(zr + half * q[p], dim=-1) - zr.gather(1, c.unsqueeze(1)).squeeze(1)
        out = out.index_add(0, r, y[r, c] * ce)
    return out


def _gather_rows(rows: torch.Tensor, pos: torch.Tensor):
    """Concatenate every process's ``rows`` (P_r, A) and class positions ``pos`` (P_r,) in rank order,
    identically on all processes, with two sum all-reduces over zero-padded slots."""
    world, me = world_size(), rank()
    sizes = rows.new_zeros(world)
    sizes[me] = rows.shape[0]
    all_reduce_sum_([sizes])
    sizes = [int(v) for v in sizes.tolist()]
    width = max(sizes)
    buf = rows.new_zeros(world, width, rows.shape[1])
    ids = rows.new_zeros(world, width)
    buf[me, :rows.shape[0]] = rows
    ids[me, :rows.shape[0]] = pos.to(rows.dtype) + 1                      # 0 marks padding
    all_reduce_sum_([buf, ids])
    out_rows = torch.cat([buf[r, :n] for r, n in enumerate(sizes)])
    out_pos = torch.cat([ids[r, :n] for r, n in enumerate(sizes)]).round().long() - 1
    return out_rows, out_pos


# ------------------------------------------------------------------------------------- the module
@dataclass
class _Snapshot:
    version: int
    count: torch.Tensor
    steps: torch.Tensor
    progress: torch.Tensor


class _Pending:
    """The statistics after one batch, computed but not yet written into the buffers.

    For the classes in ``classes`` (those with target mass in the batch, on any process): new
    counts and means, and the new covariance as ``beta_c * old_c + G_c^T G_c`` (full: ``G_c`` stacks
    the class's centred, weighted features and the mean-shift term; never an A x A temporary) or as
    new variance rows (diagonal). The loss reads the statistics through this object, and
    :meth:`ISDALoss._commit` writes them in place, as the last step of a call.
    """

    def __init__(self, classes, count, mean_rows, slot, beta=None, rows=None, pos=None, shift=None, var_rows=None):
        self.classes, self.count, self.mean_rows, self.slot = classes, count, mean_rows, slot
        self.beta, self.var_rows = beta, var_rows
        # full: G_c = [the rows of class slot c (rows[pos == c]); shift[c]], built on first use
        self.rows, self.pos, self.shift = rows, pos, shift
        self._factors: Optional[List[torch.Tensor]] = None
        self._padded: Optional[torch.Tensor] = None

    def fits(self, cov: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: whether the written statistics stay finite in ``cov``'s dtype. The
        covariances are positive semi-definite, so ``|S_ij| <= sqrt(S_ii S_jj)``: their new
        diagonals (summed in fp64) bound every entry."""
        if self.var_rows is not None:
            diag = self.var_rows.double()
        else:
            diag = torch.diagonal(cov[self.classes], dim1=1, dim2=2).double() * self.beta.double().unsqueeze(1)
            diag = diag.index_add(0, self.pos, self.rows.double() ** 2) + self.shift.double() ** 2
        limit = torch.finfo(cov.dtype).max
        return (torch.isfinite(self.count).all() & torch.isfinite(self.mean_rows).all()
                & torch.isfinite(diag).all() & (diag.abs() <= limit).all())

    def _by_slot(self):
        """``(order, counts)``: the rows' order grouped by class slot (stable), and each slot's row count."""
        return torch.argsort(self.pos, stable=True), torch.bincount(self.pos, minlength=self.classes.numel())

    @property
    def factors(self) -> List[torch.Tensor]:
        """``G_c`` of every updated class, one ``(n_c + 1, A)`` tensor per slot."""
        if self._factors is None:
            order, counts = self._by_slot()
            segments = torch.split(self.rows[order], counts.tolist())
            self._factors = [torch.cat([seg, self.shift[k:k + 1]]) for k, seg in enumerate(segments)]
        return self._factors

    @property
    def padded_factors(self) -> torch.Tensor:
        """``G_c`` of every updated class zero-padded to ``(K + 1, R, A)``; slot ``K`` is all zero
        (the factor of a class without an update)."""
        if self._padded is None:
            k, a = self.shift.shape
            order, counts = self._by_slot()
            width = int(counts.max()) + 1 if self.pos.numel() else 1
            sorted_pos = self.pos[order]
            within = torch.arange(sorted_pos.numel(), device=self.pos.device) - (counts.cumsum(0) - counts)[sorted_pos]
            dtype = torch.promote_types(self.rows.dtype, self.shift.dtype)  # fp16 rows under autocast
            out = self.rows.new_zeros(k + 1, width, a, dtype=dtype)
            out[sorted_pos, within] = self.rows[order].to(dtype)
            out[torch.arange(k, device=out.device), counts] = self.shift.to(dtype)
            self._padded = out
        return self._padded

    def full_parts(self, classes: torch.Tensor):
        slots = self.slot[classes].tolist()
        beta = self.beta.tolist()
        return [(1.0, None) if s < 0 else (beta[s], self.factors[s]) for s in slots]

    def batched_parts(self, classes: torch.Tensor):
        """``(scale (K',), G (K', R, A))`` for the loss's classes: ``beta`` and the padded factor of
        an updated class, 1 and zeros for the others."""
        k = self.classes.numel()
        if k == 0:  # nothing was updated
            return None, None
        slots = self.slot[classes]
        updated = slots >= 0
        scale = torch.where(updated, self.beta[slots.clamp_min(0)], torch.ones((), dtype=self.beta.dtype,
                                                                               device=self.beta.device))
        return scale, self.padded_factors[torch.where(updated, slots, torch.full_like(slots, k))]

    def diagonal_rows(self, classes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        slots = self.slot[classes]
        sel = slots >= 0
        rows = rows.clone()
        rows[sel] = self.var_rows[slots[sel]]
        return rows


class ISDALoss(nn.Module):
    """ISDA loss with class-conditional feature statistics kept as registered buffers.

    Args:
        num_classes: C, the classifier's outputs.
        feature_dim: A, the classifier's input features.
        lambda0: augmentation strength; the loss uses ``lam = lambda0 * progress``. The paper uses
            0.5 on CIFAR (0.25 also recommended) and 7.5 for ResNet-50 on ImageNet.
        covariance: ``"full"`` (C x A x A, the paper's CIFAR code), ``"diagonal"`` (C x A, the
            paper's ImageNet code) or ``"auto"`` (full when ``4*C*A*A`` bytes fit in
            ``memory_budget``; the choice is logged, warned about when it is diagonal, and kept in
            :attr:`covariance`).
        memory_budget: bytes allowed for the covariance table in ``"auto"`` mode.
        decay: ``None`` (the paper): statistics of all features seen, equally weighted. A float
            ``gamma`` in (0, 1): before each update every past feature's weight is multiplied by
            ``gamma``, i.e. the per-class sums of weights, features and outer products are
            exponential moving averages and the mean/covariance are their ratios (recent features
            count more; ``1 / (1 - gamma)`` updates is the memory).
        stats_targets: how targets update the statistics: ``"soft"`` (each sample adds its
            features to class k with weight ``y_k``; class indices give the paper's update) or
            ``"argmax"`` (to its most probable class only, with weight 1).
        total_steps: when given, ``progress`` follows ``step / total_steps`` automatically
            (``step`` counts training calls from 0, so the first call has ``lam = 0``). Otherwise
            progress stays where :meth:`set_progress` / :meth:`set_epoch` put it (initially 1).
        sync: under ``torch.distributed`` (Accelerate, torchrun), merge the batches of all
            processes (class weights and sums all-reduced, centred feature rows all-gathered, in
            fp64 transport) so that every process holds the same statistics, equal to those of one
            process seeing the union of the batches. Every process must then make the same training
            calls. ``False``: per-process statistics, as in the paper's ImageNet code.
        device: where the buffers live (they follow the features' device on the first call).
        batched: full covariances only: compute the quadratic terms and write the update for all
            classes of a batch in batched matrix products (a few kernels; a ``(K, A, A)`` copy of
            the K classes' covariances) rather than class by class (a few kernels per class, no
            copy). ``None`` (default): batched when the statistics are on a GPU, where the class
            loop is bound by kernel launches; class by class on the CPU. Same values either way.

    Every call made with autograd enabled merges its (detached) features into the statistics, in
    fp32, and its loss uses the merged statistics, as in the paper; the buffers are written after
    the loss has been computed, so a call that raises leaves them unchanged. Calls under
    ``torch.no_grad()`` only read the statistics (and need no features).
    """

    def __init__(self, num_classes: int, feature_dim: int, *, lambda0: float = 0.5, covariance: str = "auto",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, decay: Optional[float] = None,
                 stats_targets: str = "soft", total_steps: Optional[int] = None, sync: bool = True,
                 device: Union[None, str, torch.device] = None, batched: Optional[bool] = None):
        super().__init__()
        if int(num_classes) < 2 or int(feature_dim) < 1:
            raise ConfigurationError(f"need num_classes >= 2 and feature_dim >= 1, got {num_classes}, {feature_dim}",
                                     "pass the classifier's out_features and in_features (or use ISDALoss.for_head)")
        if not (math.isfinite(float(lambda0)) and float(lambda0) >= 0):
            raise ConfigurationError(f"lambda0 must be a finite number >= 0, got {lambda0}",
                                     "use 0.5 (CIFAR-scale) or 7.5 (ImageNet ResNet-50)")
        if decay is not None and not 0 < float(decay) < 1:
            raise ConfigurationError(f"decay must be in (0, 1) or None, got {decay}",
                                     "use None (all features weigh the same) or e.g. 0.99")
        if stats_targets not in _STATS_TARGETS:
            raise ConfigurationError(f"stats_targets must be one of {_STATS_TARGETS}, got {stats_targets!r}",
                                     "use 'soft' or 'argmax'")
        if total_steps is not None and int(total_steps) < 1:
            raise ConfigurationError(f"total_steps must be >= 1 or None, got {total_steps}",
                                     "pass the number of training steps, or None and call set_epoch()")
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        self.lambda0 = float(lambda0)
        self.decay = None if decay is None else float(decay)
        self.stats_targets = stats_targets
        self.total_steps = None if total_steps is None else int(total_steps)
        self.sync = bool(sync)
        self.batched = batched if batched is None else bool(batched)
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget >= 0:
            raise ConfigurationError(f"ISDA's memory_budget must be a number of bytes >= 0, got {memory_budget!r}",
                                     "leave the default, or pass e.g. memory_budget=256 * 2**20")
        self.memory_budget = int(memory_budget)
        self.covariance_requested = covariance
        self.covariance = choose_covariance(self.num_classes, self.feature_dim, covariance, self.memory_budget)
        if covariance == "auto":
            full = 4 * self.num_classes * self.feature_dim ** 2
            msg = (f"ISDA: {self.covariance} covariance for {self.num_classes} classes x {self.feature_dim} features "
                   f"(full table {full / 2 ** 20:.1f} MiB, budget {self.memory_budget / 2 ** 20:.1f} MiB)")
            logger.info(msg)
            if self.covariance == "diagonal":
                warnings.warn(msg + "; pass covariance='full' or a larger memory_budget to keep full covariances",
                              stacklevel=3)
        c, a = self.num_classes, self.feature_dim
        kw = dict(dtype=torch.float32, device=device)
        self.register_buffer("count", torch.zeros(c, **kw))
        self.register_buffer("mean", torch.zeros(c, a, **kw))
        self.register_buffer("cov", torch.zeros((c, a, a) if self.covariance == "full" else (c, a), **kw))
        self.register_buffer("progress", torch.tensor(0.0 if self.total_steps else 1.0, **kw))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        self._version = 0
        self._pending: Optional[tuple] = None   # a defer=True call's merge, until commit_pending()
        self._hooks_removed = False   # remove_hooks() was called (named by the no-features error)
        self._head_ref = None      # (head,) for the standalone path; a tuple so it is not a submodule
        self._capture: Optional[ActivationCapture] = None

    def _batched(self) -> bool:
        return self.cov.is_cuda if self.batched is None else self.batched

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_head(cls, head: nn.Module, **options) -> "ISDALoss":
        """Statistics sized ``(C, A)`` from a linear head (``nn.Linear`` or 1x1 ``nn.Conv2d``)."""
        w = head_weight(head)
        options.setdefault("device", w.device)
        obj = cls(w.shape[0], w.shape[1], **options)
        obj._head_ref = (head,)
        return obj

    @classmethod
    def for_model(cls, model: nn.Module, num_classes: Optional[int] = None,
                  classifier: Union[None, str, nn.Module] = None, **options) -> "ISDALoss":
        """Standalone ISDA for a model with a linear classifier.

        Finds the head (``classifier=``: a module or dotted name, found automatically otherwise)
        and hooks it to capture its input features during training forwards; the model itself is
        not changed. Then ``loss = criterion(model(x), targets)``.
        """
        net = unwrap_model(model)
        head = _find_head(net, classifier)
        w = head_weight(head)
        if num_classes is not None and int(num_classes) != w.shape[0]:
            raise ShapeError(f"num_classes={num_classes} but the classifier has {w.shape[0]} outputs",
                             "pass the classifier's number of outputs (or leave num_classes out)")
        obj = cls.for_head(head, **options)
        obj._capture = ActivationCapture(net, head, capture_inputs=False)
        return obj

    def remove_hooks(self) -> None:
        """Remove the feature hook installed by :meth:`for_model`."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
            self._hooks_removed = True

    # ------------------------------------------------------------------ lambda schedule
    @property
    def lam(self) -> float:
        """The current strength ``lambda0 * progress``."""
        return self.lambda0 * float(self.progress)

    def _check_manual_schedule(self, call: str) -> None:
        if self.total_steps:
            raise ConfigurationError(
                f"{call} on an ISDALoss built with total_steps={self.total_steps}: its schedule follows "
                f"total_steps (lam = lambda0 * min(training calls / {self.total_steps}, 1), set at every training "
                "call), which would override the value set here",
                "build the loss with total_steps=None to set the schedule by hand with set_epoch() / "
                "set_progress(), or leave the schedule to total_steps")

    def set_progress(self, progress: float) -> None:
        """Set the schedule position in [0, 1]; ``lam = lambda0 * progress``. Not for a loss built with
        ``total_steps`` (its schedule follows the training calls): that raises
        :class:`~augplug.errors.ConfigurationError` and changes nothing."""
        self._check_manual_schedule(f"set_progress({progress!r})")
        p = float(progress)
        if not 0.0 <= p <= 1.0:
            raise ConfigurationError(f"progress must be in [0, 1], got {progress}",
                                     "pass the fraction of training done, e.g. epoch / total_epochs")
        self.progress.fill_(p)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """The paper's schedule: ``lam = lambda0 * epoch / total_epochs`` with ``epoch`` counted from 0
        (not for a loss built with ``total_steps``: see :meth:`set_progress`)."""
        self._check_manual_schedule(f"set_epoch({epoch!r}, {total_epochs!r})")
        if int(total_epochs) < 1 or not 0 <= int(epoch) <= int(total_epochs):
            raise ConfigurationError(f"need 0 <= epoch <= total_epochs and total_epochs >= 1, got {epoch}, {total_epochs}",
                                     "call set_epoch(epoch, total_epochs) with epoch counted from 0")
        self.set_progress(int(epoch) / int(total_epochs))

    # ------------------------------------------------------------------ state
    @property
    def statistics_bytes(self) -> int:
        """Bytes held by the statistics buffers (count, mean, covariance)."""
        return sum(t.numel() * t.element_size() for t in (self.count, self.mean, self.cov))

    def state_snapshot(self) -> _Snapshot:
        """An opaque token for :meth:`restore_snapshot` (cheap: the large buffers are not copied).

        A call writes the statistics only as its very last step, after everything that can fail,
        so restoring a snapshot taken before a call that raised is exact. A call that completed is
        final: restoring a snapshot taken before it raises :class:`~augplug.errors.ConfigurationError`.
        """
        return _Snapshot(self._version, self.count.clone(), self.steps.clone(), self.progress.clone())

    def restore_snapshot(self, snap: _Snapshot) -> None:
        """Put the statistics and the schedule back as they were when ``snap`` was taken."""
        if self._version != snap.version:
            raise ConfigurationError("the statistics were updated by a completed call after this snapshot",
                                     "only a call that raised can be rolled back; reload a state_dict() to go back further")
        self.count.copy_(snap.count)
        self.steps.copy_(snap.steps)
        self.progress.copy_(snap.progress)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"version": _STATE_VERSION, "num_classes": self.num_classes, "feature_dim": self.feature_dim,
                "covariance": self.covariance, "lambda0": self.lambda0, "decay": self.decay,
                "stats_targets": self.stats_targets, "total_steps": self.total_steps}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._check_extra_state(state)

    def _check_extra_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigurationError("the ISDA state was not saved by this version of augplug",
                                     "load a state saved by ISDALoss.state_dict() of this version")
        for key in ("num_classes", "feature_dim", "covariance"):
            if state.get(key) != getattr(self, key):
                raise ConfigurationError(
                    f"the ISDA state has {key}={state.get(key)!r}, this loss has {getattr(self, key)!r}",
                    f"build the ISDALoss with {key}={state.get(key)!r} before loading (covariance='full' or "
                    "'diagonal' rather than 'auto' makes the layout explicit)")

    def check_state_dict(self, state_dict, strict: bool = True) -> None:
        """Raise (changing nothing) unless ``state_dict`` is a complete, finite state for this loss."""
        if not isinstance(state_dict, Mapping):
            raise ConfigurationError(f"an ISDA state must be a dict, got {type(state_dict).__name__}",
                                     "load a state saved by ISDALoss.state_dict()")
        extra = state_dict.get("_extra_state")
        if extra is not None or strict:
            self._check_extra_state(extra)
        for name, buf in self.named_buffers():
            t = state_dict.get(name)
            if t is None:
                if strict:
                    raise ConfigurationError(f"the ISDA state has no '{name}'",
                                             "load a state saved by ISDALoss.state_dict()")
                continue
            if not torch.is_tensor(t) or t.shape != buf.shape:
                raise ConfigurationError(
                    f"the ISDA state's '{name}' has shape {tuple(getattr(t, 'shape', ()))}, expected {tuple(buf.shape)}",
                    "build the ISDALoss with the same classes, features and covariance mode")
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"the ISDA state's '{name}' holds NaN/inf", "load an intact checkpoint")
            # values no run can reach: negative counts or steps, progress outside [0, 1], a negative variance
            impossible = {"count": lambda: bool((t < 0).any()), "steps": lambda: t.is_floating_point() or int(t) < 0,
                          "progress": lambda: not 0.0 <= float(t) <= 1.0,
                          "cov": lambda: bool((torch.diagonal(t, dim1=1, dim2=2) if t.dim() == 3 else t).lt(0).any())}
            if name in impossible and impossible[name]():
                raise ConfigurationError(f"the ISDA state's '{name}' holds a value no run can reach "
                                         "(a negative count, step or variance, or a progress outside [0, 1])",
                                         "load an intact checkpoint")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state saved by :meth:`state_dict`; everything is checked before anything changes."""
        self.check_state_dict(state_dict, strict=strict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._version += 1
        self._pending = None
        return result

    # ------------------------------------------------------------------ the loss
    def _check_inputs(self, features, logits, soft_targets, head, update: bool):
        w = head_weight(head)
        check_logits(logits)
        b, c = logits.shape
        if c != self.num_classes:
            raise ShapeError(f"logits have {c} classes, the ISDA statistics {self.num_classes}",
                             "build the ISDALoss for this classifier (ISDALoss.for_head(head))")
        if tuple(w.shape) != (self.num_classes, self.feature_dim):
            raise ShapeError(f"the head's weight is {tuple(w.shape)}, the ISDA statistics are for "
                             f"({self.num_classes}, {self.feature_dim})",
                             "pass the head the ISDALoss was built for")
        y = to_soft_targets(soft_targets, c, batch_size=b)
        f = None
        if update:
            if features is None and self._capture is not None and not head.training:
                raise ShapeError(f"no classifier features for the {b} rows of this training call: the model is in "
                                 "eval mode, and the classifier hook records features only from forwards in train "
                                 "mode with autograd on",
                                 "call model.train() before training steps; to compute a loss for evaluation, run "
                                 "the forward and the loss under torch.no_grad() (which only reads the statistics)")
            if features is None and self._hooks_removed:
                raise ShapeError(f"no classifier features for the {b} rows of this training call: the classifier "
                                 "hook was removed (remove_hooks())",
                                 "build a new ISDALoss.for_model(model) and load this one's state_dict() into it, "
                                 "or pass features=")
            if features is None and reentrant_checkpoint(logits):
                raise hidden_by_checkpoint("the classifier's input features")
            if features is None:
                raise ShapeError(f"no classifier features for the {b} rows of this training call (each call uses "
                                 "the features of the training forward before it, and drops them: a second call on "
                                 "one forward finds none)",
                                 "build the loss with ISDALoss.for_model(model) (it hooks the classifier) and call "
                                 "it once, right after the training forward (model in train mode, autograd on); for "
                                 "a Mixup criterion lam * crit(out, ya) + (1 - lam) * crit(out, yb) pass the mixed "
                                 "soft targets in one call, or pass features=")
            f = features.detach().flatten(1) if features.dim() > 2 else features.detach()
            if f.dim() != 2 or f.shape[0] != b or f.shape[1] != self.feature_dim:
                raise ShapeError(f"features have shape {tuple(features.shape)}, expected ({b}, {self.feature_dim})",
                                 "pass the inputs of the classifier head (one row per logits row, "
                                 f"{self.feature_dim} features)")
            finite = torch.isfinite(f)
            if not bool(finite.all()):
                bad = (~finite).any(1).nonzero().flatten().tolist()
                raise NonFiniteError(f"features hold NaN/inf in {len(bad)} row(s) (rows {bad[:8]})",
                                     "check the model for overflow (lower the learning rate, use a GradScaler); "
                                     "the statistics were left unchanged")
            f = f.to(torch.float32)
        return w, y, f

    def per_sample_loss(self, features: Optional[torch.Tensor], logits: torch.Tensor, soft_targets: torch.Tensor,
                        head: Optional[nn.Module] = None, *, defer: bool = False) -> torch.Tensor:
        """Per-sample ISDA loss ``sum_k y_k * CE(z~(k), k)``, shape ``(B,)`` (fp32).

        Args:
            features: ``(B, A)`` inputs of the classifier (detached here); needed only for
                training calls, which update the statistics with them first.
            logits: ``(B, C)`` model outputs (gradients flow through them).
            soft_targets: ``(B, C)`` probabilities or ``(B,)`` class indices.
            head: the classifier (``nn.Linear``); its weight enters the quadratic term and gets the
                paper's gradient through it. Defaults to the head the loss was built for.

        A training call is one made with autograd enabled: the batch is merged into the statistics
        and the loss uses the merged statistics (the paper's order). Every input is checked and the
        loss computed before anything is written, so a call that raises changes nothing; a merge
        that would make the statistics non-finite (features of overflowing size) is a
        :class:`~augplug.errors.NonFiniteError`. ``defer=True`` keeps the merge pending until
        :meth:`commit_pending` (a caller with more to do that can still fail, as the refiner);
        :meth:`discard_pending` drops it.
        """
        if head is None:
            head = self._head_ref[0] if self._head_ref is not None else None
        update = torch.is_grad_enabled()
        weight, y, f = self._check_inputs(features, logits, soft_targets, head, update)
        if self.count.device != logits.device:
            self.to(logits.device)
        pending, progress = None, float(self.progress)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if update:
                pending = self._prepare_update(f, y.to(f.device))
                if self.total_steps:
                    progress = min(float(self.steps) / self.total_steps, 1.0)
            loss = isda_per_sample_loss(logits, y, weight, self.cov, self.lambda0 * progress, pending,
                                        self._batched())
        if update:
            if not bool(pending.fits(self.cov) & torch.isfinite(loss).all()):   # one device sync
                raise NonFiniteError(
                    "the ISDA loss or its statistics would be NaN/inf with this batch (features too large for "
                    "the covariance in its dtype)", "check the features' scale (normalize them, or lower the "
                    "learning rate); the statistics were not changed")
            if defer:
                self._pending = (pending, progress)
            else:
                self._commit(pending, progress)
        return loss

    def commit_pending(self) -> None:
        """Write the merge a ``defer=True`` call kept pending (nothing if there is none)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._commit(*pending)

    def discard_pending(self) -> None:
        """Drop the merge a ``defer=True`` call kept pending: the statistics stay as they were."""
        self._pending = None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, features: Optional[torch.Tensor] = None,
                reduction: str = "mean") -> torch.Tensor:
        """Standalone loss: ``criterion(logits, targets)`` with class indices ``(B,)`` or
        probabilities ``(B, C)``; features are those captured by :meth:`for_model`'s hook unless
        passed. ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"``."""
        if reduction not in ("mean", "sum", "none"):
            raise ConfigurationError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}",
                                     "use 'mean'")
        if features is None and self._capture is not None and isinstance(logits, torch.Tensor) and logits.dim() == 2:
            features = self._capture.features(logits.shape[0], logits)
        per = self.per_sample_loss(features, logits, targets)
        if self._capture is not None:
            self._capture.clear()
        if reduction == "none":
            return per
        return per.sum() if reduction == "sum" else per.mean()

    # ------------------------------------------------------------------ statistics
    def _prepare_update(self, f: torch.Tensor, y: torch.Tensor) -> _Pending:
        """Merge one batch into the per-class statistics, out of place (nothing is written here).

        With per-class batch weight ``m``, batch mean ``mu^`` and (weighted, biased) batch
        covariance ``S^``, previous count ``n`` (times ``decay``), mean ``mu`` and covariance ``S``,
        and ``w = m / (n + m)``:

            S <- (1 - w) S + w S^ + w (1 - w) (mu - mu^)(mu - mu^)^T,    mu <- mu + w (mu^ - mu),   n <- n + m

        which keeps ``S`` equal to the covariance of every feature seen (the paper's update).
        Under torch.distributed (``sync``) the batch is the union of all processes' batches.
        """
        distributed = self.sync and is_distributed()
        if self.stats_targets == "argmax":
            y = F.one_hot(y.argmax(1), self.num_classes).to(f.dtype)
        mass = y.sum(0)                                                   # (C,)
        sums = y.t() @ f                                                  # (C, A)
        if distributed:
            all_reduce_sum_([mass, sums])
        classes = (mass > 0).nonzero().flatten()
        count = self.count * (1.0 if self.decay is None else self.decay)
        slot = torch.full((self.num_classes,), -1, dtype=torch.long, device=f.device)
        slot[classes] = torch.arange(classes.numel(), device=f.device)
        m = mass[classes]
        total = count[classes] + m
        w = m / total                                                     # the paper's merge weight
        batch_mean = sums[classes] / m.unsqueeze(1)                       # (K, A)
        old_mean = self.mean[classes]
        diff = old_mean - batch_mean
        mean_rows = old_mean - w.unsqueeze(1) * diff
        count[classes] = total
        # centred rows scaled so that sum d d^T = w * S^ (the batch covariance term)
        yk = y[:, classes]
        rows, pos = yk.nonzero(as_tuple=True)
        d = (f[rows] - batch_mean[pos]) * (yk[rows, pos] / total[pos]).sqrt().unsqueeze(1)
        if distributed:
            d, pos = _gather_rows(d, pos)
        shift = diff * (w * (1 - w)).sqrt().unsqueeze(1)                  # shift shift^T = w(1-w) diff diff^T
        if self.covariance == "full":
            return _Pending(classes, count, mean_rows, slot, beta=1 - w, rows=d, pos=pos, shift=shift)
        var_rows = (self.cov[classes] * (1 - w).unsqueeze(1)).index_add_(0, pos, d * d) + shift * shift
        return _Pending(classes, count, mean_rows, slot, var_rows=var_rows)

    def _commit(self, pending: _Pending, progress: float) -> None:
        """Write a pending update into the buffers, in place (the last step of a training call)."""
        self._version += 1
        classes = pending.classes
        if self.covariance == "full" and self._batched():
            with torch.autocast(device_type=self.cov.device.type, enabled=False):  # fp32, as the statistics
                g = pending.padded_factors[:classes.numel()].to(self.cov.dtype)
                old = self.cov[classes] * pending.beta.to(self.cov.dtype)[:, None, None]
                self.cov.index_copy_(0, classes, torch.baddbmm(old, g.transpose(1, 2), g))
        elif self.covariance == "full":
            beta = pending.beta.tolist()
            for k, c in enumerate(classes.tolist()):
                g = pending.factors[k]
                if beta[k] == 0:
                    torch.mm(g.t(), g, out=self.cov[c])
                else:
                    self.cov[c].addmm_(g.t(), g, beta=beta[k])
        else:
            self.cov.index_copy_(0, classes, pending.var_rows.clamp_min(0))
        self.mean.index_copy_(0, classes, pending.mean_rows)
        self.count.copy_(pending.count)
        self.progress.fill_(progress)
        self.steps += 1

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, covariance={self.covariance!r}, "
                f"lambda0={self.lambda0}, progress={float(self.progress):.3g}, decay={self.decay}, "
                f"stats_targets={self.stats_targets!r}")
