"""What a refresh of the last-layer validation direction costs as classes and validation samples grow.

    python -m benchmarks.many_classes --out many_classes

In last-layer mode the validation window keeps each validation sample's classifier features, and a
refresh rebuilds the head gradient of the whole window with the current head: two products over
the cached features, ``N_val x features x classes`` multiply-adds each. That is small beside a
training step at ten classes and is not at a thousand. For each number of classes and of validation
samples: an MLP (64 inputs, 128 features, ``C`` classes), 64 originals and 64 views a step, SGD; a
plain step (cross-entropy on the 128 rows) timed interleaved with the refiner's step in the same
run; the refiner under the exact schedule (``Schedule(budget=None)``: a refresh every 4 updates) and
under the default budget; the median time of a refresh call and the mean step. CPU, one thread.
Writes ``benchmarks/results/overhead/<out>.md``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner, Schedule

from .common import results_dir, set_threads, write_markdown_table

FEATURES_IN, WIDTH, BATCH = 64, 128, 64


def _model(classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES_IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, classes))


def measure(classes: int, n_val: int, budget, steps: int, warmup: int) -> List[str]:
    g = torch.Generator().manual_seed(0)
    val = DataLoader(TensorDataset(torch.randn(n_val, FEATURES_IN, generator=g),
                                   torch.randint(0, classes, (n_val,), generator=g)), batch_size=128)
    torch.manual_seed(0)
    model, plain_model = _model(classes), _model(classes)
    opt, plain_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, plain_model))
    refiner = AugmentationRefiner(model, opt, val, schedule=Schedule(budget=budget))
    plain, refined, refreshes = [], [], []
    for i in range(warmup + steps):
        x = torch.randn(BATCH, FEATURES_IN, generator=g)
        y = torch.randint(0, classes, (BATCH,), generator=g)
        xb, yb = torch.cat([x, x + 0.3 * torch.randn(BATCH, FEATURES_IN, generator=g)]), torch.cat([y, y])
        t0 = time.perf_counter()
        loss = F.cross_entropy(plain_model(xb), yb)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
        t1 = time.perf_counter()
        loss = refiner(model(xb), yb, num_original=BATCH)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            plain.append(t1 - t0)
            refined.append(t2 - t1)
            if refiner.stats["refreshed"]:
                refreshes.append(t2 - t1)
    step = statistics.mean(plain)
    return [str(classes), str(n_val), "exact" if budget is None else "default budget", f"{step * 1e3:.2f}",
            f"{statistics.median(refreshes) * 1e3:.1f}" if refreshes else "–", str(len(refreshes)),
            f"{statistics.mean(refined) * 1e3:.2f}", f"{statistics.mean(refined) / step:.2f}"]


def main(argv: Sequence[str] = ()) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--n-val", type=int, nargs="+", default=[1280, 5120])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--out", default="many_classes")
    args = ap.parse_args(list(argv) or None)
    set_threads(1)
    rows = [measure(c, n, budget, args.steps, args.warmup)
            for c in args.classes for n in args.n_val for budget in (None, "auto")]
    command = "python -m benchmarks.many_classes " + " ".join(argv) if argv else "python -m benchmarks.many_classes"
    return write_markdown_table(
        results_dir("overhead") / f"{args.out}.md",
        ["classes", "validation samples", "schedule", "plain step (ms)", "refresh call, median (ms)", "refreshes",
         "refiner step, mean (ms)", "refiner / plain"], rows,
        preamble=f"<!-- {command} -->\n\nCPU, one thread; {args.steps} steps after {args.warmup} of warm-up, the "
                 "plain step timed interleaved with the refiner's in the same run.")


if __name__ == "__main__":
    import sys
    print(main(sys.argv[1:]))
