"""``python -m augplug demo``: refinement against a harmful upstream augmentation, on bundled data.

Data: scikit-learn's digits (1,797 images, 8x8), split into train / clean validation / test with a
seeded stratified split. Upstream augmentation: strong timm RandAugment (``rand-m15-n3-mstd0.5``,
4 precomputed views per image) that, for a share of the views, breaks the label: the view is labelled
as the next class (as an augmentation that systematically turns one class into another would).
Arms: ``none`` (the originals, no augmentation), ``upstream`` (originals + augmented views as
given), ``upstream+SAflex`` and ``upstream+L2RW`` (refined with augplug's defaults), over a few
seeds; ``--aug-only`` trains on the augmented views alone.
Prints a table and writes a plot (test accuracy on an axis from 0, and each arm's paired
difference to ``upstream``, seed by seed) and the raw numbers to ``--out``.

Needs scikit-learn and matplotlib: ``pip install "augplug[demo]"``. Runs on one torch thread by
default (``--threads``). On a 2-core machine the default command took 28-29 s on 1 thread and
23-26 s on 2 when the machine was otherwise idle, but beside one other busy process one seed took
16-18 s on 1 thread and 82-124 s on 2: the small model gains little from a second thread and loses
much when it has to wait for a busy core.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from ._extras import pyplot, require
from .data import stratified_split
from .models import SmallCNN
from .study import StudyData, corrupt_views, make_view_bank, run_arm

__all__ = ["load_digits_study", "run_demo", "main"]

ARMS = {"none": "none", "upstream": "upstream", "upstream+SAflex": "saflex", "upstream+L2RW": "l2rw"}


def load_digits_study(seed: int = 0, noise: float = 0.3, views: int = 4, aa: str = "rand-m15-n3-mstd0.5",
                      n_val: int = 300, n_test: int = 500, noise_kind: str = "pairflip") -> StudyData:
    """Digits split into train / val / test with a RandAugment view bank and corrupted view labels."""
    from timm.data.auto_augment import rand_augment_transform

    d = require("sklearn.datasets", "demo", "the demo's digits data").load_digits()
    images = torch.from_numpy(np.round(d.images / 16.0 * 255).astype(np.uint8))
    labels = torch.from_numpy(d.target.astype(np.int64))
    rest, test_idx = stratified_split(labels.numpy(), n_test, seed=seed)
    tr, va = stratified_split(labels.numpy()[rest], n_val, seed=seed + 1)
    train_idx, val_idx = rest[tr], rest[va]
    mean, std = float(images.float().mean() / 255), float(images.float().std() / 255)
    tf = rand_augment_transform(aa, {"img_mean": (int(255 * mean),)})
    bank = make_view_bank(images[train_idx], tf, views, seed=seed)
    norm = lambda u8: ((u8.float() / 255 - mean) / std).unsqueeze(-3)  # noqa: E731
    view_labels, noisy = corrupt_views(labels[train_idx], views, noise, 10, seed=seed, kind=noise_kind)
    return StudyData(norm(images[train_idx]), labels[train_idx], norm(images[val_idx]), labels[val_idx],
                     norm(images[test_idx]), labels[test_idx], norm(bank), view_labels, 10,
                     extra={"noisy": noisy})


def run_demo(seeds: List[int], epochs: int = 30, noise: float = 0.3, out: Optional[str] = "augplug_demo_out",
             progress: bool = True, noise_kind: str = "pairflip", aug_only: bool = False
             ) -> Dict[str, List[Dict[str, float]]]:
    """Run every arm for every seed; return ``{arm: [metrics per seed]}`` and write the report to ``out``."""
    from tqdm import tqdm

    require("sklearn.datasets", "demo", "the demo's digits data")   # fail before any training, not after
    if out:
        pyplot("demo", "the demo's plot (demo.png)")

    jobs = [(arm, seed) for seed in seeds for arm in ARMS]
    results: Dict[str, List[Dict[str, float]]] = {arm: [] for arm in ARMS}
    cache: Dict[int, StudyData] = {}
    # tqdm hides the bar when stderr is not a terminal (disable=None)
    bar = tqdm(jobs, desc="augplug demo", unit="run", disable=None if progress else True)
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm}, seed {seed}")
        if seed not in cache:
            cache[seed] = load_digits_study(seed, noise=noise, noise_kind=noise_kind)
        res = run_arm(cache[seed], ARMS[arm], seed, epochs=epochs, batch_size=64, lr=0.05, val_batch_size=300,
                      aug_only=aug_only, model_fn=lambda: SmallCNN(1, 10, img_size=8, width=16, hidden=64))
        results[arm].append(res)
    table = format_table(results, seeds, epochs, noise, noise_kind, aug_only)
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        path = _plot(results, os.path.join(out, "demo.png"), seeds, epochs)
        print(f"\nwrote {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.json')} and {path}")
    return results


def _ms(vals):
    vals = np.asarray(vals, dtype=np.float64)
    return vals.mean(), (vals.std(ddof=1) if len(vals) > 1 else 0.0)


def format_table(results, seeds, epochs, noise, noise_kind="pairflip", aug_only=False) -> str:
    wrong = "the next class (c -> c+1)" if noise_kind == "pairflip" else "a random wrong label"
    trained = "augmented views only (`none`: the originals)" if aug_only else "originals + augmented views"
    lines = [f"digits (sklearn), small CNN, {epochs} epochs, seeds {seeds}; upstream: RandAugment rand-m15-n3-mstd0.5 "
             f"with {noise:.0%} of augmented views labelled {wrong}; trained on {trained}",
             "", f"| arm | test accuracy % (mean ± std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}) | AUC(weight, clean view) | mean weight: clean / corrupted views |",
             "|---|---|---|---|"]
    for arm, rs in results.items():
        m, s = _ms([r["test_acc"] * 100 for r in rs])
        auc = [r["auc_weight"] for r in rs if "auc_weight" in r]
        wc = [r["mean_w_clean"] for r in rs if "mean_w_clean" in r]
        wn = [r["mean_w_noisy"] for r in rs if "mean_w_noisy" in r]
        lines.append(f"| {arm} | {m:.2f} ± {s:.2f} | " + (f"{np.mean(auc):.3f}" if auc else "–") + " | " +
                     (f"{np.mean(wc):.2f} / {np.mean(wn):.2f}" if wc else "–") + " |")
    return "\n".join(lines)


COLORS = {"none": "#999999", "upstream": "#d62728", "upstream+SAflex": "#2ca02c", "upstream+L2RW": "#1f77b4"}


def _plot(results, path, seeds, epochs: int, reference: str = "upstream") -> str:
    """Two panels: test accuracy per arm on an axis from 0, and each arm's paired difference to
    ``reference`` (same seed, percentage points). Bars are means over the seeds, error bars one sample
    standard deviation over the seeds (none with a single seed), dots the single seeds."""
    plt = pyplot("demo", "the demo's plot (demo.png)")
    arms = list(results)
    acc = {a: np.array([r["test_acc"] * 100 for r in results[a]]) for a in arms}
    n = len(seeds)
    spread = "error bars: ± 1 sample std (n − 1) over seeds" if n > 1 else "one seed: no error bars"
    jitter = np.linspace(-0.18, 0.18, n) if n > 1 else np.zeros(1)
    others = [a for a in arms if a != reference] if reference in acc else []
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(10, 4.2) if others else (5.5, 4.2), squeeze=False)
    ax = axes[0, 0]

    def bars(ax, names, values, fmt):
        x = np.arange(len(names))
        ms = [_ms(values[a]) for a in names]
        ax.bar(x, [m for m, _ in ms], yerr=[s for _, s in ms] if n > 1 else None, capsize=4,
               color=[COLORS.get(a, "#8c564b") for a in names], alpha=0.85)
        for i, a in enumerate(names):
            ax.scatter(i + jitter[:len(values[a])], values[a], s=14, color="black", zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{a.replace('+', chr(10) + '+')}\n{m:{fmt}}" for a, (m, _) in zip(names, ms)])
        return ms

    bars(ax, arms, acc, ".2f")
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy (axis from 0; mean under each arm)", fontsize=10)
    if others:
        ax = axes[0, 1]
        diffs = {a: acc[a] - acc[reference] for a in others}
        bars(ax, others, diffs, "+.2f")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(f"test accuracy − {reference}, same seed (pp)")
        ax.set_title(f"paired difference to {reference}", fontsize=10)
    fig.suptitle(f"digits: refining a harmful augmentation ({epochs} epochs, {n} seed{'s' if n != 1 else ''}: "
                 f"{', '.join(map(str, seeds))})", fontsize=11)
    fig.text(0.5, 0.01, f"bars: mean over {n} seed{'s' if n != 1 else ''}; {spread}; dots: single seeds",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="augplug demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="random seeds, one run of every arm per seed (default: 0 1 2); each seed re-splits the "
                         "data and redraws the augmentation")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs per run (default: 30)")
    ap.add_argument("--noise", type=float, default=0.3, help="share of augmented views given a wrong label (default: 0.3)")
    ap.add_argument("--noise-kind", default="pairflip", choices=("pairflip", "random"),
                    help="wrong labels: the next class (an augmentation that turns one class into another) or random")
    ap.add_argument("--aug-only", action="store_true",
                    help="train on augmented views only (default: originals + augmented views, the paper's setting)")
    ap.add_argument("--out", default="augplug_demo_out", help="output folder ('' to write nothing)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default: 1; 0: torch's default, one per core, slightly faster "
                         "on an otherwise idle machine, several times slower beside other busy processes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.threads < 0:
        ap.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(args.seeds, epochs=args.epochs, noise=args.noise, out=args.out or None, noise_kind=args.noise_kind,
             aug_only=args.aug_only, progress=not args.no_progress)
