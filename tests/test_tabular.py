"""Tabular CutMix (dtypes, domains, probability, seeds, global RNG, labels, errors) and the tabular MLP
with the ordinary AugmentationRefiner (scores against the per-sample-gradient oracle)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.errors import AugplugError, ConfigurationError, NonFiniteError, ShapeError, TargetError
from augplug.tabular import TabularCutMix, TabularMLP, tabular_cutmix

from conftest import brute_force_class_scores


def _table(n=64, dn=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(n, dn, generator=g)
    # categorical columns with different, non-contiguous domains
    x_cat = torch.stack([torch.randint(0, 3, (n,), generator=g) * 5,
                         torch.randint(0, 7, (n,), generator=g) + 100,
                         torch.randint(0, 2, (n,), generator=g)], 1)
    y = torch.randint(0, 4, (n,), generator=g)
    return x_num, x_cat, y


def test_dtypes_shapes_and_categorical_domains():
    x_num, x_cat, y = _table()
    cm = TabularCutMix(p=0.8, proportion=(0.2, 0.6), seed=1, return_mask=True)
    xn, xc, yn, aug = cm(x_num, x_cat, y)
    assert xn.dtype == x_num.dtype and xc.dtype == x_cat.dtype and yn.dtype == y.dtype
    assert xn.shape == x_num.shape and xc.shape == x_cat.shape and torch.equal(yn, y)
    assert aug.dtype == torch.bool and 0 < int(aug.sum()) < len(y)
    for c in range(x_cat.shape[1]):
        assert set(xc[:, c].tolist()) <= set(x_cat[:, c].tolist())
    # every row is its own row on some columns and one other row on the rest
    full_in, full_out = torch.cat([x_num, x_cat.float()], 1), torch.cat([xn, xc.float()], 1)
    for i in range(len(y)):
        diff = full_out[i] != full_in[i]
        if not aug[i]:
            assert not diff.any()
            continue
        donors = [j for j in range(len(y)) if j != i and torch.equal(full_out[i][diff], full_in[j][diff])]
        assert donors
    # inputs untouched
    assert torch.equal(x_num, _table()[0]) and torch.equal(x_cat, _table()[1])


def test_single_tensor_with_categorical_mask_keeps_codes():
    x_num, x_cat, y = _table(n=50)
    x = torch.cat([x_num, x_cat.double().float()], 1)
    mask = torch.tensor([False] * 5 + [True] * 3)
    xo, yo = TabularCutMix(p=1.0, proportion=0.5, categorical=mask, seed=0)(x, y)
    assert xo.dtype == x.dtype and torch.equal(yo, y)
    assert torch.equal(xo[:, mask], xo[:, mask].round())
    for c in range(5, 8):
        assert set(xo[:, c].tolist()) <= set(x[:, c].tolist())
    # the same with column indices instead of a mask
    xo2, _ = TabularCutMix(p=1.0, proportion=0.5, categorical=[5, 6, 7], seed=0)(x, y)
    assert torch.equal(xo, xo2)
    bad = x.clone()
    bad[0, 6] = 100.5
    with pytest.raises(TargetError, match="non-integer"):
        TabularCutMix(categorical=mask)(bad, y)


def test_probability_and_proportion_statistically():
    n, p = 4000, 0.3
    x = torch.randn(n, 8)
    y = torch.zeros(n, dtype=torch.long)
    xo, _, aug = TabularCutMix(p=p, proportion=0.25, seed=5, return_mask=True)(x, y)
    rate = float(aug.float().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < 5 * sigma, rate
    replaced = (xo != x).sum(1)
    assert torch.all(replaced[~aug] == 0)
    assert torch.all(replaced[aug] == 2)  # round(0.25 * 8) columns, continuous values never coincide
    # p = 0 and proportion = 0 change nothing; p = 1 changes every row
    for kw in (dict(p=0.0), dict(p=1.0, proportion=0.0)):
        out, _, a = TabularCutMix(seed=0, return_mask=True, **kw)(x, y)
        assert torch.equal(out, x) and not a.any()
    _, _, a = TabularCutMix(p=1.0, proportion=0.5, seed=0, return_mask=True)(x, y)
    assert a.all()
    # a proportion range: mean replaced share close to its midpoint
    x10 = torch.randn(n, 10)
    xo, _, aug = TabularCutMix(p=1.0, proportion=(0.0, 1.0), seed=2, return_mask=True)(x10, y)
    share = (xo != x10).float().mean(1)
    assert abs(float(share.mean()) - 0.5) < 0.03
    assert float(share.min()) == 0.0 and float(share.max()) == 1.0


def test_reproducible_under_seed_and_resume():
    x_num, x_cat, y = _table()
    a, b = TabularCutMix(p=0.5, seed=7), TabularCutMix(p=0.5, seed=7)
    outs_a = [a(x_num, x_cat, y) for _ in range(3)]
    outs_b = [b(x_num, x_cat, y) for _ in range(3)]
    for oa, ob in zip(outs_a, outs_b):
        assert all(torch.equal(u, v) for u, v in zip(oa, ob))
    assert not torch.equal(outs_a[0][0], outs_a[1][0])  # the stream advances
    c = TabularCutMix(p=0.5, seed=8)
    assert not torch.equal(c(x_num, x_cat, y)[0], outs_a[0][0])
    # resume from a saved state
    d = TabularCutMix(p=0.5, seed=7)
    d(x_num, x_cat, y)
    state = d.state_dict()
    e = TabularCutMix(p=0.5, seed=123)
    e.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(e(x_num, x_cat, y), outs_a[1]))


def test_global_rng_untouched():
    x_num, x_cat, y = _table()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    TabularCutMix(p=0.9, seed=0)(x_num, x_cat, y)
    tabular_cutmix(x_num, y, x_cat, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_label_mix_by_replaced_share():
    n, d, c = 200, 10, 4
    x = torch.arange(n, dtype=torch.float32)[:, None] * 100 + torch.arange(d)  # row id readable from values
    y = torch.arange(n) % c
    xo, _, ym, aug = tabular_cutmix(x, y, p=1.0, proportion=(0.1, 0.9), label="mix", num_classes=c,
                                    generator=torch.Generator().manual_seed(0))
    assert ym.shape == (n, c) and torch.allclose(ym.sum(1), torch.ones(n))
    for i in range(n):
        changed = xo[i] != x[i]
        r = float(changed.float().mean())
        expect = (1 - r) * F.one_hot(y[i], c).float()
        if changed.any():
            j = int(xo[i][changed][0] // 100)
            expect = expect + r * F.one_hot(y[j], c).float()
        assert torch.allclose(ym[i], expect, atol=1e-6)
    # soft input targets are mixed the same way
    soft = torch.softmax(torch.randn(n, c), 1)
    _, _, ys, _ = tabular_cutmix(x, soft, p=1.0, proportion=0.5, label="mix", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ys.sum(1), torch.ones(n))


def test_groups_swap_together():
    n = 300
    onehot = F.one_hot(torch.randint(0, 4, (n,)), 4).float()  # a one-hot encoded category in columns 2..5
    x = torch.cat([torch.randn(n, 2), onehot, torch.randn(n, 2)], 1)
    y = torch.zeros(n, dtype=torch.long)
    xo, _ = TabularCutMix(p=1.0, proportion=(0.2, 0.8), groups=[[2, 3, 4, 5]], seed=0)(x, y)
    assert torch.equal(xo[:, 2:6].sum(1), torch.ones(n))  # still one-hot in every row


@pytest.mark.parametrize("call,err", [
    (lambda: TabularCutMix(p=1.5), ConfigurationError),
    (lambda: TabularCutMix(proportion=(0.6, 0.2)), ConfigurationError),
    (lambda: TabularCutMix(label="blend"), ConfigurationError),
    (lambda: tabular_cutmix(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ShapeError),
    (lambda: tabular_cutmix(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2)), TargetError),
    (lambda: tabular_cutmix(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), label="mix"), ConfigurationError),
    (lambda: tabular_cutmix(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), groups=[[0, 7]]), ConfigurationError),
    (lambda: tabular_cutmix(None, torch.zeros(4, dtype=torch.long)), ShapeError),
])
def test_bad_input_typed_errors(call, err):
    with pytest.raises(err) as info:
        call()
    assert isinstance(info.value, AugplugError) and info.value.fix


def test_rejected_batch_leaves_generator_unchanged():
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    cm = TabularCutMix(seed=3)
    state = cm.state_dict()["generator"].clone()
    with pytest.raises(NonFiniteError):
        cm(x, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ShapeError):
        cm(torch.randn(8, 3), torch.zeros(8, 2, dtype=torch.long), torch.zeros(7, dtype=torch.long))
    assert torch.equal(cm.state_dict()["generator"], state)


def test_tabular_mlp_options_and_embeddings():
    m = TabularMLP(6, 3, hidden=256, depth=2, dropout=0.2, batch_norm=True)
    assert sum(isinstance(l, torch.nn.BatchNorm1d) for l in m.modules()) == 2
    assert m.fc is m.mlp.fc and m.fc.in_features == 256
    x_num, x_cat, _ = _table(n=10, dn=3)
    me = TabularMLP(3, 4, cat_cardinalities=(11, 107, 2), embed_dim=4, hidden=16, dropout=0.0)
    assert me(x_num, x_cat).shape == (10, 4)
    ms = TabularMLP(6, 4, cat_cardinalities=(11, 107, 2), cat_columns=[3, 4, 5], embed_dim=4, hidden=16, dropout=0.0)
    ms.load_state_dict(me.state_dict())
    assert torch.allclose(ms(torch.cat([x_num, x_cat.float()], 1)), me(x_num, x_cat))


@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_refiner_with_tabular_mlp_matches_oracle(mode):
    torch.manual_seed(0)
    n, c = 48, 3
    x_num, x_cat, _ = _table(n=n, dn=4, seed=1)
    x = torch.cat([x_num, x_cat.float()], 1).double()
    y = torch.randint(0, c, (n,))
    model = TabularMLP(7, c, cat_cardinalities=(11, 107, 2), cat_columns=[4, 5, 6], embed_dim=3, hidden=12,
                       dropout=0.0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    refiner = AugmentationRefiner(model, opt, val, mode=mode, schedule=dict(refresh_every=1))
    cutmix = TabularCutMix(p=0.7, proportion=0.4, categorical=[4, 5, 6], seed=0, return_mask=True)
    xb, yb, aug = cutmix(x[16:], y[16:])
    model.train()
    loss = refiner(model(xb), yb, augmented=aug)
    assert torch.isfinite(loss)
    v = refiner.validation_direction
    model.eval()
    oracle = brute_force_class_scores(model, xb[aug], {k: t.double() for k, t in v.items()}, c)
    got = refiner.stats["scores"][aug].double()
    assert torch.allclose(got, oracle, rtol=1e-4, atol=1e-8)
    assert torch.all(refiner.stats["weights"][~aug] == 1)
