"""AutoDO on biased, noisy Fashion-MNIST: quality (baseline / W / W+S / A+W+S / SAflex) and overhead.

Setting (``quality``): a stratified pool of Fashion-MNIST training images; classes 5-9 subsampled to
1/10 of the majority count (``benchmarks.corrupt.make_imbalanced``, imbalance ratio 10); 20 % symmetric
label noise on the result (``benchmarks.corrupt.add_label_noise``); 1k clean, balanced validation images
(disjoint); the official 10k test set. Small CNN (``augplug.models.SmallCNN``), SGD + Nesterov,
cosine schedule, batch 128. Arms:

``baseline``  plain cross-entropy on the noisy labels, no augmentation;
``W``         AutoDO loss weights only (no augmentation);
``W+S``       AutoDO loss weights and soft labels (no augmentation);
``A+W+S``     AutoDO with learned per-point affine augmentation, weights and soft labels;
``saflex``    SAflex (augplug defaults) refining every row of the noisy batch, for comparison.

Metrics: test accuracy, accuracy on the under-represented classes 5-9, share of corrupted training
labels whose learned soft label's argmax is the true class, and the ROC AUC of the learned weights
for "the given label is clean" (``augplug.demo.study.binary_auc``).

    python -m benchmarks.autodo                        # quality (3 seeds) + overhead, writes results
    python -m benchmarks.autodo --part quality --seeds 0 --epochs 4 --no-save      # a quick look
    python -m benchmarks.autodo --part overhead

Writes ``benchmarks/results/autodo/autodo.md`` (and ``autodo.png``); ``--part overhead`` alone writes
``autodo_overhead.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.demo.study import binary_auc
from augplug.models import SmallCNN

from .common import fmt_mean_std, mean_std, results_dir, save_bar_plot, set_threads
from .corrupt import add_label_noise, make_imbalanced

ARMS = ("baseline", "W", "W+S", "A+W+S", "saflex")
MINORITY = (5, 6, 7, 8, 9)


def load_biased(seed: int, pool: int, n_val: int = 1000, ratio: float = 10.0, noise: float = 0.2):
    """Imbalanced, noisy training set + clean validation + test (normalized float images)."""
    from .datasets import FMNIST_MEAN, FMNIST_STD, fashion_mnist_splits

    sp = fashion_mnist_splits(pool, n_val, seed=seed)
    x_pool, y_pool = sp["train"]
    keep = torch.from_numpy(make_imbalanced(y_pool.numpy(), ratio, seed=seed))
    x_tr, y_true = x_pool[keep], y_pool[keep]
    y_noisy, corrupted = add_label_noise(y_true, noise, 10, seed=seed, mode="symmetric")
    norm = lambda u8: ((u8.float() / 255 - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)  # noqa: E731
    return dict(x=norm(x_tr), y=y_noisy, y_true=y_true, corrupted=corrupted,
                x_val=norm(sp["val"][0]), y_val=sp["val"][1], x_test=norm(sp["test"][0]), y_test=sp["test"][1])


def _evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
    model.train()
    minority = torch.isin(y, torch.tensor(MINORITY))
    return float((pred == y).float().mean()), float((pred[minority] == y[minority]).float().mean())


def _job(job):
    """One (seed, arm) training run in a worker process (one torch thread)."""
    seed, arm, args = job
    set_threads(1)
    data = load_biased(seed, args.pool)
    sizes = (len(data["y"]), int(data["corrupted"].sum()), len(data["y_val"]))
    return seed, arm, sizes, run(data, arm, seed, args)


def autodo_options(arm: str, n: int, steps_per_epoch: int, args) -> Dict:
    models = {"W": "W", "W+S": "WS", "A+W+S": "AWS"}[arm]
    return dict(num_points=n, num_classes=10, models=models, augment="per_point" if "A" in models else "off",
                hyper_lr=args.hyper_lr, start_step=int(args.start_epoch * steps_per_epoch), loss=args.loss,
                alpha=args.alpha, neumann_steps=args.neumann_steps, init_gate_prob=args.init_gate_prob,
                init_magnitude=args.init_magnitude)


def run(data, arm: str, seed: int, args) -> Dict[str, float]:
    torch.manual_seed(seed)
    n = len(data["y"])
    model = SmallCNN(1, 10, img_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    spe = math.ceil(n / args.batch_size)
    total = args.epochs * spe
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    val = DataLoader(TensorDataset(data["x_val"], data["y_val"]), batch_size=args.batch_size, shuffle=True,
                     generator=torch.Generator().manual_seed(seed + 3))
    refiner = None
    if arm == "saflex":
        refiner = AugmentationRefiner(model, opt, val, method="saflex", seed=seed,
                                      method_options=dict(strength=1.0), schedule=dict(budget=None))
    elif arm != "baseline":
        refiner = AugmentationRefiner(model, opt, val, method="autodo", seed=seed,
                                      method_options=autodo_options(arm, n, spe, args),
                                      schedule=dict(val_batches=1, refresh_every=args.refresh_every, budget=None))
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(spe):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            x, y = data["x"][idx], data["y"][idx]
            if refiner is None:
                loss = F.cross_entropy(model(x), y)
            elif arm == "saflex":
                loss = refiner(model(x), y)
            else:
                x = refiner.augment(x, idx)
                loss = refiner(model(x), y, index=idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    acc, acc_min = _evaluate(model, data["x_test"], data["y_test"])
    out = {"test_acc": acc, "minority_acc": acc_min, "seconds": time.perf_counter() - t0}
    if refiner is not None and arm != "saflex":
        pol = refiner.policy
        corrupted = data["corrupted"].numpy()
        w = pol.weights().numpy()
        if "W" in pol.models:
            out["auc_weight_clean"] = binary_auc(w, ~corrupted)
            out["w_clean"] = float(w[~corrupted].mean())
            out["w_corrupted"] = float(w[corrupted].mean())
            mino = np.isin(data["y"].numpy(), MINORITY)
            out["w_minority_label"] = float(w[mino].mean())
        if "S" in pol.models:
            arg = pol.soft_labels().argmax(1).numpy()
            yt = data["y_true"].numpy()
            out["recovered"] = float((arg[corrupted] == yt[corrupted]).mean())
            out["clean_kept"] = float((arg[~corrupted] == yt[~corrupted]).mean())
        if "A" in pol.models:
            gp = pol.gate_probabilities().mean(0)
            out.update({f"p_{op}": float(p) for op, p in zip(pol.ops, gp)})
    return out


# ------------------------------------------------------------------ overhead
def overhead(args) -> Dict[str, float]:
    """Paired step times, interleaved in one process: plain step vs AutoDO with a hyper-step every step."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    n, bs = 2048, args.batch_size
    x = torch.randn(n, 1, 28, 28).to(dev)
    y = torch.randint(0, 10, (n,)).to(dev)
    val = DataLoader(TensorDataset(torch.randn(1000, 1, 28, 28), torch.randint(0, 10, (1000,))), batch_size=bs,
                     shuffle=True, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    setups = {}
    for key, refresh in (("plain", None), ("autodo_refresh1", 1), ("autodo_refresh4", 4)):
        torch.manual_seed(0)
        model = SmallCNN(1, 10, img_size=28).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ref = None if refresh is None else AugmentationRefiner(model, opt, val, method="autodo",
                                                               method_options=dict(num_points=n, num_classes=10, models='AWS', every=1),
                                                               schedule=dict(val_batches=1, refresh_every=refresh, cache_validation=args.cache_validation,
                                                                             budget=None))
        setups[key] = (model, opt, ref)

    def step(key, i):
        model, opt, ref = setups[key]
        idx = (torch.arange(i * bs, (i + 1) * bs) % n).to(dev)
        sync()
        t = time.perf_counter()
        if ref is None:
            loss = F.cross_entropy(model(x[idx]), y[idx])
        else:
            loss = ref(model(ref.augment(x[idx], idx)), y[idx], index=idx)
            assert ref.policy.last_stats["hyper_step"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t

    for key in setups:  # warm-up
        for i in range(3):
            step(key, i)
    times = {k: [] for k in setups}
    for i in range(args.overhead_steps):
        for key in setups:
            times[key].append(step(key, i))
    res = {k: statistics.median(v) for k, v in times.items()}
    out = {"plain_ms": 1000 * res["plain"]}
    for k in ("autodo_refresh1", "autodo_refresh4"):
        ratios = [a / b for a, b in zip(times[k], times["plain"])]
        out[k + "_ms"] = 1000 * res[k]
        out[k + "_ratio"] = statistics.median(ratios)
    from augplug.methods.autodo import AutoDO
    for mode in ("per_point", "shared"):
        out[f"table_mib_60k_{mode}"] = AutoDO(60000, 10, augment=mode).table_bytes() / 2 ** 20
    return out


def _device_words(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return "1 CPU thread"


def _lr(text: str):
    if "=" not in text:
        return float(text)
    return {k.strip(): float(v) for k, v in (kv.split("=") for kv in text.split(","))}


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "quality", "overhead"), default="all")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--pool", type=int, default=18000, help="stratified pool before the imbalance subsampling")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hyper-lr", type=_lr, default=0.05, help="a number or per sub-model, e.g. W=0.2,S=0.5,A=0.05")
    ap.add_argument("--start-epoch", type=float, default=2.0)
    ap.add_argument("--refresh-every", type=int, default=1)
    ap.add_argument("--loss", default="ce", choices=("ce", "sym_kl"))
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--neumann-steps", type=int, default=5)
    ap.add_argument("--init-gate-prob", type=float, default=0.2, help="A+W+S: initial probability of each operation")
    ap.add_argument("--init-magnitude", type=float, default=0.5, help="A+W+S: initial magnitude scale")
    ap.add_argument("--overhead-steps", type=int, default=30)
    ap.add_argument("--device", default="cpu", help="overhead part: cpu or cuda")
    ap.add_argument("--cache-validation", action="store_true", help="overhead part: cache_validation=True")
    ap.add_argument("--workers", type=int, default=2, help="quality part: training runs in parallel (one thread each)")
    ap.add_argument("--out", default="autodo")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    set_threads(1)
    lines = ["# AutoDO: biased, noisy Fashion-MNIST", "", f"Command: `python -m benchmarks.autodo {' '.join(argv)}`".strip(), ""]
    if args.part in ("all", "quality"):
        results: Dict[str, List[Dict]] = {}
        sizes = None
        jobs = [(seed, arm, args) for seed in args.seeds for arm in args.arms]
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as ex:
            for seed, arm, sizes, res in ex.map(_job, jobs):  # in job order: seeds stay paired across arms
                results.setdefault(arm, []).append(res)
                print(json.dumps({"arm": arm, "seed": seed, **{k: round(v, 4) for k, v in res.items()}}), flush=True)
        lines += [
            f"Settings: Fashion-MNIST, stratified pool of {args.pool} training images, classes 5-9 subsampled to "
            f"1/10 of the majority count (imbalance ratio 10), 20 % symmetric label noise: {sizes[0]} training "
            f"images ({sizes[1]} corrupted, seed {args.seeds[-1]}); {sizes[2]} clean balanced validation images; "
            f"official 10k test set. SmallCNN (batch norm), SGD lr {args.lr} (Nesterov, momentum 0.9, wd 5e-4, "
            f"cosine), batch {args.batch_size}, {args.epochs} epochs, seeds {args.seeds}. AutoDO: hyper-steps every "
            f"step from epoch {args.start_epoch}, hyper_lr {args.hyper_lr} (lazy RMSprop), loss {args.loss}, "
            f"alpha {args.alpha}, T = {args.neumann_steps}, one fresh validation batch of {args.batch_size} every "
            f"{args.refresh_every} step(s); other options at their defaults. SAflex: augplug defaults, every row refined.",
            ""]
        cols = [("test_acc", "test acc %", 100), ("minority_acc", "acc classes 5-9 %", 100),
                ("recovered", "corrupted labels recovered", 1), ("clean_kept", "clean labels kept", 1),
                ("auc_weight_clean", "AUC(weight, clean)", 1), ("w_clean", "mean w clean", 1),
                ("w_corrupted", "mean w corrupted", 1), ("w_minority_label", "mean w (label in 5-9)", 1)]
        lines.append("| arm | " + " | ".join(c[1] for c in cols) + " | s/run |")
        lines.append("|---" * (len(cols) + 2) + "|")
        for arm, rs in results.items():
            cells = []
            for key, _, scale in cols:
                vals = [r[key] for r in rs if key in r]
                cells.append(fmt_mean_std(vals, scale=scale, digits=2 if scale == 100 else 3) if vals else "–")
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {mean_std([r['seconds'] for r in rs])[0]:.0f} |")
        if "baseline" in results and "A+W+S" in results:
            gain = [a["test_acc"] - b["test_acc"] for a, b in zip(results["A+W+S"], results["baseline"])]
            m, s = mean_std(gain)
            lines += ["", f"A+W+S minus baseline (paired by seed): {100 * m:+.2f} ± {100 * s:.2f} points "
                          f"(target: >= +5): {'met' if m >= 0.05 else 'not met'}."]
        aug = [r for r in results.get("A+W+S", [])]
        if aug:
            ops = [k for k in aug[0] if k.startswith("p_")]
            lines += ["", f"Mean learned gate probability (A+W+S, start {args.init_gate_prob}): " +
                      ", ".join(f"{k[2:]} {np.mean([r[k] for r in aug]):.3f}" for k in ops) + "."]
        if not args.no_save:
            ms = [mean_std([r["test_acc"] * 100 for r in rs]) for rs in results.values()]
            save_bar_plot(results_dir("autodo") / f"{args.out}.png", list(results), [m for m, _ in ms],
                          [s for _, s in ms], "test accuracy (%)", "Fashion-MNIST, IR 10, 20% symmetric noise")
    if args.part in ("all", "overhead"):
        o = overhead(args)
        print(json.dumps(o), flush=True)
        lines += ["", "## Overhead", "",
                  f"Median step time over {args.overhead_steps} interleaved steps (SmallCNN, batch {args.batch_size}, "
                  f"28x28, {_device_words(args.device)}"
                  f"{', cache_validation=True' if args.cache_validation else ''}), and the median of the paired "
                  "per-step ratios. AutoDO: A+W+S with a "
                  "hyper-step at every step (augmentation, validation forward when refreshed, 5 closed-form head "
                  "HVPs, one reverse pass to the tables).", "",
                  "| setup | ms/step | ratio to plain |", "|---|---|---|",
                  f"| plain step (cross-entropy, no augmentation) | {o['plain_ms']:.1f} | 1.00 |",
                  f"| AutoDO, fresh validation batch every step | {o['autodo_refresh1_ms']:.1f} | {o['autodo_refresh1_ratio']:.2f} |",
                  f"| AutoDO, validation batch refreshed every 4 steps | {o['autodo_refresh4_ms']:.1f} | {o['autodo_refresh4_ratio']:.2f} |",
                  "", f"Table memory (weights, soft labels, gates, magnitudes, RMSprop state, given labels) for "
                      f"N = 60,000, C = 10: {o['table_mib_60k_per_point']:.1f} MiB per-point augmentation, "
                      f"{o['table_mib_60k_shared']:.1f} MiB shared."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        name = args.out if args.part != "overhead" else f"{args.out}_overhead"
        (results_dir("autodo") / f"{name}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
