"""IFT / Neumann hypergradients against exact solutions and brute-force retraining; lazy RMSprop."""
import pytest
import torch
import torch.nn.functional as F

from augplug.errors import ConfigurationError, ShapeError
from augplug.hypergrad import HeadProblem, ift_hypergradient, lazy_rmsprop_, loss_residual, per_sample_loss
from augplug.ihvp import estimate_top_eigenvalue, neumann_inverse_hvp

N, A, C = 14, 4, 3
DAMP = 0.05  # L2 term of the training objective: makes H positive definite (softmax CE has a null direction)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, A, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, C, (N,), generator=g), C).double()
    y[:3] = F.one_hot((y[:3].argmax(1) + 1) % C, C).double()  # a few wrong labels
    a_val = torch.randn(20, A, generator=g, dtype=torch.float64)
    y_val = F.one_hot(torch.randint(0, C, (20,), generator=g), C).double()
    w = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    return a, y, a_val, y_val, w


def _train_loss_parts(theta, a, y, w):
    z = a @ theta[0].t() + theta[1]
    return HeadProblem(a, z, w, y, denom=N, damping=DAMP)


def _solve(a, y, w, iters=40):
    """theta*(w) by Newton's method on the damped training loss (exact to ~1e-14)."""
    theta = [torch.zeros(C, A, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)]
    for _ in range(iters):
        prob = _train_loss_parts(theta, a, y, w)
        g = torch.cat([t.reshape(-1) for t in prob.grad(theta)])
        step = torch.linalg.solve(prob.hessian(), g)
        theta = [theta[0] - step[:C * A].reshape(C, A), theta[1] - step[C * A:]]
    return theta


def _val_loss(theta, a_val, y_val):
    return float(per_sample_loss(a_val @ theta[0].t() + theta[1], y_val).mean())


def _val_grad(theta, a_val, y_val):
    prob = HeadProblem(a_val, a_val @ theta[0].t() + theta[1], torch.ones(len(a_val), dtype=torch.float64), y_val,
                       denom=len(a_val))
    return prob.grad()


def _neumann_weight_hypergrad(theta, a, y, w, val_grad, alpha, iters):
    """The policy's formula: -d/dw [ (1/N) sum_i w_i (p_i - y_i)^T (U a_i + u_b) ], u from the series."""
    z = a @ theta[0].t() + theta[1]
    prob = HeadProblem(a, z, w, y, denom=N, damping=DAMP)
    u = prob.inverse_hvp(val_grad, alpha, iters)
    wl = w.clone().requires_grad_()
    e = loss_residual(z, y)
    mixed = (wl[:, None] * e * (a @ u[0].t() + u[1])).sum() / N
    return -torch.autograd.grad(mixed, wl)[0]


def _exact_weight_hypergrad(theta, a, y, w, val_grad):
    z = a @ theta[0].t() + theta[1]
    prob = HeadProblem(a, z, w, y, denom=N, damping=DAMP)
    u = torch.linalg.solve(prob.hessian(), torch.cat([t.reshape(-1) for t in val_grad]))
    # d/dw_i grad_theta L = grad_theta loss_i / N  (per-sample gradients in closed form)
    e = loss_residual(z, y)
    per = torch.cat([(e[:, :, None] * a[:, None, :]).reshape(N, -1), e], 1) / N
    return -(per @ u)


def test_head_hessian_matches_autograd_hessian():
    a, y, _, _, w = _problem()
    for loss in ("ce", "sym_kl"):
        s = torch.softmax(torch.randn(N, C, dtype=torch.float64), -1) if loss == "sym_kl" else y
        theta = [torch.randn(C, A, dtype=torch.float64) * 0.3, torch.randn(C, dtype=torch.float64) * 0.3]

        def f(flat):
            W, b = flat[:C * A].reshape(C, A), flat[C * A:]
            return (w * per_sample_loss(a @ W.t() + b, s, loss)).sum() / N + DAMP / 2 * (flat ** 2).sum()

        flat = torch.cat([t.reshape(-1) for t in theta])
        oracle = torch.autograd.functional.hessian(f, flat)
        prob = HeadProblem(a, a @ theta[0].t() + theta[1], w, s, denom=N, damping=DAMP, loss=loss)
        assert torch.allclose(prob.hessian(), oracle, atol=1e-10)
        grad_oracle = torch.autograd.functional.jacobian(f, flat)
        assert torch.allclose(torch.cat([g.reshape(-1) for g in prob.grad(theta)]), grad_oracle, atol=1e-10)


@pytest.mark.parametrize("loss", ["ce", "sym_kl"])
def test_loss_residual_is_the_logit_gradient(loss):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), -1)
    (grad,) = torch.autograd.grad(per_sample_loss(z, s, loss).sum(), z)
    assert torch.allclose(loss_residual(z, s, loss), grad, atol=1e-12)


