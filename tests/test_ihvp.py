"""The inverse-Hessian-vector-product solvers of augplug.ihvp agree on one SPD system, refuse what
they cannot solve, and the modules they moved out of still name the same objects."""
import pytest
import torch

from augplug.errors import NonFiniteError
from augplug.ihvp import (conjugate_gradient, estimate_top_eigenvalue, explicit_solve, lissa, neumann_inverse_hvp,
                          power_iteration)

DT = torch.float64


def _spd(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = M @ M.t() / n + 0.5 * torch.eye(n, dtype=DT)
    return A, torch.randn(n, generator=g, dtype=DT)


def test_every_solver_finds_the_same_solution():
    A, b = _spd()
    exact = torch.linalg.solve(A, b)
    x, info = explicit_solve(A, b)
    assert torch.allclose(x, exact, atol=1e-10) and info["rel_residual"] < 1e-12 and info["iters"] == 0
    x, info = conjugate_gradient(lambda v: A @ v, b, iters=50, tol=1e-12)
    assert torch.allclose(x, exact, atol=1e-9) and info["iters"] <= len(b) + 1
    top = power_iteration(lambda v: A @ v, len(b), DT, b.device, iters=200)
    assert top == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]), rel=1e-6)
    x, _ = lissa(lambda v: A @ v, b, scale=1.1 * top, depth=3000)
    assert torch.allclose(x, exact, atol=1e-8)
    (x,) = neumann_inverse_hvp(lambda v: [A @ v[0]], [b], alpha=1 / (1.1 * top), iters=3000)
    assert torch.allclose(x, exact, atol=1e-8)
    top_list = estimate_top_eigenvalue(lambda v: [A @ v[0]], [b], iters=200, generator=torch.Generator().manual_seed(1))
    assert top_list == pytest.approx(top, rel=1e-6)


def test_explicit_solve_refuses_an_indefinite_matrix():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    with pytest.raises(NonFiniteError, match="not positive definite"):
        explicit_solve(A, torch.ones(2, dtype=DT))


def test_the_old_import_paths_name_the_moved_objects():
    import augplug.curvature as curvature
    import augplug.hypergrad as hypergrad
    import augplug.ihvp as ihvp
    import augplug.influence as influence
    import augplug.methods.influence as policy

    assert policy.InfluenceScorer is influence.InfluenceScorer
    assert policy.conjugate_gradient is ihvp.conjugate_gradient and policy.lissa is ihvp.lissa
    assert policy.head_hvp is curvature.head_hvp and policy.head_hessian is curvature.head_hessian
    assert hypergrad.neumann_inverse_hvp is ihvp.neumann_inverse_hvp
    assert hypergrad.estimate_top_eigenvalue is ihvp.estimate_top_eigenvalue
    for module in (policy, hypergrad):
        assert all(hasattr(module, name) for name in module.__all__)
