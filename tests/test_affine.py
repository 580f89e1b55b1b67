"""Differentiable affine augmentations: identity at zero, geometry against exact pixel oracles,
gradients to gates and magnitudes, gate probabilities, private randomness."""
import math

import pytest
import torch

from augplug.augment.affine import (DEFAULT_OPS, OP_RANGES, OPS, affine_theta, apply_affine, random_affine,
                                    sample_gates)
from augplug.errors import ConfigurationError, ShapeError


def _img(shape=(2, 3, 6, 10), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _values(op, value, batch=2, ops=OPS):
    v = torch.zeros(batch, len(ops))
    v[:, ops.index(op)] = value
    return v


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 3, 6, 10), (1, 1, 28, 28), (2, 1, 9, 5)])
def test_every_op_at_zero_is_identity(op, shape):
    x = _img(shape)
    out = apply_affine(x, _values(op, 0.0, shape[0]), OPS, padding_mode="zeros")
    assert torch.allclose(out, x, atol=1e-5)
    theta = affine_theta(_values(op, 0.0, shape[0]), OPS, *shape[-2:])
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand_as(theta), atol=1e-7)


def test_gates_off_is_identity_whatever_the_magnitude():
    x = _img()
    gl = torch.full((2, len(DEFAULT_OPS)), -60.0)  # P(on) ~ 1e-26
    ml = torch.full((2, len(DEFAULT_OPS)), 5.0)
    out, values = random_affine(x, gl, ml, DEFAULT_OPS, torch.Generator().manual_seed(0), padding_mode="zeros")
    assert torch.equal(values, torch.zeros_like(values))
    assert torch.allclose(out, x, atol=1e-5)


def test_geometry_rotation_translation_at_any_resolution():
    sq = _img((2, 2, 8, 8))
    rot = lambda x, deg: apply_affine(x, _values("rotate", deg / OP_RANGES["rotate"], x.shape[0]), OPS,  # noqa: E731
                                      padding_mode="zeros")
    # +90 degrees turns the content clockwise on screen (y axis down): torch.rot90 with k=-1
    assert torch.allclose(rot(sq, 90.0), torch.rot90(sq, -1, (2, 3)), atol=1e-5)
    assert not torch.allclose(rot(sq, 90.0), torch.rot90(sq, 1, (2, 3)), atol=1e-2)
    # 180 degrees about the centre of a non-square image: both flips
    ns = _img((2, 1, 6, 10))
    assert torch.allclose(rot(ns, 180.0), ns.flip(-1).flip(-2), atol=1e-5)
    # translation by exactly one pixel in x (10 wide) and two in y (6 high)
    tx = apply_affine(ns, _values("translate_x", 1 / 10 / OP_RANGES["translate_x"]), OPS, padding_mode="zeros")
    assert torch.allclose(tx[..., 1:], ns[..., :-1], atol=1e-5) and tx[..., 0].abs().max() < 1e-6
    ty = apply_affine(ns, _values("translate_y", 2 / 6 / OP_RANGES["translate_y"]), OPS, padding_mode="zeros")
    assert torch.allclose(ty[..., 2:, :], ns[..., :-2, :], atol=1e-5)


def test_geometry_scale_and_shear():
    # scale 2 about the centre: output pixel p samples the input at p / 2 (centred coordinates)
    h = w = 8
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    ramp = (xx + 10 * yy)[None, None].float()  # linear image: bilinear sampling is exact inside
    out = apply_affine(ramp, _values("scale", 1.0 / OP_RANGES["scale"], 1), OPS, padding_mode="border")
    inner = slice(2, 6)
    assert torch.allclose(out[..., inner, inner], (ramp / 2)[..., inner, inner], atol=1e-5)
    # shear_x: x' = x + k y, so the output at (x, y) samples the input at x - k y
    k = 0.25
    out = apply_affine(ramp, _values("shear_x", k / OP_RANGES["shear_x"], 1), OPS, padding_mode="border")
    expect = (xx - k * yy) + 10 * yy
    assert torch.allclose(out[0, 0, 2:6, 2:6], expect[2:6, 2:6].float(), atol=1e-5)
    out = apply_affine(ramp, _values("shear_y", k / OP_RANGES["shear_y"], 1), OPS, padding_mode="border")
    expect = xx + 10 * (yy - k * xx)
    assert torch.allclose(out[0, 0, 2:6, 2:6], expect[2:6, 2:6].float(), atol=1e-4)


