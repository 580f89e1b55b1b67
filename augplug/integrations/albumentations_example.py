"""An albumentations pipeline feeding the refiner, with weights and relabels attributed to transforms.

    augplug-albumentations-example --epochs 5 --output runs/albu
    python -m augplug.integrations.albumentations_example --epochs 5 --output runs/albu

Needs ``pip install "augplug[albumentations,demo]"`` (albumentations; scikit-learn for the digits,
matplotlib for ``audit.png``). In a checkout also ``python integrations/albumentations_example.py``.

Data: scikit-learn's bundled 8x8 digits (always available), 20 % held out as the test set and a
stratified clean validation split of the rest. Each training image goes through an
``A.Compose([..., A.Normalize(...), ToTensorV2()], save_applied_params=True)`` pipeline, each transform
seeded on its own (``augplug.data.seed_albumentations``);
the dataset returns the image, the label and the names of the transforms that were applied (from
``out["applied_transforms"]``, joined by ``"|"`` so the default collate keeps them). Every batch
holds the clean originals followed by their augmented views; the refiner (by default SAflex with a
weight per view, ``SAflex(weighting="soft")``, which the audit reads; the library's default weighs
the views as a whole) weights the views, and an :class:`augplug.report.AugmentationAudit` attributes the weights and relabels to
the albumentations transforms. The refiner runs the exact schedule by default (``--budget none``),
so a seed repeats the audit bit for bit; ``--budget auto`` gives it the library's default overhead
budget, whose schedule follows measured time. ``VerticalFlip`` is in the pipeline on purpose: an
upside-down digit is often another digit (6 and 9), so it is the transform one expects the refiner to
trust least.

albumentations 2.0.8 is the last MIT-licensed release; set ``NO_ALBUMENTATIONS_UPDATE=1`` (done
below) so that importing it does not query PyPI.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, List, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from augplug import AugmentationRefiner, SAflex  # noqa: E402
from augplug.schedule import budget_from_text  # noqa: E402
from augplug._extras import require  # noqa: E402
from augplug.data import albumentations_worker_init, seed_albumentations, stratified_split  # noqa: E402
from augplug.models import SmallCNN  # noqa: E402
from augplug.report import NAME_SEP, AugmentationAudit  # noqa: E402

from .datasets import load_digits_u8  # noqa: E402

MEAN, STD = 0.3, 0.35
#: Deterministic steps of the pipeline, left out of the audit.
IGNORE = ("Resize", "Normalize", "ToTensorV2")


def build_pipeline(size: int = 16, seed: Optional[int] = 0, augment: bool = True):
    """The training pipeline (``augment=True``) or the evaluation one: resize, normalize, to tensor.
    ``seed``: each transform's own random stream (:func:`augplug.data.seed_albumentations`; not
    ``Compose(seed=)``, which gives every transform the same one); None: unseeded."""
    A = require("albumentations", "albumentations", "the albumentations example")
    ToTensorV2 = require("albumentations.pytorch", "albumentations", "the albumentations example").ToTensorV2

    aug = [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.25),
        A.Affine(rotate=(-15, 15), translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), p=0.5),
        A.RandomBrightnessContrast(p=0.3),
        A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.2, 0.4), hole_width_range=(0.2, 0.4), p=0.3),
    ] if augment else []
    pipeline = A.Compose([A.Resize(size, size)] + aug + [A.Normalize(mean=(MEAN,), std=(STD,)), ToTensorV2()],
                         save_applied_params=augment)
    if seed is not None:
        seed_albumentations(pipeline, seed)
    return pipeline


class AlbumentationsDataset(torch.utils.data.Dataset):
    """``(augmented image, label, applied transform names, clean image)`` from ``uint8`` HWC images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pipeline, clean_pipeline=None):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.pipeline, self.clean_pipeline = pipeline, clean_pipeline

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        out = self.pipeline(image=self.images[i])
        names = NAME_SEP.join(n for n, _ in out.get("applied_transforms", []) if n not in IGNORE)
        item = [out["image"], int(self.labels[i]), names]
        if self.clean_pipeline is not None:
            item.append(self.clean_pipeline(image=self.images[i])["image"])
        return tuple(item)


def load_digits_hwc():
    images, labels = load_digits_u8("the albumentations example's digits")
    return images[..., None], labels   # (N, 8, 8, 1)


