"""Offline image data for the integration scripts, shipped with the package (no checkout needed).

* :func:`load_digits_u8`: scikit-learn's bundled 8x8 digits as ``uint8`` images (``pip install
  "augplug[demo]"`` for scikit-learn).
* :func:`load_fashion_mnist`: the official Fashion-MNIST IDX files from a local folder
  (``$AUGPLUG_FMNIST_DIR``, else the Debian package ``dataset-fashion-mnist``'s
  ``/usr/share/datasets/fashion-mnist``); nothing is downloaded.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Tuple

import numpy as np

from .._extras import require

__all__ = ["FMNIST_CLASSES", "FMNIST_MEAN", "FMNIST_STD", "fmnist_dir", "read_idx_u8", "load_fashion_mnist",
           "load_digits_u8"]

#: Per-pixel mean and standard deviation of the Fashion-MNIST training images (scaled to [0, 1]).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fmnist_dir() -> Path:
    """``$AUGPLUG_FMNIST_DIR``, else ``/usr/share/datasets/fashion-mnist`` (Debian's dataset-fashion-mnist)."""
    return Path(os.environ.get("AUGPLUG_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def read_idx_u8(path: os.PathLike) -> np.ndarray:
    """An IDX file of unsigned bytes (type code ``0x08``; gzip-compressed when it ends in ``.gz``)."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    count = int(np.prod(dims)) if dims else 1
    if len(data) != 4 + 4 * ndim + count:
        raise ValueError(f"{path}: expected {4 + 4 * ndim + count} bytes for shape {dims}, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fashion_mnist(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of the ``"train"`` or ``"test"`` split.

    Raises ``FileNotFoundError`` (saying where it looked) when the files are not there."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = fmnist_dir()
    paths = [root / name for name in _FMNIST_FILES[split]]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p.name} not found at {p}. Put the official IDX files there or point "
                f"$AUGPLUG_FMNIST_DIR at them (Debian: apt install dataset-fashion-mnist; in a checkout: "
                f"make datasets)")
    images, labels = (read_idx_u8(p) for p in paths)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{root}: {images.shape} images and {labels.shape} labels do not match")
    return images, labels.astype(np.int64)


def load_digits_u8(feature: str = "the digits data") -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: ``(images uint8 (1797, 8, 8) in 0..255, labels int64)``."""
    d = require("sklearn.datasets", "demo", feature).load_digits()
    images = np.clip(np.round(d.images * (255 / 16)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)
