"""The overhead budget: the refresh interval it chooses from measured times (a fake clock), and the
refiner wired to it."""
import math
import warnings

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


class _SlowLoader:
    """A loader whose every batch advances the fake clock by ``seconds``."""

    def __init__(self, base, clock, seconds):
        self.base, self.clock, self.seconds = base, clock, seconds

    def __len__(self):
        return len(self.base)

    def __iter__(self):
        for batch in self.base:
            self.clock.now += self.seconds
            yield batch


def _mlp():
    """The tiny model and optimizer of the refiner tests."""
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def _costly_saflex(clock, host, device=None, device_seconds=0.0):
    """SAflex whose call costs ``host`` seconds on the fake host clock (and ``device_seconds`` on a
    fake device clock), charged where it scores."""

    class Costly(augplug.SAflex):
        def observe(self, ctx, g):
            clock.now += host
            if device is not None:
                device.now += device_seconds
            super().observe(ctx, g)

    return Costly(strength=1.0)


def _fake_events(device):
    """A stand-in for ``torch.cuda.Event`` reading the fake ``device`` clock."""

    class FakeEvent:
        def record(self):
            self.t = device.now

        def synchronize(self):
            pass

        def elapsed_time(self, end):  # milliseconds, as torch.cuda.Event
            return (end.t - self.t) * 1000.0

    return FakeEvent


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
    b = OverheadBudget(0.1, min_interval=1, clock=clock, headroom=0)
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
    b = OverheadBudget(0.1, min_interval=1, clock=clock, headroom=0)
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


def test_the_budget_plans_for_three_quarters():
    """The budget is a ceiling: the controller plans for ``(1 - headroom) * b`` (0.75 b by default),
    spaces reads to the maximum as soon as the call leaves no room in that plan, and reports the call
    as over budget (the warning) only when it exceeds ``b`` itself."""
    b = OverheadBudget(0.1, min_interval=1, max_interval=64)
    assert b.headroom == augplug.budget.HEADROOM == 0.25
    # P = 1, c = 0.02, R = 0.4: room = 0.075 - 0.02 = 0.055, k = ceil(0.4 / 0.055) = 8 (5 without headroom)
    assert b.choose((1.0, 0.02, 0.4)) == math.ceil(0.4 / (0.75 * 0.1 - 0.02)) == 8
    assert (0.02 + 0.4 / 8) <= 0.075 < (0.02 + 0.4 / 7)
    assert not b.call_over_budget
    assert b.choose((1.0, 0.08, 0.4)) == 64 and not b.call_over_budget   # no room in the plan, within b
    assert b.choose((1.0, 0.1, 0.4)) == 64 and b.call_over_budget         # over the budget itself
    assert OverheadBudget(0.1, headroom=0).choose((1.0, 0.02, 0.4)) == 5
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ConfigurationError, match="headroom"):
            OverheadBudget(0.1, headroom=bad)
    r = augplug.AugmentationRefiner(*_mlp(), DataLoader(TensorDataset(torch.randn(8, 6), torch.randint(0, 4, (8,))),
                                                        batch_size=4))
    assert r.budget.headroom == 0.25   # the default budget plans for 0.075 of a step
    r.remove_hooks()


def test_interval_bounds_and_a_call_over_budget():
    clock = FakeClock()
    b = OverheadBudget(0.05, min_interval=4, max_interval=64, clock=clock, headroom=0)
    assert b.choose((1.0, 0.001, 0.0001)) == 4          # cheap refreshes: never below refresh_every
    assert b.choose((1.0, 0.2, 0.3)) == 64              # the call alone exceeds the budget: as rare as allowed
    with pytest.raises(ConfigurationError, match="budget"):
        OverheadBudget(0)
    with pytest.raises(ConfigurationError, match="budget"):
        augplug.Schedule(budget=-1)


