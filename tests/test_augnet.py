"""Augmentation network: identity and transformation oracles, gradients into the encoder (finite
differences), the influence objective against per-sample gradients, and WGAN-GP pretraining."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augplug.augment.augnet import (AdversarialPretrainer, AugmentationNetwork, InfluenceAugTrainer, affine_flow,
                                    apply_color, features_and_logits, gradient_penalty, heuristic_augment,
                                    identity_grid, random_affine_flow, warp)
from augplug.errors import ConfigurationError, ShapeError
from augplug.influence import InfluenceScorer

DT = torch.float64


def _images(b=4, c=1, side=8, seed=0, dtype=torch.float32):
    return torch.randn(b, c, side, side, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_zero_flow_is_the_identity():
    x = _images(dtype=DT)
    assert torch.allclose(warp(x, torch.zeros(4, 2, 8, 8, dtype=DT)), x, atol=1e-12)
    x32 = _images(c=3, side=28)
    assert torch.allclose(warp(x32, torch.zeros(4, 2, 28, 28)), x32, atol=1e-4)
    # a fresh network (zero output layers) is the identity, in every configuration
    for spatial in ("local", "global", "none"):
        net = AugmentationNetwork(3, 28, spatial=spatial).double()
        out = net(x32.double(), generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out.images, x32.double(), atol=1e-10), spatial
        assert float(out.flow.detach().abs().max()) == 0.0


def test_warp_translates_by_whole_pixels():
    x = _images(b=2, side=8, dtype=DT)
    flow = torch.zeros(2, 2, 8, 8, dtype=DT)
    flow[:, 0] = 2 * 2 / 7  # sample two pixels to the right
    out = warp(x, flow)
    assert torch.allclose(out[..., :, :6], x[..., :, 2:], atol=1e-12)
    assert torch.allclose(out[..., :, 6:], x[..., :, 7:8].expand(-1, -1, -1, 2), atol=1e-12)  # border padding
    with pytest.raises(ShapeError):
        warp(x, torch.zeros(2, 3, 8, 8, dtype=DT))


def test_global_affine_is_the_constant_special_case_of_local_fields():
    """Constant per-pixel affine terms give the flow of the global affine map I + dA (and t)."""
    net = AugmentationNetwork(1, 8, grid=3, smooth=2, appearance=False, noise_dim=0).double()
    a = torch.tensor([0.05, -0.1, 0.08, 0.02, 0.1, -0.06], dtype=DT)
    with torch.no_grad():
        net.local_head.bias.copy_(torch.atanh(a / net.max_flow).repeat_interleave(9))
    flow, _, _ = net.fields(torch.zeros(2, net.latent_dim, dtype=DT))
    theta = torch.tensor([[1 + a[0], a[1], a[4]], [a[2], 1 + a[3], a[5]]], dtype=DT)
    assert torch.allclose(flow, affine_flow(theta[None].expand(2, 2, 3), 8, 8), atol=1e-12)
    # and the global affine flow moves pixel p to theta [p; 1]
    base = identity_grid(8, 8, dtype=DT)
    p = base[3, 5]
    assert torch.allclose(base[3, 5] + flow[0, :, 3, 5], theta @ torch.cat([p, torch.ones(1, dtype=DT)]), atol=1e-12)


def test_color_filter_per_pixel_oracle():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=DT)
    w = torch.randn(2, 3, 3, 4, 4, generator=g, dtype=DT)
    b = torch.randn(2, 3, 4, 4, generator=g, dtype=DT)
    out = apply_color(x, w, b)
    for i in range(2):
        for r in range(4):
            for c in range(4):
                M = torch.eye(3, dtype=DT) + w[i, :, :, r, c]
                assert torch.allclose(out[i, :, r, c], M @ x[i, :, r, c] + b[i, :, r, c], atol=1e-12)


def test_fields_are_bounded_and_smooth():
    torch.manual_seed(0)
    net = AugmentationNetwork(1, 16, grid=4, smooth=4, max_flow=0.2, max_color=0.1)
    for p in (net.local_head.weight, net.local_head.bias):
        nn.init.normal_(p, std=3.0)
    with torch.no_grad():
        out = net(_images(side=16))
    # |f| <= |dA| |p| + |t| <= max_flow (2 + 1) with |p| <= 1 per coordinate
    assert float(out.flow.abs().max()) <= 3 * 0.2 + 1e-6
    assert float(out.color_bias.abs().max()) <= 0.1 + 1e-6 and float(out.color_weight.abs().max()) <= 0.1 + 1e-6
    # neighbouring pixels of a smoothed field differ far less than its range
    step = (out.color_bias[..., 1:] - out.color_bias[..., :-1]).abs().max()
    assert float(step) < 0.5 * float(out.color_bias.max() - out.color_bias.min())


class _Clf(nn.Module):
    def __init__(self, side=8, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(3 * side * side, 5), nn.Tanh())
        self.fc = nn.Linear(5, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def _setup(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    clf = _Clf().to(dtype)
    x, y = _images(b=6, dtype=dtype, seed=seed), torch.randint(0, 3, (6,))
    xv, yv = _images(b=6, dtype=dtype, seed=seed + 1), torch.randint(0, 3, (6,))
    clf.eval()
    with torch.no_grad():
        a, _ = features_and_logits(clf, clf.fc, x)
        av, _ = features_and_logits(clf, clf.fc, xv)
    sc = InfluenceScorer(clf.fc, damping=0.1).fit(a)
    sc.set_validation(av, yv)
    clf.train()
    net = AugmentationNetwork(1, 8, grid=3, smooth=2, width=4, latent_dim=4, noise_dim=2).to(dtype)
    for p in (net.local_head.weight, net.local_head.bias):  # leave the identity so that gradients reach E
        nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(seed))
    return clf, sc, net, x, y


def test_influence_objective_matches_per_sample_gradients():
    """The trainer's replacement scores equal s_val . (grad l(x~) - grad l(x)) from autograd per sample."""
    clf, sc, net, x, y = _setup(DT)
    tr = InfluenceAugTrainer(net, clf, clf.fc, sc, label_weight=0.0, magnitude_weight=0.0)
    noise = torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    _, parts = tr.loss(x, y, gen())
    clf.eval()
    with torch.no_grad():
        xt = net(x, generator=gen()).images
    s = sc.s_val

    def up(inp, i):
        gw, gb = torch.autograd.grad(F.cross_entropy(clf(inp[i:i + 1]), y[i:i + 1]), [clf.fc.weight, clf.fc.bias])
        return float((gw * s["weight"].double()).sum() + (gb * s["bias"].double()).sum())

    scores = torch.tensor([up(xt, i) - up(x, i) for i in range(6)], dtype=DT)
    assert parts["score_mean"] == pytest.approx(float(scores.mean()), abs=1e-6)
    assert parts["influence"] == pytest.approx(float(-scores.mean() / scores.pow(2).mean().sqrt()), rel=1e-5)
    del noise


