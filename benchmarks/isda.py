"""ISDA benchmarks: step-time overhead against plain cross-entropy, and quality on Fashion-MNIST.

Overhead (``--overhead``): timm ``resnet18`` (random init), 64x64 inputs, batch 64, CPU, one torch
thread (``--device cuda``: on a GPU, each step synchronised; ``--amp``: fp16 autocast and a
GradScaler in both steps). A plain step (forward, ``F.cross_entropy``, backward, SGD) and an ISDA step (the same with
``ISDALoss.for_model(model)``, lambda fixed at lambda0 = 0.5 so the whole surrogate is computed) run
on two copies of one initial model, interleaved in one process: each round times one step of each
configuration, the order alternating between rounds, each step on a fresh random batch (labels
uniform over the classes). The main number is the median over rounds of the paired ratio (ISDA step
/ plain step of the same round). Each configuration runs in its own child process so that its peak
RSS (``resource.getrusage``) is its own; the RSS after the plain warm-up steps is reported too.

Quality (``--quality``): the Fashion-MNIST study of ``benchmarks/quality.py`` (10k train / 1k val /
10k test, upstream timm RandAugment views with 30 % random wrong labels, originals + augmented
views, small CNN with batch norm, SGD + cosine), arms CE, CE+ISDA, SAflex, SAflex+ISDA through
``augplug.demo.study.run_arm`` (CE = the refiner with ``method="none"``). ISDA's lambda ramps linearly
from 0 to lambda0 over the run (``total_steps``).

    python -m benchmarks.isda --overhead
    python -m benchmarks.isda --overhead --device cuda [--amp] --overhead-out isda_overhead_cuda
    python -m benchmarks.isda --quality --epochs 8 --seeds 0 1 2 --lambda0 0.5

Writes ``benchmarks/results/isda/isda_overhead.{md,png}`` and ``benchmarks/results/isda/isda_quality.{md,png}``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from .common import (amp_autocast, backward_and_step, fmt_mean_std, mean_std, results_dir, save_bar_plot, set_threads,
                     write_markdown_table)

#: name -> (classes, ISDALoss options)
OVERHEAD_CONFIGS = {
    "C=100, auto (full)": (100, {}),
    "C=100, diagonal": (100, {"covariance": "diagonal"}),
    "C=1000, auto (diagonal)": (1000, {}),
}
TARGETS = {"C=100, auto (full)": 1.10, "C=1000, auto (diagonal)": 1.15}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------- overhead
def _peak_mib(device: str) -> float:
    """Peak host RSS on the CPU; peak ``torch.cuda.max_memory_allocated`` on a GPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _maxrss_mib()


BATCHED = {"auto": None, "on": True, "off": False}


