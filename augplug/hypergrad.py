"""Implicit differentiation of a validation loss with respect to training hyperparameters.

Setting: model parameters ``theta`` minimise a training loss ``L_train(theta, lam)`` that depends on
hyperparameters ``lam`` (per-sample loss weights, soft labels, augmentation parameters). At the
minimiser ``theta*(lam)`` the implicit function theorem gives

    dL_val/dlam = - (d^2 L_train / dlam dtheta) . H^{-1} grad_theta L_val,     H = d^2 L_train / dtheta^2

(no direct term: ``L_val`` does not depend on ``lam``). With ``u = H^{-1} grad_theta L_val`` the
mixed term is one reverse pass: ``dL_val/dlam = - d/dlam [ grad_theta L_train(theta, lam) . u ]``,
where ``grad_theta L_train`` is kept differentiable in ``lam`` and ``u`` is a constant.

``u`` is approximated by a truncated Neumann series with step ``alpha`` and ``T`` terms
(:func:`augplug.ihvp.neumann_inverse_hvp`, re-exported here):

    u_T = alpha * sum_{t=0}^{T} (I - alpha H)^t grad L_val   ->  H^{-1} grad L_val   (T -> inf)

which converges when ``0 < alpha * lambda_max(H) < 2`` and ``H`` is positive definite. The leading
``alpha`` makes ``u_T`` an approximation of ``H^{-1} grad L_val`` itself; ``scaled=False`` drops it
(the sum alone approximates ``H^{-1} grad L_val / alpha``, as in the AutoDO authors' code, where
RMSprop absorbs the constant factor).

Two ways to get Hessian-vector products:

- :class:`HeadProblem`: closed form for a linear classifier ``z = W a + b`` trained on fixed
  features ``a`` (the last layer), exact and almost free;
- :func:`autograd_hvp`: reverse-over-reverse through any graph (more layers).

:func:`ift_hypergradient` is the generic driver (autograd, any parameters); :func:`lazy_rmsprop_`
updates only the indexed rows of a table (and of its optimizer state).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import ConfigurationError, ShapeError
from .ihvp import estimate_top_eigenvalue, neumann_inverse_hvp

__all__ = [
    "LOSSES",
    "neumann_inverse_hvp",
    "autograd_hvp",
    "ift_hypergradient",
    "per_sample_loss",
    "loss_residual",
    "HeadProblem",
    "lazy_rmsprop_",
    "estimate_top_eigenvalue",
]

Tensors = List[torch.Tensor]
#: Per-sample training losses supported by the closed forms: soft cross-entropy (equivalently
#: ``KL(s || p)``: the two differ by the entropy of ``s``, which does not depend on ``theta``)
#: and the symmetric KL ``0.5 [KL(s || p) + KL(p || s)]``.
LOSSES = ("ce", "sym_kl")


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def autograd_hvp(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                 damping: float = 0.0) -> Callable[[Tensors], Tensors]:
    """``x -> (H + damping I) x`` by differentiating ``grads`` (built with ``create_graph=True``)."""

    def hvp(x: Tensors) -> Tensors:
        out = torch.autograd.grad(list(grads), list(params), grad_outputs=list(x), retain_graph=True,
                                  allow_unused=True)
        return [(o if o is not None else torch.zeros_like(p)) + damping * xi
                for o, p, xi in zip(out, params, x)]

    return hvp


def ift_hypergradient(train_loss: torch.Tensor, params: Sequence[torch.Tensor], val_grad: Sequence[torch.Tensor],
                      hyper: Sequence[torch.Tensor], *, alpha: float = 0.01, iters: int = 5, scaled: bool = True,
                      damping: float = 0.0, retain_graph: bool = True) -> Tuple[Tensors, Tensors]:
    """``dL_val/dlam`` for each tensor in ``hyper`` by the implicit function theorem (autograd only).

    Args:
        train_loss: scalar training loss with a graph to ``params`` and to ``hyper``.
        params: the parameters ``theta`` the series runs over (e.g. the classifier, or more layers).
        val_grad: ``grad_theta L_val`` (same shapes as ``params``), a constant.
        hyper: the hyperparameter tensors (leaves or intermediates of the graph).
        alpha, iters, scaled: Neumann series options (:func:`neumann_inverse_hvp`).
        damping: adds ``damping * I`` to ``H`` (an L2 term on ``theta``).
        retain_graph: keep the graph of ``train_loss`` (so the caller can still backpropagate it).

    Returns:
        ``(hypergradients, u)`` with ``u ~ H^{-1} grad L_val``; entries of ``hyper`` that the loss
        does not reach get zero hypergradients.
    """
    params = list(params)
    grads = torch.autograd.grad(train_loss, params, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    u = neumann_inverse_hvp(autograd_hvp(grads, params, damping), val_grad, alpha, iters, scaled)
    mixed = _dot([g for g in grads], u)
    hyper = list(hyper)
    needs = [h for h in hyper if h.requires_grad]
    if not needs or not torch.is_tensor(mixed) or not mixed.requires_grad:
        return [torch.zeros_like(h) for h in hyper], u
    out = dict(zip(map(id, needs), torch.autograd.grad(mixed, needs, retain_graph=retain_graph, allow_unused=True)))
    return [(-out[id(h)] if out.get(id(h)) is not None else torch.zeros_like(h)) for h in hyper], u


def _fp(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (half / bfloat16 are promoted; fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def _log_targets(targets: torch.Tensor, log_targets: Optional[torch.Tensor]) -> torch.Tensor:
    return log_targets if log_targets is not None else targets.clamp_min(1e-12).log()


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str = "ce",
                    log_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample loss ``(B,)``: ``"ce"`` is ``-s^T log p``; ``"sym_kl"`` is ``0.5 [KL(s||p) + KL(p||s)]``."""
    logp = F.log_softmax(_fp(logits), -1)
    if loss == "ce":
        return -(targets * logp).sum(-1)
    if loss == "sym_kl":
        logs = _log_targets(targets, log_targets)
        p = logp.exp()
        return 0.5 * ((targets * (logs - logp)).sum(-1) + (p * (logp - logs)).sum(-1))
    raise ConfigurationError(f"unknown loss {loss!r}", f"use one of {LOSSES}")


