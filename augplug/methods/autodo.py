"""AutoDO (Gudovskiy et al., CVPR 2021): per-point loss weights, soft labels and augmentation
parameters learned by implicit differentiation of the validation loss.

Three sub-models, each a table indexed by the dataset position of the training point
(:class:`~augplug.data.IndexedDataset`):

``W`` (loss weights)
    ``w_i = softplus(lam_W_i) / ln 2`` (1 at ``lam_W = 0``, the initial value).
``S`` (soft labels)
    ``s_i = softmax(lam_S_i)``, initialised to the given (possibly noisy) label with label
    smoothing ``label_smoothing``: ``lam_S_i = log(1 - C + C / eps) * onehot(y_i)``.
``A`` (augmentation)
    per operation an on/off gate logit ``P`` (initial probability ``init_gate_prob``) and a
    magnitude logit ``M`` (initial scale ``init_magnitude``), per point or shared by all points;
    see :mod:`augplug.augment.affine`.

Training loss (computed by the refiner): ``sum_i c_i loss(z_i, s_i) / denom`` with
``c_i = aug_weight * w_i`` on augmented rows (all rows by default), ``orig_weight`` on rows
marked original, and the refiner's denominator (``weight_norm="augmented"``: the batch size, i.e.
the paper's ``mean_i w_i loss_i`` without renormalization; ``"batch"``: the sum of the
coefficients). Weights and soft labels are constants for the model update.

Hyper-step (every ``every`` optimizer updates from ``start_step`` on), over the classifier
parameters ``theta = (W_head, b_head)`` (or more layers, ``hyper_params=``):

    u  = alpha * sum_{t=0}^{T} (I - alpha H)^t grad_theta L_val      (~ H^{-1} grad L_val)
    dL_val/dlam = - d/dlam [ grad_theta L_train . u ]
                = - d/dlam [ (1/denom) sum_i c_i (dloss_i/dz_i)^T (U a_i + u_b) ]

with ``H`` the Hessian of the training loss of this batch in ``theta`` (closed form on the head),
``a_i`` the classifier's input features (their graph reaches the augmentation gates and magnitudes,
so one reverse pass gives all three hypergradients) and ``grad L_val = -v`` from the refiner's
validation direction. The tables' rows of the batch are updated by a lazy RMSprop (rows not in the
batch and their optimizer state are untouched).

Deviations from the authors' code (documented in ``docs/autodo.md``): ``u`` carries the leading
``alpha`` (``scaled=False`` restores the authors' unscaled sum); ``theta`` includes the head's bias;
hyper-steps interleave with training instead of a separate pass over the data; RMSprop is lazy;
six affine operations (isotropic scale) in normalized coordinates without the 4x resampling; the
soft-label initialisation happens on a point's first visit unless ``labels=`` is given.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..augment.affine import DEFAULT_OPS, _check_images, check_ops, random_affine
from ..distributed import world_size as dist_world_size
from ..errors import ConfigurationError, NonFiniteError, ShapeError, UnsupportedModelError, warn_at_caller
from ..finite import nonfinite
from ..heads import NON_REENTRANT
from ..hypergrad import LOSSES, HeadProblem, ift_hypergradient, lazy_rmsprop_, loss_residual
from ..options import is_integer, is_real
from ..scores import last_layer_scores
from ..stats import StepStats
from .base import Policy, RefineContext

__all__ = ["AutoDO", "AutoDOTables", "PointIndexError", "WEIGHT_SCALE", "smoothed_label_logits",
           "format_class_report"]

#: ``w = WEIGHT_SCALE * softplus(lam_W)`` equals 1 at ``lam_W = 0``.
WEIGHT_SCALE = 1.0 / math.log(2.0)
_MAX_PENDING = 8


class PointIndexError(ShapeError):
    """The ``index=`` of a batch is missing, of the wrong dtype or shape, out of range or repeated."""


def smoothed_label_logits(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Logits whose softmax is ``(1 - smoothing) * targets + smoothing / C`` (targets (B, C) on the simplex).

    For one-hot targets this is ``log(1 - C + C / smoothing) * onehot`` up to a per-row constant.
    """
    c = targets.shape[-1]
    return torch.log((1.0 - smoothing) * targets.float() + smoothing / c)