def test_gates_and_magnitudes_receive_gradients():
    x = _img((4, 1, 12, 12))
    gl = torch.zeros(4, len(DEFAULT_OPS), requires_grad=True)
    ml = torch.zeros(4, len(DEFAULT_OPS), requires_grad=True)
    out, values = random_affine(x, gl, ml, DEFAULT_OPS, torch.Generator().manual_seed(3))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    on = values.detach() != 0
    assert on.any() and (~on).any()
    assert torch.isfinite(gl.grad).all() and torch.isfinite(ml.grad).all()
    # gates learn whether on or off (straight-through); magnitudes only where the gate is on
    assert (gl.grad.abs() > 0).float().mean() > 0.9
    assert (ml.grad[on].abs() > 0).all() and torch.equal(ml.grad[~on], torch.zeros_like(ml.grad[~on]))
    # shared (1, K) rows get the gradient summed over the batch
    g1 = torch.zeros(1, len(DEFAULT_OPS), requires_grad=True)
    m1 = torch.zeros(1, len(DEFAULT_OPS), requires_grad=True)
    out, _ = random_affine(x, g1, m1, DEFAULT_OPS, torch.Generator().manual_seed(3))
    out.sum().backward()
    assert g1.grad.shape == (1, len(DEFAULT_OPS)) and torch.isfinite(g1.grad).all()


def test_gate_probability_and_hard_values():
    p = torch.tensor([[-1.386, 0.0, 2.0]]).expand(20000, 3)
    bits = sample_gates(p, torch.Generator().manual_seed(0))
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    freq = bits.mean(0)
    assert torch.allclose(freq, torch.sigmoid(p[0]), atol=0.015)


def test_private_generator_and_global_rng_untouched():
    x = _img()
    gl = torch.zeros(2, len(DEFAULT_OPS))
    ml = torch.zeros(2, len(DEFAULT_OPS))
    state = torch.get_rng_state()
    a, _ = random_affine(x, gl, ml, DEFAULT_OPS, torch.Generator().manual_seed(7))
    b, _ = random_affine(x, gl, ml, DEFAULT_OPS, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


def test_bad_inputs():
    with pytest.raises(ConfigurationError):
        apply_affine(_img(), torch.zeros(2, 1), ["spin"])
    with pytest.raises(ConfigurationError):
        apply_affine(_img(), torch.zeros(2, 2), ["rotate", "rotate"])
    with pytest.raises(ShapeError):
        apply_affine(_img(), torch.zeros(2, 3), DEFAULT_OPS)
    with pytest.raises(ShapeError):
        apply_affine(torch.zeros(2, 6, 10, dtype=torch.float32), torch.zeros(2, 6), DEFAULT_OPS)
    with pytest.raises(ShapeError):
        apply_affine(torch.zeros(2, 1, 6, 10, dtype=torch.uint8), torch.zeros(2, 6), DEFAULT_OPS)
    with pytest.raises(ShapeError):
        random_affine(_img(), torch.zeros(3, 6), torch.zeros(3, 6), DEFAULT_OPS)


def test_rotation_is_measured_in_degrees():
    theta = affine_theta(_values("rotate", 30.0 / OP_RANGES["rotate"], 1), OPS, 8, 8)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert torch.allclose(theta[0, :, :2], torch.tensor([[c, s], [-s, c]]), atol=1e-6)
