"""The adaptive augmented share (``aug_weight="adaptive"``): its signal against brute-force per-sample
gradients and the exact first-order hypergradient, its direction, resume, and rejected input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augplug import AugmentationRefiner, SAflex
from augplug.errors import ConfigurationError, ShapeError, TargetError
from augplug.share import AdaptiveShare, share_agreements

from conftest import FlatNet, brute_force_scores

D, C, N_ORIG, N_AUG = 6, 4, 5, 7


def _setup(freeze_body: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = FlatNet(D, 10, C).double()
    if freeze_body:
        for p in model.body.parameters():
            p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    xv, yv = torch.randn(12, D, dtype=torch.float64), torch.randint(0, C, (12,))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=12)
    x = torch.randn(N_ORIG + N_AUG, D, dtype=torch.float64)
    y = torch.randint(0, C, (N_ORIG + N_AUG,))
    return model, opt, val, (xv, yv), x, y


def _capture_agreements(share: AdaptiveShare) -> list:
    """Record the statistics each call gives the share (:meth:`AdaptiveShare.gather` with a call's
    own statistics: the second gather of a call, which goes on from the first)."""
    seen, gather = [], share.gather

    def recording(stats, *args, base=None, **kw):
        if base is not None and stats is not None:
            seen.append(stats)
        return gather(stats, *args, base=base, **kw)

    share.gather = recording
    return seen


def _flushed(share: AdaptiveShare) -> dict:
    """The state the share steps to once the update its pending statistics were gathered for has
    come (what the next call after an optimizer step commits)."""
    return share.gather(None, share.pending_step, share.pending_step + 1)


@pytest.mark.parametrize("signal", ["upstream", "refined"])
@pytest.mark.parametrize("mode,freeze", [("last_layer", True), ("full", False)])
def test_signal_matches_brute_force_and_the_exact_hypergradient(mode, freeze, signal):
    model, opt, val, (xv, yv), x, y = _setup(freeze)
    share = AdaptiveShare(init=0.5, lr=0.1, signal=signal, evidence=None)   # a step on every update
    seen = _capture_agreements(share)
    refiner = AugmentationRefiner(model, opt, val, mode=mode,
                                  method_options=dict(aug_weight=share, weighting="soft", beta=1.0, tau=1.0),
                                  schedule=dict(refresh_every=1, budget=None))
    refiner(model(x), y, num_original=N_ORIG)
    w = refiner.stats["weights"][N_ORIG:].double()
    soft = refiner.stats["soft_targets"].double()
    assert float((w - 1).abs().max()) > 1e-3   # refined weights, not all 1
    assert float((soft[N_ORIG:] - F.one_hot(y[N_ORIG:], C)).abs().max()) > 1e-3   # and refined targets
    if signal == "upstream":   # the share follows the augmented rows as given: upstream targets, weight 1
        w, soft = torch.ones_like(w), F.one_hot(y, C).double()

    # oracle: a_i = grad l_i . grad L_val by per-sample gradients, over the trainable parameters
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    grad_val = torch.autograd.grad(F.cross_entropy(model(xv), yv), list(params.values()))
    v = {n: -g for n, g in zip(params, grad_val)}
    a = brute_force_scores(model, x, soft, v)
    a_aug, a_orig = float((w * a[N_ORIG:]).sum() / w.sum()), float(a[:N_ORIG].mean())
    assert len(seen) == 1
    wa_sum, w_sum, ao_sum, n_orig = seen[0].tolist()
    assert (wa_sum / w_sum, ao_sum / n_orig) == pytest.approx((a_aug, a_orig), rel=1e-4, abs=1e-10)

    # the exact first-order hypergradient d/dlam [-grad L_val . grad L(lam)] at lam = 0.5
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    per = -(soft * F.log_softmax(model(x), -1)).sum(-1)
    loss = (per[:N_ORIG].sum() + lam * (w * per[N_ORIG:]).sum()) / (N_ORIG + lam * w.sum())
    g_train = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    drop = -sum((gv * gt).sum() for gv, gt in zip(grad_val, g_train))   # d L_val / d step, per unit lr
    (hyper,) = torch.autograd.grad(drop, lam)
    big_n = N_ORIG + 0.5 * float(w.sum())
    expected = -(float(w.sum()) * N_ORIG / big_n ** 2) * (a_aug - a_orig)
    assert float(hyper) == pytest.approx(expected, rel=1e-6)
    # once the update has come the share moves against the validation loss's derivative, by lr (first
    # update: d / |d| = +-1)
    assert float(share.log_share) == pytest.approx(math.log(0.5))   # gathered, not stepped yet
    assert float(_flushed(share)["log_share"]) - math.log(0.5) == pytest.approx(-0.1 * math.copysign(1.0, float(hyper)))


def test_loss_uses_the_current_share():
    model, opt, val, _, x, y = _setup(True)
    refiner = AugmentationRefiner(model, opt, val,
                                  method_options=dict(aug_weight=AdaptiveShare(init=0.25, evidence=None)),
                                  schedule=dict(refresh_every=1, budget=None))
    loss = refiner(model(x), y, num_original=N_ORIG)
    st = refiner.stats
    per = F.cross_entropy(model(x), y, reduction="none")
    w = st["weights"][N_ORIG:].double()
    expected = (per[:N_ORIG].sum() + 0.25 * (w * per[N_ORIG:]).sum()) / (N_ORIG + 0.25 * w.sum())
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert st["aug_weight"] == 0.25                  # the share this loss used
    opt.zero_grad()
    loss.backward()
    opt.step()
    refiner(model(x), y, num_original=N_ORIG)
    assert refiner.stats["aug_weight"] != 0.25       # the next call, after the update, uses the moved one


def _train(refiner, model, opt, batches, num_original):
    out = []
    for x, y in batches:
        loss = refiner(model(x), y, num_original=num_original)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((float(loss.detach()), float(refiner.aug_weight)))
    return out


def _noisy_batches(seed, n, rows, noisy_aug: bool):
    """Originals labelled by a fixed linear rule; augmented rows are either the same points with
    random labels (noisy) or the same points with the rule's labels (clean)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, C, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        x = torch.randn(rows, D, generator=g, dtype=torch.float64)
        y = (x @ w).argmax(1)
        ya = torch.randint(0, C, (rows,), generator=g) if noisy_aug else y
        out.append((torch.cat([x, x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)]),
                    torch.cat([y, ya])))
    return out, w


