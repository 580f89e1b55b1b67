"""Influence functions: curvature and solves against dense oracles, rankings against leave-one-out
retraining of a convex model, the sign convention against exact replacement retraining, and the
refiner policy against an independent per-sample computation."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.errors import ConfigurationError, NonFiniteError, ShapeError, UnsupportedHeadError
from augplug.methods import renormalize
from augplug.curvature import head_hessian
from augplug.ihvp import conjugate_gradient
from augplug.influence import InfluenceScorer
from augplug.methods.influence import InfluencePolicy, influence_weights, pair_rows
from augplug.models import MLP
from augplug.scores import last_layer_scores
from fault_harness import same as _same

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties), written out to avoid a scipy dependency."""
    def ranks(x):
        x = torch.as_tensor(x, dtype=DT)
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=DT)
        for v in torch.unique(x):  # average the ranks of ties
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_spearman_helper():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # scipy.stats.spearmanr


def _problem(n=40, d=3, c=3, n_val=30, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(c, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g, dtype=DT)
    yv = torch.randint(0, c, (n_val,), generator=g)
    xv = centers[yv] + torch.randn(n_val, d, generator=g, dtype=DT) + shift
    return x, y, xv, yv


def _fit(x, y, lam, c, n_norm=None, theta0=None, iters=30):
    """Exact minimiser of (1/n_norm) sum CE + lam/2 ||theta||^2 by Newton's method (fp64)."""
    n_norm = x.shape[0] if n_norm is None else n_norm

    def f(t):
        M = t.reshape(c, -1)
        return F.cross_entropy(x @ M[:, :-1].t() + M[:, -1], y, reduction="sum") / n_norm + 0.5 * lam * t.pow(2).sum()

    t = torch.zeros(c * (x.shape[1] + 1), dtype=DT) if theta0 is None else theta0.clone()
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, t)
        if float(g.norm()) < 1e-13:
            break
        H = torch.autograd.functional.hessian(f, t)
        t = t - torch.linalg.solve(H, g)
    return t


def _val_loss(theta, xv, yv, c):
    M = theta.reshape(c, -1)
    return float(F.cross_entropy(xv @ M[:, :-1].t() + M[:, -1], yv))


def _head_from(theta, d, c):
    head = nn.Linear(d, c).double()
    M = theta.reshape(c, -1)
    with torch.no_grad():
        head.weight.copy_(M[:, :-1])
        head.bias.copy_(M[:, -1])
    return head


# ----------------------------------------------------------------------------- curvature and solves
def test_head_hessian_matches_autograd():
    x, y, _, _ = _problem()
    head = nn.Linear(3, 3).double()
    theta = torch.cat([head.weight.detach(), head.bias.detach()[:, None]], 1).reshape(-1)

    def f(t):
        M = t.reshape(3, 4)
        return F.cross_entropy(x @ M[:, :-1].t() + M[:, -1], y)

    H = torch.autograd.functional.hessian(f, theta)
    probs = torch.softmax(head(x), -1).detach()
    assert torch.allclose(head_hessian(x, probs), H, atol=1e-12)
    sc = InfluenceScorer(head, damping=0.3).fit(x)
    assert torch.allclose(sc.hessian(), H + 0.3 * torch.eye(12, dtype=DT), atol=1e-12)
    v = torch.randn(12, dtype=DT)
    assert torch.allclose(sc.flatten(sc.hvp(sc.unflatten(v))), (H + 0.3 * torch.eye(12, dtype=DT)) @ v, atol=1e-6)


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_cg_equals_explicit_damped_inverse(damping):
    torch.manual_seed(1)
    head = nn.Linear(6, 4)
    a = torch.randn(50, 6)
    b = {"weight": torch.randn(4, 6), "bias": torch.randn(4)}
    dense = InfluenceScorer(head, damping=damping).fit(a).hessian()
    expect = torch.linalg.solve(dense, InfluenceScorer(head, damping=damping).flatten(b))
    for solver in ("cg", "explicit"):
        sc = InfluenceScorer(head, damping=damping, solver=solver, cg_iters=200, cg_tol=1e-12).fit(a)
        got = sc.flatten(sc.solve(b))
        assert torch.allclose(got, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max())), solver
    # warm start from the answer: no iteration needed
    sc = InfluenceScorer(head, damping=damping, cg_tol=1e-6).fit(a)
    sc.solve(b, x0=sc.unflatten(expect))
    assert sc.info["iters"] <= 1


