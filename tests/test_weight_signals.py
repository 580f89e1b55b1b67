"""benchmarks.weight_signals: each signal's weights by hand on a small batch."""
import math

import pytest
import torch

from benchmarks.weight_signals import SIGNALS, make_policy


def _z(t):
    return (t - t.mean()) / t.std()


@pytest.mark.parametrize("signal", SIGNALS)
def test_signal_weights_by_hand(signal):
    g = torch.tensor([[0.4, -0.1, 0.3], [-0.2, 0.5, 0.0], [0.1, 0.1, -0.6], [0.3, -0.4, 0.2]])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.5, 0.2, 1.0], [0.0, 0.0, 3.0]])
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 2]), 3).float()
    centred = g - g.mean(0)
    centred = centred / centred.pow(2).mean().sqrt()  # normalize="center": centred, then RMS 1
    agreement = (y * centred).sum(-1)
    likelihood = (y * torch.log_softmax(logits, -1)).sum(-1)
    margin = torch.tensor([2.0 - 0.5, 1.5 - 0.3, -0.5 - 1.0, 3.0 - 0.0])
    s = {"agreement": agreement, "likelihood": _z(likelihood), "margin": _z(margin),
         "zsum": (_z(agreement) + _z(likelihood)) / math.sqrt(2)}[signal]
    w, targets = make_policy(signal)(g, y, None, logits=logits)
    torch.testing.assert_close(w, 2 * torch.sigmoid(s))
    assert torch.equal(targets, y)
