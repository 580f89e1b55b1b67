"""Loaders for the benchmark data sets.

All data come from local files that ``make datasets`` (``benchmarks/get_datasets.sh``)
puts in place; nothing is downloaded at run time.

* Fashion-MNIST: the gzip IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, or the
  directory in ``$AUGPLUG_FMNIST_DIR``).
* UCI Letter Recognition and Spambase: the ``.rda`` files shipped in the R
  packages mlbench and kernlab, unpacked from their Debian packages into
  ``benchmarks/data/deb/root`` (or the directory in ``$AUGPLUG_UCI_ROOT``) and
  read with the ``rdata`` package.
* scikit-learn's 8x8 digits, which ship inside scikit-learn.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

__all__ = [
    "FMNIST_MEAN",
    "FMNIST_STD",
    "FMNIST_CLASSES",
    "UCI_DATASETS",
    "fmnist_dir",
    "read_idx",
    "load_fashion_mnist",
    "fashion_mnist_splits",
    "uci_root",
    "load_uci",
    "load_digits_images",
]

#: Per-pixel mean and standard deviation of the Fashion-MNIST training images (scaled to [0, 1]).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_BENCH_DIR = Path(__file__).resolve().parent
_UCI_DEFAULT_ROOT = _BENCH_DIR / "data" / "deb" / "root"

#: name -> (R package, .rda file, object name, target column)
UCI_DATASETS: Dict[str, Tuple[str, str, str, str]] = {
    "letter": ("mlbench", "LetterRecognition.rda", "LetterRecognition", "lettr"),
    "spambase": ("kernlab", "spam.rda", "spam", "type"),
    "satellite": ("mlbench", "Satellite.rda", "Satellite", "classes"),
    "vehicle": ("mlbench", "Vehicle.rda", "Vehicle", "Class"),
    "dna": ("mlbench", "DNA.rda", "DNA", "Class"),
    "vowel": ("mlbench", "Vowel.rda", "Vowel", "Class"),
    "musk": ("kernlab", "musk.rda", "musk", "Class"),
    "pima": ("mlbench", "PimaIndiansDiabetes.rda", "PimaIndiansDiabetes", "diabetes"),
}

#: columns that are not features: Vowel's ``V1`` marks the original train / test split
_UCI_DROPPED: Dict[str, Tuple[str, ...]] = {"vowel": ("V1",)}

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _missing(what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found at {path}. Run `make datasets` (benchmarks/get_datasets.sh) "
        f"from the repository root to fetch the benchmark data sets."
    )


# ------------------------------------------------------------------ Fashion-MNIST


def fmnist_dir() -> Path:
    """Directory holding the Fashion-MNIST IDX files (``$AUGPLUG_FMNIST_DIR`` or the Debian location)."""
    return Path(os.environ.get("AUGPLUG_FMNIST_DIR", _FMNIST_DEFAULT_DIR))


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a NumPy array.

    The header is two zero bytes, a type code (``0x08`` for unsigned bytes),
    the number of dimensions, then one big-endian ``uint32`` per dimension.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    expected = offset + count * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: expected {expected} bytes for shape {dims}, found {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def load_fashion_mnist(split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """Load the official Fashion-MNIST ``"train"`` (60,000) or ``"test"`` (10,000) split.

    Returns:
        ``(images, labels)``: a ``uint8`` tensor of shape ``N x 28 x 28`` and an
        ``int64`` tensor of shape ``N``.

    Raises:
        ValueError: for an unknown split.
        FileNotFoundError: if the IDX files are missing (run ``make datasets``).
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = fmnist_dir()
    img_name, lbl_name = _FMNIST_FILES[split]
    img_path, lbl_path = root / img_name, root / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise _missing(f"Fashion-MNIST file {p.name}", p)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: unexpected image array {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_splits(
    n_train: int = 10000, n_val: int = 1000, seed: int = 0
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Build the benchmark splits of Fashion-MNIST.

    ``train`` and ``val`` are disjoint, stratified subsets of the official
    training set with ``n_train`` and ``n_val`` samples; ``test`` is the full
    official test set. The result is deterministic for a given ``seed``.

    Returns:
        ``{"train": (images, labels), "val": (images, labels), "test": (images, labels)}``
        with ``uint8`` images ``N x 28 x 28`` and ``int64`` labels.
    """
    from augplug.data import stratified_split

    images, labels = load_fashion_mnist("train")
    n = labels.numel()
    n_train, n_val = int(n_train), int(n_val)
    if n_train < 1 or n_val < 1 or n_train + n_val > n:
        raise ValueError(
            f"need 1 <= n_train, 1 <= n_val and n_train + n_val <= {n}; got n_train={n_train}, n_val={n_val}"
        )
    y = labels.numpy()
    # Split off the validation set, then draw the training subset from the rest.
    rest_idx, val_idx = stratified_split(y, n_val, seed=seed)
    if n_train == rest_idx.size:
        train_idx = rest_idx
    else:
        _, pick = stratified_split(y[rest_idx], n_train, seed=seed + 1)
        train_idx = rest_idx[pick]
    train_idx = torch.from_numpy(train_idx)
    val_idx = torch.from_numpy(val_idx)
    return {
        "train": (images[train_idx], labels[train_idx]),
        "val": (images[val_idx], labels[val_idx]),
        "test": load_fashion_mnist("test"),
    }


# ------------------------------------------------------------------ UCI (via R packages)


def uci_root() -> Path:
    """Directory the R Debian packages were unpacked into (``$AUGPLUG_UCI_ROOT`` or ``benchmarks/data/deb/root``)."""
    return Path(os.environ.get("AUGPLUG_UCI_ROOT", _UCI_DEFAULT_ROOT))


def _find_rda(package: str, filename: str) -> Path:
    root = uci_root()
    expected = root / "usr" / "lib" / "R" / "site-library" / package / "data" / filename
    if expected.is_file():
        return expected
    if root.is_dir():
        for candidate in sorted(root.rglob(filename)):
            if candidate.parent.parent.name == package:
                return candidate
    raise _missing(f"{filename} from the R package {package}", expected)


def load_uci(name: str) -> Tuple[np.ndarray, np.ndarray, List[str], List[str]]:
    """Load a UCI tabular data set: ``"letter"``, ``"spambase"``, ``"satellite"``, ``"vehicle"``,
    ``"dna"``, ``"vowel"``, ``"musk"`` or ``"pima"``.

    * ``letter``: Letter Recognition (mlbench ``LetterRecognition``), 20,000
      samples, 16 integer features, 26 classes (target ``lettr``).
    * ``spambase``: Spambase (kernlab ``spam``), 4,601 samples, 57 features,
      2 classes (target ``type``: nonspam/spam).
    * ``satellite``: Statlog Landsat Satellite (mlbench ``Satellite``), 6,435
      samples, 36 features (four spectral bands of a 3x3 pixel patch), 6 soil
      and crop classes (target ``classes``).
    * ``vehicle``: Statlog Vehicle Silhouettes (mlbench ``Vehicle``), 846
      samples, 18 shape features, 4 classes: bus, opel, saab, van (target
      ``Class``).
    * ``dna``: StatLog DNA splice junctions (mlbench ``DNA``), 3,186 samples,
      180 binary indicator features (stored as factors with levels 0 and 1),
      3 classes: exon/intron, intron/exon, neither (target ``Class``).
    * ``vowel``: Vowel Recognition, Deterding (mlbench ``Vowel``), 990 samples,
      9 speech features, 11 vowels (target ``Class``); its ``V1``, which marks
      the original train / test split, is dropped.
    * ``musk``: Musk, version 1 (kernlab ``musk``), 476 molecules, 166 shape
      features, 2 classes (target ``Class``).
    * ``pima``: Pima Indians Diabetes (mlbench ``PimaIndiansDiabetes``), 768
      samples, 8 clinical features, 2 classes (target ``diabetes``).

    Features are returned as stored (factor features as the numbers their
    levels name); no standardisation is applied.

    Returns:
        ``(X, y, feature_names, class_names)``: ``X`` is ``float32`` of shape
        ``N x D``, ``y`` is ``int64`` with values in ``range(len(class_names))``
        following the order of the R factor levels.

    Raises:
        ValueError: for an unknown name.
        FileNotFoundError: if the ``.rda`` file is missing (run ``make datasets``).
        ImportError: if the ``rdata`` package is not installed.
    """
    key = name.lower()
    if key not in UCI_DATASETS:
        raise ValueError(f"unknown UCI data set {name!r}; choose from {sorted(UCI_DATASETS)}")
    package, filename, obj, target = UCI_DATASETS[key]
    path = _find_rda(package, filename)
    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading the UCI data sets needs the 'rdata' package: pip install rdata pandas "
            "(or run `make datasets`)"
        ) from exc
    with warnings.catch_warnings():
        # The R files carry no encoding marker; rdata warns and assumes ASCII, which is right here.
        warnings.simplefilter("ignore", UserWarning)
        frame = rdata.read_rda(str(path))[obj]
    frame.columns = [str(c) for c in frame.columns]
    target_col = frame[target]
    if hasattr(target_col, "cat"):
        class_names = [str(c) for c in target_col.cat.categories]
        y = target_col.cat.codes.to_numpy().astype(np.int64)
    else:  # pragma: no cover - the shipped files use factors
        class_names = sorted({str(v) for v in target_col})
        lookup = {c: i for i, c in enumerate(class_names)}
        y = np.array([lookup[str(v)] for v in target_col], dtype=np.int64)
    if (y < 0).any():
        raise ValueError(f"{path}: missing values in the target column {target!r}")
    features = frame.drop(columns=[target, *_UCI_DROPPED.get(key, ())])
    feature_names = [str(c) for c in features.columns]
    for col in feature_names:   # factor features (DNA's indicators): the numbers their levels name
        if hasattr(features[col], "cat"):
            features[col] = features[col].astype(str).astype(np.float32)
    X = features.to_numpy(dtype=np.float32)
    return X, y, feature_names, class_names


# ------------------------------------------------------------------ scikit-learn digits


def load_digits_images() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits as images.

    Returns:
        ``(images, labels)``: a ``float32`` tensor of shape ``1797 x 1 x 8 x 8``
        scaled to ``[0, 1]`` (pixel values 0..16 divided by 16) and ``int64``
        labels in ``0..9``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels
