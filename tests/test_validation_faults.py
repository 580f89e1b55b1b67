"""Faults of the validation loader itself: a read that fails again while a call is rolled back, a
loader whose later passes are empty, empty batches, a ``len()`` that over-reports, a scored
parameter set that changes under a validation window, and arguments that are not loaders.

Each rejected call leaves the model, the optimizer and every piece of ``refiner.state_dict()``
(compared with ``torch.equal``) as they were; a retried run equals a twin that never failed."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import augplug
from augplug import AugmentationRefiner, Schedule
from augplug.errors import AugplugError, ConfigurationError, EmptyValidationError, ShapeError
from augplug.rng import PrivateRNG
from augplug.validation import ValidationStream

C, D, B = 4, 6, 8
_G = torch.Generator().manual_seed(1)
X, Y = torch.randn(24, D, generator=_G), torch.randint(0, C, (24,), generator=_G)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 10), nn.ReLU())
        self.fc = nn.Linear(10, C)

    def forward(self, x):
        return self.fc(self.body(x))


def _rig(loader, **schedule):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule.setdefault("budget", None)
    schedule.setdefault("refresh_every", 1)
    return model, opt, AugmentationRefiner(model, opt, loader, schedule=Schedule(**schedule))


def _batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


def _step(model, opt, r, i):
    x, y = _batch(i)
    loss = r(model(x), y, num_original=B // 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


def _everything(model, opt, r):
    return copy.deepcopy((model.state_dict(), opt.state_dict(), r.state_dict()))


def _rejected(model, opt, r, i, error):
    """Call the refiner on step ``i``'s batch, expect ``error``, check nothing changed; the error."""
    before = _everything(model, opt, r)
    with pytest.raises(error) as info:
        _step(model, opt, r, i)
    assert _same(before, _everything(model, opt, r))
    return info.value


# ------------------------------------------------------------ B1: a rollback that reads nothing
class _Flaky(Dataset):
    """24 validation files; ``fail[i] = n`` makes the next ``n`` reads of file ``i`` fail."""

    def __init__(self):
        self.fail, self.reads = {}, 0

    def __len__(self):
        return 24

    def __getitem__(self, i):
        self.reads += 1
        if self.fail.get(i, 0) > 0:
            self.fail[i] -= 1
            raise OSError(f"[Errno 5] Input/output error: 'val/{i}.png'")
        return X[i], Y[i]


_FLAKY_SCHEDULES = {   # (schedule, calls that read the first pass whole)
    "exact": (dict(val_batches=1, fresh_batches=None), 3),   # a batch per refresh
    "window": (dict(), 1),   # the default window: the first refresh fills it with the pass
}


@pytest.mark.parametrize("schedule", list(_FLAKY_SCHEDULES), ids=list(_FLAKY_SCHEDULES))
def test_a_read_error_on_a_new_pass_is_rolled_back_without_reading_and_the_retry_equals_a_twin(schedule):
    warnings.simplefilter("ignore")
    ds, twin_ds = _Flaky(), _Flaky()
    options, prime = _FLAKY_SCHEDULES[schedule]
    model, opt, r = _rig(DataLoader(ds, batch_size=8), **options)
    twin = _rig(DataLoader(twin_ds, batch_size=8), **options)
    for i in range(prime):   # the first pass is read whole
        _step(model, opt, r, i)
        _step(*twin, i)
    ds.fail[2] = 2   # file 2, in the next pass's first batch, fails twice
    reads = ds.reads
    error = _rejected(model, opt, r, 3, OSError)
    assert error.__context__ is None   # the call's own error, not one raised while rolling back
    assert ds.reads - reads == 3        # files 0, 1, 2 of the failed read; the rollback read nothing
    _rejected(model, opt, r, 3, OSError)   # the second failure, met where the retry re-opens the pass
    got = [_step(model, opt, r, i) for i in range(3, 7)]
    want = [_step(*twin, i) for i in range(3, 7)]
    assert got == want
    assert _same(_everything(model, opt, r)[2], _everything(*twin)[2])