def _rule_val(w, seed=1):
    g = torch.Generator().manual_seed(seed)
    xv = torch.randn(64, D, generator=g, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, (xv @ w).argmax(1)), batch_size=32)


def test_refined_signal_is_biased_upward_and_the_upstream_signal_is_not():
    """Originals and augmented rows drawn alike (same points, same label noise): the augmented rows
    help the validation loss exactly as much as the originals, so the true signal is 0. Weights and
    targets chosen from the same scores they are judged by inflate the refined rows' agreement (a
    winner's curse); the upstream signal has no such selection and averages 0, and so does the
    direction signal (each row's agreement over its own residual, views and originals alike)."""
    g = torch.Generator().manual_seed(3)
    rule = torch.randn(D, C, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(150):
        x = torch.randn(32, D, generator=g, dtype=torch.float64)
        y = (x @ rule).argmax(1)
        noisy = torch.rand(32, generator=g) < 0.3
        y = torch.where(noisy, torch.randint(0, C, (32,), generator=g), y)
        batches.append((x, y))
    signals = {}
    for signal in ("upstream", "refined", "direction"):
        torch.manual_seed(0)
        model = FlatNet(D, 16, C).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        share = AdaptiveShare(signal=signal)
        seen = _capture_agreements(share)
        refiner = AugmentationRefiner(model, opt, _rule_val(rule),
                                      method_options=dict(aug_weight=share, weighting="soft", weight_tau=0.2,
                                                          beta=1.0, tau=0.5))
        for x, y in batches:     # no optimizer step: one model, one validation direction
            refiner(model(x), y, num_original=16)
        st = torch.stack(seen)
        signals[signal] = st[:, 0] / st[:, 1] - st[:, 2] / st[:, 3]
    for signal, d in signals.items():
        z = float(d.mean() / (d.std() / len(d) ** 0.5))
        if signal in ("upstream", "direction"):   # no selection: each row is judged as it came
            assert abs(z) < 3, (signal, z)
        else:
            assert z > 5, z
    assert float((signals["refined"] > signals["upstream"]).double().mean()) > 0.9


@pytest.mark.parametrize("noisy", [True, False])
def test_share_falls_for_noisy_augmented_rows_and_not_for_clean_ones(noisy):
    batches, w = _noisy_batches(0, 40, 16, noisy_aug=noisy)
    torch.manual_seed(0)
    model = FlatNet(D, 16, C).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    refiner = AugmentationRefiner(model, opt, _rule_val(w), method_options=dict(aug_weight=AdaptiveShare(lr=0.05)),
                                  schedule=dict(refresh_every=1, budget=None))
    shares = [s for _, s in _train(refiner, model, opt, batches, 16)]
    if noisy:
        assert shares[-1] < 0.5       # random labels: their gradients oppose the validation gradient
    else:
        # correct labels near the originals: the share stays high (it drifts down a little, since to
        # first order views help slightly less than the originals they were made from)
        assert shares[-1] > 0.7


def test_resume_gives_identical_losses_and_shares():
    batches, w = _noisy_batches(1, 8, 8, noisy_aug=True)

    def build():
        torch.manual_seed(0)
        model = FlatNet(D, 16, C).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        return model, opt, AugmentationRefiner(model, opt, _rule_val(w), method_options=dict(aug_weight='adaptive'),
                                               schedule=dict(refresh_every=2, budget=None))

    model, opt, refiner = build()
    _train(refiner, model, opt, batches[:4], 8)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), refiner.state_dict()))
    tail = _train(refiner, model, opt, batches[4:], 8)
    model2, opt2, refiner2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    refiner2.load_state_dict(saved[2])
    assert float(refiner2.aug_weight) == pytest.approx(math.exp(saved[2]["share"]["log_share"]))
    assert _train(refiner2, model2, opt2, batches[4:], 8) == tail
    assert tail[-1][1] != 1.0


