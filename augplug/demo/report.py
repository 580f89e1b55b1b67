"""The demo's report: a markdown table of the arms and a two-panel accuracy plot."""
from __future__ import annotations

import numpy as np

from .._extras import pyplot

__all__ = ["format_table", "plot"]


def _ms(vals):
    vals = np.asarray(vals, dtype=np.float64)
    return vals.mean(), (vals.std(ddof=1) if len(vals) > 1 else 0.0)


def format_table(results, seeds, epochs, noise, noise_kind="pairflip", aug_only=False, budget=None) -> str:
    wrong = "the next class (c -> c+1)" if noise_kind == "pairflip" else "a random wrong label"
    trained = "augmented views only (`none`: the originals)" if aug_only else "originals + augmented views"
    schedule = "the exact schedule (budget=None)" if budget is None else f"overhead budget {budget!r}"
    lines = [f"digits (sklearn), small CNN, {epochs} epochs, seeds {seeds}; upstream: RandAugment rand-m15-n3-mstd0.5 "
             f"with {noise:.0%} of augmented views labelled {wrong}; trained on {trained}; refiners: {schedule}",
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


def plot(results, path, seeds, epochs: int, reference: str = "upstream") -> str:
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
