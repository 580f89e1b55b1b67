"""Argument checks of the functional API (augplug.functional): a wrong params=/head= of
validation_gradient, wrong last-layer arguments, a GradSum passed as the direction, and the values of
the targets and scores the stateless policies and losses take. Each mistake is a typed error naming
it, raised before anything is computed or changed; correct calls give the unchecked functions' numbers."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import augplug.functional as AF
from augplug import methods, targets as T
from augplug.errors import ConfigurationError, NonFiniteError, ShapeError, TargetError, UnsupportedHeadError
from augplug.scores import GradSum


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
        self.fc = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 3)   # a linear layer the forward never calls

    def forward(self, x):
        return self.fc(self.body(x))


def _setup():
    torch.manual_seed(0)
    net = Net()
    xv = torch.randn(12, 6)
    yv = F.one_hot(torch.arange(12) % 3, 3).float()
    return net, xv, yv


def _hook_count(m):
    return sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())


def _params(net):
    return {n: p for n, p in net.named_parameters() if n != "aux.weight" and n != "aux.bias"}


# ------------------------------------------------------------------ validation_gradient: params=
@pytest.mark.parametrize("case", ["copy", "detached", "frozen", "renamed", "unknown_name", "list"])
def test_validation_gradient_refuses_params_that_are_not_the_models(case):
    """Parameters of a copy (an EMA model) gave an all-zero gradient, a list a raw TypeError, a
    detached or frozen tensor a raw RuntimeError."""
    net, xv, yv = _setup()
    params = _params(net)
    if case == "frozen":
        net.fc.weight.requires_grad_(False)
    bad = {
        "copy": dict(copy.deepcopy(net).named_parameters()),
        "detached": {"fc.weight": net.fc.weight.detach()},
        "frozen": {"fc.weight": net.fc.weight, "fc.bias": net.fc.bias},
        "renamed": {"fc.weight": net.body[0].weight},
        "unknown_name": {"classifier.weight": nn.Parameter(torch.zeros(3, 5))},
        "list": list(net.parameters()),
    }[case]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigurationError, match="params") as e:
        AF.validation_gradient(net, xv, yv, params=bad)
    assert "named_parameters" in e.value.fix
    assert {"copy": "not a parameter of this model", "detached": "not a parameter of this model",
            "frozen": "frozen", "renamed": "is the model's parameter 'body.0.weight'",
            "unknown_name": "names no parameter", "list": "got list"}[case] in e.value.problem
    assert all(torch.equal(before[k], net.state_dict()[k]) for k in before) and _hook_count(net) == 0
    assert all(p.grad is None for p in net.parameters())
    if case == "frozen":
        net.fc.weight.requires_grad_(True)
    # the model's own parameters are accepted and give autograd's gradient
    gs = AF.validation_gradient(net, xv, yv, params=params)
    loss = -(yv * F.log_softmax(net(xv), -1)).sum()
    ref = torch.autograd.grad(loss, list(params.values()))
    assert all(torch.allclose(gs.sums[n], r, atol=1e-6) for n, r in zip(params, ref))


# ------------------------------------------------------------------ validation_gradient: head=
@pytest.mark.parametrize("case", ["inner_linear", "not_linear", "other_models", "wrong_name", "not_called"])
def test_validation_gradient_refuses_a_head_that_is_not_the_classifier(case):
    """head= must be this model's nn.Linear, named head_name, whose output is the logits: a hidden
    Linear gave a gradient for the wrong layer (shape (3, 6) for a (5, 6) weight), a Sequential an
    AttributeError, another model's head an IndexError."""
    net, xv, yv = _setup()
    head, name, err, text = {
        "inner_linear": (net.body[0], "body.0", ConfigurationError, "not the model's logits"),
        "not_linear": (net.body, "body", UnsupportedHeadError, "nn.Linear"),
        "other_models": (copy.deepcopy(net).fc, "fc", ConfigurationError, "not a submodule"),
        "wrong_name": (net.fc, "classifier", ConfigurationError, "is 'fc'"),
        "not_called": (net.aux, "aux", ConfigurationError, "not called"),
    }[case]
    with pytest.raises(err) as e:
        AF.validation_gradient(net, xv, yv, head=head, head_name=name)
    assert text in e.value.problem
    assert _hook_count(net) == 0 and _hook_count(head) == 0
    # the classifier itself: the closed form equals autograd's gradient
    gs = AF.validation_gradient(net, xv, yv, head=net.fc, head_name="fc")
    auto = AF.validation_gradient(net, xv, yv, params={"fc.weight": net.fc.weight, "fc.bias": net.fc.bias})
    assert set(gs.sums) == {"fc.weight", "fc.bias"}
    assert all(torch.allclose(gs.sums[k], auto.sums[k], atol=1e-5) for k in auto.sums)


