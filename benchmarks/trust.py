"""Trust benchmark: does turning the refiner on ever cost accuracy?

Every protocol runs each usage pattern against its controls, on three offline data sets and four
kinds of upstream augmentation, with paired seeds.

Data sets (seeded, stratified splits; 28x28 grey images get a small CNN, the table an MLP):
  ``fmnist``  Fashion-MNIST, 3,000 train / 500 clean validation / 2,000 test;
  ``digits``  scikit-learn digits (8x8), 1,000 / 300 / 497;
  ``letter``  UCI Letter (16 features, 26 classes), 3,000 / 500 / 4,000.

``--optimizer sgd`` trains every arm with SGD (lr 0.05, momentum 0.9) instead of Adam (lr 1e-3).
``--image-model cnn-group`` trains every arm's images with GroupNorm instead of BatchNorm (per-sample
statistics: the views in a one-batch forward then do not change how the originals are normalized).

Held out (run only when named; no default was chosen on them): ``spambase`` UCI Spambase (57
features, 2 classes), 3,000 / 500 / 1,101; ``cancer`` scikit-learn breast cancer (30 features,
2 classes), 250 / 100 / 219. Both get the table's MLP and views. Two more, added after every
default of the code they first ran with was fixed and run once with those defaults: ``satellite``
Statlog Landsat Satellite (36 features, 6 classes), 3,000 / 500 / 2,000; ``vehicle`` Statlog Vehicle
Silhouettes (18 features, 4 classes), 400 / 150 / 296. Two more, added the same way later still:
``dna`` StatLog DNA splice junctions (180 binary features, 3 classes), 2,000 / 300 / 886; ``vowel``
Deterding's vowels (9 features, 11 classes), 500 / 150 / 340. And two more after the default
weighed every view alike beside the learned share: ``musk`` Musk version 1 (166 features, 2
classes), 250 / 100 / 126; ``pima`` Pima Indians Diabetes (8 features, 2 classes), 400 / 150 / 218.

Upstream augmentation (4 views per training row, precomputed per seed):
  ``random``    strong views (RandAugment(num_ops=2, magnitude=15) on images; Gaussian noise of 0.5
                standard deviations and CutMix-style column swaps on the table), 30 % of the views
                given a uniformly random wrong label;
  ``pairflip``  the same views, 30 % of class c labelled c + 1 (class-dependent wrong labels);
  ``identity``  labels kept, but the views of half of the classes lose their identity (images:
                rotated by 90, 180 or 270 degrees and flipped; table: columns shuffled), the other
                half gets mild views (RandAugment magnitude 5; noise of 0.1 standard deviations);
  ``clean``     the strong views with their true labels: nothing is broken;
  ``ops``       (only when named; images) one timm RandAugment op per view at magnitude 15, true
                labels, the op recorded as the view's source;
  ``mild``      (only when named) augmentation that helps rather than harms, true labels: small
                affine moves on images (RandomAffine: 10 degrees, 10 % shift, scale 0.9-1.1), Gaussian
                noise of 0.1 standard deviations on the table. Every other upstream here costs accuracy
                against no augmentation; this one asks whether the refiner keeps a useful
                augmentation (refiner >= upstream - 0.1 is then the bar that matters).

Each view has a source id (the op; identity-breaking or mild; else 0), passed as ``sources=`` when
``--set pool=S`` asks the refiner for evidence pooled by (source, class).

Usage patterns (how the refiner is called):
  ``batch``     originals and views in one batch, ``refiner(model(cat), cat_y, num_original=n)``;
  ``separate``  the views alone through the refiner, plus the user's own CE on the originals
                (a second forward);
  ``alone``     views only, no originals at all;
  ``mixup``     views only, mixed pairwise (Mixup, alpha 0.4): soft targets;
  ``concat``    (only when named) the originals through their own forward, as in ``separate``, but
                the two forwards' logits concatenated into one refiner call with ``num_original=n``
                (the README's advice for that pattern).

Arms: ``none`` (originals only, plain CE), ``upstream`` (the pattern with ``method="none"``),
``refiner`` (augplug's defaults, ``--set`` changes them), ``clean`` (the pattern with every view's
true label; random and pairflip only).

    python -m benchmarks.trust --workers 2 --seeds 0 1 2 3 4 --out trust/summary

writes ``benchmarks/results/<out>.md`` (one table: per data set, upstream and pattern, the arms'
accuracy and the paired differences refiner - upstream, refiner - none and, per seed, refiner -
max(none, upstream): see :func:`promises` for why the promises are judged on the first two) and the
raw runs beside it (``<out>.jsonl``, one line per run, written as each finishes; the same command
run again skips the runs already there, and with ``--table-only`` it trains nothing and rewrites the
table from the runs there).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import mean_std, paired_difference, parse_sets, read_runs, results_dir

DATASETS = ("fmnist", "digits", "letter")
#: tables run only when named (``--datasets spambase cancer``): held out from every choice of default
EXTRA_DATASETS = ("spambase", "cancer", "satellite", "vehicle", "dna", "vowel", "musk", "pima")
UPSTREAMS = ("random", "pairflip", "identity", "clean")
#: upstreams run only when named: ``ops`` (images only) gives each view one timm RandAugment op at
#: magnitude 15 with its true label, and records the op as the view's source; ``mild`` gives views
#: that help (small affine moves on images, small noise on tables), true labels
EXTRA_UPSTREAMS = ("ops", "mild")
OPS_CONFIG = "rand-m15-n1-p1.0"
PATTERNS = ("batch", "separate", "alone", "mixup")
#: patterns run only when named (``--patterns concat``)
EXTRA_PATTERNS = ("concat",)
ARMS = ("none", "upstream", "refiner", "clean")
VIEWS, NOISE = 4, 0.3
#: original rows per training batch (each with one view); a run makes epochs * ceil(n / BATCH) updates
BATCH = 128


# ----------------------------------------------------------------------------- data
def _split(y: np.ndarray, sizes: Tuple[int, int, int], seed: int):
    from augplug.data import stratified_split
    rest, test = stratified_split(y, sizes[2], seed=seed)
    rest2, val = stratified_split(y[rest], sizes[1], seed=seed + 1)
    if sizes[0] == len(rest2):  # the training set is all that is left
        return rest[rest2], rest[val], test
    _, train = stratified_split(y[rest][rest2], sizes[0], seed=seed + 2)
    return rest[rest2][train], rest[val], test


def load(dataset: str, seed: int):
    """``(x_train_raw, y_train, x_val, y_val, x_test, y_test, kind)``; images as uint8 (N, H, W)."""
    if dataset == "fmnist":
        from benchmarks.datasets import load_fashion_mnist
        x, y = load_fashion_mnist("train")
        tr, va, _ = _split(y.numpy(), (3000, 500, 10), seed)
        xt, yt = load_fashion_mnist("test")
        g = torch.Generator().manual_seed(seed)
        te = torch.randperm(len(yt), generator=g)[:2000]
        return x[tr], y[tr], x[va], y[va], xt[te], yt[te], "image"
    if dataset == "digits":
        from benchmarks.datasets import load_digits_images
        x, y = load_digits_images()
        x = (x[:, 0] * 255).round().to(torch.uint8)
        tr, va, te = _split(y.numpy(), (1000, 300, 497), seed)
        return x[tr], y[tr], x[va], y[va], x[te], y[te], "image"
    if dataset in ("letter", "spambase", "cancer", "satellite", "vehicle", "dna", "vowel", "musk", "pima"):
        if dataset == "cancer":
            from sklearn.datasets import load_breast_cancer
            X, y = load_breast_cancer(return_X_y=True)
        else:
            from benchmarks.datasets import load_uci
            X, y, _, _ = load_uci(dataset)
        X, y = torch.from_numpy(np.array(X, dtype=np.float32)), torch.from_numpy(np.array(y, dtype=np.int64))
        sizes = {"letter": (3000, 500, 4000), "spambase": (3000, 500, 1101), "cancer": (250, 100, 219),
                 "satellite": (3000, 500, 2000), "vehicle": (400, 150, 296), "dna": (2000, 300, 886),
                 "vowel": (500, 150, 340), "musk": (250, 100, 126), "pima": (400, 150, 218)}[dataset]
        tr, va, te = _split(y.numpy(), sizes, seed)
        mu, sd = X[tr].mean(0), X[tr].std(0).clamp_min(1e-6)
        X = (X - mu) / sd
        return X[tr], y[tr], X[va], y[va], X[te], y[te], "table"
    raise ValueError(dataset)


def broken_class_mask(num_classes: int) -> torch.Tensor:
    """The classes whose views the ``identity`` upstream breaks (every other class, from 0)."""
    return torch.tensor([c % 2 == 0 for c in range(num_classes)])


def _op_views(x_u8: torch.Tensor, seed: int):
    """One timm RandAugment op per view (``OPS_CONFIG``) and the op's index as its source: (N, V, H, W)
    uint8 views and (N, V) int64 sources. timm draws with Python's and NumPy's generators, seeded here
    and restored after."""
    import random

    from PIL import Image

    from augplug.report import TracedRandAugment
    fill = int(round(float(x_u8.float().mean())))
    traced = TracedRandAugment(OPS_CONFIG, {"img_mean": (fill,)})
    index = {name: k for k, name in enumerate(traced.op_names)}
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    out = torch.empty((x_u8.shape[0], VIEWS) + tuple(x_u8.shape[1:]), dtype=torch.uint8)
    sources = torch.empty(x_u8.shape[0], VIEWS, dtype=torch.long)
    try:
        for i in range(x_u8.shape[0]):
            img = Image.fromarray(x_u8[i].numpy(), mode="L")
            for v in range(VIEWS):
                view, names = traced(img)
                out[i, v] = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy())
                sources[i, v] = index[names[0]]
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return out, sources, traced.op_names


def _image_views(x_u8: torch.Tensor, labels: torch.Tensor, upstream: str, seed: int, num_classes: int):
    from torchvision.transforms import v2
    g = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    strong = v2.RandAugment(num_ops=2, magnitude=15)
    mild = v2.RandAugment(num_ops=2, magnitude=5)
    # Fashion-MNIST's garments keep their class when mirrored; digits do not
    small_moves = (v2.RandomHorizontalFlip() if x_u8.shape[-1] >= 28 else
                   v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)))
    broken_classes = broken_class_mask(num_classes)
    out = torch.empty((x_u8.shape[0], VIEWS) + tuple(x_u8.shape[1:]), dtype=torch.uint8)
    try:
        for i in range(x_u8.shape[0]):
            img = x_u8[i][None]
            for v in range(VIEWS):
                if upstream == "identity":
                    if bool(broken_classes[int(labels[i])]):
                        k = int(torch.randint(1, 4, (1,), generator=g))
                        t = torch.rot90(img, k, (1, 2))
                        out[i, v] = (t.flip(2) if bool(torch.rand(1, generator=g) < 0.5) else t)[0]
                    else:
                        out[i, v] = mild(img)[0]
                elif upstream == "mild":
                    out[i, v] = small_moves(img)[0]
                else:
                    out[i, v] = strong(img)[0]
    finally:
        torch.set_rng_state(torch_state)
    return out


def _table_views(x: torch.Tensor, labels: torch.Tensor, upstream: str, seed: int, num_classes: int):
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    out = torch.empty(n, VIEWS, d)
    broken_classes = broken_class_mask(num_classes)
    for v in range(VIEWS):
        if upstream == "identity":
            mild = x + 0.1 * torch.randn(n, d, generator=g)
            shuffled = torch.stack([row[torch.randperm(d, generator=g)] for row in x])
            out[:, v] = torch.where(broken_classes[labels][:, None], shuffled, mild)
        elif upstream == "mild":
            out[:, v] = x + 0.1 * torch.randn(n, d, generator=g)
        else:
            partner = x[torch.randint(0, n, (n,), generator=g)]
            swap = torch.rand(n, d, generator=g) < 0.2
            out[:, v] = torch.where(swap, partner, x) + 0.5 * torch.randn(n, d, generator=g)
    return out


def make_setting(dataset: str, upstream: str, seed: int) -> Dict[str, torch.Tensor]:
    """Normalized tensors and the view bank with given and true view labels."""
    xr, y, xv, yv, xt, yt, kind = load(dataset, seed)
    num_classes = int(max(y.max(), yv.max(), yt.max())) + 1
    sources = None
    source_names = ["mild", "identity-breaking"] if upstream == "identity" else ["views"]
    if upstream == "ops" and kind != "image":
        raise ValueError("the 'ops' upstream is for image data sets (fmnist, digits)")
    if kind == "image":
        if upstream == "ops":
            views, sources, source_names = _op_views(xr, seed)
        else:
            views = _image_views(xr, y, upstream, seed, num_classes)
        mean, std = xr.float().mean() / 255, xr.float().std() / 255

        def norm(t):
            return ((t.float() / 255 - mean) / std).unsqueeze(-3)
        xr, xv, xt, views = norm(xr), norm(xv), norm(xt), norm(views)
    else:
        views = _table_views(xr, y, upstream, seed, num_classes)
    given = y[:, None].repeat(1, VIEWS)
    if upstream in ("random", "pairflip"):
        from augplug.demo.study import corrupt_views
        given, _ = corrupt_views(y, VIEWS, NOISE, num_classes, seed=seed, kind=upstream)
    if sources is None:  # the identity upstream's two kinds of view; one kind elsewhere
        broken = broken_class_mask(num_classes)[y] if upstream == "identity" else torch.zeros(len(y), dtype=torch.bool)
        sources = broken.long()[:, None].expand(len(y), VIEWS)
    return dict(x=xr, y=y, xv=xv, yv=yv, xt=xt, yt=yt, views=views, given=given, num_classes=num_classes,
                kind=kind, sources=sources, source_names=source_names)


# ----------------------------------------------------------------------------- training
#: image models (``--image-model``): the small CNN with BatchNorm (default) or GroupNorm (per-sample
#: statistics, so the views in a batch do not change how the originals are normalized)
IMAGE_MODELS = ("cnn", "cnn-group")


def _model(data, seed: int, image_model: str = "cnn"):
    from augplug.models import MLP, SmallCNN
    torch.manual_seed(seed)
    if data["kind"] == "image":
        return SmallCNN(1, data["num_classes"], img_size=data["x"].shape[-1], width=16, hidden=128,
                        norm="group" if image_model == "cnn-group" else "batch")
    return MLP(data["x"].shape[1], data["num_classes"], hidden=256, depth=2)


def run(dataset: str, upstream: str, pattern: str, arm: str, seed: int, epochs: int, options: dict) -> Dict:
    from augplug import AugmentationRefiner, refiner_kwargs
    data = _setting_cache(dataset, upstream, seed)
    image_model = options.get("image_model", "cnn")  # every arm trains the same model
    options = {k: v for k, v in options.items() if k != "image_model"}
    model = _model(data, seed, image_model)
    if options.get("optimizer", "adam") == "sgd":  # every arm trains with the same optimizer
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer_name = options.get("optimizer", "adam")
    # views_scale (--set views_scale=0, separate pattern): the loop's own factor on the refiner's term
    # (0: the views still pass through the model, in train mode, but train nothing)
    views_scale = float(options.get("views_scale", 1.0)) if arm == "refiner" else 1.0
    # rest_rescale (--set rest_rescale=0, separate pattern, an ablation): train CE_rest + share * CE_views
    # instead of the refiner's 2 / (1 + share) * (CE_rest + share * CE_views)
    rest_rescale = bool(options.get("rest_rescale", True)) or arm != "refiner"
    # originals_first (--set originals_first=1, separate pattern, every arm): the originals' forward runs
    # before the views' (the default runs the views first), which changes only the dropout masks each draws
    originals_first = bool(options.get("originals_first", False))
    # adam_scores (--set adam_scores=1, an ablation, Adam only): last-layer scores against the validation
    # direction divided by Adam's bias-corrected sqrt(second moment) + eps of the head, the first-order
    # change of the validation loss under an Adam step with its second moments held fixed
    adam_scores = bool(options.get("adam_scores", False)) and arm == "refiner"
    # direction_signal (--set direction_signal=1): the same as --set share.signal=direction, the adaptive
    # share comparing the rows' agreements per unit of their residual, y^T g / |y - p|
    if options.pop("direction_signal", False) and arm == "refiner":
        options = {**options, "share.signal": "direction"}
    options = {k: v for k, v in options.items()
               if k not in ("optimizer", "views_scale", "rest_rescale", "originals_first", "adam_scores")}
    x, y, views, given = data["x"], data["y"], data["views"], data["given"]
    truth = y[:, None].expand_as(given)
    refiner, kw = None, {}
    if arm != "none":
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data["xv"], data["yv"]), batch_size=128,
                                          shuffle=True)
        kw = dict(options) if arm == "refiner" else {"method": "none"}
        if "method" in kw and kw["method"] is None:   # --set method=none (parsed as None)
            kw["method"] = "none"
        kw.setdefault("seed", seed)
        sub = {k.split(".", 1)[1]: kw.pop(k) for k in list(kw) if k.startswith("strength.")}
        if sub:  # --set strength.init=0.5 strength.lr=0.05: a RefinementStrength with those options
            from augplug.valve import RefinementStrength
            kw["strength"] = RefinementStrength(**sub)
        share = {k.split(".", 1)[1]: kw.pop(k) for k in list(kw) if k.startswith("share.")}
        if share:  # --set share.lr=0.03: an AdaptiveShare with those options
            from augplug.share import AdaptiveShare
            if share.get("horizon") == "run":  # --set share.horizon=run: this run's number of updates
                share["horizon"] = epochs * math.ceil(len(data["y"]) / BATCH)
            if share.pop("rule", "walk") == "betting":  # --set share.rule=betting: benchmarks.share_betting
                from benchmarks.share_betting import BettingShare
                kw["aug_weight"] = BettingShare(**share)
            else:
                kw["aug_weight"] = AdaptiveShare(**share)
        refiner = (AugmentationRefiner if rest_rescale else _unscaled_rest())(model, opt, val, **refiner_kwargs(kw))
    stack = contextlib.ExitStack()
    if adam_scores:
        if not isinstance(opt, torch.optim.Adam):
            raise ValueError("adam_scores=1 needs the Adam optimizer")
        stack.enter_context(_adam_preconditioned_scores(opt))
    with stack:
        return _train(dataset, upstream, pattern, arm, seed, epochs, data, image_model, model, opt, optimizer_name,
                      views_scale, originals_first, refiner, kw, x, y, views, given, truth)


@contextlib.contextmanager
def _adam_preconditioned_scores(opt):
    """Within the block, ``augplug.scores.last_layer_scores`` reads the validation direction of each
    head parameter divided by ``sqrt(v / (1 - beta2^t)) + eps`` from ``opt``'s state (unchanged before
    the first step)."""
    import augplug.scores as scores
    plain = scores.last_layer_scores

    def precondition(v):
        if v is None:
            return v
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p) or {}
                if p.shape == v.shape and "exp_avg_sq" in state:
                    corr = 1 - group["betas"][1] ** float(state["step"])
                    return v / ((state["exp_avg_sq"] / corr).sqrt() + group["eps"])
        return v

    scores.last_layer_scores = lambda f, logits, v_w, v_b=None: plain(f, logits, precondition(v_w), precondition(v_b))
    try:
        yield
    finally:
        scores.last_layer_scores = plain


def _train(dataset, upstream, pattern, arm, seed, epochs, data, image_model, model, opt, optimizer_name,
           views_scale, originals_first, refiner, kw, x, y, views, given, truth) -> Dict:
    """The training loop and the evaluation of one run (:func:`run` builds what it needs)."""
    from torch.optim.swa_utils import update_bn

    from augplug.demo.study import accuracy, binary_auc
    g = torch.Generator().manual_seed(seed + 1)
    n, c = len(y), data["num_classes"]
    rec_w, rec_clean, trace = [], [], []
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        pick = torch.randint(0, VIEWS, (n,), generator=g)
        for s in range(0, n, BATCH):
            idx = perm[s:s + BATCH]
            xo, yo = x[idx], y[idx]
            if arm == "none":
                loss = F.cross_entropy(model(xo), yo)
            else:
                xa = views[idx, pick[idx]]
                ya = (truth if arm == "clean" else given)[idx, pick[idx]]
                # what made each view, for SAflex(pool=S): the op (ops), the identity-breaking transform
                # or not (identity), one source elsewhere
                src = data["sources"][idx, pick[idx]]
                # the views the weights should keep (the AUC's positives): a true label, and for the
                # identity upstream a view whose class identity was not broken
                clean_rows = given[idx, pick[idx]] == truth[idx, pick[idx]]
                if upstream == "identity":
                    clean_rows = clean_rows & (src == 0)
                extra = {"sources": src} if "pool" in kw else {}
                extra_both = {"sources": torch.cat([src, src])} if extra else {}  # originals, then views
                if pattern == "batch":
                    loss = refiner(model(torch.cat([xo, xa])), torch.cat([yo, ya]), num_original=len(idx), **extra_both)
                elif pattern == "separate":
                    # the originals' forward after the views' refiner call, or before it (originals_first)
                    out_o = model(xo) if originals_first else None
                    loss = views_scale * refiner(model(xa), ya, **extra)
                    loss = loss + F.cross_entropy(model(xo) if out_o is None else out_o, yo)
                elif pattern == "concat":  # two forwards, one refiner call
                    loss = refiner(torch.cat([model(xo), model(xa)]), torch.cat([yo, ya]), num_original=len(idx),
                                   **extra_both)
                elif pattern == "alone":
                    loss = refiner(model(xa), ya, **extra)
                else:  # mixup on the views
                    lam = float(np.random.default_rng(seed * 100003 + s).beta(0.4, 0.4))
                    p = torch.randperm(len(idx), generator=g)
                    soft = F.one_hot(ya, c).float()
                    loss = refiner(model(lam * xa + (1 - lam) * xa[p]), lam * soft + (1 - lam) * soft[p], **extra)
                    clean_rows = clean_rows & clean_rows[p]
                st = refiner.stats
                if arm == "refiner" and st["active"]:
                    a = st["augmented"]
                    rec_w.append(st["weights"][a])
                    rec_clean.append(clean_rows)
                    trace.append(float(st.get("strength", float("nan"))) if "strength" in st else float("nan"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    out = {"dataset": dataset, "upstream": upstream, "pattern": pattern, "arm": arm, "seed": seed,
           "test_acc": accuracy(model, data["xt"], data["yt"]), "seconds": time.perf_counter() - t0}
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # the same model after its BatchNorm statistics are recomputed on the training originals
        # (what the views' forwards left in the running averages is replaced); --metric test_acc_bn
        if refiner is not None:
            refiner.remove_hooks()
        with torch.no_grad():
            update_bn(torch.utils.data.DataLoader(x, batch_size=BATCH), model)
        out["test_acc_bn"] = accuracy(model, data["xt"], data["yt"])
    if image_model != "cnn":
        out["image_model"] = image_model
    if optimizer_name != "adam":
        out["optimizer"] = optimizer_name
    if refiner is not None and arm == "refiner":
        st = refiner.stats
        out["share"] = float(st.get("aug_weight", float("nan")))
        out["strength"] = float(st["strength"]) if "strength" in st else float("nan")
        if refiner.budget is not None:  # what the budget chose by the end (intervals, estimated share)
            out["budget_choice"] = {k: st[k] for k in ("refresh_interval", "read_interval", "model_scores_every", "overhead")
                                   if k in st}
        pool = getattr(refiner.policy, "pool", None)
        if pool is not None:  # the groups the pooled evidence weighted down most, at the end
            out["pooled_lowest"] = pool.table(data["source_names"])[:5]
        if rec_w:
            w, cl = torch.cat(rec_w).numpy(), torch.cat(rec_clean).numpy()
            out["auc_weight"] = (binary_auc(w, cl) if upstream in ("random", "pairflip", "identity")
                                 else float("nan"))
    return out


_CACHE: Dict = {}


def _unscaled_rest():
    """The refiner without the separate pattern's rescaling (``--set rest_rescale=0``): the views' loss is
    the share times their weighted mean and the rest's gradient passes unscaled, so a run trains
    ``CE_rest + share * CE_views``, whose gradient shrinks as the share falls."""
    from augplug import AugmentationRefiner

    class UnscaledRest(AugmentationRefiner):
        def _rest_denominator(self, aug_mass, world):
            return aug_mass / world

        def _commit_rest(self, *args, **kwargs):
            super()._commit_rest(*args, **kwargs)
            self._capture.rest_scale = None

    return UnscaledRest


def _setting_cache(dataset, upstream, seed):
    key = (dataset, upstream, seed)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make_setting(dataset, upstream, seed)
    return _CACHE[key]


def _job(args):
    torch.set_num_threads(1)
    return run(*args)


def jobs(datasets, upstreams, patterns, arms, seeds, epochs, options) -> List[tuple]:
    """Every run once: ``none`` does not depend on the upstream (run with the first one given), and
    the ``clean`` arm's views and labels are the same for random and pairflip (run with ``random``)."""
    out = []
    for d, s in itertools.product(datasets, seeds):
        if "none" in arms:
            out.append((d, upstreams[0], "none", "none", s, epochs, options))
        for u, p, a in itertools.product(upstreams, patterns, arms):
            if a == "none" or (a == "clean" and u not in ("random", "pairflip")):
                continue
            if a == "clean" and u == "pairflip" and "random" in upstreams:
                continue
            out.append((d, u, p, a, s, epochs, options))
    return out


