"""Train a timm model with augplug refining the augmented batches.

Built from timm's own parts (``timm.create_model``, ``timm.data.create_transform`` with ``--aa``,
``timm.data.Mixup``, ``timm.optim.create_optimizer_v2``, ``timm.scheduler.create_scheduler_v2``,
``timm.loss`` for the plain arm) and run through timm's training-task machinery: the loss is a
:class:`~augplug.integrations.timm_task.RefinedClassificationTask` (timm's ``ClassificationTask``
with an :class:`augplug.AugmentationRefiner` fed a clean validation split held out of the training
set), checkpoints are timm's ``CheckpointSaver`` files with the refiner's state as the task state,
``--resume`` is timm's ``resume_task_checkpoint``, ``--model-ema`` timm's ``ModelEmaV3``.

    augplug-timm-train --dataset digits --model resnet10t --img-size 32 \\
        --aa rand-m9-mstd0.5 --refiner saflex --epochs 10 --experiment digits
    augplug-timm-train --dataset digits --epochs 10 --experiment digits --resume auto   # continue it
    augplug-timm-train --data-dir /data/imagenette --model resnet26d --img-size 160 \\
        --aa rand-m9-mstd0.5-inc1 --mixup 0.2 --cutmix 1.0 --opt adamw --lr 1e-3 \\
        --weight-decay 0.05 --epochs 40 -b 64 --amp --model-ema --refiner saflex

(``augplug-timm-train`` is the console script of ``augplug.integrations.timm_train``; also
``python -m augplug.integrations.timm_train``, or ``python integrations/timm_train.py`` in a checkout.)

Data (all offline): ``--data-dir`` an image folder (``root/train/<class>/...`` and optionally
``root/val`` as the test set, or ``root/<class>/...``); ``--dataset fashion-mnist`` (the official
IDX files in ``$AUGPLUG_FMNIST_DIR`` or Debian's ``/usr/share/datasets/fashion-mnist``, see
:mod:`augplug.integrations.datasets`; falls back to digits with a message when absent);
``--dataset digits`` (scikit-learn's bundled 8x8 digits, resized by the transforms; needs
``pip install "augplug[demo]"``); ``--dataset synthetic`` (random images, for smoke tests).

Output, as timm's ``train.py`` lays it out: ``<--output, default ./output/train>/<--experiment,
default date-time-model-size>/`` with ``args.yaml``, ``summary.csv`` (one row per epoch: training
loss, the refiner's statistics, validation / test loss and top-1), ``last.pth.tar``,
``model_best.pth.tar`` and the last ``--checkpoint-hist`` ranked ``checkpoint-<epoch>.pth.tar``.
A resumed run keeps the summary's earlier rows; a fresh run into an existing experiment directory
starts the summary over (timm's rule). Every epoch reseeds its random streams from (seed, epoch),
so stopping (``--stop-epoch``) and resuming gives the uninterrupted run's weights bit for bit on
the CPU. ``main(argv)`` runs everything in-process and returns the history.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import time
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

import timm  # noqa: E402
import timm.utils  # noqa: E402
from timm.data import Mixup, create_transform  # noqa: E402
from timm.data.auto_augment import RandAugment  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.models import safe_model_name  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import CheckpointSaver, NativeScaler, dispatch_clip_grad, get_outdir, random_seed, update_summary  # noqa: E402

from augplug import AugmentationRefiner, ConfigurationError, refiner_kwargs  # noqa: E402
from augplug.data import IndexedDataset, stratified_split  # noqa: E402
from augplug.report import AugmentationAudit, TracedRandAugment  # noqa: E402
from augplug.schedule import budget_from_text  # noqa: E402
from augplug.share import AdaptiveShare  # noqa: E402
from augplug.sources import BatchMixer, GeneratedSamples, SourceAudit  # noqa: E402

from .datasets import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, load_digits_u8, load_fashion_mnist  # noqa: E402
from .timm_task import RefinedClassificationTask, TimmVersionError  # noqa: E402

#: the first timm whose CheckpointSaver and resume helper carry a task's state (the refiner's)
MIN_TIMM_SCRIPT = "1.0.27"
try:
    from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint  # noqa: E402
    if not hasattr(ClassificationTask, "get_task_state"):
        raise ImportError("timm.task has no task-state checkpoints")
except ImportError as e:
    raise TimmVersionError(
        f"augplug-timm-train saves and resumes the refiner as timm's task state (CheckpointSaver(task=...), "
        f"resume_task_checkpoint), which timm {timm.__version__} lacks (it came with timm {MIN_TIMM_SCRIPT})",
        f'pip install -U "timm>={MIN_TIMM_SCRIPT}"') from e
_timm_trim_summary = getattr(timm.utils, "trim_summary", None)   # timm >= 1.0.31

_logger = logging.getLogger("timm_train")

REFINERS = ("saflex", "l2rw", "autodo", "influence", "none", "off")
DATASETS = ("synthetic", "digits", "fashion-mnist")


# ---------------------------------------------------------------------------------------------- arguments
class _KeyValue(argparse.Action):
    """``--flag k=v k2=v2`` into a dict (values parsed as int / float / bool / None when they look so)."""

    def __call__(self, parser, namespace, values, option_string=None):
        out = dict(getattr(namespace, self.dest) or {})
        for kv in values:
            if "=" not in kv:
                parser.error(f"{option_string} expects key=value, got {kv!r}")
            k, v = kv.split("=", 1)
            out[k] = _parse_value(v)
        setattr(namespace, self.dest, out)


def _parse_value(s: str):
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def _size(s: str):
    """A count (``"500"``) or a fraction (``"0.1"``) of the training pool: a fraction in [0, 1) (0: none)
    or a count >= 1."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (500) or a fraction (0.1), got {s!r}") from None
    if v >= 1 and v == int(v) and "." not in s:
        return int(v)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in [0, 1), got {s!r}")
    return v