def evaluate(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    ap.add_argument("--batch-size", type=int, default=64, help="augmented images per batch, each with its original (default: 64)")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, cosine schedule (default: 0.05)")
    ap.add_argument("--img-size", type=int, default=16, help="side the 8x8 digits are resized to (default: 16)")
    ap.add_argument("--val-size", type=int, default=200, help="clean validation images held out of training")
    ap.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    ap.add_argument("--max-steps", type=int, default=None, help="updates per epoch at most")
    ap.add_argument("--method", default="saflex", choices=("saflex", "l2rw", "none"),
                    help="refiner method (default: saflex, with per-sample weights: the audit reads them)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation split, pipeline and model (default: 0)")
    ap.add_argument("--output", default=None, help="directory for audit.md and audit.png")
    ap.add_argument("--budget", default="none",
                    help="the refiner's overhead budget: 'none' (default: the exact schedule, so that a seed repeats "
                         "the audit bit for bit), 'auto' (the library's default, whose schedule follows measured "
                         "time) or a fraction of a training step")
    args = ap.parse_args(argv)
    try:
        budget = budget_from_text(args.budget)
    except ValueError as e:   # ConfigurationError is a ValueError
        ap.error(str(e))
    for name in ("epochs", "batch_size", "img_size", "val_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("train_limit", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1 (leave it out for no limit), got {getattr(args, name)}")
    if not args.lr > 0:
        ap.error(f"--lr must be positive, got {args.lr}")
    torch.manual_seed(args.seed)

    images, labels = load_digits_hwc()
    pool, test = stratified_split(labels, 0.2, seed=0)
    tr, va = stratified_split(labels[pool], args.val_size, seed=args.seed)
    train_idx, val_idx = pool[tr], pool[va]
    if args.train_limit:
        train_idx = train_idx[: args.train_limit]
    clean = build_pipeline(args.img_size, augment=False)
    to_tensor = lambda idx: torch.stack([clean(image=images[i])["image"] for i in idx])  # noqa: E731
    x_val, y_val = to_tensor(val_idx), torch.from_numpy(labels[val_idx])
    x_test, y_test = to_tensor(test), torch.from_numpy(labels[test])

    train_set = AlbumentationsDataset(images[train_idx], labels[train_idx], build_pipeline(args.img_size, seed=args.seed),
                                      clean_pipeline=clean)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed),
                                         worker_init_fn=albumentations_worker_init)   # for num_workers > 0
    model = SmallCNN(1, 10, img_size=args.img_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = min(len(loader), args.max_steps or len(loader))
    total = args.epochs * steps
    # cosine decay in closed form (as transformers' get_cosine_schedule_with_warmup builds it); torch's
    # CosineAnnealingLR updates recursively, so its rates drift from the formula in the last bits
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_val, y_val), batch_size=100)
    # the audit attributes per-sample weights to transforms: SAflex weighs each view (the default
    # weighs the views as a whole, by their learned share, and every weight would read 1)
    method = SAflex(weighting="soft") if args.method == "saflex" else args.method
    refiner = AugmentationRefiner(model, opt, val_loader, method=method, seed=args.seed,
                                  schedule={"budget": budget})
    audit = AugmentationAudit([str(c) for c in range(10)], ignore=IGNORE)

    for epoch in range(args.epochs):
        for step, (x_aug, y, names, x_clean) in enumerate(loader):
            if step >= steps:
                break
            b = y.shape[0]
            x, targets = torch.cat([x_clean, x_aug]), torch.cat([y, y])
            loss = refiner(model(x), targets, num_original=b)           # originals first, then their views
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            audit.update(refiner.stats, list(names), targets)          # one name entry per augmented row
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {100 * evaluate(model, x_test, y_test):.2f} %", flush=True)

    print(audit.table(format="markdown", sort="weight_mean"))
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "audit.md"), "w") as f:
            f.write(audit.table(format="markdown", sort="weight_mean") + "\n" + audit.table("class", format="markdown"))
        if audit.updates:
            audit.plot(os.path.join(args.output, "audit.png"), title=f"albumentations on digits, {args.method}")
    return {"audit": audit, "refiner": refiner, "model": model, "test_acc": evaluate(model, x_test, y_test)}


def cli() -> None:
    """Console script ``augplug-albumentations-example``: :func:`main` without its return value."""
    main()


if __name__ == "__main__":
    cli()