def test_a_restored_stream_reopens_its_pass_at_the_next_read():
    opened = []

    class Loader:
        def __len__(self):
            return 3

        def __iter__(self):
            opened.append(1)
            return iter([(X[i:i + 8], Y[i:i + 8]) for i in range(0, 24, 8)])

    stream = ValidationStream(Loader(), PrivateRNG(0))
    stream.next()
    state = copy.deepcopy(stream.state_dict())
    expected = [stream.next()[0] for _ in range(4)]
    stream.restore(state)
    assert len(opened) == 2 and _same(stream.state_dict(), state)   # nothing read, the position put back
    assert all(torch.equal(a, stream.next()[0]) for a in expected)


# ------------------------------------------------------------ B2: a loader whose later passes are empty
class _OneShot(IterableDataset):
    """The common mistake: ``__iter__`` returns one generator built once, so a second pass is empty."""

    def __init__(self):
        self.gen = ((X[i], Y[i]) for i in range(24))

    def __iter__(self):
        return self.gen


@pytest.mark.parametrize("schedule", [dict(val_batches=3, fresh_batches=None), dict(val_batches=2)],
                         ids=["exact", "window"])
def test_a_loader_whose_later_pass_is_empty_is_named_and_nothing_changes(schedule):
    warnings.simplefilter("ignore")
    model, opt, r = _rig(DataLoader(_OneShot(), batch_size=8), **schedule)
    i, error = 0, None
    while error is None:
        before = _everything(model, opt, r)
        try:
            _step(model, opt, r, i)
            i += 1
            assert i < 4
        except EmptyValidationError as e:
            error = e
    assert _same(before, _everything(model, opt, r))
    assert "later pass" in error.problem and "__iter__" in error.fix and error.__context__ is None
    again = _rejected(model, opt, r, i, EmptyValidationError)   # every retry: the same diagnosis
    assert "__iter__" in again.fix


# ------------------------------------------------------------ B3: a validation batch with no rows
def _with_empty(empty_at):
    batches = [(X[k:k + 8], Y[k:k + 8]) for k in range(0, 24, 8)]
    if empty_at is not None:
        batches.insert(empty_at, (X[:0], Y[:0]))
    return batches


_EMPTY_SCHEDULES = {
    "exact": dict(val_batches=1, fresh_batches=None),
    "exact-all": dict(fresh_batches=None),
    "window": dict(val_batches=2, fresh_batches=1),
    "window-all": dict(fresh_batches=1),
    "cached": dict(val_batches=1, cache_validation=True, fresh_batches=None),
    "cached-all": dict(cache_validation=True),
}


@pytest.mark.parametrize("schedule", list(_EMPTY_SCHEDULES), ids=list(_EMPTY_SCHEDULES))
def test_an_empty_validation_batch_is_skipped_and_counted_like_a_bad_one(schedule):
    model, opt, r = _rig(_with_empty(1), **_EMPTY_SCHEDULES[schedule])
    twin = _rig(_with_empty(None), **_EMPTY_SCHEDULES[schedule])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [_step(model, opt, r, i) for i in range(6)]
    assert got == [_step(*twin, i) for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin[0].parameters()))
    assert r.skipped_val_batches >= 1 and twin[2].skipped_val_batches == 0
    assert any("empty" in str(w.message) for w in caught)


@pytest.mark.parametrize("schedule", ["exact", "window", "cached"])
def test_an_empty_validation_batch_under_raise_is_an_error_naming_it(schedule):
    model, opt, r = _rig(_with_empty(0), bad_val_batch="raise", **_EMPTY_SCHEDULES[schedule])
    error = _rejected(model, opt, r, 0, EmptyValidationError)
    assert "no samples" in error.problem and "bad_val_batch='skip'" in error.fix


