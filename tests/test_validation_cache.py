"""cache_validation=True: the validation loader is read once, its batches are kept (on the model's
device, targets converted) and cycled; results equal the uncached stream on the same batches."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.errors import ConfigurationError, EmptyValidationError, TargetError
from augplug.models import SmallCNN
from augplug.refiner import refiner_kwargs
from conftest import CountingLoader

C = 4


def _loader(shuffle=False, n=24, bs=8, labels=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, C, (n,), generator=g) if labels is None else labels
    return CountingLoader(DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle,
                                     generator=torch.Generator().manual_seed(1)))


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, C, img_size=8, width=4, hidden=8)


def _train(model, refiner, opt, steps, start=0):
    out = []
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, C, (8,), generator=g)
        loss = refiner(model(x), y, num_original=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((float(loss.detach()), float(refiner.stats["val_loss"])))
    return out


def _run(cache, steps=8, mode="last_layer", **kw):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = kw.pop("loader", None) or _loader()
    r = AugmentationRefiner(model, opt, loader, mode=mode, **refiner_kwargs(kw, refresh_every=2, cache_validation=cache, budget=None))
    return _train(model, r, opt, steps), loader, r


@pytest.mark.parametrize("mode", ["last_layer", "full"])
@pytest.mark.parametrize("val_batches", ["all", 1, 2])
def test_cached_equals_uncached_on_a_fixed_order_loader(mode, val_batches):
    plain, plain_loader, _ = _run(False, mode=mode, val_batches=val_batches)
    cached, cached_loader, r = _run(True, mode=mode, val_batches=val_batches)
    assert cached == plain  # bitwise: the same batches in the same order
    assert cached_loader.iters == 1 and plain_loader.iters >= 1


def test_cached_batches_live_on_the_device_with_soft_targets():
    _, _, r = _run(True, steps=1)
    x, y = r._stream.next()
    assert x.device == next(r.model.parameters()).device
    assert y.dtype == torch.float32 and y.shape == (8, C) and torch.allclose(y.sum(1), torch.ones(8))


def test_shuffled_loader_first_pass_is_the_uncached_first_pass_and_then_repeats():
    # val_batches=1, refresh every 2 steps: the first 3 refreshes read the 3 batches of pass one
    plain, _, _ = _run(False, steps=6, val_batches=1, loader=_loader(shuffle=True))
    cached, loader, _ = _run(True, steps=6, val_batches=1, loader=_loader(shuffle=True))
    assert cached == plain and loader.iters == 1


def test_resume_is_exact_and_rebuilds_the_cache():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    r = AugmentationRefiner(model, opt, _loader(shuffle=True),
                            schedule=dict(refresh_every=2, val_batches=1, cache_validation=True, budget=None))
    _train(model, r, opt, 3)
    state = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict(), "r": r.state_dict(),
                           "rng": torch.get_rng_state()})  # the model's dropout draws from the user's RNG
    rest = _train(model, r, opt, 5, start=3)

    model2 = _model(seed=7)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    loader2 = _loader(shuffle=True)
    r2 = AugmentationRefiner(model2, opt2, loader2, seed=5,
                             schedule=dict(refresh_every=2, val_batches=1, cache_validation=True, budget=None))
    model2.load_state_dict(state["m"])
    opt2.load_state_dict(state["o"])
    r2.load_state_dict(state["r"])
    torch.set_rng_state(state["rng"])
    assert _train(model2, r2, opt2, 5, start=3) == rest
    assert loader2.iters == 1


def test_cache_setting_must_match_the_state():
    _, _, cached = _run(True, steps=2)
    model = _model()
    plain = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(),
                                schedule=dict(budget=None))
    before = plain.state_dict()
    with pytest.raises(ConfigurationError, match="cache_validation"):
        plain.load_state_dict(cached.state_dict())
    assert plain.step_count == before["step_count"] and plain.calls == before["calls"]
    with pytest.raises(ConfigurationError, match="cache_validation"):
        cached.load_state_dict(plain.state_dict())


def test_bad_validation_labels_rejected_state_unchanged():
    labels = torch.full((24,), 7)  # out of range for C = 4
    model = _model()
    r = AugmentationRefiner(model, None, _loader(labels=labels), method_options=dict(strength=1.0),
                            schedule=dict(cache_validation=True, budget=None))
    before = copy.deepcopy(r.state_dict())
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(TargetError, match="validation targets"):
        r(model(x), torch.randint(0, C, (8,)))
    after = r.state_dict()
    assert after["calls"] == before["calls"] and torch.equal(after["rng_state"], before["rng_state"])
    assert after["stream"]["fill_rng_state"] is None


def test_empty_loader_with_cache():
    empty = DataLoader(TensorDataset(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    model = _model()
    r = AugmentationRefiner(model, None, empty, method_options=dict(strength=1.0),
                            schedule=dict(cache_validation=True, budget=None))
    with pytest.raises(EmptyValidationError):
        r(model(torch.randn(8, 1, 8, 8)), torch.randint(0, C, (8,)))