def _budget_arg(text: str) -> str:
    """``--refiner-budget``: 'auto', 'none' or a positive fraction (checked here, used as text)."""
    try:
        budget_from_text(text)
    except ConfigurationError as e:
        raise argparse.ArgumentTypeError(f"{e.problem} ({e.fix})") from None
    return text


def _strength_arg(value: str):
    """``--strength``: 'auto', 'adaptive' or a number in [0, 1]."""
    if value in ("auto", "adaptive"):
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'adaptive' or a number in [0, 1], got {value!r}")
    return value


def _val_batches_arg(value: str):
    """``--val-batches``: 'all' or a count >= 1."""
    if value == "all":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a count >= 1, got {value!r}")
    return value


#: flags named as in timm's train.py whose defaults differ from timm's, and why (also in --help)
DEVIATIONS = {
    "--model": "resnet10t (timm: resnet50): a small model for small data",
    "--img-size": "32 (timm: the model's input size): the built-in data sets are 8x8 to 28x28",
    "-b/--batch-size": "64 (timm: 128)",
    "--epochs": "10 (timm: 300)",
    "--workers": "0 (timm: 4): the built-in data sets are in memory",
    "--device": "cuda when available, else cpu (timm: cuda)",
    "--amp-dtype": "float16 on CUDA as timm, bfloat16 on CPU",
    "--dataset": "a built-in data set name (timm: a dataset spec such as torch/cifar10)",
    "--val-split": "the clean validation set held out of the training pool for the refiner (timm: the name "
                   "of the evaluation split; here the evaluation set is DIR/val or the built-in test split)",
    "--eval-metric": "ranks checkpoints on the clean validation split (timm: on its evaluation split, here "
                     "the test set)",
    "mean / std, eval crop": "the data set's mean and std and crop_pct 1.0 (timm: the model's pretrained "
                             "config)",
}


def build_parser() -> argparse.ArgumentParser:
    epilog = ("Flags named as in timm's train.py take timm's defaults, except:\n" +
              "".join(f"  {k}: {v}\n" for k, v in DEVIATIONS.items()))
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="image folder (root/train, root/val; or root/<class>)")
    g.add_argument("--dataset", default="digits", choices=DATASETS, help="built-in data when --data-dir is not given")
    g.add_argument("--train-subset", type=_size, default=None, help="stratified subset of the training pool (count or fraction)")
    g.add_argument("--test-subset", type=_size, default=None, help="stratified subset of the test set")
    g.add_argument("--synthetic-size", type=int, default=256, help="training images of --dataset synthetic")
    g.add_argument("--val-split", type=_size, default=0.1,
                   help="clean validation set held out of the training set (stratified; fraction or count)")
    g.add_argument("--val-batch-size", type=int, default=256)
    g.add_argument("--workers", "-j", type=int, default=0)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet10t")
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (downloads unless cached)")
    g.add_argument("--num-classes", type=int, default=None, help="default: the data set's")
    g.add_argument("--in-chans", type=int, default=None, help="default: the data set's")
    g.add_argument("--img-size", type=int, default=32)
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate before the classifier")
    g.add_argument("--drop-path", type=float, default=None, help="drop path (stochastic depth) rate")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_KeyValue)
    g.add_argument("--torchcompile", nargs="?", default=None, const="inductor",
                   help="torch.compile the model with this backend (inductor when the flag is given alone)")
    g.add_argument("--torchcompile-mode", default=None, help="torch.compile mode")
    g = p.add_argument_group("augmentation (timm)")
    g.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], help="RandomResizedCrop scale")
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--interpolation", default="", help="evaluation resize interpolation (default: the model's)")
    g.add_argument("--train-interpolation", default="random", help="training crop interpolation")
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    g.add_argument("--mixup-off-epoch", type=int, default=0)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g = p.add_argument_group("optimisation (timm)")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: --lr-base scaled by the batch size, as timm does)")
    g.add_argument("--lr-base", type=float, default=0.1, help="lr = lr_base * global batch / lr_base_size")
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument("--lr-base-scale", default="", choices=("", "linear", "sqrt"),
                   help="'' = sqrt for ada*/lamb optimizers, linear otherwise")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--sched", default="cosine")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--sched-on-updates", action="store_true", help="step the schedule every update")
    g.add_argument("-b", "--batch-size", type=int, default=64)
    g.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches accumulated per optimizer update")
    g.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many updates")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CPU; fp16 autocast + GradScaler on CUDA")
    g.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"), help="override the autocast dtype")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm's ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", help="warm the EMA decay up over the first updates")
    g = p.add_argument_group("output and checkpoints (timm)")
    g.add_argument("--output", default="", help="base directory (default ./output/train); the run writes to "
                                                "<output>/<experiment>/")
    g.add_argument("--experiment", default="", help="run directory name (default: <date-time>-<model>-<img size>)")
    g.add_argument("--resume", default="", help="continue from a checkpoint (e.g. .../last.pth.tar); 'auto': "
                                               "from <output>/<experiment>/last.pth.tar when there is one")
    g.add_argument("--no-resume-opt", action="store_true", help="do not restore the optimizer and loss scaler")
    g.add_argument("--start-epoch", type=int, default=None, help="override the epoch to start from")
    g.add_argument("--stop-epoch", type=int, default=None,
                   help="stop after this many epochs of the --epochs schedule (resume later to finish it)")
    g.add_argument("--checkpoint-hist", type=int, default=10, help="numbered checkpoints to keep")
    g.add_argument("--eval-metric", default="top1", choices=("top1", "loss"),
                   help="metric that ranks checkpoints (model_best.pth.tar)")
    g.add_argument("--log-interval", type=int, default=50, help="log every k steps (0: epochs only)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar over each epoch's steps (shown only on a terminal anyway)")
    g = p.add_argument_group("augplug")
    g.add_argument("--refiner", default="saflex", choices=REFINERS,
                   help="method of the AugmentationRefiner; 'none' = plain soft-target CE through the refiner, "
                        "'off' = timm's own loss (no refiner)")
    g.add_argument("--refiner-mode", default="last_layer", choices=("last_layer", "full", "double_backward", "auto"))
    g.add_argument("--strength", default=None, type=_strength_arg,
                   help="refinement strength of saflex and l2rw: 'auto' (the default, augplug's: refine only batches "
                        "that hold originals, see --with-originals; views alone are trained as given), 'adaptive', "
                        "or a number in [0, 1] (1: refine the views alone too, worth it when the augmentation breaks "
                        "labels); refused for autodo and influence, which have no strength")
    g.add_argument("--refresh-every", type=int, default=4)
    g.add_argument("--val-batches", default="all", type=_val_batches_arg, help="validation batches per refresh ('all' or an int)")
    g.add_argument("--refiner-warmup", type=int, default=0, help="optimizer updates before refinement starts")
    g.add_argument("--refiner-budget", default="auto", type=_budget_arg,
                   help="the refiner's allowed share of a plain training step: it times its own work and spaces "
                        "out validation reads (and, with --refiner-mode full, the model's score passes) to stay "
                        "within it, so the schedule depends on measured time; 'none' for the exact, "
                        "bit-reproducible schedule (default: auto: 0.1 for SAflex, the exact schedule for the other "
                        "methods)")
    g.add_argument("--refiner-kwargs", nargs="*", default={}, action=_KeyValue,
                   help="more AugmentationRefiner options, e.g. beta=2 weighting=hard")
    g.add_argument("--method-options", nargs="*", default={}, action=_KeyValue,
                   help="method_options for autodo / influence")
    g.add_argument("--isda", action="store_true", help="add ISDA to the loss")
    g.add_argument("--isda-lambda", type=float, default=0.5, help="ISDA strength lambda_0")
    g.add_argument("--with-originals", action="store_true",
                   help="batches hold each image's un-augmented original before its augmented view "
                        "(implied by --refiner influence)")
    g.add_argument("--generated", action="append", default=[], metavar="PATH",
                   help="pre-generated labelled images (class folder, .npz or .pt) mixed into every batch; "
                        "repeat for several sources")
    g.add_argument("--generated-per-batch", type=int, default=16, help="rows from each generated source per batch")
    g.add_argument("--audit", action="store_true",
                   help="write audit.md / audit.png: mean weight and relabel rate per RandAugment op and class")
    return p


