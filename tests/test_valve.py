"""The refinement strength (augplug.valve): the cross-fitted signal by hand, its unbiasedness when
the weights carry no information, its rise with oracle weights, and how the refiner applies it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug import AugmentationRefiner
from augplug.errors import ConfigurationError, NonFiniteError
from augplug.methods import Policy
from augplug.valve import RefinementStrength, cross_fit_statistics
from augplug.refiner import refiner_kwargs

C, D = 4, 8


def test_cross_fit_statistics_by_hand():
    g = torch.Generator().manual_seed(0)
    n = 6
    y = F.one_hot(torch.randint(0, C, (n,), generator=g), C).float()
    wa, wb = torch.rand(n, generator=g) * 2, torch.rand(n, generator=g) * 2
    sa, sb = torch.softmax(torch.randn(n, C, generator=g), -1), torch.softmax(torch.randn(n, C, generator=g), -1)
    ga, gb = torch.randn(n, C, generator=g), torch.randn(n, C, generator=g)
    total, count = cross_fit_statistics(y, wa, sa, gb, wb, sb, ga).tolist()
    expected = sum(0.5 * (float(((wa[i] * sa[i] - y[i]) * gb[i]).sum()) + float(((wb[i] * sb[i] - y[i]) * ga[i]).sum()))
                   for i in range(n))
    assert count == n and total == pytest.approx(expected, rel=1e-6)
    # upstream refinement (w = 1, y' = y~) is judged exactly 0
    assert cross_fit_statistics(y, torch.ones(n), y, gb, torch.ones(n), y, ga)[0].item() == 0.0


def test_propose_follows_the_sign_with_rms_steps_and_clips():
    s = RefinementStrength(init=0.5, lr=0.1)
    st = s.propose(torch.tensor([3.0, 2.0], dtype=torch.float64))  # d = 1.5: first step is lr * sign
    assert float(st["gamma"]) == pytest.approx(0.6)
    s.load_state_dict(st)
    st = s.propose(torch.tensor([-30.0, 1.0], dtype=torch.float64))
    assert float(st["gamma"]) < 0.6
    assert float(s.propose(torch.tensor([1.0, 0.0], dtype=torch.float64))["gamma"]) == pytest.approx(0.6)  # no rows
    top = RefinementStrength(init=1.0, lr=0.5)
    assert float(top.propose(torch.tensor([1.0, 1.0], dtype=torch.float64))["gamma"]) == 1.0
    bottom = RefinementStrength(init=0.0, lr=0.5)
    assert float(bottom.propose(torch.tensor([-1.0, 1.0], dtype=torch.float64))["gamma"]) == 0.0
    nan = s.propose(torch.tensor([float("nan"), 1.0], dtype=torch.float64))
    assert float(nan["gamma"]) == pytest.approx(0.6) and int(nan["updates"]) == int(s.updates)


def test_bad_options_and_states():
    for kw in (dict(init=1.5), dict(lr=0), dict(decay=1.0), dict(evidence=-1)):
        with pytest.raises(ConfigurationError):
            RefinementStrength(**kw)
    s = RefinementStrength()
    with pytest.raises(NonFiniteError):
        s.check_state({**s.state_dict(), "gamma": float("nan")})
    with pytest.raises(ConfigurationError):
        s.check_state({**s.state_dict(), "gamma": 2.0})
    with pytest.raises(ConfigurationError):
        s.check_state({"gamma": 0.5})


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 16), nn.ReLU())
        self.fc = nn.Linear(16, C)

    def forward(self, x):
        return self.fc(self.body(x))


def _signal_run(seed: int, steps: int, *, labels_informative: bool, corrupt: float = 0.0, policy=None,
                strength=None, lr: float = 0.0):
    """Train (or not, ``lr=0``) on Gaussian blobs; return the refiner and the cross-fitted signals."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, D, generator=g) * 2
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    yv = torch.randint(0, C, (400,), generator=g)
    xv = centers[yv] + torch.randn(400, D, generator=g)
    if not labels_informative:
        # validation labels independent of the inputs and a head predicting uniformly: the population
        # validation gradient E[(p - y) a^T] is 0, so each half's direction is pure sampling noise
        yv = torch.randint(0, C, (400,), generator=g)
        with torch.no_grad():
            model.fc.weight.zero_(), model.fc.bias.zero_()
    val = DataLoader(TensorDataset(xv, yv), batch_size=100, shuffle=True)
    strength = strength or RefinementStrength(init=0.5, lr=0.01)
    if policy is not None:
        policy.strength, policy.aug_weight = strength, 1.0
    r = AugmentationRefiner(model, opt, val, method=policy or "saflex", seed=seed,
                            method_options=None if policy else dict(strength=strength, aug_weight=1.0),
                            schedule=dict(refresh_every=1, val_batches=2))
    signals = []
    propose = strength.propose
    strength.propose = lambda stats: (signals.append((stats[0] / stats[1]).item()), propose(stats))[1]
    for _ in range(steps):
        y = torch.randint(0, C, (32,), generator=g)
        x = centers[y] + torch.randn(32, D, generator=g)
        bad = torch.rand(32, generator=g) < corrupt
        given = torch.where(bad, (y + 1) % C, y)
        if policy is not None:
            policy.bad = bad
        loss = r(model(x), given)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return r, torch.tensor(signals)


