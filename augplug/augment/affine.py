"""Differentiable affine augmentations with learned on/off gates and magnitudes (AutoDO).

Each image ``i`` and operation ``k`` gets

- an on/off bit ``b_ik`` from a hard straight-through Gumbel-softmax (temperature ``tau``) over the
  log-probabilities ``[log sigmoid(P_ik), log sigmoid(-P_ik)]``: the forward value is exactly 0 or 1,
  the backward pass uses the relaxed sample's gradient, so ``P`` learns even while a gate is off;
- a magnitude ``m_ik = sigmoid(M_ik) * eps_ik`` with ``eps_ik ~ N(0, 1)`` (a Gaussian prior of learned
  scale: either sign, unbounded tails);

and the operation's parameter is ``b_ik * m_ik * range_k``:

============== ===================================================== ============
operation       effect (forward map of the image content)              range
============== ===================================================== ============
``rotate``      rotation by ``value`` degrees about the image centre    30 degrees
``translate_x`` shift by ``value * width`` pixels                       0.45
``translate_y`` shift by ``value * height`` pixels                      0.45
``shear_x``     ``x' = x + value * y``                                  0.3
``shear_y``     ``y' = y + value * x``                                  0.3
``scale``       isotropic scale ``1 + value`` about the centre          0.5
``scale_x``     horizontal scale ``1 + value``                          0.5
``scale_y``     vertical scale ``1 + value``                            0.5
============== ===================================================== ============

The forward map is ``p' = S Sh_y Sh_x R p + t`` in pixel units centred on the image centre (x to
the right, y down, so a positive angle turns the content clockwise on screen). It is inverted in
closed form and converted to the normalized coordinates of ``torch.nn.functional.affine_grid``
(``align_corners=False``), so the geometry is right at any resolution and aspect ratio and the pivot
is the image centre. Every operation at parameter 0 is the identity (exactly, up to float rounding).
Scale factors are clamped at ``min_scale`` so that the map stays invertible under the Gaussian tails.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigurationError, ShapeError

__all__ = ["OPS", "DEFAULT_OPS", "OP_RANGES", "check_ops", "sample_gates", "sample_magnitudes",
           "affine_theta", "apply_affine", "random_affine"]

#: Operation name -> the parameter range multiplying ``b * m``.
OP_RANGES: Dict[str, float] = {
    "rotate": 30.0,
    "translate_x": 0.45,
    "translate_y": 0.45,
    "shear_x": 0.3,
    "shear_y": 0.3,
    "scale": 0.5,
    "scale_x": 0.5,
    "scale_y": 0.5,
}
OPS: Tuple[str, ...] = tuple(OP_RANGES)
#: The operations used by default: rotation, translations, shears and an isotropic scale.
DEFAULT_OPS: Tuple[str, ...] = ("rotate", "translate_x", "translate_y", "shear_x", "shear_y", "scale")


def check_ops(ops: Sequence[str]) -> Tuple[str, ...]:
    """Validate a list of operation names (known, unique, non-empty)."""
    ops = tuple(ops)
    bad = [o for o in ops if o not in OP_RANGES]
    if bad or not ops or len(set(ops)) != len(ops):
        raise ConfigurationError(f"invalid augmentation operations {list(ops)}" + (f" (unknown: {bad})" if bad else ""),
                                 f"use distinct names from {list(OPS)}")
    return ops


def sample_gates(gate_logits: torch.Tensor, generator: Optional[torch.Generator] = None, tau: float = 1.0,
                 hard: bool = True) -> torch.Tensor:
    """On/off bits (same shape as ``gate_logits``) with ``P(on) = sigmoid(gate_logits)``.

    Straight-through Gumbel-softmax: hard 0/1 values forward, the relaxed sample's gradient backward.
    Noise is drawn on the CPU from ``generator`` (the global RNG is not used when it is given).
    """
    logp = torch.stack([F.logsigmoid(gate_logits), F.logsigmoid(-gate_logits)], -1)
    u = torch.rand(logp.shape, generator=generator, dtype=torch.float32).to(logp.device, logp.dtype)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = torch.softmax((logp + gumbel) / tau, -1)
    if not hard:
        return soft[..., 0]
    on = (soft[..., 0] >= soft[..., 1]).to(soft.dtype)
    return on - soft[..., 0].detach() + soft[..., 0]


def sample_magnitudes(magnitude_logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``sigmoid(magnitude_logits) * eps`` with standard normal ``eps`` drawn from ``generator``."""
    eps = torch.randn(magnitude_logits.shape, generator=generator, dtype=torch.float32)
    return torch.sigmoid(magnitude_logits) * eps.to(magnitude_logits.device, magnitude_logits.dtype)


def _op_values(values: torch.Tensor, ops: Sequence[str]) -> Dict[str, torch.Tensor]:
    return {op: values[:, k] * OP_RANGES[op] for k, op in enumerate(ops)}