def test_refiner_spaces_refreshes_by_measured_time():
    """A refiner with a fake clock whose refreshes cost 10x a plain step: with budget 0.5 (planned:
    0.375, the default headroom) it refreshes every 27 updates; without a budget every update."""
    torch.manual_seed(0)
    clock = FakeClock()
    m, opt = _mlp()
    base = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 4, (40,))), batch_size=8)

    val = _SlowLoader(base, clock, 2.0)   # 5 batches of 2 s: a refresh over the loader costs 10 s
    r = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                    schedule=augplug.Schedule(refresh_every=2, budget=0.5, fresh_batches=None))
    r.budget.clock = clock
    refreshes = []
    for step in range(60):
        clock.now += 1.0      # the user's step: 1 s
        loss = r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        refreshes.append(r.stats["refreshed"])
    # P = 1 s, c = 0: k = ceil(10 / (0.75 * 0.5 * 1)) = 27
    assert r.stats["refresh_interval"] == 27
    late = [i for i, f in enumerate(refreshes) if f and i > 25]
    assert len(late) >= 2 and all(b - a == 27 for a, b in zip(late, late[1:]))
    assert r.stats["overhead"] == pytest.approx(10 / 27) and r.stats["overhead"] <= 0.75 * 0.5
    state = r.state_dict()
    assert state["budget"]["interval"] == 27
    fresh = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                        schedule=augplug.Schedule(refresh_every=2, budget=0.5, fresh_batches=None))
    r.remove_hooks()
    fresh.load_state_dict(state)
    assert fresh.refresh_interval == 27
    # a refiner without a budget (the exact schedule) loads the state and drops its measurements
    plain = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                        schedule=augplug.Schedule(refresh_every=2, budget=None, fresh_batches=None))
    with pytest.warns(RuntimeWarning, match="budget measurements are dropped"):
        plain.load_state_dict(state)
    assert plain.budget is None and plain.refresh_interval == 2 and plain.step_count == r.step_count
    with pytest.raises(ConfigurationError, match="budget state"):   # checked whole all the same
        plain.load_state_dict(dict(state, budget={**state["budget"], "interval": 0}))


def test_score_interval_from_the_equation():
    """With model score passes (``model_scores=True``) the budget spaces out both kinds of work:
    ``c + D / s + R / k <= b P`` with ``D = c_m - c``; the refresh interval first, then the least
    score interval that fits."""
    b = OverheadBudget(0.1, min_interval=1, model_scores=True, clock=FakeClock(), headroom=0)
    # P = 1 s, closed-form call c = 0.01 s, model-scored call c_m = 0.41 s (D = 0.4), refresh R = 0.2 s
    k = b.choose((1.0, 0.01, 0.2, 0.41))
    room = 0.1 - 0.01
    assert k == math.ceil((0.4 + 0.2) / room) == 7
    s = b.score_interval
    assert s == math.ceil(0.4 / (room - 0.2 / 7)) == 7
    cost = lambda s_, k_: 0.01 + 0.4 / s_ + 0.2 / k_  # noqa: E731
    assert cost(s, k) <= 0.1 < cost(s - 1, k)
    # a cheap refresh at the schedule's floor leaves room for more model passes than the refresh interval
    b = OverheadBudget(0.1, min_interval=4, model_scores=True, clock=FakeClock(), headroom=0)
    assert b.choose((1.0, 0.01, 0.004, 0.2)) == 4 > math.ceil(0.194 / 0.09)
    assert b.score_interval == math.ceil(0.19 / (0.09 - 0.004 / 4)) == 3
    # model passes that cost nothing more than a closed-form call: every call; a call over budget: rare
    assert (b.choose((1.0, 0.01, 0.004, 0.01)), b.score_interval) == (4, 1)
    b = OverheadBudget(0.05, min_interval=2, max_interval=64, model_scores=True, min_score_interval=3, headroom=0)
    b.choose((1.0, 0.2, 0.1, 0.5))
    assert (b.interval, b.score_interval) == (64, 64)
    assert b.choose((1.0, 0.0, 0.0, 0.001)) == 2 and b.score_interval == 3   # never below the schedule's


def test_a_stale_closed_form_time_does_not_lock_in_model_scores_every_call():
    """A closed-form call measured slower than a model-scored one (cold caches at the start) must not
    choose a model pass every call: then no closed-form call runs again and the stale ``c`` would
    never be corrected. ``D`` is then ``c_m`` itself and the score interval leaves room for
    closed-form calls."""
    b = OverheadBudget(0.5, min_interval=1, model_scores=True, clock=FakeClock(), headroom=0)
    # P = 0.1 s, stale c = 0.02 s, c_m = 0.012 s, R = 0.09 s: D = 0.012, room = 0.03
    assert b.choose((0.1, 0.02, 0.09, 0.012)) == math.ceil((0.012 + 0.09) / 0.03) == 4
    assert b.score_interval == math.ceil(0.012 / (0.03 - 0.09 / 4)) == 2


