"""AugmentationRefiner: two-line integration, loss formula, side effects, steps, state."""
import math
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import L2RW, AugmentationRefiner, Policy
from augplug.errors import UnsupportedHeadError
from augplug.heads import find_classifier
from augplug.models import MLP, SmallCNN
from augplug.refiner import refiner_kwargs

C = 4


def _loader(n=24, bs=8, shape=(1, 8, 8), seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g))
    return DataLoader(ds, batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(seed + 1))


def _batch(b=8, shape=(1, 8, 8), seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randint(0, C, (b,), generator=g)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, C, img_size=8, width=4, hidden=8)


def _train(model, refiner, opt, steps, shape=(1, 8, 8), num_original=0):
    losses = []
    for s in range(steps):
        x, y = _batch(seed=100 + s, shape=shape)
        loss = refiner(model(x), y, num_original=num_original)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("mode", ["last_layer", "full", "double_backward", "auto"])
@pytest.mark.parametrize("method", ["saflex", "l2rw", "none"])
def test_two_line_integration_small_cnn(mode, method):
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refiner = AugmentationRefiner(model, opt, _loader(), method=method, mode=mode,
                                  method_options=dict(strength=1.0) if method != "none" else None)
    losses = _train(model, refiner, opt, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    st = refiner.stats
    assert st["weights"].shape == (8,) and st["soft_targets"].shape == (8, C) and st["scores"].shape == (8, C)
    assert torch.allclose(st["soft_targets"].sum(1), torch.ones(8))
    assert refiner.step_count == 3
    if method != "none":
        assert st["active"] and st["scores"].abs().sum() > 0
        assert abs(float(st["weights"].mean()) - 1) < 1e-5 or float(st["weights"].sum()) == 0


def test_modes_agree_on_scores():
    """Captured inputs/features give the same g in full mode as in last-layer mode when only the head trains."""
    model = _cnn()
    for p in model.features.parameters():
        p.requires_grad_(False)
    model.eval()  # deterministic forward (dropout off, BN running stats) in both the user and scoring passes
    scores = {}
    for mode in ("last_layer", "full", "double_backward"):
        r = AugmentationRefiner(model, None, _loader(shuffle=False), mode=mode, check_train_mode=False,
                                method_options=dict(gumbel=False))
        x, y = _batch()
        logits = model(x)
        r(logits, y, inputs=x, features=model.features(x))
        scores[mode] = r.stats["scores"]
    assert torch.allclose(scores["full"], scores["last_layer"], atol=1e-5)
    assert torch.allclose(scores["full"], scores["double_backward"], atol=1e-5)


def test_none_method_is_plain_cross_entropy_and_orig_aug_weights():
    model = _cnn()
    r = AugmentationRefiner(model, None, None, method="none")
    x, y = _batch()
    logits = model(x)
    assert torch.allclose(r(logits, y), F.cross_entropy(logits, y))
    r2 = AugmentationRefiner(model, None, None, method="none", orig_weight=2.0, method_options=dict(aug_weight=0.5))
    ce = F.cross_entropy(logits, y, reduction="none")
    expect = (2.0 * ce[:3].sum() + 0.5 * ce[3:].sum()) / (2.0 * 3 + 0.5 * 5)
    assert torch.allclose(r2(logits, y, num_original=3), expect)
    mask = torch.tensor([False] * 3 + [True] * 5)
    assert torch.allclose(r2(logits, y, augmented=mask), expect)


def test_originals_keep_their_labels_and_weight():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _loader(), method_options=dict(beta=0.0, tau=0.05, gumbel=False))
    x, y = _batch()
    r(model(x), y, num_original=4)
    st = r.stats
    assert torch.equal(st["weights"][:4], torch.ones(4))
    assert torch.equal(st["soft_targets"][:4], F.one_hot(y[:4], C).float())
    assert torch.equal(st["scores"][:4], torch.zeros(4, C))
    assert st["augmented"].tolist() == [False] * 4 + [True] * 4