class _Wrapped(nn.Module):
    """The head's output comes back as a new tensor (a reshape inside a dict), equal to it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return {"logits": self.fc(self.body(x)).reshape(x.shape[0], 3)}


class _Scaled(_Wrapped):
    """Logits that are not the head's output (a temperature): the closed form would be wrong."""

    def forward(self, x):
        return self.fc(self.body(x)) / 2


def test_validation_gradient_head_whose_output_is_the_logits_by_value():
    torch.manual_seed(0)
    xv, yv = torch.randn(8, 6), F.one_hot(torch.arange(8) % 3, 3).float()
    m = _Wrapped()
    gs = AF.validation_gradient(m, xv, yv, head=m.fc, head_name="fc")
    auto = AF.validation_gradient(m, xv, yv, params={"fc.weight": m.fc.weight, "fc.bias": m.fc.bias})
    assert all(torch.allclose(gs.sums[k], auto.sums[k], atol=1e-5) for k in auto.sums)
    s = _Scaled()
    with pytest.raises(ConfigurationError, match="not the model's logits"):
        AF.validation_gradient(s, xv, yv, head=s.fc, head_name="fc")


# ------------------------------------------------------------------ class_scores / last_layer_scores
def _direction_and_features():
    net, xv, yv = _setup()
    gs = AF.validation_gradient(net, xv, yv, params=_params(net))
    x = torch.randn(8, 6)
    return net, gs, x, net.body(x).detach(), net(x).detach()


def test_last_layer_scores_name_a_wrong_head_name_and_features():
    net, gs, x, feats, logits = _direction_and_features()
    v = gs.direction()
    with pytest.raises(ConfigurationError, match="'head.weight'") as e:
        AF.class_scores(net, v=v, mode="last_layer", features=feats, logits=logits, head_name="head")
    assert "head_name=" in e.value.fix
    for bad_feats in (x, feats[:4], feats[:, :, None, None][:, :4]):   # model inputs, too few rows, too narrow
        with pytest.raises(ShapeError, match="features"):
            AF.class_scores(net, v=v, mode="last_layer", features=bad_feats, logits=logits, head_name="fc")
    with pytest.raises(ShapeError, match="head weight"):    # the direction of a layer that is not the classifier
        AF.last_layer_scores(feats, logits, v["body.0.weight"], v["body.0.bias"])
    with pytest.raises(ShapeError, match="bias"):
        AF.last_layer_scores(feats, logits, v["fc.weight"], v["body.0.bias"])
    # correct arguments: the closed form equals forward mode through the model
    g = AF.class_scores(net, v={k: v[k] for k in ("fc.weight", "fc.bias")}, mode="last_layer", features=feats,
                        logits=logits, head_name="fc")
    ref = AF.class_scores(net, x, {k: v[k] for k in ("fc.weight", "fc.bias")}, mode="full")
    assert torch.allclose(g, ref, atol=1e-5)
    # conv features flatten per row, as before
    g4 = AF.last_layer_scores(feats[:, :, None], logits, v["fc.weight"], v["fc.bias"])
    assert torch.equal(g4, AF.last_layer_scores(feats, logits, v["fc.weight"], v["fc.bias"]))


@pytest.mark.parametrize("mode", ["full", "double_backward", "auto", "last_layer"])
def test_scores_take_the_gradsum_validation_gradient_returns(mode):
    """class_scores(v=GradSum) raised TypeError: 'GradSum' object is not iterable."""
    net, gs, x, feats, logits = _direction_and_features()
    kw = dict(mode=mode, features=feats, logits=logits, head_name="fc") if mode == "last_layer" else dict(mode=mode)
    inputs = None if mode == "last_layer" else x
    assert isinstance(gs, GradSum)
    assert torch.equal(AF.class_scores(net, inputs, gs, **kw), AF.class_scores(net, inputs, gs.direction(), **kw))
    fn = {"full": AF.full_scores, "double_backward": AF.double_backward_scores}.get(mode)
    if fn is not None:
        assert torch.equal(fn(net, x, gs), fn(net, x, gs.direction()))
    with pytest.raises(ConfigurationError, match="dict name -> tensor"):
        AF.class_scores(net, inputs, list(gs.direction().values()), **kw)


