"""What the refiner's one device sync per call costs, apart from its work.

    python -m benchmarks.sync_cost --device cuda --models resnet18 --img-size 224 --batch 128

A refiner call reads one value back to the host (its input check), so on a GPU the host waits for
the device once per training step, where a plain step never waits. This benchmark times, against a
plain step of the same model and batch, interleaved in one process (the overhead benchmark's
protocol and setup):

- ``plain + one sync``: the plain step that also reads one flag computed from its logits (a
  finiteness reduction) after the loss, as the refiner's check does: the price of the sync alone;
- ``refiner, kept direction``: a last-layer SAflex refiner whose validation direction is computed
  once and kept (``refresh_every`` beyond the run): the call's whole cost without refreshes;
- ``refiner, exact schedule``: the same refiner with the default schedule but no overhead budget
  (``budget=None``: refresh every 4 updates, a one-batch validation window), so that both refiner
  rows run the same work in every process and on every machine. Result files written before the
  default budget existed call this row ``refiner, defaults``.

Writes ``benchmarks/results/overhead/<out>.md``.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from augplug import AugmentationRefiner

from .common import backward_and_step, results_dir, set_threads, write_markdown_table
from .overhead import (MODELS, ModelSpec, _sgd, _sync_fn, device_description, interleaved_timing, make_setup,
                       make_step, median, paired_ratios, quartiles)


def _synced_step(model, opt, x, y):
    def step() -> None:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        bool(torch.isfinite(logits).all())  # the one read back to the host
        backward_and_step(loss, opt)
    return step


def measure(name: str, args, device: torch.device, rng: random.Random) -> List[List[str]]:
    spec = MODELS[name]
    if name == "resnet18" and args.img_size != 32:
        spec = ModelSpec("resnet18", (3, args.img_size, args.img_size))
    setup = make_setup(spec, device, args.batch, 64, [args.val_size], args.seed, cache_validation=True)
    items: Dict[str, callable] = {}
    m = setup.copy_model()
    items["plain"] = make_step(m, _sgd(m), F.cross_entropy, setup.x, setup.y, False)
    m = setup.copy_model()
    items["plain + one sync"] = _synced_step(m, _sgd(m), setup.x, setup.y)
    for label, schedule in (("refiner, kept direction", dict(refresh_every=10 ** 9)),
                            ("refiner, exact schedule", {})):
        m = setup.copy_model()
        opt = _sgd(m)
        r = AugmentationRefiner(m, opt, setup.val_loader(args.val_size), method="saflex", mode="last_layer",
                                seed=args.seed, method_options=dict(strength=1.0),
                                schedule=dict(cache_validation=True, budget=None, **schedule))
        items[label] = make_step(m, opt, r, setup.x, setup.y, False)
    times, errors = interleaved_timing(items, rounds=args.rounds, k=4, warmup=8, sync=_sync_fn(device), rng=rng)
    rows = []
    for label in items:
        if label in errors:
            rows.append([name, label, "—", "—", "—", errors[label]])
            continue
        ms = median(times[label]) / 4 * 1e3
        if label == "plain":
            rows.append([name, label, f"{ms:.2f}", "1.000", "—", ""])
            continue
        ratios = paired_ratios(times, label, "plain")
        lo, hi = quartiles(ratios)
        rows.append([name, label, f"{ms:.2f}", f"{median(ratios):.3f}", f"{lo:.3f}–{hi:.3f}", ""])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sync_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "smallcnn"], choices=sorted(MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--img-size", type=int, default=32, help="resnet18 input resolution (default 32)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--val-size", type=int, default=256, help="validation images (default 256)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sync_cost")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(args.seed)
    rows = []
    for name in args.models:
        rows += measure(name, args, device, rng)
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    preamble = (f"Command: `python -m benchmarks.sync_cost {argv_s}`\n\n"
                f"- torch {torch.__version__}; device: {device_description(device)}\n"
                f"- training batch {args.batch}, resnet18 at {args.img_size}×{args.img_size}, SmallCNN at 28×28; "
                f"validation {args.val_size} random images kept on the device; SGD; {args.rounds} interleaved rounds "
                "of 4 steps per configuration; ratio = paired median over rounds, with its interquartile range\n")
    out_dir = Path(results_dir("overhead") if args.results_dir is None else args.results_dir)
    text = write_markdown_table(out_dir / f"{args.out}.md",
                                ["model", "configuration", "ms/step (median)", "ratio vs plain (paired median)",
                                 "IQR", "error"], rows,
                                title="The refiner's device sync against its work", preamble=preamble)
    print(text)
    return text

if __name__ == "__main__":
    main()
