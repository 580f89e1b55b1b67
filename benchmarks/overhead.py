"""Step-time overhead of ``AugmentationRefiner`` relative to a plain training step.

For each model, one plain configuration (``F.cross_entropy``) and several SAflex configurations
(``loss = refiner(logits, y)``) are built from deep copies of one initial model, each with its own
SGD optimizer (and refiner), all in train mode, all fed the same fixed training batch. Timing is
interleaved in a single process so that machine noise hits every configuration alike:

* warm-up: ``--warmup`` steps per configuration;
* ``--rounds`` rounds; in each round every configuration, in a freshly shuffled order, runs a block
  of ``--k`` consecutive steps timed with ``time.perf_counter`` (``torch.cuda.synchronize()`` on
  both ends on CUDA). ``--k`` must be a multiple of every ``refresh_every`` used, so each block holds
  the same number of validation refreshes and the amortisation is exact;
* ms/step is the median over rounds of block time / k; the main number is the *paired* ratio,
  the median over rounds of (configuration block / plain block of the same round), reported with
  its interquartile range. The ratio of the two medians is reported too.

A second table ("where the time goes") times, with the same protocol, the parts of the full-model,
refresh-1 step: the user's forward+backward+step, the validation gradient, the forward-mode scores
pass, and the last-layer equivalents (validation gradient and closed-form scores).

    python -m benchmarks.overhead                          # both models, defaults
    python -m benchmarks.overhead --quick --models smallcnn   # smoke run
    python -m benchmarks.overhead --num-original 32       # half originals: the adaptive share at work

Writes ``<results-dir>/<out>.md`` and ``<results-dir>/<out>.png`` (default
``benchmarks/results/overhead/overhead.{md,png}``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug import AugmentationRefiner, find_classifier
from augplug.functional import class_scores, last_layer_scores
from augplug.models import SmallCNN

from .common import amp_autocast, backward_and_step, results_dir, save_bar_plot, set_threads, write_markdown_table

NUM_CLASSES = 10
PLAIN = "plain"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: Tuple[int, ...]

    def build(self) -> nn.Module:
        if self.name == "resnet18":
            import timm

            return timm.create_model("resnet18", num_classes=NUM_CLASSES, pretrained=False)
        if self.name == "smallcnn":
            return SmallCNN(1, NUM_CLASSES, img_size=28)
        raise ValueError(f"unknown model {self.name!r}")


MODELS: Dict[str, ModelSpec] = {
    "resnet18": ModelSpec("resnet18", (3, 32, 32)),
    "smallcnn": ModelSpec("smallcnn", (1, 28, 28)),
}


@dataclass(frozen=True)
class Config:
    label: str
    mode: str
    refresh_every: int
    #: ``None``: the refiner's default (SAflex: the adaptive share); a number: a fixed share
    aug_weight: Optional[float] = None


#: The refined configurations, each compared with the plain step.
CONFIGS: Tuple[Config, ...] = (
    Config("saflex full, refresh 1", "full", 1),
    Config("saflex full, refresh 4", "full", 4),
    Config("saflex last_layer, refresh 1", "last_layer", 1),
    Config("saflex last_layer, refresh 4", "last_layer", 4),
    Config("saflex double_backward, refresh 4 (fallback)", "double_backward", 4),
)
#: Added with ``--num-original N``: the default configurations again with a fixed share of augmented
#: rows (``aug_weight=1.0``, the paper's loss), so the cost of the adaptive share can be read off.
FIXED_SHARE_CONFIGS: Tuple[Config, ...] = (
    Config("saflex full, refresh 4, fixed share", "full", 4, 1.0),
    Config("saflex last_layer, refresh 1, fixed share", "last_layer", 1, 1.0),
)
CONFIG_LABELS: Tuple[str, ...] = (PLAIN,) + tuple(c.label for c in CONFIGS)


def configs_for(num_original: int) -> Tuple[Config, ...]:
    """The refined configurations timed for a batch whose first ``num_original`` rows are originals."""
    return CONFIGS + (FIXED_SHARE_CONFIGS if num_original > 0 else ())

#: Rows of the breakdown table, in order (keys of the timed items, then the derived row).
BREAKDOWN_ITEMS: Tuple[Tuple[str, str], ...] = (
    ("plain", "(i) forward + backward + step (plain)"),
    ("vgrad_full", "(ii) validation gradient, full (1 batch)"),
    ("scores_full", "(iii) scores pass, full (forward-mode)"),
    ("vgrad_ll", "(iv) validation gradient, last_layer (1 batch)"),
    ("scores_ll", "(iv) scores, last_layer (closed form)"),
    ("refined", "whole refined step, full refresh 1"),
)
BREAKDOWN_OTHER = "rest of refined step: (whole) - (i) - (ii) - (iii)"


# ---------------------------------------------------------------------------------------------
# timing protocol


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _describe_error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:160]}"


def interleaved_timing(
    items: Dict[str, Callable[[], None]],
    *,
    rounds: int,
    k: int,
    warmup: int,
    sync: Callable[[], None],
    rng: random.Random,
) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Block times (seconds for ``k`` calls) per item and round, and the items that failed.

    Every item is warmed up with ``warmup`` calls. Then, ``rounds`` times, every item runs one block
    of ``k`` consecutive calls, in an order shuffled anew each round. Python's garbage collector is
    off during a round. An item that raises (in warm-up or later) is dropped and its error returned.
    """
    errors: Dict[str, str] = {}
    live: Dict[str, Callable[[], None]] = {}
    for name, fn in items.items():
        try:
            for _ in range(warmup):
                fn()
            sync()
        except Exception as e:  # a configuration that cannot run is reported, not fatal
            errors[name] = _describe_error(e)
        else:
            live[name] = fn
    times: Dict[str, List[float]] = {name: [] for name in live}
    order = list(live)
    gc_enabled = gc.isenabled()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            gc.collect()
            gc.disable()
            for name in list(order):
                fn = live[name]
                try:
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(k):
                        fn()
                    sync()
                except Exception as e:  # e.g. a run that diverged: drop the item, keep the others
                    errors[name] = "during timing: " + _describe_error(e)
                    order.remove(name)
                    del live[name], times[name]
                    continue
                times[name].append(time.perf_counter() - t0)
            if gc_enabled:
                gc.enable()
    finally:
        if gc_enabled:
            gc.enable()
    return times, errors


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