def test_rejected_call_and_aug_only_batches_leave_the_share_unchanged():
    model, opt, val, _, x, y = _setup(True)
    refiner = AugmentationRefiner(model, opt, val, method_options=dict(aug_weight='adaptive'),
                                  schedule=dict(refresh_every=1, budget=None))
    refiner(model(x), y, num_original=N_ORIG)
    before, share = refiner.share.state_dict(), float(refiner.aug_weight)
    bad = y.clone()
    bad[-1] = C                                     # label out of range
    with pytest.raises(TargetError):
        refiner(model(x), bad, num_original=N_ORIG)
    assert refiner.share.state_dict() == before and float(refiner.aug_weight) == share
    refiner(model(x), y)                            # augmented rows only: the share has no say
    assert refiner.share.state_dict() == before
    refiner(model(x[:N_ORIG]), y[:N_ORIG], num_original=N_ORIG)   # originals only
    assert refiner.share.state_dict() == before


def test_no_update_during_warmup():
    model, opt, val, _, x, y = _setup(True)
    refiner = AugmentationRefiner(model, opt, val, method_options=dict(aug_weight='adaptive'),
                                  schedule=dict(warmup_steps=5))
    refiner(model(x), y, num_original=N_ORIG)
    assert int(refiner.share.updates) == 0 and float(refiner.aug_weight) == 1.0


def test_share_agreements_edge_cases():
    a, w = torch.tensor([1.0, -3.0]), torch.tensor([3.0, 1.0])
    assert share_agreements(a, w, torch.tensor([0.5, 1.5])).tolist() == [0.0, 4.0, 2.0, 2.0]
    # no weights: every augmented row counts once, bit for bit as weights of ones
    unweighted = share_agreements(a, None, torch.tensor([0.5, 1.5]))
    assert unweighted.tolist() == [-2.0, 2.0, 2.0, 2.0]
    assert torch.equal(unweighted, share_agreements(a, torch.ones(2), torch.tensor([0.5, 1.5])))

    def stats(a_aug, a_orig):
        return torch.tensor([a_aug, 1.0, a_orig, 1.0], dtype=torch.float64)

    s = AdaptiveShare(lr=0.1, min_share=0.5, evidence=None)
    s.load_state_dict(s.propose(stats(-1.0, 0.0)))
    assert float(s.value) == pytest.approx(math.exp(-0.1))
    for _ in range(20):
        s.load_state_dict(s.propose(stats(-1.0, 0.0)))
    assert float(s.value) == pytest.approx(0.5)      # clipped at min_share
    state = s.state_dict()
    # no originals, no augmented weight, a non-finite signal, no statistics: unchanged
    for bad in (torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]), stats(float("nan"), 0.0)):
        s.load_state_dict(s.propose(bad.double()))
        assert s.state_dict() == state
    s.load_state_dict(s.propose(None))
    assert s.state_dict() == state
    assert AdaptiveShare(lr=0.1, max_share=2.0, evidence=None).propose(stats(1.0, 0.0))["log_share"] == pytest.approx(0.1)


