"""What a practitioner's loop does around the refiner: an optimizer over part of the model, autocast,
a model converted to another dtype, an EMA copy held beside the model."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augplug import AugmentationRefiner, Schedule

C = 4


class CNN(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, C)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


def _val(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g).to(dtype), torch.randint(0, C, (16,), generator=g))
            for _ in range(2)]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, C, (16,), generator=g)


def _weights(model, opt, mode, steps=3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = AugmentationRefiner(model, opt, _val(), mode=mode, schedule=Schedule(budget=None), **kw)
    out = []
    for s in range(steps):
        x, y = _batch(10 + s)
        loss = r(model(x), y, num_original=8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(r.stats["weights"][8:].clone())
    r.remove_hooks()
    return out


@pytest.mark.parametrize("mode", ["full", "double_backward"])
@pytest.mark.parametrize("how", ["outside_the_optimizer", "group_with_lr_0"])
def test_model_scores_cover_only_what_the_optimizer_steps(mode, how):
    """Only the head trains: a backbone left out of the optimizer, or in a group with lr=0, was scored
    as if a step moved it (weights 0.7 apart from the same run with the backbone frozen)."""
    torch.manual_seed(0)
    frozen = CNN(bn=False)
    for n, p in frozen.named_parameters():
        p.requires_grad_(n.startswith("fc."))
    expected = _weights(frozen, torch.optim.SGD(frozen.fc.parameters(), lr=0.1), mode)
    torch.manual_seed(0)
    model = CNN(bn=False)
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1) if how == "outside_the_optimizer" else \
        torch.optim.SGD([{"params": backbone, "lr": 0.0}, {"params": model.fc.parameters(), "lr": 0.1}])
    got = _weights(model, opt, mode)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_optimizer_that_steps_nothing_warns_in_model_score_modes():
    model = CNN(bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(RuntimeWarning, match="steps none of the model's trainable parameters"):
        AugmentationRefiner(model, opt, _val(), mode="full").remove_hooks()


@pytest.mark.parametrize("mode", ["full", "double_backward"])
@pytest.mark.parametrize("case", ["autocast", "bn_train"])
def test_influence_in_model_score_modes_under_autocast_and_batch_statistics(mode, case):
    """Both were raw torch errors at the first call: autocast's casts inside jvp, and BatchNorm's
    in-place update of buffers captured by the transform. BatchNorm's statistics are still only those
    of the training forward."""
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"bn_mode": "train"} if case == "bn_train" else {}
    r = AugmentationRefiner(model, opt, _val(), method="influence", mode=mode, schedule=Schedule(budget=None), **kw)
    x, y = _batch(3)
    for _ in range(2):
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = r(model(x), y, num_original=8)
        else:
            out = model(x)
            stats = copy.deepcopy(model.bn.state_dict())
            loss = r(out, y, num_original=8)
            for k, t in model.bn.state_dict().items():
                assert torch.equal(t, stats[k]), k
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r.remove_hooks()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_a_converted_model_trains_on_a_float32_validation_loader(dtype, mode):
    """The user converts the training inputs; the validation loader still yields fp32, which failed as
    a ShapeError at the first refresh. Its floating inputs are now converted to the model's dtype,
    with the same direction as a loader that yields that dtype."""
    def run(val_dtype):
        torch.manual_seed(0)
        model = CNN().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        r = AugmentationRefiner(model, opt, _val(dtype=val_dtype), mode=mode, schedule=Schedule(budget=None))
        x, y = _batch(3)
        loss = r(model(x.to(dtype)), y, num_original=8)
        loss.backward()
        v = {k: t.clone() for k, t in r.validation_direction.items()}
        r.remove_hooks()
        return v

    converted, native = run(torch.float32), run(dtype)
    for k in native:
        assert torch.equal(converted[k], native[k]), k


def test_a_frozen_ema_copy_beside_the_model_is_not_a_second_head():
    class EMAWrap(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.module, self.ema = model, copy.deepcopy(model)
            self.ema.requires_grad_(False)

        def forward(self, x):
            return self.module(x)

    wrapped = EMAWrap(CNN())
    r = AugmentationRefiner(wrapped, torch.optim.SGD(wrapped.module.parameters(), lr=0.1), _val())
    assert r.head is wrapped.module.fc and r.head_name == "module.fc"
    r.remove_hooks()


def test_a_model_that_mixes_dtypes_gets_its_validation_inputs_as_they_are():
    """Inputs are converted only where the model's floating parameters share one dtype: here the
    first parameter is fp64 but the layer that reads the inputs is fp32."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, C).double()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)).double())

    torch.manual_seed(0)
    model = Mixed()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), schedule=Schedule(budget=None))
    x, y = _batch(3)
    r(model(x), y, num_original=8).backward()
    assert r.validation_direction is not None
    r.remove_hooks()
