"""An augmentation network trained through influence functions (Lee, Park, Pham, Yoo, CVPR 2020).

The network maps an image ``x`` (and a noise vector) to an augmented image ``x~`` with two
differentiable transformations whose parameters an encoder ``E`` predicts per input:

Spatial transformation (a flow field with per-pixel affine terms)
    at every output pixel ``p`` (coordinates in ``[-1, 1]``) the image is sampled at
    ``p + f(p)`` with ``f(p) = dA(p) p + t(p)``: ``dA(p)`` (2x2) and ``t(p)`` (2) are six smooth
    fields. A field that is the same at every pixel is a global affine transformation
    (``spatial="global"`` predicts exactly that); all-zero fields are the identity.
Appearance transformation (per-pixel colour filter weights and bias)
    ``x~(p) = (I + dM(p)) x(p) + beta(p)``, with ``dM(p)`` a (C x C) colour matrix and ``beta(p)``
    a bias per channel.

The fields come from the control ``tau = E(x, z)`` (``z ~ N(0, I)``) through a generator that
predicts them on a coarse ``grid x grid`` lattice, upsamples them bilinearly and smooths them with a
``smooth x smooth`` average filter; ``tanh`` bounds keep displacements below ``max_flow`` (in
units of half the image side) and colour changes below ``max_color``. The generator's output layer
starts at zero, so a fresh network is the identity.

Training (the staged recipe of ``docs/influence.md``):

1. train a classifier; compute ``s_val`` on its last layer (:class:`~augplug.methods.influence.InfluenceScorer`);
2. optionally pretrain the network adversarially to imitate a standard augmentation
   (:class:`AdversarialPretrainer`: WGAN-GP with an image-space and a flow-space critic);
3. train it on the influence objective through the **frozen** classifier
   (:class:`InfluenceAugTrainer`): maximise the replacement score
   ``s_val^T (grad l(x~) - grad l(x))`` ("positive = helps", i.e. minimise Koh & Liang's
   ``I(z -> z~)``), with regularisers that keep it away from the identity and keep labels;
4. train a fresh classifier with the standard plus the learned augmentation.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigurationError, ShapeError

__all__ = [
    "identity_grid",
    "warp",
    "affine_flow",
    "random_affine_flow",
    "heuristic_augment",
    "apply_color",
    "AugOutput",
    "AugmentationNetwork",
    "features_and_logits",
    "InfluenceAugTrainer",
    "gradient_penalty",
    "AdversarialPretrainer",
]


# ----------------------------------------------------------------------------- differentiable ops
def identity_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h, w, 2) sampling grid of the identity in ``grid_sample``'s ``(x, y)`` order, ``align_corners=True``."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1)


def warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample ``x`` (B, C, H, W) at ``p + flow(p)``; ``flow`` (B, 2, H, W) in ``[-1, 1]`` units, (x, y) order.

    Bilinear, ``align_corners=True``: a zero flow samples every pixel at its own centre (the identity).
    """
    if flow.dim() != 4 or flow.shape[1] != 2 or flow.shape[0] != x.shape[0] or flow.shape[2:] != x.shape[2:]:
        raise ShapeError(f"flow must have shape ({x.shape[0]}, 2, {x.shape[2]}, {x.shape[3]}), got {tuple(flow.shape)}",
                         "pass one 2-channel displacement field per image")
    grid = identity_grid(x.shape[2], x.shape[3], x.device, x.dtype)[None] + flow.permute(0, 2, 3, 1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def affine_flow(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (B, 2, h, w) displacement of the affine maps ``theta`` (B, 2, 3): ``theta [p; 1] - p``."""
    base = identity_grid(h, w, theta.device, theta.dtype)
    homo = torch.cat([base, torch.ones(h, w, 1, device=theta.device, dtype=theta.dtype)], -1)
    target = torch.einsum("bij,hwj->bhwi", theta, homo)
    return (target - base[None]).permute(0, 3, 1, 2)


def random_affine_flow(batch: int, h: int, w: int, *, generator: Optional[torch.Generator] = None,
                       max_rotate: float = 15.0, scale: Tuple[float, float] = (0.9, 1.1),
                       max_translate: float = 0.1, flip: bool = True, device=None) -> torch.Tensor:
    """Flow fields of random affine transformations (rotation in degrees, isotropic scale, translation
    as a fraction of the image side, horizontal flip with probability 1/2): a standard augmentation."""
    g = generator
    u = torch.rand(batch, 5, generator=g)
    ang = (2 * u[:, 0] - 1) * math.radians(max_rotate)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    tx, ty = (2 * u[:, 2] - 1) * 2 * max_translate, (2 * u[:, 3] - 1) * 2 * max_translate
    fl = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(batch)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos * fl, -sin, tx], 1), torch.stack([sin * fl, cos, ty], 1)], 1)
    return affine_flow(theta, h, w).to(device if device is not None else "cpu")


def heuristic_augment(x: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs) -> torch.Tensor:
    """Random affine + horizontal flip of a batch (see :func:`random_affine_flow`), one transform per image."""
    flow = random_affine_flow(x.shape[0], x.shape[2], x.shape[3], generator=generator, device=x.device, **kwargs)
    return warp(x, flow.to(x.dtype))


def apply_color(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-pixel colour filter ``x~(p) = (I + weight(p)) x(p) + bias(p)``.

    ``weight`` (B, C, C, H, W) is the change of the colour matrix, ``bias`` (B, C, H, W).
    """
    return x + torch.einsum("bcdhw,bdhw->bchw", weight, x) + bias


# ----------------------------------------------------------------------------- the network
@dataclass
class AugOutput:
    """What :class:`AugmentationNetwork` returns: the images and the fields that made them."""

    images: torch.Tensor          # (B, C, H, W)
    flow: torch.Tensor            # (B, 2, H, W) displacement in [-1, 1] units
    color_weight: torch.Tensor    # (B, C, C, H, W)
    color_bias: torch.Tensor      # (B, C, H, W)
    tau: torch.Tensor             # (B, latent_dim) the control predicted by the encoder


class AugmentationNetwork(nn.Module):
    """``x~ = G(E(x, z))(x)``: encoder ``E`` -> control ``tau`` -> smooth spatial and colour fields -> warp + colour.

    Args:
        in_chans, img_size: image shape (square images).
        latent_dim: size of the control ``tau``.
        noise_dim: size of the noise ``z`` fed to the encoder (0: deterministic per input).
        width: channels of the encoder's convolutions.
        grid: side of the coarse lattice the fields are predicted on.
        smooth: side of the average filter applied after upsampling (1: none).
        spatial: ``"local"`` (per-pixel affine terms), ``"global"`` (one affine map per image) or ``"none"``.
        appearance: learn the colour filter.
        max_flow: bound on each displacement component (``[-1, 1]`` image units; 0.25 = 1/8 of the side).
        max_color: bound on each colour-matrix and bias entry.
    """

    def __init__(self, in_chans: int = 1, img_size: int = 28, *, latent_dim: int = 16, noise_dim: int = 8,
                 width: int = 16, grid: int = 7, smooth: int = 4, spatial: str = "local", appearance: bool = True,
                 max_flow: float = 0.25, max_color: float = 0.3):
        super().__init__()
        if spatial not in ("local", "global", "none"):
            raise ConfigurationError(f"spatial must be 'local', 'global' or 'none', got {spatial!r}", "use 'local'")
        if spatial == "none" and not appearance:
            raise ConfigurationError("the network would change nothing (spatial='none', appearance=False)",
                                     "enable the spatial or the appearance transformation")
        if int(grid) < 1 or int(smooth) < 1 or int(latent_dim) < 1 or int(noise_dim) < 0:
            raise ConfigurationError("grid, smooth and latent_dim must be >= 1 and noise_dim >= 0", "use the defaults")
        self.in_chans, self.img_size = int(in_chans), int(img_size)
        self.latent_dim, self.noise_dim = int(latent_dim), int(noise_dim)
        self.grid, self.smooth, self.spatial, self.appearance = int(grid), int(smooth), spatial, bool(appearance)
        self.max_flow, self.max_color = float(max_flow), float(max_color)
        c = self.in_chans
        self.encoder = nn.Sequential(
            nn.Conv2d(c, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.control = nn.Sequential(nn.Linear(2 * width + self.noise_dim, 64), nn.ReLU(inplace=True),
                                     nn.Linear(64, self.latent_dim))
        self.n_local = (6 if spatial == "local" else 0) + ((c * c + c) if appearance else 0)
        self.local_head = nn.Linear(self.latent_dim, self.n_local * self.grid * self.grid) if self.n_local else None
        self.global_head = nn.Linear(self.latent_dim, 6) if spatial == "global" else None
        for head in (self.local_head, self.global_head):
            if head is not None:  # start at the identity
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def encode(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The control ``tau = E(x, z)`` (B, latent_dim); ``z`` drawn from ``generator`` when not given."""
        h = self.encoder(x)
        if self.noise_dim:
            if noise is None:
                noise = torch.randn(x.shape[0], self.noise_dim, generator=generator).to(x)
            h = torch.cat([h, noise], 1)
        return self.control(h)

    def _smooth(self, fields: torch.Tensor) -> torch.Tensor:
        side = self.img_size
        up = F.interpolate(fields, size=(side, side), mode="bilinear", align_corners=True)
        k = self.smooth
        if k <= 1:
            return up
        left, right = (k - 1) // 2, k // 2
        return F.avg_pool2d(F.pad(up, (left, right, left, right), mode="replicate"), k, stride=1)

    def fields(self, tau: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(flow (B, 2, H, W), color_weight (B, C, C, H, W), color_bias (B, C, H, W))`` from ``tau``."""
        B, c, side = tau.shape[0], self.in_chans, self.img_size
        base = identity_grid(side, side, tau.device, tau.dtype).permute(2, 0, 1)[None]  # (1, 2, H, W) (x, y)
        flow = tau.new_zeros(B, 2, side, side)
        cw = tau.new_zeros(B, c, c, side, side)
        cb = tau.new_zeros(B, c, side, side)
        if self.local_head is not None:
            maps = self._smooth(self.local_head(tau).view(B, self.n_local, self.grid, self.grid))
            i = 0
            if self.spatial == "local":
                a = self.max_flow * torch.tanh(maps[:, :6])
                # f(p) = dA(p) p + t(p): rows of dA act on (x, y)
                fx = a[:, 0] * base[:, 0] + a[:, 1] * base[:, 1] + a[:, 4]
                fy = a[:, 2] * base[:, 0] + a[:, 3] * base[:, 1] + a[:, 5]
                flow = torch.stack([fx, fy], 1)
                i = 6
            if self.appearance:
                cw = self.max_color * torch.tanh(maps[:, i:i + c * c]).view(B, c, c, side, side)
                cb = self.max_color * torch.tanh(maps[:, i + c * c:i + c * c + c])
        if self.global_head is not None:
            a = self.max_flow * torch.tanh(self.global_head(tau))
            theta = torch.eye(2, 3, device=tau.device, dtype=tau.dtype)[None] + a.view(B, 2, 3)
            flow = affine_flow(theta, side, side)
        return flow, cw, cb

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> AugOutput:
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ShapeError(f"expected images (B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(x.shape)}",
                             "build the network with the data's in_chans and img_size")
        tau = self.encode(x, noise, generator)
        flow, cw, cb = self.fields(tau)
        out = warp(x, flow) if self.spatial != "none" else x
        if self.appearance:
            out = apply_color(out, cw, cb)
        return AugOutput(out, flow, cw, cb, tau)


# ----------------------------------------------------------------------------- influence training
def features_and_logits(model: nn.Module, head: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(features entering head, logits)`` of ``model(x)``, keeping the graph back to ``x``."""
    store = []
    h = head.register_forward_hook(lambda m, a, o: store.append(a[0]))
    try:
        logits = model(x)
    finally:
        h.remove()
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return store[-1].flatten(1), logits


@contextmanager
def _frozen(model: nn.Module):
    """Eval mode (BatchNorm running statistics, no dropout) and no parameter gradients; restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in req:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in req:
            p.requires_grad_(r)
        for m, t in flags:
            m.training = t


def _tv(field: torch.Tensor) -> torch.Tensor:
    return (field[..., 1:, :] - field[..., :-1, :]).abs().mean() + (field[..., :, 1:] - field[..., :, :-1]).abs().mean()


class InfluenceAugTrainer:
    """Trains an :class:`AugmentationNetwork` on the influence objective through a frozen classifier.

    Per batch ``(x, y)`` with ``x~ = augnet(x)`` and the scorer's ``s_val`` (last-layer scope)::

        score_i  = s_val^T (grad l(x~_i, y_i) - grad l(x_i, y_i))          (+ = the replacement helps)
        loss     = -mean_i score_i / rms_i(score_i)                                       influence
                   + label_weight * CE(classifier(x~), y)                                 keep labels
                   + magnitude_weight * relu(min_change - mean (x~ - x_in)^2)              not the identity
                   + magnitude_weight * relu(mean (x~ - x_in)^2 - max_change)              not a new image
                   + tv_weight * (TV(flow) + TV(colour fields))                            smooth fields

    ``x_in`` is the network's input (``x``, or ``transform(x)``), so the hinges ask the network itself
    to change its input by at least ``min_change`` and at most ``max_change`` (mean squared pixel
    change). The influence term alone is linear in the sample's gradient and so rewards samples with
    a large loss: without the label term and the upper hinge it learns to turn images into ones the
    classifier gets wrong (measured on Fashion-MNIST, ``docs/influence.md``). The influence term is
    divided by the root-mean-square of the batch's replacement scores, held
    constant (no gradient through it): the term is at most 1 in size whatever the scale of ``s_val``, so
    the regularisers keep a fixed meaning; its gradient still points toward larger scores.
    Dividing by ``n`` (the paper's ``I/n``) would only rescale it. The classifier runs in eval mode
    and receives no gradient; only the augmentation network's parameters are updated.

    Args:
        augnet: the network to train.
        classifier: the frozen classifier; ``head`` its final ``nn.Linear`` (the scorer's head).
        scorer: an :class:`~augplug.methods.influence.InfluenceScorer` with ``s_val`` computed.
        lr: Adam learning rate.
        label_weight, magnitude_weight, min_change, max_change, tv_weight: regulariser weights (see
            above); ``min_change`` / ``max_change`` are mean squared pixel changes in the images' units
            (``max_change=None``: no upper bound).
        score_scale: ``"rms"`` (the batch's score RMS, as above) or a fixed positive divisor.
        transform: optional callable applied to ``x`` before the network (e.g. :func:`heuristic_augment`
            for the "standard + learned" setting); the replacement is scored against the untransformed ``x``.
    """

    def __init__(self, augnet: AugmentationNetwork, classifier: nn.Module, head: nn.Linear, scorer, *,
                 lr: float = 1e-3, label_weight: float = 1.0, magnitude_weight: float = 10.0, min_change: float = 0.05,
                 max_change: Optional[float] = 0.3, tv_weight: float = 0.0, transform: Optional[Callable] = None,
                 score_scale="rms"):
        if scorer.scope != "last_layer":
            raise ConfigurationError("the augmentation network is trained with a last-layer scorer",
                                     "build InfluenceScorer(head) (scope='last_layer') and call set_validation")
        if scorer.head is not head:
            raise ConfigurationError("the scorer's head is not the classifier's head", "pass the same nn.Linear")
        self.augnet, self.classifier, self.head, self.scorer = augnet, classifier, head, scorer
        self.opt = torch.optim.Adam(augnet.parameters(), lr=lr)
        self.label_weight, self.magnitude_weight = float(label_weight), float(magnitude_weight)
        if max_change is not None and max_change < min_change:
            raise ConfigurationError(f"max_change={max_change} is below min_change={min_change}",
                                     "use max_change >= min_change (or None for no upper bound)")
        self.min_change, self.tv_weight, self.transform = float(min_change), float(tv_weight), transform
        self.max_change = None if max_change is None else float(max_change)
        if not (score_scale == "rms" or (isinstance(score_scale, (int, float)) and score_scale > 0)):
            raise ConfigurationError(f"score_scale must be 'rms' or a positive number, got {score_scale!r}",
                                     "use 'rms' (the default)")
        self.score_scale = score_scale

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The training loss for one batch (attached to the augmentation network) and its parts."""
        self.scorer.s_val  # raises a typed error before any work when s_val is missing
        with _frozen(self.classifier):
            with torch.no_grad():
                a, z = features_and_logits(self.classifier, self.head, x)
                base = self.scorer.upweight_scores(a, z, y)
            src = self.transform(x, generator) if self.transform is not None else x
            out = self.augnet(src, generator=generator)
            a_t, z_t = features_and_logits(self.classifier, self.head, out.images)
            score = self.scorer.upweight_scores(a_t, z_t, y) - base
            if self.score_scale == "rms":
                scale = score.detach().pow(2).mean().sqrt().clamp_min(1e-12)
            else:
                scale = float(self.score_scale)
            infl = -score.mean() / scale
            ce = F.cross_entropy(z_t, y) if y.dim() == 1 else -(y * F.log_softmax(z_t, -1)).sum(-1).mean()
            change = (out.images - src).pow(2).mean()
            mag = F.relu(self.min_change - change)
            if self.max_change is not None:
                mag = mag + F.relu(change - self.max_change)
            tv = _tv(out.flow) + _tv(out.color_bias) if self.tv_weight else torch.zeros((), device=x.device)
            total = infl + self.label_weight * ce + self.magnitude_weight * mag + self.tv_weight * tv
        d = lambda t: float(t.detach())  # noqa: E731
        parts = {"loss": d(total), "influence": d(infl), "score_mean": d(score.mean()),
                 "helpful_share": d((score > 0).float().mean()), "label_ce": d(ce), "change": d(change),
                 "label_kept": d((z_t.argmax(1) == (y if y.dim() == 1 else y.argmax(1))).float().mean())}
        return total, parts

    def step(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        """One Adam step on the augmentation network; returns the loss parts (floats)."""
        self.augnet.train()
        total, parts = self.loss(x, y, generator)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        return parts


# ----------------------------------------------------------------------------- adversarial pretraining
def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """WGAN-GP's ``mean (||grad D(x^)|| - 1)^2`` at random interpolates ``x^ = e real + (1 - e) fake``."""
    e = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator).to(real)
    mix = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1).pow(2).mean()


def _critic(in_chans: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))


class AdversarialPretrainer:
    """Pretrain the augmentation network to imitate a standard augmentation (WGAN-GP, two critics).

    Real samples are the standard augmentation of the batch: images ``warp(x, f_real)`` and their
    flow fields ``f_real`` (by default random affine maps with flips, :func:`random_affine_flow`).
    Fake samples are the network's images and flow fields. Each step makes ``n_critic`` updates of an
    image-space critic and a flow-space critic on ``D(fake) - D(real) + gp_weight * GP``, then one
    update of the network on ``-D_img(fake) - flow_weight * D_flow(flow_fake)``. Critics have no
    normalization layers (the gradient penalty is per sample).

    Args:
        augnet: the network (its spatial part must be enabled for the flow critic to matter).
        real_flow: callable ``(batch, h, w, generator) -> (B, 2, h, w)`` flow fields of the standard augmentation.
        critic_width, lr, betas, gp_weight, n_critic, flow_weight: the usual WGAN-GP settings.
    """

    def __init__(self, augnet: AugmentationNetwork, *, real_flow: Optional[Callable] = None, critic_width: int = 16,
                 lr: float = 1e-4, betas: Tuple[float, float] = (0.5, 0.9), gp_weight: float = 10.0, n_critic: int = 5,
                 flow_weight: float = 1.0):
        if int(n_critic) < 1:
            raise ConfigurationError(f"n_critic must be >= 1, got {n_critic}", "use 5 (WGAN-GP's default)")
        self.augnet = augnet
        self.real_flow = real_flow or (lambda b, h, w, g: random_affine_flow(b, h, w, generator=g))
        self.image_critic = _critic(augnet.in_chans, critic_width)
        self.flow_critic = _critic(2, critic_width)
        params = list(self.image_critic.parameters()) + list(self.flow_critic.parameters())
        self.critic_opt = torch.optim.Adam(params, lr=lr, betas=betas)
        self.gen_opt = torch.optim.Adam(augnet.parameters(), lr=lr, betas=betas)
        self.gp_weight, self.n_critic, self.flow_weight = float(gp_weight), int(n_critic), float(flow_weight)

    def to(self, device) -> "AdversarialPretrainer":
        self.image_critic.to(device)
        self.flow_critic.to(device)
        return self

    def _real(self, x, generator):
        flow = self.real_flow(x.shape[0], x.shape[2], x.shape[3], generator).to(x)
        return warp(x, flow), flow

    def step(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        """``n_critic`` critic updates and one generator update on the batch ``x``; returns the losses."""
        d_loss = torch.zeros(())
        for _ in range(self.n_critic):
            real_img, real_flow = self._real(x, generator)
            with torch.no_grad():
                fake = self.augnet(x, generator=generator)
            d_img = self.image_critic(fake.images).mean() - self.image_critic(real_img).mean()
            d_flow = self.flow_critic(fake.flow).mean() - self.flow_critic(real_flow).mean()
            gp = gradient_penalty(self.image_critic, real_img, fake.images, generator) + \
                gradient_penalty(self.flow_critic, real_flow, fake.flow, generator)
            d_loss = d_img + self.flow_weight * d_flow + self.gp_weight * gp
            self.critic_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.critic_opt.step()
        fake = self.augnet(x, generator=generator)
        for p in list(self.image_critic.parameters()) + list(self.flow_critic.parameters()):
            p.requires_grad_(False)
        try:
            g_loss = -self.image_critic(fake.images).mean() - self.flow_weight * self.flow_critic(fake.flow).mean()
            self.gen_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            self.gen_opt.step()
        finally:
            for p in list(self.image_critic.parameters()) + list(self.flow_critic.parameters()):
                p.requires_grad_(True)
        return {"critic": float(d_loss.detach()), "generator": float(g_loss.detach()),
                "wasserstein_image": float(-d_img.detach()), "wasserstein_flow": float(-d_flow.detach()),
                "flow_rms": float(fake.flow.detach().pow(2).mean().sqrt())}
