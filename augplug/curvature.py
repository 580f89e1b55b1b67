"""Closed-form curvature of a linear softmax head ``z = W a + b`` on fixed features ``a``.

For the mean softmax cross-entropy over ``n`` rows with probabilities ``p_i``::

    H = (1/n) sum_i (diag p_i - p_i p_i^T) (x) [a_i; 1][a_i; 1]^T

The logits are linear in ``(W, b)``, so this is the exact Hessian, not an approximation. A product
``H V`` needs no network pass: ``U = A V^T``, ``R = p * U - p (p . U)``, ``H V = R^T A / n``. ``H``
is singular along the softmax's shift direction (adding the same vector to every class row changes
no probability), so solves need damping.
"""
from __future__ import annotations

import torch

__all__ = ["head_hvp", "head_hessian"]


def _augment_features(features: torch.Tensor, bias: bool) -> torch.Tensor:
    a = features.flatten(1).double()
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1) if bias else a


def head_hvp(features: torch.Tensor, probs: torch.Tensor, V: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """``H V`` for the mean softmax cross-entropy of a linear head (no damping).

    ``features`` (n, A), ``probs`` (n, C) the head's softmax on them, ``V`` (C, A + bias) the
    direction as the matrix ``[V_W | v_b]``. Returns a (C, A + bias) matrix.
    """
    a = _augment_features(features, bias) if features.shape[1] != V.shape[1] else features.double()
    p = probs.double()
    u = a @ V.double().t()
    r = p * u - p * (p * u).sum(1, keepdim=True)
    return r.t() @ a / a.shape[0]


def head_hessian(features: torch.Tensor, probs: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """The dense (D, D) Hessian of the mean softmax cross-entropy w.r.t. ``[W | b]`` flattened row-major.

    ``H[(c,k),(d,l)] = (1/n) sum_i (p_ic delta_cd - p_ic p_id) a_ik a_il``: a block diagonal of
    ``A^T diag(p_c) A`` minus ``B^T B`` with ``B_i = p_i (x) a_i``.
    """
    a = _augment_features(features, bias)
    p = probs.double()
    n, k = a.shape
    c = p.shape[1]
    blocks = torch.einsum("nc,nk,nl->ckl", p, a, a)
    H = torch.block_diag(*blocks)
    B = (p[:, :, None] * a[:, None, :]).reshape(n, c * k)
    return (H - B.t() @ B) / n