# ---------------------------------------------------------------------------------------------- data
class ImageArray(torch.utils.data.Dataset):
    """``uint8`` images ``(N, H, W)`` or ``(N, H, W, C)`` with labels, yielding ``(PIL image, label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        self.images, self.labels, self.classes = images, np.asarray(labels, dtype=np.int64), list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        a = self.images[i]
        return Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB"), int(self.labels[i])


class Transformed(torch.utils.data.Dataset):
    """Positions ``indices`` of a ``(PIL, label)`` dataset with a transform; optionally also the
    un-augmented original (``eval_transform``) and the names of the RandAugment ops applied."""

    def __init__(self, base, indices, transform, eval_transform=None, trace: bool = False):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.transform, self.eval_transform = transform, eval_transform
        self.trace = trace
        self._traced = {}
        if trace:
            for t in getattr(transform, "transforms", []):
                if isinstance(t, RandAugment):
                    self._traced[id(t)] = TracedRandAugment(t)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, y = self.base[int(self.indices[i])]
        names: Tuple[str, ...] = ()
        if self.trace:
            x = img
            for t in self.transform.transforms:
                if id(t) in self._traced:
                    x, names = self._traced[id(t)](x)
                else:
                    x = t(x)
        else:
            x = self.transform(img)
        out = [x, y]
        if self.eval_transform is not None:
            out.append(self.eval_transform(img))
        if self.trace:
            out.append("|".join(names))
        return tuple(out)


def _labels_of(ds) -> np.ndarray:
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets, dtype=np.int64)
    return np.asarray(ds.labels, dtype=np.int64)


def _subset(labels: np.ndarray, size, seed: int) -> np.ndarray:
    if size is None:
        return np.arange(len(labels))
    if (isinstance(size, int) and size >= len(labels)) or (isinstance(size, float) and size >= 1):
        return np.arange(len(labels))
    _, keep = stratified_split(labels, size, seed=seed)
    return keep


def load_data(args) -> Dict[str, Any]:
    """The training pool and the test set as ``(PIL, label)`` datasets, with the data's defaults."""
    from_dataset = args.dataset
    if args.data_dir:
        from torchvision.datasets import ImageFolder

        root = args.data_dir
        train_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        test_root = next((os.path.join(root, d) for d in ("val", "validation", "test")
                          if os.path.isdir(os.path.join(root, d))), None)
        mode = "L" if args.in_chans == 1 else "RGB"
        loader = lambda p: _open(p, mode)  # noqa: E731
        train = ImageFolder(train_root, loader=loader)
        test = ImageFolder(test_root, loader=loader) if test_root else None
        if test is not None and test.classes != train.classes:
            raise ConfigurationError(f"{test_root} and {train_root} have different class folders",
                                     "use the same class sub-folders in both")
        return dict(train=train, test=test, classes=train.classes, in_chans=1 if mode == "L" else 3,
                    mean=(0.485, 0.456, 0.406)[: 1 if mode == "L" else 3], std=(0.229, 0.224, 0.225)[: 1 if mode == "L" else 3])
    if from_dataset == "fashion-mnist":
        try:
            xtr, ytr = load_fashion_mnist("train")
            xte, yte = load_fashion_mnist("test")
        except (FileNotFoundError, ValueError) as e:
            _logger.warning("Fashion-MNIST is not available (%s); falling back to --dataset digits.",
                            str(e).splitlines()[0])
            from_dataset = "digits"
            args.dataset = "digits"
        else:
            return dict(train=ImageArray(xtr, ytr, FMNIST_CLASSES), test=ImageArray(xte, yte, FMNIST_CLASSES),
                        classes=list(FMNIST_CLASSES), in_chans=1, mean=(FMNIST_MEAN,), std=(FMNIST_STD,))
    if from_dataset == "digits":
        images, labels = load_digits_u8("augplug-timm-train --dataset digits")
        train_idx, test_idx = stratified_split(labels, 0.2, seed=0)   # a fixed test split
        classes = [str(c) for c in range(10)]
        return dict(train=ImageArray(images[train_idx], labels[train_idx], classes),
                    test=ImageArray(images[test_idx], labels[test_idx], classes),
                    classes=classes, in_chans=1, mean=(0.3,), std=(0.35,))
    if from_dataset == "synthetic":
        c = args.num_classes or 10
        g = np.random.default_rng(12345)
        n_train, n_test, side = int(args.synthetic_size), max(int(args.synthetic_size) // 4, c), 16

        def make(n):
            y = np.arange(n) % c
            x = g.integers(0, 160, (n, side, side, 3)) + (y * (95 // max(c - 1, 1)))[:, None, None, None]
            return x.astype(np.uint8), y

        (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
        classes = [f"class{i}" for i in range(c)]
        return dict(train=ImageArray(xtr, ytr, classes), test=ImageArray(xte, yte, classes), classes=classes,
                    in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    raise ConfigurationError(f"unknown dataset {from_dataset!r}", f"use one of {DATASETS} or --data-dir")


def _open(path: str, mode: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


# ---------------------------------------------------------------------------------------------- loops
class _Mean:
    def __init__(self):
        self.sum, self.n = 0.0, 0

    def update(self, v: float, n: int = 1) -> None:
        if v == v:  # skip NaN
            self.sum += v * n
            self.n += n

    @property
    def avg(self) -> float:
        return self.sum / self.n if self.n else float("nan")


def evaluate(model, loader, device, amp_autocast) -> Dict[str, float]:
    """Cross-entropy and top-1 (%) of ``model`` over ``loader`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            with amp_autocast():
                out = model(x)
            loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
            correct += int((out.argmax(-1) == y).sum())
            n += y.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(n, 1), "top1": 100.0 * correct / max(n, 1)}


def smooth_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Class ids to label-smoothed probabilities (what timm's Mixup does with ``label_smoothing``)."""
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)


def train_one_epoch(epoch: int, task, loader, optimizer, args, *, device, refiner=None,
                    lr_scheduler=None, amp_autocast=nullcontext, loss_scaler=None, mixup_fn=None,
                    num_classes: int, audit: Optional[AugmentationAudit] = None,
                    mixer: Optional[BatchMixer] = None, sources: Optional[SourceAudit] = None,
                    num_updates: int = 0) -> Tuple[Dict[str, float], int]:
    """One epoch of timm's loop (gradient accumulation, loss scaler, EMA, per-update schedule);
    returns the epoch's metrics and the update count so far.

    The loss is the task's: ``task(x, y, index=index)["loss"]``, i.e. ``refiner(model(x), y, ...)``.
    With originals (``--with-originals``) each batch is ``[originals; augmented views]`` with
    ``num_original=B`` and the index repeated for both halves (the pairing influence functions
    need). With a ``mixer`` (``--generated``), generated rows are appended after the (mixed)
    training rows and every row is refined.
    """
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and mixup_fn is not None:
        mixup_fn.mixup_enabled = False
    task.get_trainable_module().train()
    # what the refinement decided (the weights' mean is 1 by construction, so it is not logged)
    m = {k: _Mean() for k in ("loss", "weight_ess", "moved_weight", "moved_class_weight", "relabel_rate", "aug_weight",
                              "strength")}
    batches = _batches_per_epoch(len(loader), args)
    # updates of --grad-accum-steps k micro-batches; when k does not divide the epoch's n micro-batches,
    # the last n % k form ONE shorter update, each of its losses divided by n % k (the group's mean, as
    # timm divides). ceil(n / k) updates per epoch: what the schedule, the EMA warm-up and a resume count.
    per_update = args.grad_accum_steps
    last_group_from = batches - (batches % per_update or per_update)   # first micro-batch of the last update
    # a progress bar on a terminal (tqdm hides it when stderr is not one), none with --no-progress
    bar = tqdm(total=batches, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
               disable=True if getattr(args, "no_progress", False) else None)
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader):
        if step >= batches:
            break
        need_update = step == batches - 1 or (step + 1) % per_update == 0
        accum = batches - last_group_from if step >= last_group_from else per_update   # this update's micro-batches
        batch = list(batch)
        index = batch.pop().to(device)                 # IndexedDataset appends the position
        names = batch.pop() if args.audit else None    # "|"-joined RandAugment op names
        x, y = batch[0].to(device), batch[1].to(device)
        x_orig = batch[2].to(device) if len(batch) > 2 else None
        y_orig = y
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        elif args.smoothing and refiner is not None:
            y = smooth_targets(y, num_classes, args.smoothing)
        with amp_autocast():
            if refiner is not None and refiner.method == "autodo":
                x = refiner.augment(x, index)
            if x_orig is not None:
                y_o = y_orig if y.dim() == 1 else (smooth_targets(y_orig, num_classes, args.smoothing)
                                                   if args.smoothing else F.one_hot(y_orig, num_classes).to(y.dtype))
                targets = torch.cat([y_o, y])
                loss = task(torch.cat([x_orig, x]), targets, num_original=x.shape[0],
                            index=torch.cat([index, index]))["loss"]
            elif mixer is not None:
                mb = mixer(x, y)   # generated rows after the training rows; one-hot when y is soft
                targets = mb.targets
                loss = task(mb.inputs, targets, augmented=mb.augmented)["loss"]
            elif refiner is not None:
                targets = y
                loss = task(x, targets, index=index)["loss"]
            else:
                loss = task(x, y)["loss"]
        _backward(loss / accum if accum > 1 else loss, task, optimizer, loss_scaler, args, need_update)
        m["loss"].update(float(loss.detach()), x.shape[0])
        if refiner is not None:
            st = refiner.stats
            if refiner.method != "none":   # the control arm refines nothing: its refiner statistics stay NaN
                m["strength"].update(float(st.get("strength", float("nan"))))  # 0: trained as given (no originals)
                m["aug_weight"].update(float(st.get("aug_weight", float("nan"))))
                if st.get("active", True):
                    for k in ("weight_ess", "moved_weight", "moved_class_weight", "relabel_rate"):
                        m[k].update(float(st.get(k, float("nan"))))
            if audit is not None:
                names_all = names if mixer is None else (       # generated rows: their source's name
                    list(names) + [mixer.source_names[i] for i in mb.source_ids[len(names):].tolist()])
                audit.update(st, names_all, targets)   # one "|"-joined entry per augmented row
            if sources is not None:
                sources.update(st, mb.source_ids, targets)
        if args.log_interval and step % args.log_interval == 0:
            _logger.info("epoch %d step %d/%d  loss %.4f", epoch, step, batches, m["loss"].avg)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss'].avg:.4f}", refresh=False)
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad(set_to_none=True)
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=m["loss"].avg)
    bar.close()
    if hasattr(optimizer, "sync_lookahead"):
        optimizer.sync_lookahead()
    return {k: v.avg for k, v in m.items()}, num_updates


def _batches_per_epoch(loader_len: int, args) -> int:
    """Micro-batches per epoch: all, or ``--max-steps`` updates' worth."""
    return min(loader_len, args.max_steps * args.grad_accum_steps) if args.max_steps else loader_len


def _backward(loss, task, optimizer, loss_scaler, args, need_update: bool) -> None:
    """timm's backward: through the loss scaler, or ``backward`` then (on updates) clip and step."""
    params = task.get_clip_parameters(exclude_head="agc" in args.clip_mode) if args.clip_grad is not None else None
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=params,
                    need_update=need_update)
        return
    loss.backward()
    if need_update:
        if args.clip_grad is not None:
            dispatch_clip_grad(params, value=args.clip_grad, mode=args.clip_mode)
        optimizer.step()


# ---------------------------------------------------------------------------------------------- main
def _strength(value: Optional[str]):
    """``--strength``: 'auto' (also when not given), 'adaptive' or a number."""
    if value is None:
        return "auto"
    return value if value in ("auto", "adaptive") else float(value)


def build_refiner(args, model, optimizer, val_loader, num_train: int, num_classes: int,
                  horizon: Optional[int] = None):
    """The ``AugmentationRefiner`` the flags describe (None for ``--refiner off``). ``horizon``: the
    run's optimizer updates; SAflex's learned share then steps for the run's length
    (``AdaptiveShare(horizon=...)``, ``docs/trust.md``) unless ``aug_weight`` is set."""
    if args.refiner == "off":
        if args.isda:
            raise ConfigurationError("--isda needs the refiner", "use --refiner none --isda for ISDA alone")
        return None
    method_options = dict(args.method_options)
    if args.refiner == "autodo":
        method_options.setdefault("num_points", num_train)
        method_options.setdefault("num_classes", num_classes)
    needs_val = args.refiner not in ("none",)
    if needs_val and val_loader is None:
        raise ConfigurationError(f"--refiner {args.refiner} needs a clean validation split",
                                 "pass --val-split (a fraction such as 0.1, or a count)")
    val_batches = args.val_batches if args.val_batches == "all" else int(args.val_batches)
    if args.refiner == "saflex" and horizon and "aug_weight" not in {**args.refiner_kwargs, **method_options}:
        method_options["aug_weight"] = AdaptiveShare(horizon=horizon)
    isda = {"lambda0": args.isda_lambda} if args.isda else None
    return AugmentationRefiner(model, optimizer, val_loader, method=args.refiner, mode=args.refiner_mode,
                               seed=args.seed, isda=isda,
                               **refiner_kwargs({**({"strength": _strength(args.strength)}
                                                    if args.refiner in ("saflex", "l2rw") else {}),
                                                 **args.refiner_kwargs, **method_options},
                                                refresh_every=args.refresh_every, val_batches=val_batches,
                                                warmup_steps=args.refiner_warmup,
                                                budget=budget_from_text(args.refiner_budget)))


class ToModelInput:
    """Generated images (float ``(C, H, W)`` in [0, 1]) to the model's input: channels, size, normalization."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int):
        self.size, self.in_chans = int(img_size), int(in_chans)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[0] != self.in_chans:
            x = x.mean(0, keepdim=True).expand(self.in_chans, -1, -1) if self.in_chans in (1, 3) else x
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        return (x - self.mean) / self.std


def build_mixer(args, classes: Sequence[str], num_classes: int, in_chans: int, mean, std) -> BatchMixer:
    """A :class:`augplug.sources.BatchMixer` over the ``--generated`` sources, named by file / folder name."""
    if args.refiner in ("off", "autodo") or args.with_originals:
        raise ConfigurationError("--generated needs a refiner that weights rows without dataset positions "
                                 "or originals", "use --refiner saflex, l2rw or none, without --with-originals")
    tf = ToModelInput(args.img_size, mean, std, in_chans)
    found = {}
    for path in args.generated:
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "generated"
        while name in found or name == "real":
            name += "_"
        if os.path.isdir(path):
            found[name] = GeneratedSamples.from_folder(path, classes=classes, transform=tf,
                                                       image_mode="L" if in_chans == 1 else "RGB")
        else:
            found[name] = GeneratedSamples.from_file(path, transform=tf, num_classes=num_classes)
    return BatchMixer(found, per_batch=args.generated_per_batch, seed=args.seed, real_augmented=True)


def eval_interpolation(args) -> str:
    """``--interpolation``, or (when empty, as in timm) the model's pretrained config's, else bicubic."""
    if args.interpolation:
        return args.interpolation
    try:
        cfg = timm.models.get_pretrained_cfg(args.model)
    except RuntimeError:   # an unknown pretrained tag
        cfg = None
    return getattr(cfg, "interpolation", None) or "bicubic"


def build_datasets(args) -> Dict[str, Any]:
    """Training (``IndexedDataset``), clean validation and test sets for the flags.

    The validation set is ``--val-split`` of the training pool, held out by
    :func:`augplug.data.stratified_split` and shown with the evaluation transform; training images
    get timm's training transform (``--aa``, crops, flips, random erasing).
    """
    data = load_data(args)
    classes = data["classes"]
    num_classes = args.num_classes or len(classes)
    if num_classes < len(classes):
        raise ConfigurationError(f"--num-classes {num_classes} is below the data's {len(classes)} classes",
                                 "drop --num-classes or raise it")
    in_chans = args.in_chans or data["in_chans"]
    mean, std = data["mean"], data["std"]
    if in_chans != data["in_chans"]:
        raise ConfigurationError(f"--in-chans {in_chans} but the data have {data['in_chans']} channels",
                                 "drop --in-chans")

    # splits: training pool -> (train, clean validation); a stratified subset first when asked
    pool_labels = _labels_of(data["train"])
    pool = _subset(pool_labels, args.train_subset, args.seed)
    val_size = args.val_split
    if val_size and val_size > 0:
        tr, va = stratified_split(pool_labels[pool], val_size, seed=args.seed)
        train_idx, val_idx = pool[tr], pool[va]
    else:
        train_idx, val_idx = pool, np.zeros(0, dtype=np.int64)

    train_tf = create_transform(args.img_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
                                hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
                                auto_augment=args.aa, interpolation=args.train_interpolation, mean=mean, std=std,
                                re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    eval_tf = create_transform(args.img_size, is_training=False, interpolation=eval_interpolation(args), mean=mean,
                               std=std, crop_pct=1.0)
    if args.audit and not args.aa:
        raise ConfigurationError("--audit reports per RandAugment op", "pass --aa rand-... as well")
    train_set = IndexedDataset(Transformed(data["train"], train_idx, train_tf,
                                           eval_tf if args.with_originals else None, trace=args.audit))
    val_set = Transformed(data["train"], val_idx, eval_tf) if len(val_idx) else None
    test_set = None
    if data["test"] is not None:
        test_labels = _labels_of(data["test"])
        test_set = Transformed(data["test"], _subset(test_labels, args.test_subset, args.seed), eval_tf)

    return dict(train=train_set, val=val_set, test=test_set, classes=classes, num_classes=num_classes,
                in_chans=in_chans, train_indices=train_idx, val_indices=val_idx, mean=mean, std=std)


def _seed_epoch(seed: int, epoch: int, loader_generator: torch.Generator) -> None:
    """Reseed every stream an epoch draws from (shuffling, transforms, Mixup, dropout / drop path) from
    ``(seed, epoch)`` alone, so that a resumed run draws exactly what an uninterrupted one draws."""
    s = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    random_seed(s)
    loader_generator.manual_seed(s)


def _resolve_lr(args) -> None:
    """timm's rule when ``--lr`` is not given: ``lr_base`` scaled by the global batch (linear, or
    sqrt for ada*/lamb optimizers)."""
    if args.lr is not None:
        return
    ratio = args.batch_size * args.grad_accum_steps / args.lr_base_size
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    args.lr = args.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)
    _logger.info("lr %.4g from --lr-base %g and the global batch %d (%s scaling)", args.lr, args.lr_base,
                 args.batch_size * args.grad_accum_steps, scale)


def _output_dir(args) -> str:
    """timm's layout: ``<--output or ./output/train>/<--experiment or date-time-model-size>``."""
    name = args.experiment or "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), safe_model_name(args.model),
                                        str(args.img_size)])
    return get_outdir(args.output or "./output/train", name)