def test_score_interval_measured_by_kind():
    """Closed-form and model-scored calls are timed apart; until a closed-form call is measured
    its cost counts as 0."""
    clock = FakeClock()
    b = OverheadBudget(0.5, model_scores=True, clock=clock)
    start = b.call_started()
    clock.now += 0.3 + 0.2                      # a model-scored call that also refreshed (0.2 s)
    b.call_finished(start, 0.2, model_scored=True)
    clock.now += 1.0
    start = b.call_started()
    assert b.measurements() is None             # P counts once the call that ends the iteration succeeds
    clock.now += 0.3
    b.call_finished(start, None, model_scored=True)
    assert b.measurements() == (pytest.approx(1.0), 0.0, pytest.approx(0.2), pytest.approx(0.3))
    clock.now += 1.0
    start = b.call_started()
    clock.now += 0.05
    b.call_finished(start, None)                # a closed-form call
    assert b.measurements() == (pytest.approx(1.0), pytest.approx(0.05), pytest.approx(0.2), pytest.approx(0.3))
    state = b.state_dict()
    assert state["model_call"] == pytest.approx(0.3) and state["score_interval"] == 1
    b.choose()
    other = OverheadBudget(0.5, model_scores=True)
    other.load_state_dict(b.state_dict())
    assert other.score_interval == b.score_interval and other.model_call == pytest.approx(0.3)
    # a state saved before the score interval existed still loads
    old = {k: state[k] for k in ("interval", "plain", "call", "refresh")}
    other.load_state_dict(old)
    assert other.score_interval == 1 and other.model_call is None
    with pytest.raises(ConfigurationError, match="score_interval"):
        other.load_state_dict({**state, "score_interval": 0})