def test_configuration_errors():
    model, opt, val, _, _, _ = _setup(True)
    with pytest.raises(ConfigurationError, match="adaptive"):
        AugmentationRefiner(model, opt, val, method="none", method_options=dict(aug_weight='adaptive'))
    with pytest.raises(ConfigurationError, match="aug_weight"):
        AugmentationRefiner(model, opt, val, method_options=dict(aug_weight='auto'))
    for bad in (dict(min_share=0.0), dict(init=2.0), dict(lr=-1.0), dict(decay=1.0), dict(signal="weighted")):
        with pytest.raises(ConfigurationError):
            AdaptiveShare(**bad)
    from augplug.contrastive import ContrastiveRefiner
    with pytest.raises(ConfigurationError, match="adaptive"):
        ContrastiveRefiner(model, nn.Linear(3, 3), opt, val, method="none",
                           method_options=dict(aug_weight='adaptive'))
    with pytest.raises(ConfigurationError, match="aug_weight"):
        ContrastiveRefiner(model, nn.Linear(3, 3), opt, val, method_options=dict(aug_weight='auto'))


def test_committed_state_stays_on_the_statistics_device():
    """A proposal computed on the device is committed there: no copy back to the host (on CUDA such
    a copy is a device sync per step). The meta device stands in for a GPU: any copy to the host fails."""
    share = AdaptiveShare()
    stats = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64, device="meta")
    share.load_state_dict(share.propose(stats))
    assert {t.device.type for t in (share.log_share, share.mean_square, share.updates, share.test_mean,
                                    share.test_square, share.value)} == {"meta"}
    share.load_state_dict({"log_share": -0.5, "mean_square": 1.0, "updates": 3, "test_mean": 0.1,
                           "test_square": 0.2})  # a checkpoint: floats
    assert share.log_share.device.type == "meta" and share.updates.dtype == torch.int64
    assert AdaptiveShare().to("meta").log_share.device.type == "meta"


@pytest.mark.parametrize("bn_mode,passes", [("eval", 1), ("train", 2)])
def test_full_mode_scores_originals_and_augmented_rows_in_one_pass(monkeypatch, bn_mode, passes):
    """With BatchNorm in eval mode rows are scored independently, so one forward-mode pass serves
    the policy and the share; with batch statistics each group keeps its own pass."""
    import augplug.scores

    model, opt, val, _, x, y = _setup(False)
    calls = []
    real = augplug.scores.class_scores

    def counting(*args, **kw):
        calls.append(kw.get("mode"))
        return real(*args, **kw)

    monkeypatch.setattr(augplug.scores, "class_scores", counting)
    refiner = AugmentationRefiner(model, opt, val, mode="full", bn_mode=bn_mode, schedule=dict(refresh_every=1, budget=None))
    share = _capture_agreements(refiner.share)
    logits = model(x)
    refiner(logits, y, num_original=N_ORIG)
    assert calls == ["full"] * passes
    # the slices of the one pass are the scores of separate passes
    v = refiner._v
    g_orig = real(model, x[:N_ORIG], v, mode="full", bn=bn_mode)
    g_aug = real(model, x[N_ORIG:], v, mode="full", bn=bn_mode)
    one_hot = F.one_hot(y, C).double()
    # the default direction signal: each row's y^T g over its residual |y - p| (p of the training logits)
    residual = (one_hot - logits.detach().double().softmax(-1)).norm(dim=-1)
    agree = torch.cat([(one_hot[:N_ORIG] * g_orig).sum(-1), (one_hot[N_ORIG:] * g_aug).sum(-1)]) / residual
    expected = share_agreements(agree[N_ORIG:], torch.ones(N_AUG, dtype=torch.float64), agree[:N_ORIG])
    got = torch.stack([share[0][0] / share[0][1], share[0][2], share[0][3]])
    want = torch.stack([expected[0] / expected[1], expected[2], expected[3]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)  # scores are fp32


def _feed(share: AdaptiveShare, signal: torch.Tensor) -> list:
    """Feed a sequence of signals d (a_aug - a_orig) to the share; the shares after each update."""
    out = []
    for d in signal.tolist():
        share.load_state_dict(share.propose(torch.tensor([d, 1.0, 0.0, 1.0], dtype=torch.float64)))
        out.append(float(share.value))
    return out


def test_pure_noise_moves_the_share_only_with_evidence_off():
    """Augmented rows that help exactly as much as the originals give a signal of pure noise. Stepping
    on every update turns it into a random walk held below max_share, so the share drifts down; with
    the evidence test it stays put."""
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(3000, generator=g, dtype=torch.float64) for _ in range(4)]
    every = [_feed(AdaptiveShare(evidence=None), d)[-1] for d in noise]
    tested = [_feed(AdaptiveShare(evidence=3.0), d)[-1] for d in noise]
    assert sum(every) / 4 < 0.85, every
    assert min(tested) > 0.95, tested