def test_lissa_converges_to_the_same_answer():
    torch.manual_seed(2)
    head = nn.Linear(4, 3)
    a = torch.randn(30, 4)
    b = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    exact = InfluenceScorer(head, damping=0.2, solver="explicit").fit(a)
    x = exact.flatten(exact.solve(b))
    sc = InfluenceScorer(head, damping=0.2, solver="lissa", lissa_depth=2000).fit(a)
    assert torch.allclose(sc.flatten(sc.solve(b)), x, rtol=1e-4, atol=1e-5)


def test_cg_rejects_negative_curvature():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    with pytest.raises(NonFiniteError):
        conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 1.0], dtype=DT))


@pytest.mark.parametrize("curvature,hvp", [("hessian", "double_backward"), ("hessian", "func"), ("gauss_newton", "double_backward")])
def test_full_scope_on_a_linear_model_equals_last_layer(curvature, hvp):
    x, y, xv, yv = _problem(seed=3)
    model = nn.Sequential(nn.Linear(3, 3)).double()
    last = InfluenceScorer(model[0], damping=0.05, solver="explicit").fit(x)
    s_last = last.set_validation(xv, yv)
    full = InfluenceScorer(model=model, scope="full", damping=0.05, curvature=curvature, hvp=hvp,
                           cg_tol=1e-12).fit(data=[(x[:25], y[:25]), (x[25:], y[25:])])
    s_full = full.set_validation(data=[(xv, yv)])
    assert torch.allclose(s_full["0.weight"], s_last["weight"], atol=1e-5)
    assert torch.allclose(s_full["0.bias"], s_last["bias"], atol=1e-5)
    # the same curvature: equal products on any direction, and equal dense Hessians up to the flat layout
    d = {"weight": torch.randn(3, 3, dtype=DT), "bias": torch.randn(3, dtype=DT)}
    hv_last = last.hvp(d)
    hv_full = full.hvp({"0.weight": d["weight"], "0.bias": d["bias"]})
    assert torch.allclose(hv_full["0.weight"], hv_last["weight"], atol=1e-6)
    assert torch.allclose(hv_full["0.bias"], hv_last["bias"], atol=1e-6)
    perm = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 3, 7, 11])  # [W|b] row-major -> [vec W, b]
    assert torch.allclose(full.hessian(), last.hessian()[perm][:, perm], atol=1e-8)


