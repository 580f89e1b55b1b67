"""The overhead budget: the refresh interval it chooses from measured times (a fake clock), and the
refiner wired to it."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug.budget import OverheadBudget
from augplug.errors import ConfigurationError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _iterations(budget, clock, n, *, own=0.02, plain=0.98, refresh=None, gaps=()):
    """``n`` iterations against a fake clock: a call of ``own`` seconds (plus ``refresh`` seconds
    on the first call when given), then ``plain`` seconds of the user's step (plus ``gaps[i]`` after
    call ``i``, e.g. an evaluation pass)."""
    for step in range(n):
        start = budget.call_started()
        r = refresh if (step == 0 and refresh is not None) else None
        clock.now += own + (r or 0.0)
        budget.call_finished(start, r)
        clock.now += plain + (gaps[step] if step < len(gaps) else 0.0)


def test_interval_from_the_equation():
    clock = FakeClock()
    b = OverheadBudget(0.1, min_interval=1, clock=clock)
    # iterations of 1.0 s; the refiner's own call 0.02 s; a refresh 0.4 s
    _iterations(b, clock, 5, refresh=0.4)
    k = b.choose()
    # P = 1 - 0.02 = 0.98; room = 0.1 * 0.98 - 0.02 = 0.078; k = ceil(0.4 / 0.078) = 6
    assert b.plain == pytest.approx(0.98) and b.call == pytest.approx(0.02) and b.refresh == pytest.approx(0.4)
    assert k == math.ceil(0.4 / (0.1 * 0.98 - 0.02)) == 6
    # at k = 6 the refiner's share of the plain step is within the budget, at k = 5 it is not
    assert b.overhead() == pytest.approx((0.02 + 0.4 / 6) / 0.98) and b.overhead() <= 0.1
    assert (0.02 + 0.4 / 5) / 0.98 > 0.1


def test_pauses_between_steps_do_not_loosen_the_budget():
    """An evaluation pass (30 s) and a slow loader batch (3 s) between two calls are not training
    steps: P stays the typical iteration's 0.98 s and the interval what steady steps give, where an
    average over the same iterations would let the refiner refresh three times as often."""
    clock = FakeClock()
    b = OverheadBudget(0.1, min_interval=1, clock=clock)
    _iterations(b, clock, 12, refresh=0.4, gaps=(0, 0, 0, 30.0, 0, 0, 3.0))
    assert b.plain == pytest.approx(0.98)
    assert b.choose() == 6
    gaps = [0.98] * 11
    gaps[3], gaps[6] = 30.98, 3.98
    mean = sum(gaps) / len(gaps)
    assert math.ceil(0.4 / (0.1 * mean - 0.02)) == 2  # what the mean would choose: 3 times as often
    # the window forgets: after enough slow iterations (a slower phase of training) P follows them
    _iterations(b, clock, 16, plain=1.98)
    assert b.plain == pytest.approx(1.98)
    with pytest.raises(ConfigurationError, match="window"):
        OverheadBudget(0.1, window=0)


def test_interval_bounds_and_a_call_over_budget():
    clock = FakeClock()
    b = OverheadBudget(0.05, min_interval=4, max_interval=64, clock=clock)
    assert b.choose((1.0, 0.001, 0.0001)) == 4          # cheap refreshes: never below refresh_every
    assert b.choose((1.0, 0.2, 0.3)) == 64              # the call alone exceeds the budget: as rare as allowed
    with pytest.raises(ConfigurationError, match="budget"):
        OverheadBudget(0)
    with pytest.raises(ConfigurationError, match="budget"):
        augplug.Schedule(budget=-1)


def test_refiner_spaces_refreshes_by_measured_time():
    """A refiner with a fake clock whose refreshes cost 10x a plain step: with budget 0.5 it refreshes
    about every 20 updates; without a budget every update."""
    torch.manual_seed(0)
    clock = FakeClock()
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    base = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 4, (40,))), batch_size=8)

    class Slow:   # 5 batches of 2 s: a refresh over the loader costs 10 s
        def __len__(self):
            return len(base)

        def __iter__(self):
            for batch in base:
                clock.now += 2.0
                yield batch

    val = Slow()
    r = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                    schedule=augplug.Schedule(refresh_every=1, budget=0.5, fresh_batches=None))
    r.budget.clock = clock
    refreshes = []
    for step in range(60):
        clock.now += 1.0      # the user's step: 1 s
        loss = r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        refreshes.append(r.stats["refreshed"])
    # P = 1 s, c = 0: k = ceil(10 / (0.5 * 1)) = 20
    assert r.stats["refresh_interval"] == 20
    late = [i for i, f in enumerate(refreshes) if f and i > 25]
    assert late and all(b - a == 20 for a, b in zip(late, late[1:]))
    assert r.stats["overhead"] == pytest.approx(0.5)
    state = r.state_dict()
    assert state["budget"]["interval"] == 20
    fresh = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                        schedule=augplug.Schedule(refresh_every=1, budget=0.5, fresh_batches=None))
    r.remove_hooks()
    fresh.load_state_dict(state)
    assert fresh.refresh_interval == 20
    plain = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                        schedule=augplug.Schedule(refresh_every=1))
    with pytest.raises(ConfigurationError, match="budget"):
        plain.load_state_dict(state)