class _Recording(augplug.SAflex):
    """SAflex that keeps each call's class scores of the augmented rows and how they were computed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def observe(self, ctx, g):
        super().observe(ctx, g)
        self.seen.append((ctx.score_pass, g.detach().clone()))


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_model_scores_every_alternates_with_closed_form_scores():
    """``Schedule(model_scores_every=3)`` in full-model mode: calls 0, 3, 6 score with forward-mode
    AD through the model, the calls between with the closed form on the head's part of the same
    direction; each matches its oracle."""
    from augplug.scores import class_scores, last_layer_scores

    m = _conv_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    val = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))), batch_size=16)
    policy = _Recording(strength=1.0)
    r = augplug.AugmentationRefiner(m, opt, val, method=policy, mode="full",
                                    schedule=augplug.Schedule(model_scores_every=3, budget=None))
    passes = []
    for step in range(7):
        x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
        logits = m(x)
        feats = r._capture.features(10)
        loss = r(logits, y, num_original=4)
        v = r.validation_direction
        kind, g = policy.seen[-1]
        passes.append(kind)
        if kind == "closed_form":
            want = last_layer_scores(feats[4:], logits[4:].detach(), v["4.weight"], v["4.bias"])
        else:
            want = class_scores(m, x[4:], v, mode="full", bn="eval")
        torch.testing.assert_close(g, want.float(), rtol=1e-4, atol=1e-7)
        assert r.stats["model_scores_every"] == 3
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert passes == ["forward_mode", "closed_form", "closed_form"] * 2 + ["forward_mode"]


def test_model_scores_every_needs_a_mode_that_runs_the_model():
    m = _conv_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    val = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))), batch_size=8)
    with pytest.raises(ConfigurationError, match="model_scores_every"):
        augplug.AugmentationRefiner(m, opt, val, schedule=augplug.Schedule(model_scores_every=2))
    with pytest.raises(ConfigurationError, match="model_scores_every"):
        augplug.Schedule(model_scores_every=0)
    m[4].weight.requires_grad_(False)
    with pytest.raises(ConfigurationError, match="frozen"):
        augplug.AugmentationRefiner(m, opt, val, mode="full", schedule=augplug.Schedule(model_scores_every=2))


def test_no_linear_head_budget_warns_and_model_scores_every_is_rejected():
    """Without a linear head there is no closed form between model passes: a budget in full-model
    mode warns (at the user's line) and spaces out refreshes only; model_scores_every > 1 is an
    error that names the fix."""
    from augplug.errors import UnsupportedHeadError

    m = nn.Sequential(nn.Conv2d(1, 3, 8), nn.Flatten())   # the last module is not an nn.Linear
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    val = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))), batch_size=8)
    with pytest.warns(RuntimeWarning, match="only spaces out refreshes") as caught:
        r = augplug.AugmentationRefiner(m, opt, val, mode="full", schedule=augplug.Schedule(budget=0.5))
    assert [w.filename for w in caught if "spaces out" in str(w.message)] == [__file__]
    assert not r.model_scores and "model_scores_every" not in r._schedule_stats()
    r.remove_hooks()
    with pytest.raises(UnsupportedHeadError, match="model_scores_every=2") as err:
        augplug.AugmentationRefiner(m, opt, val, mode="full", schedule=augplug.Schedule(model_scores_every=2))
    assert "classifier=" in err.value.fix


def test_budget_spaces_out_model_score_passes(monkeypatch):
    """Full-model mode under budget 0.5 with a fake clock: a plain step 1 s, a model score pass
    2 s, a refresh 2 s, closed-form scores free: k = ceil((2 + 2) / 0.5) = 8 and
    s = ceil(2 / (0.5 - 2 / 8)) = 8, so the refiner's share is exactly the budget."""
    import augplug.scores as scores_module

    clock = FakeClock()
    real = scores_module.class_scores

    def timed(*args, mode="full", **kw):
        if mode != "last_layer":
            clock.now += 2.0
        return real(*args, mode=mode, **kw)

    monkeypatch.setattr(scores_module, "class_scores", timed)
    m = _conv_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    base = DataLoader(TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))), batch_size=16)

    policy = _Recording(strength=1.0)
    r = augplug.AugmentationRefiner(m, opt, _SlowLoader(base, clock, 2.0), method=policy, mode="full",
                                    schedule=augplug.Schedule(refresh_every=1, budget=0.5, fresh_batches=None))
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    for step in range(80):
        clock.now += 1.0
        loss = r(m(torch.randn(10, 1, 8, 8)), torch.randint(0, 3, (10,)), num_original=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (r.stats["refresh_interval"], r.stats["model_scores_every"]) == (8, 8)
    assert r.stats["overhead"] == pytest.approx(0.5)
    late = [i for i, (kind, _) in enumerate(policy.seen) if kind != "closed_form" and i >= 40]
    assert late and all(b - a == 8 for a, b in zip(late, late[1:]))
    without = augplug.AugmentationRefiner(m, opt, _SlowLoader(base, clock, 2.0), mode="full",
                                          schedule=augplug.Schedule(refresh_every=1, fresh_batches=None, budget=None))
    assert "model_scores_every" not in without._schedule_stats()


def test_on_a_gpu_the_call_is_timed_by_device_events():
    """On a GPU a call queues its work behind the training forward and waits for both at its one
    device sync. Simulated with two fake clocks: the host's, and the device's, read by fake timing
    events. A step is 1 s on both; the refiner's work 0.05 s on the host (launches) and 0.2 s on the
    device; the sync waits 3 s on the host. The call's own time is its device time, 0.2 s, and the
    step is the rest of the host's period, 1 + 0.05 + 3 - 0.2 = 3.85 s; with 10 s refreshes under
    budget 0.5, k = ceil(10 / (0.5 * 3.85 - 0.2)) = 6. (Host time alone would see a call of 3.05 s,
    over budget.)"""
    torch.manual_seed(0)
    clock, device = FakeClock(), FakeClock()
    m, opt = _mlp()
    base = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 4, (40,))), batch_size=8)
    r = augplug.AugmentationRefiner(m, opt, _SlowLoader(base, clock, 2.0),
                                    method=_costly_saflex(clock, 0.05, device, 0.2),
                                    schedule=augplug.Schedule(refresh_every=1, budget=0.5, fresh_batches=None))
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    r._event_factory = _fake_events(device)
    check = r._reject_bad_values

    def waits_at_the_sync(*args):
        clock.now += 3.0
        return check(*args)

    r._reject_bad_values = waits_at_the_sync
    for _ in range(30):
        clock.now += 1.0
        device.now += 1.0
        loss = r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r.budget.call == pytest.approx(0.2) and r.budget.plain == pytest.approx(3.85)
    assert r.stats["refresh_interval"] == 6 and not r.budget.call_over_budget


