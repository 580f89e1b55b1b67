"""Which per-view signal should decide SAflex's weight on augmented views alone?

A small study beside ``benchmarks.quality``: Fashion-MNIST (10k training images, 4 RandAugment views
each, 30 % of the views mislabelled, randomly or class c as c + 1), the small CNN trained on the
views alone for ``--epochs``, one view per image and epoch. Every refined arm uses one fixed rule,
so that only the signal differs: keep the upstream labels, weight ``2 * sigmoid(s)`` with ``s`` one
of

* ``agreement``: ``y~^T g`` on centred scores (``normalize="center"``: column means removed, RMS 1;
  SAflex's signal),
* ``likelihood``: the standardised ``y~^T log p`` (the small-loss criterion),
* ``margin``: the standardised logit margin ``z_y~ - max_{k != y~} z_k`` (area-under-the-margin),
* ``zsum``: ``(z(agreement) + z(likelihood)) / sqrt(2)``,

renormalized to mean 1 over the batch by the refiner (``weight_norm="augmented"``). ``upstream``
trains on the views as given. This rule is not augplug's default (which normalizes by class without
originals), so compare the arms with each other only.

    python -m benchmarks.weight_signals --noise-kind random --seeds 0 1 2 --out weight_signals_random

Writes ``benchmarks/results/weight_signals/<out>.md`` (test accuracy and the weights' AUC for "label is clean").
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

import torch

from .common import fmt_mean_std, mean_std, results_dir, set_threads, write_markdown_table

SIGNALS = ("agreement", "likelihood", "margin", "zsum")
ARMS = ("upstream",) + SIGNALS


def _z(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean()) / t.std().clamp_min(1e-6)


def make_policy(signal: str):
    """A SAflex policy that keeps the labels and weights each view by ``2 * sigmoid(s)``."""
    from augplug.methods import SAflex
    from augplug.methods.saflex import normalize_scores

    class SignalPolicy(SAflex):
        def __init__(self):
            super().__init__(beta=float("inf"), tau=1.0, gumbel=False, weighting="soft", weight_tau=1.0,
                             normalize="center")

        def call_inputs(self, ctx):
            return {"logits": ctx.logits[ctx.rows].detach().float()}

        def __call__(self, scores, targets, generator=None, logits=None):
            y = targets.float()
            agreement = (y * normalize_scores(scores.float(), "center")).sum(-1)
            likelihood = (y * torch.log_softmax(logits, -1)).sum(-1)
            if signal == "agreement":
                s = agreement
            elif signal == "likelihood":
                s = _z(likelihood)
            elif signal == "margin":
                s = _z((y * logits).sum(-1) - logits.masked_fill(y > 0.5, -1e9).max(-1).values)
            else:
                s = (_z(agreement) + _z(likelihood)) / 2 ** 0.5
            return 2 * torch.sigmoid(s), y

    return SignalPolicy()


def run(arm: str, seed: int, noise_kind: str, epochs: int) -> Dict[str, float]:
    """One arm and seed through :func:`augplug.demo.study.run_arm` on augmented views alone."""
    from augplug.demo.study import run_arm

    from .quality import load_study

    set_threads(1)
    data = load_study(seed, noise_kind=noise_kind)
    if arm == "upstream":
        return run_arm(data, "upstream", seed, epochs=epochs, aug_only=True)
    return run_arm(data, "saflex", seed, epochs=epochs, aug_only=True, refiner_kwargs={"method": make_policy(arm)})


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--noise-kind", choices=("random", "pairflip"), default="random")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="weight_signals")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run, arm, seed, args.noise_kind, args.epochs) for arm, seed in jobs]
        results = [f.result() for f in futures]
    by_arm: Dict[str, List[Dict[str, float]]] = {}
    for (arm, _), res in zip(jobs, results):
        by_arm.setdefault(arm, []).append(res)
    rows = []
    for arm in args.arms:
        rs = by_arm[arm]
        aucs = [r["auc_weight"] for r in rs if "auc_weight" in r]
        rows.append([arm, fmt_mean_std([r["test_acc"] for r in rs]),
                     " / ".join(f"{100 * r['test_acc']:.2f}" for r in rs),
                     fmt_mean_std(aucs, scale=1, digits=3) if aucs else "–",
                     f"{mean_std([r['seconds'] for r in rs])[0]:.0f}"])
    pre = (f"Command: `python -m benchmarks.weight_signals {' '.join(argv)}`".strip()
           + f"\n\nFashion-MNIST, 10k training views' images, augmented views alone, {args.epochs} epochs, seeds "
             f"{args.seeds}, 30 % wrong labels ({args.noise_kind}); weight 2·sigmoid(signal), labels kept, mean 1 "
             f"over the batch; 1 thread per run. See the module docstring for the signals.")
    table = write_markdown_table(None if args.no_save else results_dir("weight_signals") / f"{args.out}.md",
                                 ["arm", "test acc % (mean ± std)", "per seed", "AUC(weight, clean)", "s/run"], rows,
                                 title="Weight signals on augmented views alone", preamble=pre)
    print(table)


if __name__ == "__main__":
    main()