def affine_theta(values: torch.Tensor, ops: Sequence[str], height: int, width: int,
                 min_scale: float = 0.1) -> torch.Tensor:
    """``(B, 2, 3)`` matrices for ``affine_grid`` (output -> input, normalized coordinates).

    ``values`` (B, K) are the unscaled operation parameters ``b * m`` (multiplied here by each
    operation's range); column ``k`` belongs to ``ops[k]``.
    """
    ops = check_ops(ops)
    if values.dim() != 2 or values.shape[1] != len(ops):
        raise ShapeError(f"values must be (batch, {len(ops)}) for ops {list(ops)}, got {tuple(values.shape)}",
                         "pass one column per operation")
    val = _op_values(values, ops)
    zero = values.new_zeros(values.shape[0])
    one = values.new_ones(values.shape[0])
    get = lambda k: val.get(k, zero)  # noqa: E731
    angle = get("rotate") * (math.pi / 180.0)
    hx, hy = get("shear_x"), get("shear_y")
    s_iso = 1 + get("scale")
    sx = (s_iso * (1 + get("scale_x"))).clamp_min(min_scale)
    sy = (s_iso * (1 + get("scale_y"))).clamp_min(min_scale)
    tx, ty = get("translate_x") * width, get("translate_y") * height
    cos, sin = torch.cos(angle), torch.sin(angle)

    def mat(a, b, c, d):
        return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)

    # inverse of A = S Sh_y Sh_x R:  A^{-1} = R(-angle) Sh_x(-hx) Sh_y(-hy) S^{-1}
    r_inv = mat(cos, sin, -sin, cos)
    shx_inv = mat(one, -hx, zero, one)
    shy_inv = mat(one, zero, -hy, one)
    s_inv = mat(1 / sx, zero, zero, 1 / sy)
    a_inv = r_inv @ shx_inv @ shy_inv @ s_inv
    half = values.new_tensor([width / 2.0, height / 2.0])
    # normalized x_n = p / half:  x_in_n = (D^-1 A^-1 D) x_out_n - D^-1 A^-1 t
    lin = a_inv * half[None, None, :] / half[None, :, None]
    t = torch.stack([tx, ty], -1)
    off = -(a_inv @ t[..., None])[..., 0] / half
    return torch.cat([lin, off[..., None]], -1)


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        fix = ("convert the batch to float (after normalization) before augmenting"
               if isinstance(x, torch.Tensor) and x.dim() == 4 else
               "pass a batch of images (B, C, H, W): the learned augmentation warps images (tables and "
               "feature vectors have no geometry to warp; use AutoDO's weights and labels without augment())")
        raise ShapeError(f"images must be a floating (B, C, H, W) tensor, got {desc}", fix)


def apply_affine(x: torch.Tensor, values: torch.Tensor, ops: Sequence[str] = DEFAULT_OPS, *,
                 padding_mode: str = "border", mode: str = "bilinear", min_scale: float = 0.1) -> torch.Tensor:
    """Warp images ``x`` (B, C, H, W) by the operations with parameters ``values`` (B, K)."""
    _check_images(x)
    if values.shape[0] != x.shape[0]:
        raise ShapeError(f"{values.shape[0]} parameter rows for {x.shape[0]} images", "pass one row per image")
    h, w = x.shape[-2:]
    theta = affine_theta(values.to(x.dtype), ops, h, w, min_scale)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def random_affine(x: torch.Tensor, gate_logits: torch.Tensor, magnitude_logits: torch.Tensor,
                  ops: Sequence[str] = DEFAULT_OPS, generator: Optional[torch.Generator] = None, *,
                  tau: float = 1.0, padding_mode: str = "border", min_scale: float = 0.1):
    """Sample gates and magnitudes and warp ``x``; returns ``(images, values)``.

    ``gate_logits`` and ``magnitude_logits`` are ``(B, K)`` (or ``(1, K)``, shared by the batch);
    the result keeps a graph to both.
    """
    _check_images(x)
    ops = check_ops(ops)
    b = x.shape[0]
    if gate_logits.shape[-1] != len(ops) or magnitude_logits.shape != gate_logits.shape \
            or gate_logits.shape[0] not in (1, b):
        raise ShapeError(f"gate/magnitude logits {tuple(gate_logits.shape)}/{tuple(magnitude_logits.shape)} do not "
                         f"fit {b} images and {len(ops)} operations", f"pass ({b}, {len(ops)}) or (1, {len(ops)})")
    gl, ml = gate_logits.expand(b, -1), magnitude_logits.expand(b, -1)
    bits = sample_gates(gl, generator, tau)
    mags = sample_magnitudes(ml, generator)
    values = bits * mags
    return apply_affine(x, values, ops, padding_mode=padding_mode, min_scale=min_scale), values