def overhead_one(name: str, rounds: int, warmup: int, batch: int, side: int, device: str = "cpu",
                 amp: bool = False, batched: str = "auto") -> Dict:
    """Time one configuration (run in a child process)."""
    import timm

    from augplug.isda import ISDALoss

    set_threads(1)
    cuda = device == "cuda"
    num_classes, options = OVERHEAD_CONFIGS[name]
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=num_classes, pretrained=False).to(device)
    model = copy.deepcopy(plain)
    plain.train()
    model.train()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_isda = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scalers = [torch.amp.GradScaler("cuda") if amp else None for _ in range(2)]
    g = torch.Generator().manual_seed(1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def batch_():
        x, y = torch.randn(batch, 3, side, side, generator=g), torch.randint(0, num_classes, (batch,), generator=g)
        return x.to(device), y.to(device)

    def plain_step():
        x, y = batch_()
        sync()
        t0 = time.perf_counter()
        with amp_autocast(amp):
            loss = F.cross_entropy(plain(x), y)
        backward_and_step(loss, opt_plain, scalers[0])
        sync()
        return time.perf_counter() - t0, 0.0

    def plain_step_on_isda_model():  # warms up the second model's gradients and momentum the same way
        x, y = batch_()
        with amp_autocast(amp):
            loss = F.cross_entropy(model(x), y)
        backward_and_step(loss, opt_isda, scalers[1])

    for _ in range(warmup):
        plain_step()
        plain_step_on_isda_model()
    sync()
    peak_plain = _peak_mib(device)
    criterion = ISDALoss.for_model(model, lambda0=0.5, batched=BATCHED[batched], **options)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None

    def isda_step():
        x, y = batch_()
        sync()
        t0 = time.perf_counter()
        with amp_autocast(amp):
            logits = model(x)
            t1 = time.perf_counter()
            if cuda:  # events time the loss on the device without a sync inside the step
                events[0].record()
            loss = criterion(logits, y)
            if cuda:
                events[1].record()
            t2 = time.perf_counter()
        backward_and_step(loss, opt_isda, scalers[1])
        sync()
        loss_ms = events[0].elapsed_time(events[1]) / 1000 if cuda else t2 - t1
        return time.perf_counter() - t0, loss_ms

    for _ in range(warmup):
        isda_step()
    tp, ti, tl = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            a, _ = plain_step()
            b, c = isda_step()
        else:
            b, c = isda_step()
            a, _ = plain_step()
        tp.append(a)
        ti.append(b)
        tl.append(c)
    ratios = np.asarray(ti) / np.asarray(tp)
    q25, q75 = np.percentile(ratios, [25, 75])
    return {
        "name": name, "classes": num_classes, "covariance": criterion.covariance,
        "features": criterion.feature_dim, "plain_ms": 1000 * float(np.median(tp)),
        "isda_ms": 1000 * float(np.median(ti)), "loss_fwd_ms": 1000 * float(np.median(tl)),
        "ratio": float(np.median(ratios)), "q25": float(q25), "q75": float(q75),
        "ratio_of_medians": float(np.median(ti) / np.median(tp)),
        "stats_mib": criterion.statistics_bytes / 2 ** 20, "rss_plain_mib": peak_plain,
        "rss_peak_mib": _peak_mib(device), "seen_classes": int((criterion.count > 0).sum()),
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "batched": criterion.covariance == "full" and criterion._batched(),
    }


def overhead(args, argv: List[str]) -> None:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    cuda = args.device == "cuda"
    results = []
    for name in args.configs:
        cmd = [sys.executable, "-m", "benchmarks.isda", "--overhead-one", name, "--rounds", str(args.rounds),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--side", str(args.side),
               "--device", args.device, "--isda-batched", args.isda_batched] + (["--amp"] if args.amp else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res), flush=True)
        results.append(res)
    rows = []
    for r in results:
        target = TARGETS.get(r["name"]) if not cuda else None  # the targets are the CPU ones
        met = "–" if target is None else (f"≤ {target:.2f}: {'met' if r['ratio'] <= target else 'not met'}")
        digits = 1 if cuda else 0
        rows.append([r["name"], r["covariance"] + (" (batched)" if r.get("batched") else ""), f"{r['plain_ms']:.{digits}f}", f"{r['isda_ms']:.{digits}f}",
                     f"{r['ratio']:.3f}", f"{r['q25']:.3f}–{r['q75']:.3f}", f"{r['ratio_of_medians']:.3f}", met,
                     f"{r['loss_fwd_ms']:.1f}", f"{r['stats_mib']:.2f}", f"{r['rss_plain_mib']:.0f}",
                     f"{r['rss_peak_mib']:.0f}"])
    where = (f"GPU: {results[0]['device_name'] if results else '?'}; AMP (fp16 autocast + GradScaler): "
             f"{'on' if args.amp else 'off'}" if cuda else
             f"CPU: {_cpu_name()}, {os.cpu_count()} logical cores visible, shared with other jobs")
    memory = ("- memory: statistics = ISDA's buffers; peak memory = `torch.cuda.max_memory_allocated` of the child "
              "process after plain warm-up steps on both models (before ISDA exists) and at the end" if cuda else
              "- memory: statistics = ISDA's buffers; RSS = peak resident set size of the child process "
              "(`resource.getrusage`) after plain warm-up steps on both models (before ISDA exists) and at the end")
    pre = "\n".join([
        f"Command: `python -m benchmarks.isda {shlex.join(argv)}`",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{where}; torch threads: 1",
        f"- load average at start (1/5/15 min): {load}",
        f"- timm resnet18 (random init, A = 512 features), {args.side}x{args.side} inputs, batch {args.batch}, "
        "SGD(lr=0.01, momentum=0.9), train mode; a fresh random batch per step, labels uniform over the classes",
        f"- protocol: {args.warmup} warm-up steps per configuration, then {args.rounds} rounds of one plain and one "
        "ISDA step (order alternating); ratio = median over rounds of ISDA step / plain step of the same round "
        "(IQR alongside), and the ratio of the two medians"
        + ("; each step ends with `torch.cuda.synchronize()`" if cuda else ""),
        "- ISDA: `ISDALoss.for_model(model, lambda0=0.5)` with progress 1 (the full surrogate every step); "
        "'loss fwd' = the ISDA call alone (statistics update + surrogate loss), inside the ISDA step"
        + (" (timed by CUDA events)" if cuda else ""),
        memory,
    ])
    mem = "peak memory" if cuda else "peak RSS"
    headers = ["configuration", "covariance", "plain ms/step", "ISDA ms/step", "ratio (paired median)", "IQR",
               "ratio of medians", "target", "ISDA loss fwd ms", "statistics MiB", f"{mem} plain MiB",
               f"{mem} end MiB"]
    table = write_markdown_table(results_dir("isda") / f"{args.overhead_out}.md", headers, rows,
                                 title="ISDA overhead: step time vs plain cross-entropy", preamble=pre)
    print(table)
    save_bar_plot(results_dir("isda") / f"{args.overhead_out}.png", [r["name"] for r in results],
                  [r["ratio"] for r in results], None, "ISDA step / plain step",
                  f"ISDA overhead, resnet18, {'CUDA' if cuda else 'CPU'}{', fp16 AMP' if args.amp else ''}", zoom=False)