def loss_residual(logits: torch.Tensor, targets: torch.Tensor, loss: str = "ce",
                  log_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``d loss_i / d z_i`` ``(B, C)`` in closed form (differentiable in the logits and the targets).

    ``"ce"``: ``p - s``. ``"sym_kl"``: ``0.5 (p - s) + 0.5 p * (r - p^T r)`` with ``r = log p - log s``.
    """
    logp = F.log_softmax(_fp(logits), -1)
    p = logp.exp()
    if loss == "ce":
        return p - targets
    if loss == "sym_kl":
        r = logp - _log_targets(targets, log_targets)
        return 0.5 * (p - targets) + 0.5 * p * (r - (p * r).sum(-1, keepdim=True))
    raise ConfigurationError(f"unknown loss {loss!r}", f"use one of {LOSSES}")


class HeadProblem:
    """The training loss of a linear head on fixed features, with closed-form derivatives.

    ``L(W, b) = sum_i c_i loss(W a_i + b, s_i) / denom + damping/2 (|W|^2 + |b|^2)``

    with features ``a`` (B, A), coefficients ``c`` (B,), targets ``s`` (B, C) and ``denom`` all held
    constant. Parameters are ordered ``[W (C, A), b (C,)]`` (``b`` omitted with ``bias=False``).
    The Hessian-vector product maps a direction ``(V, v_b)`` to logit directions
    ``dz_i = V a_i + v_b``, applies each sample's logit Hessian (``diag(p) - p p^T`` for
    cross-entropy; forward-mode AD of :func:`loss_residual` otherwise) and maps back.
    """

    def __init__(self, features: torch.Tensor, logits: torch.Tensor, coef: torch.Tensor, targets: torch.Tensor,
                 denom: float, *, loss: str = "ce", damping: float = 0.0, bias: bool = True,
                 log_targets: Optional[torch.Tensor] = None):
        if loss not in LOSSES:
            raise ConfigurationError(f"unknown loss {loss!r}", f"use one of {LOSSES}")
        if features.dim() != 2 or logits.dim() != 2 or features.shape[0] != logits.shape[0]:
            raise ShapeError(f"features {tuple(features.shape)} and logits {tuple(logits.shape)} must be (B, A) "
                             "and (B, C) with the same B", "pass one feature row per logit row")
        self.a = _fp(features.detach())
        self.z = _fp(logits.detach())
        self.c = _fp(coef.detach())
        self.s = _fp(targets.detach())
        self.log_s = None if log_targets is None else _fp(log_targets.detach())
        self.denom = float(denom)
        self.loss = loss
        self.damping = float(damping)
        self.bias = bool(bias)
        self.p = torch.softmax(self.z, -1)

    @property
    def shapes(self) -> List[torch.Size]:
        c, a = self.z.shape[1], self.a.shape[1]
        return [torch.Size((c, a))] + ([torch.Size((c,))] if self.bias else [])

    def _to_params(self, r: torch.Tensor) -> Tensors:
        """Map per-sample logit-space rows (B, C), already weighted, to parameter space."""
        out = [r.t() @ self.a]
        if self.bias:
            out.append(r.sum(0))
        return out

    def grad(self, params: Optional[Sequence[torch.Tensor]] = None) -> Tensors:
        """``grad_theta L`` at the current logits (plus ``damping * params`` when given)."""
        r = loss_residual(self.z, self.s, self.loss, self.log_s) * (self.c / self.denom)[:, None]
        g = self._to_params(r)
        if params is not None and self.damping:
            g = [gi + self.damping * p for gi, p in zip(g, params)]
        return g

    def logit_hvp(self, dz: torch.Tensor) -> torch.Tensor:
        """Each sample's logit Hessian applied to its row of ``dz`` (B, C)."""
        if self.loss == "ce":
            return self.p * dz - self.p * (self.p * dz).sum(-1, keepdim=True)
        _, out = torch.func.jvp(lambda z: loss_residual(z, self.s, self.loss, self.log_s), (self.z,), (dz,))
        return out

    def hvp(self, vec: Sequence[torch.Tensor]) -> Tensors:
        """``(H + damping I) vec`` for ``vec = [V, v_b]``."""
        dz = self.a @ vec[0].to(self.a.dtype).t()
        if self.bias:
            dz = dz + vec[1].to(self.a.dtype)
        r = self.logit_hvp(dz) * (self.c / self.denom)[:, None]
        out = self._to_params(r)
        if self.damping:
            out = [o + self.damping * v for o, v in zip(out, vec)]
        return out

    def hessian(self) -> torch.Tensor:
        """The explicit ``P x P`` Hessian (columns from :meth:`hvp`); for small problems and tests."""
        sizes = [s.numel() for s in self.shapes]
        n = sum(sizes)
        cols = []
        eye = torch.eye(n, dtype=self.a.dtype)
        for j in range(n):
            parts = list(torch.split(eye[j], sizes))
            vec = [p.reshape(s) for p, s in zip(parts, self.shapes)]
            cols.append(torch.cat([h.reshape(-1) for h in self.hvp(vec)]))
        return torch.stack(cols, 1)

    def inverse_hvp(self, vec: Sequence[torch.Tensor], alpha: float = 0.01, iters: int = 5,
                    scaled: bool = True) -> Tensors:
        """Neumann approximation of ``H^{-1} vec`` (:func:`neumann_inverse_hvp`)."""
        return neumann_inverse_hvp(self.hvp, [v.to(self.a.dtype) for v in vec], alpha, iters, scaled)


def lazy_rmsprop_(table: torch.Tensor, square_avg: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, *,
                  lr: float, alpha: float = 0.99, eps: float = 1e-8) -> None:
    """RMSprop on the indexed rows only: rows not in ``rows`` keep their values and their state.

    ``square_avg[rows] = alpha * square_avg[rows] + (1 - alpha) * grad^2`` and
    ``table[rows] -= lr * grad / (sqrt(square_avg[rows]) + eps)``. ``rows`` must be unique
    (duplicated rows would be updated once with one of their gradients); sum the gradients of a
    shared row before calling.
    """
    if rows.dim() != 1 or grad.shape[0] != rows.shape[0] or grad.shape[1:] != table.shape[1:]:
        raise ShapeError(f"gradient {tuple(grad.shape)} does not match rows {tuple(rows.shape)} of a table "
                         f"{tuple(table.shape)}", "pass one gradient row per table row")
    with torch.no_grad():
        g = grad.to(table.dtype)
        sq = square_avg.index_select(0, rows).mul_(alpha).addcmul_(g, g, value=1 - alpha)
        square_avg.index_copy_(0, rows, sq)
        table.index_copy_(0, rows, table.index_select(0, rows) - lr * g / (sq.sqrt() + eps))