def test_evidence_lets_a_steady_signal_through_and_then_steps_as_without_it():
    # a constant signal: no step on the first update (one value, no variance), then lr per update
    s = AdaptiveShare(lr=0.1, evidence=3.0)
    shares = _feed(s, torch.full((5,), -2.0, dtype=torch.float64))
    assert shares[0] == 1.0
    assert [math.log(v) for v in shares[1:]] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    # a weak but steady signal (mean 0.3 standard deviations below zero) still drives it down
    g = torch.Generator().manual_seed(1)
    weak = torch.randn(1500, generator=g, dtype=torch.float64) - 0.3
    assert _feed(AdaptiveShare(evidence=3.0), weak)[-1] < 0.2
    # once the evidence is in, each step is the rule's without the test
    with_test, without = AdaptiveShare(evidence=3.0), AdaptiveShare(evidence=None)
    _feed(with_test, weak[:200])
    _feed(without, weak[:200])
    before = (float(with_test.log_share), float(without.log_share))
    _feed(with_test, weak[200:201])
    _feed(without, weak[200:201])
    assert float(with_test.log_share) - before[0] == pytest.approx(float(without.log_share) - before[1])
    assert float(with_test.log_share) != before[0]


def test_evidence_matches_a_t_test_on_the_running_mean():
    """The gate's standard error against a direct computation from the running weights."""
    share = AdaptiveShare(evidence=2.0, decay=0.9)
    d = torch.tensor([0.3, -0.1, 0.5, 0.2, 0.4, 0.1], dtype=torch.float64)
    t = len(d)
    w = torch.tensor([0.1 * 0.9 ** (t - s) for s in range(1, t + 1)], dtype=torch.float64) / (1 - 0.9 ** t)
    mean = float((w * d).sum())
    var = float((w * (d - mean) ** 2).sum()) / (1 - float((w * w).sum()))
    se = (var * float((w * w).sum())) ** 0.5
    _feed(share, d)
    assert float(share.test_mean) == pytest.approx(mean)
    assert float(share.test_square) == pytest.approx(float((w * d * d).sum()))
    for ev, passes in ((mean / se - 1e-6, True), (mean / se + 1e-6, False)):
        share.evidence = ev
        assert bool(share._significant(share.test_mean, share.test_square, share.updates)) is passes


def test_evidence_state_round_trip_and_errors():
    s = AdaptiveShare(evidence=3.0)
    _feed(s, torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64))
    state = s.state_dict()
    assert set(state) == {"log_share", "mean_square", "updates", "test_mean", "test_square", "pending", "pending_step"}
    t = AdaptiveShare(evidence=3.0)
    t.load_state_dict(state)
    assert t.state_dict() == state
    old = {k: state[k] for k in ("log_share", "mean_square", "updates")}   # a checkpoint without the test
    t.load_state_dict(old)
    assert float(t.test_mean) == 0.0 and float(t.mean_square) == state["mean_square"]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError, match="evidence"):
            AdaptiveShare(evidence=bad)


