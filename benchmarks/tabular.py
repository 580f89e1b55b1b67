"""Tabular study: UCI Letter and Spambase, an MLP, no augmentation / CutMix / CutMix + SAflex.

Setting (per data set and seed): a stratified 20 % test split, a clean validation split (Letter
1,000 rows, Spambase 400) and the rest for training; features standardised with the training
statistics. Model: :class:`augplug.tabular.TabularMLP` (two hidden layers of 256, dropout 0.1),
AdamW with a cosine schedule, batch 256. CutMix (:class:`augplug.tabular.TabularCutMix`, labels kept)
is applied to the training batch in place: each row is replaced by its CutMix version with
probability ``p``, and the refiner is told which rows were augmented (``augmented=mask``).

    python -m benchmarks.tabular                                 # all arms, both tables, seeds 0 1 2
    python -m benchmarks.tabular --datasets spambase --arms saflex --seeds 0 --no-save \
        --set beta=1 --set gumbel=true                           # a variant (printed, not saved)

Writes ``benchmarks/results/tabular/tabular.md`` and ``tabular.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from augplug.methods import SAFLEX_PAPER
from augplug.refiner import refiner_kwargs

from .common import (fmt_mean_std, mean_std, paired_difference, parse_sets, results_dir, save_bar_plot, set_threads,
                     share_options, write_markdown_table)

DATASETS = ("letter", "spambase")
VAL_SIZE = {"letter": 1000, "spambase": 400}
EPOCHS = {"letter": 30, "spambase": 40}
HIGH_P = 0.5
PROPORTION = (0.1, 0.5)
#: The paper's rule (hard sign weights, Gumbel-softmax soft labels, beta = 1 as for tables, tau = 1, raw scores).
PAPER = dict(SAFLEX_PAPER)
FIXED = {"aug_weight": 1.0}

#: arm -> (CutMix probability, refiner method, refiner options, layout[, label]). Layout "inplace": the
#: batch's rows are replaced by their CutMix versions with probability p; "orig+aug": the batch holds
#: every original row plus the CutMix versions of the rows picked with probability p (the paper's inner
#: objective: originals plus weighted, relabelled augmented samples). Label "keep" (default): a CutMix
#: row keeps its label; "mix": its label is mixed by the replaced share (soft upstream targets).
ARM_CONFIGS = {
    "none": (0.0, None, {}, "inplace"),
    "cutmix-p0.1": (0.1, "none", {}, "inplace"),
    f"cutmix-p{HIGH_P}": (HIGH_P, "none", {}, "inplace"),
    # "+saflex" arms: augplug's per-sample defaults with the augmented rows at their upstream share
    # (aug_weight=1.0, as measured before the adaptive share); "+saflex-share": augplug's defaults
    f"cutmix-p{HIGH_P}+saflex": (HIGH_P, "saflex", FIXED, "inplace"),
    f"cutmix-p{HIGH_P}+saflex-share": (HIGH_P, "saflex", {}, "inplace"),
    f"cutmix-p{HIGH_P}+saflex-paper": (HIGH_P, "saflex", PAPER, "inplace"),
    f"orig+cutmix-p{HIGH_P}": (HIGH_P, "none", {}, "orig+aug"),
    f"orig+cutmix-p{HIGH_P}+saflex": (HIGH_P, "saflex", FIXED, "orig+aug"),  # trials only (not in the default arms)
    f"orig+cutmix-p{HIGH_P}+saflex-share": (HIGH_P, "saflex", {}, "orig+aug"),  # trials only
    f"orig+cutmix-p{HIGH_P}+saflex-paper": (HIGH_P, "saflex", PAPER, "orig+aug"),
    f"orig+cutmix-p{HIGH_P}+saflex-paper-wnbatch": (HIGH_P, "saflex", {**PAPER, "weight_norm": "batch"}, "orig+aug"),
    # the paper's rule without the Gumbel draw (soft labels softmax((g + beta y~) / tau)), mean-1 weights over the batch
    f"orig+cutmix-p{HIGH_P}+saflex-nogumbel-wnbatch": (HIGH_P, "saflex", {**PAPER, "gumbel": False, "weight_norm": "batch"},
                                                       "orig+aug"),
    # control for the paper rule's soft labels: the targets it gives when g = 0, softmax(y~), without SAflex
    f"orig+cutmix-p{HIGH_P}-smooth": (HIGH_P, "none", {}, "orig+aug", "smooth"),
    f"orig+cutmix-p{HIGH_P}-mix": (HIGH_P, "none", {}, "orig+aug", "mix"),
    f"orig+cutmix-p{HIGH_P}-mix+saflex-paper-wnbatch": (HIGH_P, "saflex", {**PAPER, "weight_norm": "batch"},
                                                        "orig+aug", "mix"),
    # augplug's defaults on CutMix rows whose labels are mixed by the replaced share (soft upstream targets)
    f"orig+cutmix-p{HIGH_P}-mix+saflex-share": (HIGH_P, "saflex", {}, "orig+aug", "mix"),
}
TRIAL_ONLY = (f"orig+cutmix-p{HIGH_P}+saflex", f"orig+cutmix-p{HIGH_P}+saflex-share", f"cutmix-p{HIGH_P}+saflex-share",
              f"orig+cutmix-p{HIGH_P}-mix+saflex-share")
ARMS = tuple(a for a in ARM_CONFIGS if a not in TRIAL_ONLY)

#: Single-seed trials run before the study (UCI Letter, seed 0, 30 epochs), each reproducible with
#: ``python -m benchmarks.tabular --datasets letter --seeds 0 --epochs 30 --no-save --arms ARM --set ...``.
TRIALS = """\
## Settings tried before the study (Letter, seed 0, 30 epochs, test accuracy %)

