"""Augmentation audit: which upstream transforms, and which classes, the refiner trusts.

After every refiner call, hand the audit the refiner's ``stats``, the names of the transforms that
produced each row and the rows' upstream labels::

    audit = AugmentationAudit(class_names)
    ...
    loss = refiner(model(x), y)
    audit.update(refiner.stats, names, y)
    ...
    print(audit.table(format="markdown"))
    audit.plot("audit.png")

For every upstream transform and every class it accumulates, over the augmented rows:

- ``weight_mean``: the mean refined weight (as applied in the loss: after the refiner's
  ``weight_norm``, so with the ``"augmented"``, ``"class"`` and ``"auto"`` normalizations 1 is an
  average row);
- ``kept``: the share of rows with a weight above zero;
- ``relabel_rate``: the share of rows whose refined soft target's argmax differs from the upstream
  label's argmax;
- ``agreement_mean``: the mean of ``ỹᵀg`` (the first-order drop of the validation loss from one step
  on the row with its upstream target; positive = helps, the package-wide sign), from the raw scores
  ``stats["scores"]``. SAflex's weights come from scores centred per class column within the batch
  (``normalize="center"``, its default), so they rank a row against the batch's other rows of its
  scores' classes, while the agreement is absolute: a class's ``weight_mean`` and ``agreement_mean``
  can order classes differently (a class whose views all help a lot has a high agreement and, once
  centred, average weights).

A row produced by several transforms (RandAugment applies two ops by default; an albumentations
pipeline several) counts once toward each of them in the per-transform view and once in the
per-class view. A row with no transform applied is filed under ``"identity"``.

Transform names come from:

- timm RandAugment: :class:`TracedRandAugment` wraps the object ``rand_augment_transform`` returns
  and reports the ops it applied;
- albumentations: ``A.Compose(..., save_applied_params=True)`` returns ``applied_transforms``, a
  list of ``(name, params)`` pairs, accepted as is (:func:`transform_names` drops the
  deterministic conversions in :data:`IGNORED_TRANSFORMS`);
- anything else: a string or a sequence of strings per row (e.g. generated-sample source names,
  see :mod:`augplug.sources`).
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._extras import pyplot, require
from .errors import ConfigurationError, ShapeError, TargetError
from .options import is_integer
from .targets import to_soft_targets

__all__ = ["AugmentationAudit", "TracedRandAugment", "transform_names", "IGNORED_TRANSFORMS", "IDENTITY",
           "NAME_SEP", "METRICS"]

#: Deterministic conversions of albumentations / torchvision pipelines that say nothing about the
#: augmentation a row received; dropped from transform names by default.
IGNORED_TRANSFORMS = frozenset({"Normalize", "ToTensorV2", "ToTensor", "PILToTensor", "ToFloat", "FromFloat",
                                "ToRGB", "ConvertImageDtype", "ToDtype", "ToImage"})
# (albumentations' ToGray is not among them: it is a random augmentation, p=0.5 by default)

#: The name given to rows no transform changed.
IDENTITY = "identity"

#: Separator of several names in one string (``"Rotate|Equalize"``): a dataset can return one string
#: per sample, which the default ``DataLoader`` collate turns into a list.
NAME_SEP = "|"

#: The metrics every table holds, in column order.
METRICS = ("rows", "weight_mean", "kept", "relabel_rate", "agreement_mean")


def transform_names(entry: Any, ignore: Iterable[str] = IGNORED_TRANSFORMS) -> Tuple[str, ...]:
    """One row's transform description as a tuple of names (``("identity",)`` when empty).

    Accepts a name (``"Rotate"``), names joined by ``"|"`` (``"Rotate|Equalize"``; ``""`` for none),
    a sequence of names, a sequence of albumentations
    ``(name, params)`` pairs (``out["applied_transforms"]`` of ``A.Compose(...,
    save_applied_params=True)``), or ``None``. Names in ``ignore`` are dropped; a name repeated in
    one row is kept once.
    """
    ignore = frozenset(ignore)
    if entry is None:
        items: List[Any] = []
    elif isinstance(entry, str):
        items = entry.split(NAME_SEP) if entry else []
    elif isinstance(entry, (list, tuple)):
        items = list(entry)
    else:
        raise TargetError(f"a row's transform names must be a string, a sequence of strings or of (name, params) "
                          f"pairs, got {type(entry).__name__}",
                          "pass e.g. 'Rotate', ['Rotate', 'Equalize'] or albumentations' applied_transforms")
    names: List[str] = []
    for it in items:
        if isinstance(it, (list, tuple)) and len(it) == 2 and isinstance(it[0], str):
            it = it[0]
        if not isinstance(it, str):
            raise TargetError(f"transform names must be strings, got {type(it).__name__}",
                              "pass names or albumentations' (name, params) pairs")
        if it not in ignore and it not in names:
            names.append(it)
    return tuple(names) if names else (IDENTITY,)


class _RecordingOp:
    """A RandAugment op that notes its name when it applied (its probability gate passed: timm's
    ops return the input image itself when the gate fails, a new image otherwise)."""

    def __init__(self, op, record: List[str]):
        self.op, self.record = op, record

    def __call__(self, img):
        out = self.op(img)
        if out is not img:
            self.record.append(self.op.name)
        return out


class TracedRandAugment:
    """timm's RandAugment that also returns the names of the ops it applied.

    ``traced = TracedRandAugment(rand_augment_transform("rand-m9-mstd0.5", hparams))``;
    ``img, names = traced(pil_image)``. The image comes from timm's own ``RandAugment.__call__`` on a
    copy of the transform whose ops note their names when they apply, so it is the image timm's
    transform returns under the same seeds, and nothing of timm's drawing is re-implemented.
    ``names`` lists the ops whose gate passed; with ``"rand-m9-n1-p1.0"`` each image gets exactly one.

    Args:
        transform: a ``timm.data.auto_augment.RandAugment`` (anything with ``ops`` whose ops have a
            ``name``, called as ``transform(img)``), or a config string for ``rand_augment_transform``.
        hparams: ``rand_augment_transform`` hyperparameters when ``transform`` is a string.
    """

    def __init__(self, transform: Any, hparams: Optional[Dict[str, Any]] = None):
        if isinstance(transform, str):
            from timm.data.auto_augment import rand_augment_transform
            transform = rand_augment_transform(transform, hparams or {})
        if not all(hasattr(transform, a) for a in ("ops", "num_layers")):
            raise ConfigurationError(f"{type(transform).__name__} is not a timm RandAugment",
                                     "pass the object timm.data.auto_augment.rand_augment_transform returns")
        self.transform = transform
        self.ops = list(transform.ops)
        self._applied: List[str] = []
        self._traced = copy.copy(transform)
        self._traced.ops = [_RecordingOp(op, self._applied) for op in self.ops]

    @property
    def op_names(self) -> List[str]:
        """Names of the ops this transform chooses from."""
        return [op.name for op in self.ops]

    def __call__(self, img):
        self._applied.clear()
        img = self._traced(img)
        return img, tuple(self._applied)

    def __repr__(self) -> str:
        return f"TracedRandAugment({self.transform!r})"


class _Acc:
    """Running sums of one group."""

    __slots__ = ("rows", "weight", "kept", "relabel", "agreement")

    def __init__(self):
        self.rows = 0
        self.weight = 0.0
        self.kept = 0
        self.relabel = 0
        self.agreement = 0.0

    def add(self, w: float, kept: bool, relabel: bool, agreement: float) -> None:
        self.rows += 1
        self.weight += w
        self.kept += int(kept)
        self.relabel += int(relabel)
        self.agreement += agreement

    def merge(self, other: "_Acc") -> None:
        self.rows += other.rows
        self.weight += other.weight
        self.kept += other.kept
        self.relabel += other.relabel
        self.agreement += other.agreement

    def summary(self) -> Dict[str, float]:
        n = self.rows
        if n == 0:
            return {"rows": 0, "weight_mean": math.nan, "kept": math.nan, "relabel_rate": math.nan,
                    "agreement_mean": math.nan}
        return {"rows": n, "weight_mean": self.weight / n, "kept": self.kept / n, "relabel_rate": self.relabel / n,
                "agreement_mean": self.agreement / n}


class AugmentationAudit:
    """Per upstream transform and per class: mean weight, kept share, relabel rate, agreement.

    Args:
        class_names: names of the classes in label order (their count fixes ``num_classes``), or
            None (classes are then named by their index and ``num_classes`` is required or taken
            from the first update).
        num_classes: the number of classes when ``class_names`` is None.
        ignore: transform names to drop (default: the deterministic conversions
            :data:`IGNORED_TRANSFORMS`).
        only_active: skip calls made during the refiner's warm-up (``stats["active"]`` False),
            whose weights are all 1 by construction.
    """

    def __init__(self, class_names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 ignore: Iterable[str] = IGNORED_TRANSFORMS, only_active: bool = True):
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if num_classes is not None and int(num_classes) != len(class_names):
                raise ConfigurationError(f"num_classes={num_classes} but {len(class_names)} class names",
                                         "pass one of them, or make them agree")
            num_classes = len(class_names)
        self.class_names = class_names
        self.num_classes = None if num_classes is None else int(num_classes)
        self.ignore = frozenset(ignore)
        self.only_active = bool(only_active)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._cells: Dict[Tuple[str, int], _Acc] = defaultdict(_Acc)   # (transform, class) -> sums
        self._by_class: Dict[int, _Acc] = defaultdict(_Acc)            # class -> sums, a row once
        self._total = _Acc()
        self.updates = 0

    # ------------------------------------------------------------------ accumulation
    def update(self, stats: Mapping[str, Any], names: Sequence[Any], labels: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> bool:
        """Add one refiner call.

        Args:
            stats: ``refiner.stats`` right after the call (``weights``, ``soft_targets``, ``augmented``;
                ``scores`` and ``active`` when present).
            names: one entry per row of the batch, or one per augmented row (in batch
                order); each entry as accepted by :func:`transform_names`.
            labels: the upstream targets passed to the refiner: class indices ``(B,)`` or
                probabilities ``(B, C)`` (Mixup/CutMix); a row's class is the argmax.
            rows: optional bool mask ``(B,)`` restricting the update to some augmented rows.

        Returns:
            True when the call was counted, False when skipped (warm-up, no augmented rows).
        """
        for key in ("weights", "soft_targets", "augmented"):
            if key not in stats:
                raise ConfigurationError(f"stats has no {key!r}", "pass refiner.stats right after a refiner call")
        w = stats["weights"].detach().float().cpu()
        soft = stats["soft_targets"].detach().float().cpu()
        aug = stats["augmented"].detach().bool().cpu()
        batch, num_classes = soft.shape
        if w.shape != (batch,) or aug.shape != (batch,):
            raise ShapeError(f"stats hold {tuple(w.shape)} weights and a {tuple(aug.shape)} mask for {batch} rows",
                             "pass refiner.stats unchanged")
        if self.num_classes is not None and num_classes != self.num_classes:
            raise ShapeError(f"the refiner's soft targets have {num_classes} classes, the audit {self.num_classes}",
                             "build the audit with the model's class names")
        y = to_soft_targets(torch.as_tensor(labels).detach().cpu(), num_classes, batch_size=batch,
                            what="audit labels").float()
        if rows is not None:
            rows = torch.as_tensor(rows).bool().cpu()
            if rows.shape != (batch,):
                raise ShapeError(f"rows= must be a bool mask of shape ({batch},), got {tuple(rows.shape)}", "")
            sel = aug & rows
        else:
            sel = aug
        n_aug = int(aug.sum())
        if isinstance(names, str):
            raise TargetError("names must hold one entry per row, got a single string",
                              "pass a list such as ['Rotate', 'identity', ...]")
        names = names.tolist() if torch.is_tensor(names) or isinstance(names, np.ndarray) else list(names)
        if len(names) == n_aug and n_aug != batch:  # one entry per augmented row: spread to batch order
            full: List[Any] = [None] * batch
            for j, i in enumerate(torch.nonzero(aug).flatten().tolist()):
                full[i] = names[j]
            names = full
        elif len(names) != batch:
            raise ShapeError(f"got transform names for {len(names)} rows; the batch has {batch} rows, "
                             f"{n_aug} of them augmented", "pass one entry per row or one per augmented row")
        parsed = {i: transform_names(names[i], self.ignore) for i in torch.nonzero(sel).flatten().tolist()}
        if self.only_active and not stats.get("active", True):
            return False
        if not parsed:
            return False
        scores = stats.get("scores")
        agree = ((y * scores.detach().float().cpu()).sum(-1) if scores is not None
                 else torch.zeros(batch))
        cls = y.argmax(-1)
        relabel = soft.argmax(-1) != cls
        if self.num_classes is None:
            self.num_classes = num_classes
        for i, tnames in parsed.items():
            c, wi, ri, ai = int(cls[i]), float(w[i]), bool(relabel[i]), float(agree[i])
            for t in tnames:
                self._cells[(t, c)].add(wi, wi > 0, ri, ai)
            self._by_class[c].add(wi, wi > 0, ri, ai)
            self._total.add(wi, wi > 0, ri, ai)
        self.updates += 1
        return True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The accumulated sums as plain Python values (checkpoint it, or gather it across processes)."""
        def acc(a: _Acc):
            return [a.rows, a.weight, a.kept, a.relabel, a.agreement]
        return {"cells": [[t, c, *acc(a)] for (t, c), a in self._cells.items()],
                "by_class": [[c, *acc(a)] for c, a in self._by_class.items()],
                "total": acc(self._total), "updates": self.updates, "num_classes": self.num_classes,
                "class_names": None if self.class_names is None else list(self.class_names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the accumulated sums by those of :meth:`state_dict`; a state that does not fit is
        a typed error that leaves the audit as it was."""
        parsed = self._parse_state(state, replacing=True)
        self.reset()
        self._apply_state(parsed)

    def merge(self, other: Union["AugmentationAudit", Mapping[str, Any]]) -> "AugmentationAudit":
        """Add another audit's sums (or its :meth:`state_dict`) to this one. One audit per process,
        combined: ``total = AugmentationAudit(classes)``, then ``total.merge(s)`` for each ``s`` in
        ``accelerator.gather_object([audit.state_dict()])``. A state that does not fit is a typed
        error that leaves the audit as it was."""
        state = other.state_dict() if isinstance(other, AugmentationAudit) else other
        self._apply_state(self._parse_state(state, replacing=False))
        return self

    def _parse_state(self, state: Mapping[str, Any], replacing: bool) -> Dict[str, Any]:
        """Check a whole :meth:`state_dict` before any of it is used, and return it as numbers."""
        if not isinstance(state, Mapping):
            raise ConfigurationError(f"an audit state must be a mapping, got {type(state).__name__}",
                                     "pass what AugmentationAudit.state_dict() returned")
        what = "load" if replacing else "merge"
        fix = "pass what AugmentationAudit.state_dict() returned, unchanged"
        n = state.get("num_classes")
        if n is not None and not is_integer(n):
            raise ConfigurationError(f"the audit state's num_classes is {n!r}, not a number of classes", fix)
        if n is not None and self.num_classes is not None and int(n) != self.num_classes:
            raise ShapeError(f"cannot {what} an audit over {n} classes into one over {self.num_classes}",
                             f"{what} audits built with the same classes")
        names = state.get("class_names")
        if names is not None and self.class_names is not None and [str(c) for c in names] != list(self.class_names):
            raise ShapeError(f"cannot {what} an audit whose classes are {list(names)[:6]} into one whose classes "
                             f"are {list(self.class_names)[:6]} (another order files rows under other classes)",
                             f"{what} audits built with the same class names in the same order")

        def sums(vals):
            rows, weight, kept, relabel, agreement = vals
            out = int(rows), float(weight), int(kept), int(relabel), float(agreement)
            if out[0] < 0 or not 0 <= out[2] <= out[0] or not 0 <= out[3] <= out[0] or \
                    not (math.isfinite(out[1]) and math.isfinite(out[4])):
                raise ValueError(f"impossible sums {list(vals)} (negative counts, more kept than rows, or NaN)")
            return out

        try:
            cells = [((str(t), int(c)), sums(vals)) for t, c, *vals in state["cells"]]
            by_class = [(int(c), sums(vals)) for c, *vals in state["by_class"]]
            total, updates = sums(state["total"]), int(state["updates"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigurationError(f"the audit state is malformed ({type(e).__name__}: {e})", fix) from None
        classes = n if n is not None else self.num_classes
        labels = [c for (_, c), _ in cells] + [c for c, _ in by_class]
        if labels and classes is None:
            raise ConfigurationError("the audit state counts rows by class but says over how many classes",
                                     "build the audit with num_classes= (or class_names=) before loading")
        bad = sorted({c for c in labels if not 0 <= c < int(classes)}) if labels else []
        if bad:
            raise ShapeError(f"the audit state holds classes {bad[:6]} outside 0..{int(classes) - 1}",
                             f"{what} audits built with the same classes")
        if sum(v[0] for _, v in by_class) != total[0] or updates < 0:
            raise ConfigurationError("the audit state's totals do not add up (its class rows against its total)", fix)
        return {"cells": cells, "by_class": by_class, "total": total, "updates": updates,
                "num_classes": None if n is None else int(n)}

    def _apply_state(self, parsed: Dict[str, Any]) -> None:
        def add(a: _Acc, vals) -> None:
            a.rows += vals[0]
            a.weight += vals[1]
            a.kept += vals[2]
            a.relabel += vals[3]
            a.agreement += vals[4]

        for key, vals in parsed["cells"]:
            add(self._cells[key], vals)
        for c, vals in parsed["by_class"]:
            add(self._by_class[c], vals)
        add(self._total, parsed["total"])
        self.updates += parsed["updates"]
        if self.num_classes is None and parsed["num_classes"] is not None:
            self.num_classes = parsed["num_classes"]

    # ------------------------------------------------------------------ views
    @property
    def transforms(self) -> List[str]:
        """Transform names seen so far, by decreasing row count."""
        counts: Dict[str, int] = defaultdict(int)
        for (t, _), acc in self._cells.items():
            counts[t] += acc.rows
        return sorted(counts, key=lambda t: (-counts[t], t))

    def class_name(self, c: int) -> str:
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return self.class_names[c]
        return str(c)

    def summary(self) -> Dict[str, float]:
        """The metrics over every counted row."""
        return self._total.summary()

    def records(self, by: str = "transform", sort: Optional[str] = None) -> List[Dict[str, Any]]:
        """Rows of the table as dicts: ``by="transform"``, ``"class"`` or ``"transform_class"``;
        ``sort``: a metric to order the rows by (decreasing; default: transforms by row count, classes
        by label)."""
        if sort is not None and sort not in METRICS:
            raise ConfigurationError(f"unknown metric {sort!r} to sort by", f"use one of {METRICS}")
        out: List[Dict[str, Any]] = []
        if by == "transform":
            for t in self.transforms:
                acc = _Acc()
                for (tt, _), a in self._cells.items():
                    if tt == t:
                        acc.merge(a)
                out.append({"transform": t, **acc.summary()})
        elif by == "class":
            for c in sorted(self._by_class):
                out.append({"class": self.class_name(c), **self._by_class[c].summary()})
        elif by == "transform_class":
            for t in self.transforms:
                for c in sorted({c for (tt, c) in self._cells if tt == t}):
                    out.append({"transform": t, "class": self.class_name(c), **self._cells[(t, c)].summary()})
        else:
            raise ConfigurationError(f"by must be 'transform', 'class' or 'transform_class', got {by!r}",
                                     "use by='transform'")
        if sort is not None:
            out.sort(key=lambda r: -r[sort] if r[sort] == r[sort] else math.inf)
        return out

    def matrix(self, metric: str = "weight_mean") -> Tuple[List[str], List[str], np.ndarray]:
        """``(transforms, classes, values)``: ``metric`` per transform (rows) and class (columns); NaN
        where a transform never met a class."""
        if metric not in METRICS:
            raise ConfigurationError(f"unknown metric {metric!r}", f"use one of {METRICS}")
        ts = self.transforms
        n_cls = self.num_classes or (max((c for _, c in self._cells), default=-1) + 1)
        vals = np.full((len(ts), n_cls), np.nan)
        for (t, c), acc in self._cells.items():
            vals[ts.index(t), c] = acc.summary()[metric]
        return ts, [self.class_name(c) for c in range(n_cls)], vals

    def table(self, by: str = "transform", format: str = "pandas", digits: int = 3, sort: Optional[str] = None):
        """The audit as a ``pandas.DataFrame`` (``format="pandas"``, needs ``pip install "augplug[report]"``),
        a markdown string (``"markdown"``) or a list of dicts (``"records"``); ``by`` and ``sort`` as in
        :meth:`records`."""
        recs = self.records(by, sort)
        if format == "records":
            return recs
        if format == "pandas":
            pd = require("pandas", "report", f"{type(self).__name__}.table(format='pandas')")
            cols = [k for k in ("transform", "class") if by in (k, "transform_class")] + list(METRICS)
            return pd.DataFrame(recs, columns=cols)
        if format == "markdown":
            return _markdown(recs, digits)
        raise ConfigurationError(f"format must be 'pandas', 'markdown' or 'records', got {format!r}",
                                 "use format='markdown'")

    def plot(self, path: Union[str, Path], title: str = "Augmentation audit", max_transforms: int = 30) -> Path:
        """Save a figure read at a glance: per transform, the mean refined weight drawn from 1 (an
        average row) with an axis fitted to the spread, and per transform and class the mean weight
        on a colour scale centred at 1 (blue: trusted more than average, red: less). A relabel-rate
        heat map is added only when some row was relabelled. Needs matplotlib
        (``pip install "augplug[plot]"``); returns the path."""
        plt = pyplot("plot", f"{type(self).__name__}.plot()")
        from matplotlib.colors import TwoSlopeNorm

        ts, classes, wmat = self.matrix("weight_mean")
        _, _, rmat = self.matrix("relabel_rate")
        if not ts:
            raise ConfigurationError("the audit holds no rows yet", "call update() after refiner calls first")
        ts, wmat, rmat = ts[:max_transforms], wmat[:max_transforms], rmat[:max_transforms]
        per_t = {r["transform"]: r for r in self.records("transform")}
        relabelled = bool(np.nan_to_num(rmat).max() > 0)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        height = max(2.6, 0.28 * len(ts) + 1.4)
        heat_w = 0.28 * len(classes) + 1.2
        widths = [3.2, heat_w] + ([heat_w] if relabelled else [])
        fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths) + 1.4, height),
                                 gridspec_kw={"width_ratios": widths})
        try:
            y = np.arange(len(ts))
            w = np.array([per_t[t]["weight_mean"] for t in ts], dtype=float)
            ax = axes[0]
            ax.barh(y, w - 1.0, left=1.0, color=np.where(w >= 1.0, "#4C72B0", "#C44E52"), height=0.6)
            ax.axvline(1.0, color="black", lw=0.8)
            spread = float(np.nanmax(np.abs(w - 1.0))) if np.isfinite(w).any() else 0.0
            pad = max(spread * 1.25, 0.02)
            ax.set_xlim(1.0 - pad, 1.0 + pad)
            ax.set_yticks(y)
            ax.set_yticklabels([f"{t} ({per_t[t]['rows']})" for t in ts], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("mean weight (1 = average row)", fontsize=8)
            ax.set_title("per transform (rows)", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            finite = wmat[np.isfinite(wmat)]
            dev = float(np.abs(finite - 1.0).max()) if finite.size else 0.0
            norm = TwoSlopeNorm(vcenter=1.0, vmin=1.0 - max(dev, 1e-3), vmax=1.0 + max(dev, 1e-3))
            panels = [(axes[1], wmat, "mean weight (transform × class)", "RdBu", norm)]
            if relabelled:
                panels.append((axes[2], rmat, "relabel rate (transform × class)", "magma", None))
            for ax, mat, name, cmap, nrm in panels:
                im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, norm=nrm)
                ax.set_xticks(np.arange(len(classes)))
                ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=7)
                ax.set_yticks(y)
                ax.set_yticklabels([])
                ax.set_title(name, fontsize=9)
                cb = fig.colorbar(im, ax=ax, fraction=0.08)
                cb.ax.tick_params(labelsize=7)
            fig.suptitle(title + ("" if relabelled else " (no row relabelled)"), fontsize=10)
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def _markdown(recs: List[Dict[str, Any]], digits: int) -> str:
    if not recs:
        return ""
    cols = list(recs[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in recs:
        lines.append("| " + " | ".join(_fmt(r[c], digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"