#: the promises' tolerance, in points of accuracy
TOLERANCE = 0.1


def promises(refiner: Dict[int, float], upstream: Dict[int, float], none: Optional[Dict[int, float]] = None) -> Dict:
    """The two promises for one setting, from accuracies (in [0, 1]) keyed by seed, on the refiner's seeds.

    ``vs_upstream`` and ``vs_none`` are the mean paired differences in points. The first promise is
    ``vs_upstream >= -0.1``; the second (only where ``none`` is given: the originals are trained)
    adds ``vs_none >= -0.1``, that is, the refiner's mean is at least ``max(mean none, mean upstream)
    - 0.1`` on the same seeds. ``vs_seed_max`` is the older statistic, the mean of ``refiner_s -
    max(none_s, upstream_s)``: the larger of two noisy accuracies per seed lies above both controls'
    means (a winner's curse), so it is biased against the refiner, and the better control itself
    falls short of it wherever the two controls are close (``benchmarks/trust_bars.py`` counts how
    often). Raises ``KeyError`` when a control lacks one of the refiner's seeds."""
    seeds = sorted(refiner)
    if not seeds:
        raise ValueError("promises needs at least one refiner run")

    def paired(other):
        return 100 * float(np.mean([refiner[s] - other[s] for s in seeds]))
    out = {"seeds": len(seeds), "vs_upstream": paired(upstream)}
    out["first"] = out["vs_upstream"] >= -TOLERANCE
    if none is not None:
        out["vs_none"] = paired(none)
        out["vs_seed_max"] = paired({s: max(upstream[s], none[s]) for s in seeds})
        out["second"] = out["first"] and out["vs_none"] >= -TOLERANCE
    return out


