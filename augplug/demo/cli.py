"""``python -m augplug demo``: refinement against a harmful upstream augmentation, on bundled data.

Data: scikit-learn's digits (1,797 images, 8x8), split into train / clean validation / test with a
seeded stratified split. Upstream augmentation: strong timm RandAugment (``rand-m15-n3-mstd0.5``,
4 precomputed views per image) that, for a share of the views, breaks the label: the view is labelled
as the next class (as an augmentation that systematically turns one class into another would).
Arms: ``none`` (the originals, no augmentation), ``upstream`` (originals + augmented views as
given), ``upstream+SAflex`` and ``upstream+L2RW`` (refined with augplug's defaults), over a few
seeds; ``--aug-only`` trains on the augmented views alone. The refined arms use the exact schedule
(``budget=None``), so that a seed reproduces the table bit for bit; ``--budget auto`` runs them under
the library's default overhead budget instead (not bit-reproducible: its schedule follows measured
time).
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
from typing import Dict, List, Optional, Union

import torch

from .._extras import pyplot, require
from ..schedule import budget_from_text
from ..models import SmallCNN
from .digits import load_digits_study
from .report import format_table, plot
from .study import StudyData, run_arm

__all__ = ["ARMS", "run_demo", "main"]

ARMS = {"none": "none", "upstream": "upstream", "upstream+SAflex": "saflex", "upstream+L2RW": "l2rw"}


def run_demo(seeds: List[int], epochs: int = 30, noise: float = 0.3, out: Optional[str] = "augplug_demo_out",
             progress: bool = True, noise_kind: str = "pairflip", aug_only: bool = False,
             budget: Union[None, float, str] = None) -> Dict[str, List[Dict[str, float]]]:
    """Run every arm for every seed; return ``{arm: [metrics per seed]}`` and write the report to ``out``.
    ``budget``: the refined arms' ``Schedule(budget=...)`` (default None: the exact schedule)."""
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
                      aug_only=aug_only, model_fn=lambda: SmallCNN(1, 10, img_size=8, width=16, hidden=64),
                      refiner_kwargs={"budget": budget})
        results[arm].append(res)
    table = format_table(results, seeds, epochs, noise, noise_kind, aug_only, budget)
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        path = plot(results, os.path.join(out, "demo.png"), seeds, epochs)
        print(f"\nwrote {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.json')} and {path}")
    return results


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
    ap.add_argument("--budget", default="none",
                    help="the refined arms' overhead budget: 'none' (default: the exact schedule, bit-reproducible), "
                         "'auto' (the library's default) or a fraction of a training step")
    args = ap.parse_args(argv)
    if args.threads < 0:
        ap.error("--threads must be >= 0")
    if args.epochs < 1:
        ap.error(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 <= args.noise <= 1:
        ap.error(f"--noise is the share of views given a wrong label, in [0, 1]; got {args.noise}")
    if min(args.seeds) < 0 or max(args.seeds) > 2 ** 32 - 1:
        ap.error(f"--seeds must be integers in [0, 2**32 - 1] (numpy's seed range), got {args.seeds}")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed ({args.seeds}); each seed is one independent run")
    try:
        budget = budget_from_text(args.budget)
    except ValueError as e:   # ConfigurationError is a ValueError
        ap.error(str(e))
    if args.out:   # the results are written after every run has trained: check the folder first
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            ap.error(f"--out {args.out!r}: cannot create that folder ({e.strerror or e})")
        if not os.access(args.out, os.W_OK):
            ap.error(f"--out {args.out!r}: the folder is not writable")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(args.seeds, epochs=args.epochs, noise=args.noise, out=args.out or None, noise_kind=args.noise_kind,
             aug_only=args.aug_only, progress=not args.no_progress, budget=budget)
