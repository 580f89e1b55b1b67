"""The demo's data: scikit-learn's digits with a label-breaking RandAugment view bank."""
from __future__ import annotations

import numpy as np
import torch

from .._extras import require
from ..data import stratified_split
from .study import StudyData, corrupt_views, make_view_bank

__all__ = ["load_digits_study"]


def load_digits_study(seed: int = 0, noise: float = 0.3, views: int = 4, aa: str = "rand-m15-n3-mstd0.5",
                      n_val: int = 300, n_test: int = 500, noise_kind: str = "pairflip") -> StudyData:
    """Digits split into train / val / test with a RandAugment view bank and corrupted view labels."""
    from timm.data.auto_augment import rand_augment_transform

    d = require("sklearn.datasets", "demo", "the demo's digits data").load_digits()
    images = torch.from_numpy(np.round(d.images / 16.0 * 255).astype(np.uint8))
    labels = torch.from_numpy(d.target.astype(np.int64))
    rest, test_idx = stratified_split(labels.numpy(), n_test, seed=seed)
    tr, va = stratified_split(labels.numpy()[rest], n_val, seed=seed + 1)
    train_idx, val_idx = rest[tr], rest[va]
    mean, std = float(images.float().mean() / 255), float(images.float().std() / 255)
    tf = rand_augment_transform(aa, {"img_mean": (int(255 * mean),)})
    bank = make_view_bank(images[train_idx], tf, views, seed=seed)
    norm = lambda u8: ((u8.float() / 255 - mean) / std).unsqueeze(-3)  # noqa: E731
    view_labels, noisy = corrupt_views(labels[train_idx], views, noise, 10, seed=seed, kind=noise_kind)
    return StudyData(norm(images[train_idx]), labels[train_idx], norm(images[val_idx]), labels[val_idx],
                     norm(images[test_idx]), labels[test_idx], norm(bank), view_labels, 10,
                     extra={"noisy": noisy})