def _resume_path(args, output_dir: str) -> str:
    if args.resume == "auto":   # timm's in-place continuation: the run directory's own last checkpoint
        last = os.path.join(output_dir, "last.pth.tar")
        return last if os.path.isfile(last) else ""
    if args.resume and not os.path.isfile(args.resume):
        raise ConfigurationError(f"--resume {args.resume}: no such checkpoint file",
                                 "pass a .pth.tar written by this script (e.g. <run dir>/last.pth.tar), or --resume auto")
    return args.resume


#: the flag that adds each part of the task state beside the refiner
_PART_FLAGS = {"audit": "--audit", "mixer": "--generated", "sources": "--generated"}


def _missing_parts_error(path: str, missing: Sequence[str]) -> ConfigurationError:
    """The refusal of a checkpoint written without a part this run keeps (``--audit`` or ``--generated``
    added on resume), worded for the command line (the task's own fix, strict=False, is no flag here)."""
    if not all(p in _PART_FLAGS for p in missing):   # the refiner itself: not a checkpoint of this script's
        return ConfigurationError(
            f"--resume {path}: the checkpoint's task state lacks {list(missing)}, so it was not written by this "
            "script with a refiner",
            "resume with the flags the run was started with (its args.yaml), or start a new run under another "
            "--experiment")
    named = " and ".join(sorted({_PART_FLAGS[p] for p in missing}))
    return ConfigurationError(
        f"--resume {path}: the checkpoint was written without {named} (its task state has no "
        f"{' / '.join(repr(p) for p in missing)} part to continue)",
        f"resume without {named}, or start a new run with {named} under another --experiment")