def test_a_call_over_budget_warns_once():
    """A call that alone costs more than the budget (0.5 s of a 1 s step against budget 0.1): the
    refreshes go to the maximum interval, and the refiner says so once, naming the measured share."""
    clock = FakeClock()
    m, opt = _mlp()
    val = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 4, (16,))), batch_size=8)
    r = augplug.AugmentationRefiner(m, opt, val, method=_costly_saflex(clock, 0.5),
                                    schedule=augplug.Schedule(refresh_every=1, budget=0.1, fresh_batches=None))
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(40):
            clock.now += 1.0
            loss = r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 20:   # the budget has measured the call by now; later refreshes are at the maximum
                assert r.stats["refresh_interval"] == r.budget.max_interval
    over = [w for w in caught if "more than the budget" in str(w.message)]
    assert len(over) == 1 and issubclass(over[0].category, RuntimeWarning)
    assert over[0].filename == __file__   # attributed to the user's call, not to augplug's insides
    assert "takes 0.50 of a training step" in str(over[0].message)
    assert r.budget.call_over_budget


class _CountingSlowLoader(_SlowLoader):
    """A :class:`_SlowLoader` that counts the batches drawn from it."""

    def __init__(self, base, clock, seconds):
        super().__init__(base, clock, seconds)
        self.drawn = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.drawn += 1
            yield batch


def _head_direction(window, head):
    """The oracle: ``-grad`` of the mean soft-target CE over the window's cached features at the
    head's current weights, by autograd."""
    a = torch.cat([e["features"] for e in window[0].values()])
    y = torch.cat([e["targets"] for e in window[0].values()])
    w = head.weight.detach().clone().requires_grad_(True)
    b = head.bias.detach().clone().requires_grad_(True)
    loss = -(y * torch.log_softmax(a @ w.T + b, dim=1)).sum(1).mean()
    gw, gb = torch.autograd.grad(loss, (w, b))
    return -gw, -gb


def test_budget_spaces_reads_while_the_head_is_rebuilt_every_refresh():
    """Last-layer mode with the window and a budget: the budget spaces out the validation *reads*
    (5 s per batch against 1 s steps, budget 0.5: every 10 updates), while every ``refresh_every``
    (2) updates the head gradient is rebuilt from the cached features with the current head, exactly
    (an autograd oracle), without reading the loader."""
    torch.manual_seed(0)
    clock = FakeClock()
    m, opt = _mlp()
    base = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 4, (40,))), batch_size=8)
    val = _CountingSlowLoader(base, clock, 5.0)
    r = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                    schedule=augplug.Schedule(refresh_every=2, budget=0.5))
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    reads, rebuilds = [], []
    for step in range(80):
        clock.now += 1.0
        drawn = val.drawn
        loss = r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3)
        if r.stats["refreshed"]:
            (reads if val.drawn > drawn else rebuilds).append(step)
            if val.drawn == drawn:   # a rebuild: exact for the current head, whatever the features' age
                gw, gb = _head_direction(r._window, m[2])
                torch.testing.assert_close(r.validation_direction["2.weight"], gw, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(r.validation_direction["2.bias"], gb, rtol=1e-5, atol=1e-7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # P = 1 s, c = 0, R = 5 s (one batch): reads every ceil(5 / 0.5) = 10 updates
    assert r.stats["read_interval"] == 10 and r.stats["refresh_interval"] == 2
    late = [s for s in reads if s > 40]
    assert len(late) >= 3 and all(b - a == 10 for a, b in zip(late, late[1:]))
    refreshes = sorted(reads + rebuilds)
    assert all(b - a == 2 for a, b in zip(refreshes, refreshes[1:])) and len(rebuilds) > 2 * len(reads)
    assert r.budget.refresh == pytest.approx(5.0)   # rebuilds are not timed as reads


def test_intervals_are_capped_at_sixteen_refreshes():
    """However slow a read, a budget's intervals stay at most ``16 * refresh_every`` updates."""
    clock = FakeClock()
    b = OverheadBudget(0.1, min_interval=4, max_interval=64, clock=clock)
    _iterations(b, clock, 5, refresh=1000.0)
    assert b.choose() == 64
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 4))
    r = augplug.AugmentationRefiner(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                    DataLoader(TensorDataset(torch.randn(8, 6), torch.randint(0, 4, (8,))), batch_size=8),
                                    schedule=augplug.Schedule(refresh_every=3))
    assert r.budget.max_interval == 48 and r.budget.fraction == augplug.schedule.AUTO_BUDGET