def test_gradients_reach_the_encoder_and_match_finite_differences():
    clf, sc, net, x, y = _setup(DT)
    tr = InfluenceAugTrainer(net, clf, clf.fc, sc, label_weight=0.5, magnitude_weight=1.0, min_change=10.0,
                             max_change=None, score_scale=0.01)  # a fixed scale: the loss is a plain function
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    clf_params = {n: p.detach().clone() for n, p in clf.state_dict().items()}
    loss, _ = tr.loss(x, y, gen())
    w = net.encoder[0].weight
    (g,) = torch.autograd.grad(loss, w)
    assert float(g.abs().sum()) > 0
    eps = 1e-6
    for idx in [(0, 0, 1, 1), (2, 0, 0, 2)]:
        with torch.no_grad():
            w[idx] += eps
            hi = float(tr.loss(x, y, gen())[0])
            w[idx] -= 2 * eps
            lo = float(tr.loss(x, y, gen())[0])
            w[idx] += eps
        assert (hi - lo) / (2 * eps) == pytest.approx(float(g[idx]), rel=1e-4, abs=1e-9)
    # the classifier is frozen: no gradients, unchanged parameters and BatchNorm statistics, modes restored
    tr.step(x, y, gen())
    assert all(p.grad is None for p in clf.parameters())
    assert all(torch.equal(clf_params[n], t) for n, t in clf.state_dict().items())
    assert clf.training and all(p.requires_grad for p in clf.parameters())


