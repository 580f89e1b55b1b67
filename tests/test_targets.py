"""Soft-target cross-entropy: torch's cross_entropy with probability targets, against the sum written out."""
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
