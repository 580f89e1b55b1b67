"""Step-time overhead of ``AugmentationRefiner`` relative to a plain training step.

For each model, one plain configuration (``F.cross_entropy``), several SAflex configurations
(``loss = refiner(logits, y)``), each at every validation-set size of ``--val-sizes`` (and every
``--budgets`` value, passed to the refiner as ``budget=``), and a peer, the one-step look-ahead
meta-gradient of L2RW / Meta-Weight-Net (:func:`l2rw_lookahead_step`), are built from deep copies
of one initial model, each with its own SGD optimizer (and refiner), all in train mode, all fed the
same fixed training batch. Timing is interleaved in a single process so that machine noise hits
every configuration alike:

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
    python -m benchmarks.overhead --val-sizes 256 --val-batches 1 --configs full-r1 ll-r4  # a subset

The "finite differences" configurations are the full-model configurations with their scores from
``augplug.scores.finite_difference_scores`` (central difference, two no-grad forwards) instead of
the forward-mode pass; see :func:`finite_difference_patch`.

Writes ``<results-dir>/<out>.md`` and ``<results-dir>/<out>.png`` (default
``benchmarks/results/overhead/overhead.{md,png}``).
"""
from __future__ import annotations

import argparse
import contextlib
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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import augplug
import augplug.scores
from augplug import AugmentationRefiner, find_classifier
from augplug.functional import class_scores, last_layer_scores
from augplug.models import SmallCNN
from augplug.scores import finite_difference_scores

from .common import (amp_autocast, backward_and_step, parse_value, read_markdown_table, results_dir, set_threads,
                     write_markdown_table)

NUM_CLASSES = 10
PLAIN = "plain"
#: the step table's column of paired median ratios
RATIO_HEADER = "ratio vs plain (paired median)"


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
    #: short name: the plot's bar label and the ``--configs`` selector
    key: str
    mode: str
    refresh_every: int
    #: ``None``: the refiner's default (SAflex: the adaptive share); a number: a fixed share
    aug_weight: Optional[float] = None
    #: ``"fd"``: full-model scores by finite differences (:func:`finite_difference_patch`)
    scores: str = "forward"
    #: the refiner's ``bn_mode``; ``"train"`` in full mode scores the training forward itself
    #: (one more forward, differenced against the training logits)
    bn_mode: str = "eval"


#: The refined configurations, each compared with the plain step (extend here: every entry is timed
#: at every validation size and budget).
CONFIGS: Tuple[Config, ...] = (
    Config("saflex full, refresh 1", "full-r1", "full", 1),
    Config("saflex full, refresh 4", "full-r4", "full", 4),
    Config("saflex full, BatchNorm train (training-forward differences), refresh 4", "full-train-r4", "full", 4,
           bn_mode="train"),
    Config("saflex full (finite differences), refresh 1", "fd-r1", "full", 1, scores="fd"),
    Config("saflex full (finite differences), refresh 4", "fd-r4", "full", 4, scores="fd"),
    Config("saflex last_layer, refresh 1", "ll-r1", "last_layer", 1),
    Config("saflex last_layer, refresh 4", "ll-r4", "last_layer", 4),
    Config("saflex double_backward, refresh 4 (fallback)", "dbl-r4", "double_backward", 4),
)
#: Added with ``--num-original N``: the default configurations again with a fixed share of augmented
#: rows (``aug_weight=1.0``, the paper's loss), so the cost of the adaptive share can be read off.
FIXED_SHARE_CONFIGS: Tuple[Config, ...] = (
    Config("saflex full, refresh 4, fixed share", "full-r4-fixed", "full", 4, 1.0),
    Config("saflex last_layer, refresh 1, fixed share", "ll-r1-fixed", "last_layer", 1, 1.0),
)
#: The peer timed beside the refiner (once per model: it reads one validation batch per step).
PEER = "L2RW look-ahead meta-gradient (peer)"
PEER_KEY = "l2rw-lookahead"
CONFIG_LABELS: Tuple[str, ...] = (PLAIN,) + tuple(c.label for c in CONFIGS) + (PEER,)
CONFIG_KEYS: Tuple[str, ...] = tuple(c.key for c in CONFIGS + FIXED_SHARE_CONFIGS) + (PEER_KEY,)