def test_full_scope_hessian_of_a_small_network():
    """Double-backward HVPs assemble to torch.autograd.functional.hessian of the mean training loss."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    H = torch.autograd.functional.hessian(f, flat0)
    sc = InfluenceScorer(model=model, scope="full", damping=0.5).fit(data=[(x[:5], y[:5]), (x[5:], y[5:])])
    assert torch.allclose(sc.hessian(), H + 0.5 * torch.eye(len(flat0), dtype=DT), atol=1e-6)
    b = sc.unflatten(torch.randn(len(flat0), dtype=DT))
    got = sc.flatten(sc.solve(b))
    assert torch.allclose(got, torch.linalg.solve(H + 0.5 * torch.eye(len(flat0), dtype=DT), sc.flatten(b)), atol=1e-5)


# ----------------------------------------------------------------------------- influence vs retraining
def test_influence_ranks_like_leave_one_out_retraining():
    """L2-regularised multinomial logistic regression (convex): -I_up / n predicts the exact change of the
    validation loss after removing each training point (Spearman >= 0.9, close in value)."""
    lam, c = 0.05, 3
    x, y, xv, yv = _problem(n=40, seed=5)
    n = x.shape[0]
    theta = _fit(x, y, lam, c)
    base = _val_loss(theta, xv, yv, c)
    actual = []
    for j in range(n):
        keep = torch.arange(n) != j
        t_j = _fit(x[keep], y[keep], lam, c, n_norm=n, theta0=theta)  # the (1/n) sum_{i != j} objective
        actual.append(_val_loss(t_j, xv, yv, c) - base)
    head = _head_from(theta, 3, c)
    sc = InfluenceScorer(head, damping=lam, solver="explicit").fit(x)
    sc.set_validation(xv, yv)
    up = sc.upweight_scores(x, head(x), y).detach()
    predicted = up / n                                   # removing z_j: dL_val ~ -I_up(z_j) / n = score / n
    rho = spearman(predicted, actual)
    assert rho >= 0.9, rho
    actual = torch.tensor(actual, dtype=DT)
    assert float((predicted.double() - actual).abs().max()) < 0.25 * float(actual.abs().max())  # first order, n = 40
    # Koh & Liang's sign is the opposite of the package's
    assert torch.allclose(sc.koh_liang_i_up(x, head(x), y), -up)


def test_sign_convention_replacement_lowers_validation_loss_as_predicted():
    """Replacing z by z~ changes the validation loss by about -score / n: positive scores help."""
    lam, c = 0.05, 3
    x, y, xv, yv = _problem(n=40, seed=6, shift=0.7)  # validation shifted: some replacements help, some hurt
    n = x.shape[0]
    theta = _fit(x, y, lam, c)
    base = _val_loss(theta, xv, yv, c)
    head = _head_from(theta, 3, c)
    sc = InfluenceScorer(head, damping=lam).fit(x)
    sc.set_validation(xv, yv)
    g = torch.Generator().manual_seed(0)
    js = torch.arange(0, n, 4)
    deltas = 0.8 * torch.randn(len(js), 3, generator=g, dtype=DT)
    xt = x[js] + deltas
    scores = sc.replacement_scores(xt, head(xt), y[js], x[js], head(x[js]), y[js]).detach().double()
    actual = []
    for k, j in enumerate(js.tolist()):
        x2 = x.clone()
        x2[j] = xt[k]
        actual.append(_val_loss(_fit(x2, y, lam, c, theta0=theta), xv, yv, c) - base)
    actual = torch.tensor(actual, dtype=DT)
    predicted = -scores / n
    clear = scores.abs() > 0.2 * scores.abs().max()
    assert clear.sum() >= 4
    assert torch.equal(torch.sign(actual[clear]), torch.sign(predicted[clear]))
    assert spearman(predicted, actual) >= 0.9
    best = int(scores.argmax())
    assert scores[best] > 0 and actual[best] < 0  # the most helpful replacement lowers the validation loss


def test_upweight_scores_equal_per_sample_gradients_dotted_with_s_val():
    torch.manual_seed(7)
    head = nn.Linear(5, 4).double()
    a = torch.randn(20, 5, dtype=DT)
    y = torch.randint(0, 4, (20,))
    sc = InfluenceScorer(head, damping=0.1).fit(a)
    s = sc.set_validation(torch.randn(9, 5, dtype=DT), torch.randint(0, 4, (9,)))
    expect = []
    for i in range(20):
        gw, gb = torch.autograd.grad(F.cross_entropy(head(a[i:i + 1]), y[i:i + 1]), [head.weight, head.bias])
        expect.append(float((gw * s["weight"].double()).sum() + (gb * s["bias"].double()).sum()))
    got = sc.upweight_scores(a, head(a), y)
    assert torch.allclose(got.double(), torch.tensor(expect, dtype=DT), atol=1e-6)
    # the influence class scores are the package's class scores along u = -s_val
    h = sc.class_scores(a, head(a))
    g = last_layer_scores(a, head(a), -s["weight"], -s["bias"])
    assert torch.allclose(h.double(), g.double(), atol=1e-6)


# ----------------------------------------------------------------------------- the policy in the refiner
C = 4
D_IN = 6


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(D_IN, C, hidden=8, depth=1, dropout=0.0)


def _val_loader(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, D_IN, generator=g), torch.randint(0, C, (n,), generator=g))
    return DataLoader(ds, batch_size=n)


def _pair_batch(n=6, views=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, D_IN, generator=g), torch.randint(0, C, (n,), generator=g)
    xa = torch.cat([x] + [x + 0.5 * torch.randn(n, D_IN, generator=g) for _ in range(views)])
    return xa, y.repeat(views + 1)


def test_policy_weights_follow_influence():
    """Weights are 2 sigmoid(r / rms r) renormalized, r = s_val^T (grad l(z~) - grad l(z)) computed here from
    scratch: dense damped Hessian of this batch's head features, per-sample autograd gradients."""
    model = _mlp()
    val = _val_loader()
    r = AugmentationRefiner(model, None, val, method="influence", method_options=dict(damping=0.1))
    x, y = _pair_batch(n=6, views=2)
    feats = []
    hook = model.fc.register_forward_hook(lambda m, a, o: feats.append(a[0].detach()))
    r(model(x), y, num_original=6)
    hook.remove()
    a = feats[0]
    # oracle
    xv, yv = next(iter(val))
    with torch.no_grad():
        av = model.body(xv)
    head = model.fc
    probs = torch.softmax(head(a), -1).double()
    H = head_hessian(a, probs) + 0.1 * torch.eye(C * 9, dtype=DT)
    rv = (torch.softmax(head(av), -1) - F.one_hot(yv, C)).double()
    grad_val = torch.cat([rv.t() @ av.double() / len(yv), rv.mean(0)[:, None]], 1).reshape(-1)
    s = torch.linalg.solve(H, grad_val).reshape(C, 9)
    up = []
    for i in range(x.shape[0]):
        gw, gb = torch.autograd.grad(F.cross_entropy(head(a[i:i + 1]), y[i:i + 1]), [head.weight, head.bias])
        up.append(float(((gw.double() * s[:, :-1]).sum() + (gb.double() * s[:, -1]).sum()).detach()))
    up = torch.tensor(up, dtype=DT)
    infl = up[6:] - up[:6].repeat(2)                     # view k of original i is row 6 + 6 k + i
    assert torch.allclose(r.policy.last_influence.double(), infl, atol=1e-5)
    w = renormalize(2 * torch.sigmoid(infl / infl.pow(2).mean().sqrt()))
    st = r.stats
    assert torch.allclose(st["weights"][6:].double(), w, atol=1e-5)
    assert torch.equal(st["weights"][:6], torch.ones(6))
    assert torch.equal(torch.argsort(st["weights"][6:]), torch.argsort(r.policy.last_influence))
    # reported scores: y~^T row of an augmented row is its replacement score
    agree = (F.one_hot(y[6:], C).float() * st["scores"][6:]).sum(1)
    assert torch.allclose(agree.double(), infl, atol=1e-5)


