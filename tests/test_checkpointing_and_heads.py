"""Training-loop setups around the model: activation checkpointing, a classifier that runs twice per
forward, hook-based weight normalization of the head, and a model that takes a dict of tensors.
Each either trains exactly like the plain model or is refused with an error that names the setup
and its fix, with nothing changed."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from augplug import AugmentationRefiner, Schedule
from augplug.errors import ShapeError, UnsupportedHeadError, UnsupportedModelError
from augplug.scores import ForwardModeUnsupportedError
from fault_harness import same

C, D, H = 4, 10, 16


class Net(nn.Module):
    """A small MLP; ``ckpt`` runs its body (``"body"``) or all of it (``"all"``) in a checkpoint."""

    def __init__(self, ckpt=None, reentrant=False, head=None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU())
        self.fc = head if head is not None else nn.Linear(H, C)
        self.ckpt, self.reentrant = ckpt, reentrant

    def forward(self, x):
        if self.ckpt is None:
            return self.fc(self.body(x))
        if self.reentrant:   # a reentrant checkpoint needs an input that requires grad
            x = x.detach().requires_grad_(True)
        if self.ckpt == "all":
            return checkpoint(lambda t: self.fc(self.body(t)), x, use_reentrant=self.reentrant)
        return self.fc(checkpoint(self.body, x, use_reentrant=self.reentrant))


def _val():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, D, generator=g), torch.randint(0, C, (32,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in (0, 16)]


def _batches(steps):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        x, y = torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)
        out.append((x, y, x + 0.5 * torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)))
    return out


def _build(model, val=None, **kw):
    torch.manual_seed(0)   # every model starts from the same weights where it has the plain model's
    own = model.state_dict()
    model.load_state_dict({k: t for k, t in Net().state_dict().items() if k in own}, strict=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("schedule", Schedule(budget=None, refresh_every=1))
    return model, opt, AugmentationRefiner(model, opt, val if val is not None else _val(), **kw)


def _train(model, pattern="batch", steps=4, **kw):
    model, opt, ref = _build(model, **kw)
    shares = []
    for x, y, xa, ya in _batches(steps):
        if pattern == "batch":
            loss = ref(model(torch.cat([x, xa])), torch.cat([y, ya]), num_original=len(x))
        else:
            loss = ref(model(xa), ya) + F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        shares.append(float(ref.stats["aug_weight"]))
    return model, ref, shares


def _snapshot(model, opt, ref):
    return copy.deepcopy((model.state_dict(), opt.state_dict(), ref.state_dict()))


def _refused(model, opt, ref, error, match, forward=None, **call):
    """A one-batch call (originals and views; ``forward`` runs the model on them) must raise ``error``
    matching ``match`` and leave the model, the optimizer and the refiner as they were."""
    x, y, xa, ya = _batches(1)[0]
    before = _snapshot(model, opt, ref)
    with pytest.raises(error, match=match) as info:
        ref((forward or model)(torch.cat([x, xa])), torch.cat([y, ya]), num_original=len(x), **call)
    same(before, _snapshot(model, opt, ref))
    return info


@pytest.mark.parametrize("pattern", ["batch", "separate"])
@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_a_non_reentrant_checkpoint_trains_like_the_plain_model(pattern, mode):
    """Its recomputation in the backward pass runs the hooks a second time: those forwards are not
    recorded (they used to pile up as forwards waiting for a gradient that never comes)."""
    plain, _, shares = _train(Net(), pattern, mode=mode)
    model, ref, ck_shares = _train(Net("all"), pattern, mode=mode)
    assert ck_shares == shares
    same(plain.state_dict(), model.state_dict())
    assert not ref._capture._awaiting or all(r.grad is not None for r in ref._capture._awaiting)


def test_forwards_in_a_backward_pass_are_not_recorded():
    model, opt, ref = _build(Net("all"))
    x, y, xa, ya = _batches(1)[0]
    loss = F.cross_entropy(model(torch.cat([x, xa])), torch.cat([y, ya]))
    ref._capture.clear()
    loss.backward()   # the checkpoint reruns the model's forward here
    assert ref._capture.recorded_nothing


def test_the_classifier_in_a_reentrant_checkpoint_is_refused_by_name():
    _refused(*_build(Net("all", reentrant=True)), UnsupportedModelError, "use_reentrant=False")


def test_views_alone_through_a_reentrant_checkpoint_warn_that_the_share_cannot_weigh_them():
    with pytest.warns(RuntimeWarning, match="use_reentrant=True") as caught:
        _, _, shares = _train(Net("all", reentrant=True), "separate")
    assert sum("use_reentrant=True" in str(w.message) for w in caught) == 1   # once
    assert shares == [1.0] * len(shares)


@pytest.mark.parametrize("ckpt", ["all", "body"])
def test_full_mode_refuses_parameters_a_reentrant_checkpoint_hides(ckpt):
    """torch.autograd.grad cannot reach them: the direction was silently 0 there (all of it, or the
    backbone's part), so every score was 0 or last-layer only."""
    info = _refused(*_build(Net(ckpt, reentrant=True), mode="full"), UnsupportedModelError, "use_reentrant=False")
    assert "body.0.weight" in str(info.value)


def test_a_reentrant_checkpoint_before_the_classifier_trains_like_the_plain_model():
    plain, _, shares = _train(Net())
    model, _, ck_shares = _train(Net("body", reentrant=True))
    assert ck_shares == shares
    same(plain.state_dict(), model.state_dict())


class DeepSupervision(Net):
    """The classifier runs twice: on the final features (the logits) and, after, on the middle ones."""

    def __init__(self, aux_first=False):
        super().__init__()
        self.mid = nn.Linear(D, H)
        self.aux_first = aux_first

    def forward(self, x):
        if self.aux_first:
            aux = self.fc(torch.relu(self.mid(x)))
            return self.fc(self.body(x)), aux
        main = self.fc(self.body(x))
        return main, self.fc(torch.relu(self.mid(x)))


@pytest.mark.parametrize("aux_first", [False, True])
def test_a_classifier_run_twice_gives_the_direction_of_the_logits_the_model_returns(aux_first):
    """The validation pass took the head's last call: with the auxiliary output computed after the
    main one, the direction was the auxiliary output's (relative error 2 against the truth)."""
    model, opt, ref = _build(DeepSupervision(aux_first))
    x, y, xa, ya = _batches(1)[0]
    ref(model(torch.cat([x, xa]))[0], torch.cat([y, ya]), num_original=len(x))
    model.zero_grad()
    vx, vy = (torch.cat(t) for t in zip(*_val()))
    F.cross_entropy(model.eval()(vx)[0], vy, reduction="sum").backward()
    v = ref.validation_direction
    for name in ("fc.weight", "fc.bias"):   # v = -grad of the mean validation loss
        truth = -dict(model.named_parameters())[name].grad / len(vy)
        assert torch.allclose(v[name], truth, atol=1e-6), (name, (v[name] - truth).abs().max())


class NoneIsTheLogits(Net):
    def forward(self, x):
        h = self.body(x)
        return self.fc(h) * 0.5 + self.fc(h.flip(0)) * 0.5


def test_a_classifier_run_twice_whose_outputs_are_not_the_logits_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the training side says the logits are computed from the forward
        _refused(*_build(NoneIsTheLogits()), UnsupportedHeadError, "ran 2 times")


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_a_head_under_hook_based_weight_normalization_is_refused_in_last_layer_mode(norm):
    """torch.nn.utils.weight_norm / spectral_norm recompute ``weight`` before each forward from the
    tensors the optimizer steps; last-layer scores measured a step on ``weight`` (relative errors of
    0.05 to 0.08 after 30 updates), silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # the hook-based API is deprecated in torch
        head = getattr(nn.utils, norm)(nn.Linear(H, C))
    model = Net(head=head)
    with pytest.raises(UnsupportedHeadError, match=norm if norm == "weight_norm" else "spectral_norm"):
        AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val())
    _train(model, mode="auto", steps=2)   # full-model scores go through the tensors that train
    if norm == "weight_norm":   # torch has no forward-mode rule for it: full mode's error names 'auto' first
        with pytest.raises(ForwardModeUnsupportedError) as info:
            _train(model, mode="full", steps=1)
        assert info.value.fix.startswith("use mode='auto'")


class DictInput(Net):
    def forward(self, batch):
        return super().forward(batch["x"] * batch["mask"][:, None])  # noqa


@pytest.mark.parametrize("pass_inputs", [False, True])
def test_full_mode_names_a_model_that_takes_a_dict(pass_inputs):
    """The error blamed the call order, another model or eval mode; with its fix (inputs=) it was a
    raw AttributeError."""
    val = [({"x": vx, "mask": torch.ones(len(vx))}, vy) for vx, vy in _val()]
    model, opt, ref = _build(DictInput(), val, mode="full")
    x, y, xa, ya = _batches(1)[0]
    batch = {"x": torch.cat([x, xa]), "mask": torch.ones(16)}
    info = _refused(model, opt, ref, UnsupportedModelError, "input is a dict", forward=lambda _: model(batch),
                    **({"inputs": batch} if pass_inputs else {}))
    assert "mode='last_layer'" in info.value.fix
    model, opt, ref = _build(DictInput(), val)   # last-layer mode reads the classifier's input: it trains
    loss = ref(model(batch), torch.cat([y, ya]), num_original=len(x))
    loss.backward()


def test_the_validation_window_refuses_batches_of_another_layout_with_a_shape_error():
    """Validation samples with an extra axis (three crops each) reached the window as flattened
    features and failed with a raw matrix-size error; the exact schedule gave a ShapeError."""
    vx, vy = (torch.cat(t) for t in zip(*_val()))
    val = [(vx[i:i + 8, None].expand(8, 3, D).contiguous(), vy[i:i + 8]) for i in (0, 8)]
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = AugmentationRefiner(model, opt, val, schedule=Schedule(budget=None, refresh_every=1))
    _refused(model, opt, ref, ShapeError, "one feature row of 16 per sample")


# ------------------------------------------------------------------ the other entry points
def _weight_normed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(nn.Linear(H, C))


def test_the_functional_api_and_the_influence_scorer_refuse_what_the_refiner_refuses():
    """Double-backward scores through a reentrant checkpoint were silently 0; the influence scorer's
    full-scope validation gradient left the checkpointed parameters at 0; a hook-based weight-norm
    head was taken as a plain one by validation_gradient(head=) and InfluenceScorer(head=)."""
    from augplug import functional as AF
    from augplug.influence import InfluenceScorer
    vx, vy = (torch.cat(t) for t in zip(*_val()))
    x = _batches(1)[0][0]
    model = _build(Net("all", reentrant=True))[0]
    v = AF.validation_gradient(model, vx, AF.to_soft_targets(vy, C), head=model.fc, head_name="fc").direction()
    with pytest.raises(UnsupportedModelError, match="use_reentrant=True"):
        AF.class_scores(model, x, v, mode="double_backward")
    with pytest.raises(UnsupportedModelError, match="body.0.weight"):
        InfluenceScorer(model=_build(Net("body", reentrant=True))[0], scope="full").model_gradient([(vx, vy)])
    normed = Net(head=_weight_normed())
    with pytest.raises(UnsupportedHeadError, match="computes its weight"):
        AF.validation_gradient(normed, vx, AF.to_soft_targets(vy, C), head=normed.fc, head_name="fc")
    with pytest.raises(UnsupportedHeadError, match="computes its weight"):
        InfluenceScorer(_weight_normed())


def test_influence_names_the_curvature_that_runs_through_a_checkpoint():
    """The Gauss-Newton products (torch.func) cannot run through activation checkpointing: a raw
    RuntimeError; now a typed error naming curvature='hessian', which trains like the plain model."""
    _refused(*_build(Net("all"), mode="full", method="influence"), UnsupportedModelError, "curvature='hessian'")
    options = dict(method="influence", method_options=dict(curvature="hessian", damping=2.0))
    plain, _, _ = _train(Net(), mode="full", steps=2, **options)
    checkpointed, _, _ = _train(Net("all"), mode="full", steps=2, **options)
    same(plain.state_dict(), checkpointed.state_dict())


class ImageNet(nn.Module):
    """A small CNN whose convolutions run in a reentrant checkpoint (AutoDO augments images)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, C)

    def forward(self, x):
        h = checkpoint(lambda t: F.adaptive_avg_pool2d(torch.relu(self.conv(t)), 1).flatten(1), x,
                       use_reentrant=True)
        return self.fc(h)