Each row: `python -m benchmarks.tabular --datasets letter --seeds 0 --epochs 30 --no-save --arms ARM [--set KEY=VALUE ...]`.

| arm | options on top of the arm's own | test acc % |
|---|---|---|
| none | | 93.85 |
| cutmix-p0.1 | | 93.37 |
| cutmix-p0.5 | | 89.17 |
| cutmix-p0.5+saflex | (augplug defaults: centred scores, graded weights, no relabelling) | 89.15 |
| cutmix-p0.5+saflex | `weighting=hard` | 88.05 |
| cutmix-p0.5+saflex | `weight_tau=0.3` | 88.57 |
| cutmix-p0.5+saflex | `weight_tau=0.1` | 88.27 |
| cutmix-p0.5+saflex | `weighting=hard weight_norm=batch` | 89.72 |
| cutmix-p0.5+saflex | `mode=full weighting=hard` | 88.25 |
| cutmix-p0.5+saflex | `beta=1 tau=1 gumbel=true` (soft labels as in the paper, centred scores, graded weights) | 90.25 |
| cutmix-p0.5+saflex | `beta=3 tau=0.3` | 88.95 |
| cutmix-p0.5+saflex | `beta=1 tau=0.3` | 88.35 |
| cutmix-p0.5+saflex-paper | (= `cutmix-p0.5+saflex` with `augplug.SAFLEX_PAPER`) | 90.28 |
| orig+cutmix-p0.5 | | 91.78 |
| orig+cutmix-p0.5+saflex | | 91.47 |
| orig+cutmix-p0.5+saflex | `weight_norm=batch` | 91.22 |
| orig+cutmix-p0.5+saflex-paper | | 92.85 |
| orig+cutmix-p0.5+saflex-paper | `weight_norm=batch` (the study's `orig+cutmix-p0.5+saflex-paper-wnbatch`) | 93.50 |

Spambase (seeds 0, 1, 2, 40 epochs, first version of the arms): none 94.67 ± 1.05, cutmix-p0.1
94.60 ± 0.94, cutmix-p0.5 94.20 ± 0.84, cutmix-p0.5+saflex 94.24 ± 0.95.
"""




def load_splits(name: str, seed: int):
    """Standardised (train, val, test) tensors of a UCI table, stratified by class."""
    from augplug.data import stratified_split

    from .datasets import load_uci

    X, y, _, classes = load_uci(name)
    rest, test = stratified_split(y, int(round(0.2 * len(y))), seed=seed)
    tr, va = stratified_split(y[rest], VAL_SIZE[name], seed=seed + 1)
    tr, va = rest[tr], rest[va]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
    t = lambda idx: (torch.from_numpy((X[idx] - mu) / sd).float(), torch.from_numpy(y[idx]))  # noqa: E731
    return t(tr), t(va), t(test), len(classes)


def run_arm(name: str, arm: str, seed: int, *, epochs: int, overrides: Dict,
            batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
            observe: Optional[Callable[[int, Dict, torch.Tensor], None]] = None) -> Dict[str, float]:
    """Train one arm on one table and return its test accuracy (and the SAflex weights' spread).

    ``observe(epoch, stats, targets)``, if given, is called after every refiner call with the epoch
    (from 0), ``refiner.stats`` and the batch's targets as passed to the refiner."""
    from augplug import AugmentationRefiner
    from augplug.tabular import TabularCutMix, TabularMLP

    (xtr, ytr), (xva, yva), (xte, yte), c = load_splits(name, seed)
    p, method, arm_kw, layout, label = (ARM_CONFIGS[arm] + ("keep",))[:5]
    torch.manual_seed(seed)
    model = TabularMLP(xtr.shape[1], c, hidden=256, depth=2, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = math.ceil(len(ytr) / batch_size)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    refiner = None
    if method is not None:
        kw = share_options({**arm_kw, **(overrides if method == "saflex" else {})})
        warm = kw.pop("warmup_epochs", 0.0)
        kw.setdefault("warmup_steps", int(warm * steps))
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xva, yva), batch_size=500, shuffle=True)
        if method == "saflex":  # refine every batch, with or without originals, as the tables were made
            kw.setdefault("strength", 1.0)
        kw.setdefault("budget", None)   # the tables were measured on the exact schedule
        refiner = AugmentationRefiner(model, opt, val, method=method, seed=seed, **refiner_kwargs(kw))
    cutmix = TabularCutMix(p=p, proportion=PROPORTION, label="keep" if label == "smooth" else label, num_classes=c, seed=seed + 17,
                           return_mask=True) if p > 0 else None
    g = torch.Generator().manual_seed(seed + 1)
    w_aug, t0 = [], time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            x, y = xtr[idx], ytr[idx]
            if cutmix is not None:
                xa, ya, aug = cutmix(x, y)
                if label == "smooth":
                    ya = torch.softmax(F.one_hot(ya, c).float(), -1)
                if layout == "inplace":
                    x, y = xa, ya
                else:
                    if ya.dim() == 2:  # mixed (soft) labels: the originals as one-hot rows
                        y = F.one_hot(y, c).float()
                    x, y = torch.cat([x, xa[aug]]), torch.cat([y, ya[aug]])
                    aug = torch.cat([torch.zeros(len(idx), dtype=torch.bool), aug[aug]])
            logits = model(x)
            if refiner is None:
                loss = F.cross_entropy(logits, y)
            else:
                loss = refiner(logits, y, augmented=aug)
                st = refiner.stats
                if observe is not None:
                    observe(epoch, st, y)
                if st["active"] and method == "saflex" and bool(aug.any()):
                    w_aug.append(st["weights"][st["augmented"]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    out = {"test_acc": acc, "seconds": time.perf_counter() - t0}
    if w_aug:
        w = torch.cat(w_aug)
        out.update(w_std=float(w.std()), w_low=float((w < 0.5).float().mean()))
    return out


def target_summary(results: Dict, seeds: List[int], chosen: Optional[Dict[str, str]] = None) -> str:
    """Per table: the best SAflex arm (or the arm named for the table in ``chosen``, fixed before the
    run) against the best other arm (by mean), with the paired per-seed differences, and whether the
    target "CutMix + SAflex >= the best other arm" holds on the means."""
    chosen = chosen or {}
    which = "the SAflex arm chosen before the run" if chosen else "best CutMix + SAflex arm"
    lines = [f"Target check ({which} against the best other arm, by mean test accuracy; "
             "paired difference by seed):", ""]
    for d in dict.fromkeys(k[0] for k in results):
        arms = {a: [r["test_acc"] for r in rs] for (dd, a), rs in results.items() if dd == d}
        refined = {a: v for a, v in arms.items() if "saflex" in a}
        other = {a: v for a, v in arms.items() if "saflex" not in a}
        if not refined or not other:
            continue
        best_r = chosen.get(d) or max(refined, key=lambda a: float(np.mean(refined[a])))
        if best_r not in refined:
            continue
        best_o = max(other, key=lambda a: float(np.mean(other[a])))
        m, sd, wins, n = paired_difference([100 * x for x in refined[best_r]], [100 * y for y in other[best_o]])
        lines.append(f"- {d}: `{best_r}` {100 * np.mean(refined[best_r]):.2f} vs `{best_o}` "
                     f"{100 * np.mean(other[best_o]):.2f}; difference {m:+.2f} ± {sd:.2f} points "
                     f"(better on {wins} of {n} seeds): {'met' if m >= 0 else 'not met'}.")
    return "\n".join(lines) + "\n"


def _job(args):
    name, arm, seed, epochs, overrides = args
    set_threads(1)
    return name, arm, seed, run_arm(name, arm, seed, epochs=epochs, overrides=overrides)


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=tuple(ARM_CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the per-table epochs")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="refiner option for the SAflex arm on top of augplug's defaults (e.g. beta=1)")
    ap.add_argument("--target-arm", action="append", default=[], metavar="TABLE=ARM",
                    help="the SAflex arm the target check uses for TABLE (fixed before the run; default: the best by mean)")
    ap.add_argument("--out", default="tabular")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    chosen = dict(kv.split("=", 1) for kv in args.target_arm)
    bad = {d: a for d, a in chosen.items() if d not in args.datasets or a not in args.arms or "saflex" not in a}
    if bad:
        ap.error(f"--target-arm needs a table that runs and one of its SAflex arms, got {bad}")
    jobs = [(d, a, s, args.epochs or EPOCHS[d], overrides)
            for d in args.datasets for a in args.arms for s in args.seeds]
    results: Dict = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as ex:
        for d, a, s, res in ex.map(_job, jobs):
            results.setdefault((d, a), []).append(res)
            print(json.dumps({"dataset": d, "arm": a, "seed": s, **{k: round(v, 4) for k, v in res.items()}}), flush=True)
    wall = time.perf_counter() - t0
    headers = ["data set", "arm", "test acc % (mean ± std)", "per seed", "share of augmented rows with weight < 0.5", "s/run"]
    rows = []
    for (d, a), rs in results.items():
        accs = [r["test_acc"] for r in rs]
        low = [r["w_low"] for r in rs if "w_low" in r]
        rows.append([d, a, fmt_mean_std(accs), " / ".join(f"{100 * v:.2f}" for v in accs),
                     fmt_mean_std(low, scale=1, digits=3) if low else "–", f"{mean_std([r['seconds'] for r in rs])[0]:.0f}"])
    pre = (f"Command: `python -m benchmarks.tabular {' '.join(argv)}`".strip() +
           f"\n\nUCI Letter (20,000 × 16, 26 classes) and Spambase (4,601 × 57, 2 classes); stratified 20 % test, "
           f"validation {VAL_SIZE}, the rest for training; standardised features. TabularMLP (2 × 256, dropout 0.1), "
           f"AdamW lr 1e-3, weight decay 1e-4, cosine, batch 256, epochs "
           f"{ {d: args.epochs or EPOCHS[d] for d in args.datasets} }; seeds {args.seeds}. CutMix in place on the "
           f"training batch: proportion {PROPORTION} of the columns from another row, labels kept (`-mix`: labels "
           f"mixed by the replaced share; `-smooth`: labels softmax(one-hot), what the paper's rule gives when g = 0). "
           f"`+saflex`: augplug's refiner defaults (`augplug.refiner.DEFAULTS`) with the augmented rows at their "
           f"upstream share (`aug_weight=1.0`); `+saflex-share`: the defaults, adaptive share included; `+saflex-paper`: "
           f"`augplug.SAFLEX_PAPER` = {PAPER}; `-wnbatch`: the same with `weight_norm='batch'` (unhelpful augmented "
           f"rows give their share of the loss back to the originals); `-nogumbel`: without the Gumbel draw" + (f"; SAflex arms with {overrides}" if overrides else "") +
           f", validation loader batch 500. Wall-clock for the whole command: {wall / 60:.1f} min.")
    table = write_markdown_table(None, headers, rows, title="Tabular: UCI Letter and Spambase", preamble=pre)
    table += "\n" + target_summary(results, args.seeds, chosen)
    print(table)
    if not args.no_save:
        (results_dir("tabular") / f"{args.out}.md").write_text(table + "\n" + TRIALS, encoding="utf-8")
    if not args.no_save:
        labels = [f"{d}\n{a}" for (d, a) in results]
        ms = [mean_std([r["test_acc"] * 100 for r in rs]) for rs in results.values()]
        save_bar_plot(results_dir("tabular") / f"{args.out}.png", labels, [m for m, _ in ms], [s for _, s in ms],
                      "test accuracy (%)", "UCI tables, MLP: CutMix with and without SAflex")


if __name__ == "__main__":
    main()
