"""Inverse-Hessian-vector products: solve ``A x = b`` for a symmetric positive definite ``A``.

``A`` is usually a damped Hessian ``H + lambda I`` that is only available through products
``x -> A x``. One module for every solver, shared by the influence scorer and AutoDO's
implicit hypergradients:

- :func:`explicit_solve`: dense Cholesky solve of a materialised ``A`` (exact; while the
  dimension is a few thousand);
- :func:`conjugate_gradient`: CG on flat vectors (warm-startable);
- :func:`lissa`: the stochastic Neumann recursion ``h <- b + h - A h / scale`` of Agarwal et al.
  (the answer is ``h / scale``; tolerates a noisy ``matvec``);
- :func:`neumann_inverse_hvp`: the truncated Neumann series ``alpha sum_t (I - alpha A)^t b`` on
  lists of tensors (AutoDO's few-step approximation);
- :func:`power_iteration` (flat vectors) and :func:`estimate_top_eigenvalue` (lists of tensors):
  the largest eigenvalue, to choose LiSSA's scale or a Neumann step.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ConfigurationError, NonFiniteError

__all__ = [
    "explicit_solve",
    "conjugate_gradient",
    "lissa",
    "neumann_inverse_hvp",
    "power_iteration",
    "estimate_top_eigenvalue",
]

Tensors = List[torch.Tensor]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def explicit_solve(A: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Solve ``A x = b`` by a Cholesky factorisation of the dense (D, D) matrix ``A``.

    Returns ``(x, info)`` with ``info = {"iters": 0, "rel_residual"}``. Raises
    :class:`~augplug.errors.NonFiniteError` when ``A`` is not positive definite.
    """
    L, fail = torch.linalg.cholesky_ex(A)
    if int(fail) != 0:
        raise NonFiniteError("H + damping * I is not positive definite", "raise the damping")
    x = torch.cholesky_solve(b[:, None], L)[:, 0]
    return x, {"iters": 0, "rel_residual": float(torch.linalg.vector_norm(A @ x - b)
                                                 / torch.linalg.vector_norm(b).clamp_min(1e-300))}


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, iters: int = 100,
                       tol: float = 1e-10, x0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given by ``matvec`` (flat vectors).

    Stops when ``||r|| <= tol * ||b||`` or after ``iters`` products. Returns ``(x, info)`` with
    ``info = {"iters", "rel_residual"}``. ``x0`` warm-starts the iteration (e.g. the previous solve).
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    bnorm = float(torch.linalg.vector_norm(b)) or 1.0
    k = 0
    for k in range(1, int(iters) + 1):
        if math.sqrt(float(rs)) <= tol * bnorm:
            k -= 1
            break
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if float(pAp) <= 0:
            raise NonFiniteError("conjugate gradients met a direction of non-positive curvature",
                                 "raise the damping so that H + damping * I is positive definite")
        alpha = rs / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = torch.dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, {"iters": k, "rel_residual": math.sqrt(float(rs)) / bnorm}


def lissa(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, scale: float, depth: int = 1000,
          tol: float = 0.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """LiSSA: ``h <- b + h - A h / scale`` from ``h = b``; returns ``h / scale ~ A^-1 b``.

    Converges when ``scale`` exceeds the largest eigenvalue of ``A`` (contraction ``1 - lambda_min /
    scale`` per step). ``matvec`` may be stochastic (a product on a random subset of the data).
    """
    if scale <= 0:
        raise ConfigurationError(f"lissa scale must be > 0, got {scale}", "use a bound on the largest eigenvalue")
    h = b.clone()
    k = 0
    for k in range(1, int(depth) + 1):
        step = b - matvec(h) / scale
        h = h + step
        if tol and float(torch.linalg.vector_norm(step)) <= tol * float(torch.linalg.vector_norm(h)):
            break
    return h / scale, {"iters": k, "rel_residual": float("nan")}


def neumann_inverse_hvp(hvp: Callable[[Tensors], Tensors], vec: Sequence[torch.Tensor], alpha: float = 0.01,
                        iters: int = 5, scaled: bool = True) -> Tensors:
    """Approximate ``H^{-1} vec`` by ``alpha * sum_{t=0}^{iters} (I - alpha H)^t vec``.

    Args:
        hvp: ``x -> H x`` on lists of tensors shaped like ``vec``.
        vec: the right-hand side (a list of tensors).
        alpha: Neumann step; the series converges for ``0 < alpha < 2 / lambda_max(H)``.
        iters: ``T``, the number of Hessian-vector products (``T + 1`` terms).
        scaled: multiply the sum by ``alpha`` (True: an approximation of ``H^{-1} vec``; False: of
            ``H^{-1} vec / alpha``, the convention of the AutoDO authors' code, where RMSprop absorbs
            the constant factor).
    """
    if iters < 0:
        raise ConfigurationError(f"the number of Neumann steps must be >= 0, got {iters}", "use e.g. 5")
    if not alpha > 0:
        raise ConfigurationError(f"the Neumann step alpha must be > 0, got {alpha}", "use e.g. 0.01")
    term = [v.detach().clone() for v in vec]
    acc = [t.clone() for t in term]
    for _ in range(int(iters)):
        h = hvp(term)
        term = [t - alpha * hh.detach() for t, hh in zip(term, h)]
        acc = [a + t for a, t in zip(acc, term)]
    return [alpha * a for a in acc] if scaled else acc


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, dtype: torch.dtype,
                    device: torch.device, iters: int = 30, seed: int = 0) -> float:
    """Largest eigenvalue of a symmetric PSD operator on flat vectors (seeded start, ``iters`` products)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    x = x / torch.linalg.vector_norm(x)
    lam = 0.0
    for _ in range(iters):
        y = matvec(x)
        lam = float(torch.dot(x, y))
        n = torch.linalg.vector_norm(y)
        if float(n) == 0:
            return 0.0
        x = y / n
    return lam


def estimate_top_eigenvalue(hvp: Callable[[Tensors], Tensors], like: Sequence[torch.Tensor], iters: int = 20,
                            generator: Optional[torch.Generator] = None) -> float:
    """Largest eigenvalue of a symmetric PSD operator on lists of tensors, by power iteration."""
    x = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in like]
    lam = 0.0
    for _ in range(iters):
        norm = float(torch.sqrt(_dot(x, x)))
        if norm == 0:
            return 0.0
        x = [t / norm for t in x]
        hx = hvp(x)
        lam = float(_dot(x, hx))
        x = [h.detach() for h in hx]
    return lam