class AutoDOTables(nn.Module):
    """The per-point tables and their lazy-RMSprop state (all buffers, saved by ``state_dict``).

    ``weight_logits`` (N,), ``label_logits`` (N, C), ``gate_logits`` and ``magnitude_logits``
    (R, K) with ``R = N`` (per point) or ``R = 1`` (shared); ``given_labels`` (N,) holds the label a
    point was first seen with (-1 before); ``rms_*`` the squared-gradient averages.
    """

    def __init__(self, num_points: int, num_classes: int, num_ops: int, aug_rows: int, gate_logit: float,
                 magnitude_logit: float):
        super().__init__()
        self.register_buffer("weight_logits", torch.zeros(num_points))
        self.register_buffer("label_logits", torch.zeros(num_points, num_classes))
        self.register_buffer("given_labels", torch.full((num_points,), -1, dtype=torch.long))
        self.register_buffer("gate_logits", torch.full((aug_rows, num_ops), float(gate_logit)))
        self.register_buffer("magnitude_logits", torch.full((aug_rows, num_ops), float(magnitude_logit)))
        for name in ("weight_logits", "label_logits", "gate_logits", "magnitude_logits"):
            self.register_buffer("rms_" + name, torch.zeros_like(getattr(self, name)))
        self.register_buffer("hyper_steps", torch.zeros((), dtype=torch.long))

    def nbytes(self) -> int:
        """Memory of all tables and optimizer state, in bytes."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def format_class_report(rows: List[Dict[str, Any]]) -> str:
    """A markdown table of :meth:`AutoDO.class_report` rows."""
    if not rows:
        return "(no points seen yet)\n"
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out) + "\n"


class AutoDO(Policy):
    """AutoDO policy: learned per-point loss weights (W), soft labels (S) and augmentation (A).

    Use with ``AugmentationRefiner(model, opt, val_loader, method="autodo", method_options={...})``
    and a training loader over :class:`~augplug.data.IndexedDataset`::

        for x, y, idx in loader:
            x = refiner.augment(x, idx)
            loss = refiner(model(x), y, index=idx)

    Args:
        num_points: number of training points (table rows); ``index`` values must lie in ``[0, num_points)``.
        num_classes: number of classes ``C``.
        models: the sub-models to learn, any of ``"A"``, ``"W"``, ``"S"`` (``"AWS"``: all three; ``""``:
            nothing is learned, the initial tables are applied).
        augment: ``"per_point"`` (one gate/magnitude row per point), ``"shared"`` (one row for all) or
            ``"off"`` (``refiner.augment`` returns its input).
        ops: affine operations (:data:`augplug.augment.affine.OPS`).
        labels: optional ``(num_points,)`` given labels to initialise the soft labels of every point
            now; otherwise a point's soft label is initialised from its targets on its first visit.
        label_smoothing: ``eps`` of the soft-label initialisation (the paper's 0.05).
        loss: ``"ce"`` (soft cross-entropy, the gradient of ``KL(s||p)``) or ``"sym_kl"``
            (``0.5 [KL(s||p) + KL(p||s)]``; the refiner then trains on the target whose soft
            cross-entropy has the same gradient, see ``docs/autodo.md``).
        alpha, neumann_steps, scaled, damping: Neumann series ``u = alpha sum_{t<=T} (I - alpha (H +
            damping I))^t grad L_val`` (``scaled=False`` drops the leading ``alpha``).
        hyper_params: ``"head"`` (closed form on the classifier) or a list of parameter-name prefixes
            of the model (autograd Hessian-vector products through those layers; needs the refiner's
            ``mode="full"`` or ``"double_backward"`` so that its validation direction covers them).
        hyper_lr, rms_alpha, rms_eps: the lazy RMSprop of the tables; ``hyper_lr`` is a number or a
            dict of per-sub-model rates, e.g. ``{"W": 0.2, "S": 0.5, "A": 0.05}`` (missing: 0.05).
        start_step: optimizer updates before the first hyper-step (the paper's ``E`` epochs times
            the steps per epoch); the refiner's ``warmup_steps`` also delays them.
        every: a hyper-step every ``every`` updates after ``start_step``.
        init_gate_prob, init_magnitude, tau, padding_mode, min_scale: augmentation options.
    """

    name = "autodo"
    needs_scores = True
    needs_features = True
    checks_index = True
    refiner_renormalizes = False

    def __init__(self, num_points: int, num_classes: int, *, models: str = "AWS", augment: str = "per_point",
                 ops: Sequence[str] = DEFAULT_OPS, labels=None, label_smoothing: float = 0.05, loss: str = "ce",
                 alpha: float = 0.01, neumann_steps: int = 5, scaled: bool = True, damping: float = 0.0,
                 hyper_params: Union[str, Sequence[str]] = "head", hyper_lr: Union[float, Dict[str, float]] = 0.05, rms_alpha: float = 0.99,
                 rms_eps: float = 1e-8, start_step: int = 0, every: int = 1, init_gate_prob: float = 0.2,
                 init_magnitude: float = 0.5, tau: float = 1.0, padding_mode: str = "border",
                 min_scale: float = 0.1):
        problems = []
        between = lambda v, lo, hi: is_real(v) and lo < float(v) < hi  # noqa: E731 (open interval)
        if not is_integer(num_points) or num_points < 1:
            problems.append(f"num_points must be a positive int (the training set's length), got {num_points!r}")
        if not is_integer(num_classes) or num_classes < 2:
            problems.append(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not isinstance(models, str) or set(models) - set("AWS"):
            problems.append(f"models must be a string of 'A', 'W', 'S', got {models!r}")
        if augment not in ("per_point", "shared", "off"):
            problems.append(f"augment must be 'per_point', 'shared' or 'off', got {augment!r}")
        elif isinstance(models, str) and "A" in models and augment == "off":
            problems.append("models includes 'A' (learned augmentation) but augment='off'")
        if loss not in LOSSES:
            problems.append(f"loss must be one of {LOSSES}, got {loss!r}")
        if not between(label_smoothing, 0.0, 1.0):
            problems.append(f"label_smoothing must lie in (0, 1), got {label_smoothing!r}")
        if not between(alpha, 0.0, math.inf) or not is_integer(neumann_steps) or neumann_steps < 0 \
                or not (is_real(damping) and 0 <= damping < math.inf):
            problems.append(f"need a finite alpha > 0, an integer neumann_steps >= 0 and a finite damping >= 0; got "
                            f"{alpha!r}, {neumann_steps!r}, {damping!r}")
        lrs = dict.fromkeys("AWS", hyper_lr) if not isinstance(hyper_lr, dict) else {**dict.fromkeys("AWS", 0.05), **hyper_lr}
        if set(lrs) - set("AWS") or not all(between(v, 0.0, math.inf) for v in lrs.values()) \
                or not (is_real(rms_alpha) and 0 <= rms_alpha < 1) or not between(rms_eps, 0.0, math.inf):
            problems.append(f"need a finite hyper_lr > 0 (a number or a dict over 'A', 'W', 'S'), 0 <= rms_alpha < 1, "
                            f"a finite rms_eps > 0; got {hyper_lr!r}, {rms_alpha!r}, {rms_eps!r}")
        if not is_integer(start_step) or start_step < 0 or not is_integer(every) or every < 1:
            problems.append(f"need integers start_step >= 0 and every >= 1, got {start_step!r}, {every!r}")
        if not between(init_gate_prob, 0.0, 1.0) or not between(init_magnitude, 0.0, 1.0):
            problems.append(f"init_gate_prob and init_magnitude must lie in (0, 1), got {init_gate_prob!r}, "
                            f"{init_magnitude!r}")
        if not between(tau, 0.0, math.inf) or not (is_real(min_scale) and 0 < min_scale <= 1):
            problems.append(f"need a finite tau > 0 and 0 < min_scale <= 1, got {tau!r}, {min_scale!r}")
        if padding_mode not in ("zeros", "border", "reflection"):
            problems.append(f"padding_mode must be 'zeros', 'border' or 'reflection', got {padding_mode!r}")
        if not (hyper_params == "head" or (not isinstance(hyper_params, str) and len(list(hyper_params)) > 0)):
            problems.append(f"hyper_params must be 'head' or a non-empty list of parameter-name prefixes, got {hyper_params!r}")
        if problems:
            raise ConfigurationError("; ".join(problems), "fix the AutoDO method_options listed")
        num_points, num_classes = int(num_points), int(num_classes)
        self.ops = check_ops(ops)
        self.num_points, self.num_classes = num_points, num_classes
        self.models = "".join(m for m in "AWS" if m in models)
        self.augment_mode = augment
        self.label_smoothing = float(label_smoothing)
        self.loss = loss
        self.alpha, self.neumann_steps, self.scaled, self.damping = float(alpha), int(neumann_steps), bool(scaled), float(damping)
        self.hyper_params = "head" if hyper_params == "head" else tuple(hyper_params)
        self.hyper_lr = {k: float(v) for k, v in lrs.items()}
        self.rms_alpha, self.rms_eps = float(rms_alpha), float(rms_eps)
        self.start_step, self.every = int(start_step), int(every)
        self.tau, self.padding_mode, self.min_scale = float(tau), padding_mode, float(min_scale)
        self.init_gate_prob, self.init_magnitude = float(init_gate_prob), float(init_magnitude)
        # features keep their graph to the augmentation parameters only when those are learned
        self.needs_feature_graph = "A" in self.models and self.hyper_params == "head"
        aug_rows = num_points if augment == "per_point" else 1
        logit = lambda q: math.log(q / (1.0 - q))  # noqa: E731
        self.tables = AutoDOTables(num_points, num_classes, len(self.ops), aug_rows, logit(init_gate_prob),
                                   logit(init_magnitude))
        if labels is not None:
            lab = torch.as_tensor(labels)
            if lab.shape != (num_points,) or lab.is_floating_point() or lab.dtype == torch.bool or \
                    (lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes)):
                raise ConfigurationError(f"labels must be ({num_points},) integer class ids in [0, {num_classes}), got "
                                         f"{lab.dtype} {tuple(lab.shape)}", "pass the training set's given labels")
            lab = lab.long()
            self.tables.given_labels.copy_(lab)
            self.tables.label_logits.copy_(smoothed_label_logits(F.one_hot(lab, num_classes).float(),
                                                                 self.label_smoothing))
        self._pending: List[tuple] = []
        self._checked_call = None   # (index, batch, checked index) from check_call, for the call's refine
        self._augment_calls = 0
        self._undo: Optional[Dict[str, Any]] = None
        self._warned_moved = False   # warned once about targets that left their position's label
        self.last_stats: Dict[str, Any] = {}
        #: hypergradients of the last hyper-step: "W" (B,), "S" (B, C), "A" (rows, gate (R, K), magnitude (R, K))
        self.last_hypergradients: Dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (f"num_points={self.num_points}, num_classes={self.num_classes}, models={self.models!r}, "
                f"augment={self.augment_mode!r}, loss={self.loss!r}, alpha={self.alpha}, "
                f"neumann_steps={self.neumann_steps}, hyper_lr={self.hyper_lr}, start_step={self.start_step}, "
                f"every={self.every}")

    def _device(self, device: torch.device) -> None:
        if self.tables.weight_logits.device != device:
            self.tables.to(device)

    def check_call(self, *, index=None, sources=None, batch: int = 0) -> None:
        # kept for the call's refine, which would otherwise check (and read back) the same index again
        self._checked_call = (index, batch, self.check_index(index, batch))

    def check_index(self, index, batch: int) -> torch.Tensor:
        """Validate a batch's dataset positions and return them as a long tensor (nothing is changed)."""
        fix = ("wrap the training set in augplug.data.IndexedDataset and pass the batch's positions, "
               "e.g. `for x, y, idx in loader: loss = refiner(model(x), y, index=idx)`")
        if index is None:
            raise PointIndexError("AutoDO needs the dataset position of every row (index= is missing)", fix)
        if not isinstance(index, torch.Tensor):
            try:
                index = torch.as_tensor(np.asarray(index))
            except (TypeError, ValueError):
                raise PointIndexError(f"index= must be a tensor of dataset positions, got {type(index).__name__}",
                                      fix) from None
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise PointIndexError(f"index= must hold integer positions, got dtype {index.dtype}",
                                  "pass the integer positions yielded by IndexedDataset (not a mask or floats)")
        if index.shape != (batch,):
            raise PointIndexError(f"index= must have shape ({batch},) (one position per row), got {tuple(index.shape)}",
                                  "pass one dataset position per row of the batch")
        idx = index.long()
        if batch:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_points:
                raise PointIndexError(
                    f"index= holds positions in [{lo}, {hi}] but the tables have num_points={self.num_points} rows",
                    "set num_points to the length of the dataset the positions come from (IndexedDataset(ds): "
                    "len(ds))")
            uniq = torch.unique(idx)
            if uniq.numel() != batch:
                vals, counts = torch.unique(idx, return_counts=True)
                dup = vals[counts > 1][:8].tolist()
                raise PointIndexError(
                    f"index= repeats dataset positions {dup}: each point has one row in the tables",
                    "draw each sample at most once per batch (a sampler without replacement); for datasets "
                    "concatenated from parts, wrap the concatenation in one IndexedDataset. An original and "
                    "its own view cannot share a position either: AutoDO learns each point's augmentation, "
                    "so pass the augmented points alone (refiner(model(refiner.augment(x, idx)), y, index=idx)), "
                    "or originals that are other points")
        return idx

    def _weights_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if "W" not in self.models:
            return torch.ones_like(logits)
        return WEIGHT_SCALE * F.softplus(logits)

    # ------------------------------------------------------------------ augmentation
    def augment(self, x: torch.Tensor, index, noise) -> torch.Tensor:
        """Warp ``x`` with each point's gates and magnitudes; keeps a graph to them when ``A`` is learned.

        ``noise(stream)``: the refiner's per-call noise generators (the global RNG is untouched).
        """
        _check_images(x)
        if x.shape[0] == 0:
            raise ShapeError("the batch has no rows", "skip empty batches (e.g. DataLoader(drop_last=True)) "
                             "before refiner.augment()")
        idx = self.check_index(index, x.shape[0])
        if self.augment_mode == "off":
            return x
        self._device(x.device)
        idx = idx.to(x.device)
        rows = idx if self.augment_mode == "per_point" else torch.zeros(1, dtype=torch.long, device=x.device)
        learn = "A" in self.models and torch.is_grad_enabled()
        gl = self.tables.gate_logits.index_select(0, rows).clone().requires_grad_(learn)
        ml = self.tables.magnitude_logits.index_select(0, rows).clone().requires_grad_(learn)
        # one stream per augment() call since the last refiner call: several calls in one step differ
        self._augment_calls += 1
        gen = noise(self._augment_calls)
        out, values = random_affine(x, gl.to(x.dtype), ml.to(x.dtype), self.ops, gen, tau=self.tau,
                                    padding_mode=self.padding_mode, min_scale=self.min_scale)
        if learn:
            self._pending = (self._pending + [(rows, gl, ml)])[-_MAX_PENDING:]
        self.last_augment = {"values": values.detach(), "applied": (values.detach() != 0).float().mean(0)}
        return out

    # ------------------------------------------------------------------ the policy
    def _is_hyper_step(self, ctx: RefineContext) -> bool:
        step = ctx.step
        return (bool(self.models) and ctx.active and step >= self.start_step
                and (step - self.start_step) % self.every == 0)

    def _head_params(self, ctx: RefineContext):
        sc = ctx.scoring
        if sc.head is None:
            raise ConfigurationError("AutoDO needs the model's linear classifier", "pass classifier= to the refiner")
        return sc.head, sc.head_name

    def _coefficients(self, ctx: RefineContext, w: torch.Tensor):
        """The refiner's per-row loss coefficients and denominator, differentiable in ``w``."""
        r, aug = ctx.mixing, ctx.augmented
        coef = torch.where(aug, r.aug_weight * w, torch.full_like(w, r.orig_weight))
        if r.weight_norm == "batch":
            denom = coef.sum().clamp_min(1e-12)
        else:
            # every row weighing 0 (orig_weight=0 on a batch of originals) gives a loss of 0, not 0 / 0
            denom = coef.new_tensor(max(r.orig_weight * int((~aug).sum()) + r.aug_weight * int(aug.sum()), 1e-12))
        return coef, denom

    @staticmethod
    def _gather_updates(idx, new, lab_logits, labels, grads):
        """Every process's table updates of this call, merged (rows of several processes summed).

        Returns ``(rows_new, lab_logits_new, labels_new, grads)`` for the global batch; ``grads``
        keeps the layout of :meth:`_hypergradients` with unique rows.
        """
        import torch.distributed as dist

        def cpu(t):
            return None if t is None else t.detach().cpu()

        mine = {"rows_new": cpu(idx[new]), "lab_new": cpu(lab_logits[new]), "labels_new": cpu(labels[new]),
                "idx": cpu(idx), "grads": None if grads is None else {
                    "W": cpu(grads["W"]), "S": cpu(grads["S"]),
                    "A": None if grads.get("A") is None else tuple(cpu(t) for t in grads["A"])}}
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        dev = idx.device
        rows_new = torch.cat([p["rows_new"] for p in parts]).to(dev)
        lab_new = torch.cat([p["lab_new"] for p in parts]).to(dev)
        labels_new = torch.cat([p["labels_new"] for p in parts]).to(dev)
        if grads is None:
            return rows_new, lab_new, labels_new, None

        def summed(rows, g):
            uniq, inv = torch.unique(rows, return_inverse=True)
            out = torch.zeros((uniq.shape[0],) + tuple(g.shape[1:]), dtype=g.dtype).index_add_(0, inv, g)
            return uniq.to(dev), out.to(dev)

        all_idx = torch.cat([p["idx"] for p in parts])
        rows, g_w = summed(all_idx, torch.cat([p["grads"]["W"] for p in parts]))
        _, g_s = summed(all_idx, torch.cat([p["grads"]["S"] for p in parts]))
        merged = {"W": g_w, "S": g_s, "rows": rows}
        a_parts = [p["grads"]["A"] for p in parts if p["grads"]["A"] is not None]
        if a_parts:
            a_rows = torch.cat([a[0] for a in a_parts])
            uniq, g_gate = summed(a_rows, torch.cat([a[1] for a in a_parts]))
            _, g_mag = summed(a_rows, torch.cat([a[2] for a in a_parts]))
            merged["A"] = (uniq, g_gate, g_mag)
        return rows_new, lab_new, labels_new, merged

    def refine(self, ctx: RefineContext):
        if ctx.num_classes != self.num_classes:
            raise ShapeError(f"the logits have {ctx.num_classes} classes, but AutoDO's tables were built for "
                             f"num_classes={self.num_classes}",
                             f"build the method with num_classes={ctx.num_classes} (the model's outputs)")
        checked, self._checked_call = self._checked_call, None
        idx = checked[2] if checked is not None and checked[0] is ctx.index and checked[1] == ctx.batch else \
            self.check_index(ctx.index, ctx.batch)
        y = ctx.targets
        dev = y.device
        self._device(dev)
        idx = idx.to(dev)
        t = self.tables
        # undone by rollback() if this call fails anywhere (here or later in the refiner)
        self._undo = {"pending": self._pending, "augment_calls": self._augment_calls, "rows": [],
                      "hyper_steps": t.hyper_steps.clone(), "last_hypergradients": self.last_hypergradients}
        pending, self._pending = self._pending, []
        self._augment_calls = 0

        # rows of this batch (copies; the tables change only at the end)
        given = t.given_labels.index_select(0, idx)
        new = given < 0
        # a seen position whose targets now point elsewhere: a batch-local or shifted index= (or Mixup)
        moved = (~new) & (given != y.argmax(-1))
        any_new, any_moved = torch.stack([new.any(), moved.any()]).tolist()   # one device read
        if any_moved and not self._warned_moved:
            self._warned_moved = True
            warn_at_caller(
                f"AutoDO: {int(moved.sum())} row(s) of this batch carry a label other than the one their index= "
                "position was first seen with; AutoDO trains each position toward the soft label it learned "
                "for it and does not read the new targets. index= must be each sample's fixed position in the "
                "training set (augplug.data.IndexedDataset), not its row in the batch; targets that change "
                "from epoch to epoch (Mixup) are not AutoDO's input")
        lab_logits = t.label_logits.index_select(0, idx).clone()
        if any_new:
            lab_logits[new] = smoothed_label_logits(y[new], self.label_smoothing)
        w_logits = t.weight_logits.index_select(0, idx).clone()

        hyper = self._is_hyper_step(ctx)
        scores = torch.zeros(ctx.batch, ctx.num_classes, dtype=torch.float32, device=dev)
        eager: Dict[str, Any] = {"hyper_step": hyper, "step": ctx.step}
        lazy: Dict[str, Any] = {}  # name -> zero-argument function, read back to the host on demand
        grads = None
        if hyper:
            grads, scores, lazy = self._hypergradients(ctx, w_logits, lab_logits, pending)

        # commit: first-visit labels, then the lazy RMSprop step; in a process group the updates of
        # every process are merged first, so all processes keep identical tables
        if grads is not None and nonfinite([g for k, g in grads.items() if k != "A"],
                                           list(grads.get("A") or ())):
            raise NonFiniteError("AutoDO's hypergradients hold NaN/inf (nothing was written to the tables)",
                                 "lower hyper_lr or alpha, or check the training batch and the validation set")
        upd_rows = idx
        if dist_world_size() > 1:
            rows_new, lab_new, labels_new, grads = self._gather_updates(idx, new, lab_logits, y.argmax(-1), grads)
            if grads is not None:
                upd_rows = grads.pop("rows")
        else:
            rows_new, lab_new, labels_new = idx[new], lab_logits[new], y[new].argmax(-1)
        if rows_new.numel():
            self._save_rows(rows_new, t.label_logits, t.given_labels)
            t.label_logits.index_copy_(0, rows_new, lab_new.to(t.label_logits.dtype))
            t.given_labels.index_copy_(0, rows_new, labels_new.to(t.given_labels.dtype))
        if grads is not None:
            opt = dict(alpha=self.rms_alpha, eps=self.rms_eps)
            lr = self.hyper_lr
            if "W" in self.models:
                self._save_rows(upd_rows, t.weight_logits, t.rms_weight_logits)
                lazy_rmsprop_(t.weight_logits, t.rms_weight_logits, upd_rows, grads["W"], lr=lr["W"], **opt)
            if "S" in self.models:
                self._save_rows(upd_rows, t.label_logits, t.rms_label_logits)
                lazy_rmsprop_(t.label_logits, t.rms_label_logits, upd_rows, grads["S"], lr=lr["S"], **opt)
            if "A" in self.models and grads.get("A") is not None:
                rows, g_gate, g_mag = grads["A"]
                self._save_rows(rows, t.gate_logits, t.rms_gate_logits, t.magnitude_logits, t.rms_magnitude_logits)
                lazy_rmsprop_(t.gate_logits, t.rms_gate_logits, rows, g_gate, lr=lr["A"], **opt)
                lazy_rmsprop_(t.magnitude_logits, t.rms_magnitude_logits, rows, g_mag, lr=lr["A"], **opt)
            self.last_hypergradients = grads
            t.hyper_steps += 1

        weights = self._weights_from_logits(t.weight_logits.index_select(0, idx)).float()
        if "S" in self.models:
            soft = torch.softmax(t.label_logits.index_select(0, idx).float(), -1)
        else:
            soft = y.clone()
        if self.loss == "sym_kl":
            # the target whose soft cross-entropy has the gradient of the symmetric KL at these logits
            log_s = torch.log_softmax(t.label_logits.index_select(0, idx).float(), -1) if "S" in self.models else None
            z = ctx.logits.detach().float()
            soft = torch.softmax(z, -1) - loss_residual(z, soft, "sym_kl", log_s)
        summary = torch.stack([weights.mean(), weights.min(), weights.max(),
                               (soft.argmax(-1) != y.argmax(-1)).float().mean(), t.hyper_steps.float()])

        def summaries() -> Dict[str, Any]:
            mean, lo, hi, relabelled, steps = summary.tolist()
            out = {"weight_mean": mean, "weight_min": lo, "weight_max": hi, "relabelled": relabelled,
                   "hyper_steps": int(steps)}
            out.update({k: f() for k, f in lazy.items()})
            return out

        keys = ("weight_mean", "weight_min", "weight_max", "relabelled", "hyper_steps") + tuple(lazy)
        self.last_stats = StepStats(eager, summaries, summary_keys=keys)
        return weights.detach(), soft.detach(), scores

    def _save_rows(self, rows: torch.Tensor, *tables: torch.Tensor) -> None:
        """Record ``rows`` of ``tables`` before this call writes them (for :meth:`rollback`)."""
        for table in tables:
            self._undo["rows"].append((table, rows, table.index_select(0, rows).clone()))

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        """Put back every table row this call wrote, the hyper-step count and the pending
        augmentation record (so a retried call equals an uninterrupted one)."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        for table, rows, old in reversed(undo["rows"]):
            table.index_copy_(0, rows, old)
        self.tables.hyper_steps.copy_(undo["hyper_steps"])
        self._pending, self._augment_calls = undo["pending"], undo["augment_calls"]
        self.last_hypergradients = undo["last_hypergradients"]

    def _hypergradients(self, ctx: RefineContext, w_logits, lab_logits, pending):
        """Hypergradients ``dL_val/dlam`` of this batch's rows (no table is changed here)."""
        learn_w, learn_s, learn_a = ("W" in self.models), ("S" in self.models), ("A" in self.models)
        wl = w_logits.detach().clone().requires_grad_(learn_w)
        sl = lab_logits.detach().clone().requires_grad_(learn_s)
        w = self._weights_from_logits(wl)
        if learn_s:
            s, log_s = torch.softmax(sl, -1), torch.log_softmax(sl, -1)
        else:
            s, log_s = ctx.targets, None
        coef, denom = self._coefficients(ctx, w)
        aug_leaves = [leaf for (_, gl, ml) in pending for leaf in (gl, ml)] if learn_a else []
        leaves = [wl, sl] + aug_leaves
        v = ctx.direction()
        extra: Dict[str, Any] = {}
        z = ctx.logits
        if self.hyper_params == "head":
            head, head_name = self._head_params(ctx)
            a = ctx.features()
            if not (learn_a and aug_leaves):
                a, z = a.detach(), z.detach()
            keys = [f"{head_name}.weight"] + ([f"{head_name}.bias"] if head.bias is not None else [])
            missing = [k for k in keys if k not in v]
            if missing:
                raise ConfigurationError(f"the refiner's validation direction has no entry for {missing}",
                                         "use the refiner's default mode='last_layer'")
            val_grad = [-v[k].float() for k in keys]
            prob = HeadProblem(a, z, coef, s, float(denom), loss=self.loss, damping=self.damping,
                               bias=head.bias is not None, log_targets=None if log_s is None else log_s)
            u = [t.float() for t in prob.inverse_hvp(val_grad, self.alpha, self.neumann_steps, self.scaled)]
            e = loss_residual(z.float(), s, self.loss, log_s)
            proj = a.float() @ u[0].t()
            if len(u) > 1:
                proj = proj + u[1]
            mixed = (coef[:, None] * e * proj).sum() / denom
            needs = [l for l in leaves if l.requires_grad]
            got = _grad_through(mixed, needs) if needs and mixed.requires_grad else [None] * len(needs)
            found = dict(zip(map(id, needs), got))
            hg = [(-found[id(l)] if found.get(id(l)) is not None else torch.zeros_like(l)) for l in leaves]
            scores = last_layer_scores(a.detach(), z.detach(), -u[0], -u[1] if len(u) > 1 else None).float()
            u_head = u
        else:
            named = dict(ctx.scoring.net.named_parameters())
            names = [n for n in named if named[n].requires_grad and any(
                n == p or n.startswith(p.rstrip(".") + ".") for p in self.hyper_params)]
            if not names:
                raise ConfigurationError(f"hyper_params {list(self.hyper_params)} match no trainable parameter",
                                         "pass prefixes of model.named_parameters(), e.g. ['fc', 'features.8']")
            missing = [n for n in names if n not in v]
            if missing:
                raise ConfigurationError(f"the refiner's validation direction has no entry for {missing[:3]}",
                                         "build the refiner with mode='full' (or 'double_backward')")
            per = self._per_sample(z, s, log_s)
            train_loss = (coef * per).sum() / denom
            hg, u = ift_hypergradient(train_loss, [named[n] for n in names], [-v[n].float() for n in names], leaves,
                                      alpha=self.alpha, iters=self.neumann_steps, scaled=self.scaled,
                                      damping=self.damping)
            head_name = ctx.scoring.head_name
            hw = f"{head_name}.weight" if head_name else None
            u_head = None
            if hw in names:
                u_head = [u[names.index(hw)]] + ([u[names.index(f"{head_name}.bias")]] if f"{head_name}.bias" in names else [])
                scores = last_layer_scores(ctx.features().detach(), z.detach(), -u_head[0],
                                           -u_head[1] if len(u_head) > 1 else None).float()
            else:
                scores = torch.zeros(ctx.batch, ctx.num_classes, dtype=torch.float32, device=z.device)
        grads: Dict[str, Any] = {"W": hg[0].detach(), "S": hg[1].detach()}
        if aug_leaves:
            rows = torch.cat([r.expand(gl.shape[0]) if r.numel() == 1 else r for (r, gl, _) in pending])
            g_gate = torch.cat([hg[2 + 2 * k] for k in range(len(pending))]).detach()
            g_mag = torch.cat([hg[3 + 2 * k] for k in range(len(pending))]).detach()
            uniq, inv = torch.unique(rows, return_inverse=True)
            sum_rows = lambda g: torch.zeros(uniq.shape[0], g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, inv, g)  # noqa: E731
            grads["A"] = (uniq, sum_rows(g_gate).to(self.tables.gate_logits.dtype),
                          sum_rows(g_mag).to(self.tables.magnitude_logits.dtype))
            norm_a = torch.sqrt((g_gate ** 2).sum() + (g_mag ** 2).sum())
            extra["hypergrad_norm_A"] = lambda: float(norm_a)
        norm_w, norm_s = grads["W"].norm(), grads["S"].norm()
        extra["hypergrad_norm_W"] = lambda: float(norm_w)
        extra["hypergrad_norm_S"] = lambda: float(norm_s)
        if u_head is not None:
            vg = [-v[k].float() for k in ([f"{ctx.scoring.head_name}.weight", f"{ctx.scoring.head_name}.bias"][:len(u_head)])]
            sums = torch.stack([sum((ui * gi).sum() for ui, gi in zip(u_head, vg)),
                                sum((ui ** 2).sum() for ui in u_head), sum((gi ** 2).sum() for gi in vg)])

            def head_stats():
                dot, uu, gg = sums.double().tolist()
                nu, ng = math.sqrt(uu), math.sqrt(gg)
                return {"u_norm": nu, "cos_u_val_grad": dot / max(nu * ng, 1e-30)}

            extra["u_norm"] = lambda: head_stats()["u_norm"]
            extra["cos_u_val_grad"] = lambda: head_stats()["cos_u_val_grad"]
        val_loss = ctx.val_loss()
        extra["val_loss"] = lambda: float(val_loss)
        return grads, scores, extra

    def _per_sample(self, z, s, log_s):
        from ..hypergrad import per_sample_loss
        return per_sample_loss(z, s, self.loss, log_s)

    # ------------------------------------------------------------------ inspection
    def weights(self) -> torch.Tensor:
        """The learned loss weight of every point, ``(num_points,)``."""
        return self._weights_from_logits(self.tables.weight_logits).detach().clone()

    def soft_labels(self) -> torch.Tensor:
        """The learned soft label of every point, ``(num_points, C)`` (rows never seen: uniform)."""
        return torch.softmax(self.tables.label_logits, -1).detach().clone()

    def gate_probabilities(self) -> torch.Tensor:
        """``P(op on)`` per augmentation row and operation, ``(R, K)``."""
        return torch.sigmoid(self.tables.gate_logits).detach().clone()

    def magnitude_scales(self) -> torch.Tensor:
        """The learned magnitude scale ``sigmoid(M)`` per row and operation, ``(R, K)``."""
        return torch.sigmoid(self.tables.magnitude_logits).detach().clone()

    def seen(self) -> torch.Tensor:
        """Bool ``(num_points,)``: points visited at least once."""
        return self.tables.given_labels >= 0

    def table_bytes(self) -> int:
        """Memory of the tables and their RMSprop state, in bytes."""
        return self.tables.nbytes()

    def class_report(self, true_labels=None) -> List[Dict[str, Any]]:
        """Per class (of the given labels): points seen, mean/std weight, share relabelled (soft-label
        argmax differs from the given label), mean soft-label confidence, mean gate probability per
        operation (per-point augmentation); with ``true_labels`` also the share of wrong given labels,
        the share of those recovered (argmax = true class), and the mean weight of clean / wrong points.
        """
        t = self.tables
        given = t.given_labels.cpu()
        w = self.weights().cpu()
        soft = self.soft_labels().cpu()
        arg = soft.argmax(-1)
        gates = self.gate_probabilities().cpu() if self.augment_mode == "per_point" else None
        true = None if true_labels is None else torch.as_tensor(true_labels).long().cpu()
        rows = []
        for c in range(self.num_classes):
            m = given == c
            n = int(m.sum())
            if n == 0:
                continue
            r: Dict[str, Any] = {"class": c, "points": n, "weight_mean": float(w[m].mean()),
                                 "weight_std": float(w[m].std()) if n > 1 else 0.0,
                                 "relabelled": float((arg[m] != c).float().mean()),
                                 "confidence": float(soft[m].max(-1).values.mean())}
            if true is not None:
                wrong = m & (true != c)
                clean = m & (true == c)
                r["wrong_given"] = float(wrong.float().sum() / n)
                r["recovered"] = float((arg[wrong] == true[wrong]).float().mean()) if wrong.any() else float("nan")
                r["weight_clean"] = float(w[clean].mean()) if clean.any() else float("nan")
                r["weight_wrong"] = float(w[wrong].mean()) if wrong.any() else float("nan")
            if gates is not None:
                for k, op in enumerate(self.ops):
                    r[f"p_{op}"] = float(gates[m, k].mean())
            rows.append(r)
        return rows

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"config": {"num_points": self.num_points, "num_classes": self.num_classes, "ops": list(self.ops),
                           "augment": self.augment_mode, "models": self.models},
                "tables": {k: v.detach().clone() for k, v in self.tables.state_dict().items()}}

    def check_state(self, state: Any) -> None:
        """Raise (changing nothing) unless ``state`` is a complete, finite AutoDO state for this policy."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
                or not isinstance(state.get("tables"), dict):
            raise ConfigurationError("an AutoDO state needs 'config' and 'tables' dicts", "load a state saved by AutoDO")
        cfg = state["config"]
        mine = self.state_dict()["config"]
        diff = [k for k in ("num_points", "num_classes", "ops", "augment") if cfg.get(k) != mine[k]]
        if diff:
            raise ConfigurationError(f"AutoDO state was saved with different {diff}: "
                                     f"{ {k: cfg.get(k) for k in diff} } vs { {k: mine[k] for k in diff} }",
                                     "build the policy with the same num_points, num_classes, ops and augment")
        own = self.tables.state_dict()
        tabs = state["tables"]
        bad = [k for k in own if k not in tabs or not torch.is_tensor(tabs[k]) or tabs[k].shape != own[k].shape]
        if bad:
            raise ConfigurationError(f"AutoDO state tables missing or mis-shaped: {bad}", "load a state saved by AutoDO")
        if nonfinite([tabs[k] for k in own]):
            raise NonFiniteError("AutoDO state tables hold NaN/inf", "load an intact checkpoint")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_state(state)
        own = self.tables.state_dict()
        self.tables.load_state_dict({k: state["tables"][k] for k in own})
        self._pending = []
        self._augment_calls = 0
        self._undo = None


def _grad_through(output: torch.Tensor, leaves):
    """``torch.autograd.grad`` of the hyper-objective, with a reentrant activation checkpoint on the
    way to the augmentation's parameters (which ``grad`` cannot pass) named as the cause."""
    try:
        return torch.autograd.grad(output, leaves, retain_graph=True, allow_unused=True)
    except RuntimeError as e:
        if "reentrant" not in str(e) and "not compatible with .grad()" not in str(e):
            raise
        raise UnsupportedModelError(
            "the model runs part of its forward in torch.utils.checkpoint(..., use_reentrant=True), through "
            "which torch.autograd.grad cannot take AutoDO's hypergradient to the augmentation's parameters",
            f"use {NON_REENTRANT}, or AutoDO(models='WS') (weights and soft labels, no learned augmentation)") from None