def _keep_summary_rows_before(path: str, start_epoch: int) -> None:
    """timm's rule for a run directory that already has a summary (``timm.utils.trim_summary``):
    keep the rows of the epochs before ``start_epoch``, so a resume continues the file and a fresh
    run (epoch 0) starts it over; the file itself is never removed."""
    if _timm_trim_summary is not None:
        _timm_trim_summary(path, start_epoch)
        return
    if not os.path.exists(path):   # timm < 1.0.31: the same rule, written out
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [r for r in rows[1:] if r and r[0] != "epoch" and int(float(r[0])) < start_epoch]
    if len(keep) == len(rows) - 1:
        return
    with open(path, "w", newline="") as f:
        if keep:
            csv.writer(f).writerows([rows[0]] + keep)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, train, and return ``{"history": [...], "final": {...}, "args": ...,
    "output_dir": ..., "model", "refiner", "task", ...}``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.refiner == "autodo" and args.with_originals:
        parser.error("--refiner autodo keeps one table row per training image, so it trains on the augmented "
                     "view alone; drop --with-originals")
    if args.strength is not None and args.refiner in ("autodo", "influence"):
        parser.error(f"--strength sets the refinement strength of saflex and l2rw; --refiner {args.refiner} has none "
                     "and would ignore it: drop --strength (or use --refiner saflex / l2rw)")
    if args.strength is None:
        args.strength = "auto"
    if args.resume == "auto" and not args.experiment:
        parser.error("--resume auto continues the run directory <output>/<experiment>: pass --experiment NAME")
    if args.grad_accum_steps < 1:
        parser.error("--grad-accum-steps must be at least 1")
    for name in ("epochs", "batch_size", "val_batch_size", "synthetic_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.train_subset is not None and args.train_subset == 0:
        parser.error("--train-subset must be a count >= 1 or a fraction in (0, 1), got 0")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    args_text = yaml.safe_dump(vars(args), default_flow_style=False)   # the command as given
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.refiner == "influence":
        args.with_originals = True
    _resolve_lr(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random_seed(args.seed, 0)

    if args.audit and not args.aa:
        parser.error("--audit reports per RandAugment op: pass --aa rand-... as well")
    try:
        ds = build_datasets(args)
    except (ConfigurationError, ValueError) as e:   # the split flags (--val-split, --train-subset, sizes)
        parser.error(f"the data split: {e}")
    train_set, val_set, test_set = ds["train"], ds["val"], ds["test"]
    classes, num_classes, in_chans, val_idx = ds["classes"], ds["num_classes"], ds["in_chans"], ds["val_indices"]
    gen = torch.Generator().manual_seed(args.seed)
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active and args.batch_size % 2:
        raise ConfigurationError(f"timm's Mixup pairs rows and needs an even batch size, got {args.batch_size}",
                                 "use an even -b/--batch-size")
    loader_train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen,
                                               drop_last=mixup_active or len(train_set) >= 2 * args.batch_size,
                                               num_workers=args.workers)
    loader_val = (torch.utils.data.DataLoader(val_set, batch_size=args.val_batch_size, shuffle=False,
                                              num_workers=args.workers) if val_set is not None else None)
    loader_test = (torch.utils.data.DataLoader(test_set, batch_size=args.val_batch_size, shuffle=False,
                                               num_workers=args.workers) if test_set is not None else None)
    if len(loader_train) == 0:
        raise ConfigurationError(f"the training split ({len(train_set)} images) holds no full batch of {args.batch_size}",
                                 "lower -b/--batch-size or --val-split")

    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, in_chans=in_chans,
                              drop_rate=args.drop, drop_path_rate=args.drop_path, **args.model_kwargs).to(device)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    horizon = args.epochs * math.ceil(_batches_per_epoch(len(loader_train), args) / args.grad_accum_steps)
    refiner = build_refiner(args, model, optimizer, loader_val, len(train_set), num_classes,
                            horizon=horizon)   # after the optimizer

    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else (torch.float16 if device.type == "cuda" else torch.bfloat16)
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)
        if dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)

    mixup_fn = None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    audit = AugmentationAudit(classes[:num_classes] if len(classes) == num_classes else None,
                              num_classes=num_classes) if args.audit else None
    mixer = sources = None
    if args.generated:
        mixer = build_mixer(args, classes, num_classes, in_chans, ds["mean"], ds["std"])
        sources = SourceAudit(mixer.source_names, num_classes=num_classes, only_active=args.refiner != "none")
        if args.refiner != "none" and args.strength == "auto":
            # the mixer's batches hold no originals, and --strength auto trains such batches as given
            _logger.warning("--generated with --strength auto: the batches hold no originals, so every row, generated "
                            "ones included, is trained as given and no sources.md is written; pass --strength 1 to "
                            "weigh the generated rows")
    if refiner is not None and args.refiner in ("saflex", "l2rw") and not args.with_originals and not args.generated \
            and _strength(args.strength) == "auto":
        _logger.warning("--refiner %s without --with-originals: every batch holds views alone, which the default "
                        "--strength auto trains as given (the run is plain augmentation, as --refiner none, with the "
                        "refiner's bookkeeping); pass --with-originals (recommended: the views' share of the loss "
                        "is then learned) or --strength 1 to refine views alone", args.refiner)
    if audit is not None and refiner is not None and args.with_originals and \
            getattr(refiner.policy, "weighting", None) == "none":
        _logger.warning("--audit: beside the learned share every view keeps weight 1 (augplug's default), so audit.md's "
                        "weight columns read 1 and its agreement columns rank the ops; pass --refiner-kwargs "
                        "weighting=soft for a weight per view")
    if refiner is not None:   # the refiner is the task's loss; it and the script's stateful parts are the task state
        stateful = {k: v for k, v in (("audit", audit), ("mixer", mixer), ("sources", sources)) if v is not None}
        task = RefinedClassificationTask(model, refiner, stateful=stateful, device=device, verbose=False)
    else:                     # timm train.py's choice of loss
        if args.with_originals:
            raise ConfigurationError("--with-originals needs the refiner", "drop --refiner off")
        loss_fn = (SoftTargetCrossEntropy() if mixup_active else
                   LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss())
        task = ClassificationTask(model, criterion=loss_fn, device=device, verbose=False)

    # timm's order: output directory, resume (model, optimizer, scaler, task state), EMA, compile
    output_dir = _output_dir(args)
    resume_path = _resume_path(args, output_dir)
    resume_epoch = None
    if resume_path:
        try:
            resume_epoch = resume_task_checkpoint(task, resume_path,
                                                  optimizer=None if args.no_resume_opt else optimizer,
                                                  loss_scaler=None if args.no_resume_opt else loss_scaler)
        except ConfigurationError as e:
            missing = getattr(e, "missing_parts", None)
            if not missing:
                raise
            raise _missing_parts_error(resume_path, missing) from e
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if resume_path:
            load_task_ema_checkpoint(task, resume_path)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_model = task.get_eval_model()

    metric_set = "val" if loader_val is not None else "test" if loader_test is not None else None
    eval_metric = f"{'ema_' if args.model_ema and metric_set else ''}{metric_set}_{args.eval_metric}" \
        if metric_set else "loss"   # timm: the EMA's metric when there is an EMA; the training loss without eval data
    decreasing = eval_metric.endswith("loss")
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler,
                            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing,
                            max_history=args.checkpoint_hist, task=task)
    if resume_path and os.path.realpath(os.path.dirname(resume_path)) == os.path.realpath(output_dir) \
            and hasattr(saver, "load_state_dict_from_checkpoint"):
        saver.load_state_dict_from_checkpoint(resume_path)   # continue its ranked history in place (timm >= 1.0.31)
    with open(os.path.join(output_dir, "args.yaml"), "w") as f:
        f.write(args_text)

    updates_per_epoch = math.ceil(_batches_per_epoch(len(loader_train), args) / args.grad_accum_steps)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:   # the schedule is a function of the epoch / update
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    stop_epoch = num_epochs if args.stop_epoch is None else args.stop_epoch
    if not 0 < stop_epoch <= num_epochs:
        raise ConfigurationError(f"--stop-epoch {args.stop_epoch} is outside the schedule's 1..{num_epochs} epochs",
                                 f"pass --stop-epoch between 1 and {num_epochs}, or drop it")

    _logger.info("timm_train: %s on %s (%d train / %d val / %s test images, %d classes), refiner=%s%s, device=%s%s, "
                 "output %s", args.model, args.data_dir or args.dataset, len(train_set), len(val_idx),
                 len(test_set) if test_set is not None else "no", num_classes, args.refiner,
                 " + ISDA" if args.isda else "", device, f", amp {dtype}" if args.amp else "", output_dir)
    summary_path = os.path.join(output_dir, "summary.csv")
    _keep_summary_rows_before(summary_path, start_epoch)
    history: List[Dict[str, Any]] = []
    best_metric = best_epoch = None
    num_updates = start_epoch * updates_per_epoch
    for epoch in range(start_epoch, stop_epoch):
        t0 = time.perf_counter()
        _seed_epoch(args.seed, epoch, gen)
        if refiner is not None and refiner.isda is not None:
            refiner.isda.set_epoch(epoch, num_epochs)   # the paper's schedule: lambda = lambda0 * epoch / epochs
        train_m, num_updates = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device=device, refiner=refiner,
            lr_scheduler=lr_scheduler, amp_autocast=amp_autocast, loss_scaler=loss_scaler, mixup_fn=mixup_fn,
            num_classes=num_classes, audit=audit, mixer=mixer, sources=sources, num_updates=num_updates)
        eval_m = {}
        for prefix, net in (("", eval_model), ("ema_", task.get_eval_model(ema=True) if task.has_ema() else None)):
            for name, loader in (("val", loader_val), ("test", loader_test)):
                if net is not None and loader is not None:
                    eval_m.update({f"{prefix}{name}_{k}": v for k, v in evaluate(net, loader, device, amp_autocast).items()})
        lr = float(np.mean([g["lr"] for g in optimizer.param_groups]))
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_m.items()}, **eval_m, "lr": lr, "seconds": seconds}
        history.append(row)
        _logger.info("epoch %d/%d  train_loss %.4f  strength %.2f  share %.3f  weight_ess %.3f  moved %.3f  "
                     "moved_class %.3f  relabel %.3f  val_top1 %s  test_top1 %s  lr %.3g  %.1fs", epoch + 1, num_epochs,
                     train_m["loss"], train_m["strength"], train_m["aug_weight"], train_m["weight_ess"],
                     train_m["moved_weight"], train_m["moved_class_weight"], train_m["relabel_rate"],
                     f"{eval_m['val_top1']:.2f}" if "val_top1" in eval_m else "-",
                     f"{eval_m['test_top1']:.2f}" if "test_top1" in eval_m else "-", lr, seconds)
        update_summary(epoch, {**train_m, "seconds": seconds}, eval_m, summary_path, lr=lr,
                       write_header=not os.path.exists(summary_path) or os.path.getsize(summary_path) == 0)
        latest = eval_m[eval_metric] if metric_set else train_m["loss"]
        best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest)
    if best_metric is not None:
        _logger.info("best %s %.4f (epoch %d): %s", eval_metric, best_metric, best_epoch,
                     os.path.join(output_dir, "model_best.pth.tar"))
    if sources is not None and sources.updates:
        table = sources.table(format="markdown")
        _logger.info("generated sources (rows, mean weight, kept share, relabel rate, mean y~^T g):\n%s", table)
        with open(os.path.join(output_dir, "sources.md"), "w") as f:
            f.write("# Generated sources\n\n" + table + "\n## Per source and class\n\n" +
                    sources.table("source_class", format="markdown"))
    if sources is not None and not sources.updates:
        _logger.warning("--generated: no refined batch to report, so no sources.md is written (with --strength auto, "
                        "batches without originals are trained as given; pass --strength 1)")
    if audit is not None and not audit.updates:
        _logger.warning("--audit: no refined batch to audit, so no audit.md is written (with --strength auto, "
                        "batches without originals are trained as given; pass --strength 1, or --with-originals "
                        "--refiner-kwargs weighting=soft for a weight per view beside the originals)")
    if audit is not None and audit.updates:
        with open(os.path.join(output_dir, "audit.md"), "w") as f:
            f.write("# Augmentation audit\n\n## Per RandAugment op\n\n" + audit.table(format="markdown") +
                    "\n## Per class\n\n" + audit.table("class", format="markdown"))
        audit.plot(os.path.join(output_dir, "audit.png"), title=f"{args.model}, {args.aa}, refiner={args.refiner}")
    return {"history": history, "final": history[-1] if history else {}, "args": args, "output_dir": output_dir,
            "refiner": refiner, "model": model, "task": task, "audit": audit, "sources": sources, "mixer": mixer,
            "best_metric": best_metric, "best_epoch": best_epoch}


def cli() -> None:
    """Console script ``augplug-timm-train``: :func:`main` without its return value (the exit status)."""
    main()


if __name__ == "__main__":
    cli()
