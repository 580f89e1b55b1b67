"""ISDA: statistics, surrogate logits, the bound, eq. (5) gradients, schedule, state, errors, composition.

Oracles: class statistics against the pooled (or exponentially weighted) covariance of every feature
seen, computed in fp64 from the raw features; surrogate logits against a per-sample loop over
``(w_j - w_y)^T Sigma_y (w_j - w_y)``; the loss against a Monte-Carlo estimate of the expected
cross-entropy under ``N(0, lam Sigma_y)`` feature noise; classifier-weight gradients against the
closed form of the paper's eq. (5).
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner, SAflex
from augplug.errors import (AugplugError, ConfigurationError, NonFiniteError, ShapeError, TargetError,
                            UnsupportedHeadError)
from augplug.isda import ISDALoss, choose_covariance, class_quadratic_terms, isda_logits
from augplug.models import MLP
from augplug.targets import soft_cross_entropy

C, A = 5, 6


# ------------------------------------------------------------------------------------------ oracles
def weighted_stats(feats, weights):
    """fp64 weighted mean and (biased) covariance per class: weights (N, C), feats (N, A)."""
    f = feats.double()
    out_mean, out_cov, out_n = [], [], []
    for c in range(weights.shape[1]):
        w = weights[:, c].double()
        n = w.sum()
        if n == 0:
            out_mean.append(torch.zeros(f.shape[1], dtype=torch.float64))
            out_cov.append(torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64))
        else:
            mu = (w[:, None] * f).sum(0) / n
            d = f - mu
            out_mean.append(mu)
            out_cov.append((w[:, None] * d).t() @ d / n)
        out_n.append(n)
    return torch.stack(out_n), torch.stack(out_mean), torch.stack(out_cov)


def direct_surrogate(logits, labels, weight, cov_table, lam):
    """Per-sample loop: z_ij + lam/2 (w_j - w_y)^T S_y (w_j - w_y)."""
    rows = []
    for i in range(logits.shape[0]):
        y = int(labels[i])
        s = cov_table[y].double()
        if s.dim() == 1:
            s = torch.diag(s)
        rows.append(torch.stack([logits[i, j].double() + lam / 2 * (weight[j] - weight[y]).double() @ s
                                 @ (weight[j] - weight[y]).double() for j in range(logits.shape[1])]))
    return torch.stack(rows)


def _data(n=40, seed=0, c=C, a=A):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(c, a, generator=g) + 0.2
    y = torch.randint(0, c, (n,), generator=g)
    f = torch.randn(n, a, generator=g) * scale[y] + 3 * torch.randn(c, a, generator=g)[y]
    return f, y


def _head(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(A, C).to(dtype)


def _feed(isda, head, batches):
    for f, y in batches:
        f = f.to(head.weight.dtype)
        isda.per_sample_loss(f, head(f), y, head)


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_statistics_equal_pooled_covariance_of_all_features_seen(covariance):
    head = _head()
    isda = ISDALoss.for_head(head, covariance=covariance)
    batches = [_data(n, seed=s) for s, n in enumerate([16, 3, 25, 9])]
    _feed(isda, head, batches)
    f = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n, mu, cov = weighted_stats(f, F.one_hot(y, C))
    assert torch.equal(isda.count, n.float())
    assert torch.allclose(isda.mean.double(), mu, atol=1e-5)
    expect = cov if covariance == "full" else torch.diagonal(cov, dim1=1, dim2=2)
    assert isda.cov.shape == expect.shape
    assert torch.allclose(isda.cov.double(), expect, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["soft", "argmax"])
def test_soft_targets_update_statistics(mode):
    head = _head()
    isda = ISDALoss.for_head(head, covariance="full", stats_targets=mode)
    feats, ys = [], []
    for s in range(3):
        f, _ = _data(12, seed=s)
        y = torch.softmax(2 * torch.randn(12, C, generator=torch.Generator().manual_seed(10 + s)), 1)
        y[0] = F.one_hot(torch.tensor(2), C).float()  # a hard row among soft ones
        isda.per_sample_loss(f, head(f), y, head)
        feats.append(f)
        ys.append(y)
    y = torch.cat(ys)
    w = y if mode == "soft" else F.one_hot(y.argmax(1), C).float()
    n, mu, cov = weighted_stats(torch.cat(feats), w)
    assert torch.allclose(isda.count.double(), n, atol=1e-5)
    assert torch.allclose(isda.mean.double(), mu, atol=1e-4)
    assert torch.allclose(isda.cov.double(), cov, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_decay_statistics_equal_exponentially_weighted_covariance(covariance):
    gamma = 0.7
    head = _head()
    isda = ISDALoss.for_head(head, covariance=covariance, decay=gamma)
    batches = [_data(n, seed=s) for s, n in enumerate([10, 14, 6, 20, 8])]
    _feed(isda, head, batches)
    t_last = len(batches) - 1
    f = torch.cat([b[0] for b in batches])
    w = torch.cat([F.one_hot(b[1], C).double() * gamma ** (t_last - t) for t, b in enumerate(batches)])
    n, mu, cov = weighted_stats(f, w)
    assert torch.allclose(isda.count.double(), n, rtol=1e-5)
    assert torch.allclose(isda.mean.double(), mu, atol=1e-4)
    expect = cov if covariance == "full" else torch.diagonal(cov, dim1=1, dim2=2)
    assert torch.allclose(isda.cov.double(), expect, atol=1e-3, rtol=1e-4)
    # and it is not the plain pooled covariance (the test can tell the two apart)
    _, _, pooled = weighted_stats(f, torch.cat([F.one_hot(b[1], C).double() for b in batches]))
    pooled = pooled if covariance == "full" else torch.diagonal(pooled, dim1=1, dim2=2)
    assert not torch.allclose(isda.cov.double(), pooled, atol=1e-2)


def test_no_grad_calls_read_but_do_not_update():
    head = _head()
    isda = ISDALoss.for_head(head)
    f, y = _data()
    with torch.no_grad():
        isda.per_sample_loss(f, head(f), y, head)
        isda.per_sample_loss(None, head(f), y, head)  # features are not needed to evaluate
    assert float(isda.count.sum()) == 0 and int(isda.steps) == 0


def test_auto_covariance_choice_is_reported():
    assert choose_covariance(100, 512) == "full" and choose_covariance(1000, 512) == "diagonal"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ISDALoss(10, 8).covariance == "full"
    with pytest.warns(UserWarning, match="diagonal covariance"):
        small = ISDALoss(10, 8, memory_budget=4 * 10 * 8 * 8 - 1)
    assert small.covariance == "diagonal" and small.cov.shape == (10, 8)
    assert small.statistics_bytes == 4 * (10 + 10 * 8 + 10 * 8)


# ------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_surrogate_logits_equal_direct_per_sample_computation(covariance):
    head = _head(dtype=torch.float64)
    isda = ISDALoss.for_head(head, covariance=covariance, lambda0=0.8)
    _feed(isda, head, [_data(30, seed=1)])
    f, y = _data(12, seed=2)
    z = head(f.double())
    direct = direct_surrogate(z, y, head.weight, isda.cov, 0.8)
    assert torch.allclose(isda_logits(z, y, head.weight, isda.cov, 0.8), direct, atol=1e-10)
    assert direct[torch.arange(12), y].sub(z[torch.arange(12), y]).abs().max() == 0  # own class untouched
    assert (direct - z >= -1e-12).all()                                             # others only raised
    with torch.no_grad():
        per = isda.per_sample_loss(None, z, y, head)
    assert torch.allclose(per, F.cross_entropy(direct, y, reduction="none"), atol=1e-10)
    # soft targets: sum_k y_k CE(z~(k), k)
    soft = torch.softmax(torch.randn(12, C, generator=torch.Generator().manual_seed(3)), 1).double()
    soft[:, 0] = 0
    soft = soft / soft.sum(1, keepdim=True)
    expect = sum(soft[:, k] * F.cross_entropy(direct_surrogate(z, torch.full((12,), k), head.weight, isda.cov, 0.8),
                                              torch.full((12,), k), reduction="none") for k in range(C))
    with torch.no_grad():
        assert torch.allclose(isda.per_sample_loss(None, z, soft, head), expect, atol=1e-10)


def test_quadratic_terms_gradient_matches_autograd_of_direct_form():
    torch.manual_seed(0)
    w = torch.randn(C, A, dtype=torch.float64, requires_grad=True)
    m = torch.randn(C, A, A, dtype=torch.float64)
    table = m @ m.transpose(1, 2)
    classes = torch.tensor([3, 0, 4])
    up = torch.randn(3, C, dtype=torch.float64)
    g_fast, = torch.autograd.grad((class_quadratic_terms(w, table, classes) * up).sum(), w)
    direct = torch.stack([torch.stack([(w[j] - w[k]) @ table[k] @ (w[j] - w[k]) for j in range(C)]) for k in classes])
    g_ref, = torch.autograd.grad((direct * up).sum(), w)
    assert torch.allclose(g_fast, g_ref, atol=1e-10)


@pytest.mark.parametrize("batched", [False, True])
def test_quadratic_terms_of_both_paths_match_the_direct_form(batched):
    """Class by class (the CPU default) and batched (the GPU default): values and gradients."""
    torch.manual_seed(1)
    w = torch.randn(C, A, dtype=torch.float64, requires_grad=True)
    m = torch.randn(C, A, A, dtype=torch.float64)
    table = m @ m.transpose(1, 2)
    classes = torch.tensor([3, 0, 4, 1])
    up = torch.randn(4, C, dtype=torch.float64)
    q = class_quadratic_terms(w, table, classes, batched=batched)
    direct = torch.stack([torch.stack([(w[j] - w[k]) @ table[k] @ (w[j] - w[k]) for j in range(C)]) for k in classes])
    torch.testing.assert_close(q, direct, rtol=1e-12, atol=1e-10)
    g, = torch.autograd.grad((q * up).sum(), w)
    g_ref, = torch.autograd.grad((direct * up).sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-10)


def _train_each(heads, losses, f, y):
    """One training call of each ISDA loss on its own head: ``[(per-sample loss, head weight grad)]``."""
    out = []
    for h, isda in zip(heads, losses):
        h.zero_grad()
        loss = isda.per_sample_loss(f, h(f), y, h)
        loss.sum().backward()
        out.append((loss.detach(), h.weight.grad.clone()))
    return out


@pytest.mark.parametrize("decay", [None, 0.8])
def test_batched_and_class_by_class_training_agree(decay):
    """Two ISDA losses, one batched, one class by class, fed the same training calls (hard and soft
    targets, classes missing from some batches, a class seen for the first time): the losses
    (computed from the pending update), the head gradients and the statistics agree."""
    heads = [_head(dtype=torch.float64) for _ in range(2)]
    losses = [ISDALoss.for_head(h, covariance="full", lambda0=0.7, decay=decay, batched=b)
              for h, b in zip(heads, (False, True))]
    assert [x._batched() for x in losses] == [False, True]
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        f, y = _data(9 + step, seed=20 + step)
        f = f.double()
        if step == 0:
            y = y.clamp_max(C - 2)  # the last class appears first at step 1
        if step % 2:
            y = torch.softmax(3 * torch.randn(f.shape[0], C, generator=gen, dtype=torch.float64), 1)
            y[:, 2] = 0  # a class without mass in this batch
            y = y / y.sum(1, keepdim=True)
        out = _train_each(heads, losses, f, y)
        # the statistics are fp32, summed in another order by the two paths
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
        for name in ("count", "mean", "cov"):
            torch.testing.assert_close(getattr(losses[0], name), getattr(losses[1], name), rtol=1e-5, atol=1e-6)
    # and the loss does depend on the statistics (a non-vacuous comparison)
    assert float(losses[1].cov.abs().max()) > 0.1


def test_batched_and_class_by_class_agree_under_autocast():
    """Low-precision features under autocast (bf16 on the CPU, as fp16 on a GPU): both paths keep
    fp32 statistics and give the same loss."""
    out = []
    for batched in (False, True):
        head = _head()
        isda = ISDALoss.for_head(head, covariance="full", batched=batched)
        for step in range(3):
            f, y = _data(10, seed=60 + step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = isda.per_sample_loss(f.bfloat16(), head(f), y, head)
        assert isda.cov.dtype == torch.float32 and loss.dtype == torch.float32
        out.append((loss.detach(), isda.cov.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-5)


def test_batched_option_is_checked_and_defaults_to_the_device():
    isda = ISDALoss(4, 3, covariance="full")
    assert isda.batched is None and not isda._batched()
    assert ISDALoss(4, 3, covariance="full", batched=True)._batched()


def test_lambda_zero_is_cross_entropy_exactly():
    head = _head()
    isda = ISDALoss.for_head(head, lambda0=0.0)
    _feed(isda, head, [_data(30, seed=1)])
    f, y = _data(10, seed=4)
    z = head(f)
    loss = isda.per_sample_loss(f, z, y, head)
    assert torch.equal(loss, soft_cross_entropy(z, F.one_hot(y, C).float()))
    assert torch.allclose(loss.mean(), F.cross_entropy(z, y), atol=0, rtol=1e-6)
    g1 = torch.autograd.grad(loss.mean(), head.weight)[0]
    g2 = torch.autograd.grad(soft_cross_entropy(head(f), F.one_hot(y, C).float()).mean(), head.weight)[0]
    assert torch.equal(g1, g2)
    isda.set_progress(0.0)  # the schedule at 0 is the same
    isda.lambda0 = 0.5
    assert torch.equal(isda.per_sample_loss(f, z, y, head), soft_cross_entropy(z, F.one_hot(y, C).float()))
    isda.set_progress(1.0)
    assert (isda.per_sample_loss(f, z, y, head) > soft_cross_entropy(z, F.one_hot(y, C).float())).all()


def test_loss_upper_bounds_monte_carlo_expected_cross_entropy():
    head = _head(dtype=torch.float64)
    lam = 0.5
    isda = ISDALoss.for_head(head, covariance="full", lambda0=lam)
    _feed(isda, head, [_data(60, seed=1)])
    f, y = _data(4, seed=5)
    f = f.double()
    with torch.no_grad():
        bound = isda.per_sample_loss(None, head(f), y, head)
        g = torch.Generator().manual_seed(0)
        for i in range(4):
            s = isda.cov[y[i]].double()
            chol = torch.linalg.cholesky(lam * s + 1e-12 * torch.eye(A, dtype=torch.float64))
            delta = torch.randn(100_000, A, generator=g, dtype=torch.float64) @ chol.t()
            ce = F.cross_entropy(head(f[i] + delta), y[i].expand(100_000), reduction="none")
            mc, se = ce.mean(), ce.std() / 100_000 ** 0.5
            plain = F.cross_entropy(head(f[i:i + 1]), y[i:i + 1])
            assert plain < mc - 3 * se               # the augmentation matters (Jensen, CE convex in logits)
            assert mc - 3 * se <= bound[i]            # ISDA is an upper bound of the expected loss
            assert bound[i] < 3 * mc                  # and not a vacuous one


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_classifier_gradient_matches_eq5(covariance):
    """dL/dw_j = (p~_j - 1[j=y]) a + lam p~_j S_y (w_j - w_y) for j != y and
    dL/dw_y = (p~_y - 1) a - lam S_y sum_{j != y} p~_j (w_j - w_y), averaged over the batch."""
    head = _head(dtype=torch.float64)
    lam = 0.7
    isda = ISDALoss.for_head(head, covariance=covariance, lambda0=lam)
    _feed(isda, head, [_data(40, seed=1)])
    f, y = _data(9, seed=6)
    f = f.double()
    z = head(f)
    loss = isda.per_sample_loss(f, z, y, head).mean()  # updates the statistics first, then the loss
    gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    w = head.weight.detach()
    table = isda.cov.double()  # the statistics the loss used
    expect_w = torch.zeros_like(w)
    expect_b = torch.zeros(C, dtype=torch.float64)
    for i in range(9):
        k = int(y[i])
        s = table[k] if table.dim() == 3 else torch.diag(table[k])
        zt = direct_surrogate(z.detach()[i:i + 1], y[i:i + 1], w, table, lam)[0]
        p = torch.softmax(zt, 0)
        for j in range(C):
            if j != k:
                expect_w[j] += p[j] * f[i] + lam * p[j] * s @ (w[j] - w[k])
                expect_w[k] -= lam * p[j] * s @ (w[j] - w[k])
        expect_w[k] += (p[k] - 1) * f[i]
        expect_b += p - F.one_hot(y[i], C).double()
    assert torch.allclose(gw, expect_w / 9, atol=1e-10)
    assert torch.allclose(gb, expect_b / 9, atol=1e-10)
    # without the quadratic-term gradient the two would differ: the check can fail
    logits_only = F.cross_entropy(direct_surrogate(head(f), y, w, table, lam), y)
    assert not torch.allclose(gw, torch.autograd.grad(logits_only, head.weight)[0], atol=1e-6)


# ------------------------------------------------------------------------------------------ schedule
def test_lambda_schedule():
    isda = ISDALoss(C, A, lambda0=0.5)
    assert isda.lam == 0.5
    isda.set_epoch(0, 10)
    assert isda.lam == 0.0
    isda.set_epoch(4, 10)
    assert abs(isda.lam - 0.2) < 1e-7
    with pytest.raises(ConfigurationError, match="progress"):
        isda.set_progress(1.5)
    head = _head()
    auto = ISDALoss.for_head(head, lambda0=0.5, total_steps=4)
    lams = []
    for s in range(6):
        f, y = _data(8, seed=s)
        auto.per_sample_loss(f, head(f), y, head)
        lams.append(auto.lam)
    assert lams == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])


# ------------------------------------------------------------------------------------------ errors, state
def _trained_isda(**kw):
    head = _head()
    isda = ISDALoss.for_head(head, **kw)
    _feed(isda, head, [_data(20, seed=1), _data(20, seed=2)])
    return head, isda


def _sd(isda):
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in isda.state_dict().items()}


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k


BAD = {
    "feature width": (lambda f, z, y, h: (f[:, :-1], z, y, h), ShapeError, "features have shape"),
    "non-linear head": (lambda f, z, y, h: (f, z, y, nn.Conv2d(A, C, 3)), UnsupportedHeadError, "Conv2d"),
    "other head": (lambda f, z, y, h: (f, z, y, nn.Linear(A + 1, C)), ShapeError, "head's weight"),
    "class index": (lambda f, z, y, h: (f, z, torch.full_like(y, C), h), TargetError, "labels in"),
    "NaN features": (lambda f, z, y, h: (f.index_fill(0, torch.tensor([2]), float("nan")), z, y, h),
                     NonFiniteError, "NaN"),
    "soft width": (lambda f, z, y, h: (f, z, torch.full((f.shape[0], C + 1), 1.0 / (C + 1)), h), ShapeError, "columns"),
    "logit width": (lambda f, z, y, h: (f, torch.cat([z, z], 1), y, h), ShapeError, "classes"),
    "no features": (lambda f, z, y, h: (None, z, y, h), ShapeError, "features="),
    "row count": (lambda f, z, y, h: (f[:-1], z, y, h), ShapeError, "features have shape"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_bad_input_typed_error_state_unchanged(case, covariance):
    head, isda = _trained_isda(covariance=covariance, total_steps=10)
    make, err, words = BAD[case]
    f, y = _data(8, seed=3)
    before = _sd(isda)
    with pytest.raises(err, match=words) as info:
        isda.per_sample_loss(*make(f, head(f), y, head))
    assert isinstance(info.value, AugplugError) and info.value.fix
    _same(before, _sd(isda))


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_failure_while_computing_the_loss_changes_nothing(monkeypatch, covariance):
    """The update is prepared, the loss computed from it, and only then written: a failure in between
    (here an out-of-memory in the quadratic terms) leaves every buffer as it was."""
    head, isda = _trained_isda(covariance=covariance, total_steps=10)
    before = _sd(isda)
    import augplug.isda as mod

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(mod, "_diagonal_quadratic" if covariance == "diagonal" else "_FullQuadratic",
                        type("Boom", (), {"apply": staticmethod(boom)}) if covariance == "full" else boom)
    f, y = _data(8, seed=3)
    snap = isda.state_snapshot()
    with pytest.raises(RuntimeError, match="out of memory"):
        isda.per_sample_loss(f, head(f), y, head)
    _same(before, _sd(isda))
    isda.restore_snapshot(snap)  # what the refiner does: exact, nothing to undo
    _same(before, _sd(isda))
    monkeypatch.undo()
    isda.per_sample_loss(f, head(f), y, head)
    assert not torch.equal(isda.cov, before["cov"])
    with pytest.raises(ConfigurationError, match="completed call"):
        isda.restore_snapshot(snap)  # a completed call is final


def test_state_dict_round_trip_resumes_identically():
    head, isda = _trained_isda(covariance="full", decay=0.9, total_steps=7)
    buf = io.BytesIO()
    torch.save(isda.state_dict(), buf)
    buf.seek(0)
    fresh = ISDALoss.for_head(head, covariance="full", decay=0.9, total_steps=7)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    _same(_sd(isda), _sd(fresh))
    f, y = _data(8, seed=9)
    assert torch.equal(isda.per_sample_loss(f, head(f), y, head), fresh.per_sample_loss(f, head(f), y, head))
    _same(_sd(isda), _sd(fresh))
    wrong = ISDALoss.for_head(head, covariance="diagonal")
    before = _sd(wrong)
    with pytest.raises(ConfigurationError, match="covariance"):
        wrong.load_state_dict(isda.state_dict())
    _same(before, _sd(wrong))


def test_bad_options():
    for kw, words in [(dict(covariance="low-rank"), "covariance"), (dict(decay=1.0), "decay"),
                      (dict(lambda0=-1), "lambda0"), (dict(stats_targets="max"), "stats_targets"),
                      (dict(total_steps=0), "total_steps")]:
        with pytest.raises(ConfigurationError, match=words):
            ISDALoss(C, A, **kw)


# ------------------------------------------------------------------------------------------ standalone
def test_standalone_for_model_hooks_features_and_matches_explicit_features():
    torch.manual_seed(0)
    model = MLP(8, C, hidden=A, depth=1, dropout=0.0)
    twin = copy.deepcopy(model)
    crit = ISDALoss.for_model(model, num_classes=C, lambda0=0.5)
    ref = ISDALoss.for_head(twin.fc, lambda0=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, C, (16,), generator=g)
        loss = crit(model(x), y)
        loss2 = ref(twin(x), y, features=twin.body(x))
        assert torch.allclose(loss, loss2, atol=1e-6)
        for o, l in ((opt, loss), (opt2, loss2)):
            o.zero_grad()
            l.backward()
            o.step()
    assert torch.allclose(crit.cov, ref.cov, atol=1e-5) and float(crit.count.sum()) == 48
    soft = torch.softmax(torch.randn(16, C), 1)
    assert crit(model(x), soft).shape == ()
    crit.remove_hooks()
    with pytest.raises(ShapeError, match="features="):
        crit(model(x), y)


def test_standalone_reads_the_features_of_the_forward_its_logits_come_from():
    """A second training forward of the same size after the one whose logits are passed (the
    originals' forward in a separate loss term) does not lend its features to the loss."""
    torch.manual_seed(0)
    model = MLP(8, C, hidden=A, depth=1, dropout=0.0)
    crit = ISDALoss.for_model(model, num_classes=C, lambda0=0.5)
    ref = ISDALoss.for_head(copy.deepcopy(model).fc, lambda0=0.5)
    g = torch.Generator().manual_seed(0)
    x_aug, x, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.randint(0, C, (16,), generator=g)
    out_aug = model(x_aug)
    model(x)
    with torch.no_grad():
        features = model.body(x_aug)
    torch.testing.assert_close(crit(out_aug, y), ref(out_aug, y, features=features))
    crit.remove_hooks()


def test_timm_model_and_head_kinds():
    import timm
    model = timm.create_model("resnet10t", num_classes=C, pretrained=False)
    crit = ISDALoss.for_model(model)
    assert crit.feature_dim == 512 and crit.covariance == "full"
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 3])
    loss = crit(model(x), y)
    loss.backward()
    assert model.get_classifier().weight.grad is not None and float(crit.count.sum()) == 4

    class ConvHead(nn.Module):  # pooled features, 1x1 conv classifier: supported
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, A, 3), nn.AdaptiveAvgPool2d(1))
            self.classifier = nn.Conv2d(A, C, 1)

        def forward(self, x):
            return self.classifier(self.body(x)).flatten(1)

    m = ConvHead()
    crit = ISDALoss.for_model(m, classifier=m.classifier)
    xx = torch.randn(6, 1, 8, 8)
    out = crit(m(xx), torch.arange(6) % C)
    lin = nn.Linear(A, C)
    lin.weight.data.copy_(m.classifier.weight.data.flatten(1))
    lin.bias.data.copy_(m.classifier.bias.data)
    ref = ISDALoss.for_head(lin)
    feats = m.body(xx).flatten(1)
    assert torch.allclose(out, ref(lin(feats), torch.arange(6) % C, features=feats), atol=1e-6)

    with pytest.raises(UnsupportedHeadError, match="ISDA"):
        ISDALoss.for_model(nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, C, 3)))

    class Distilled(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.head_dist = nn.Linear(A, C), nn.Linear(A, C)

        def get_classifier(self):
            return self.head, self.head_dist

    with pytest.raises(UnsupportedHeadError, match="distilled"):
        ISDALoss.for_model(Distilled())
    assert ISDALoss.for_model(Distilled(), classifier="head").num_classes == C


# ------------------------------------------------------------------------------------------ refiner
def _val_loader():
    g = torch.Generator().manual_seed(7)
    ds = TensorDataset(torch.randn(24, 8, generator=g), torch.randint(0, C, (24,), generator=g))
    return DataLoader(ds, batch_size=12, shuffle=False)


@pytest.mark.parametrize("method", ["saflex", "none"])
def test_refiner_composition_equals_hand_computation(method):
    torch.manual_seed(0)
    model = MLP(8, C, hidden=A, depth=1, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = SAflex(weighting="soft") if method == "saflex" else method   # per-sample weights to check
    r = AugmentationRefiner(model, opt, _val_loader(), method=policy, isda={"lambda0": 0.6, "covariance": "full"})
    assert isinstance(r.isda, ISDALoss) and r.isda.lambda0 == 0.6
    feats, soft_seen = [], []
    for s in range(3):
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(12, 8, generator=g), torch.randint(0, C, (12,), generator=g)
        before = copy.deepcopy(r.isda)
        loss = r(model(x), y, num_original=4)
        st = r.stats
        feats.append(model.body(x).detach())
        soft_seen.append(st["soft_targets"])
        # statistics: pooled covariance of every feature seen, weighted by the refined soft targets
        n, mu, cov = weighted_stats(torch.cat(feats), torch.cat(soft_seen))
        assert torch.allclose(r.isda.cov.double(), cov, atol=1e-4, rtol=1e-4)
        # loss: refiner weights times the per-sample ISDA loss (direct loop), normalized as the refiner does
        with torch.no_grad():
            logits = model(x).double()
            per = sum(st["soft_targets"][:, k].double() * F.cross_entropy(
                direct_surrogate(logits, torch.full((12,), k), model.fc.weight, r.isda.cov, 0.6),
                torch.full((12,), k), reduction="none") for k in range(C))
        aug = st["augmented"]
        lam = st["aug_weight"]   # the augmented rows' share (adaptive by default for SAflex)
        coef = torch.where(aug, lam * st["weights"].double(), torch.ones(12, dtype=torch.float64))
        hand = (coef * per).sum() / (4 + lam * 8)
        assert torch.allclose(loss.double(), hand, atol=1e-5)
        if method == "saflex":
            assert st["active"] and not torch.allclose(st["weights"][aug], torch.ones(8))
        opt.zero_grad()
        loss.backward()
        assert model.fc.weight.grad is not None
        opt.step()
        assert before.steps + 1 == r.isda.steps
    state = r.state_dict()
    assert torch.equal(state["isda"]["cov"], r.isda.cov)


def test_refiner_rejected_call_leaves_isda_unchanged():
    torch.manual_seed(0)
    model = MLP(8, C, hidden=A, depth=1, dropout=0.0)
    r = AugmentationRefiner(model, None, _val_loader(), method="saflex", isda=True)
    x, y = torch.randn(12, 8), torch.randint(0, C, (12,))
    r(model(x), y, num_original=4)
    before = _sd(r.isda)
    bad = y.clone()
    bad[3] = C
    with pytest.raises(TargetError):
        r(model(x), bad, num_original=4)
    _same(before, _sd(r.isda))
    # an instance can be passed as is, and must be built for the model's head
    inst = ISDALoss.for_head(model.fc, lambda0=0.25)
    assert AugmentationRefiner(model, None, _val_loader(), method="none", isda=inst).isda is inst


def test_docs_standalone_example_runs():
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "isda.md"
    block = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)[0]
    torch.manual_seed(0)
    model = MLP(8, C, hidden=A, depth=1, dropout=0.0)
    data = TensorDataset(torch.randn(24, 8), torch.randint(0, C, (24,)))
    ns = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "epochs": 2,
          "loader": DataLoader(data, batch_size=8)}
    exec(compile(block, str(doc), "exec"), ns)
    crit = ns["criterion"]
    assert int(crit.steps) == 6 and float(crit.count.sum()) == 48 and crit.lam == pytest.approx(0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the batched default applies on a GPU")
def test_cuda_default_is_batched_and_matches_class_by_class():
    heads = [_head().cuda() for _ in range(2)]
    losses = [ISDALoss.for_head(h, covariance="full", lambda0=0.7, batched=b) for h, b in zip(heads, (None, False))]
    for step in range(3):
        f, y = _data(16, seed=40 + step)
        out = _train_each(heads, losses, f.cuda(), y.cuda())
        assert losses[0]._batched() and not losses[1]._batched()
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses[0].cov, losses[1].cov, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- failures after the ISDA loss
def _isda_refiner():
    torch.manual_seed(0)
    model = MLP(8, 3, hidden=4, depth=1, dropout=0.0)
    val = DataLoader(TensorDataset(torch.randn(12, 8), torch.randint(0, 3, (12,))), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, AugmentationRefiner(model, opt, val, method="saflex", isda=True, schedule=dict(budget=None))


def _isda_buffers(isda):
    return [b.clone() for b in (isda.count, isda.mean, isda.cov, isda.steps, isda.progress)]


def test_a_call_failing_after_the_isda_loss_keeps_its_own_error_and_the_statistics():
    """The refiner writes the ISDA statistics at its commit, with everything else: an interrupt
    after the ISDA loss (here in the weights' normalization) propagates as itself, and the
    statistics, like every other state, are as before; the retry equals a run without it."""
    x, y = torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 3

    def run(interrupt):
        model, opt, r = _isda_refiner()
        losses = []
        for step in range(3):
            if interrupt and step == 1:
                before = _isda_buffers(r.isda)
                normalize = r._normalize
                r._normalize = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
                with pytest.raises(KeyboardInterrupt):
                    r(model(x), y, num_original=4)
                r._normalize = normalize
                assert all(torch.equal(a, b) for a, b in zip(before, _isda_buffers(r.isda)))
            loss = r(model(x), y, num_original=4)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, _isda_buffers(r.isda)

    twin, twin_buffers = run(False)
    got, buffers = run(True)
    assert got == twin and all(torch.equal(a, b) for a, b in zip(buffers, twin_buffers))


@pytest.mark.parametrize("lambda0", [0.5, 0.0], ids=["loss-overflows-too", "loss-finite"])
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_features_that_would_overflow_the_statistics_are_refused_and_change_nothing(covariance, lambda0):
    head = _head()
    isda = ISDALoss.for_head(head, covariance=covariance, lambda0=lambda0)   # lambda0=0: the loss is plain CE
    f, y = _data()
    isda(head(f[:10]), y[:10], features=f[:10])
    before = _isda_buffers(isda)
    huge = f[10:20] * 1e20   # finite, but its squares are beyond fp32
    with pytest.raises(NonFiniteError, match="statistics"):
        isda(head(huge), y[10:20], features=huge)
    assert all(torch.equal(a, b) for a, b in zip(before, _isda_buffers(isda)))
    assert torch.isfinite(isda(head(f[20:30]), y[20:30], features=f[20:30]))


@pytest.mark.parametrize("key, value", [("count", -2.0), ("progress", 7.0), ("steps", -1)])
def test_a_state_with_values_no_run_reaches_is_refused(key, value):
    head = _head()
    isda = ISDALoss.for_head(head, covariance="full")
    f, y = _data()
    isda(head(f), y, features=f)
    state = copy.deepcopy(isda.state_dict())
    bad = copy.deepcopy(state)
    if key == "count":
        bad[key][0] = value
    else:
        bad[key] = torch.tensor(value, dtype=state[key].dtype)
    before = _isda_buffers(isda)
    with pytest.raises(ConfigurationError, match="no run can reach"):
        isda.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, _isda_buffers(isda)))
    isda.load_state_dict(state)


def test_the_no_features_error_names_removed_hooks_and_a_second_call_on_one_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    crit = ISDALoss.for_model(model)
    out = model(x)
    crit(out, y)
    with pytest.raises(ShapeError, match="a second call on one forward finds none"):
        crit(out, y.flip(0))
    crit.remove_hooks()
    with pytest.raises(ShapeError, match=r"hook was removed \(remove_hooks\(\)\)"):
        crit(model(x), y)