def test_policy_index_pairing_and_no_pairing():
    model = _mlp()
    x, y = _pair_batch(n=4, views=1)
    perm = torch.tensor([0, 1, 2, 3, 6, 4, 7, 5])       # shuffle the augmented rows
    idx = torch.tensor([10, 11, 12, 13, 10, 11, 12, 13])[perm]
    r = AugmentationRefiner(model, None, _val_loader(), method="influence", method_options=dict(damping=0.1))
    r(model(x), y, num_original=4)
    by_position = r.policy.last_influence.clone()
    r2 = AugmentationRefiner(model, None, _val_loader(), method="influence", method_options=dict(damping=0.1))
    r2(model(x[perm]), y[perm], num_original=4, index=idx)
    assert torch.allclose(r2.policy.last_influence, by_position[perm[4:] - 4], atol=1e-6)
    r3 = AugmentationRefiner(model, None, _val_loader(), method="influence",
                             method_options=dict(damping=0.1, pairing="none"))
    r3(model(x), y, num_original=4)
    up_aug = (F.one_hot(y[4:], C).float() * r3.stats["scores"][4:]).sum(1)
    assert torch.allclose(r3.policy.last_influence, up_aug, atol=1e-6)
    assert not torch.allclose(r3.policy.last_influence, by_position)


def test_pair_rows_layouts_and_errors():
    aug = torch.tensor([False, False, True, True, True, True])
    assert pair_rows(aug).tolist() == [0, 1, 0, 1]
    mixed = torch.tensor([True, False, True, False])
    assert pair_rows(mixed).tolist() == [1, 3]
    with pytest.raises(ShapeError):
        pair_rows(torch.tensor([False, False, True, True, True]))
    with pytest.raises(ShapeError):
        pair_rows(torch.tensor([True, True]))
    with pytest.raises(ShapeError):
        pair_rows(aug, index=torch.tensor([1, 2, 1, 3, 1, 2]))
    with pytest.raises(ConfigurationError):
        pair_rows(aug, pairing="index")
    assert pair_rows(aug, pairing="none") is None


