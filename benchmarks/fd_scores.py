"""Accuracy (and an indicative CPU cost) of finite-difference class scores against forward-mode ones.

For SmallCNN (28x28) and timm resnet18 (32x32), at random initialisation and after a few SGD steps
on a synthetic class-structured data set, the scores ``g`` of one batch along one validation
direction ``v`` are computed by ``full_scores`` (the forward-mode oracle, fp32; its own distance to
the same pass in fp64 is reported too) and by ``finite_difference_scores`` over a grid of relative
parameter steps ``||eps v|| / ||theta||``, both as a central difference and as a one-sided one
(its base ``log p(x; theta)`` recomputed by a no-grad forward in the same BatchNorm mode).

Reported per variant, averaged over seeds: the relative error ``||g_fd - g||_F / ||g||_F``; for
the agreement ``a = y^T g`` with the batch's labels ``y`` (what SAflex's weights and L2RW's
weights read), Spearman's and Kendall's rank correlations between ``a_fd`` and ``a`` and the
fraction of rows whose sign of ``a`` flips. A second table times the parts on the CPU
(median of interleaved repetitions; indicative only).

    python -m benchmarks.fd_scores                      # both models, 3 seeds
    python -m benchmarks.fd_scores --quick --models smallcnn
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from scipy import stats
from torch.func import functional_call

from augplug.heads import ForwardReplay
from augplug.models import SmallCNN
from augplug.scores import (FD_RELATIVE_STEP, finite_difference_scores, full_scores, scoring_mode,
                            validation_gradient)

from .common import results_dir, set_threads, write_markdown_table

NUM_CLASSES = 10
SHAPES = {"smallcnn": (1, 28, 28), "resnet18": (3, 32, 32)}
DEFAULT_STEPS = (1e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2)


def build(name: str, dropout: float = 0.2, resnet_dropout: float = 0.0) -> torch.nn.Module:
    if name == "smallcnn":
        return SmallCNN(1, NUM_CLASSES, img_size=28, dropout=dropout)
    import timm

    return timm.create_model("resnet18", num_classes=NUM_CLASSES, pretrained=False, drop_rate=resnet_dropout)


def training_forward_oracle(model: torch.nn.Module, x: torch.Tensor, v: Dict[str, torch.Tensor],
                            replay: ForwardReplay) -> torch.Tensor:
    """Exact ``J v`` of the training forward's log-probabilities, by forward-mode AD through
    ``functional_call`` with every module in its current mode, the random generators reset to the
    forward's start (so dropout draws the same masks) and copies of the buffers."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad(), fwAD.dual_level(), replay.rng():
        duals = {n: fwAD.make_dual(p, v[n] if n in v else torch.zeros_like(p)) for n, p in params.items()}
        out = F.log_softmax(functional_call(model, {**buffers, **duals}, (x,)).float(), -1)
        return fwAD.unpack_dual(out).tangent


def replay_rows(args) -> List[List[str]]:
    """The refiner's ``mode="full", bn_mode="train"`` scores: the training forward (dropout 0.2 in
    both models) rerun at ``theta + eps v`` with its masks replayed, differenced against its own
    logits, against the exact forward-mode scores of the same forward; and the same difference
    without the replay (fresh masks)."""
    rows = []
    for name in args.models:
        for sgd_steps in args.sgd_steps:
            per: Dict[str, List[Dict[str, float]]] = {}
            for seed in args.seeds:
                model, x, y, v = prepared(name, seed, sgd_steps, args.batch, 0.2, resnet_dropout=0.2)
                replay = ForwardReplay.before(x)
                with torch.enable_grad():
                    base = F.log_softmax(model.train()(x).float(), -1).detach()
                oracle = training_forward_oracle(model, x, v, replay)
                fresh = ForwardReplay(torch.get_rng_state(), None, False)
                for scheme, rp in (("one-sided, training forward replayed", replay),
                                   ("one-sided, training forward, masks not replayed", fresh)):
                    g_fd = finite_difference_scores(model, x, v, base_log_probs=base, replay=rp)
                    per.setdefault(scheme, []).append(agreement_metrics(g_fd, oracle, y))
            state = "random init" if sgd_steps == 0 else f"after {sgd_steps} SGD steps"
            for scheme, ms in per.items():
                rows.append([name, state, scheme, f"default ({FD_RELATIVE_STEP:g})"] + metric_cells(ms))
            print(f"[fd_scores] replay, {name}, {state}: done", file=sys.stderr, flush=True)
    return rows


