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


# ---------------------------------------------------------------- 6. which layer is the classifier
class MainAndAux(nn.Module):
    """A main head ``head`` and an auxiliary (deep-supervision) ``fc`` used in training only."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU())
        self.head, self.fc = nn.Linear(8, C), nn.Linear(8, C)

    def forward(self, x):
        h = self.body(x)
        return (self.head(h), self.fc(h)) if self.training else self.head(h)


def test_two_linear_heads_by_name_are_refused_and_classifier_picks_one():
    """Before, ``fc`` was taken and the validation pass failed with an IndexError blaming the loader."""
    model = MainAndAux()
    with pytest.raises(UnsupportedHeadError, match=r"2 linear layers named as a classifier head \('fc', 'head'\)"):
        _refiner(model)
    r = _refiner(model, classifier="head")
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    r(model(x)[0], y, num_original=4)
    r.remove_hooks()


class Wrapper(nn.Module):
    """A wrapper that classifies with a layer of its own, past the backbone's unused head."""

    def __init__(self):
        super().__init__()
        self.backbone = Net()
        self.out = nn.Linear(8, C)

    def forward(self, x):
        return self.out(self.backbone.body(x))


def test_a_wrappers_own_linear_beside_a_backbone_head_is_refused():
    with pytest.raises(UnsupportedHeadError, match=r"linear layers of its own \(out\) beside .*backbone\.fc") as e:
        _refiner(Wrapper())
    assert "classifier='out'" in e.value.fix


def test_sequential_heads_name_their_conv_or_last_linear():
    class Squeeze(nn.Module):   # a squeezenet-like 1x1 conv classifier inside a Sequential
        def __init__(self):
            super().__init__()
            self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(3, C, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

        def forward(self, x):
            return self.classifier(x).flatten(1)

    with pytest.raises(UnsupportedHeadError, match=r"'classifier\.1' is a Conv2d") as e:
        AugmentationRefiner(Squeeze(), None, [(torch.randn(4, 3, 5, 5), torch.randint(0, C, (4,)))])
    assert "mode='full'" in e.value.fix

    class Scaled(nn.Module):   # a Linear with a module after it
        def __init__(self):
            super().__init__()
            self.classifier = nn.Sequential(nn.Linear(D, C), nn.Tanh())

        def forward(self, x):
            return self.classifier(x)

    with pytest.raises(UnsupportedHeadError, match=r"modules after its last nn.Linear 'classifier\.0'") as e:
        AugmentationRefiner(Scaled(), None, _val())
    assert "classifier='classifier.0'" in e.value.fix


def test_distilled_heads_fix_names_full_mode_first():
    import timm
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=C, img_size=16, patch_size=8,
                              depth=1)
    with pytest.raises(UnsupportedHeadError, match="combines") as e:
        AugmentationRefiner(model, None, [(torch.randn(2, 3, 16, 16), torch.randint(0, C, (2,)))])
    assert e.value.fix.startswith("use mode='full'") and "set_distilled_training" in e.value.fix


class Cosine(nn.Module):
    """A projection ``fc`` (to 5 values) and then a cosine classifier over C classes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU())
        self.fc = nn.Linear(8, 5)
        self.weight = nn.Parameter(torch.randn(C, 5))

    def forward(self, x):
        return 8.0 * F.normalize(self.fc(self.body(x)), dim=-1) @ F.normalize(self.weight, dim=-1).t()


def test_default_budget_drops_a_found_head_that_does_not_give_the_logits():
    """Full mode with the default budget found ``fc`` on its own and then refused every call (the
    logits have C classes, fc 5 outputs); it now scores every call with the model. A head the user
    named, or an explicit alternation, still gets the error."""
    torch.manual_seed(0)
    model = Cosine()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), mode="full")
    for _ in range(3):
        r(model(torch.randn(8, D)), torch.randint(0, C, (8,)), num_original=4)
        assert r.stats["score_pass"] != "closed_form"
    r.remove_hooks()
    from augplug.errors import ShapeError
    r = _refiner(model, mode="full", schedule=Schedule(budget=None, model_scores_every=2))
    with pytest.raises(ShapeError, match="has 5 outputs"):
        r(model(torch.randn(8, D)), torch.randint(0, C, (8,)), num_original=4)
    r.remove_hooks()


def test_an_auxiliary_head_added_to_the_logits_is_refused():
    """timm's VOLO adds 0.5 * max over tokens of ``aux_head`` to ``head``'s output: last-layer scores of
    ``head`` alone were wrong (a warning only); full mode scores it."""
    from timm.models.volo import VOLO
    kw = dict(layers=(1, 1, 1, 1), num_classes=C, img_size=32, embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 1),
              stem_hidden_dim=8)
    model = VOLO(**kw)
    val = [(torch.randn(2, 3, 32, 32), torch.randint(0, C, (2,)))]
    with pytest.raises(UnsupportedHeadError, match=r"auxiliary head \('aux_head'") as e:
        AugmentationRefiner(model, None, val)
    assert "mode='full'" in e.value.fix and "use_aux_head=False" in e.value.fix
    plain = VOLO(use_aux_head=False, **kw)
    AugmentationRefiner(plain, None, val).remove_hooks()


class TwoTasks(nn.Module):
    """Two heads of C classes; ``forward`` returns a dict (no ``logits`` key) or a tuple, head_a first."""

    def __init__(self, as_dict):
        super().__init__()
        self.as_dict = as_dict
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU())
        self.head_a, self.head_b = nn.Linear(8, C), nn.Linear(8, C)

    def forward(self, x):
        h = self.body(x)
        a, b = self.head_a(h), self.head_b(h)
        return {"task_a": a, "task_b": b} if self.as_dict else (a, b)


@pytest.mark.parametrize("as_dict", [True, False])
@pytest.mark.parametrize("schedule", [Schedule(budget=None, fresh_batches=None), Schedule(budget=None)],
                         ids=["exact", "window"])
def test_a_named_head_of_a_multi_output_model_is_scored_through_its_own_output(as_dict, schedule):
    """The exact schedule took the model's first output as the validation logits: a dict without
    ``logits`` was a ShapeError whose fix was the mode in use, and a head that is not the first output
    got the other head's gradient (silently). The direction is now head_b's own cross-entropy
    gradient on the validation set, as the window already rebuilt it."""
    torch.manual_seed(0)
    model = TwoTasks(as_dict)
    val = _val()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), val, classifier="head_b",
                            schedule=schedule)
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    out = model(x)
    r(out["task_b"] if as_dict else out[1], y, num_original=4)
    model.eval()
    loss = sum(F.cross_entropy(model.head_b(model.body(xv)), yv, reduction="sum") for xv, yv in val)
    gw, gb = torch.autograd.grad(loss, [model.head_b.weight, model.head_b.bias])
    n = sum(len(yv) for _, yv in val)
    v = r.validation_direction
    torch.testing.assert_close(v["head_b.weight"], -gw / n, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(v["head_b.bias"], -gb / n, rtol=1e-4, atol=1e-6)
    r.remove_hooks()