@pytest.mark.parametrize("bad", ["count", "index"])
def test_bad_pairing_raises_and_leaves_state_unchanged(bad):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _val_loader(), method="influence", method_options=dict(damping=0.1),
                            schedule=dict(refresh_every=1))
    x, y = _pair_batch(n=4)
    loss = r(model(x), y, num_original=4)
    opt.zero_grad()
    loss.backward()
    opt.step()
    before = copy.deepcopy(r.state_dict())
    u_before = {k: t.clone() for k, t in r.policy.direction.items()}
    with pytest.raises(ShapeError):
        if bad == "count":
            r(model(x[:7]), y[:7], num_original=3)
        else:
            r(model(x), y, num_original=4, index=torch.tensor([0, 1, 2, 3, 0, 1, 2, 9]))
    _same(before, r.state_dict())
    _same(u_before, r.policy.direction)
    assert r.calls == 1


def test_policy_resume_is_exact():
    def run(steps, state=None):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        r = AugmentationRefiner(model, opt, _val_loader(), method="influence",
                                method_options=dict(damping=0.1, buffer_size=10), schedule=dict(refresh_every=2))
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            r.load_state_dict(state["ref"])
        losses = []
        for s in steps:
            x, y = _pair_batch(n=4, seed=50 + s)
            loss = r(model(x), y, num_original=4)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ref": r.state_dict()})

    full, _ = run(range(6))
    first, state = run(range(3))
    assert state["ref"]["policy"]["buffer"].shape[0] == 10      # the feature buffer is bounded
    resumed, _ = run(range(3, 6), state)
    assert first + resumed == full


def test_policy_full_mode_uses_model_curvature():
    """In full mode u solves (G + damping I) u = v with the Gauss-Newton matrix of the buffered originals."""
    model = _mlp()
    r = AugmentationRefiner(model, None, _val_loader(), method="influence", mode="full",
                            method_options=dict(damping=0.5, cg_tol=1e-10))
    x, y = _pair_batch(n=4)
    r(model(x), y, num_original=4)
    u = r.policy.direction
    sc = InfluenceScorer(model=model, scope="full", curvature="gauss_newton", damping=0.5).fit(data=[(x[:4], y[:4])])
    Hu = sc.hvp(u)
    v = r.validation_direction
    for k in v:
        assert torch.allclose(Hu[k], v[k], atol=1e-4 * float(v[k].abs().max()) + 1e-7), k
    assert torch.isfinite(r.stats["weights"]).all()


@pytest.mark.parametrize("kw", [dict(damping=0.0), dict(solver="newton"), dict(pairing="x"), dict(weighting="x"),
                                dict(temperature=0), dict(normalize="l2"), dict(buffer_size=0), dict(curvature="x")])
def test_bad_policy_options(kw):
    with pytest.raises(ConfigurationError):
        InfluencePolicy(**kw)


def test_scorer_errors():
    with pytest.raises(UnsupportedHeadError):
        InfluenceScorer(nn.Conv2d(1, 2, 1))
    sc = InfluenceScorer(nn.Linear(3, 2))
    with pytest.raises(ConfigurationError):
        sc.s_val
    with pytest.raises(ShapeError):
        sc.fit(torch.randn(5, 4))
    with pytest.raises(ConfigurationError):
        sc.set_validation(torch.randn(3, 3), torch.tensor([0, 1, 0]), grad={"weight": torch.zeros(2, 3)})


def test_influence_weights_rules():
    s = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    rms = s.pow(2).mean().sqrt()
    assert torch.allclose(influence_weights(s), 2 * torch.sigmoid(s / rms))
    assert torch.equal(influence_weights(s, weighting="hard"), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(influence_weights(s, weighting="relu", normalize=None), s.clamp_min(0))
    w = influence_weights(s, threshold=0.1)
    assert torch.equal(w[:3], torch.zeros(3)) and bool((w[3:] > 1).all())
