"""The validation window (``Schedule.fresh_batches``): a direction over the whole validation set at
the cost of a few batches per refresh, checked against the exact schedule."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug.errors import ConfigurationError, NonFiniteError

C, D = 4, 6


class Counting:
    """A validation loader that counts the batches read."""

    def __init__(self, loader):
        self.loader, self.reads = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.reads += 1
            yield batch


def _run(fresh, mode="last_layer", steps=10, freeze_body=False, refresh_every=1, state=None, val_batches="all"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, C))
    if freeze_body:   # parameters frozen and BatchNorm's running statistics fixed: the features stay
        for p in list(m[0].parameters()) + list(m[1].parameters()):
            p.requires_grad_(False)
        m[1].momentum = 0.0
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.2)
    g = torch.Generator().manual_seed(1)
    val = Counting(DataLoader(TensorDataset(torch.randn(40, D, generator=g), torch.randint(0, C, (40,), generator=g)),
                              batch_size=8))
    r = augplug.AugmentationRefiner(m, opt, val, mode=mode, method=augplug.SAflex(strength=1.0),
                                    schedule=dict(refresh_every=refresh_every, fresh_batches=fresh, budget=None,
                                                  val_batches=val_batches))
    if state is not None:
        r.load_state_dict(state)
    dirs, gen = [], torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(8, D, generator=gen), torch.randint(0, C, (8,), generator=gen)
        loss = r(m(x), y, num_original=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dirs.append({k: t.clone() for k, t in r.validation_direction.items()})
    return dirs, r, val


def _close(a, b, **kw):
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            torch.testing.assert_close(da[k], db[k], **kw)


@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_a_window_refreshed_whole_is_the_exact_direction(mode):
    exact, _, _ = _run(None, mode)
    whole, _, _ = _run(5, mode)   # 5 batches of 8: the whole window every refresh
    _close(exact, whole, rtol=1e-5, atol=1e-7)


def test_last_layer_window_is_exact_for_the_head_while_features_stay():
    """With the body frozen the cached features never go stale: the window's head gradient, rebuilt
    with the current head at every refresh, equals the exact direction while reading 1 batch of 5."""
    exact, _, _ = _run(None, freeze_body=True)
    window, _, val = _run(1, freeze_body=True)
    _close(exact, window, rtol=1e-5, atol=1e-7)
    assert val.reads == 5 + 9   # the whole window once, then one batch per refresh
    # and it is not vacuous: with a training body the features age and the directions differ
    moving, _, _ = _run(1)
    exact_moving, _, _ = _run(None)
    assert max(float((a[k] - b[k]).abs().max()) for a, b in zip(moving[1:], exact_moving[1:]) for k in a) > 1e-4


def test_window_state_resumes_bit_for_bit():
    full, r, _ = _run(1, steps=10)
    first, r1, _ = _run(1, steps=4)
    state = r1.state_dict()
    assert state["window"] is not None and len(state["window"]["slots"]) == 5
    # a new refiner on the same model and optimizer, loading the state, continues exactly
    gen_dirs = []
    m, opt = r1.model, r1.optimizer
    r2 = augplug.AugmentationRefiner(m, opt, r1.val_loader, method=augplug.SAflex(strength=1.0),
                                     schedule=dict(refresh_every=1, fresh_batches=1, budget=None))
    r1.remove_hooks()
    r2.load_state_dict(state)
    gen = torch.Generator().manual_seed(2)
    for step in range(10):
        x, y = torch.randn(8, D, generator=gen), torch.randint(0, C, (8,), generator=gen)
        if step < 4:
            continue
        loss = r2(m(x), y, num_original=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gen_dirs.append({k: t.clone() for k, t in r2.validation_direction.items()})
    _close(full[4:], gen_dirs, rtol=0, atol=0)


def test_window_state_checked_before_loading():
    _, r, _ = _run(1, steps=2)
    state = r.state_dict()
    _, exact, _ = _run(None, steps=1)
    with pytest.raises(ConfigurationError, match="window"):
        exact.load_state_dict(state)
    bad = dict(state, window={**state["window"], "position": 0,
                              "slots": {0: {"features": torch.full((8, 16), float("nan")),
                                            "targets": torch.zeros(8, C), "half": None}}})
    before = r.state_dict()
    with pytest.raises(NonFiniteError):
        r.load_state_dict(bad)
    slots = state["window"]["slots"]
    for window in ({**state["window"], "slots": {k: v for k, v in slots.items() if k != 1}},   # a slot missing
                   {**state["window"], "slots": {}, "position": 0},
                   {**state["window"], "position": len(slots)},
                   {**state["window"], "read_step": "3"}):
        with pytest.raises(ConfigurationError, match="window"):
            r.load_state_dict(dict(state, window=window))
    after = r.state_dict()
    assert torch.equal(before["window"]["slots"][0]["features"], after["window"]["slots"][0]["features"])
    # a state saved before reads were spaced out (no read_step) loads: read at the direction's update
    old = dict(state, window={k: v for k, v in state["window"].items() if k != "read_step"})
    r.load_state_dict(old)
    assert r._window[2] == state["v_step"]


def test_schedule_rejects_bad_fresh_batches():
    with pytest.raises(ConfigurationError, match="fresh_batches"):
        augplug.Schedule(fresh_batches=0)
    with pytest.raises(ConfigurationError, match="exceeds"):
        augplug.Schedule(val_batches=2, fresh_batches=3)


def test_window_with_integer_val_batches_and_the_adaptive_strength():
    exact, _, _ = _run(None, val_batches=3, steps=6)
    whole, _, val = _run(3, val_batches=3, steps=6)
    _close(exact, whole, rtol=1e-5, atol=1e-7)
    # the strength's half directions come from the window too
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))
    val = DataLoader(TensorDataset(torch.randn(40, D), torch.randint(0, C, (40,))), batch_size=8)
    r = augplug.AugmentationRefiner(m, None, val, method=augplug.SAflex(strength="adaptive"),
                                    schedule=dict(refresh_every=1, fresh_batches=1, budget=None))
    for _ in range(3):
        r(m(torch.randn(8, D)), torch.randint(0, C, (8,)), num_original=3)
    a, b = r.half_directions
    for k, v in r.validation_direction.items():   # v is the count-weighted mean of the halves' directions
        assert not torch.equal(a[k], b[k]) and torch.isfinite(v).all()