# ---------------------------------------------------------------------------------------- quality
QUALITY_ARMS = {"CE": ("upstream", False), "CE+ISDA": ("upstream", True),
                "SAflex": ("saflex", False), "SAflex+ISDA": ("saflex", True),
                # diagnostics (not run by default): the views with their true labels
                "CE clean views": ("clean", False), "CE+ISDA clean views": ("clean", True)}
DEFAULT_ARMS = ["CE", "CE+ISDA", "SAflex", "SAflex+ISDA"]


def _quality_job(job):
    arm, seed, epochs, lambda0 = job
    set_threads(1)
    from augplug.models import SmallCNN
    from augplug.demo.study import run_arm

    from .quality import load_study

    data = load_study(seed)
    study_arm, with_isda = QUALITY_ARMS[arm]
    steps = epochs * math.ceil(data.x_train.shape[0] / 128)
    kw = {"isda": {"lambda0": lambda0, "total_steps": steps}} if with_isda else {}
    res = run_arm(data, study_arm, seed, epochs=epochs, batch_size=128, refiner_kwargs=kw,
                  model_fn=lambda: SmallCNN(1, 10, img_size=28, norm="batch"))
    return arm, seed, res


def quality(args, argv: List[str]) -> None:
    from .quality import load_study

    for seed in args.seeds:  # build (or load) the view banks before the workers start
        load_study(seed)
    jobs = [(arm, seed, args.epochs, lam) for seed in args.seeds for arm in args.arms
            for lam in (args.lambda0 if QUALITY_ARMS[arm][1] else [None])]
    label = (lambda arm, lam: arm if lam is None or len(args.lambda0) == 1 else f"{arm} (λ0={lam:g})")  # noqa: E731
    results: Dict[str, List[Dict]] = {label(a, lam): [] for a, _, _, lam in jobs}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as ex:
        for (arm, seed, _, lam), (_, _, res) in zip(jobs, ex.map(_quality_job, jobs)):
            results[label(arm, lam)].append(res)
            print(json.dumps({"arm": label(arm, lam), "seed": seed, **{k: round(v, 4) for k, v in res.items()}}),
                  flush=True)
    rows = []
    for arm, rs in results.items():
        rows.append([arm, fmt_mean_std([r["test_acc"] for r in rs]), " ".join(f"{100 * r['test_acc']:.2f}" for r in rs),
                     f"{mean_std([r['seconds'] for r in rs])[0]:.0f}"])
    pre = "\n".join([
        f"Command: `python -m benchmarks.isda {shlex.join(argv)}`",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {time.perf_counter() - t0:.0f} s "
        f"with {args.workers} worker process(es), one torch thread each, on a shared 2-core CPU",
        "- data: Fashion-MNIST, 10k train / 1k clean validation (stratified from the official training set) / official "
        "10k test; upstream timm RandAugment `rand-m9-mstd0.5`, 4 precomputed views per image, 30 % of the views "
        "given a random wrong label; each batch = 128 originals + one view of each (`benchmarks/quality.py` setup)",
        f"- model: `SmallCNN(1, 10, img_size=28)` (batch norm, 64 penultimate features, dropout 0.2); SGD lr 0.05, "
        f"momentum 0.9, Nesterov, weight decay 5e-4, cosine schedule; {args.epochs} epochs; seeds {args.seeds}",
        "- arms: CE = `AugmentationRefiner(method=\"none\")` (plain soft-target cross-entropy on the upstream labels; "
        "'clean views': the views keep their true labels, a diagnostic); "
        "SAflex = augplug defaults; +ISDA = the same refiner with "
        f"`isda={{\"lambda0\": {' or '.join(f'{v:g}' for v in args.lambda0)}, \"total_steps\": <epochs x steps per epoch>}}` (lambda ramps linearly "
        "from 0 to lambda0; full covariance, 10 x 64 x 64)",
        "- test accuracy in %, mean ± sample std over seeds",
    ])
    table = write_markdown_table(results_dir("isda") / f"{args.out}.md", ["arm", "test acc % (mean ± std)", "per seed",
                                                                     "s/run"], rows,
                                 title="ISDA quality: Fashion-MNIST, RandAugment + 30 % corrupted views", preamble=pre)
    print(table)
    ms = [mean_std([100 * r["test_acc"] for r in rs]) for rs in results.values()]
    save_bar_plot(results_dir("isda") / f"{args.out}.png", list(results), [m for m, _ in ms], [s for _, s in ms],
                  "test accuracy (%)", f"Fashion-MNIST, {args.epochs} epochs, lambda0 = "
                  + ", ".join(f"{v:g}" for v in args.lambda0))


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overhead", action="store_true", help="step-time overhead study")
    ap.add_argument("--quality", action="store_true", help="Fashion-MNIST quality study")
    ap.add_argument("--configs", nargs="+", default=list(OVERHEAD_CONFIGS), choices=list(OVERHEAD_CONFIGS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="overhead: device (default cpu)")
    ap.add_argument("--amp", action="store_true", help="overhead, CUDA only: fp16 autocast + GradScaler in every step")
    ap.add_argument("--overhead-out", default="isda_overhead",
                    help="overhead result file stem under benchmarks/results/isda (default isda_overhead)")
    ap.add_argument("--isda-batched", default="auto", choices=sorted(BATCHED),
                    help="overhead: ISDALoss(batched=...) for full covariances: auto (GPU: batched), on, off")
    ap.add_argument("--overhead-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(QUALITY_ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lambda0", type=float, nargs="+", default=[0.5], help="one or more lambda0 for the +ISDA arms")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="isda_quality", help="quality result file stem under benchmarks/results/isda")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.overhead_one:
        print(json.dumps(overhead_one(args.overhead_one, args.rounds, args.warmup, args.batch, args.side,
                                      args.device, args.amp, args.isda_batched)))
        return
    if not (args.overhead or args.quality):
        ap.error("pass --overhead and/or --quality")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.amp and args.device != "cuda":
        ap.error("--amp needs --device cuda")
    set_threads(1)
    if args.overhead:
        overhead(args, argv)
    if args.quality:
        quality(args, argv)


if __name__ == "__main__":
    main()
