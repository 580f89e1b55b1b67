"""A small controlled study of augmentation refinement: the demo runs it, and the benchmarks reuse it.

Setting: a training set of images, an upstream augmentation that produces ``views`` augmented copies
of each image (precomputed once, a "view bank"), and a share ``noise`` of those augmented copies given
a wrong label (label-breaking augmentation). Each epoch every image is paired with one random view.
Arms:

``none``      originals only, plain cross-entropy;
``upstream``  originals + augmented views as given (``method="none"``);
``saflex``    originals + views refined by SAflex;
``l2rw``      originals + views reweighted by L2RW;
``clean``     originals + views with their true labels (the ceiling a perfect refiner could reach);
``oracle-weights``  originals + views, the corrupted views at weight 0 and the clean ones
              renormalized to mean 1 over the augmented rows (the ceiling of any per-sample weighting
              that keeps the given labels).

With ``aug_only=True`` the batches hold augmented views only (the ``none`` arm is unchanged).
Metrics: test accuracy, and on the augmented rows after warm-up the AUC of the weights and of the
agreement ``y~^T g`` for "label is clean", the kept share of clean and corrupted views, and the share
of corrupted views whose refined label is the true class.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..methods import renormalize
from ..models import SmallCNN
from .. import refiner as _refiner
from ..refiner import AugmentationRefiner

__all__ = ["StudyData", "make_view_bank", "corrupt_views", "view_batches", "run_arm", "binary_auc", "accuracy"]


@dataclass
class StudyData:
    """Normalized float images (N, 1, H, W) and labels for train / val / test, plus the view bank."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    views: torch.Tensor  # (N, V, 1, H, W) float, normalized
    view_labels: torch.Tensor  # (N, V) labels given to the views (some corrupted)
    num_classes: int
    extra: Dict[str, Any] = field(default_factory=dict)


def make_view_bank(images_u8: torch.Tensor, transform: Callable, views: int, seed: int = 0,
                   progress: bool = False) -> torch.Tensor:
    """Apply a PIL ``transform`` (e.g. timm RandAugment) ``views`` times to each uint8 (N, H, W) image."""
    import random

    from PIL import Image

    state = random.getstate()
    random.seed(seed)
    np_state = np.random.get_state()
    np.random.seed(seed)
    try:
        arr = images_u8.numpy()
        out = np.empty((arr.shape[0], views) + arr.shape[1:], dtype=np.uint8)
        it = range(arr.shape[0])
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="augmenting", leave=False)
        for i in it:
            im = Image.fromarray(arr[i], mode="L")
            for v in range(views):
                out[i, v] = np.asarray(transform(im), dtype=np.uint8)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    return torch.from_numpy(out)


def corrupt_views(labels: torch.Tensor, views: int, rate: float, num_classes: int, seed: int = 0,
                  kind: str = "random"):
    """Labels (N, V) for the views, a share ``rate`` of them wrong.

    ``kind="random"``: the wrong label is drawn uniformly among the other classes (symmetric noise).
    ``kind="pairflip"``: class ``c`` becomes ``c + 1 mod C`` (structured, class-dependent noise, as
    when an augmentation systematically turns one class into another).
    """
    if kind not in ("random", "pairflip"):
        raise ValueError(f"kind must be 'random' or 'pairflip', got {kind!r}")
    g = torch.Generator().manual_seed(seed + 7919)
    lab = labels[:, None].repeat(1, views)
    noisy = torch.rand(lab.shape, generator=g) < rate
    shift = torch.randint(1, num_classes, lab.shape, generator=g) if kind == "random" else torch.ones_like(lab)
    lab = torch.where(noisy, (lab + shift) % num_classes, lab)
    return lab, noisy


