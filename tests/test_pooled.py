"""Pooled evidence: per-(source, class) weights from agreements accumulated over many rows."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner, SAflex
from augplug.errors import ConfigurationError, ShapeError
from augplug.methods.saflex import normalize_scores
from augplug.pooled import PooledEvidence
from augplug.scores import last_layer_scores


def _by_hand(batches, sources=2, classes=2, decay=0.5):
    """Tables from the module docstring's formulas, loop by loop. ``batches``: (src, y, a, ref) with
    ref None or (y_orig, a_orig)."""
    n = np.zeros((sources, classes)); A = np.zeros((sources, classes)); Q = np.zeros((sources, classes))
    for src, y, a, ref in batches:
        n, A, Q = decay * n, decay * A, decay * Q
        rms = math.sqrt(sum(float(v) ** 2 for v in a) / len(a))
        r = np.zeros(classes)
        for c in range(classes):
            if ref is not None and float(ref[0][:, c].sum()) > 0:
                r[c] = sum(float(ref[0][j, c] * ref[1][j]) for j in range(len(ref[1]))) / float(ref[0][:, c].sum())
            else:
                r[c] = sum(float(y[i, c] * a[i]) for i in range(len(a))) / float(y[:, c].sum())
        for i in range(len(a)):
            for c in range(classes):
                d = (float(a[i]) - r[c]) / rms
                n[src[i], c] += float(y[i, c])
                A[src[i], c] += float(y[i, c]) * d
                Q[src[i], c] += float(y[i, c]) * d * d
    return n, A, Q


def test_tables_and_weights_by_hand():
    pool = PooledEvidence(2, decay=0.5, temperature=2.0)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [1.0, 0.0], [1.0, 0.0]])
    src = torch.tensor([0, 0, 1, 1, 1])
    a = torch.tensor([0.5, -1.0, 2.0, -0.5, 0.1])
    ref = (torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.4, 0.2]))  # originals of class 0 only
    pool.tables = pool.updated(src, y, a)
    pool.tables = pool.updated(src, y, 2 * a, ref)
    n, A, Q = _by_hand([(src, y, a, None), (src, y, 2 * a, ref)])
    np.testing.assert_allclose(pool.tables.numpy(), np.stack([n, A, Q]), rtol=1e-6, atol=1e-9)
    w = np.ones((2, 2))
    overall = A.sum() / n.sum()
    for s in range(2):
        for c in range(2):
            if n[s, c] >= 2:
                m = A[s, c] / n[s, c]
                v = max(Q[s, c] / n[s, c] - m * m, 0.0)
                t = (m - overall) / max(math.sqrt(v / n[s, c]), 1e-12)
                w[s, c] = 2 / (1 + math.exp(-t / 2.0))
    np.testing.assert_allclose(pool.group_weights().numpy(), w, rtol=1e-6)
    # a row's weight mixes its classes' group weights by its target
    np.testing.assert_allclose(pool.weights(src, y).numpy(), (y.double().numpy() * w[src.numpy()]).sum(1), rtol=1e-6)


def _simulate(means, updates=200, rows=64, seed=0):
    """Agreements of rows from len(means) sources, source s with mean means[s] (one class)."""
    g = torch.Generator().manual_seed(seed)
    pool = PooledEvidence(len(means))
    y = torch.ones(rows, 1)
    for _ in range(updates):
        src = torch.randint(0, len(means), (rows,), generator=g)
        a = torch.randn(rows, generator=g) + torch.tensor(means)[src]
        pool.tables = pool.updated(src, y, a)
    return pool.group_weights()[:, 0]


def test_a_consistently_harmful_source_is_weighted_down():
    w = _simulate([0.0, 0.0, -0.3])
    assert float(w[2]) < 0.05
    # the others help their class more than its average row (which the harmful source pulls down)
    assert all(float(x) > 1.5 for x in w[:2])


def test_pure_noise_leaves_the_weights_near_one_on_average():
    """Every source drawn alike: t is noise around 0, so the mean weight stays near 1 (the weights do
    not drift one way)."""
    ws = torch.cat([_simulate([0.0] * 4, updates=100, seed=s) for s in range(10)])
    assert abs(float(ws.mean()) - 1.0) < 0.1
    assert float(ws.min()) > 0.3


def test_bad_sources_and_options_raise():
    pool = PooledEvidence(3)
    for bad, match in ((None, "missing"), (torch.tensor([0.0, 1.0]), "integer ids"), (torch.tensor([0, 3]), "outside"),
                       (torch.tensor([0]), "shape")):
        with pytest.raises(ShapeError, match=match):
            pool.check_sources(bad, 2, "cpu")
    for kw in (dict(num_sources=0), dict(num_sources=2, decay=0.0), dict(num_sources=2, temperature=-1.0)):
        with pytest.raises(ConfigurationError):
            PooledEvidence(**kw)
    with pytest.raises(ConfigurationError, match="pool"):
        SAflex(pool="ops")


def _rig(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed)
    xv, yv = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, DataLoader(TensorDataset(xv, yv), batch_size=32),
                            method=SAflex(pool=4, strength=1.0), schedule=dict(refresh_every=1))
    return model, opt, r, g


def test_refiner_weights_come_from_the_evidence_before_the_batch():
    model, opt, r, g = _rig()
    for step in range(6):
        x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
        src = torch.randint(0, 4, (24,), generator=g)
        before = PooledEvidence(4)
        before.load_state_dict(r.policy.state_dict())
        loss = r(model(x), y, num_original=8, sources=src)
        st = r.stats
        # the per-sample SAflex weight times the pooled weight of the tables as they were
        ya, yo = F.one_hot(y[8:], 3).float(), F.one_hot(y[:8], 3).float()
        g_aug = st["scores"][8:]
        per_sample = 2 * torch.sigmoid((ya * normalize_scores(g_aug, "center")).sum(-1))
        expected = per_sample * before.weights(src[8:], ya)
        expected = expected * (16 / expected.sum())  # weight_norm="auto" beside originals: mean 1
        torch.testing.assert_close(st["weights"][8:], expected, rtol=1e-5, atol=1e-6)
        # and the batch was added after, against the originals' agreements (closed-form scores)
        v = r.validation_direction
        g_orig = last_layer_scores(model[:2](x[:8]), model(x[:8]), v["2.weight"], v["2.bias"])
        after = before.updated(src[8:], ya, (ya * g_aug).sum(-1), (yo, (yo * g_orig).sum(-1)))
        torch.testing.assert_close(r.policy.pool.tables, after)
        opt.zero_grad(); loss.backward(); opt.step()


def test_a_call_checks_its_sources_once(monkeypatch):
    """The check reads the ids back (a device sync on a GPU): the refiner's check before the call and
    the refinement share it, also for a new tensor of the same ids at the next call."""
    model, opt, r, g = _rig()
    checks = []
    original = PooledEvidence.check_sources
    monkeypatch.setattr(PooledEvidence, "check_sources", lambda self, *a: checks.append(1) or original(self, *a))
    for step in range(3):
        x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
        src = torch.randint(0, 4, (24,), generator=g)
        loss = r(model(x), y, num_original=8, sources=src)
        assert len(checks) == step + 1 and r.stats["active"]
        opt.zero_grad(); loss.backward(); opt.step()


def test_rejected_call_and_state_round_trip():
    model, opt, r, g = _rig()
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    src = torch.randint(0, 4, (24,), generator=g)
    r(model(x), y, num_original=8, sources=src)
    saved = r.state_dict()
    tables = r.policy.pool.tables.clone()
    with pytest.raises(ShapeError, match="sources"):
        r(model(x), y, num_original=8)
    with pytest.raises(ShapeError, match="outside"):
        r(model(x), y, num_original=8, sources=src + 4)
    assert torch.equal(r.policy.pool.tables, tables)
    _, _, r2, _ = _rig()
    r2.load_state_dict(saved)
    assert torch.equal(r2.policy.pool.tables, tables)
    # a state without the tables (saved without pooling) is refused
    plain = AugmentationRefiner(model, None, r.val_loader)
    with pytest.raises(ConfigurationError, match="policy"):
        plain.load_state_dict(saved)
    table = r.policy.pool.table()
    assert table and {"source", "class", "rows", "mean_agreement", "t", "weight"} <= set(table[0])
    assert [row["weight"] for row in table] == sorted(row["weight"] for row in table)


def test_a_call_failing_after_the_policy_ran_leaves_the_tables(monkeypatch):
    model, opt, r, g = _rig()
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    src = torch.randint(0, 4, (24,), generator=g)
    r(model(x), y, num_original=8, sources=src)
    tables = r.policy.pool.tables.clone()

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(r, "_normalize", fail)
    with pytest.raises(RuntimeError, match="injected"):
        r(model(x), y, num_original=8, sources=src)
    assert torch.equal(r.policy.pool.tables, tables)
    monkeypatch.undo()
    r(model(x), y, num_original=8, sources=src)  # and the next call adds its batch once
    assert not torch.equal(r.policy.pool.tables, tables)


@pytest.mark.parametrize("method", ["saflex", "none", "l2rw"])
def test_sources_for_a_method_that_does_not_pool_warn_once(method):
    """``sources=`` passed to a method that does not pool evidence by source is not read: one warning
    names SAflex(pool=...); a pooling method takes them without a warning."""
    import warnings
    _, _, pooled, g = _rig()
    model = pooled.model
    x, y, src = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g), torch.zeros(24, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pooled(model(x), y, num_original=8, sources=src)
    r = AugmentationRefiner(model, None, pooled.val_loader, method=method)
    with pytest.warns(RuntimeWarning, match=r"SAflex\(pool=") as record:
        for _ in range(3):
            r(model(x), y, num_original=8, sources=src)
    assert sum("sources=" in str(w.message) for w in record) == 1