def test_neumann_series_converges_to_the_inverse_and_scaling():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = m @ m.t() + 0.5 * torch.eye(6, dtype=torch.float64)
    v = torch.randn(6, generator=g, dtype=torch.float64)
    lam = float(torch.linalg.eigvalsh(h).max())
    hvp = lambda x: [h @ x[0]]  # noqa: E731
    exact = torch.linalg.solve(h, v)
    errs = [float((neumann_inverse_hvp(hvp, [v], 1 / lam, t)[0] - exact).norm()) for t in (2, 10, 50, 3000)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-6 * float(exact.norm())
    unscaled = neumann_inverse_hvp(hvp, [v], 0.01, 5, scaled=False)[0]
    assert torch.allclose(unscaled * 0.01, neumann_inverse_hvp(hvp, [v], 0.01, 5)[0])
    # T = 0 is alpha * v (first-order gradient alignment)
    assert torch.allclose(neumann_inverse_hvp(hvp, [v], 0.01, 0)[0], 0.01 * v)
    assert abs(estimate_top_eigenvalue(hvp, [v], iters=200, generator=g) - lam) < 1e-6 * lam
    with pytest.raises(ConfigurationError):
        neumann_inverse_hvp(hvp, [v], 0.0, 5)


def test_neumann_weight_hypergradient_converges_to_exact_ift():
    a, y, a_val, y_val, w = _problem()
    theta = _solve(a, y, w)
    vg = _val_grad(theta, a_val, y_val)
    exact = _exact_weight_hypergrad(theta, a, y, w, vg)
    prob = HeadProblem(a, a @ theta[0].t() + theta[1], w, y, denom=N, damping=DAMP)
    alpha = 1.0 / float(torch.linalg.eigvalsh(prob.hessian()).max())
    errs = []
    for t in (5, 50, 500, 5000):
        approx = _neumann_weight_hypergrad(theta, a, y, w, vg, alpha, t)
        errs.append(float((approx - exact).norm() / exact.norm()))
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 1e-6 and errs[0] > 1e-3, errs  # T matters: the series really is being summed


def test_weight_hypergradient_matches_brute_force_retraining():
    """Perturb one weight, retrain to the optimum, difference the validation loss: the IFT value; the
    Neumann estimate has the sign of every sample's influence (where the influence is not tiny)."""
    a, y, a_val, y_val, w = _problem(3)
    theta = _solve(a, y, w)
    vg = _val_grad(theta, a_val, y_val)
    exact = _exact_weight_hypergrad(theta, a, y, w, vg)
    prob = HeadProblem(a, a @ theta[0].t() + theta[1], w, y, denom=N, damping=DAMP)
    alpha = 1.0 / float(torch.linalg.eigvalsh(prob.hessian()).max())
    approx = _neumann_weight_hypergrad(theta, a, y, w, vg, alpha, 200)
    eps = 1e-5
    brute = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        hi, lo = w.clone(), w.clone()
        hi[i] += eps
        lo[i] -= eps
        brute[i] = (_val_loss(_solve(a, y, hi), a_val, y_val) - _val_loss(_solve(a, y, lo), a_val, y_val)) / (2 * eps)
    assert torch.allclose(exact, brute, rtol=1e-4, atol=1e-9)
    big = brute.abs() > 0.05 * brute.abs().max()
    assert big.sum() >= N // 2
    assert torch.equal(torch.sign(approx[big]), torch.sign(brute[big]))


def test_generic_autograd_path_equals_closed_form_head():
    """ift_hypergradient (reverse-over-reverse HVPs) == the closed-form head computation."""
    a, y, a_val, y_val, w = _problem(4)
    theta = _solve(a, y, w, iters=5)
    vg = _val_grad(theta, a_val, y_val)
    W = theta[0].clone().requires_grad_()
    b = theta[1].clone().requires_grad_()
    wl = w.clone().requires_grad_()
    loss = (wl * per_sample_loss(a @ W.t() + b, y)).sum() / N
    for t in (0, 3, 10):
        hg, u = ift_hypergradient(loss, [W, b], vg, [wl], alpha=0.3, iters=t, damping=DAMP)
        closed = _neumann_weight_hypergrad(theta, a, y, w, vg, 0.3, t)
        assert torch.allclose(hg[0], closed, atol=1e-12)
        prob = HeadProblem(a, a @ theta[0].t() + theta[1], w, y, denom=N, damping=DAMP)
        for ui, ci in zip(u, prob.inverse_hvp(vg, 0.3, t)):
            assert torch.allclose(ui, ci, atol=1e-12)
    # a hyperparameter the loss does not reach gets a zero hypergradient
    other = torch.zeros(3, requires_grad=True)
    hg, _ = ift_hypergradient(loss, [W, b], vg, [wl, other], iters=2)
    assert torch.equal(hg[1], torch.zeros(3))


def test_lazy_rmsprop_touches_only_indexed_rows_and_matches_torch():
    g = torch.Generator().manual_seed(5)
    table = torch.randn(10, 3, generator=g)
    state = torch.rand(10, 3, generator=g)
    before_t, before_s = table.clone(), state.clone()
    rows = torch.tensor([7, 2, 4])
    grad = torch.randn(3, 3, generator=g)
    lazy_rmsprop_(table, state, rows, grad, lr=0.1, alpha=0.9, eps=1e-8)
    others = torch.ones(10, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(table[others], before_t[others]) and torch.equal(state[others], before_s[others])
    # oracle: torch.optim.RMSprop on the visited rows alone, with their state
    p = before_t[rows].clone().requires_grad_()
    opt = torch.optim.RMSprop([p], lr=0.1, alpha=0.9, eps=1e-8)
    p.grad = grad.clone()
    opt.state[p] = {"step": torch.tensor(0.0), "square_avg": before_s[rows].clone()}
    opt.step()
    assert torch.allclose(table[rows], p.detach(), atol=1e-6)
    assert torch.allclose(state[rows], opt.state[p]["square_avg"], atol=1e-7)
    # 1-D tables (loss weights)
    t1, s1 = torch.zeros(5), torch.zeros(5)
    lazy_rmsprop_(t1, s1, torch.tensor([1]), torch.tensor([2.0]), lr=0.05)
    assert t1[1] < 0 and torch.equal(t1[[0, 2, 3, 4]], torch.zeros(4))
    with pytest.raises(ShapeError):
        lazy_rmsprop_(table, state, rows, torch.zeros(2, 3), lr=0.1)