def summarise(rows: List[Dict], metric: str = "test_acc") -> Tuple[List[str], List[List[str]]]:
    """One line per data set, upstream and pattern, of the runs' ``metric`` (runs without it are left out)."""
    rows = [r for r in rows if metric in r]
    def acc(d, u, p, a):
        def same_upstream(r):  # none: any upstream; clean: random and pairflip share theirs
            if a == "none":
                return True
            if a == "clean" and u == "pairflip" and not any(x["upstream"] == "pairflip" and x["arm"] == "clean"
                                                           for x in rows):
                return r["upstream"] == "random"
            return r["upstream"] == u
        return {r["seed"]: r[metric] for r in rows if r["dataset"] == d and r["arm"] == a and same_upstream(r)
                and (a == "none" or r["pattern"] == p)}
    header = ["data set", "upstream", "pattern", "none", "upstream", "refiner", "clean", "refiner − upstream",
              "refiner − none", "refiner − max(none, upstream)", "strength", "AUC"]
    lines = []
    # the settings the refiner ran in (controls taken from another run cover more), else every setting
    shown = "refiner" if any(r["arm"] == "refiner" for r in rows) else None
    keys = sorted({(r["dataset"], r["upstream"], r["pattern"]) for r in rows
                   if r["arm"] != "none" and (shown is None or r["arm"] == shown)},
                  key=lambda k: ((DATASETS + EXTRA_DATASETS).index(k[0]), (UPSTREAMS + EXTRA_UPSTREAMS).index(k[1]),
                                 (PATTERNS + EXTRA_PATTERNS).index(k[2])))
    for d, u, p in keys:
        arms = {a: acc(d, u, p, a) for a in ARMS}
        seeds = sorted(set(arms["refiner"]) & set(arms["upstream"]))

        def cell(a):
            v = [arms[a][s] for s in seeds if s in arms[a]]
            if not v:
                return "–"
            m, sd = mean_std(v)
            return f"{100 * m:.2f} ± {100 * sd:.2f}"

        def diff(ref):
            if not seeds or any(s not in ref for s in seeds):
                return "–"
            m, sd, wins, n = paired_difference([arms["refiner"][s] for s in seeds], [ref[s] for s in seeds])
            return f"{100 * m:+.2f} ± {100 * sd:.2f} ({wins}/{n})"
        best = {s: max(arms["upstream"][s], arms["none"].get(s, -1)) for s in seeds} if arms["none"] else {}
        trained = p in ("batch", "separate", "concat")
        diff_best = diff(best) if trained and best else "–"
        diff_none = diff(arms["none"]) if trained and arms["none"] else "–"
        extra = [r for r in rows if (r["dataset"], r["upstream"], r["pattern"], r["arm"]) == (d, u, p, "refiner")]
        strength = np.nanmean([r.get("strength", float("nan")) for r in extra]) if extra else float("nan")
        auc = np.nanmean([r.get("auc_weight", float("nan")) for r in extra]) if extra else float("nan")
        lines.append([d, u, p, cell("none"), cell("upstream"), cell("refiner"), cell("clean"), diff(arms["upstream"]),
                      diff_none, diff_best, "–" if math.isnan(strength) else f"{strength:.2f}",
                      "–" if math.isnan(auc) else f"{auc:.3f}"])
    return header, lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS + EXTRA_DATASETS)
    ap.add_argument("--upstreams", nargs="+", default=list(UPSTREAMS), choices=UPSTREAMS + EXTRA_UPSTREAMS)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS + EXTRA_PATTERNS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training seeds (paired across arms)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs")
    ap.add_argument("--workers", type=int, default=1, help="parallel worker processes (one torch thread each)")
    ap.add_argument("--image-model", default="cnn", choices=IMAGE_MODELS,
                    help="the images' model for every arm: the small CNN with BatchNorm (cnn) or GroupNorm")
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                    help="every arm's optimizer: Adam lr 1e-3 (default) or SGD lr 0.05, momentum 0.9")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="refiner options of the refiner arm, e.g. valve=False")
    ap.add_argument("--out", default=None, help="results name under benchmarks/results/ (no extension)")
    ap.add_argument("--controls", default=None, metavar="NAME",
                    help="take the none/upstream/clean arms from the runs of an earlier results name (same "
                         "seeds and epochs; use with --arms refiner)")
    ap.add_argument("--metric", default="test_acc", choices=("test_acc", "test_acc_bn"),
                    help="what the table shows: test accuracy as trained (default), or after the model's "
                         "BatchNorm statistics are recomputed on the training originals (image models with BatchNorm)")
    ap.add_argument("--table", default=None, metavar="NAME",
                    help="write the table as benchmarks/results/<NAME>.md (default: --out's name; the runs stay in <out>.jsonl)")
    ap.add_argument("--table-only", action="store_true",
                    help="train nothing: rewrite the table from the runs already in <out>.jsonl (and --controls); "
                         "an error lists the runs that are missing")
    args = ap.parse_args(argv)
    if args.table_only and not args.out:
        ap.error("--table-only rewrites the table of --out: name it")
    options = parse_sets(args.set)
    for key in ("views_scale", "rest_rescale", "originals_first"):
        if key in options and args.patterns != ["separate"]:
            ap.error(f"--set {key}= changes the separate pattern's refiner term only: pass --patterns separate")
    if args.image_model != "cnn":
        options["image_model"] = args.image_model
    if args.optimizer != "adam":
        options["optimizer"] = args.optimizer
    todo = jobs(args.datasets, args.upstreams, args.patterns, args.arms, args.seeds, args.epochs, options)
    from tqdm import tqdm
    # every finished run is appended to <out>.jsonl at once; a rerun of the same command skips them
    log = results_dir() / f"{args.out}.jsonl" if args.out else None
    rows = []
    if log is not None and log.exists():
        done = read_runs(args.out)
        keys = {(r["dataset"], r["upstream"], r["pattern"], r["arm"], r["seed"]) for r in done}
        rows = [r for r in done if r["seed"] in args.seeds]
        todo = [j for j in todo if tuple(j[:5]) not in keys]
    if args.table_only and todo:
        missing = ", ".join("/".join(map(str, j[:5])) for j in todo[:5])
        ap.error(f"--table-only: {len(todo)} runs of this command are not in {log} (e.g. {missing}); "
                 "run it without --table-only to train them")
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)

    def keep(r):
        rows.append(r)
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")

    # the slowest runs (Fashion-MNIST, one-batch pattern) first, so that the workers finish together
    todo.sort(key=lambda j: ((DATASETS + EXTRA_DATASETS).index(j[0]), j[2] != "batch"))
    if args.workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.workers) as pool:
            for r in tqdm(pool.imap_unordered(_job, todo), total=len(todo), desc="trust runs"):
                keep(r)
    else:
        torch.set_num_threads(1)
        for j in tqdm(todo, desc="trust runs"):
            keep(run(*j))
    if args.controls:
        rows += [r for r in read_runs(args.controls)
                 if r["arm"] != "refiner" and r["seed"] in args.seeds and r["dataset"] in args.datasets]
    header, lines = summarise(rows, args.metric)
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(line) + " |" for line in lines]
    table = "\n".join(text)
    print(table)
    if args.out:
        path = results_dir() / f"{args.table or args.out}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        given = os.sys.argv[1:] if argv is None else argv   # the command that trains these runs
        cmd = "python -m benchmarks.trust " + " ".join(a for a in given if a != "--table-only")
        what = ("Test accuracy (%)" if args.metric == "test_acc" else
                "Test accuracy (%) after the BatchNorm statistics are recomputed on the training originals")
        path.write_text(f"<!-- {cmd} -->\n\n{what}, mean ± std over seeds {args.seeds}; paired "
                        f"differences mean ± std (refiner better / seeds). Options: {options or 'defaults'}.\n\n"
                        + table + "\n")



if __name__ == "__main__":
    main()