def test_unknown_parameter_names_in_v_are_a_configuration_error():
    """double_backward_scores raised KeyError where full_scores named the unknown parameter."""
    net, gs, x, _, _ = _direction_and_features()
    v = {**gs.direction(), "nope.weight": torch.zeros(3)}
    for fn in (AF.double_backward_scores, AF.full_scores):
        with pytest.raises(ConfigurationError, match="unknown parameters \\['nope.weight'\\]"):
            fn(net, x, v)


# ------------------------------------------------------------------ stateless policies and losses: values
_NOT_PROBS = {
    "logits": torch.tensor([[2.0, -1.0, 0.5]] * 4),
    "multi_hot": torch.tensor([[1.0, 1.0, 0.0]] * 4),
    "zeros": torch.zeros(4, 3),
}


def _calls(scores, y):
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    return {
        "l2rw_weights": lambda: AF.l2rw_weights(scores, y),
        "saflex_targets": lambda: AF.saflex_targets(scores, y),
        "soft_cross_entropy": lambda: AF.soft_cross_entropy(logits, y),
        "weighted_soft_ce": lambda: AF.weighted_soft_ce(logits, y, torch.ones(4)),
    }


@pytest.mark.parametrize("targets", list(_NOT_PROBS))
@pytest.mark.parametrize("fn", ["l2rw_weights", "saflex_targets", "soft_cross_entropy", "weighted_soft_ce"])
def test_functional_policies_and_losses_refuse_targets_that_are_not_probabilities(fn, targets):
    """They returned numbers (l2rw weights [4, 0, 0, 0], soft targets summing to 2) for logits,
    multi-hot rows and zero rows, which validation_gradient refuses with a TargetError."""
    scores = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TargetError, match="must be probabilities") as e:
        _calls(scores, _NOT_PROBS[targets])[fn]()
    assert fn in e.value.problem and "to_soft_targets" in e.value.fix
    with pytest.raises(NonFiniteError, match="NaN"):
        _calls(scores, torch.full((4, 3), float("nan")))[fn]()


@pytest.mark.parametrize("fn", ["l2rw_weights", "saflex_targets"])
def test_functional_policies_refuse_non_finite_scores(fn):
    """l2rw_weights(NaN scores) returned NaN weights."""
    y = torch.eye(3)[[0, 1, 2, 0]]
    scores = torch.randn(4, 3)
    scores[2, 1] = float("nan")
    scores[3, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="rows \\[2, 3\\]") as e:
        _calls(scores, y)[fn]()
    assert fn in e.value.problem


def test_checked_functional_forms_refuse_bad_values_and_give_the_unchecked_numbers():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 4, generator=g)
    y = torch.softmax(torch.randn(6, 4, generator=g), -1).double()   # probabilities in fp64: accepted
    logits = torch.randn(6, 4, generator=g)
    with pytest.raises(NonFiniteError):
        AF.l2rw_weights(torch.full((6, 4), float("nan")), y)
    with pytest.raises(TargetError):
        AF.weighted_soft_ce(logits, y * 2)
    assert torch.equal(AF.l2rw_weights(scores, y), methods.l2rw.l2rw_weights(scores, y))
    for a, b in zip(AF.saflex_targets(scores, y, 1.0, weighting="hard"),
                    methods.saflex.saflex_targets(scores, y, 1.0, weighting="hard")):
        assert torch.equal(a, b)
    assert torch.equal(AF.soft_cross_entropy(logits, y), T.soft_cross_entropy(logits, y))
    w = torch.rand(6, generator=g)
    assert torch.equal(AF.weighted_soft_ce(logits, y, w, "sum"), T.weighted_soft_ce(logits, y, w, "sum"))
    # NaN logits are not refused by the losses: a NaN loss is how AMP notices an overflow
    assert torch.isnan(AF.soft_cross_entropy(torch.full((6, 4), float("nan")), y)).all()
    # the checked forms keep the signatures (and defaults) of the functions they check
    for name, ref in (("l2rw_weights", methods.l2rw.l2rw_weights), ("saflex_targets", methods.saflex.saflex_targets),
                      ("soft_cross_entropy", T.soft_cross_entropy), ("weighted_soft_ce", T.weighted_soft_ce)):
        assert inspect.signature(getattr(AF, name)) == inspect.signature(ref)


def test_an_unknown_reduction_is_a_configuration_error_naming_the_choices():
    logits, y = torch.randn(3, 4), torch.full((3, 4), 0.25)
    for fn in (AF.weighted_soft_ce, T.weighted_soft_ce):
        with pytest.raises(ConfigurationError, match="'mean', 'sum' or 'none', got 'avg'"):
            fn(logits, y, None, "avg")
    torch.testing.assert_close(AF.weighted_soft_ce(logits, y, None, "mean"), AF.weighted_soft_ce(logits, y) * 1)
