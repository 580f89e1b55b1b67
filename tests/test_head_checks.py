"""Classifiers whose logits are not the W a + b of a plain nn.Linear head, which last-layer
(closed-form) scores assume: refused or warned, never scored silently."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augplug import AugmentationRefiner, Schedule
from augplug.errors import UnsupportedHeadError

C = 4
D = 6


def _val(n=2, b=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, D, generator=g), torch.randint(0, C, (b,), generator=g)) for _ in range(n)]


class Net(nn.Module):
    def __init__(self, fc=None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU())
        self.fc = fc if fc is not None else nn.Linear(8, C)

    def forward(self, x):
        return self.fc(self.body(x))


def _refiner(model, **kw):
    kw.setdefault("schedule", Schedule(budget=None))
    return AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), **kw)


def _messages(w):
    return [str(x.message) for x in w]


# ---------------------------------------------------------------- 1. heads that are not F.linear
class NormedLinear(nn.Linear):
    def forward(self, x):
        return 16.0 * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def test_cosine_linear_subclass_refused_in_last_layer_mode():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedHeadError) as e:
        _refiner(Net(NormedLinear(8, C, bias=False)))
    assert "mode='full'" in e.value.fix


def test_weight_normed_head_refused_in_last_layer_mode():
    torch.manual_seed(0)
    fc = torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, C))
    with pytest.raises(UnsupportedHeadError) as e:
        _refiner(Net(fc))
    assert "mode='full'" in e.value.fix


def test_plain_and_timm_linear_heads_accepted():
    timm_layers = pytest.importorskip("timm.layers")
    for fc in (nn.Linear(8, C), timm_layers.Linear(8, C)):
        torch.manual_seed(0)
        model = Net(fc)
        r = _refiner(model)
        x, y = torch.randn(8, D), torch.randint(0, C, (8,))
        r(model(x), y, num_original=4).backward()
        assert r.head is fc
        r.remove_hooks()


# ---------------------------------------------------------------- 2. tied classifier weights
class Tied(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU())
        self.proj, self.back = nn.Linear(8, C, bias=False), nn.Linear(C, 8)
        self.fc = nn.Linear(8, C, bias=False)
        if tie:
            self.fc.weight = self.proj.weight

    def forward(self, x):
        h = self.body(x)
        return self.fc(h + self.back(torch.tanh(self.proj(h))))


@pytest.mark.parametrize("tie", [True, False])
def test_tied_classifier_weight_warns_once_in_last_layer_mode(tie):
    torch.manual_seed(0)
    model = Tied(tie)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = _refiner(model)
        x, y = torch.randn(8, D), torch.randint(0, C, (8,))
        r(model(x), y, num_original=4)
    tied = [m for m in _messages(w) if "tied" in m]
    if tie:
        assert len(tied) == 1 and "proj.weight" in tied[0] and "mode='full'" in tied[0]
    else:
        assert tied == []
    r.remove_hooks()


# ---------------------------------------------------------------- 3. a temperature after the head
class Tempered(Net):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        z = self.fc(self.body(x))
        if self.how == "in_place":
            z /= 2.0
        elif self.how == "out_of_place":
            z = z / 2.0
        return z


NOT_OUTPUT = "not, row for row, the output"


@pytest.mark.parametrize("how", ["in_place", "out_of_place", "none"])
def test_temperature_after_the_head_warns_in_place_too(how):
    torch.manual_seed(0)
    model = Tempered(how)
    r = _refiner(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for s in range(3):
            x, y = torch.randn(8, D), torch.randint(0, C, (8,))
            loss = r(model(x), y, num_original=4)
            opt.zero_grad()
            loss.backward()
            opt.step()
    hits = [m for m in _messages(w) if NOT_OUTPUT in m]
    assert len(hits) == (0 if how == "none" else 1), _messages(w)
    r.remove_hooks()


# ---------------------------------------------------------------- 4. a learnable scale that moves later
class Scaled(Net):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc(self.body(x)) * self.scale


def test_learnable_logit_scale_rechecked_at_refreshes():
    torch.manual_seed(0)
    model = Scaled()
    r = AugmentationRefiner(model, None, _val(), schedule=Schedule(budget=None, refresh_every=2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r(model(torch.randn(8, D)), torch.randint(0, C, (8,)), num_original=4)   # scale 1: the check passes
        assert not [m for m in _messages(w) if NOT_OUTPUT in m]
        with torch.no_grad():
            model.scale.fill_(3.0)   # learned during training
        refreshed = []
        for _ in range(5):
            r(model(torch.randn(8, D)), torch.randint(0, C, (8,)), num_original=4)
            refreshed.append(r.stats["refreshed"])
    assert any(refreshed)
    assert len([m for m in _messages(w) if NOT_OUTPUT in m]) == 1, _messages(w)
    r.remove_hooks()


# ---------------------------------------------------------------- 5. full mode's closed-form calls
def test_full_mode_budget_with_temperature_stops_closed_form_calls():
    torch.manual_seed(0)
    model = Tempered("out_of_place")
    r = _refiner(model, mode="full", schedule=Schedule(budget=None, model_scores_every=2))   # alternates
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    passes = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for s in range(6):
            x, y = torch.randn(8, D), torch.randint(0, C, (8,))
            loss = r(model(x), y, num_original=4)
            passes.append(r.stats["score_pass"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert "closed_form" not in passes, passes
    assert len([m for m in _messages(w) if "every call now scores with the model" in m]) == 1, _messages(w)
    r.remove_hooks()