def quartiles(values: Sequence[float]) -> Tuple[float, float]:
    if not len(values):
        return float("nan"), float("nan")
    q25, q75 = np.percentile(np.asarray(values, dtype=np.float64), [25, 75])
    return float(q25), float(q75)


def paired_ratios(times: Dict[str, List[float]], name: str, ref: str) -> List[float]:
    """Per round: block time of ``name`` over block time of ``ref`` in the same round."""
    return [a / b for a, b in zip(times[name], times[ref])]


# ---------------------------------------------------------------------------------------------
# steps


def make_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor,
              amp: bool, num_original: int = 0) -> Callable[[], None]:
    """One training step; ``loss_fn`` is ``F.cross_entropy`` (plain) or a refiner (refined), which is
    told that the first ``num_original`` rows are originals."""
    scaler = torch.amp.GradScaler("cuda") if amp else None
    kwargs = {"num_original": num_original} if isinstance(loss_fn, AugmentationRefiner) else {}

    def step() -> None:
        with amp_autocast(amp):
            logits = model(x)
            loss = loss_fn(logits, y, **kwargs)
        backward_and_step(loss, opt, scaler)

    return step


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


@dataclass
class Setup:
    """A model's fixed data and the initial weights every configuration copies."""

    spec: ModelSpec
    base: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    val_set: TensorDataset
    val_batch: int
    seed: int
    cache_validation: bool = False
    refiners: List[AugmentationRefiner] = field(default_factory=list)

    def copy_model(self) -> nn.Module:
        return copy.deepcopy(self.base).train()

    def val_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch, shuffle=True)

    def refiner(self, model: nn.Module, opt: Optional[torch.optim.Optimizer], mode: str,
                refresh_every: int, aug_weight: Optional[float] = None) -> AugmentationRefiner:
        r = AugmentationRefiner(model, opt, self.val_loader(), method="saflex", mode=mode, seed=self.seed,
                                method_options=dict(aug_weight=aug_weight, strength=1.0),
                                schedule=dict(refresh_every=refresh_every, val_batches=1, cache_validation=self.cache_validation))  # time the refinement, also on batches without originals
        self.refiners.append(r)
        return r

    def close(self) -> None:
        for r in self.refiners:
            r.remove_hooks()
        self.refiners.clear()


