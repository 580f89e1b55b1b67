import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from augplug.data import IndexedDataset, stratified_split
from benchmarks.corrupt import add_label_noise, make_imbalanced

torch.set_num_threads(1)


def _labels(counts):
    return np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])


# ---------------------------------------------------------------- stratified_split


def test_split_sizes_disjoint_and_complete():
    y = _labels([100, 100, 100, 100])
    tr, va = stratified_split(y, 40, seed=0)
    assert tr.dtype == np.int64 and va.dtype == np.int64
    assert len(va) == 40 and len(tr) == 360
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(400))
    assert np.all(np.diff(va) > 0) and np.all(np.diff(tr) > 0)


def test_split_is_stratified():
    y = _labels([500, 300, 200])
    tr, va = stratified_split(y, 100, seed=3)
    assert np.bincount(y[va]).tolist() == [50, 30, 20]
    assert np.bincount(y[tr]).tolist() == [450, 270, 180]


def test_split_fraction_and_rounding_is_exact():
    y = _labels([7, 11, 13])  # 31 samples; quotas are not integers
    tr, va = stratified_split(y, 0.3, seed=1)
    assert len(va) == round(0.3 * 31)
    per_class = np.bincount(y[va], minlength=3)
    quotas = len(va) * np.array([7, 11, 13]) / 31
    assert np.all(np.abs(per_class - quotas) < 1)


def test_split_deterministic_and_seed_dependent():
    y = np.random.default_rng(0).integers(0, 5, size=1000)
    a = stratified_split(y, 0.2, seed=7)
    b = stratified_split(torch.as_tensor(y), 0.2, seed=7)
    c = stratified_split(y.tolist(), 0.2, seed=8)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("bad", [0, -1, 100, 1000, 0.0, 1.0, 1.5, -0.1, True, "10", None])
def test_split_rejects_bad_sizes(bad):
    y = _labels([50, 50])
    with pytest.raises(ValueError, match="val_size"):
        stratified_split(y, bad, seed=0)


def test_split_rejects_bad_labels():
    with pytest.raises(ValueError, match="1-D"):
        stratified_split(np.zeros((4, 2), dtype=int), 2)
    with pytest.raises(ValueError, match="non-negative"):
        stratified_split(np.array([0, -1, 1, 1]), 2)
    with pytest.raises(ValueError, match="integer"):
        stratified_split(np.array([0.5, 1.0, 0.0, 1.0]), 2)


# ---------------------------------------------------------------- add_label_noise


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 0.5, 1.0])
def test_symmetric_noise_exact_rate_always_different(rate):
    y = np.random.default_rng(1).integers(0, 10, size=1000)
    noisy, mask = add_label_noise(y, rate, 10, seed=2)
    assert isinstance(noisy, np.ndarray) and mask.dtype == bool
    assert mask.sum() == round(rate * 1000)
    assert np.array_equal(mask, noisy != y)
    assert np.all(noisy[mask] != y[mask])
    assert np.all((noisy >= 0) & (noisy < 10))


def test_symmetric_noise_covers_other_classes_uniformly():
    y = np.zeros(20000, dtype=np.int64)
    noisy, mask = add_label_noise(y, 0.9, 4, seed=0)
    counts = np.bincount(noisy[mask], minlength=4)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] / mask.sum() - 1 / 3) < 0.02)


def test_uniform_noise_may_keep_label_and_mask_marks_changes():
    y = np.random.default_rng(0).integers(0, 2, size=2000)
    noisy, mask = add_label_noise(y, 0.5, 2, seed=0, mode="uniform")
    assert np.array_equal(mask, noisy != y)
    # About half of the 1000 redrawn labels land on the original class.
    assert 400 < mask.sum() < 600


def test_noise_deterministic_and_preserves_tensor_type():
    y = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0))
    n1, m1 = add_label_noise(y, 0.2, 5, seed=4)
    n2, m2 = add_label_noise(y, 0.2, 5, seed=4)
    assert isinstance(n1, torch.Tensor) and n1.dtype == y.dtype and n1.device == y.device
    assert isinstance(m1, torch.Tensor) and m1.dtype == torch.bool
    assert torch.equal(n1, n2) and torch.equal(m1, m2)
    assert int(m1.sum()) == 60
    assert torch.equal(m1, n1 != y)
    # The input is left untouched.
    assert torch.equal(y, torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0)))


