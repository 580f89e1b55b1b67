"""Corrupted training sets for the benchmarks: synthetic label noise and class imbalance.

:func:`add_label_noise` corrupts a share of the labels (symmetric or uniform noise);
:func:`make_imbalanced` subsamples some classes into a long tail. Both take labels as a 1-D
sequence of non-negative integer class ids and are deterministic for a given ``seed``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

# the library's label check, so that these helpers accept and reject exactly what stratified_split does
from augplug.data import ArrayLike, _as_label_array

__all__ = ["add_label_noise", "make_imbalanced"]


def add_label_noise(
    labels: ArrayLike,
    rate: float,
    num_classes: int,
    seed: int = 0,
    mode: str = "symmetric",
):
    """Corrupt a fraction of the labels at random.

    Args:
        labels: 1-D class ids in ``[0, num_classes)``; a NumPy array, a torch
            tensor or a plain sequence.
        rate: noise rate in ``[0, 1]``.
        num_classes: number of classes ``C``.
        seed: seed of the random generator.
        mode: ``"symmetric"``: exactly ``round(rate * N)`` positions, chosen
            without replacement, get a label drawn uniformly from the
            ``C - 1`` *other* classes, so every chosen label really changes.
            ``"uniform"``: the same number of positions get a label drawn
            uniformly from all ``C`` classes, which may equal the original one
            (the convention of AutoDO and several earlier papers); the
            effective noise rate is then about ``rate * (C - 1) / C``.

    Returns:
        ``(noisy_labels, is_corrupted)``. ``noisy_labels`` has the type of the
        input (a tensor on the same device with the same dtype for a tensor, a
        NumPy array with the input's dtype otherwise); ``is_corrupted`` is a
        boolean array or tensor of the same kind that is ``True`` exactly where
        the label changed.

    Raises:
        ValueError: for an unknown ``mode``, a ``rate`` outside ``[0, 1]``, fewer
            than two classes, or labels outside ``[0, num_classes)``.
    """
    if mode not in ("symmetric", "uniform"):
        raise ValueError(f"mode must be 'symmetric' or 'uniform', got {mode!r}")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 to corrupt labels, got {num_classes}")
    y = _as_label_array(labels)
    if y.size and y.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), found {int(y.max())}; check num_classes"
        )

    n = int(y.size)
    n_corrupt = int(round(rate * n))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=n_corrupt, replace=False) if n_corrupt else np.empty(0, np.int64)
    noisy = y.copy()
    if mode == "symmetric":
        # Adding an offset in [1, C-1] modulo C is uniform over the other classes.
        offsets = rng.integers(1, num_classes, size=n_corrupt)
        noisy[chosen] = (y[chosen] + offsets) % num_classes
    else:
        noisy[chosen] = rng.integers(0, num_classes, size=n_corrupt)
    corrupted = noisy != y

    if isinstance(labels, torch.Tensor):
        out = torch.as_tensor(noisy, device=labels.device).to(labels.dtype)
        return out, torch.as_tensor(corrupted, device=labels.device)
    src_dtype = np.asarray(labels).dtype if isinstance(labels, np.ndarray) else np.int64
    return noisy.astype(src_dtype, copy=False), corrupted


def make_imbalanced(
    labels: ArrayLike,
    ratio: float,
    minority_classes: Optional[Iterable[int]] = None,
    seed: int = 0,
) -> np.ndarray:
    """Select a class-imbalanced subset of the samples.

    Every sample of the majority classes is kept. Each minority class is
    subsampled (at random, without replacement) to
    ``max(1, round(m / ratio))`` samples, where ``m`` is the mean count of the
    majority classes; a minority class that already has fewer samples keeps
    all of them.

    Args:
        labels: 1-D class ids.
        ratio: imbalance ratio, at least 1 (``1`` keeps everything up to the
            majority mean).
        minority_classes: the class ids to subsample. By default the upper
            half of the classes, ``c >= C // 2`` with ``C = max(labels) + 1``.
        seed: seed of the random generator.

    Returns:
        Sorted ``int64`` NumPy array of the kept sample positions.

    Raises:
        ValueError: if ``ratio < 1``, if no majority class with samples
            remains, or if a minority class id is negative.
    """
    y = _as_label_array(labels)
    ratio = float(ratio)
    if not ratio >= 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if y.size == 0:
        return np.empty(0, dtype=np.int64)
    num_classes = int(y.max()) + 1
    if minority_classes is None:
        minority = set(range(num_classes // 2, num_classes))
    else:
        minority = {int(c) for c in minority_classes}
        if any(c < 0 for c in minority):
            raise ValueError(f"minority_classes must be non-negative class ids, got {sorted(minority)}")

    counts = np.bincount(y, minlength=num_classes)
    majority = [c for c in range(num_classes) if c not in minority and counts[c] > 0]
    if not majority:
        raise ValueError(
            "make_imbalanced needs at least one majority class with samples; "
            f"minority_classes={sorted(minority)} covers every class present"
        )
    target = max(1, int(round(float(counts[majority].mean()) / ratio)))

    rng = np.random.default_rng(seed)
    keep = [np.flatnonzero(~np.isin(y, list(minority)))]
    for cls in sorted(minority):
        members = np.flatnonzero(y == cls)
        if members.size > target:
            members = rng.choice(members, size=target, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)).astype(np.int64)
