import gzip
import struct

import numpy as np
import pytest
import torch

from benchmarks import datasets as ds


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 50)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("AUGPLUG_FMNIST_DIR", str(tmp_path))
    return tmp_path


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    out = ds.read_idx(tmp_path / "x.gz")
    assert out.dtype == np.uint8 and np.array_equal(out, arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="IDX"):
        ds.read_idx(tmp_path / "bad")


def test_load_fashion_mnist_from_env_dir(fake_fmnist):
    x, y = ds.load_fashion_mnist("train")
    assert x.shape == (200, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y[:3].tolist() == [0, 1, 2]
    x, y = ds.load_fashion_mnist("test")
    assert x.shape == (50, 28, 28)
    with pytest.raises(ValueError, match="split"):
        ds.load_fashion_mnist("val")


def test_fashion_mnist_splits_disjoint_stratified(fake_fmnist):
    s = ds.fashion_mnist_splits(n_train=100, n_val=50, seed=1)
    assert s["train"][0].shape == (100, 28, 28) and s["val"][0].shape == (50, 28, 28)
    assert torch.bincount(s["val"][1]).tolist() == [5] * 10
    assert torch.bincount(s["train"][1]).tolist() == [10] * 10
    # Disjoint: no training image equals a validation image (random images are unique).
    tr = {bytes(im.numpy()) for im in s["train"][0]}
    assert not any(bytes(im.numpy()) in tr for im in s["val"][0])
    with pytest.raises(ValueError):
        ds.fashion_mnist_splits(n_train=190, n_val=20)


def test_missing_files_say_make_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("AUGPLUG_FMNIST_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("AUGPLUG_UCI_ROOT", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="make datasets"):
        ds.load_fashion_mnist()
    with pytest.raises(FileNotFoundError, match="make datasets"):
        ds.load_uci("letter")
    with pytest.raises(ValueError, match="unknown"):
        ds.load_uci("iris")


def test_load_digits_images():
    x, y = ds.load_digits_images()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))




@pytest.mark.skipif(not (ds.fmnist_dir() / "train-labels-idx1-ubyte.gz").is_file(), reason="run `make datasets`")
def test_real_fashion_mnist_labels():
    _, y = ds.load_fashion_mnist("train")
    assert y.numel() == 60000
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


@pytest.mark.parametrize("name,shape,classes", [("letter", (20000, 16), 26), ("spambase", (4601, 57), 2),
                                                   ("satellite", (6435, 36), 6), ("vehicle", (846, 18), 4),
                                                   ("dna", (3186, 180), 3), ("vowel", (990, 9), 11),
                                                   ("musk", (476, 166), 2), ("pima", (768, 8), 2)])
def test_real_uci(name, shape, classes):
    try:
        X, y, feats, names = ds.load_uci(name)
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(str(exc))
    assert X.shape == shape and X.dtype == np.float32
    assert y.dtype == np.int64 and len(names) == classes and set(y.tolist()) == set(range(classes))
    assert len(feats) == shape[1]