def test_noise_keeps_numpy_dtype():
    y = np.array([0, 1, 2, 3] * 10, dtype=np.int32)
    noisy, _ = add_label_noise(y, 0.5, 4, seed=0)
    assert noisy.dtype == np.int32


def test_noise_errors():
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="mode"):
        add_label_noise(y, 0.1, 3, mode="pair")
    with pytest.raises(ValueError, match="rate"):
        add_label_noise(y, 1.5, 3)
    with pytest.raises(ValueError, match="num_classes"):
        add_label_noise(y, 0.1, 1)
    with pytest.raises(ValueError, match="num_classes"):
        add_label_noise(y, 0.1, 2)


# ---------------------------------------------------------------- make_imbalanced


def test_imbalance_default_minority_is_upper_half():
    y = _labels([100, 100, 100, 100])
    idx = make_imbalanced(y, 10, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx]).tolist() == [100, 100, 10, 10]


def test_imbalance_uses_mean_majority_count_and_custom_classes():
    y = _labels([80, 120, 60, 50, 30])
    idx = make_imbalanced(y, 4, minority_classes=[0, 2, 4], seed=1)
    counts = np.bincount(y[idx], minlength=5)
    # Majority classes 1 and 3 have mean 85; 85 / 4 = 21.25 -> 21.
    assert counts.tolist() == [21, 120, 21, 50, 21]
    # All majority samples are kept.
    assert set(np.flatnonzero(np.isin(y, [1, 3]))) <= set(idx.tolist())


def test_imbalance_small_class_kept_whole_and_deterministic():
    y = _labels([100, 100, 5, 40])
    a = make_imbalanced(torch.as_tensor(y), 5, seed=3)
    b = make_imbalanced(y, 5, seed=3)
    assert np.array_equal(a, b)
    assert np.bincount(y[a]).tolist() == [100, 100, 5, 20]


def test_imbalance_errors():
    y = _labels([10, 10])
    with pytest.raises(ValueError, match="ratio"):
        make_imbalanced(y, 0.5)
    with pytest.raises(ValueError, match="majority"):
        make_imbalanced(y, 2, minority_classes=[0, 1])


# ---------------------------------------------------------------- IndexedDataset


def test_indexed_dataset_tuple_items_and_loader():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10) % 3
    ds = IndexedDataset(TensorDataset(x, y))
    assert len(ds) == 10
    xi, yi, i = ds[4]
    assert float(xi) == 4.0 and int(yi) == 1 and i == 4
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert len(batch) == 3
    assert batch[2].tolist() == [0, 1, 2, 3]


class _DictDataset:
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": torch.full((2,), float(i)), "label": i}


def test_indexed_dataset_dict_items():
    base = _DictDataset()
    ds = IndexedDataset(base)
    item = ds[2]
    assert item["index"] == 2 and item["label"] == 2
    assert "index" not in base[2]
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["index"].tolist() == [0, 1, 2]


def test_indexed_dataset_plain_items_and_concat():
    a = TensorDataset(torch.zeros(3))
    b = TensorDataset(torch.ones(2))
    ds = IndexedDataset(ConcatDataset([a, b]))
    assert len(ds) == 5
    assert [ds[i][-1] for i in range(5)] == [0, 1, 2, 3, 4]
    assert float(ds[3][0]) == 1.0
    plain = IndexedDataset([10, 20, 30])
    assert plain[1] == (20, 1)


def test_indexed_dataset_rejects_non_map_style():
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter([1, 2, 3]))


def test_check_unique():
    IndexedDataset.check_unique(torch.tensor([3, 1, 2]))
    IndexedDataset.check_unique(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="duplicates: 1, 2"):
        IndexedDataset.check_unique(torch.tensor([1, 2, 1, 2, 5]))
    with pytest.raises(ValueError, match="duplicates"):
        IndexedDataset.check_unique([7, 7])