def test_saflex_weights_keep_each_class_share_without_originals():
    model = _cnn()
    x, y = _batch(b=24, seed=9)
    counts = torch.bincount(y[4:], minlength=C).float()

    def class_totals(num_original, **kw):
        m = copy.deepcopy(model)   # the same weights and BatchNorm statistics for every variant
        r = AugmentationRefiner(m, None, _loader(), **refiner_kwargs(kw, aug_weight=1.0, strength=1.0))
        torch.manual_seed(1)   # the same dropout masks
        r(m(x), y, num_original=num_original)
        w, ya = r.stats["weights"][num_original:], y[num_original:]
        assert float((w - 1).abs().max()) > 1e-3 and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
        return r.weight_norm, torch.stack([w[ya == c].sum() for c in range(C)])

    # the default ("auto"): without originals every class keeps its upstream row count as its weight
    norm, totals = class_totals(0)
    assert norm == "auto"
    assert torch.allclose(totals, torch.bincount(y, minlength=C).float(), rtol=1e-5)
    # with originals in the batch, "auto" is the paper's normalization, which moves weight between classes
    _, auto_with_orig = class_totals(4)
    _, paper = class_totals(4, weight_norm="augmented")
    assert torch.equal(auto_with_orig, paper) and not torch.allclose(paper, counts, rtol=1e-3)
    # "class" keeps the classes' shares with originals too
    _, by_class = class_totals(4, weight_norm="class")
    assert torch.allclose(by_class, counts, rtol=1e-5)
    # other methods keep the paper's normalization by default
    assert AugmentationRefiner(model, None, _loader(), method="l2rw").weight_norm == "augmented"


def test_likelihood_weights_from_the_training_logits():
    from augplug.methods import class_renormalize, renormalize

    model = _cnn()
    x, y = _batch(b=24, seed=9)
    for num_original, norm in ((0, class_renormalize), (4, None)):
        m = copy.deepcopy(model)
        r = AugmentationRefiner(m, None, _loader(),
                                method_options=dict(aug_weight=1.0, weight_signal='likelihood', strength=1.0))
        torch.manual_seed(1)
        logits = m(x)
        r(logits, y, num_original=num_original)
        la, ya = logits.detach()[num_original:], y[num_original:]
        ll = torch.log_softmax(la, -1).gather(1, ya[:, None]).squeeze(1).double()
        raw = 2 * torch.sigmoid(((ll - ll.mean()) / ll.std(unbiased=False)).float())
        expected = norm(raw, F.one_hot(ya, C).float()) if norm else renormalize(raw)
        w = r.stats["weights"]
        torch.testing.assert_close(w[num_original:], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(w[:num_original], torch.ones(num_original))
        # the most likely upstream label gets the largest weight within its class
        c = int(ya[int(ll.argmax())])
        assert int(ll.argmax()) == int(torch.where(ya == c, w[num_original:], -1).argmax())
        # the scores are still computed (the adaptive share and the statistics use them)
        assert float(r.stats["scores"][num_original:].abs().sum()) > 0


def test_auto_weight_signal_uses_the_likelihood_only_without_originals():
    model = _cnn()
    x, y = _batch(b=24, seed=9)

    def weights(num_original, signal):
        m = copy.deepcopy(model)
        r = AugmentationRefiner(m, None, _loader(),
                                method_options=dict(aug_weight=1.0, weight_signal=signal, strength=1.0))
        torch.manual_seed(1)
        r(m(x), y, num_original=num_original)
        return r.stats["weights"]

    assert torch.equal(weights(0, "auto"), weights(0, "likelihood"))
    assert torch.equal(weights(4, "auto"), weights(4, "agreement"))
    assert not torch.allclose(weights(4, "likelihood"), weights(4, "agreement"), atol=1e-3)
    assert not torch.allclose(weights(0, "likelihood"), weights(0, "agreement"), atol=1e-3)


def test_class_weight_norm_rejected_where_it_cannot_apply():
    from augplug.errors import ConfigurationError
    model = _cnn()
    with pytest.raises(ConfigurationError, match="does not use the option.*weight_norm"):  # AutoDO keeps its own scale
        AugmentationRefiner(model, None, _loader(), method="autodo",
                            method_options=dict(num_points=8, num_classes=C, weight_norm="class"))

    class Absolute(L2RW):
        refiner_renormalizes = False

    for norm in ("class", "auto"):
        with pytest.raises(ConfigurationError, match=f"weight_norm='{norm}'"):
            AugmentationRefiner(model, None, _loader(), method=Absolute(weight_norm=norm))


def test_loss_uses_weights_and_soft_targets_as_constants():
    model = _cnn()
    r = AugmentationRefiner(model, None, _loader(), method_options=dict(beta=1.0, tau=0.5, gumbel=False))
    x, y = _batch()
    logits = model(x)
    loss = r(logits, y)
    st = r.stats
    expect = (st["weights"] * -(st["soft_targets"] * F.log_softmax(logits, -1)).sum(1)).mean()
    assert torch.allclose(loss, expect)
    assert not st["weights"].requires_grad and not st["soft_targets"].requires_grad


@pytest.mark.parametrize("mode,bn", [("full", "train"), ("full", "eval"), ("last_layer", "train"),
                                     ("double_backward", "eval")])
def test_no_side_effects_on_batchnorm_or_user_rng(mode, bn):
    """After the user's forward, a refiner call changes neither the model's buffers nor the global RNG."""
    model = _cnn()
    r = AugmentationRefiner(model, None, _loader(), mode=mode, bn_mode=bn, method_options=dict(gumbel=True))
    for step in range(2):
        x, y = _batch(seed=step)
        logits = model(x)
        buffers = {k: b.clone() for k, b in model.state_dict().items()}
        rng = torch.get_rng_state()
        r(logits, y)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(buffers[k], b) for k, b in model.state_dict().items())
        assert model.training and all(m.training for m in model.modules())


