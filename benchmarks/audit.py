"""Augmentation audit on Fashion-MNIST: which timm RandAugment ops (and which classes) SAflex trusts.

Setting: 10k training / 1k clean validation images (stratified from the official training set), the
official 10k test set, the small CNN of the quality study (``augplug.models.SmallCNN``), SGD with
Nesterov momentum and a cosine schedule. Each training image gets ``--views`` augmented views made
by **one** timm RandAugment op each (``rand-m9-mstd0.5-n1-p1.0``: the op drawn uniformly from timm's
15 ops, always applied, magnitude 9 ± 0.5), recorded with :class:`augplug.report.TracedRandAugment`.
As a positive control, ``--noise`` of the views get a random wrong label. Every batch holds the
originals plus one view of each (the paper's setting); the refiner weights the views.

Reported per arm (``saflex``: augplug's defaults with the share fixed, ``aug_weight=1.0``, so each
view gets a per-sample weight; ``saflex-paper``: ``augplug.SAFLEX_PAPER``, hard
weights and Gumbel-softmax soft labels), from every refiner call after warm-up:

- per op, over views with a correct label: rows, mean weight, kept share (weight > 0), relabel
  rate (soft-label argmax differs from the view's label), mean ``ỹᵀg`` (positive = helps);
- the control: the same metrics for views with a correct and with a wrong label;
- per class (views with a correct label).

    python -m benchmarks.audit                          # both arms, writes benchmarks/results/audit/audit.md
    python -m benchmarks.audit --arms saflex --epochs 2 --n-train 2000 --no-save   # a quick look

``--study sources`` audits generated-sample sources instead (``augplug.sources``; writes
``audit_sources.md`` / ``.png``). No generative model ships with the project, so two stand-ins are
made from held-out Fashion-MNIST training images (disjoint from the training and validation sets):
``faithful`` (their true labels: a perfect class-conditional generator) and ``off-class`` (a label
drawn uniformly from the other nine classes: a generator whose class conditioning failed). Every
batch is ``--batch-size`` real originals (trained on as given) plus ``--per-source`` rows from each
source (refined). Arms: ``upstream`` (``method="none"``: generated rows at weight 1), ``saflex``,
``saflex-paper``.

    python -m benchmarks.audit --study sources
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from augplug import SAFLEX_PAPER, AugmentationRefiner, refiner_kwargs
from augplug.demo.study import accuracy, corrupt_views
from augplug.models import SmallCNN
from augplug.report import NAME_SEP, AugmentationAudit, TracedRandAugment

from .common import parse_sets, results_dir, set_threads
from .datasets import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, fashion_mnist_splits

ARMS = {"saflex": {"aug_weight": 1.0}, "saflex-paper": dict(SAFLEX_PAPER)}   # every view at its upstream share
CONTROL_CLEAN, CONTROL_WRONG = "correct label", "wrong label"


def make_traced_bank(images_u8: torch.Tensor, aa: str, views: int, seed: int):
    """``(N, V, H, W)`` uint8 views and ``(N, V)`` op names, one timm RandAugment op per view."""
    from PIL import Image

    traced = TracedRandAugment(aa, {"img_mean": (int(round(255 * FMNIST_MEAN)),)})
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        arr = images_u8.numpy()
        out = np.empty((arr.shape[0], views) + arr.shape[1:], dtype=np.uint8)
        names = np.empty((arr.shape[0], views), dtype=object)
        for i in range(arr.shape[0]):
            im = Image.fromarray(arr[i], mode="L")
            for v in range(views):
                img, applied = traced(im)
                out[i, v] = np.asarray(img, dtype=np.uint8)
                names[i, v] = NAME_SEP.join(applied)   # "" (no op applied) is filed under "identity"
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    return torch.from_numpy(out), names


def _norm(u8: torch.Tensor) -> torch.Tensor:
    return ((u8.float() / 255 - FMNIST_MEAN) / FMNIST_STD).unsqueeze(-3)


def _training_setup(data: Dict, n: int, args):
    """The small CNN, SGD with a cosine schedule over ``args.epochs``, and the clean validation loader."""
    model = SmallCNN(1, 10, img_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = math.ceil(n / args.batch_size)
    total = args.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data["x_val"], data["y_val"]),
                                             batch_size=500, shuffle=True)
    return model, opt, sched, val_loader, steps


def run(arm: str, data: Dict[str, torch.Tensor], names: np.ndarray, args, overrides: Dict) -> Dict:
    """Train one arm and return its audits and test accuracy."""
    torch.manual_seed(args.seed)
    x_tr, y_tr, views, view_labels, wrong = data["x_train"], data["y_train"], data["views"], data["view_labels"], data["wrong"]
    n, v = view_labels.shape
    model, opt, sched, val_loader, steps = _training_setup(data, n, args)
    refiner = AugmentationRefiner(model, opt, val_loader, method="saflex", seed=args.seed,
                                  **refiner_kwargs({"strength": 1.0, "budget": None, **ARMS[arm], **overrides},
                                                   warmup_steps=int(args.warmup_epochs * steps)))
    ops = AugmentationAudit(FMNIST_CLASSES)
    control = AugmentationAudit(FMNIST_CLASSES)
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        pick = torch.randint(0, v, (n,), generator=g)
        for s in range(steps):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            vi = pick[idx]
            b = len(idx)
            x = torch.cat([x_tr[idx], views[idx, vi]])
            y = torch.cat([y_tr[idx], view_labels[idx, vi]])
            loss = refiner(model(x), y, num_original=b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            w = wrong[idx, vi]
            op_names = [names[i, j] for i, j in zip(idx.tolist(), vi.tolist())]   # one per augmented row
            clean_rows = torch.cat([torch.zeros(b, dtype=torch.bool), ~w])
            ops.update(refiner.stats, op_names, y, rows=clean_rows)
            control.update(refiner.stats, [CONTROL_WRONG if t else CONTROL_CLEAN for t in w.tolist()], y)
        print(f"  {arm}: epoch {epoch + 1}/{args.epochs} ({time.perf_counter() - t0:.0f}s)", flush=True)
    acc = accuracy(model, data["x_test"], data["y_test"])
    return {"ops": ops, "control": control, "test_acc": acc, "seconds": time.perf_counter() - t0}


SOURCE_ARMS = {"upstream": ("none", {}), "saflex": ("saflex", {}), "saflex-paper": ("saflex", dict(SAFLEX_PAPER))}


def run_sources(arm: str, data: Dict, args, overrides: Dict) -> Dict:
    """Train on real originals + generated stand-ins; per-source statistics and test accuracy."""
    from augplug.sources import BatchMixer, GeneratedSamples, SourceAudit

    torch.manual_seed(args.seed)
    method, kw = SOURCE_ARMS[arm]
    x_tr, y_tr = data["x_train"], data["y_train"]
    n = len(y_tr)
    model, opt, sched, val_loader, steps = _training_setup(data, n, args)
    refiner = AugmentationRefiner(model, opt, val_loader, method=method, seed=args.seed,
                                  **refiner_kwargs({"strength": 1.0, "budget": None, **kw, **overrides} if method == "saflex"
                                                   else {"budget": None, **kw, **overrides} if method != "none" else {}))
    sources = {name: GeneratedSamples(x, y) for name, (x, y) in data["sources"].items()}
    mixer = BatchMixer(sources, per_batch=args.per_source, seed=args.seed)
    audit = SourceAudit(mixer.source_names, FMNIST_CLASSES, only_active=method != "none")
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        for st in range(steps):
            idx = perm[st * args.batch_size:(st + 1) * args.batch_size]
            mb = mixer(x_tr[idx], y_tr[idx])
            loss = refiner(model(mb.inputs), mb.targets, augmented=mb.augmented)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            audit.update(refiner.stats, mb.source_ids, mb.targets)
        print(f"  {arm}: epoch {epoch + 1}/{args.epochs} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return {"audit": audit, "test_acc": accuracy(model, data["x_test"], data["y_test"]),
            "seconds": time.perf_counter() - t0}


def sources_study(args, argv: List[str], overrides: Dict) -> Dict:
    from augplug.data import stratified_split

    from .common import save_bar_plot
    from .datasets import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    y = labels.numpy()
    rest, val = stratified_split(y, args.n_val, seed=args.seed)
    _, pick = stratified_split(y[rest], args.n_train + 2 * args.n_generated, seed=args.seed + 1)
    pool = rest[pick]
    tr_pos, gen_pos = stratified_split(y[pool], 2 * args.n_generated, seed=args.seed + 2)
    train, gen = pool[tr_pos], pool[gen_pos]
    rng = np.random.default_rng(args.seed + 3)
    rng.shuffle(gen)
    faithful, off = gen[: args.n_generated], gen[args.n_generated:]
    off_labels = (labels[off] + torch.from_numpy(rng.integers(1, 10, len(off)))) % 10
    test_x, test_y = load_fashion_mnist("test")
    data = dict(x_train=_norm(images[train]), y_train=labels[train], x_val=_norm(images[val]), y_val=labels[val],
                x_test=_norm(test_x), y_test=test_y,
                sources={"faithful": (_norm(images[faithful]), labels[faithful]),
                         "off-class": (_norm(images[off]), off_labels)})
    results = {arm: run_sources(arm, data, args, overrides) for arm in args.arms}
    cmd = f"python -m benchmarks.audit {' '.join(argv)}".strip()
    lines = ["# Generated-sample sources: Fashion-MNIST stand-ins", "", f"Command: `{cmd}`", "",
             f"Setting: {len(train)} real training images (originals, trained on as given), {args.n_val} clean "
             f"validation, 10k official test images; two generated-source stand-ins of {args.n_generated} held-out "
             f"training images each (disjoint from the rest): `faithful` with their true labels, `off-class` with a "
             f"label drawn uniformly from the other nine classes. Every batch: {args.batch_size} real rows + "
             f"{args.per_source} rows from each source (`augplug.sources.BatchMixer`, `augmented=` the generated "
             f"rows). `SmallCNN`, SGD (lr {args.lr}, Nesterov, cosine), {args.epochs} epochs, seed {args.seed}, "
             f"1 thread. Arms: `upstream` = `method=\"none\"` (generated rows at weight 1), `saflex` = augplug's "
             f"defaults, `saflex-paper` = `augplug.SAFLEX_PAPER`" + (f"; overrides {overrides}" if overrides else "")
             + ". Statistics from `augplug.sources.SourceAudit` over every refiner call (after warm-up).", "",
             "| arm | test acc % | source | rows | weight_mean | kept | relabel_rate | agreement_mean |",
             "|---|---|---|---|---|---|---|---|"]
    labels_, means = [], []
    for arm, res in results.items():
        for r in res["audit"].table(format="records"):
            lines.append(f"| {arm} | {100 * res['test_acc']:.2f} | {r['source']} | {r['rows']} | {r['weight_mean']:.3f} | "
                         f"{r['kept']:.3f} | {r['relabel_rate']:.3f} | {r['agreement_mean']:.4f} |")
            labels_.append(f"{arm}\n{r['source']}")
            means.append(r["weight_mean"])
    lines += ["", "Per class of the `off-class` rows (by their given, wrong label) and of the `faithful` rows, `saflex`:",
              ""]
    if "saflex" in results:
        lines.append(results["saflex"]["audit"].table("source_class", format="markdown"))
    lines.append("Seconds per arm: " + ", ".join(f"{a} {r['seconds']:.0f}" for a, r in results.items()) + ".")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        (results_dir("audit") / f"{args.out}_sources.md").write_text(text, encoding="utf-8")
        save_bar_plot(results_dir("audit") / f"{args.out}_sources.png", labels_, means, None, "mean weight of the rows",
                      "Generated-source stand-ins on Fashion-MNIST", zoom=False)
    return results




def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="ops", choices=("ops", "sources"),
                    help="ops: RandAugment ops (default); sources: generated-sample sources")
    ap.add_argument("--arms", nargs="+", default=None, choices=sorted(set(ARMS) | set(SOURCE_ARMS)),
                    help="default: saflex saflex-paper (ops); upstream saflex saflex-paper (sources)")
    ap.add_argument("--n-generated", type=int, default=3000, help="sources study: images per generated source")
    ap.add_argument("--per-source", type=int, default=32, help="sources study: rows per source per batch")
    ap.add_argument("--aa", default="rand-m9-mstd0.5-n1-p1.0", help="timm RandAugment config (n1: one op per view)")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--noise", type=float, default=0.1, help="share of views given a random wrong label (control)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup-epochs", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra refiner option for every arm")
    ap.add_argument("--out", default="audit", help="result file stem under benchmarks/results/audit")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    set_threads(1)
    valid = SOURCE_ARMS if args.study == "sources" else ARMS
    args.arms = args.arms or list(valid)
    bad = [a for a in args.arms if a not in valid]
    if bad:
        ap.error(f"arms {bad} are not part of the {args.study} study (choose from {list(valid)})")
    if args.study == "sources":
        return sources_study(args, argv, overrides)

    t0 = time.perf_counter()
    sp = fashion_mnist_splits(args.n_train, args.n_val, seed=args.seed)
    bank, names = make_traced_bank(sp["train"][0], args.aa, args.views, args.seed)
    view_labels, wrong = corrupt_views(sp["train"][1], args.views, args.noise, 10, seed=args.seed)
    data = dict(x_train=_norm(sp["train"][0]), y_train=sp["train"][1], x_val=_norm(sp["val"][0]), y_val=sp["val"][1],
                x_test=_norm(sp["test"][0]), y_test=sp["test"][1], views=_norm(bank), view_labels=view_labels,
                wrong=wrong)
    print(f"view bank: {bank.shape[0]} x {bank.shape[1]} views in {time.perf_counter() - t0:.0f}s", flush=True)

    results = {arm: run(arm, data, names, args, overrides) for arm in args.arms}

    cmd = f"python -m benchmarks.audit {' '.join(argv)}".strip()
    lines = ["# Augmentation audit: Fashion-MNIST, timm RandAugment ops", "",
             f"Command: `{cmd}`", "",
             f"Setting: Fashion-MNIST, {args.n_train} train / {args.n_val} clean validation (stratified from the "
             f"official training set) / 10k official test images; `augplug.models.SmallCNN` (batch norm), SGD "
             f"(lr {args.lr}, Nesterov momentum 0.9, weight decay 5e-4, cosine), batch {args.batch_size} originals + "
             f"{args.batch_size} augmented views, {args.epochs} epochs, seed {args.seed}, 1 thread. Views: "
             f"{args.views} per image, each made by one op of timm's `rand_augment_transform('{args.aa}')` "
             f"(op names recorded with `augplug.report.TracedRandAugment`); {args.noise:.0%} of the views carry a "
             f"random wrong label (positive control). Arms: `saflex` = augplug's defaults, `saflex-paper` = "
             f"`augplug.SAFLEX_PAPER` {dict(SAFLEX_PAPER)}" + (f"; overrides {overrides}" if overrides else "") + ".",
             "",
             "Columns: `rows` views counted (all refiner calls after warm-up), `weight_mean` the mean weight in the "
             "loss (weights are renormalized to mean 1 over the augmented rows of each batch, so 1 = average), "
             "`kept` the share with weight > 0, `relabel_rate` the share whose soft label's argmax differs from the "
             "view's label, `agreement_mean` the mean of ỹᵀg (first-order drop of the validation loss from one step "
             "on the view; positive = helps).", ""]
    for arm, res in results.items():
        lines += [f"## {arm}: test accuracy {100 * res['test_acc']:.2f} % ({res['seconds']:.0f} s)", "",
                  "Control (all views, by label correctness):", "",
                  res["control"].table(format="markdown").replace("| transform |", "| view label |", 1),
                  "Per RandAugment op (views with a correct label), by decreasing mean weight:", "",
                  res["ops"].table(format="markdown", sort="weight_mean").replace("| transform |", "| op |", 1),
                  "Per class (views with a correct label):", "", res["ops"].table("class", format="markdown")]
        lines.append(f"Plot: [`{args.out}_{arm}.png`]({args.out}_{arm}.png)\n")
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        out = results_dir("audit")
        (out / f"{args.out}.md").write_text(text, encoding="utf-8")
        for arm, res in results.items():
            res["ops"].plot(out / f"{args.out}_{arm}.png",
                            title=f"Fashion-MNIST, one RandAugment op per view, {arm} (correct-label views); "
                                  f"test acc {100 * res['test_acc']:.2f} %")
    return results


if __name__ == "__main__":
    main()