def view_batches(n: int, views: int, batch_size: int, epochs: int, generator: torch.Generator):
    """The training order of a view-bank study: for each epoch a fresh permutation of the ``n``
    images and one of their ``views`` precomputed views per image, drawn from ``generator``; yields
    ``(image indices, view indices)`` batch by batch."""
    if n < 1 or views < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(f"view_batches needs n, views and batch_size >= 1 and epochs >= 0, got {n}, {views}, "
                         f"{batch_size}, {epochs}")
    steps = math.ceil(n / batch_size)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        pick = torch.randint(0, views, (n,), generator=generator)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            yield idx, pick[idx]


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` (ties count one half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (the model is put back in train mode)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / len(y)


def run_arm(data: StudyData, arm: str, seed: int, *, epochs: int = 10, batch_size: int = 128, lr: float = 0.05,
            weight_decay: float = 5e-4, aug_only: bool = False, val_batch_size: int = 500,
            model_fn: Optional[Callable[[], nn.Module]] = None, refiner_kwargs: Optional[dict] = None,
            warmup_epochs: float = 0.0) -> Dict[str, float]:
    """Train one arm with one seed and return its metrics (see the module docstring).

    ``refiner_kwargs`` go to :class:`~augplug.AugmentationRefiner`; a ``method`` among them (e.g. a
    :class:`~augplug.methods.Policy`) replaces the method the arm names. SAflex arms on augmented views
    alone refine them (``strength=1.0``; the refiner's default would train them as given). The refiners
    use the exact schedule (``budget=None``) unless ``refiner_kwargs`` says otherwise."""
    torch.manual_seed(seed)
    n, v = data.view_labels.shape
    side = data.x_train.shape[-1]
    model = model_fn() if model_fn else SmallCNN(1, data.num_classes, img_size=side)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    # cosine decay in closed form (as transformers' get_cosine_schedule_with_warmup builds it); torch's
    # CosineAnnealingLR updates recursively, so its rates drift from the formula in the last bits
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    refiner = None
    if arm not in ("none", "oracle-weights"):
        kw = dict(refiner_kwargs or {})
        method = kw.pop("method", {"upstream": "none", "clean": "none"}.get(arm, arm))
        val_ds = torch.utils.data.TensorDataset(data.x_val, data.y_val)
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=val_batch_size, shuffle=True)
        kw.setdefault("warmup_steps", int(warmup_epochs * steps_per_epoch))
        kw.setdefault("seed", seed)
        # the exact schedule, so a seed reproduces the study's table bit for bit (the default overhead
        # budget spaces validation work by measured time; its cost and quality are in the benchmarks)
        kw.setdefault("budget", None)
        if method == "saflex" and aug_only:  # the study measures the refinement itself, also without originals
            kw.setdefault("strength", 1.0)
        refiner = AugmentationRefiner(model, opt, val_loader, method=method, **_refiner.refiner_kwargs(kw))
    g = torch.Generator().manual_seed(seed + 1)
    true_view_labels = data.y_train[:, None].expand(n, v)
    rec = {"w": [], "agree": [], "clean": [], "relabel_true": []}
    t0 = time.perf_counter()
    model.train()
    for idx, vi in view_batches(n, v, batch_size, epochs, g):
        xo, yo = data.x_train[idx], data.y_train[idx]
        if arm == "none":
            loss = F.cross_entropy(model(xo), yo)
        else:
            xa = data.views[idx, vi]
            ya = yo if arm == "clean" else data.view_labels[idx, vi]
            if aug_only:
                x, y, n_orig = xa, ya, 0
            else:
                x, y, n_orig = torch.cat([xo, xa]), torch.cat([yo, ya]), len(idx)
            if arm == "oracle-weights":  # the refiner's loss with weights that know which views are clean
                clean = (ya == true_view_labels[idx, vi]).float()
                w = torch.cat([torch.ones(n_orig), renormalize(clean)])
                loss = (w * F.cross_entropy(model(x), y, reduction="none")).sum() / len(y)
            else:
                loss = refiner(model(x), y, num_original=n_orig)
                st = refiner.stats
                if refiner.share is not None:
                    rec.setdefault("share", []).append(st["aug_weight"])
                if st["active"] and arm not in ("upstream", "clean"):
                    a = st["augmented"]
                    rec["w"].append(st["weights"][a].cpu())
                    rec["agree"].append((st["scores"][a].gather(1, ya[:, None]).squeeze(1)).cpu())
                    rec["clean"].append((ya == true_view_labels[idx, vi]).cpu())
                    rec["relabel_true"].append((st["soft_targets"][a].argmax(1) == data.y_train[idx]).cpu())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    out = {"test_acc": accuracy(model, data.x_test, data.y_test), "seconds": time.perf_counter() - t0}
    if refiner is not None and refiner.budget is not None and refiner.stats:   # what a budget chose, at the end
        out["budget_choice"] = {k: refiner.stats[k] for k in ("refresh_interval", "read_interval", "overhead")
                                if k in refiner.stats}
    if rec.get("share"):
        out.update(share_mean=sum(rec["share"]) / len(rec["share"]), share_final=float(refiner.aug_weight))
    if rec["w"]:
        w, agree = torch.cat(rec["w"]).numpy(), torch.cat(rec["agree"]).numpy()
        clean, rt = torch.cat(rec["clean"]).numpy(), torch.cat(rec["relabel_true"]).numpy()
        out.update(
            auc_weight=binary_auc(w, clean), auc_agreement=binary_auc(agree, clean),
            kept_clean=float((w[clean] > 0).mean()) if clean.any() else float("nan"),
            kept_noisy=float((w[~clean] > 0).mean()) if (~clean).any() else float("nan"),
            mean_w_clean=float(w[clean].mean()) if clean.any() else float("nan"),
            mean_w_noisy=float(w[~clean].mean()) if (~clean).any() else float("nan"),
            recovered=float(rt[~clean].mean()) if (~clean).any() else float("nan"),
            clean_kept_label=float(rt[clean].mean()) if clean.any() else float("nan"),
        )
    return out
