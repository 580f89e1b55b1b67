"""ContrastiveRefiner(cache_validation=True): the validation loader is read once, each batch is
prepared (moved to the device, labels converted to soft targets or pair rows checked) once, and the
kept batches are cycled; results equal the uncached stream on the same batches, in class-prompt
and pair mode."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug.contrastive import ContrastiveRefiner
from augplug.errors import ConfigurationError, EmptyValidationError, ShapeError, TargetError
from augplug.refiner import refiner_kwargs
from conftest import CountingLoader

C, VOCAB, LEN, DIM = 4, 11, 5, 6
MODES = ("prompts", "pairs")


def _encoders(mode, seed=0):
    torch.manual_seed(seed)
    img = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, DIM))
    if mode == "prompts":
        txt = nn.Embedding(C, DIM)  # class-prompt embeddings, called with torch.arange(C)
    else:
        txt = nn.Sequential(nn.Embedding(VOCAB, 3), nn.Flatten(), nn.Linear(3 * LEN, DIM))
    return img, txt


def _data(mode, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    if mode == "prompts":
        return x, torch.randint(0, C, (n,), generator=g)
    return x, torch.randint(0, VOCAB, (n, LEN), generator=g)


def _loader(mode, shuffle=False, n=24, bs=8, labels=None):
    x, t = _data(mode, n, 1)
    if labels is not None:
        t = labels
    return CountingLoader(DataLoader(TensorDataset(x, t), batch_size=bs, shuffle=shuffle,
                                     generator=torch.Generator().manual_seed(3)))


def _build(mode, loader, cache, seed=0, **kw):
    img, txt = _encoders(mode, seed)
    opt = torch.optim.SGD(list(img.parameters()) + list(txt.parameters()), lr=0.1, momentum=0.9)
    kw.setdefault("refresh_every", 1)
    kw.setdefault("budget", None)   # cached and uncached runs compared step for step: the exact schedule
    if mode == "prompts":
        kw["class_prompts"] = torch.arange(C)
    r = ContrastiveRefiner(img, txt, opt, loader, logit_scale=1.0, seed=seed,
                           **refiner_kwargs(kw, cache_validation=cache, refiner=ContrastiveRefiner))
    img.train(); txt.train()
    return r, opt


def _train(mode, r, opt, steps, start=0):
    out = []
    for k in range(start, start + steps):
        loss = r(*_data(mode, 8, 100 + k), num_original=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((float(loss.detach()), float(r.stats["val_loss"])))
    return out


def _params(r):
    return [p.detach().clone() for p in r.model.parameters()] + [b.detach().clone() for b in r.model.buffers()]


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("val_batches", ["all", 1, 2])
def test_cached_equals_uncached_on_a_fixed_order_loader(mode, val_batches):
    runs = {}
    for cache in (False, True):
        loader = _loader(mode)
        r, opt = _build(mode, loader, cache, val_batches=val_batches)
        runs[cache] = (_train(mode, r, opt, 6), _params(r), loader.iters)
    assert runs[True][0] == runs[False][0]  # losses and validation losses, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))
    assert runs[True][2] == 1 and runs[False][2] > 1


@pytest.mark.parametrize("mode", MODES)
def test_loader_read_and_batches_prepared_once(mode):
    loader = _loader(mode)
    r, opt = _build(mode, loader, True, val_batches=2)
    calls = []
    prepare = r._prepare_val_batch
    r._prepare_val_batch = lambda *a: calls.append(1) or prepare(*a)
    _train(mode, r, opt, 5)  # 5 refreshes of 2 batches: 10 batches drawn from a 3-batch pass
    assert loader.iters == 1 and len(calls) == 3
    x, t = r._stream.next()
    assert x.device == r._device()
    if mode == "prompts":  # labels kept as checked soft targets
        assert t.dtype == torch.float32 and t.shape == (8, C) and torch.allclose(t.sum(1), torch.ones(8))
    else:
        assert t.shape == (8, LEN) and t.dtype == torch.long
    assert "cache_validation=True" in repr(r)
    assert "cache_validation=False" in repr(_build(mode, _loader(mode), False)[0])


@pytest.mark.parametrize("mode", MODES)
def test_resume_is_exact_and_rebuilds_the_cache(mode):
    r, opt = _build(mode, _loader(mode, shuffle=True), True, refresh_every=2, val_batches=1)
    _train(mode, r, opt, 3)
    saved = copy.deepcopy({"m": r.model.state_dict(), "o": opt.state_dict(), "r": r.state_dict()})
    rest = _train(mode, r, opt, 5, start=3)

    loader2 = _loader(mode, shuffle=True)
    r2, opt2 = _build(mode, loader2, True, seed=5, refresh_every=2, val_batches=1)
    r2.model.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    r2.load_state_dict(saved["r"])
    assert _train(mode, r2, opt2, 5, start=3) == rest
    assert loader2.iters == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("saved_cached", [True, False])
def test_cache_setting_must_match_the_state(mode, saved_cached):
    src, opt = _build(mode, _loader(mode), saved_cached)
    _train(mode, src, opt, 2)
    dst, opt2 = _build(mode, _loader(mode), not saved_cached, seed=1)
    _train(mode, dst, opt2, 1)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ConfigurationError, match="cache_validation"):
        dst.load_state_dict(src.state_dict())
    assert _same(before, dst.state_dict())
    _train(mode, dst, opt2, 1)  # still usable


@pytest.mark.parametrize("mode", MODES)
def test_empty_loader_with_cache(mode):
    x, t = _data(mode, 0, 0)
    empty = DataLoader(TensorDataset(x, t), batch_size=4)
    r, _ = _build(mode, empty, True)
    with pytest.raises(EmptyValidationError):
        r(*_data(mode, 8, 0))


@pytest.mark.parametrize("cache", [False, True])
def test_bad_validation_labels_same_error_state_unchanged(cache):
    r, _ = _build("prompts", _loader("prompts", labels=torch.full((24,), 7)), cache)  # out of range for C = 4
    before = copy.deepcopy(r.state_dict())
    params = [p.detach().clone() for p in r.model.parameters()]
    with pytest.raises(TargetError, match="validation targets"):
        r(*_data("prompts", 8, 0))
    assert _same(before, r.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params, r.model.parameters()))


@pytest.mark.parametrize("cache", [False, True])
def test_pair_rows_mismatch_same_error(cache):
    x, t = _data("pairs", 8, 0)
    r, _ = _build("pairs", [(x[:4], t[:3])], cache)
    before = copy.deepcopy(r.state_dict())
    with pytest.raises(ShapeError, match="4 images and 3 texts"):
        r(*_data("pairs", 8, 1))
    assert _same(before, r.state_dict())