def test_autodo_names_a_reentrant_checkpoint_on_the_way_to_its_augmentation():
    torch.manual_seed(0)
    model = ImageNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    val = [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, C, (8,), generator=g))]
    ref = AugmentationRefiner(model, opt, val, method="autodo", schedule=Schedule(budget=None, refresh_every=1),
                              method_options=dict(num_points=16, num_classes=C, models="AWS"))
    x, y, idx = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, C, (8,), generator=g), torch.arange(8)
    with pytest.raises(UnsupportedModelError, match="use_reentrant=False"):
        for _ in range(3):
            loss = ref(model(ref.augment(x, idx)), y, index=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_the_functional_head_gradient_takes_the_call_that_gave_the_logits():
    """validation_gradient(head=) compared the logits with the head's last call only: a classifier run
    again after them (deep supervision) was refused as 'not the model's logits'."""
    from augplug import functional as AF
    vx, vy = (torch.cat(t) for t in zip(*_val()))
    model = _build(DeepSupervision())[0].eval()

    class First(nn.Module):   # the model's main output alone, as a plain classifier returns it
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[0]

    wrapped = First(model)
    v = AF.validation_gradient(wrapped, vx, AF.to_soft_targets(vy, C), head=model.fc, head_name="net.fc").direction()
    model.zero_grad()
    F.cross_entropy(model(vx)[0], vy).backward()
    assert torch.allclose(v["net.fc.weight"], -model.fc.weight.grad, atol=1e-6)


def test_isda_names_a_reentrant_checkpoint_around_the_classifier():
    from augplug.isda import ISDALoss
    model = _build(Net("all", reentrant=True))[0]
    loss_fn = ISDALoss.for_model(model)
    x, y = _batches(1)[0][:2]
    with pytest.raises(UnsupportedModelError, match="use_reentrant=True"):
        loss_fn(model(x), y)
