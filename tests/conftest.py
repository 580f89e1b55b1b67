import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

torch.set_num_threads(1)


def brute_force_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: dict) -> torch.Tensor:
    """Oracle for ``y_i^T g_i``: ``-(grad_theta CE(x_i, y_i)) . v`` with per-sample gradients.

    Per-sample gradients by ``torch.func.vmap(grad)`` over the parameters named in ``v``, with the
    model's buffers as they are (the model must be in eval mode for BatchNorm).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(p_sub, xi, yi):
        p = dict(params)
        p.update(p_sub)
        out = functional_call(model, (p, buffers), (xi[None],))
        return -(yi[None] * F.log_softmax(out, -1)).sum()

    sub = {n: params[n] for n in v}
    per = vmap(grad(loss), in_dims=(None, 0, 0))(sub, x, y)
    return sum((per[n] * v[n]).flatten(1).sum(1) for n in v).neg()


class FlatNet(nn.Module):
    """Flatten, one hidden ReLU layer and a linear head named ``fc`` (found by the refiner)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(4 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5))
    return m.double()


def brute_force_class_scores(model, x, v, num_classes):
    """The full (B, C) score matrix from the oracle, one class at a time."""
    cols = []
    for c in range(num_classes):
        y = F.one_hot(torch.full((x.shape[0],), c), num_classes).to(x.dtype)
        cols.append(brute_force_scores(model, x, y, v))
    return torch.stack(cols, 1)


def loop_class_scores(model, x, v, num_classes):
    """A second oracle without torch.func: one autograd.grad per sample and class."""
    names = list(v)
    named = dict(model.named_parameters())
    out = torch.zeros(x.shape[0], num_classes, dtype=torch.float64)
    for i in range(x.shape[0]):
        for c in range(num_classes):
            lp = F.log_softmax(model(x[i:i + 1]), -1)[0, c]
            gr = torch.autograd.grad(lp, [named[n] for n in names])
            out[i, c] = sum((gi.double() * v[n].double()).sum() for gi, n in zip(gr, names))
    return out


class CountingLoader:
    """Wraps a loader (any iterable with len()) and counts how often it is iterated."""

    def __init__(self, loader):
        self.loader, self.iters = loader, 0

    def __iter__(self):
        self.iters += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)