def make_setup(spec: ModelSpec, device: torch.device, batch: int, val_batch: int, val_size: int,
               seed: int, cache_validation: bool = False) -> Setup:
    torch.manual_seed(seed)
    base = spec.build().to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *spec.input_shape, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    vx = torch.randn(val_size, *spec.input_shape, generator=g)
    vy = torch.randint(0, NUM_CLASSES, (val_size,), generator=g)
    return Setup(spec, base, x, y, TensorDataset(vx, vy), val_batch, seed, cache_validation)


def _tensor_mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def refiner_state_mib(refiner: AugmentationRefiner) -> float:
    """Size of the validation direction the refiner keeps between steps (read via ``state_dict``)."""
    v = refiner.state_dict().get("v")
    return _tensor_mib(v.values()) if v else 0.0


def peak_step_memory_mib(step: Callable[[], None], k: int, device: torch.device) -> float:
    """CUDA: the highest allocation during ``k`` steps above what was allocated before them."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(k):
        step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------------------------------
# the two measurements


@dataclass
class StepResult:
    model: str
    label: str
    ms: float = float("nan")
    ratio: float = float("nan")  # paired median
    q25: float = float("nan")
    q75: float = float("nan")
    ratio_of_medians: float = float("nan")
    state_mib: Optional[float] = None
    peak_mib: Optional[float] = None
    error: Optional[str] = None


def measure_steps(setup: Setup, args, device: torch.device, rng: random.Random) -> List[StepResult]:
    items: Dict[str, Callable[[], None]] = {}
    refiners: Dict[str, AugmentationRefiner] = {}
    m = setup.copy_model()
    opt = _sgd(m)
    items[PLAIN] = make_step(m, opt, F.cross_entropy, setup.x, setup.y, args.amp)
    build_errors: Dict[str, str] = {}
    configs = configs_for(args.num_original)
    for cfg in configs:
        m = setup.copy_model()
        opt = _sgd(m)
        try:
            r = setup.refiner(m, opt, cfg.mode, cfg.refresh_every, cfg.aug_weight)
        except Exception as e:  # reported in the table like a failure during warm-up
            build_errors[cfg.label] = _describe_error(e)
            continue
        refiners[cfg.label] = r
        items[cfg.label] = make_step(m, opt, r, setup.x, setup.y, args.amp, args.num_original)

    sync = _sync_fn(device)
    times, errors = interleaved_timing(items, rounds=args.rounds, k=args.k, warmup=args.warmup, sync=sync, rng=rng)
    errors.update(build_errors)
    name = setup.spec.name
    if PLAIN not in times:
        raise RuntimeError(f"the plain step of {name} failed: {errors.get(PLAIN)}")
    plain_ms = median(times[PLAIN]) / args.k * 1e3
    out = []
    for label in (PLAIN,) + tuple(c.label for c in configs):
        res = StepResult(name, label)
        if label in errors:
            res.error = errors[label]
            out.append(res)
            continue
        res.ms = median(times[label]) / args.k * 1e3
        ratios = paired_ratios(times, label, PLAIN)
        res.ratio = median(ratios)
        res.q25, res.q75 = quartiles(ratios)
        res.ratio_of_medians = res.ms / plain_ms
        if label in refiners:
            res.state_mib = refiner_state_mib(refiners[label])
        if device.type == "cuda":
            try:
                res.peak_mib = peak_step_memory_mib(items[label], args.k, device)
            except Exception as e:  # keep the timing; say why the memory cell is empty
                print(f"[overhead] {name} / {label}: memory measurement failed: {_describe_error(e)}",
                      file=sys.stderr, flush=True)
        out.append(res)
    return out


@dataclass
class BreakdownRow:
    model: str
    label: str
    ms: float
    fraction: float  # of the plain step
    error: Optional[str] = None


def measure_breakdown(setup: Setup, args, device: torch.device, rng: random.Random) -> List[BreakdownRow]:
    amp = args.amp
    x, y = setup.x, setup.y

    # (i) the user's own step, on a model without refiner hooks
    m_plain = setup.copy_model()
    plain_step = make_step(m_plain, _sgd(m_plain), F.cross_entropy, x, y, amp)

    # the whole refined step (full, refresh 1), for the remainder
    m_ref = setup.copy_model()
    opt_ref = _sgd(m_ref)
    refined_step = make_step(m_ref, opt_ref, setup.refiner(m_ref, opt_ref, "full", 1), x, y, amp,
                             args.num_original)

    # (ii) + (iii): full-model validation gradient and forward-mode scores
    m_full = setup.copy_model()
    r_full = setup.refiner(m_full, None, "full", 1)
    with amp_autocast(amp):
        v_full = r_full.compute_validation_direction(NUM_CLASSES).direction()

    def vgrad_full() -> None:
        with amp_autocast(amp):
            r_full.compute_validation_direction(NUM_CLASSES)

    def scores_full() -> None:
        with amp_autocast(amp):
            class_scores(m_full, x, v_full, mode="full")

    # (iv): last-layer validation gradient and closed-form scores on captured features
    m_ll = setup.copy_model()
    r_ll = setup.refiner(m_ll, None, "last_layer", 1)
    head_name, head = find_classifier(m_ll)
    captured: List[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, a, o: captured.append(a[0].detach()))
    try:
        with torch.no_grad(), amp_autocast(amp):
            logits_ll = m_ll(x).detach()
    finally:
        hook.remove()
    feats = captured[-1]
    with amp_autocast(amp):
        v_ll = r_ll.compute_validation_direction(NUM_CLASSES).direction()
    v_w, v_b = v_ll[f"{head_name}.weight"], v_ll.get(f"{head_name}.bias")

    def vgrad_ll() -> None:
        with amp_autocast(amp):
            r_ll.compute_validation_direction(NUM_CLASSES)

    def scores_ll() -> None:
        last_layer_scores(feats, logits_ll, v_w, v_b)

    items = {"plain": plain_step, "vgrad_full": vgrad_full, "scores_full": scores_full,
             "vgrad_ll": vgrad_ll, "scores_ll": scores_ll, "refined": refined_step}
    times, errors = interleaved_timing(items, rounds=args.rounds, k=args.k, warmup=args.warmup,
                                       sync=_sync_fn(device), rng=rng)
    name = setup.spec.name
    if "plain" not in times:
        raise RuntimeError(f"the plain step of {name} failed: {errors.get('plain')}")
    ms = {key: median(t) / args.k * 1e3 for key, t in times.items()}
    frac = {key: median(paired_ratios(times, key, "plain")) for key in times}
    rows = []
    for key, label in BREAKDOWN_ITEMS:
        if key in errors:
            rows.append(BreakdownRow(name, label, float("nan"), float("nan"), errors[key]))
        else:
            rows.append(BreakdownRow(name, label, ms[key], frac[key]))
    parts = ("refined", "plain", "vgrad_full", "scores_full")
    if all(p in times for p in parts):
        # per round, so that the remainder and its fraction come from the same blocks
        rest = [r - p - v - s for r, p, v, s in zip(*(times[k] for k in parts))]
        rest_ms = median(rest) / args.k * 1e3
        rest_frac = median([d / p for d, p in zip(rest, times["plain"])])
        rows.append(BreakdownRow(name, BREAKDOWN_OTHER, rest_ms, rest_frac))
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def step_table(results: List[StepResult], cuda: bool) -> Tuple[List[str], List[List[str]]]:
    headers = ["model", "configuration", "ms/step (median)", "ratio vs plain (paired median)", "IQR",
               "ratio of medians", "refiner state (MiB)"]
    if cuda:
        headers += ["peak step memory (MiB)", "vs plain (MiB)"]
    plain_peak = {r.model: r.peak_mib for r in results if r.label == PLAIN}
    rows = []
    for r in results:
        if r.error:
            row = [r.model, r.label, "—", "failed", r.error, "—", "—"]
            if cuda:
                row += ["—", "—"]
            rows.append(row)
            continue
        iqr = "—" if r.label == PLAIN else f"{_fmt(r.q25)}–{_fmt(r.q75)}"
        row = [r.model, r.label, _fmt(r.ms, 2), _fmt(r.ratio), iqr, _fmt(r.ratio_of_medians),
               "—" if r.state_mib is None else _fmt(r.state_mib, 3)]
        if cuda:
            base = plain_peak.get(r.model)
            extra = r.peak_mib - base if (r.peak_mib is not None and base is not None) else float("nan")
            row += [_fmt(r.peak_mib, 1), "—" if r.label == PLAIN else _fmt(extra, 1)]
        rows.append(row)
    return headers, rows


def breakdown_table(rows: List[BreakdownRow]) -> Tuple[List[str], List[List[str]]]:
    headers = ["model", "component", "ms/call (median)", "fraction of plain step (paired median)"]
    out = []
    for r in rows:
        if r.error:
            out.append([r.model, r.label, "failed", r.error])
        else:
            out.append([r.model, r.label, _fmt(r.ms, 3), _fmt(r.fraction, 3)])
    return headers, out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} logical cores visible)"


def preamble(args, argv: Sequence[str], device: torch.device) -> str:
    try:
        import timm

        timm_version = timm.__version__
    except Exception:  # pragma: no cover - timm is a dependency, but do not fail the report
        timm_version = "not installed"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Command: `{' '.join(['python -m benchmarks.overhead'] + ([shlex.join(argv)] if argv else []))}`",
        "",
        f"- date: {date}",
        f"- torch {torch.__version__}, timm {timm_version}, augplug {augplug.__version__}, "
        f"Python {platform.python_version()}",
        f"- device: {device_description(device)}; torch threads: {args.threads}; "
        f"AMP (fp16 autocast + GradScaler): {'on' if args.amp else 'off'}",
        f"- load average at start (1/5/15 min): {load}",
        f"- inputs: resnet18 3x{args.img_size}x{args.img_size}, smallcnn 1x28x28; "
        f"training batch {args.batch}; validation: random TensorDataset of {args.val_size} samples, "
        f"DataLoader batch {args.val_batch}, shuffle=True, val_batches=1"
        f"{', cache_validation=True (batches kept on the device)' if args.cache_validation else ''}; "
        "SGD(lr=0.01, momentum=0.9); "
        "models in train mode; SAflex defaults otherwise",
        (f"- the first {args.num_original} of the {args.batch} rows are originals (`num_original={args.num_original}`): "
         "the default configurations run SAflex's adaptive share of augmented rows; the 'fixed share' rows "
         "pass `aug_weight=1.0` (the paper's loss)" if args.num_original else
         "- every row is augmented (no originals), so the adaptive share has nothing to compare and stays put; "
         "see `--num-original`"),
        f"- protocol: {args.warmup} warm-up steps per configuration, then {args.rounds} rounds; per round each "
        f"configuration (shuffled order) runs a timed block of K={args.k} consecutive steps "
        "(K is a multiple of every refresh_every, so each block holds the same number of refreshes); "
        "ms/step = median over rounds of block/K; the main ratio is the median over rounds of "
        "(configuration block / plain block of the same round), with its interquartile range",
        "- refiner state = the validation direction the refiner caches between steps "
        "(from `refiner.state_dict()['v']`)",
    ]
    if device.type == "cuda":
        lines.append("- peak step memory = `torch.cuda.max_memory_allocated` during K steps minus the allocation "
                     "before them (peak statistics reset per configuration)")
    else:
        lines.append("- peak memory is not measured on CPU (RSS increments are too noisy to attribute); "
                     "only the refiner's cached state is listed")
    if not args.no_plot:
        lines.append(f"- `{args.out}.png`: the paired median ratios as bars (no error bars; the IQR is in the table)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead",
                                description="Step-time ratio of refined vs plain training steps (interleaved).")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet18", "smallcnn"],
                   help="models to measure (default: resnet18 smallcnn)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20; 3 with --quick)")
    p.add_argument("--k", type=int, default=None,
                   help="consecutive steps per timed block, a multiple of 4 (default 4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (default 8; 1 with --quick)")
    p.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--num-original", type=int, default=0,
                   help="the first N rows of the training batch are originals (num_original=N), so SAflex's "
                        "default adaptive share is exercised; adds fixed-share (aug_weight=1.0) rows "
                        "(default 0: augmented rows only)")
    p.add_argument("--val-batch", type=int, default=64, help="validation batch size (default 64)")
    p.add_argument("--val-size", type=int, default=256, help="validation set size (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true", help="CUDA only: fp16 autocast + GradScaler in every step")
    p.add_argument("--img-size", type=int, default=32,
                   help="resnet18 input resolution (default 32; e.g. 224 for a GPU-bound step)")
    p.add_argument("--cache-validation", action="store_true",
                   help="refiners keep the validation batches on the device (cache_validation=True)")
    p.add_argument("--seed", type=int, default=0, help="seed for models, data and the shuffled order")
    p.add_argument("--no-breakdown", action="store_true", help="skip the 'where the time goes' table")
    p.add_argument("--no-plot", action="store_true", help="do not write the bar chart")
    p.add_argument("--quick", action="store_true", help="smoke test: rounds=3, K=4, warm-up 1 (unless given)")
    p.add_argument("--out", default="overhead", help="file stem of the outputs (default: overhead)")
    p.add_argument("--results-dir", default=None, help="output folder (default: benchmarks/results/overhead)")
    return p


def _resolve(args, parser: argparse.ArgumentParser) -> None:
    quick = dict(rounds=3, k=4, warmup=1)
    full = dict(rounds=20, k=4, warmup=8)
    for key, default in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    period = math.lcm(*(c.refresh_every for c in CONFIGS))
    if args.k < 1 or args.k % period:
        parser.error(f"--k must be a positive multiple of {period} (every refresh_every used), got {args.k}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for key in ("batch", "val_batch", "val_size", "threads", "img_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if not 0 <= args.num_original < args.batch:
        parser.error(f"--num-original must be in 0..{args.batch - 1} (the batch needs augmented rows), "
                     f"got {args.num_original}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.amp and device.type != "cuda":
        parser.error("--amp needs a CUDA device")
    args.device = str(device)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _resolve(args, parser)
    set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    out_dir = Path(args.results_dir) if args.results_dir else results_dir("overhead")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    steps: List[StepResult] = []
    breakdown: List[BreakdownRow] = []
    for name in args.models:
        spec = MODELS[name]
        if name == "resnet18" and args.img_size != 32:
            spec = ModelSpec("resnet18", (3, args.img_size, args.img_size))
        setup = make_setup(spec, device, args.batch, args.val_batch, args.val_size, args.seed, args.cache_validation)
        try:
            print(f"[overhead] {name}: timing {1 + len(configs_for(args.num_original))} configurations "
                  f"({args.rounds} rounds x {args.k} steps)", file=sys.stderr, flush=True)
            steps += measure_steps(setup, args, device, rng)
        finally:
            setup.close()
        if not args.no_breakdown:
            setup = make_setup(spec, device, args.batch, args.val_batch, args.val_size, args.seed, args.cache_validation)
            try:
                print(f"[overhead] {name}: breakdown", file=sys.stderr, flush=True)
                breakdown += measure_breakdown(setup, args, device, rng)
            except Exception as e:  # keep the step table even when a breakdown part cannot be set up
                print(f"[overhead] {name}: breakdown failed: {_describe_error(e)}", file=sys.stderr, flush=True)
                breakdown.append(BreakdownRow(name, "breakdown", float("nan"), float("nan"), _describe_error(e)))
            finally:
                setup.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    cuda = device.type == "cuda"
    headers, rows = step_table(steps, cuda)
    text = write_markdown_table(None, headers, rows, title="Refiner overhead: step time vs a plain step",
                                preamble=preamble(args, argv, device))
    if breakdown:
        bh, brows = breakdown_table(breakdown)
        text += "\n" + write_markdown_table(
            None, bh, brows,
            preamble="## Where the time goes (full model, refresh 1)\n\n"
                     "Each part timed on its own with the same interleaved protocol; (ii) draws from the "
                     "validation stream like a refresh does, (iii) reuses one validation direction, (iv) "
                     "scores features captured from one training forward. The last row is derived, not "
                     "measured: per round, the whole refined block minus the (i), (ii) and (iii) blocks "
                     "(policy, loss, refiner bookkeeping; noise can make it negative).")
    md_path = out_dir / f"{args.out}.md"
    md_path.write_text(text, encoding="utf-8")
    print(text)

    png_path = None
    plotted = [r for r in steps if r.label != PLAIN and not r.error]
    if plotted and not args.no_plot:
        short = {c.label: f"{c.mode.replace('double_backward', 'dbl-bwd')} r{c.refresh_every}"
                          + (" fixed" if c.aug_weight is not None else "")
                 for c in configs_for(args.num_original)}
        png_path = save_bar_plot(
            out_dir / f"{args.out}.png",
            [f"{r.model}\n{short[r.label]}" for r in plotted],
            [r.ratio for r in plotted], None,
            ylabel="step time / plain step", title="Refined step vs plain step (paired median ratio)",
            zoom=False)
    print(f"[overhead] wrote {md_path}" + (f" and {png_path}" if png_path else ""), file=sys.stderr)
    return {"markdown": md_path, "plot": png_path, "steps": steps, "breakdown": breakdown, "args": args}


if __name__ == "__main__":
    main()
