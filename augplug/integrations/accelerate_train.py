"""Train with augplug under HuggingFace Accelerate, on one or N processes.

    accelerate launch -m augplug.integrations.accelerate_train --epochs 5                     # 1 process
    accelerate launch --multi_gpu --num_processes 2 -m augplug.integrations.accelerate_train  # 2 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        -m augplug.integrations.accelerate_train                                             # 2 CPU processes
    augplug-accelerate-train --cpu --epochs 2                                                 # no launcher

(In a checkout, ``integrations/accelerate_train.py`` in place of ``-m augplug.integrations.accelerate_train``.)
Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's plain launcher
ignores ``--num_processes`` there); for several CPU processes use ``ACCELERATE_USE_CPU=true`` with
``--multi_gpu`` as above. The script prints the world size at start and warns on stderr when it
differs from what was asked for (see :func:`world_size_warning`).

Data: scikit-learn's bundled digits with a label-breaking RandAugment view bank (the package demo's
setting); every batch holds originals followed by one augmented view of each (with
``--refiner autodo``: the originals through AutoDO's learned augmentation). What the script shows:

- the refiner built with ``accelerator=``: extra forwards under ``accelerator.autocast()``, the
  refiner's state saved and restored by ``accelerator.save_state`` / ``load_state``;
- the validation loader is a plain ``DataLoader`` (not prepared): the refiner splits its batches
  across processes and all-reduces gradient sums with true counts;
- ``--grad-accum k``: the refiner counts only real optimizer updates (refresh interval, warm-up);
- ``--mixed-precision bf16`` (CPU or GPU) or ``fp16`` (GPU, with a gradient scaler: a skipped step
  does not advance the refiner);
- evaluation with ``accelerator.gather_for_metrics``.

Writes ``results.json`` (and a checkpoint with ``--save-state``) to ``--output`` on the main process.
Needs scikit-learn for the digits: ``pip install "augplug[demo]"``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Mapping, Optional

import torch
from tqdm import tqdm

from augplug import AugmentationRefiner
from augplug.demo import load_digits_study
from augplug.models import SmallCNN
from augplug.errors import ConfigurationError
from augplug.schedule import budget_from_text
from augplug.share import AdaptiveShare

#: Variables ``accelerate launch`` sets in every process it starts (any of them marks a launched run).
_LAUNCH_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")
_MULTI_CPU_HINT = "for N CPU processes run `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...`"


def world_size_warning(env: Mapping[str, str], num_processes: int) -> Optional[str]:
    """A warning when the processes asked for and the real world size ``num_processes`` disagree, else None.

    What was asked for, from the launch environment ``env`` (read it before building the
    ``Accelerator``, which may set ``WORLD_SIZE`` itself): ``ACCELERATE_NUM_PROCESSES`` when set
    (a user's statement of the count they expect), else ``WORLD_SIZE`` (set by torchrun and by
    ``accelerate launch --multi_gpu``). ``accelerate launch --cpu --num_processes N`` (N > 1) passes
    neither: its plain launcher starts one process and sets only ``MASTER_ADDR`` / ``MASTER_PORT``
    (which it sets only when asked for more than one process), so an accelerate-launched process with
    ``MASTER_PORT`` but no ``WORLD_SIZE`` or ``RANK`` was asked for several processes and runs alone.
    """
    for key in ("ACCELERATE_NUM_PROCESSES", "WORLD_SIZE"):
        raw = env.get(key, "").strip()
        if raw:
            try:
                requested = int(raw)
            except ValueError:
                return f"warning: {key}={raw!r} is not a number of processes; this run has {num_processes}"
            if requested != num_processes:
                return (f"warning: {key}={requested} asks for {requested} processes, but the run has {num_processes} "
                        f"(accelerator.num_processes); {_MULTI_CPU_HINT} (`accelerate launch --cpu --num_processes N` "
                        f"starts one process)")
            return None
    launched = any(k in env for k in _LAUNCH_MARKERS)
    if launched and env.get("MASTER_PORT") and "RANK" not in env and num_processes == 1:
        return ("warning: `accelerate launch` was asked for more than one process (--num_processes > 1), but this "
                "run has 1 process: accelerate's plain launcher (used with --cpu, or without --multi_gpu) starts a "
                f"single process. {_MULTI_CPU_HINT[0].upper() + _MULTI_CPU_HINT[1:]}")
    return None


class OriginalAndView(torch.utils.data.Dataset):
    """Item ``i``: (original image, one augmented view, label, the view's given label, i).

    The view shown for an item changes with the epoch (``set_epoch``), deterministically, so every
    process agrees on the data without sharing a random state.
    """

    def __init__(self, data):
        self.data = data
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data.y_train)

    def __getitem__(self, i: int):
        views = self.data.views.shape[1]
        k = (7 * i + 3 * self.epoch) % views
        return self.data.x_train[i], self.data.views[i, k], self.data.y_train[i], self.data.view_labels[i, k], i


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refiner", default="saflex", choices=("saflex", "l2rw", "none", "autodo", "influence"),
                   help="saflex | l2rw | none | autodo | influence")
    p.add_argument("--isda", action="store_true", help="add the ISDA loss")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer updates (0: no limit)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="originals per process and micro-batch")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, cosine schedule (default: 0.05)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                   help="Accelerator(mixed_precision=...): bf16 on CPU or GPU, fp16 on GPU (default: no)")
    p.add_argument("--refresh-every", type=int, default=4,
                   help="optimizer updates between refreshes of the refiner's validation direction (default: 4)")
    p.add_argument("--budget", default="auto",
                   help="the refiner's allowed share of a plain step: Schedule(budget=...), validation work spaced "
                        "by measured time, the same on every process; 'none' for the exact, bit-reproducible "
                        "schedule (default: auto: 0.1 for SAflex, the exact schedule for the other methods)")
    p.add_argument("--noise", type=float, default=0.3, help="share of augmented views with a broken label")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, views and model (default: 0)")
    p.add_argument("--output", default="accelerate_out", help="folder for results.json (default: accelerate_out)")
    p.add_argument("--save-state", action="store_true", help="accelerator.save_state(<output>/checkpoint) at the end")
    p.add_argument("--resume", default="",
                   help="accelerator.load_state(<dir>) before training, and go on from the saved run's updates "
                        "(its epoch, the rest of that epoch's batches)")
    p.add_argument("--log-with", nargs="+", default=None,
                   help="Accelerate trackers to log the per-epoch rows to (accelerator.log), e.g. tensorboard "
                        "or wandb (each needs its package); files go under --output")
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (shown by the main process, and only on a terminal)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "grad_accum", "refresh_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps < 0:
        p.error(f"--max-steps must be >= 0 (0: no limit), got {args.max_steps}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.noise <= 1:
        p.error(f"--noise is the share of views given a broken label, in [0, 1]; got {args.noise}")
    try:
        budget_from_text(args.budget)
    except ConfigurationError as e:
        p.error(f"--budget: {e.problem} ({e.fix})")
    if args.mixed_precision == "fp16" and (args.cpu or not torch.cuda.is_available()):
        p.error("--mixed-precision fp16 needs a GPU: on the CPU Accelerate runs fp16 as fp32 (use bf16 there, or no)")
    if args.resume and not os.path.isdir(args.resume):
        p.error(f"--resume {args.resume!r} is not a folder saved by --save-state")
    return args


def main(argv: Optional[List[str]] = None, trackers: Optional[list] = None) -> dict:
    """Train and return the results; ``trackers``: Accelerate trackers (e.g. ``GeneralTracker``
    instances) added to ``--log-with``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args = parse_args(argv)
    launch_env = dict(os.environ)   # before the Accelerator, which may set WORLD_SIZE
    log_with = list(args.log_with or []) + list(trackers or [])
    acc = Accelerator(log_with=log_with or None, project_dir=args.output,
                      mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
                      cpu=args.cpu)
    acc.print(f"accelerate_train: world size {acc.num_processes} (distributed_type {acc.distributed_type.value}), "
              f"device {acc.device}, mixed precision {args.mixed_precision}, grad accum {args.grad_accum}", flush=True)
    warning = world_size_warning(launch_env, acc.num_processes)
    if warning and acc.is_main_process:
        print(warning, file=sys.stderr, flush=True)
    set_seed(args.seed)
    data = load_digits_study(args.seed, noise=args.noise)
    train_set = OriginalAndView(data)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_val, data.y_val), batch_size=100)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=250)

    model = SmallCNN(1, data.num_classes, img_size=data.x_train.shape[-1], width=16, hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model, opt, train_loader, test_loader = acc.prepare(model, opt, train_loader, test_loader)
    # updates per epoch from this process's share of the loader (Accelerate shards it, dropping
    # the last incomplete global batch); a shorter last accumulation group still makes one update
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    total = max(args.epochs * updates_per_epoch, 1)
    # Accelerate steps a prepared scheduler once per process at every update (split_batches=False),
    # so the schedule is written in those steps: N processes follow the rates of one process
    sched_steps = total * acc.num_processes
    # cosine decay in closed form (as transformers' get_cosine_schedule_with_warmup builds it); torch's
    # CosineAnnealingLR updates recursively, so its rates drift from the formula in the last bits
    sched = acc.prepare(torch.optim.lr_scheduler.LambdaLR(
        opt.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, sched_steps) / sched_steps))))

    options = {}
    if args.refiner == "autodo":
        options["method_options"] = {"num_points": len(train_set), "num_classes": data.num_classes}
    if args.refiner == "saflex":  # the learned share of the views steps for the run's length (docs/trust.md)
        # the planned length, as the learning-rate schedule: --max-steps stops a run without changing
        # its schedule, so a run stopped there and resumed goes on as one uninterrupted run would
        options["method_options"] = {"aug_weight": AdaptiveShare(horizon=total)}
    refiner = AugmentationRefiner(model, opt, val_loader, method=args.refiner, isda=True if args.isda else None,
                                  seed=args.seed, accelerator=acc, **options,
                                  schedule=dict(refresh_every=args.refresh_every,
                                                budget=budget_from_text(args.budget)))
    start_epoch, skip = 0, 0
    if args.resume:
        acc.load_state(args.resume)
        # go on where the saved run stopped: its updates are the refiner's (restored with the state)
        start_epoch, done_in_epoch = divmod(refiner.step_count, updates_per_epoch)
        skip = done_in_epoch * args.grad_accum   # this process's batches of those updates
    if log_with:
        acc.init_trackers("augplug_accelerate_train", config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})

    history = []
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps and refiner.step_count >= args.max_steps:
            break
        train_set.set_epoch(epoch)
        model.train()
        loss_sum, batches = 0.0, 0
        loader = acc.skip_first_batches(train_loader, skip) if epoch == start_epoch and skip else train_loader
        for xo, xa, yo, ya, idx in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                                        disable=True if args.no_progress or not acc.is_local_main_process else None):
            if args.max_steps and refiner.step_count >= args.max_steps:
                break
            with acc.accumulate(model):
                if args.refiner == "autodo":
                    # AutoDO learns its own per-point augmentation of the originals (one row per point)
                    loss = refiner(model(refiner.augment(xo, idx)), yo, index=idx)
                else:
                    loss = refiner(model(torch.cat([xo, xa])), torch.cat([yo, ya]), num_original=xo.shape[0],
                                   index=torch.cat([idx, idx]))
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            loss_sum += float(loss.detach())
            batches += 1
        acc_test = evaluate(acc, model, test_loader)
        st = refiner.stats
        # what the refinement decided on the last batch (the weights' mean is 1 by construction)
        row = {"epoch": epoch, "loss": loss_sum / max(batches, 1), "test_acc": acc_test, "updates": refiner.step_count,
               "lr": opt.param_groups[0]["lr"],
               **{k: st.get(k) for k in ("weight_std", "weight_ess", "moved_weight", "moved_class_weight",
                                         "relabel_rate", "agreement_mean", "aug_weight", "strength", "val_loss",
                                         "refresh_interval", "overhead")}}
        history.append(row)
        acc.print(json.dumps(row))
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}, step=epoch)
        if args.max_steps and refiner.step_count >= args.max_steps:
            break

    result = {"num_processes": acc.num_processes, "world_size_warning": warning, "mixed_precision": args.mixed_precision,
              "grad_accum": args.grad_accum, "refiner_updates": refiner.step_count, "refiner_calls": refiner.calls,
              "history": history}
    if args.save_state:
        acc.save_state(os.path.join(args.output, "checkpoint"))
    if acc.is_main_process:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    acc.wait_for_everyone()
    if log_with:
        acc.end_training()   # finishes the trackers (and ends the process group: the last collective call)
    return result


def evaluate(acc, model, loader) -> float:
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(1)
            pred, y = acc.gather_for_metrics((pred, y))
            correct += int((pred == y).sum())
            count += int(y.numel())
    model.train()
    return correct / max(count, 1)


def cli() -> None:
    """Console script ``augplug-accelerate-train``: :func:`main` without its return value (the exit status)."""
    main()


if __name__ == "__main__":
    cli()
