"""The validation stream resumes at the exact batch, also for loaders that shuffle with their own
``generator=`` (which the global RNG does not control)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from augplug import AugmentationRefiner
from augplug.errors import ConfigurationError
from augplug.rng import PrivateRNG
from augplug.validation import CachedValidationStream, ValidationStream, loader_generators

DATA = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10) % 3)


def _seeded_loader():
    return DataLoader(DATA, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))


def _sampler_loader():  # the generator sits on a sampler inside a batch sampler
    sampler = RandomSampler(DATA, generator=torch.Generator().manual_seed(3))
    return DataLoader(DATA, batch_sampler=BatchSampler(sampler, batch_size=4, drop_last=False))


def _ids(stream, n):
    return [stream.next()[0].flatten().tolist() for _ in range(n)]


@pytest.mark.parametrize("make", [_seeded_loader, _sampler_loader], ids=["loader-generator", "sampler-generator"])
@pytest.mark.parametrize("split", [2, 4, 5, 9])  # inside the first pass, at a pass boundary, in later passes
def test_resume_continues_with_the_same_batches(make, split):
    stream = ValidationStream(make(), PrivateRNG(0))
    _ids(stream, split)
    state = copy.deepcopy(stream.state_dict())
    rest = _ids(stream, 8)
    resumed = ValidationStream(make(), PrivateRNG(0))  # a fresh loader: its generator is back at the seed
    resumed.load_state_dict(state)
    assert _ids(resumed, 8) == rest
    assert len(loader_generators(make())) == 1


def test_cached_stream_rebuilds_the_same_pass_from_a_seeded_loader():
    def build():
        s = CachedValidationStream(_seeded_loader(), PrivateRNG(0))
        s.prepare = lambda x, y: (x, y)
        return s

    stream = build()
    _ids(stream, 2)
    stream_b = build()
    _ids(stream_b, 4)  # same first pass
    for _ in range(3):  # advance the first loader's generator: a second fill would draw a new order
        list(stream.loader)
    state = copy.deepcopy(stream_b.state_dict())
    rest = _ids(stream_b, 6)
    resumed = build()
    for _ in range(2):
        list(resumed.loader)
    resumed.load_state_dict(state)
    assert _ids(resumed, 6) == rest


def test_a_state_for_a_different_loader_is_rejected_before_anything_changes():
    stream = ValidationStream(_seeded_loader(), PrivateRNG(0))
    _ids(stream, 2)
    state = stream.state_dict()
    plain = ValidationStream(DataLoader(DATA, batch_size=3, shuffle=True), PrivateRNG(0))
    _ids(plain, 1)
    before = plain.state_dict()
    with pytest.raises(ConfigurationError, match="generator"):
        plain.load_state_dict(state)
    assert plain.state_dict()["consumed"] == before["consumed"] == 1


def test_refiner_resume_with_a_seeded_validation_loader_is_exact():
    """Resuming picks the same validation batches: with val_batches=1 a different order would give a
    different direction, so the losses would differ by far more than rounding."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1), torch.randint(0, 3, (16,))

    def build():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        return model, opt, AugmentationRefiner(model, opt, _seeded_loader(),
                                               schedule=dict(refresh_every=1, val_batches=1))

    def train(model, opt, r, steps):
        out = []
        for s in steps:
            rows = slice(2 * s, 2 * s + 2)
            loss = r(model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(float(loss.detach()))
        return out

    model, opt, r = build()
    train(model, opt, r, range(5))
    state = copy.deepcopy((model.state_dict(), opt.state_dict(), r.state_dict()))
    rest = train(model, opt, r, range(5, 8))
    model2, opt2, r2 = build()
    model2.load_state_dict(state[0])
    opt2.load_state_dict(state[1])
    r2.load_state_dict(state[2])
    assert train(model2, opt2, r2, range(5, 8)) == rest