def synthetic(shape, n: int, gen: torch.Generator, templates: torch.Tensor):
    """``n`` samples: a class template plus noise (learnable, so SGD steps change the model)."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = templates[y] + torch.randn(n, *shape, generator=gen)
    return x, y


def prepared(name: str, seed: int, sgd_steps: int, batch: int, dropout: float = 0.2, resnet_dropout: float = 0.0):
    """A model after ``sgd_steps`` SGD steps, a scored batch with labels, and a validation direction."""
    shape = SHAPES[name]
    torch.manual_seed(seed)
    model = build(name, dropout, resnet_dropout).train()
    gen = torch.Generator().manual_seed(seed + 1000)
    templates = torch.randn(NUM_CLASSES, *shape, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(sgd_steps):
        xb, yb = synthetic(shape, batch, gen, templates)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = synthetic(shape, batch, gen, templates)
    xv, yv = synthetic(shape, batch, gen, templates)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    v = validation_gradient(model, xv, F.one_hot(yv, NUM_CLASSES).float(), params=params, bn="eval").direction()
    return model, x, F.one_hot(y, NUM_CLASSES).float(), v


def base_log_probs(model, x, bn: str) -> torch.Tensor:
    with torch.no_grad(), scoring_mode(model, bn):
        return F.log_softmax(model(x).float(), -1)


def agreement_metrics(g_fd: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    a, a_fd = (y * g).sum(1).double().numpy(), (y * g_fd).sum(1).double().numpy()
    return {
        "rel_err": float((g_fd.double() - g.double()).norm() / g.double().norm()),
        "spearman": float(stats.spearmanr(a_fd, a).statistic),
        "kendall": float(stats.kendalltau(a_fd, a).statistic),
        "flips": float(np.mean(np.sign(a_fd) != np.sign(a))),
    }


def metric_cells(ms: List[Dict[str, float]]) -> List[str]:
    """The table cells of :func:`agreement_metrics` over seeds: mean (worst seed)."""
    mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
    worst = {"rel_err": max(m["rel_err"] for m in ms), "spearman": min(m["spearman"] for m in ms),
             "kendall": min(m["kendall"] for m in ms), "flips": max(m["flips"] for m in ms)}
    return [f"{mean['rel_err']:.2e} ({worst['rel_err']:.2e})", f"{mean['spearman']:.4f} ({worst['spearman']:.4f})",
            f"{mean['kendall']:.4f} ({worst['kendall']:.4f})", f"{mean['flips']:.3f} ({worst['flips']:.3f})"]


def accuracy_rows(args) -> List[List[str]]:
    rows = []
    for name in args.models:
        for sgd_steps in args.sgd_steps:
            per: Dict[tuple, List[Dict[str, float]]] = {}
            oracle_err = []
            for seed in args.seeds:
                model, x, y, v = prepared(name, seed, sgd_steps, args.batch, 0.0 if args.bn == "train" else 0.2)
                g = full_scores(model, x, v, bn=args.bn)
                model64 = copy.deepcopy(model).double()
                g64 = full_scores(model64, x.double(), {k: t.double() for k, t in v.items()}, bn=args.bn)
                oracle_err.append(float((g.double() - g64.double()).norm() / g64.double().norm()))
                schemes = {"central": None, "one-sided": base_log_probs(model, x, args.bn)}
                if args.bn == "train":  # the training forward itself (grad enabled, train mode) as the base
                    with torch.enable_grad():
                        schemes["one-sided, base: training forward"] = F.log_softmax(
                            copy.deepcopy(model).train()(x).float(), -1).detach()
                theta = torch.sqrt(sum((p.detach().double() ** 2).sum() for n, p in model.named_parameters() if n in v))
                v_norm = torch.sqrt(sum((t.double() ** 2).sum() for t in v.values()))
                for step in [None] + list(args.steps):  # None: the function's default
                    eps = None if step is None else float(step * theta / v_norm)
                    for scheme, base in schemes.items():
                        g_fd = finite_difference_scores(model, x, v, bn=args.bn, eps=eps, base_log_probs=base)
                        per.setdefault((scheme, step), []).append(agreement_metrics(g_fd, g, y))
            state = "random init" if sgd_steps == 0 else f"after {sgd_steps} SGD steps"
            rows.append([name, state, "forward-mode fp32 vs fp64", "—", f"{np.mean(oracle_err):.1e}", "—", "—", "—"])
            for (scheme, step), ms in per.items():
                step_cell = f"default ({FD_RELATIVE_STEP:g})" if step is None else f"{step:g}"
                rows.append([name, state, scheme, step_cell] + metric_cells(ms))
            print(f"[fd_scores] {name}, {state}: done", file=sys.stderr, flush=True)
    return rows


def timing_rows(args) -> List[List[str]]:
    """Median ms of each part over interleaved repetitions (CPU, indicative)."""
    rows = []
    for name in args.models:
        model, x, y, v = prepared(name, args.seeds[0], 0, args.batch)
        trained = copy.deepcopy(model).train()
        opt = torch.optim.SGD(trained.parameters(), lr=0.0)  # lr 0: every repetition sees the same model
        labels = y.argmax(1)
        base = base_log_probs(model, x, args.bn)

        def train_step():
            loss = F.cross_entropy(trained(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        fused = copy.deepcopy(model).train()
        fused_opt = torch.optim.SGD(fused.parameters(), lr=0.0)
        fused_params = dict(fused.named_parameters())

        def fused_step():
            """The training step with v's tangent carried through its own forward: g comes out
            exact, but with the training forward's BatchNorm batch statistics and dropout."""
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(p, v[n]) for n, p in fused_params.items()}
                primal, _ = fwAD.unpack_dual(F.log_softmax(functional_call(fused, duals, (x,)).float(), -1))
                loss = F.nll_loss(primal, labels)
                fused_opt.zero_grad()
                loss.backward()
                fused_opt.step()

        parts = {
            "training step (forward + backward + SGD step)": train_step,
            "training step with the tangent fused into its forward (g in train mode)": fused_step,
            f"no-grad forward, BatchNorm {args.bn}": lambda: base_log_probs(model, x, args.bn),
            "full_scores (forward-mode)": lambda: full_scores(model, x, v, bn=args.bn),
            "finite_difference_scores, central (2 forwards)": lambda: finite_difference_scores(model, x, v, bn=args.bn),
            "finite_difference_scores, one-sided, base given (1 forward)":
                lambda: finite_difference_scores(model, x, v, bn=args.bn, base_log_probs=base),
        }
        times: Dict[str, List[float]] = {k: [] for k in parts}
        for fn in parts.values():
            fn()
        order = np.random.default_rng(0)
        for _ in range(args.reps):
            for key in order.permutation(list(parts)):
                t0 = time.perf_counter()
                parts[key]()
                times[key].append(time.perf_counter() - t0)
        plain = np.median(times["training step (forward + backward + SGD step)"])
        for key, t in times.items():
            rows.append([name, key, f"{np.median(t) * 1e3:.1f}", f"{np.median(t) / plain:.2f}"])
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fd_scores",
                                description="Finite-difference class scores against forward-mode ones.")
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["smallcnn", "resnet18"])
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (0 with --quick)")
    p.add_argument("--sgd-steps", nargs="+", type=int, default=[0, 20],
                   help="SGD steps before measuring (default: 0 20)")
    p.add_argument("--steps", nargs="+", type=float, default=None,
                   help=f"relative parameter steps ||eps v|| / ||theta|| (default {' '.join(map(str, DEFAULT_STEPS))})")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bn", choices=["eval", "train"], default="eval")
    p.add_argument("--reps", type=int, default=None, help="timing repetitions (default 10; 2 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-timing", action="store_true", help="skip the CPU timing table")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table (timing only)")
    p.add_argument("--replay", action="store_true",
                   help="add the table of the replayed training forward (mode='full', bn_mode='train') "
                        "against the exact scores of that forward, dropout 0.2 in both models")
    p.add_argument("--quick", action="store_true", help="one seed, steps 1e-5 and 1e-3, no SGD steps")
    p.add_argument("--out", default="fd_scores")
    p.add_argument("--results-dir", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.steps is None:
        args.steps = [1e-5, 1e-3] if args.quick else list(DEFAULT_STEPS)
    if args.quick and "--sgd-steps" not in argv:
        args.sgd_steps = [0]
    if args.reps is None:
        args.reps = 2 if args.quick else 10
    set_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    out_dir = Path(args.results_dir) if args.results_dir else results_dir("overhead")
    cmd = " ".join(["python -m benchmarks.fd_scores"] + ([shlex.join(argv)] if argv else []))
    pre = (f"Command: `{cmd}`\n\ntorch {torch.__version__}; batch {args.batch}; BatchNorm {args.bn}; "
           f"seeds {args.seeds}; oracle `full_scores` (fp32); a = y^T g with the batch's labels; "
           "each cell: mean over seeds (worst seed)."
           + (" BatchNorm train: SmallCNN without dropout, so that the training forward can be the base."
              if args.bn == "train" else ""))
    text = f"# Finite-difference class scores vs forward mode\n\n{pre}\n"
    if args.replay:
        text += "\n" + write_markdown_table(
            None, ["model", "state", "scores", "step ||eps v||/||theta||", "rel. error", "Spearman (a)",
                   "Kendall (a)", "sign flips of a"], replay_rows(args),
            preamble="## The training forward replayed (`mode=\"full\", bn_mode=\"train\"`)\n\nOracle: forward-mode "
                     "AD through the same training forward (BatchNorm batch statistics, dropout 0.2 with the "
                     "same masks); the difference's base is that forward's own log-probabilities.")
    if not args.no_accuracy:
        text += "\n" + write_markdown_table(
            None, ["model", "state", "scores", "step ||eps v||/||theta||", "rel. error", "Spearman (a)",
                   "Kendall (a)", "sign flips of a"], accuracy_rows(args))
    if not args.no_timing:
        text += "\n" + write_markdown_table(
            None, ["model", "part", "ms (median)", "vs training step"], timing_rows(args),
            preamble=f"## Cost on the CPU ({args.threads} threads, {args.reps} interleaved repetitions; "
                     "indicative only, measured on a shared machine)")
    path = out_dir / f"{args.out}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(text)
    return path


if __name__ == "__main__":
    main()
