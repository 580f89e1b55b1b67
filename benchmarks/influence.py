"""Influence augmentation on Fashion-MNIST with few labels (quality) and its cost per step (overhead).

Quality (``--quality``): 1 % and 10 % of the Fashion-MNIST training labels (600 / 6,000 images,
stratified), a disjoint clean validation split, the official 10k test set, ``augplug.models.SmallCNN``
trained with SGD + cosine on originals plus one augmented view per original. Arms:

``none``                 originals only;
``heuristic``            originals + random affine / flip views (:func:`augplug.augment.augnet.heuristic_augment`);
``heuristic+influence``  the same views weighted by ``AugmentationRefiner(method="influence")``;
``learned``              the papers' staged recipe: the ``heuristic`` classifier is frozen, ``s_val`` is
                         computed on its last layer from all training features, an
                         :class:`~augplug.augment.augnet.AugmentationNetwork` is trained on the influence
                         objective on top of the heuristic views, and a fresh classifier is trained on
                         originals + learned views ``augnet(heuristic(x))``.

Overhead (``--overhead``): step times of a plain step and of a refiner step with ``method="influence"``
(same model and batch, interleaved in one process), the ``s_val`` solve, and the augmentation
network's training step and forward, each as a ratio to the plain step.

    python -m benchmarks.influence --quality              # 3 seeds, both label fractions
    python -m benchmarks.influence --overhead
    python -m benchmarks.influence --quality --seeds 0 --fractions 0.01 --no-save   # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from augplug import AugmentationRefiner, refiner_kwargs
from augplug.augment.augnet import (AugmentationNetwork, InfluenceAugTrainer, features_and_logits,
                                    heuristic_augment)
from augplug.demo.study import accuracy as evaluate
from augplug.influence import InfluenceScorer
from augplug.models import SmallCNN

from .common import fmt_mean_std, mean_std, results_dir, save_bar_plot, set_threads, write_markdown_table

MEAN, STD = 0.2860, 0.3530
ARMS = ("none", "heuristic", "heuristic+influence", "learned")
#: per label fraction: epochs (sized so that both fractions make a similar number of updates)
EPOCHS = {0.01: 40, 0.1: 8}


def load(fraction: float, seed: int):
    from .datasets import fashion_mnist_splits

    n_train = int(round(60000 * fraction))
    n_val = max(100, n_train // 5)
    sp = fashion_mnist_splits(n_train, n_val, seed=seed)
    norm = lambda u8: ((u8.float() / 255 - MEAN) / STD).unsqueeze(1)  # noqa: E731
    return {k: (norm(x), y) for k, (x, y) in sp.items()}


def train_classifier(data, seed: int, epochs: int, *, views: Optional[str] = None, augnet=None,
                     influence: Optional[dict] = None, batch: int = 64, lr: float = 0.05, wd: float = 5e-4):
    """Train a SmallCNN; ``views``: None (originals only), "heuristic" or "learned" (augnet on heuristic)."""
    x_tr, y_tr = data["train"]
    torch.manual_seed(seed)
    model = SmallCNN(1, 10, img_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    n = len(y_tr)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    refiner = None
    if influence is not None:
        xv, yv = data["val"]
        val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=500, shuffle=True)
        refiner = AugmentationRefiner(model, opt, val_loader, method="influence", seed=seed,
                                      method_options={k: v for k, v in influence.items() if k != 'refresh_every'},
                                      schedule=dict(refresh_every=influence.get('refresh_every', 10), budget=None))
    g = torch.Generator().manual_seed(seed + 1)
    weights = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            xo, yo = x_tr[idx], y_tr[idx]
            if views is None:
                loss = F.cross_entropy(model(xo), yo)
            else:
                with torch.no_grad():
                    xa = heuristic_augment(xo, g)
                    if views == "learned":
                        augnet.eval()
                        xa = augnet(xa, generator=g).images
                x, y = torch.cat([xo, xa]), torch.cat([yo, yo])
                if refiner is not None:
                    loss = refiner(model(x), y, num_original=len(idx))
                    if refiner.stats["active"]:
                        weights.append(refiner.stats["weights"][len(idx):])
                else:
                    loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    out = {"test_acc": evaluate(model, *data["test"]), "seconds": time.perf_counter() - t0}
    if weights:
        w = torch.cat(weights)
        out["weight_std"] = float(w.std())
    if refiner is not None:
        refiner.remove_hooks()
    return model, out


def train_augnet(clf, data, seed: int, steps: int, *, damping: float = 1e-2, batch: int = 64, **trainer_kw):
    """Stages 2-3 of the recipe: s_val on the frozen classifier's head, then the influence objective."""
    x_tr, y_tr = data["train"]
    xv, yv = data["val"]
    clf.eval()
    with torch.no_grad():
        feats = torch.cat([features_and_logits(clf, clf.fc, x_tr[i:i + 1000])[0] for i in range(0, len(y_tr), 1000)])
        vfeats = torch.cat([features_and_logits(clf, clf.fc, xv[i:i + 1000])[0] for i in range(0, len(yv), 1000)])
    t0 = time.perf_counter()
    scorer = InfluenceScorer(clf.fc, damping=damping, cg_iters=200).fit(feats)
    scorer.set_validation(vfeats, yv)
    solve_s = time.perf_counter() - t0
    torch.manual_seed(seed + 2)
    net = AugmentationNetwork(1, 28)
    trainer = InfluenceAugTrainer(net, clf, clf.fc, scorer, transform=heuristic_augment, **trainer_kw)
    g = torch.Generator().manual_seed(seed + 3)
    log = []
    for s in range(steps):
        idx = torch.randint(0, len(y_tr), (batch,), generator=g)
        log.append(trainer.step(x_tr[idx], y_tr[idx], g))
    tail = log[-max(1, steps // 10):]
    summary = {k: statistics.fmean(d[k] for d in tail) for k in ("score_mean", "helpful_share", "label_kept", "change")}
    summary.update(solve_seconds=solve_s, cg_iters=scorer.info.get("iters"), augnet_seconds=time.perf_counter() - t0)
    return net, summary


def quality(args, argv) -> None:
    results: Dict = {}
    extra: Dict = {}
    for fraction in args.fractions:
        epochs = args.epochs or EPOCHS.get(fraction, 20)
        for seed in args.seeds:
            data = load(fraction, seed)
            runs = {}
            for arm in args.arms:
                if arm == "none":
                    _, res = train_classifier(data, seed, epochs)
                elif arm == "heuristic":
                    runs["heuristic_model"], res = train_classifier(data, seed, epochs, views="heuristic")
                elif arm == "heuristic+influence":
                    _, res = train_classifier(data, seed, epochs, views="heuristic",
                                              influence=dict(damping=1e-2, refresh_every=10))
                else:
                    clf = runs.get("heuristic_model")
                    if clf is None:
                        clf, _ = train_classifier(data, seed, epochs, views="heuristic")
                    net, summ = train_augnet(clf, data, seed, args.augnet_steps)
                    _, res = train_classifier(data, seed, epochs, views="learned", augnet=net)
                    res.update(summ)
                results.setdefault((fraction, arm), []).append(res)
                print(json.dumps({"fraction": fraction, "seed": seed, "arm": arm,
                                  **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}}),
                      flush=True)
            extra[(fraction, seed)] = {k: len(v[1]) for k, v in data.items()}
    headers = ["labels", "arm", "test acc % (mean ± std)", "s/run", "augnet: mean replacement score (last 10 %)",
               "augnet: share helpful", "augnet: label kept", "s_val solve s (CG iters)"]
    rows = []
    for (fraction, arm), rs in results.items():
        def col(k, scale=1.0, d=3):
            vals = [r[k] for r in rs if k in r and r[k] is not None]
            return fmt_mean_std(vals, scale=scale, digits=d) if vals else "–"
        solve = "–"
        if "solve_seconds" in rs[0]:
            solve = f"{mean_std([r['solve_seconds'] for r in rs])[0]:.2f} ({rs[0]['cg_iters']})"
        rows.append([f"{fraction * 100:g} %", arm, col("test_acc", 100, 2), f"{mean_std([r['seconds'] for r in rs])[0]:.0f}",
                     col("score_mean", 1, 4), col("helpful_share", 1, 2), col("label_kept", 1, 2), solve])
    sizes = "; ".join(f"{f * 100:g} %: {extra[(f, args.seeds[0])]['train']} train / {extra[(f, args.seeds[0])]['val']} val"
                      for f in args.fractions)
    pre = (f"Command: `python -m benchmarks.influence {' '.join(argv)}`".strip() + "\n\n"
           f"Fashion-MNIST with {sizes} (stratified from the official training set; the validation split is used "
           "only by the influence arms), official 10k test set. SmallCNN (batch norm), SGD momentum 0.9 nesterov, "
           "lr 0.05, weight decay 5e-4, cosine schedule, batches of 64 originals + 64 augmented views, epochs "
           f"{ {f: args.epochs or EPOCHS.get(f, 20) for f in args.fractions} } (by label fraction), seeds {args.seeds}. "
           "Heuristic views: random rotation ±15°, scale 0.9–1.1, translation ±10 %, horizontal flip. "
           "`heuristic+influence`: refiner defaults (last layer, validation direction every 10 updates over the whole "
           "validation split), damping 1e-2, soft weights 2·sigmoid(r / rms r) renormalized over the views. "
           f"`learned`: s_val by CG (damping 1e-2) over all training features of the heuristic classifier, "
           f"{args.augnet_steps} Adam steps (lr 1e-3, batch 64) of the augmentation network on the influence objective "
           "(divided by the batch's score RMS) with label CE weight 1, mean squared change of its input kept in "
           "[0.05, 0.3] (hinge weight 10), applied on top of the heuristic views; then a fresh "
           "classifier. Single process, one thread.")
    out = None if args.no_save else results_dir("influence") / "influence_quality.md"
    table = write_markdown_table(out, headers, rows, title="Influence augmentation: Fashion-MNIST with few labels",
                                 preamble=pre)
    print(table)
    if not args.no_save:
        labels = [f"{f * 100:g}%\n{a}" for (f, a) in results]
        ms = [mean_std([r["test_acc"] * 100 for r in rs]) for rs in results.values()]
        save_bar_plot(results_dir("influence") / "influence_quality.png", labels, [m for m, _ in ms],
                      [s for _, s in ms], "test accuracy (%)", "Fashion-MNIST, 1 % / 10 % labels")


# ----------------------------------------------------------------------------- overhead
def _time(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def overhead(args, argv) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    x = torch.randn(2 * b, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2 * b,), generator=g)
    xv, yv = torch.randn(1000, 1, 28, 28, generator=g), torch.randint(0, 10, (1000,), generator=g)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=500)
    y[b:] = y[:b]

    def make(method, **kw):
        torch.manual_seed(0)
        model = SmallCNN(1, 10, img_size=28)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ref = (AugmentationRefiner(model, opt, val_loader, method=method, **refiner_kwargs({"budget": None, **kw}))
               if method else None)

        def step():
            logits = model(x)
            loss = ref(logits, y, num_original=b) if ref else F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step, model, ref

    plain, model, _ = make(None)
    infl_r4, _, ref4 = make("influence", refresh_every=4)
    infl_r1, _, ref1 = make("influence", refresh_every=1)
    saflex, _, _ = make("saflex", refresh_every=4, aug_weight=1.0)
    saflex1, _, _ = make("saflex", refresh_every=1, aug_weight=1.0)
    # components
    with torch.no_grad():
        feats = features_and_logits(model.eval(), model.fc, torch.randn(2048, 1, 28, 28, generator=g))[0]
    model.train()
    scorer = InfluenceScorer(model.fc, damping=1e-2, cg_iters=200)
    vgrad = {"weight": torch.randn(10, 64, generator=g) * 1e-2, "bias": torch.randn(10, generator=g) * 1e-2}

    def solve():
        scorer.fit(feats)
        scorer.solve(vgrad)

    def solve_explicit():
        InfluenceScorer(model.fc, damping=1e-2, solver="explicit").fit(feats).solve(vgrad)

    clf = SmallCNN(1, 10, img_size=28)
    sc = InfluenceScorer(clf.fc, damping=1e-2).fit(feats)
    sc.set_validation(grad=vgrad)
    net = AugmentationNetwork(1, 28)
    trainer = InfluenceAugTrainer(net, clf, clf.fc, sc, transform=heuristic_augment)

    def augnet_step():
        trainer.step(x[:b], y[:b], g)

    def augnet_forward():
        with torch.no_grad():
            net(heuristic_augment(x[:b], g), generator=g)

    arms = {"plain step (CE on originals + views)": plain, "influence refiner, refresh every 4": infl_r4,
            "influence refiner, refresh every 1": infl_r1, "SAflex refiner (defaults), refresh every 4": saflex,
            "SAflex refiner (defaults), refresh every 1": saflex1,
            "s_val solve: CG over 2048 cached features": solve,
            "s_val solve: explicit (650 x 650 Cholesky)": solve_explicit,
            "augmentation network: influence training step (batch 64)": augnet_step,
            "augmentation network: forward for 64 views (final training)": augnet_forward}
    for fn in arms.values():  # warm up
        fn()
        fn()
    times = {k: [] for k in arms}
    for _ in range(args.rounds):
        for k, fn in arms.items():
            times[k].append(_time(fn, args.reps))
    base = times["plain step (CE on originals + views)"]
    rows = []
    for k, ts in times.items():
        ratios = [t / p for t, p in zip(ts, base)]
        rows.append([k, f"{statistics.median(ts) * 1000:.1f}", f"{statistics.median(ratios):.2f}"])
    pre = (f"Command: `python -m benchmarks.influence {' '.join(argv)}`".strip() + "\n\n"
           f"CPU, one thread. SmallCNN on 28x28 inputs, batch of {b} originals + {b} views (refiner steps include the "
           "forward, backward and SGD update; the validation direction averages 1000 validation images in batches of 500 "
           "when it is refreshed). Each component is timed in interleaved rounds against the plain step "
           f"({args.rounds} rounds x {args.reps} repetitions); ratios are medians over rounds of time / plain-step time "
           "of the same round.")
    out = None if args.no_save else results_dir("influence") / "influence_overhead.md"
    print(write_markdown_table(out, ["what", "ms (median)", "ratio to a plain step"], rows,
                               title="Influence augmentation: overhead", preamble=pre))
    del ref4, ref1


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the per-fraction epochs")
    ap.add_argument("--augnet-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="overhead: originals per batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if not (args.quality or args.overhead):
        ap.error("pass --quality and/or --overhead")
    set_threads(1)
    if args.overhead:
        overhead(args, [a for a in argv if a != "--quality"])
    if args.quality:
        quality(args, [a for a in argv if a != "--overhead"])


if __name__ == "__main__":
    main()