def test_strength_signal_is_unbiased_when_the_weights_carry_no_information():
    """Validation labels independent of the inputs, a frozen model predicting uniformly: the
    validation direction is pure noise, so SAflex's weights (chosen from it) cannot help. The cross-fitted signal then has
    mean 0 and the strength stays where it started on average; judging the weights with the same
    half that chose them (the winner's curse) would push it up."""
    finals, means = [], []
    for seed in range(6):
        r, d = _signal_run(seed, 150, labels_informative=False)
        finals.append(float(r.strength.value))
        means.append(float(d.mean() / d.pow(2).mean().sqrt()))
    m = torch.tensor(means)
    assert abs(float(m.mean())) < 3 * float(m.std()) / len(means) ** 0.5 + 0.05
    assert abs(sum(finals) / len(finals) - 0.5) < 0.15


class _Oracle(Policy):
    """Weight 0 for the rows whose label is known to be wrong, 2 for the others (``bad`` is set per batch)."""

    name = "oracle"

    def __call__(self, scores, targets, generator=None):
        return torch.where(self.bad, 0.0, 2.0).float(), targets


def test_strength_rises_with_oracle_weights():
    oracle = _Oracle()
    finals = []
    for seed in range(3):
        r, d = _signal_run(seed, 120, labels_informative=True, corrupt=0.4, policy=oracle, lr=0.05)
        assert d.mean() > 0
        finals.append(float(r.strength.value))
    assert min(finals) > 0.8


def test_strength_one_is_the_policy_and_zero_is_upstream():
    g = torch.Generator().manual_seed(1)
    xv, yv = torch.randn(64, D, generator=g), torch.randint(0, C, (64,), generator=g)
    x, y = torch.randn(16, D, generator=g), torch.randint(0, C, (16,), generator=g)

    def loss_with(**kw):
        torch.manual_seed(0)
        model = _Net()
        r = AugmentationRefiner(model, None, DataLoader(TensorDataset(xv, yv), batch_size=32),
                                **refiner_kwargs(kw, aug_weight=1.0))
        out = r(model(x), y)
        return out, r

    full, r_full = loss_with(strength=1.0)
    zero, r_zero = loss_with(strength=0.0)
    none, _ = loss_with(method="none")
    assert torch.allclose(zero, none, atol=1e-6)
    assert not torch.allclose(full, none)
    assert torch.allclose(r_zero.stats["weights"], torch.ones(16))
    half, r_half = loss_with(strength=0.5)
    w_full, w_half = r_full.stats["weights"], r_half.stats["weights"]
    # halfway, before the weights are normalized: the same order, half the spread
    assert torch.corrcoef(torch.stack([w_full, w_half]))[0, 1] > 0.99
    assert 0.3 < float(w_half.std() / w_full.std()) < 0.7
    assert r_half.stats["strength"] == 0.5