def test_refresh_counts_optimizer_updates_and_warmup():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    r = AugmentationRefiner(model, opt, _loader(), method_options=dict(strength=1.0),
                            schedule=dict(refresh_every=3, warmup_steps=2))
    pattern = []
    for s in range(8):
        x, y = _batch(seed=s)
        for micro in range(2):  # gradient accumulation: two calls per optimizer step
            loss = r(model(x[micro * 4:(micro + 1) * 4]), y[micro * 4:(micro + 1) * 4])
            loss.backward()
            pattern.append((r.stats["active"], r.stats["refreshed"]))
        opt.step()
        opt.zero_grad()
    assert pattern[:4] == [(False, False)] * 4  # warm-up: 2 optimizer steps
    refreshed_steps = [i // 2 for i, (a, f) in enumerate(pattern) if f]
    assert refreshed_steps == [2, 5]  # refresh at steps 2 and 5, once per optimizer step
    assert r.step_count == 8 and r.calls == 16


class _WrapperWithoutHooks:
    """Like accelerate's AcceleratedOptimizer: not an Optimizer itself, wraps one."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=1e-3),
    lambda p: _WrapperWithoutHooks(torch.optim.SGD(p, lr=0.05)),
    "timm",
])
def test_any_optimizer(make_opt):
    model = _cnn()
    if make_opt == "timm":
        from timm.optim import create_optimizer_v2
        opt = create_optimizer_v2(model, "lookahead_adamw", lr=1e-3)
    else:
        opt = make_opt(model.parameters())
    r = AugmentationRefiner(model, opt, _loader(), method_options=dict(strength=1.0))
    _train(model, r, opt, 3)
    assert r.step_count == 3


@pytest.mark.parametrize("kind", ["timm", "torchvision", "mlp"])
def test_any_classifier(kind):
    if kind == "timm":
        import timm
        model, shape = timm.create_model("resnet10t", num_classes=C, pretrained=False), (3, 32, 32)
    elif kind == "torchvision":
        import torchvision
        model, shape = torchvision.models.resnet18(num_classes=C), (3, 32, 32)
    else:
        model, shape = MLP(10, C, hidden=16), (10,)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for mode in ("last_layer", "full"):
        r = AugmentationRefiner(model, opt, _loader(shape=shape), mode=mode, method_options=dict(strength=1.0))
        x, y = _batch(shape=shape)
        loss = r(model(x), y)
        loss.backward()
        assert torch.isfinite(loss) and r.stats["active"]
        r.remove_hooks()



def test_heads_found_inside_wrappers_and_torchvision_vit():
    """torchvision's ViT keeps its head in ``heads.head``; a user's wrapper holding a timm or torchvision
    model as an attribute names no head of its own: both are found and score like the bare model."""
    import timm
    import torchvision

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.backbone = inner

        def forward(self, x):
            return self.backbone(x)

    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=8, num_classes=C)
    assert find_classifier(vit)[0] == "heads.head"
    torch.manual_seed(0)
    inner = timm.create_model("resnet10t", num_classes=C, pretrained=False)
    wrapped = Wrapper(copy.deepcopy(inner))
    assert find_classifier(wrapped) == ("backbone.fc", wrapped.backbone.fc)
    assert find_classifier(Wrapper(Wrapper(torchvision.models.resnet18(num_classes=C))))[0] == "backbone.backbone.fc"
    # the wrapper holds a copy of the bare model, so both score the same batch the same way
    x, y = _batch(shape=(3, 32, 32))
    weights = []
    for model in (inner, wrapped):
        torch.manual_seed(1)
        r = AugmentationRefiner(model, None, _loader(shape=(3, 32, 32)), method_options=dict(strength=1.0), seed=0)
        r(model(x), y)
        weights.append(r.stats["weights"])
        r.remove_hooks()
    torch.testing.assert_close(weights[0], weights[1])


def test_a_wrapper_of_two_heads_is_named_not_guessed():
    class TwoModels(nn.Module):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = MLP(10, C, hidden=8), MLP(10, C, hidden=8)

    with pytest.raises(UnsupportedHeadError, match="student.fc, teacher.fc") as e:
        find_classifier(TwoModels())
    assert "classifier='student.fc'" in e.value.fix
    assert find_classifier(TwoModels(), "teacher.fc")[0] == "teacher.fc"


@pytest.mark.parametrize("case", ["views weighted 0, no originals", "originals weighted 0, no views"])
def test_a_batch_whose_rows_all_weigh_zero_trains_nothing(case):
    """A fixed share of 0 on views alone (the separate pattern with ``aug_weight=0``), or
    ``orig_weight=0`` on a batch without augmented rows: every row weighs 0, so the loss is 0 and
    its gradient 0 (it was 0 / 0, a NaN that an optimizer step wrote into the model)."""
    model = MLP(10, C, hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if case.startswith("views"):
        r, kw = AugmentationRefiner(model, opt, _loader(shape=(10,)), method_options=dict(aug_weight=0.0)), {}
    else:
        r = AugmentationRefiner(model, opt, _loader(shape=(10,)), orig_weight=0.0)
        kw = dict(augmented=torch.zeros(8, dtype=torch.bool))
    before = copy.deepcopy(model.state_dict())
    for _ in range(6):   # past the warm-up
        x, y = _batch(shape=(10,))
        loss = r(model(x), y, **kw)
        opt.zero_grad()
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

def test_mixup_soft_targets_flow_through():
    from timm.data import Mixup
    model = _cnn()
    r = AugmentationRefiner(model, None, _loader(), method_options=dict(beta=2.0, gumbel=False))
    mix = Mixup(mixup_alpha=1.0, num_classes=C, label_smoothing=0.0)
    x, y = _batch()
    xm, ym = mix(x.clone(), y)
    loss = r(model(xm), ym)
    assert torch.isfinite(loss) and r.stats["soft_targets"].shape == (8, C)


def _run_with_checkpoint(split, total=6, **kw):
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    r = AugmentationRefiner(model, opt, _loader(), **kw, method_options=dict(gumbel=True),
                            schedule=dict(refresh_every=2))
    losses = _train(model, r, opt, split)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ref": r.state_dict(),
                           "rng": torch.get_rng_state()})  # the user's own RNG (dropout) is theirs to save
    return losses + _train(model, r, opt, total - split), state


@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_resume_from_state_dict_is_exact(mode):
    full_run, state = _run_with_checkpoint(3, mode=mode)
    model = _cnn(seed=123)  # different init, overwritten by the checkpoint
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    r = AugmentationRefiner(model, opt, _loader(), mode=mode, seed=99, method_options=dict(gumbel=True),
                            schedule=dict(refresh_every=2))   # the seed is restored from the state
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the same options (the seed is state): no warning about them
        r.load_state_dict(state["ref"])
    torch.set_rng_state(state["rng"])
    resumed = _train(model, r, opt, 3)
    assert resumed == full_run[3:]


def test_custom_policy_object():
    class KeepFirstHalf(Policy):
        name = "half"

        def __call__(self, scores, targets, generator=None):
            w = torch.zeros(targets.shape[0])
            w[: targets.shape[0] // 2] = 2.0
            return w, targets

    model = _cnn()
    r = AugmentationRefiner(model, None, _loader(), method=KeepFirstHalf())
    x, y = _batch()
    r(model(x), y)
    assert r.stats["weights"].tolist() == [2.0] * 4 + [0.0] * 4


def test_weight_spread_by_hand():
    from augplug.stats import weight_spread
    y = torch.eye(2)[[0, 0, 1, 1]]
    out = weight_spread(torch.tensor([2.0, 0.0, 1.0, 1.0]), y)
    # ESS (4)^2 / (4 + 0 + 1 + 1) / 4 = 2/3; moved: 1/2 (|.5-.25| + |0-.25| + 0 + 0) = 0.25; classes keep .5/.5
    assert out["weight_ess"] == pytest.approx(2 / 3)
    assert out["moved_weight"] == pytest.approx(0.25)
    assert out["moved_class_weight"] == pytest.approx(0.0)
    out = weight_spread(torch.tensor([1.0, 1.0, 0.0, 2.0]), y)   # class 0: mass 2 of 4, class 1: 2 of 4
    assert out["moved_class_weight"] == pytest.approx(0.0)
    out = weight_spread(torch.tensor([3.0, 1.0, 0.0, 0.0]), y)   # all weight on class 0
    assert out["moved_class_weight"] == pytest.approx(0.5) and out["weight_ess"] == pytest.approx(16 / 10 / 4)
    assert all(math.isnan(v) for v in weight_spread(torch.zeros(3), torch.eye(3)).values())


def test_stats_report_what_was_decided():
    model = _cnn()
    r = AugmentationRefiner(model, None, _loader(), method_options=dict(strength=1.0, weight_norm="augmented"))
    x, y = _batch()
    r(model(x), y, num_original=4)
    st = r.stats
    assert 0 < st["weight_ess"] <= 1 and 0 <= st["moved_weight"] < 1 and 0 <= st["moved_class_weight"] < 1
    assert st["moved_weight"] > 0   # the refined weights are not uniform
