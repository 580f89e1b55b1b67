"""finite_difference_scores against the forward-mode scores (full_scores) and its error order."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augplug.errors import ConfigurationError, ShapeError
from augplug.models import SmallCNN
from augplug.scores import (finite_difference_scores, full_scores, scoring_mode, validation_gradient)

C = 5


def rel(a, b):
    """Relative Frobenius distance of two score matrices."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def _direction(model, xv, yv, names=None):
    params = {n: p for n, p in model.named_parameters() if names is None or n in names}
    return validation_gradient(model, xv, yv, params=params, bn="eval").direction()


def _data(shape, n=16, classes=C, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    xv = torch.randn(n, *shape, generator=g, dtype=dtype)
    yv = F.one_hot(torch.randint(0, classes, (n,), generator=g), classes).to(dtype)
    return x, xv, yv


def _smooth_net():
    """No kinks (tanh): the difference quotients' truncation error follows its order in eps."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, C)).double()


def test_central_and_one_sided_match_forward_mode_fp64(tiny_cnn):
    x, xv, yv = _data((1, 8, 8))
    v = _direction(tiny_cnn, xv, yv)
    g = full_scores(tiny_cnn, x, v)
    central = finite_difference_scores(tiny_cnn, x, v)
    with torch.no_grad(), scoring_mode(tiny_cnn, "eval"):
        base = F.log_softmax(tiny_cnn(x), -1)
    one_sided = finite_difference_scores(tiny_cnn, x, v, base_log_probs=base)
    assert central.shape == (16, C) and central.dtype == torch.float32
    assert rel(central, g) <= 1e-6  # measured 6e-8
    assert rel(one_sided, g) <= 1e-4  # measured 5e-6: first order


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_fp32_smallcnn_matches_forward_mode(bn):
    """fp32, the default step: within 2 % of the forward-mode scores (measured 0.9 % with BatchNorm
    eval at random init, 0.03 % with train), at most one of 32 signs of y^T g flipped."""
    torch.manual_seed(0)
    model = SmallCNN(1, 10, img_size=28).train()
    x, xv, yv = _data((1, 28, 28), n=32, classes=10, dtype=torch.float32)
    y = F.one_hot(torch.arange(32) % 10, 10).float()
    v = _direction(model, xv, yv)
    before = copy.deepcopy(model.state_dict())
    g = full_scores(model, x, v, bn=bn)
    fd = finite_difference_scores(model, x, v, bn=bn)
    assert rel(fd, g) <= 2e-2
    assert int((torch.sign((y * fd).sum(1)) != torch.sign((y * g).sum(1))).sum()) <= 1
    # nothing persistent changed: parameters, running statistics, modes
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_error_order_on_a_smooth_model():
    """Halving eps divides the error by about 4 (central) and 2 (one-sided)."""
    net = _smooth_net()
    x, xv, yv = _data((12,), n=8)
    v = _direction(net, xv, yv)
    g = full_scores(net, x, v)
    with torch.no_grad():
        base = F.log_softmax(net(x), -1)
    scale = 1e-2 / float(torch.sqrt(sum((t ** 2).sum() for t in v.values())))
    central = [rel(finite_difference_scores(net, x, v, eps=e * scale), g) for e in (1.0, 0.5)]
    one_sided = [rel(finite_difference_scores(net, x, v, eps=e * scale, base_log_probs=base), g) for e in (1.0, 0.5)]
    assert 3.5 <= central[0] / central[1] <= 4.5
    assert 1.8 <= one_sided[0] / one_sided[1] <= 2.2
    assert central[0] < one_sided[0]


def test_direction_on_some_parameters_and_centring(tiny_cnn):
    """v naming only the head: the other parameters stay put; p^T g = 0 as for log-softmax scores."""
    x, xv, yv = _data((1, 8, 8))
    v = _direction(tiny_cnn, xv, yv, names={"6.weight", "8.weight", "8.bias"})
    g = full_scores(tiny_cnn, x, v)
    fd = finite_difference_scores(tiny_cnn, x, v)
    assert rel(fd, g) <= 1e-6
    with torch.no_grad(), scoring_mode(tiny_cnn, "eval"):
        p = torch.softmax(tiny_cnn(x), -1)
    assert float((p * fd.double()).sum(1).abs().max()) <= 1e-5


def test_zero_direction_gives_zero_scores(tiny_cnn):
    x, _, _ = _data((1, 8, 8))
    v = {n: torch.zeros_like(p) for n, p in tiny_cnn.named_parameters()}
    fd = finite_difference_scores(tiny_cnn, x, v)
    assert torch.isfinite(fd).all() and float(fd.abs().max()) == 0.0
    assert finite_difference_scores(tiny_cnn, x, {}).abs().max() == 0.0


def test_bad_arguments_raise_typed_errors(tiny_cnn):
    x, xv, yv = _data((1, 8, 8))
    v = _direction(tiny_cnn, xv, yv)
    with pytest.raises(ConfigurationError, match="unknown parameters"):
        finite_difference_scores(tiny_cnn, x, {"nope.weight": torch.zeros(3)})
    with pytest.raises(ShapeError, match="base_log_probs"):
        finite_difference_scores(tiny_cnn, x, v, base_log_probs=torch.zeros(3, C))
    half = copy.deepcopy(tiny_cnn).half()
    with pytest.raises(ConfigurationError, match="fp32 or fp64"):
        finite_difference_scores(half, x.half(), {k: t.half() for k, t in v.items()})