def test_batch_statistics_follow_the_signal():
    """Upstream: the augmented rows' upstream agreements, weight 1; direction: the same per unit of
    residual; refined: the policy's targets and weights; rows picked by a mask or a slice alike."""
    g = torch.tensor([[0.5, -0.5], [1.0, 2.0], [-1.0, 0.25], [0.5, 0.5]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    soft = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    w = torch.tensor([1.0, 2.0, 0.5, 0.0])
    a_orig = torch.tensor([0.5])
    mask = torch.tensor([False, True, True, True])
    up = AdaptiveShare(signal="upstream").batch_statistics(y, g, soft, w, mask, a_orig)
    torch.testing.assert_close(up, torch.tensor([2.0 - 1.0 + 0.5, 3.0, 0.5, 1.0], dtype=torch.float64))
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.75, 0.25], [0.0, 0.5]])   # residuals |y - p|: .., sqrt(.5), sqrt(.125), .5
    direction = AdaptiveShare(signal="direction").batch_statistics(y, g, soft, w, mask, a_orig, probs=p)
    want = 2.0 / math.sqrt(0.5) - 1.0 / math.sqrt(0.125) + 0.5 / 0.5
    torch.testing.assert_close(direction, torch.tensor([want, 3.0, 0.5, 1.0], dtype=torch.float64))
    refined = AdaptiveShare(signal="refined").batch_statistics(y, g, soft, w, slice(1, None), a_orig)
    torch.testing.assert_close(refined, torch.tensor([2.0 * 1.5 + 0.5 * 0.25, 2.5, 0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ShapeError, match="batch_statistics"):
        AdaptiveShare().batch_statistics(y, g[:, :1], soft, w, mask, a_orig)


def _noise_walks(make, updates, runs=60, seed=0):
    """Final ``log lam`` minus its start for ``runs`` shares fed a signal of pure noise."""
    g = torch.Generator().manual_seed(seed)
    finals = []
    for _ in range(runs):
        s = make()
        for _ in range(updates):
            d = float(torch.randn((), generator=g))
            s.load_state_dict(s.propose(torch.tensor([d, 1.0, 0.0, 1.0], dtype=torch.float64)))
        finals.append(float(s.log_share) - math.log(s.init))
    return torch.tensor(finals)


def test_horizon_sets_the_step_and_keeps_the_noise_wander_fixed():
    """lr = WANDER / sqrt(T): under pure noise the log-share's spread after T updates is about WANDER
    for a short and a long run alike; an explicit lr wins; bad horizons are refused."""
    from augplug.share import WANDER

    assert AdaptiveShare(horizon=400).lr == pytest.approx(WANDER / 20)
    assert AdaptiveShare(lr=0.05, horizon=400).lr == 0.05
    for bad in (0, -3, 2.5, True, "long"):
        with pytest.raises(ConfigurationError, match="horizon"):
            AdaptiveShare(horizon=bad)
    for horizon in (100, 1600):
        spread = float(_noise_walks(lambda: AdaptiveShare(horizon=horizon, init=0.05, evidence=None), horizon).std())
        assert 0.25 < spread < 0.6, (horizon, spread)


def test_default_step_shrinks_as_one_over_sqrt_t():
    """Without lr or horizon the t-th update steps WANDER / (2 sqrt t) (in units of the signal's RMS):
    a constant signal moves log lam by exactly the sum of those steps, the average step over any T
    updates is about the horizon rule's WANDER / sqrt(T), and under pure noise the spread grows only
    like sqrt(ln T)."""
    from augplug.share import WANDER

    assert AdaptiveShare().lr is None
    for bad in (0.0, -0.1, float("nan"), True, "fast"):
        with pytest.raises(ConfigurationError, match="lr"):
            AdaptiveShare(lr=bad)
    s = AdaptiveShare(evidence=None)
    for _ in range(100):  # a constant signal (views below originals): d / rms(d) = -1 on every update
        s.load_state_dict(s.propose(torch.tensor([0.0, 1.0, 0.3, 1.0], dtype=torch.float64)))
    moved = -float(s.log_share)
    expected = sum(WANDER / (2 * math.sqrt(t)) for t in range(1, 101))
    assert moved == pytest.approx(expected, rel=1e-9)
    assert expected / 100 == pytest.approx(WANDER / math.sqrt(100), rel=0.1)
    assert int(s.updates) == 100
    for updates in (100, 1600):
        spread = float(_noise_walks(lambda: AdaptiveShare(init=0.05, evidence=None), updates).std())
        wander = WANDER / 2 * math.sqrt(math.log(updates) + 0.58)  # sqrt of the harmonic sum
        assert 0.7 * wander < spread < 1.3 * wander, (updates, spread, wander)


def _vector_walks(snr, updates, boost, walks=400, seed=0):
    """log lam after ``updates`` normalized steps (the default rate) of ``walks`` signals, normal with
    mean ``-snr`` and standard deviation 1 (``normalized_step`` on a vector of walks at once)."""
    from augplug.online import normalized_step
    from augplug.share import WANDER
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(updates, walks, generator=g, dtype=torch.float64) - snr
    log, ms, tm, ts = (torch.zeros(walks, dtype=torch.float64) for _ in range(4))
    for t in range(updates):
        step, ms, tm, ts = normalized_step(noise[t], torch.full((walks,), t), ms, tm, ts,
                                           lr=WANDER / (2 * math.sqrt(t + 1)), decay=0.99, evidence=None, boost=boost)
        log = log + step
    return log


def test_boost_speeds_a_consistent_signal_and_leaves_noise_walking_as_before():
    """AdaptiveShare(boost=c): steps times clip(|z| / 3, 1, c) from the 8th update on. Under pure noise
    the spread of log lam after 192 updates is the walk's; at a per-update signal-to-noise ratio of 1
    it moves more than twice as far; the first 7 updates step as without it."""
    for updates in (32, 192):
        plain, boosted = _vector_walks(0.0, updates, None).std(), _vector_walks(0.0, updates, 4.0).std()
        assert float(boosted) < 1.05 * float(plain), (updates, plain, boosted)
    plain, boosted = _vector_walks(1.0, 192, None).mean(), _vector_walks(1.0, 192, 4.0).mean()
    assert float(boosted) < 2 * float(plain) < 0, (plain, boosted)
    a, b = AdaptiveShare(evidence=None), AdaptiveShare(evidence=None, boost=4.0)
    for t in range(12):   # a constant signal: |z| is huge from the second update
        stats = torch.tensor([0.0, 1.0, 0.3 + 0.01 * (t % 3), 1.0], dtype=torch.float64)
        a.load_state_dict(a.propose(stats))
        b.load_state_dict(b.propose(stats))
        if t < 6:
            assert float(a.log_share) == float(b.log_share)
    assert float(b.log_share) < float(a.log_share)
    restored = AdaptiveShare(evidence=None, boost=4.0)
    restored.load_state_dict(b.state_dict())
    stats = torch.tensor([0.0, 1.0, 0.3, 1.0], dtype=torch.float64)
    b.load_state_dict(b.propose(stats))
    restored.load_state_dict(restored.propose(stats))
    assert float(b.log_share) == float(restored.log_share)
    for bad in (0.5, 0.0, float("inf"), True, "4"):
        with pytest.raises(ConfigurationError, match="boost"):
            AdaptiveShare(boost=bad)


def test_one_share_object_belongs_to_one_refiner():
    """An AdaptiveShare passed to a second refiner while the first is alive would be stepped by both:
    a ConfigurationError at construction. A copy, or the same object once the first refiner is gone,
    is accepted."""
    import gc
    model, opt, val, _, x, y = _setup(False)
    share = AdaptiveShare()
    first = AugmentationRefiner(model, opt, val, method=SAflex(aug_weight=share))
    with pytest.raises(ConfigurationError, match="another refiner"):
        AugmentationRefiner(model, None, val, method=SAflex(aug_weight=share))
    AugmentationRefiner(model, None, val, method=SAflex(aug_weight=copy.deepcopy(share)))
    first.remove_hooks()
    del first
    gc.collect()
    assert AugmentationRefiner(model, None, val, method=SAflex(aug_weight=share)).share is share


def _micro_batches(k, seed=7):
    """``k`` batches of 3 originals then 3 views (double inputs, labels in range)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, D, dtype=torch.float64, generator=g), torch.randint(0, C, (6,), generator=g))
            for _ in range(k)]


def _walk(share):
    return [float(share.log_share), float(share.mean_square), int(share.updates)]


def _accumulating_refiner(seed=0):
    model, opt, val, _, _, _ = _setup(False, seed)
    r = AugmentationRefiner(model, opt, val, schedule=dict(refresh_every=100, budget=None))
    return model, opt, r


def test_the_share_steps_once_per_optimizer_update_on_its_calls_summed():
    """Gradient accumulation: three calls (micro-batches) and one optimizer update move the share
    once, exactly as one call on the three batches together does (its statistics are sums over
    rows), and the next call's loss uses the moved share. Stepping on every call (the share's
    count would be 3) turns this red."""
    batches = _micro_batches(4)
    model, opt, r = _accumulating_refiner()
    for x, y in batches[:3]:
        (r(model(x), y, num_original=3) / 3).backward()
    assert int(r.share.updates) == 0 and r.share.pending_step == 0   # gathered, not stepped yet
    opt.step()
    x, y = batches[3]
    r(model(x), y, num_original=3)

    model2, opt2, r2 = _accumulating_refiner()
    x_all = torch.cat([b[0] for b in batches[:3]])
    y_all = torch.cat([b[1] for b in batches[:3]])
    augmented = torch.tensor([False, False, False, True, True, True] * 3)
    r2(model2(x_all), y_all, augmented=augmented).backward()
    opt2.step()
    r2(model2(x), y, num_original=3)
    assert int(r.share.updates) == int(r2.share.updates) == 1
    assert _walk(r.share)[:2] == pytest.approx(_walk(r2.share)[:2], rel=1e-9, abs=1e-12)
    assert r.stats["aug_weight"] == pytest.approx(r2.stats["aug_weight"], rel=1e-9)   # the loss used it
    assert float(r.share.log_share) != 0.0   # the share moved: the comparison is not vacuous


def test_a_failed_optimizer_step_does_not_count_its_batch():
    """An optimizer step that raises before updating anything (here a closure that fails), and the
    loop going on with the next batch: the share ends exactly where a run that never saw the failed
    batch ends. Keeping what was gathered for the failed update turns this red (its batch would be
    counted with the next one's)."""
    batches = _micro_batches(4, seed=11)

    def fail():
        raise RuntimeError("a failing closure")

    model, opt, r = _accumulating_refiner()
    twin_model, twin_opt, twin = _accumulating_refiner()
    x, y = batches[0]
    r(model(x), y, num_original=3).backward()
    with pytest.raises(RuntimeError, match="failing closure"):
        opt.step(fail)
    assert r.failed_steps == 1 and r.step_count == 0
    for x, y in batches[1:]:
        for m, o, ref in ((model, opt, r), (twin_model, twin_opt, twin)):
            o.zero_grad()
            ref(m(x), y, num_original=3).backward()
            o.step()
    assert _walk(r.share) == _walk(twin.share) and int(r.share.updates) == 2
    torch.testing.assert_close(r.share.pending, twin.share.pending, rtol=0, atol=0)


def test_statistics_gathered_mid_update_survive_a_checkpoint():
    """A state saved between two micro-batches of one update holds what was gathered so far; a
    refiner restored from it steps the share as the uninterrupted one does."""
    batches = _micro_batches(4, seed=3)
    model, opt, r = _accumulating_refiner()
    for x, y in batches[:2]:
        (r(model(x), y, num_original=3) / 3).backward()
    saved = copy.deepcopy(r.state_dict())
    assert saved["share"]["pending_step"] == 0 and any(v != 0 for v in saved["share"]["pending"])
    model2, opt2, r2 = _accumulating_refiner()
    model2.load_state_dict(model.state_dict())
    r2.load_state_dict(saved)
    for m, o, ref in ((model, opt, r), (model2, opt2, r2)):
        x, y = batches[2]
        (ref(m(x), y, num_original=3) / 3).backward()
        o.step()
        x, y = batches[3]
        ref(m(x), y, num_original=3)
    assert int(r2.share.updates) == 1
    assert _walk(r2.share)[:2] == pytest.approx(_walk(r.share)[:2], rel=1e-12)
