"""Dataset utilities: a stratified split and a dataset wrapper that reports each sample's position.

The refinement methods in augplug keep per-sample state (weights, soft
labels) that is looked up by dataset position, so the training loader must
yield the index of every sample. :class:`IndexedDataset` does that for any
map-style dataset. :func:`stratified_split` holds out a small clean
validation set that keeps each class's share. (The benchmarks' label noise and
class imbalance live in ``benchmarks/corrupt.py``.)

Labels are a 1-D sequence of non-negative integer class ids (a list, a NumPy
array or a torch tensor); splits are deterministic for a given ``seed``.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "stratified_split",
    "IndexedDataset",
    "seed_albumentations",
    "albumentations_worker_init",
]

ArrayLike = Union[Sequence[int], np.ndarray, torch.Tensor]


def _as_label_array(labels: ArrayLike, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D int64 NumPy array of non-negative class ids."""
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative class ids, found {int(arr.min())}")
    return arr


def _largest_remainder(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split the integer ``total`` in proportion to ``weights`` (sum preserved).

    Each part gets the floor of its exact quota; the units left over go to the
    parts with the largest fractional remainders, ties broken at random.
    """
    quotas = total * weights / weights.sum()
    alloc = np.floor(quotas).astype(np.int64)
    left = int(total - alloc.sum())
    if left > 0:
        remainders = quotas - alloc
        # Random tie-breaking: sort by remainder, then by a random key.
        order = np.lexsort((rng.random(len(weights)), -remainders))
        alloc[order[:left]] += 1
    return alloc


def stratified_split(
    labels: ArrayLike,
    val_size: Union[int, float],
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Split sample positions into a training part and a stratified validation part.

    Args:
        labels: 1-D class ids, one per sample.
        val_size: the size of the validation part, either as a count
            (``int``, ``1 <= val_size < N``) or as a fraction of the samples
            (``float`` in ``(0, 1)``; the count is ``round(val_size * N)``).
        seed: seed of the random generator; equal seeds give equal splits.

    Returns:
        ``(train_idx, val_idx)``: two disjoint, sorted ``int64`` arrays that
        together cover ``range(N)``. Each class contributes to the validation
        part in proportion to its frequency: class ``c`` gets
        ``val_count * n_c / N`` samples, rounded by the largest-remainder
        method so that the total is exact.

    Raises:
        ValueError: if ``labels`` is not a 1-D array of non-negative integers,
            or ``val_size`` is not a valid count or fraction.
    """
    y = _as_label_array(labels)
    n = int(y.size)
    if n < 2:
        raise ValueError(f"stratified_split needs at least 2 samples, got {n}")
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, numbers.Integral):
        n_val = int(val_size)
        if not 1 <= n_val < n:
            raise ValueError(
                f"val_size={n_val} is out of range: as a count it must satisfy 1 <= val_size < {n} "
                f"(the number of samples)"
            )
    else:
        frac = float(val_size)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"val_size={val_size!r} is out of range: as a fraction it must lie in (0, 1)")
        n_val = int(round(frac * n))
        if not 1 <= n_val < n:
            raise ValueError(
                f"val_size={val_size!r} of {n} samples gives {n_val} validation samples; "
                f"need between 1 and {n - 1}"
            )

    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    per_class = _largest_remainder(n_val, counts.astype(np.float64), rng)

    val_parts = []
    for cls, k in zip(classes, per_class):
        if k == 0:
            continue
        members = np.flatnonzero(y == cls)
        val_parts.append(rng.choice(members, size=int(k), replace=False))
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    train_idx = np.flatnonzero(mask).astype(np.int64)
    return train_idx, val_idx


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that each item also carries its position.

    ``IndexedDataset(ds)[i]`` returns ``(*ds[i], i)`` when ``ds[i]`` is a tuple
    or list, a copy of the dict with an extra ``"index"`` key when it is a
    dict, and ``(ds[i], i)`` otherwise. The default collate function then
    yields the batch's indices as the last element (or under ``"index"``).
    Negative positions are normalized (``ds[-1]`` reports ``len(ds) - 1``), so
    every reported position lies in ``[0, len(ds))`` and identifies one sample.

    Positions of a :class:`torch.utils.data.ConcatDataset` are already global,
    so it can be wrapped like any other dataset. Wrapping the parts separately
    and concatenating the wrappers would restart the positions at 0 in every
    part (two samples would share a row of per-sample state), so a
    ``ConcatDataset`` of ``IndexedDataset`` parts, and an ``IndexedDataset`` of
    an ``IndexedDataset``, are rejected with a
    :class:`~augplug.errors.ConfigurationError`.
    """

    def __init__(self, dataset: Any):
        from torch.utils.data import ConcatDataset

        from .errors import ConfigurationError

        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"IndexedDataset needs a map-style dataset with __getitem__ and __len__, "
                f"got {type(dataset).__name__}"
            )
        if isinstance(dataset, IndexedDataset):
            raise ConfigurationError("the dataset is already an IndexedDataset",
                                     "wrap the underlying dataset once")
        if isinstance(dataset, ConcatDataset) and any(isinstance(d, IndexedDataset) for d in dataset.datasets):
            raise ConfigurationError(
                "a ConcatDataset of IndexedDataset parts: each part's positions restart at 0, so samples "
                "of different parts would report the same position",
                "concatenate the plain datasets first and wrap the concatenation: "
                "IndexedDataset(ConcatDataset([a, b]))")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        n = len(self.dataset)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"position {index} is out of range for a dataset of {n} samples")
        if index < 0:
            index += n
        item = self.dataset[index]
        if isinstance(item, dict):
            if "index" in item:
                raise KeyError("the wrapped dataset already returns an 'index' key")
            out = dict(item)
            out["index"] = index
            return out
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return (item, index)

    @staticmethod
    def check_unique(indices: ArrayLike) -> None:
        """Raise ``ValueError`` if a batch of sample indices contains duplicates.

        Per-sample state is updated by index, so a batch that holds a sample
        twice (for example from a sampler that draws with replacement) would
        apply two updates to one entry. Call this on the index batch where
        that matters.
        """
        if isinstance(indices, torch.Tensor):
            arr = indices.detach().cpu().reshape(-1).numpy()
        else:
            arr = np.asarray(indices).reshape(-1)
        values, counts = np.unique(arr, return_counts=True)
        dup = values[counts > 1]
        if dup.size:
            shown = ", ".join(str(int(v)) for v in dup[:10])
            more = f" (and {dup.size - 10} more)" if dup.size > 10 else ""
            raise ValueError(
                f"batch of sample indices contains duplicates: {shown}{more}; "
                "per-sample updates need each sample at most once per batch "
                "(use a sampler without replacement)"
            )


def _leaf_transforms(pipeline):
    """The transforms of an albumentations pipeline, nested compositions (``OneOf``, ``SomeOf``, ...)
    included, each once: the composition first, then its members."""
    out = []
    for t in getattr(pipeline, "transforms", []) or []:
        out.append(t)
        if getattr(t, "transforms", None):
            out.extend(_leaf_transforms(t))
    return out


def seed_albumentations(pipeline, seed: int) -> None:
    """Give every transform of an albumentations pipeline its own random stream, derived from ``seed``.

    ``A.Compose(..., seed=s)`` (and ``Compose.set_random_seed``) in albumentations 2.0.8 seeds every
    transform with the same value, so transforms that draw alike fire together: with
    ``HorizontalFlip(p=0.5)`` and ``VerticalFlip(p=0.25)`` every vertical flip is also a horizontal
    one, and an audit cannot tell the two apart. Here each transform gets a seed of its own
    (``numpy.random.SeedSequence(seed)``), so they fire independently and a run repeats under a seed.
    In a ``DataLoader`` with workers, pass ``worker_init_fn=albumentations_worker_init``."""
    transforms = _leaf_transforms(pipeline)
    if not transforms or not all(callable(getattr(t, "set_random_seed", None)) for t in transforms):
        raise TypeError("seed_albumentations takes an albumentations Compose (its transforms have set_random_seed)")
    states = np.random.SeedSequence(int(seed) % 2**63).generate_state(len(transforms) + 1)
    pipeline.set_random_seed(int(states[0]))   # the composition's own draws (e.g. its shuffles)
    for t, s in zip(transforms, states[1:]):
        t.set_random_seed(int(s))


def albumentations_worker_init(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: reseed the albumentations pipeline of the worker's dataset
    (its ``pipeline`` attribute) from the worker's torch seed, which differs between workers and
    epochs and follows the loader's ``generator=`` (:func:`seed_albumentations`). Without it every
    worker, and every epoch, repeats the pipeline's draws."""
    info = torch.utils.data.get_worker_info()
    pipeline = getattr(info.dataset, "pipeline", None) if info is not None else None
    if pipeline is None:
        raise TypeError("albumentations_worker_init needs a dataset with a 'pipeline' attribute (the Compose)")
    seed_albumentations(pipeline, info.seed)
