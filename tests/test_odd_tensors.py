"""Tensors real training code produces that are unusual: named outputs, fp64 features beyond fp32's
range, meta tensors, masks built under inference mode or of the wrong kind."""
import collections
import copy
import warnings

import pytest
import torch
from torch import nn

from augplug import AugmentationRefiner, Schedule
from augplug.errors import NonFiniteError, ShapeError, TargetError
from fault_harness import same

C, D = 4, 8
Out = collections.namedtuple("Out", ["embedding", "logits"])


class Net(nn.Module):
    def __init__(self, named=False):
        super().__init__()
        self.named = named
        self.body = nn.Sequential(nn.Linear(D, 16), nn.ReLU())
        self.proj = nn.Linear(16, C)   # an embedding head as wide as the logits
        self.fc = nn.Linear(16, C)

    def forward(self, x):
        h = self.body(x)
        z = self.fc(h)
        return Out(self.proj(h), z) if self.named else z


def _val():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)) for _ in range(2)]


def _refiner(model, **kw):
    return AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(),
                               schedule=Schedule(budget=None), classifier="fc", **kw)


def test_a_named_output_with_logits_not_first_is_scored_on_its_logits():
    """Full mode took a namedtuple's first field (the embedding) as the logits: another validation loss,
    other weights, a direction through a layer that does not feed the logits."""
    out = {}
    for named in (True, False):
        torch.manual_seed(0)
        model = Net(named)
        r = _refiner(model, mode="full")
        x, y = torch.randn(12, D, generator=torch.Generator().manual_seed(2)), torch.arange(12) % C
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)   # no "not the output" warning either
            o = model(x)
            r(o.logits if named else o, y, num_original=6)
        out[named] = (r.val_loss, r.stats["weights"].clone(), r.validation_direction["proj.weight"].clone())
    assert out[True][0] == out[False][0]
    assert torch.equal(out[True][1], out[False][1])
    assert not out[True][2].any()


def test_fp64_features_beyond_fp32_range_are_refused_and_change_nothing():
    torch.manual_seed(0)
    model = Net()
    r = _refiner(model)
    x, y = torch.randn(8, D), torch.arange(8) % C
    r(model(x), y, num_original=4)
    before = copy.deepcopy(r.state_dict())
    h = model.body(x)
    with pytest.raises(NonFiniteError, match="beyond fp32's range"):
        r(model.fc(h), y, num_original=4, features=h.double() * 1e39)
    same(before, r.state_dict())


@pytest.mark.parametrize("which", ["logits", "targets", "features"])
def test_meta_tensors_are_shape_errors(which):
    torch.manual_seed(0)
    model = Net()
    r = _refiner(model)
    x, y = torch.randn(8, D), torch.arange(8) % C
    h = model.body(x)
    z = model.fc(h)
    kw = {"features": h.to("meta")} if which == "features" else {}
    args = (z.to("meta") if which == "logits" else z, y.to("meta") if which == "targets" else y)
    before = copy.deepcopy(r.state_dict())
    with pytest.raises((ShapeError, TargetError), match="meta device"):
        r(*args, num_original=4, **kw)
    same(before, r.state_dict())


@pytest.mark.parametrize("mask", ["yes", [None] * 8, {"a": 1}])
def test_masks_that_are_not_tensors_of_bools_are_shape_errors(mask):
    model = Net()
    r = _refiner(model)
    with pytest.raises(ShapeError, match="augmented= must be a bool tensor"):
        r(model(torch.randn(8, D)), torch.arange(8) % C, augmented=mask)


def test_a_mask_built_under_inference_mode_trains_like_a_plain_one():
    losses = []
    for inference in (True, False):
        torch.manual_seed(0)
        model = Net()
        r = _refiner(model)
        x, y = torch.randn(8, D), torch.arange(8) % C
        if inference:
            with torch.inference_mode():
                mask = torch.arange(8) >= 4
        else:
            mask = torch.arange(8) >= 4
        loss = r(model(x), y, augmented=mask)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