def test_a_rejected_call_changes_no_measurement():
    """A call rejected for bad input leaves the budget's measurements as they were (its state and its
    pending iteration time); the next good call measures from the last good one."""
    clock = FakeClock()
    m, opt = _mlp()
    val = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 4, (16,))), batch_size=8)
    r = augplug.AugmentationRefiner(m, opt, val, method=augplug.SAflex(strength=1.0),
                                    schedule=augplug.Schedule(refresh_every=1, budget=0.1))
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    for _ in range(3):
        clock.now += 1.0
        r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3).backward()
    before = r.state_dict()["budget"]
    clock.now += 7.0
    with pytest.raises(augplug.errors.AugplugError):
        r(m(torch.randn(8, 6)), torch.randint(0, 9, (7,)))   # 7 labels for 8 rows
    assert r.state_dict()["budget"] == before
    clock.now += 1.0
    r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3)
    assert r.budget._plain[-1] == pytest.approx(8.0)   # from the last good call's start: 7 s + 1 s


def test_the_default_budget_does_not_warn_and_none_is_exact():
    """``budget="auto"`` (the default) is 0.1 and says nothing when the call alone exceeds it;
    ``budget=None`` has no budget (the exact schedule); the command lines' parser reads the three."""
    clock = FakeClock()
    m, opt = _mlp()
    val = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 4, (16,))), batch_size=8)
    r = augplug.AugmentationRefiner(m, opt, val, method=_costly_saflex(clock, 0.5))
    assert r.schedule.budget == "auto" and r.budget.fraction == 0.1
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            clock.now += 1.0
            opt.zero_grad()
            r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3).backward()
            opt.step()
    assert r.budget.call_over_budget and r.stats["read_interval"] == r.budget.max_interval == 64
    exact = augplug.AugmentationRefiner(m, opt, val, schedule=augplug.Schedule(budget=None))
    assert exact.budget is None and exact.read_interval == exact.refresh_interval == 4
    from augplug.schedule import budget_from_text
    assert (budget_from_text("auto"), budget_from_text("None"), budget_from_text("0.25")) == ("auto", None, 0.25)
    for bad in ("-1", "fast", "0"):
        with pytest.raises(ConfigurationError, match="budget"):
            budget_from_text(bad)
    with pytest.raises(ConfigurationError, match="budget"):
        augplug.Schedule(budget="fast")


def test_rebuild_interval_from_the_equation():
    """A rebuild is the second kind of work: ``c + E / j + R / k <= b P`` with ``E = c_r - c``, the
    read interval ``k`` first, then the least rebuild interval ``j`` that fits."""
    b = OverheadBudget(0.1, min_interval=2, clock=FakeClock(), headroom=0)
    # P = 1 s, c = 0.02 s, R = 0.5 s, c_r = 0.12 s (E = 0.1 s)
    k = b.choose((1.0, 0.02, 0.5), rebuild_call=0.12)
    room = 0.1 - 0.02
    assert k == math.ceil((0.1 + 0.5) / room) == 8
    assert b.rebuild_interval == math.ceil(0.1 / (room - 0.5 / 8)) == 6
    assert 0.02 + 0.1 / 6 + 0.5 / 8 <= 0.1 < 0.02 + 0.1 / 5 + 0.5 / 8
    b.choose((1.0, 0.02, 0.5), rebuild_call=0.01)   # cheaper than c: c is stale, E = c_r
    assert b.rebuild_interval == math.ceil(0.01 / (room - 0.5 / b.interval))
    b.choose((1.0, 0.02, 0.5))                      # no rebuild measured: every refresh_every
    assert b.rebuild_interval == 2
    other = OverheadBudget(0.1, min_interval=2)
    b.choose((1.0, 0.02, 0.5), rebuild_call=0.12)
    b._rebuild_call.append(0.12)
    other.load_state_dict(b.state_dict())
    assert (other.rebuild_interval, other.rebuild_call) == (6, 0.12)