def test_influence_training_raises_the_replacement_score():
    clf, sc, net, x, y = _setup(torch.float32, seed=2)
    tr = InfluenceAugTrainer(net, clf, clf.fc, sc, lr=3e-3, label_weight=0.0, magnitude_weight=0.0)
    first = tr.loss(x, y, torch.Generator().manual_seed(0))[1]["score_mean"]
    for s in range(40):
        tr.step(x, y, torch.Generator().manual_seed(s))
    last = tr.loss(x, y, torch.Generator().manual_seed(0))[1]["score_mean"]
    assert last > first and last > 0


def test_gradient_penalty_of_a_linear_critic():
    critic = nn.Linear(6, 1, bias=True)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.3, -0.4, 1.2, 0.0, 0.5, -0.1]]))
    gp = gradient_penalty(critic, torch.randn(5, 6), torch.randn(5, 6))
    assert float(gp.detach()) == pytest.approx((float(critic.weight.detach().norm()) - 1) ** 2, rel=1e-6)


def test_adversarial_pretraining_learns_to_imitate_affine_augmentation():
    """From the identity, the generator's flow fields move toward those of the standard augmentation."""
    torch.manual_seed(0)
    net = AugmentationNetwork(1, 8, grid=2, smooth=1, width=4, latent_dim=4, noise_dim=4, spatial="global",
                              appearance=False, max_flow=0.5)
    pre = AdversarialPretrainer(net, critic_width=4, lr=3e-3, n_critic=2,
                                real_flow=lambda b, h, w, g: random_affine_flow(b, h, w, generator=g, max_rotate=30,
                                                                               flip=False, max_translate=0.15))
    x = _images(b=16)
    g = torch.Generator().manual_seed(0)
    real_rms = float(random_affine_flow(256, 8, 8, generator=g, max_rotate=30, flip=False,
                                        max_translate=0.15).pow(2).mean().sqrt())
    log = [pre.step(x, g) for _ in range(60)]
    assert all(math.isfinite(v) for d in log for v in d.values())
    assert log[0]["flow_rms"] < 0.1 * real_rms
    assert log[-1]["flow_rms"] > 0.3 * real_rms


def test_heuristic_augment_and_errors():
    x = _images(b=3, side=8)
    out = heuristic_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.allclose(out, x)
    with pytest.raises(ShapeError):
        AugmentationNetwork(1, 8)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigurationError):
        AugmentationNetwork(1, 8, spatial="none", appearance=False)
    with pytest.raises(ConfigurationError):
        AugmentationNetwork(1, 8, spatial="twirl")
    with pytest.raises(ConfigurationError):
        AdversarialPretrainer(AugmentationNetwork(1, 8), n_critic=0)
    clf = _Clf()
    with pytest.raises(ConfigurationError):
        InfluenceAugTrainer(AugmentationNetwork(1, 8), clf, clf.fc, InfluenceScorer(nn.Linear(5, 3)))
    tr = InfluenceAugTrainer(AugmentationNetwork(1, 8), clf, clf.fc, InfluenceScorer(clf.fc))
    with pytest.raises(ConfigurationError):  # s_val not computed yet
        tr.step(x, torch.tensor([0, 1, 2]))
