"""The refiner's own work per call, apart from any validation refresh.

    python -m benchmarks.call_cost --out call_cost

For each model (the overhead benchmark's SmallCNN and timm resnet18, batch 64, CPU) a last-layer
refiner whose validation direction is computed once and then kept (``refresh_every`` far beyond the
run), timed three ways: a plain training step (forward, cross-entropy, backward, SGD step) for scale;
the refiner's call right after a training forward, as in a real loop (median over calls); the same
call repeated in a tight loop over stored forward outputs, where the caches stay warm (median over
blocks); and that warm call after a 5 ms sleep, which tells whether the cost after a forward comes
from the forward's data or from whatever else ran in between. The number of aten operations one call dispatches is counted with ``torch.profiler``. A second
table times small kernels of the kind a call runs, each right after a training forward (its first
use since the last step) and again at once, which is why the number of different kernels a call
runs sets its cost.
Writes ``benchmarks/results/overhead/<out>.md``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from augplug import AugmentationRefiner, find_classifier

from .common import results_dir, set_threads, write_markdown_table
from .overhead import MODELS, _sgd, make_setup


def measure(name: str, calls: int) -> List[str]:
    setup = make_setup(MODELS[name], torch.device("cpu"), 64, 64, [256], 0)
    model = setup.copy_model()
    opt = _sgd(model)
    refiner = AugmentationRefiner(model, opt, setup.val_loader(256), mode="last_layer",
                                  method_options=dict(strength=1.0), schedule=dict(refresh_every=10 ** 9))
    x, y = setup.x, setup.y

    def plain_step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def call_after_forward() -> float:
        out = model(x)
        t0 = time.perf_counter()
        refiner(out, y)
        return time.perf_counter() - t0

    for _ in range(10):
        plain_step()
        call_after_forward()
    plain, after = [], []
    for _ in range(calls):  # interleaved
        t0 = time.perf_counter()
        plain_step()
        plain.append(time.perf_counter() - t0)
        after.append(call_after_forward())
    features = []  # what the classifier received in each stored forward, passed as features=
    _, head = find_classifier(model)
    hook = head.register_forward_hook(lambda module, args, out: features.append(args[0].detach().flatten(1)))
    outs = [model(x) for _ in range(20)]
    hook.remove()
    stored = list(zip(outs, features))
    rested = []
    out0, feats0 = stored[0]
    for _ in range(calls):
        time.sleep(0.005)
        t0 = time.perf_counter()
        refiner(out0, y, features=feats0)
        rested.append(time.perf_counter() - t0)
    blocks = []
    for _ in range(15):
        t0 = time.perf_counter()
        for out, feats in stored:
            refiner(out, y, features=feats)
        blocks.append((time.perf_counter() - t0) / len(stored))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for out, feats in stored:
            refiner(out, y, features=feats)
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / len(stored)
    refiner.remove_hooks()
    p, a, w = statistics.median(plain), statistics.median(after), statistics.median(blocks)
    r = statistics.median(rested)
    return [name, f"{p * 1e3:.2f}", f"{a * 1e3:.3f} ({a / p:.3f})", f"{w * 1e3:.3f}", f"{r * 1e3:.3f}", f"{ops:.0f}"]


#: small kernels of the kind a refiner call runs, on tensors of a call's sizes (batch 64, 10 classes)
KERNELS = {
    "sum (fp64)": lambda t: t["z"].sum(dtype=torch.float64),
    "isfinite (0-dim)": lambda t: torch.isfinite(t["s"]),
    "aminmax": lambda t: torch.aminmax(t["y"]),
    "one_hot": lambda t: F.one_hot(t["y"], 10),
    "arange": lambda t: torch.arange(64),
    "softmax": lambda t: torch.softmax(t["z"], -1),
    "mean": lambda t: t["z"].mean(0),
    "nan_to_num": lambda t: torch.nan_to_num(t["z"]),
    "sigmoid": lambda t: torch.sigmoid(t["z"]),
}


def first_use(calls: int) -> List[List[str]]:
    """Each kernel of :data:`KERNELS` timed in sequence right after a SmallCNN training forward (its
    first use since the last training step) and once more right after (its second use)."""
    setup = make_setup(MODELS["smallcnn"], torch.device("cpu"), 64, 64, [256], 0)
    model = setup.copy_model()
    opt = _sgd(model)
    t = {"z": torch.randn(64, 10), "s": torch.tensor(3.0, dtype=torch.float64), "y": setup.y}
    first = {k: [] for k in KERNELS}
    again = {k: [] for k in KERNELS}
    for i in range(calls + 5):
        out = model(setup.x)
        for name, kernel in KERNELS.items():
            t0 = time.perf_counter()
            kernel(t)
            t1 = time.perf_counter()
            kernel(t)
            t2 = time.perf_counter()
            if i >= 5:
                first[name].append(t1 - t0)
                again[name].append(t2 - t1)
        loss = F.cross_entropy(out, setup.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [[name, f"{statistics.median(first[name]) * 1e6:.1f}", f"{statistics.median(again[name]) * 1e6:.1f}"]
            for name in KERNELS]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"], choices=sorted(MODELS))
    ap.add_argument("--calls", type=int, default=200, help="timed calls per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="call_cost")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rows = [measure(m, args.calls) for m in args.models]
    cmd = "python -m benchmarks.call_cost" + ("" if argv is None else " " + " ".join(argv))
    text = write_markdown_table(
        None, ["model", "plain step (ms)", "refiner call after a forward (ms; share of the step)",
               "refiner call, warm tight loop (ms)", "the same call after a 5 ms sleep (ms)",
               "aten ops per call"], rows,
        title="The refiner's call, apart from refreshes",
        preamble=f"Command: `{cmd}`\n\n{args.threads} threads, CPU, batch 64, last-layer SAflex with a kept "
                 f"direction; medians over {args.calls} interleaved calls (tight loop: 15 blocks of 20 calls).")
    text += "\n" + write_markdown_table(
        None, ["kernel", "first use after a training forward (µs)", "used again at once (µs)"],
        first_use(args.calls // 5),
        title="What a kernel costs the first time after a training step",
        preamble="SmallCNN, batch 64: each kernel timed in turn right after a training forward, then once "
                 f"more; medians over {args.calls // 5} steps. A call pays the first column once for every "
                 "different kernel it runs.").replace("# What", "## What", 1)
    path = results_dir("overhead") / f"{args.out}.md"
    path.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