def configs_for(num_original: int, keys: Optional[Sequence[str]] = None) -> Tuple[Config, ...]:
    """The refined configurations timed for a batch whose first ``num_original`` rows are originals
    (only those whose key is in ``keys``, when given)."""
    configs = CONFIGS + (FIXED_SHARE_CONFIGS if num_original > 0 else ())
    return tuple(c for c in configs if keys is None or c.key in keys)

#: Rows of the breakdown table, in order (keys of the timed items, then the derived row).
BREAKDOWN_ITEMS: Tuple[Tuple[str, str], ...] = (
    ("plain", "(i) forward + backward + step (plain)"),
    ("vgrad_full", "(ii) validation gradient, full (1 batch)"),
    ("scores_full", "(iii) scores pass, full (forward-mode)"),
    ("scores_fd", "(iii') scores, full (finite differences, central: 2 no-grad forwards)"),
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
    #: validation sets by size, nested (each is the first rows of the largest)
    val_sets: Dict[int, TensorDataset]
    val_batch: int
    seed: int
    cache_validation: bool = False
    refiners: List[AugmentationRefiner] = field(default_factory=list)

    def copy_model(self) -> nn.Module:
        return copy.deepcopy(self.base).train()

    def val_loader(self, val_size: Optional[int] = None) -> DataLoader:
        size = min(self.val_sets) if val_size is None else val_size
        return DataLoader(self.val_sets[size], batch_size=self.val_batch, shuffle=True)

    def refiner(self, model: nn.Module, opt: Optional[torch.optim.Optimizer], mode: str,
                refresh_every: int, aug_weight: Optional[float] = None, *, val_size: Optional[int] = None,
                val_batches="all", budget=None, fresh_batches=None, bn_mode: str = "eval") -> AugmentationRefiner:
        """The one place the benchmark builds refiners; ``budget`` / ``fresh_batches`` are passed on only
        when given."""
        extra = {k: v for k, v in (("budget", budget), ("fresh_batches", fresh_batches)) if v is not None}
        if budget == "none":   # the exact schedule, asked for by name (not passing the option gives the default)
            extra["budget"] = None
        r = AugmentationRefiner(model, opt, self.val_loader(val_size), method="saflex", mode=mode, seed=self.seed,
                                bn_mode=bn_mode,
                                method_options=dict(aug_weight=aug_weight, strength=1.0),  # refine batches without originals too
                                schedule=dict(refresh_every=refresh_every, val_batches=val_batches,
                                              cache_validation=self.cache_validation, **extra))
        self.refiners.append(r)
        return r

    def val_stream(self, device: torch.device) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Validation batches of the largest set forever (for the peer): from the DataLoader, or
        kept on the device with ``cache_validation``."""
        loader = self.val_loader(max(self.val_sets))
        if self.cache_validation:
            cached = [(vx.to(device), vy.to(device)) for vx, vy in loader]
            while True:
                yield from cached
        while True:
            for vx, vy in loader:
                yield vx.to(device, non_blocking=True), vy.to(device, non_blocking=True)

    def close(self) -> None:
        for r in self.refiners:
            r.remove_hooks()
        self.refiners.clear()


def make_setup(spec: ModelSpec, device: torch.device, batch: int, val_batch: int, val_sizes: Sequence[int],
               seed: int, cache_validation: bool = False) -> Setup:
    torch.manual_seed(seed)
    base = spec.build().to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *spec.input_shape, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    largest = max(val_sizes)
    vx = torch.randn(largest, *spec.input_shape, generator=g)
    vy = torch.randint(0, NUM_CLASSES, (largest,), generator=g)
    val_sets = {n: TensorDataset(vx[:n], vy[:n]) for n in sorted(set(val_sizes))}
    return Setup(spec, base, x, y, val_sets, val_batch, seed, cache_validation)


# ---------------------------------------------------------------------------------------------
# the peer: L2RW / Meta-Weight-Net's one-step look-ahead


def lookahead_meta_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor,
                            val_y: torch.Tensor, lr: float) -> torch.Tensor:
    """``d/d eps L_val(theta - lr * grad_theta sum_i eps_i l_i(theta))`` at ``eps = 0``, shape (B,).

    L2RW's (Ren et al., 2018) meta-gradient, as its users compute it: a virtual SGD step through
    ``torch.func.functional_call`` (the model's parameters are not touched), both passes in the
    model's current mode. The passes run on copies of the buffers, so BatchNorm's running
    statistics are left alone.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.enable_grad():
        losses = F.cross_entropy(functional_call(model, (params, buffers), (x,)), y, reduction="none")
        eps = torch.zeros_like(losses, requires_grad=True)
        grads = torch.autograd.grad((eps * losses).sum(), list(params.values()), create_graph=True,
                                    allow_unused=True)
        virtual = {n: p if gr is None else p - lr * gr for (n, p), gr in zip(params.items(), grads)}
        val_loss = F.cross_entropy(functional_call(model, (virtual, buffers), (val_x,)), val_y)
        (meta,) = torch.autograd.grad(val_loss, eps)
    return meta


def l2rw_weights_from_meta(meta: torch.Tensor) -> torch.Tensor:
    """L2RW's weights: ``max(-meta, 0)`` normalised to sum 1 (left as they are when all are 0)."""
    w = (-meta).clamp_min(0)
    total = w.sum()
    return w / torch.where(total > 0, total, torch.ones_like(total))


def l2rw_lookahead_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                        val_batches: Iterator[Tuple[torch.Tensor, torch.Tensor]], amp: bool) -> Callable[[], None]:
    """One L2RW training step per call: the look-ahead meta-gradient on the next validation batch,
    then the weighted real step ``sum_i w_i l_i`` (a fresh forward, as the reference code does)."""
    scaler = torch.amp.GradScaler("cuda") if amp else None
    lr = opt.param_groups[0]["lr"]

    def step() -> None:
        val_x, val_y = next(val_batches)
        with amp_autocast(amp):
            w = l2rw_weights_from_meta(lookahead_meta_gradient(model, x, y, val_x, val_y, lr))
            loss = (w * F.cross_entropy(model(x), y, reduction="none")).sum()
        backward_and_step(loss, opt, scaler)

    return step


# ---------------------------------------------------------------------------------------------
# finite-difference scores inside the refiner


@contextlib.contextmanager
def finite_difference_patch(calls: List[int]):
    """While active, full-model class scores (``augplug.scores.class_scores(mode="full")``, which
    the refiner looks up at each call) come from ``finite_difference_scores``; ``calls[0]`` counts
    them, ``calls[1]`` every score computed through it (others pass through unchanged). The refiner has no
    finite-difference mode with BatchNorm in eval mode: once it has one, give the "fd"
    configurations that mode instead of this patch."""
    original = augplug.scores.class_scores

    def fd_class_scores(model, inputs=None, v=None, *, mode="full", bn="eval", **kwargs):
        calls[1] += 1
        if mode != "full":  # e.g. the closed-form calls between model score passes under a budget
            return original(model, inputs, v, mode=mode, bn=bn, **kwargs)
        calls[0] += 1
        return finite_difference_scores(model, inputs, v, bn=bn)

    augplug.scores.class_scores = fd_class_scores
    try:
        yield
    finally:
        augplug.scores.class_scores = original


def with_finite_differences(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with its full-model scores by finite differences; raises when no score went through
    the patch (the refiner stopped looking the scores up where the patch puts them)."""
    calls = [0, 0]

    def fd_step() -> None:
        before = calls[1]
        with finite_difference_patch(calls):
            step()
        if calls[1] == before:
            raise RuntimeError("the refiner computed no scores through augplug.scores.class_scores; "
                               "update benchmarks.overhead.finite_difference_patch")

    return fd_step


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
    key: str = PLAIN
    item: str = PLAIN  # the name the item was timed under
    val_size: Optional[int] = None  # validation images per refresh pass (None: plain and the peer)
    budget: object = None
    ms: float = float("nan")
    ratio: float = float("nan")  # paired median
    q25: float = float("nan")
    q75: float = float("nan")
    ratio_of_medians: float = float("nan")
    state_mib: Optional[float] = None
    peak_mib: Optional[float] = None
    chosen: Optional[str] = None  # with a budget: what it chose, from the refiner's stats
    error: Optional[str] = None


def budget_choice(refiner: AugmentationRefiner) -> Optional[str]:
    """What a refiner's budget chose, from its stats after the timing: refresh interval, the model
    score passes' interval (model-scoring modes) and its own estimate of its share of a step."""
    st = refiner.stats
    if st.get("refresh_interval") is None:
        return None
    parts = [f"refresh every {st['refresh_interval']}"]
    if st.get("read_interval") not in (None, st["refresh_interval"]):
        parts.append(f"reads every {st['read_interval']}")
    if st.get("model_scores_every") is not None:
        parts.append(f"model scores every {st['model_scores_every']}")
    if st.get("overhead") is not None and not math.isnan(st["overhead"]):
        parts.append(f"estimate {st['overhead']:.2f}")
    return ", ".join(parts)


def _budget_arg(text: str):
    """``--budgets`` values: ``auto``, ``none`` (kept as the word: pass ``budget=None``) or a fraction."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return word
    value = parse_value(word)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a budget is auto, none or a number, got {text!r}")
    return value


def _item_name(cfg: Config, val_size: int, budget) -> str:
    return f"{cfg.label} | val {val_size}" + ("" if budget is None else f" | budget {budget}")


def measure_steps(setup: Setup, args, device: torch.device, rng: random.Random) -> List[StepResult]:
    items: Dict[str, Callable[[], None]] = {}
    refiners: Dict[str, AugmentationRefiner] = {}
    results: List[StepResult] = [StepResult(setup.spec.name, PLAIN)]  # in table order
    m = setup.copy_model()
    opt = _sgd(m)
    items[PLAIN] = make_step(m, opt, F.cross_entropy, setup.x, setup.y, args.amp)
    build_errors: Dict[str, str] = {}
    for val_size in args.val_sizes:
        for cfg in configs_for(args.num_original, args.configs):
            for budget in args.budgets or [None]:
                name = _item_name(cfg, val_size, budget)
                results.append(StepResult(setup.spec.name, cfg.label, cfg.key, name, val_size, budget))
                m = setup.copy_model()
                opt = _sgd(m)
                try:
                    r = setup.refiner(m, opt, cfg.mode, cfg.refresh_every, cfg.aug_weight, val_size=val_size,
                                      val_batches=args.val_batches, budget=budget,
                                      fresh_batches=args.fresh_batches, bn_mode=cfg.bn_mode)
                except Exception as e:  # reported in the table like a failure during warm-up
                    build_errors[name] = _describe_error(e)
                    continue
                refiners[name] = r
                step = make_step(m, opt, r, setup.x, setup.y, args.amp, args.num_original)
                items[name] = with_finite_differences(step) if cfg.scores == "fd" else step
    if args.configs is None or PEER_KEY in args.configs:
        results.append(StepResult(setup.spec.name, PEER, PEER_KEY, PEER))
        m = setup.copy_model()
        items[PEER] = l2rw_lookahead_step(m, _sgd(m), setup.x, setup.y, setup.val_stream(device), args.amp)

    sync = _sync_fn(device)
    times, errors = interleaved_timing(items, rounds=args.rounds, k=args.k, warmup=args.warmup, sync=sync, rng=rng)
    errors.update(build_errors)
    name = setup.spec.name
    if PLAIN not in times:
        raise RuntimeError(f"the plain step of {name} failed: {errors.get(PLAIN)}")
    plain_ms = median(times[PLAIN]) / args.k * 1e3
    for res in results:
        item = res.item
        if item in errors:
            res.error = errors[item]
            continue
        res.ms = median(times[item]) / args.k * 1e3
        ratios = paired_ratios(times, item, PLAIN)
        res.ratio = median(ratios)
        res.q25, res.q75 = quartiles(ratios)
        res.ratio_of_medians = res.ms / plain_ms
        if item in refiners:
            res.state_mib = refiner_state_mib(refiners[item])
            if res.budget is not None:
                res.chosen = budget_choice(refiners[item])
        if device.type == "cuda":
            try:
                res.peak_mib = peak_step_memory_mib(items[item], args.k, device)
            except Exception as e:  # keep the timing; say why the memory cell is empty
                print(f"[overhead] {name} / {item}: memory measurement failed: {_describe_error(e)}",
                      file=sys.stderr, flush=True)
    return results


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
    refined_step = make_step(m_ref, opt_ref, setup.refiner(m_ref, opt_ref, "full", 1, val_batches=1), x, y, amp,
                             args.num_original)

    # (ii) + (iii): full-model validation gradient and forward-mode scores
    m_full = setup.copy_model()
    r_full = setup.refiner(m_full, None, "full", 1, val_batches=1)
    with amp_autocast(amp):
        v_full = r_full.compute_validation_direction(NUM_CLASSES).direction()

    def vgrad_full() -> None:
        with amp_autocast(amp):
            r_full.compute_validation_direction(NUM_CLASSES)

    def scores_full() -> None:
        with amp_autocast(amp):
            class_scores(m_full, x, v_full, mode="full")

    def scores_fd() -> None:
        with amp_autocast(amp):
            finite_difference_scores(m_full, x, v_full)

    # (iv): last-layer validation gradient and closed-form scores on captured features
    m_ll = setup.copy_model()
    r_ll = setup.refiner(m_ll, None, "last_layer", 1, val_batches=1)
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

    items = {"plain": plain_step, "vgrad_full": vgrad_full, "scores_full": scores_full, "scores_fd": scores_fd,
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


def step_table(results: List[StepResult], cuda: bool, val_batch: int,
               budgets: bool = False) -> Tuple[List[str], List[List[str]]]:
    """The step table; ``budgets`` adds the budget column (only when ``--budgets`` was given)."""
    headers = ["model", "configuration", "validation images"] + (["budget"] if budgets else []) + [
        "ms/step (median)", RATIO_HEADER, "IQR", "ratio of medians", "refiner state (MiB)"] + (
        ["the budget's choice (end of timing)"] if budgets else [])
    if cuda:
        headers += ["peak step memory (MiB)", "vs plain (MiB)"]
    plain_peak = {r.model: r.peak_mib for r in results if r.label == PLAIN}
    rows = []
    for r in results:
        val = str(r.val_size) if r.val_size is not None else (f"{val_batch} per step" if r.label == PEER else "—")
        head = [r.model, r.label, val] + (["—" if r.budget is None else str(r.budget)] if budgets else [])
        if r.error:
            row = head + ["—", "failed", r.error, "—", "—"] + (["—"] if budgets else [])
            if cuda:
                row += ["—", "—"]
            rows.append(row)
            continue
        iqr = "—" if r.label == PLAIN else f"{_fmt(r.q25)}–{_fmt(r.q75)}"
        row = head + [_fmt(r.ms, 2), _fmt(r.ratio), iqr, _fmt(r.ratio_of_medians),
                      "—" if r.state_mib is None else _fmt(r.state_mib, 3)] + ([r.chosen or "—"] if budgets else [])
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


def save_grouped_plot(path: Path, results: List[StepResult]) -> Path:
    """Paired median ratios: one panel per model, a group of bars per configuration key, one bar per
    validation size (and budget); the peer is a single grey bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    keys = list(dict.fromkeys(r.key for r in results))
    series = list(dict.fromkeys((r.val_size, r.budget) for r in results if r.val_size is not None))
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, max(len(series), 1)))
    width = 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(len(models), 1, figsize=(max(6.0, 1.1 * len(keys) + 2) + 2.2, 3.2 * len(models)),
                             squeeze=False)
    try:
        for ax, model in zip(axes[:, 0], models):
            mine = {(r.key, r.val_size, r.budget): r.ratio for r in results if r.model == model}
            for j, (val, budget) in enumerate(series):
                xs = [i + (j - (len(series) - 1) / 2) * width for i, k in enumerate(keys) if (k, val, budget) in mine]
                ys = [mine[(k, val, budget)] for k in keys if (k, val, budget) in mine]
                label = f"{val} val images" + ("" if budget is None else f", budget {budget}")
                ax.bar(xs, ys, width, color=colors[j], edgecolor="black", linewidth=0.5, label=label)
            if (PEER_KEY, None, None) in mine:
                ax.bar([keys.index(PEER_KEY)], [mine[(PEER_KEY, None, None)]], 0.8 / 3, color="0.6",
                       edgecolor="black", linewidth=0.5, label="L2RW peer (1 val batch / step)")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(keys)
            ax.set_ylabel("step time / plain step")
            ax.set_title(f"{model}: refined step vs plain step (paired median ratio)")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not on them
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def results_from_table(text: str) -> List[StepResult]:
    """The refined rows of a written step table (model, configuration, validation size, budget and
    paired median ratio), for :func:`save_grouped_plot`."""
    headers, rows = read_markdown_table(text, lambda h: "configuration" in h and RATIO_HEADER in h, "step table")
    col = {h: i for i, h in enumerate(headers)}
    keys = {c.label: c.key for c in CONFIGS + FIXED_SHARE_CONFIGS}
    keys[PEER] = PEER_KEY
    out = []
    for row in rows:
        label = row[col["configuration"]]
        if label == PLAIN or label not in keys or not row[col[RATIO_HEADER]].replace(".", "", 1).isdigit():
            continue
        val = row[col["validation images"]] if "validation images" in col else "—"
        budget = row[col["budget"]] if "budget" in col else "—"
        out.append(StepResult(row[col["model"]], label, keys[label], label,
                              None if label == PEER or not val.isdigit() else int(val),
                              None if budget == "—" else _budget_arg(budget), ratio=float(row[col[RATIO_HEADER]])))
    return out


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
        f"training batch {args.batch}; validation: random TensorDataset of "
        f"{' / '.join(map(str, args.val_sizes))} samples (the 'validation images' column; nested sets), "
        f"DataLoader batch {args.val_batch}, shuffle=True, val_batches={args.val_batches!r}"
        f"{', cache_validation=True (batches kept on the device)' if args.cache_validation else ''}; "
        "SGD(lr=0.01, momentum=0.9); "
        "models in train mode; SAflex defaults otherwise"
        + (f"; refiner option budget= {' / '.join(map(str, args.budgets))} (the 'budget' column)"
           if args.budgets else "")
        + (f"; Schedule(fresh_batches={args.fresh_batches}) (a validation window)" if args.fresh_batches else ""),
        "- 'finite differences' rows: the full-model configuration with its scores from "
        "`augplug.scores.finite_difference_scores` (central difference, 2 no-grad forwards, BatchNorm eval) "
        "instead of the forward-mode pass",
        f"- peer: L2RW's one-step look-ahead meta-gradient (a virtual SGD step through "
        f"`torch.func.functional_call`, then d L_val / d eps_i at eps = 0 on one validation batch of "
        f"{args.val_batch} per step, BatchNorm in train mode), then the weighted real step (a fresh forward); "
        "same model, batch and optimizer",
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
        lines.append(f"- `{args.out}.png`: the paired median ratios as bars, one panel per model, grouped by "
                     "configuration, one bar per validation size (no error bars; the IQR is in the table)")
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
    p.add_argument("--val-sizes", "--val-size", nargs="+", type=int, default=[64, 256, 1024],
                   help="validation set sizes, each timed with every configuration (default: 64 256 1024)")
    p.add_argument("--val-batches", default="all",
                   help="the refiners' val_batches: 'all' (a refresh reads the whole validation set; "
                        "the default) or a number of batches")
    p.add_argument("--budgets", nargs="+", type=_budget_arg, default=None,
                   help="time every configuration once per value, passed to the refiner as budget=VALUE: a "
                        "fraction, auto, or none for the exact schedule (default: the option is not passed, so "
                        "the refiner's default applies)")
    p.add_argument("--fresh-batches", type=int, default=None,
                   help="the refiners' Schedule(fresh_batches=K): a validation window, K batches recomputed "
                        "per refresh (default: not passed, every refresh recomputes all)")
    p.add_argument("--configs", nargs="+", choices=CONFIG_KEYS, default=None,
                   help="time only these configurations (keys as in the plot; default: all); "
                        f"'{PEER_KEY}' is the L2RW peer")
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
    p.add_argument("--replot", metavar="STEM", default=None,
                   help="redraw <results-dir>/STEM.png from the table in STEM.md (times nothing)")
    return p