# ------------------------------------------------------------ B6: a len() that over-reports
class _Claims(IterableDataset):
    """20 samples that claim to be 32 (WebDataset's ``with_length`` with an estimate): len 4, 3 batches."""

    def __len__(self):
        return 32

    def __iter__(self):
        return ((X[i], Y[i]) for i in range(20))


@pytest.mark.parametrize("fresh", [None, 1], ids=["exact", "window"])
@pytest.mark.parametrize("cache", [False, True], ids=["stream", "cached"])
def test_all_reads_one_pass_where_len_over_reports(fresh, cache):
    model, opt, r = _rig(DataLoader(_Claims(), batch_size=8), fresh_batches=fresh, cache_validation=cache)
    for i in range(3):
        with torch.no_grad():
            full = F.cross_entropy(model(X[:20]), Y[:20]).item()   # the whole set, each sample once
        _step(model, opt, r, i)
        if i == 0 or fresh is None:   # (a window's later refreshes keep its older batches' features)
            assert r.val_loss == pytest.approx(full, rel=1e-5)
    assert r.skipped_val_batches == 0
    resumed = _rig(DataLoader(_Claims(), batch_size=8), fresh_batches=fresh, cache_validation=cache)[2]
    resumed.load_state_dict(r.state_dict())   # a window of the pass's 3 batches, not len()'s 4


# ------------------------------------------------------------ A5: scored parameters change under a window
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.fc = nn.Linear(16, C)

    def forward(self, x):
        return self.fc(self.body(x))


def _exact_direction(model):
    copy_ = copy.deepcopy(model)
    r = AugmentationRefiner(copy_, torch.optim.SGD(copy_.parameters(), lr=0.1),
                            DataLoader(TensorDataset(X, Y), batch_size=8), mode="full",
                            schedule=Schedule(budget=None, fresh_batches=None))
    return r.compute_validation_direction(C).direction()


@pytest.mark.parametrize("start_frozen", [True, False], ids=["unfrozen-mid-run", "frozen-mid-run"])
def test_a_window_over_other_parameters_is_read_again_whole(start_frozen):
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = _Net()
    model.body.requires_grad_(not start_frozen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)   # the optimizer holds every parameter
    r = AugmentationRefiner(model, opt, DataLoader(TensorDataset(X, Y), batch_size=8), mode="full",
                            schedule=Schedule(budget=None, refresh_every=1, fresh_batches=1))
    for i in range(6):
        if i == 3:
            model.body.requires_grad_(start_frozen)
            exact = _exact_direction(model)
        _step(model, opt, r, i)
        if i == 3:
            names = set(r.score_params())
            assert set(r.validation_direction) == names == set(exact)
            assert ("body.0.weight" in names) == start_frozen
            for k in names:
                torch.testing.assert_close(r.validation_direction[k], exact[k], rtol=1e-5, atol=1e-6)
    assert all(set(e.sums) == set(r.score_params()) for e in r._window[0].values())


# ------------------------------------------------------------ arguments that are not loaders
def test_a_validation_loader_that_cannot_be_iterated_is_named():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for loader in (5, "val/"):
        with pytest.raises(ConfigurationError) as info:
            AugmentationRefiner(model, opt, loader)
        assert "len()" not in info.value.problem and "val_loader" in info.value.fix
    problems = augplug.validate(model, opt, 5)
    assert [type(p) for p in problems] == [ConfigurationError] and "cannot be iterated" in problems[0].problem


def test_validate_names_logits_that_are_not_a_tensor_and_lets_a_loaders_io_error_through():
    model = MLP()
    problems = augplug.validate(model, None, [(X[:8], Y[:8])], logits=[[0.1] * C] * 8, targets=Y[:8])
    assert [type(p) for p in problems] == [ShapeError] and "list" in problems[0].problem
    assert all(isinstance(p, AugplugError) for p in problems)

    class Broken:
        def __iter__(self):
            raise OSError("EIO")

    with pytest.raises(OSError, match="EIO"):   # the user's own I/O error, unchanged
        augplug.validate(model, None, Broken())