def test_adaptive_strength_resumes_exactly_and_its_state_is_checked():
    def run(state=None, steps=4):
        torch.manual_seed(0)
        model = _Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(2)
        val = DataLoader(TensorDataset(torch.randn(64, D, generator=g), torch.randint(0, C, (64,), generator=g)),
                         batch_size=32)
        r = AugmentationRefiner(model, opt, val, method_options=dict(strength='adaptive'),
                                schedule=dict(refresh_every=2))
        if state is not None:
            model.load_state_dict(state[0]), opt.load_state_dict(state[1]), r.load_state_dict(state[2])
        for i in range(steps):
            gi = torch.Generator().manual_seed(100 + i + (0 if state is None else steps))
            x, y = torch.randn(16, D, generator=gi), torch.randint(0, C, (16,), generator=gi)
            loss = r(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, opt, r

    m, o, r = run(steps=8)
    m1, o1, r1 = run(steps=4)
    state = copy.deepcopy((m1.state_dict(), o1.state_dict(), r1.state_dict()))
    assert state[2]["strength"] is not None and state[2]["v_halves"] is not None
    m2, _, r2 = run(state=state, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert r.strength.state_dict() == r2.strength.state_dict()


def test_auto_strength_refines_beside_originals_and_trains_views_alone_as_given():
    """strength="auto": full refinement when the batch holds originals; without originals the loss,
    the weights and the targets are bit for bit those of plain upstream training, with no scoring."""
    g = torch.Generator().manual_seed(3)
    val = DataLoader(TensorDataset(torch.randn(64, D, generator=g), torch.randint(0, C, (64,), generator=g)),
                     batch_size=32)
    x, y = torch.randn(16, D, generator=g), torch.randint(0, C, (16,), generator=g)

    def call(method, **kw):
        torch.manual_seed(0)
        model = _Net()
        r = AugmentationRefiner(model, None, val, method=method,
                                **refiner_kwargs({"strength": "auto", "weighting": "soft"} if method == "saflex" else {}))
        return r(model(x), y, **kw), r

    auto, r = call("saflex")
    plain, _ = call("none")
    assert torch.equal(auto, plain) and torch.equal(r.stats["weights"], torch.ones(16))
    assert r.stats["strength"] == 0.0 and not r.stats["active"] and r.validation_direction is None
    with_orig, r2 = call("saflex", num_original=6)
    assert r2.stats["strength"] == 1.0 and r2.stats["active"] and not torch.equal(r2.stats["weights"], torch.ones(16))


def test_strength_needs_a_scoring_policy():
    with pytest.raises(ConfigurationError):
        AugmentationRefiner(_Net(), None, [(torch.randn(4, D), torch.arange(4))], method="none",
                            method_options=dict(strength='adaptive'))


def test_the_default_weighs_the_views_as_a_whole():
    """Beside originals the default SAflex learns the views' share and keeps every view at weight 1
    with its upstream label (measured: per-sample weights beside the learned share cost accuracy on
    small held-out tables); it still scores the views, which the share reads. Per-sample weights are
    one option away, and so is the share's absence (a fixed share weighs per sample)."""
    g = torch.Generator().manual_seed(3)
    val = DataLoader(TensorDataset(torch.randn(64, D, generator=g), torch.randint(0, C, (64,), generator=g)),
                     batch_size=32)

    def run(**options):
        torch.manual_seed(0)
        model = _Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        r = AugmentationRefiner(model, opt, val, method=augplug.SAflex(**options),
                                schedule=dict(refresh_every=1, budget=None))
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            x, y = torch.randn(16, D, generator=gen), torch.randint(0, C, (16,), generator=gen)
            loss = r(model(x), y, num_original=6)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return r

    r = run()
    assert r.policy.weighting == "none" and r.stats["active"]
    assert torch.equal(r.stats["weights"], torch.ones(16))
    assert torch.equal(r.stats["soft_targets"][6:], F.one_hot(r.stats["soft_targets"][6:].argmax(-1), C).float())
    assert float(r.stats["scores"][6:].abs().max()) > 0 and r.share is not None   # scored, for a learned share
    per_row = run(weighting="soft")
    assert not torch.equal(per_row.stats["weights"][6:], torch.ones(10))
    fixed = run(aug_weight=1.0)
    assert fixed.policy.weighting == "soft" and not torch.equal(fixed.stats["weights"][6:], torch.ones(10))


@pytest.mark.parametrize("options,weighting", [
    ({}, "none"), ({"strength": 1.0}, "soft"), ({"strength": 0.0}, "soft"), ({"aug_weight": 1.0}, "soft"),
    ({"aug_weight": None}, "soft"),      # None: the Policy class's fixed share of 1, so a weight per view
    ({"strength": None}, "soft"),        # None: the Policy class's strength of 1
    ({"aug_weight": "adaptive", "strength": "auto"}, "none"),
    ({"threshold": 0.5}, "soft"), ({"weight_tau": 0.2}, "soft"), ({"weight_signal": "likelihood"}, "soft"),
    ({"weight_norm": "class"}, "soft"), ({"weight_norm": "augmented"}, "none"), ({"beta": 1.0}, "none"),
    ({"weighting": "soft"}, "soft"), ({"weighting": "hard"}, "hard"), ({"weighting": None}, "none")])
def test_auto_weighting_weighs_per_view_wherever_an_option_asks_for_it(options, weighting):
    """weighting="auto" keeps weight 1 only under a learned share with strength="auto" and no option
    that acts through per-sample weights alone; before, SAflex(threshold=0.5) was silently flat and
    SAflex(aug_weight=None) (a fixed share) trained like method="none"."""
    assert augplug.SAflex(**options).weighting == weighting


@pytest.mark.parametrize("bad", ["Soft", " auto", 3, True])
def test_bad_weighting_names_every_value(bad):
    with pytest.raises(ConfigurationError) as info:
        augplug.SAflex(weighting=bad)
    assert "'auto'" in str(info.value) and "'soft'" in str(info.value)


def test_contrastive_saflex_follows_the_rule_by_name_and_by_instance():
    """By name the contrastive preset is a fixed share, so a weight per pair; an override to a learned
    share with strength="auto" resolves as a policy instance does."""
    from augplug.contrastive import ContrastiveRefiner
    preset = dict(ContrastiveRefiner.PRESETS["saflex"])
    assert augplug.SAflex(**preset).weighting == "soft"
    assert augplug.SAflex(**{**preset, "aug_weight": "adaptive", "strength": "auto"}).weighting == "none"