def test_a_rebuild_is_timed_apart_and_priced(monkeypatch):
    """The call that rebuilds the head gradient without reading is timed as its own kind (``c_r``),
    not as a closed-form call (a rebuild every other call would otherwise set ``c``'s median), and
    the refiner's rebuild interval is the budget's choice from it."""
    import augplug.refiner as refiner_module
    torch.manual_seed(0)
    clock = FakeClock()
    real = refiner_module.head_gradient

    def slow_rebuild(*args, **kw):
        clock.now += 0.2
        return real(*args, **kw)

    monkeypatch.setattr(refiner_module, "head_gradient", slow_rebuild)
    m, opt = _mlp()
    base = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 4, (40,))), batch_size=8)
    r = augplug.AugmentationRefiner(m, opt, _SlowLoader(base, clock, 5.0), method=augplug.SAflex(strength=1.0),
                                    schedule=augplug.Schedule(refresh_every=2, budget=0.5))
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    refreshed = []
    for step in range(80):
        clock.now += 1.0
        opt.zero_grad()
        r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3).backward()
        opt.step()
        if r.stats["refreshed"]:
            refreshed.append(step)
    assert max(r.budget._call) == 0.0 and r.budget.refresh == pytest.approx(5.2)
    assert r.budget.rebuild_call == pytest.approx(0.2)
    # P = 1, c = 0, R = 5.2, E = 0.2, b = 0.5: k = ceil(5.4 / 0.5) = 11, j = ceil(0.2 / (0.5 - 5.2 / 11)) = 8
    assert (r.stats["read_interval"], r.stats["refresh_interval"]) == (11, 8)
    late = [s for s in refreshed if s > 50]
    assert all(b - a <= 8 for a, b in zip(late, late[1:]))


def test_on_a_gpu_every_rebuild_is_timed():
    """On a GPU a call is timed by device events at its one sync, and between refreshes only every
    8th call waits for its end event; a call that rebuilt the direction always does, so the budget
    measures ``c_r`` from every rebuild (fake events on a fake device clock)."""
    torch.manual_seed(0)
    clock, device = FakeClock(), FakeClock()
    m, opt = _mlp()
    base = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 4, (40,))), batch_size=8)
    val = _CountingSlowLoader(base, clock, 5.0)
    r = augplug.AugmentationRefiner(m, opt, val, method=_costly_saflex(clock, 0.0, device, 0.01),
                                    schedule=augplug.Schedule(refresh_every=2, budget=0.5))
    r.budget.clock = clock
    r.budget.headroom = 0.0   # the plain equation (the headroom: test_the_budget_plans_for_three_quarters)
    r._event_factory = _fake_events(device)
    rebuilds = 0
    for _ in range(40):
        clock.now += 1.0
        device.now += 1.0
        drawn = val.drawn
        opt.zero_grad()
        r(m(torch.randn(8, 6)), torch.randint(0, 4, (8,)), num_original=3).backward()
        opt.step()
        rebuilds += int(r.stats["refreshed"] and val.drawn == drawn)
    assert rebuilds >= 8 and len(r.budget._rebuild_call) == min(rebuilds, r.budget.window)
    assert r.budget.rebuild_call == pytest.approx(0.01)


def test_auto_is_each_methods_own_default():
    """``Schedule(budget="auto")`` (the default) is a budget of 0.1 for SAflex, whose quality under it
    was measured, and the exact schedule for L2RW (which lost 2.7-3.5 points under it on the digits
    demo), the policies not measured under a budget and the contrastive refiner; an explicit budget
    applies to every one of them."""
    from augplug.contrastive import ContrastiveRefiner
    m, opt = _mlp()
    val = DataLoader(TensorDataset(torch.randn(8, 6), torch.randint(0, 4, (8,))), batch_size=4)
    made = []
    for method, fraction in (("saflex", 0.1), (augplug.SAflex(strength=1.0), 0.1), ("l2rw", None),
                             ("influence", None)):
        r = augplug.AugmentationRefiner(m, opt, val, method=method)
        made.append(r)
        assert (r.budget.fraction if r.budget is not None else None) == fraction, method
        assert r.policy.auto_budget == fraction
    r = augplug.AugmentationRefiner(m, opt, val, method="l2rw", schedule=dict(budget=0.2))
    made.append(r)
    assert r.budget.fraction == 0.2
    assert augplug.methods.Policy.auto_budget is None
    for r in made:
        r.remove_hooks()
    enc = nn.Linear(6, 4)
    c = ContrastiveRefiner(enc, enc, torch.optim.SGD(enc.parameters(), lr=0.1),
                           DataLoader(TensorDataset(torch.randn(8, 6), torch.randn(8, 6)), batch_size=4))
    assert c.budget is None
