"""The digits demo under an overhead budget against the exact schedule, paired by seed.

    python -m benchmarks.demo_budget --seeds 0 1 2 --out demo_budget
    python -m benchmarks.demo_budget --seeds 3 4 5 6 7 8 9 --threads 2 --out demo_budget_seeds3to9

Runs the demo's refined arms (``upstream+SAflex``, ``upstream+L2RW``; the same study, data and
seeds as ``python -m augplug demo``) twice per seed: with ``budget=None`` (the exact schedule, which
the demo's committed tables use) and with ``budget=0.1`` (``--budget``; what the default
``budget="auto"`` is for SAflex, the default method; for L2RW ``"auto"`` is the exact schedule,
because of this table). Writes ``benchmarks/results/demo/<out>.md``: each arm's accuracy under both
schedules, the paired difference budget − exact (mean ± sample standard deviation over the seeds,
and better / equal / worse), the weights' AUC against clean views under both, and what the budget
chose at the end of each run. The budget's runs follow measured time, so they are not
bit-reproducible; the exact schedule's are.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Dict, List, Optional, Sequence

import torch

from augplug.demo.cli import ARMS
from augplug.demo.digits import load_digits_study
from augplug.demo.study import run_arm
from augplug.models import SmallCNN

from .common import results_dir, write_markdown_table

REFINED = ("upstream+SAflex", "upstream+L2RW")
SCHEDULES = ("exact", "budget")


def run(seeds: Sequence[int], epochs: int, budget: float = 0.1) -> Dict[str, Dict[str, List[dict]]]:
    """``{arm: {schedule: [metrics per seed]}}``, the demo's settings (batch 64, lr 0.05, 300
    validation images per batch, the demo's SmallCNN)."""
    out: Dict[str, Dict[str, List[dict]]] = {arm: {s: [] for s in SCHEDULES} for arm in REFINED}
    for seed in seeds:
        data = load_digits_study(seed, noise=0.3, noise_kind="pairflip")
        for arm in REFINED:
            for name, value in zip(SCHEDULES, (None, budget)):
                res = run_arm(data, ARMS[arm], seed, epochs=epochs, batch_size=64, lr=0.05, val_batch_size=300,
                              model_fn=lambda: SmallCNN(1, 10, img_size=8, width=16, hidden=64),
                              refiner_kwargs={"budget": value})
                out[arm][name].append(res)
                print(f"{arm} seed {seed} {name}: {100 * res['test_acc']:.2f}", flush=True)
    return out


def _ms(values: List[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def _span(values: List[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}–{format(hi, fmt)}"


def _choices(chosen: List[dict]) -> str:
    """The budget's intervals and its estimate of its share over the runs, as ranges."""
    return (f"reads every {_span([c['read_interval'] for c in chosen], 'd')}, refreshes every "
            f"{_span([c['refresh_interval'] for c in chosen], 'd')} updates; estimate "
            f"{_span([c['overhead'] for c in chosen], '.2f')}")


def rows(results: Dict[str, Dict[str, List[dict]]]) -> List[List[str]]:
    table = []
    for arm, by in results.items():
        exact = [100 * r["test_acc"] for r in by["exact"]]
        spaced = [100 * r["test_acc"] for r in by["budget"]]
        diff = [b - a for a, b in zip(exact, spaced)]
        tally = (sum(d > 1e-9 for d in diff), sum(abs(d) <= 1e-9 for d in diff), sum(d < -1e-9 for d in diff))
        auc = " / ".join(f"{statistics.mean(r['auc_weight'] for r in by[s]):.3f}" for s in SCHEDULES)
        table.append([arm, _ms(exact), _ms(spaced), f"{_ms(diff)} ({tally[0]} / {tally[1]} / {tally[2]})", auc,
                      _choices([r["budget_choice"] for r in by["budget"]])])
    return table


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's default: 1)")
    ap.add_argument("--budget", type=float, default=0.1, help="the budget compared with the exact schedule")
    ap.add_argument("--out", default="demo_budget")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.seeds, args.epochs, args.budget)
    cmd = " ".join(["python -m benchmarks.demo_budget", *(sys.argv[1:] if argv is None else argv)])
    text = write_markdown_table(
        None, ["arm", "exact schedule (budget=None)", f"budget={args.budget}",
               "budget − exact, paired (better / equal / worse)", "AUC(weight, clean view) exact / budget",
               "the budget's choice at the end of each run"], rows(results),
        title=f"The digits demo: budget={args.budget} against the exact schedule",
        preamble=f"Command: `{cmd}`\n\nThe demo's study (digits, SmallCNN, RandAugment with 30 % of views "
                 f"labelled as the next class, originals + views), {args.epochs} epochs, seeds {args.seeds}, "
                 f"{args.threads} torch thread(s); test accuracy % (mean ± sample std over the seeds). "
                 "The default, budget='auto', is budget=0.1 for SAflex and the exact schedule for L2RW.")
    path = results_dir("demo") / f"{args.out}.md"
    path.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
