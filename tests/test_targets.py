"""Soft-target cross-entropy: torch's cross_entropy with probability targets, against the sum written out."""
import pytest
import torch
import torch.nn.functional as F

from augplug.targets import soft_cross_entropy


def test_soft_cross_entropy_is_the_written_out_sum():
    torch.manual_seed(0)
    for b, c in [(64, 10), (256, 26), (128, 1000), (7, 3)]:
        z = torch.randn(b, c, requires_grad=True)
        y = torch.softmax(torch.randn(b, c), -1)
        by_hand = -(y * F.log_softmax(z, -1)).sum(-1)
        got = soft_cross_entropy(z, y)
        assert got.dtype == torch.float32 and got.shape == (b,)
        assert torch.equal(got, by_hand)
        g1, = torch.autograd.grad(got.sum(), z)
        g2, = torch.autograd.grad(by_hand.sum(), z)
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)
    # half-precision logits are computed in fp32
    z = torch.randn(8, 5).half()
    y = torch.softmax(torch.randn(8, 5), -1)
    assert soft_cross_entropy(z, y).dtype == torch.float32
    assert torch.equal(soft_cross_entropy(z, y), -(y * F.log_softmax(z.float(), -1)).sum(-1))


def test_value_problems_flags_exactly_the_non_finite_batches():
    """One fp64 sum per fp32/fp16/bf16 tensor is finite exactly when every entry is. fp64 features and
    inputs are probed in fp32, the dtype scores are computed in: entries beyond its range are flagged
    (they would be inf there), large ones within it are not, whatever their sum."""
    from augplug.targets import value_problems

    logits, y = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])
    big = torch.full((4, 5), 3e38, dtype=torch.float64)  # within fp32's range, summing beyond it
    assert not bool(value_problems(logits, y, (big, None)))
    assert bool(value_problems(logits, y, (torch.full((4, 5), 1e308, dtype=torch.float64), None)))
    assert not bool(value_problems(torch.full((4, 3), 3e38), y))  # fp32 near its maximum
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), -float("inf")):
            f = torch.zeros(4, 5, dtype=dtype)
            f[2, 3] = bad
            assert bool(value_problems(logits, y, ({"features": [f]},))), (dtype, bad)
            assert bool(value_problems(f[:, 2:].float(), y)), (dtype, bad)  # the logits themselves
    assert bool(value_problems(logits, torch.tensor([0, 1, 3, 0])))  # a label out of range


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_value_problems_label_range_in_every_integer_dtype(dtype):
    """The range test runs in fp64, so labels of small unsigned dtypes cannot wrap around (0 - 2 in
    uint8 is 254) and the extremes of int64 cannot overflow."""
    from augplug.targets import value_problems

    logits = torch.zeros(3, 3)
    assert not bool(value_problems(logits, torch.tensor([0, 1, 2], dtype=dtype)))
    assert bool(value_problems(logits, torch.tensor([0, 3, 2], dtype=dtype)))
    if dtype.is_signed:
        assert bool(value_problems(logits, torch.tensor([0, -1, 2], dtype=dtype)))
    low = torch.iinfo(torch.int64).min
    assert bool(value_problems(logits, torch.tensor([0, low, 2])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_soft_targets_rounded_to_their_dtype_are_probabilities(dtype):
    """Mixup and label-smoothing rows that sum to 1 in fp32 sum to 1 only up to the rounding of their
    dtype after a cast (bf16: up to about 0.4 %): accepted, by both value checks; rows that are not
    probabilities are still rejected in every dtype."""
    from augplug.errors import TargetError
    from augplug.targets import to_soft_targets, value_problems
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(64, 10)
    for _ in range(20):
        y = torch.softmax(3 * torch.randn(64, 10, generator=g), -1).to(dtype)
        to_soft_targets(y, 10)
        assert float(value_problems(logits, y)) == 0
    bad = torch.full((64, 10), 0.12).to(dtype)   # rows summing to 1.2
    with pytest.raises(TargetError, match="probabilities"):
        to_soft_targets(bad, 10)
    assert float(value_problems(logits, bad)) > 0


def test_the_functional_api_names_class_indices_and_column_weights():
    """The functional API takes (B, C) probabilities: class indices (which broadcast or index into
    wrong numbers when B equals C) are a TargetError naming to_soft_targets, and (B, 1) weights
    (which broadcast against the (B,) losses into a (B, B) matrix) a ShapeError."""
    import augplug.functional as AF
    from augplug.errors import ShapeError, TargetError
    logits, labels = torch.randn(4, 4), torch.arange(4)
    probs = F.one_hot(labels, 4).float()
    with pytest.raises(ShapeError, match=r"\(4,\)"):
        AF.weighted_soft_ce(logits, probs, torch.ones(4, 1))
    for call in (lambda: AF.saflex_targets(torch.randn(4, 4), labels), lambda: AF.l2rw_weights(torch.randn(4, 4), labels),
                 lambda: AF.soft_cross_entropy(logits, labels), lambda: AF.weighted_soft_ce(logits, labels)):
        with pytest.raises(TargetError, match="to_soft_targets"):
            call()
    torch.testing.assert_close(AF.weighted_soft_ce(logits, probs, torch.ones(4)), F.cross_entropy(logits, labels))