def _resolve(args, parser: argparse.ArgumentParser) -> None:
    quick = dict(rounds=3, k=4, warmup=1)
    full = dict(rounds=20, k=4, warmup=8)
    for key, default in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.val_batches != "all":
        try:
            args.val_batches = int(args.val_batches)
        except ValueError:
            parser.error(f"--val-batches must be 'all' or a positive integer, got {args.val_batches!r}")
        if args.val_batches < 1:
            parser.error(f"--val-batches must be 'all' or a positive integer, got {args.val_batches}")
    if min(args.val_sizes) < 1:
        parser.error("--val-sizes must be >= 1")
    args.val_sizes = list(dict.fromkeys(args.val_sizes))
    period = math.lcm(*(c.refresh_every for c in CONFIGS))
    if args.k < 1 or args.k % period:
        parser.error(f"--k must be a positive multiple of {period} (every refresh_every used), got {args.k}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for key in ("batch", "val_batch", "threads", "img_size"):
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
    if args.replot:
        out_dir = Path(args.results_dir) if args.results_dir else results_dir("overhead")
        results = results_from_table((out_dir / f"{args.replot}.md").read_text(encoding="utf-8"))
        png = save_grouped_plot(out_dir / f"{args.replot}.png", results)
        print(f"[overhead] redrew {png} from {len(results)} rows", file=sys.stderr)
        return {"plot": png, "steps": results}
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
        setup = make_setup(spec, device, args.batch, args.val_batch, args.val_sizes, args.seed, args.cache_validation)
        try:
            count = len(configs_for(args.num_original, args.configs)) * len(args.val_sizes) * len(args.budgets or [None])
            count += 1 + (args.configs is None or PEER_KEY in args.configs)
            print(f"[overhead] {name}: timing {count} configurations "
                  f"({args.rounds} rounds x {args.k} steps)", file=sys.stderr, flush=True)
            steps += measure_steps(setup, args, device, rng)
        finally:
            setup.close()
        if not args.no_breakdown:
            setup = make_setup(spec, device, args.batch, args.val_batch, args.val_sizes, args.seed, args.cache_validation)
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
    headers, rows = step_table(steps, cuda, args.val_batch, budgets=bool(args.budgets))
    text = write_markdown_table(None, headers, rows, title="Refiner overhead: step time vs a plain step",
                                preamble=preamble(args, argv, device))
    if breakdown:
        bh, brows = breakdown_table(breakdown)
        text += "\n" + write_markdown_table(
            None, bh, brows,
            preamble="## Where the time goes (full model, refresh 1, one validation batch per refresh)\n\n"
                     "Each part timed on its own with the same interleaved protocol, the refiners reading "
                     f"`val_batches=1` from the {min(args.val_sizes)}-image set; (ii) draws from the "
                     "validation stream like a refresh does, (iii) reuses one validation direction, (iv) "
                     "scores features captured from one training forward, (iii') is the finite-difference "
                     "stand-in for (iii) along the same direction. The last row is derived, not "
                     "measured: per round, the whole refined block minus the (i), (ii) and (iii) blocks "
                     "(policy, loss, refiner bookkeeping; noise can make it negative).")
    md_path = out_dir / f"{args.out}.md"
    md_path.write_text(text, encoding="utf-8")
    print(text)

    png_path = None
    plotted = [r for r in steps if r.label != PLAIN and not r.error]
    if plotted and not args.no_plot:
        png_path = save_grouped_plot(out_dir / f"{args.out}.png", plotted)
    print(f"[overhead] wrote {md_path}" + (f" and {png_path}" if png_path else ""), file=sys.stderr)
    return {"markdown": md_path, "plot": png_path, "steps": steps, "breakdown": breakdown, "args": args}


if __name__ == "__main__":
    main()
