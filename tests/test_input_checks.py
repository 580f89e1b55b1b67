"""Input checks of the influence threshold, the functional validation gradient, ISDA's schedule and
feature hook, TabularCutMix and TabularMLP: a typed error names the problem, and the rejected call
changes nothing."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import augplug
import augplug.functional as AF
from augplug.errors import ConfigurationError, ShapeError, TargetError
from augplug.isda import ISDALoss
from augplug.methods.influence import InfluencePolicy
from augplug.tabular import TabularCutMix, TabularMLP, tabular_cutmix


def _mlp(seed=0, d=6, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.ReLU(), nn.Linear(5, c))


def _hooks(model):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]


# ------------------------------------------------------------------------------- influence threshold
@pytest.mark.parametrize("threshold", ["x", float("nan"), True, [0.0]])
def test_influence_threshold_is_checked_at_construction(threshold):
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    val = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    hooks = _hooks(m)
    with pytest.raises(ConfigurationError, match="threshold must be a number or None") as e:
        augplug.AugmentationRefiner(m, opt, val, method="influence", method_options={"threshold": threshold})
    assert "threshold=0.0" in e.value.fix
    assert _hooks(m) == hooks and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(ConfigurationError, match="threshold"):
        InfluencePolicy(threshold=threshold)


def test_influence_threshold_numbers_and_none_are_accepted():
    assert InfluencePolicy().threshold is None
    assert InfluencePolicy(threshold=0).threshold == 0.0 and isinstance(InfluencePolicy(threshold=0).threshold, float)
    assert InfluencePolicy(threshold=-math.inf).threshold == -math.inf


# ------------------------------------------------------------------------ functional validation_gradient
def _vg_setup():
    m = _mlp(d=4)
    return m, dict(m.named_parameters())


def _model_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, [p.grad for p in m.parameters()], _hooks(m)


@pytest.mark.parametrize("case", ["indices_b_eq_c", "indices_b_ne_c", "indices_head", "wrong_rows", "wrong_rows_head",
                                  "wrong_width", "not_probabilities"])
def test_validation_gradient_checks_targets(case):
    m, params = _vg_setup()
    x3, x6 = torch.randn(3, 4), torch.randn(6, 4)
    head = dict(head=m[2], head_name="2")
    calls = {
        "indices_b_eq_c": (TargetError, lambda: AF.validation_gradient(m, x3, torch.tensor([2, 0, 1]), params=params)),
        "indices_b_ne_c": (TargetError, lambda: AF.validation_gradient(m, x6, torch.tensor([0, 1, 2, 0, 1, 2]),
                                                                       params=params)),
        "indices_head": (TargetError, lambda: AF.validation_gradient(m, x6, torch.tensor([0, 1, 2, 0, 1, 2]), **head)),
        "wrong_rows": (ShapeError, lambda: AF.validation_gradient(m, x6, torch.full((5, 3), 1 / 3), params=params)),
        "wrong_rows_head": (ShapeError, lambda: AF.validation_gradient(m, x6, torch.full((5, 3), 1 / 3), **head)),
        "wrong_width": (ShapeError, lambda: AF.validation_gradient(m, x6, torch.full((6, 4), 1 / 4), params=params)),
        "not_probabilities": (TargetError, lambda: AF.validation_gradient(m, x6, torch.full((6, 3), 5.0),
                                                                          params=params)),
    }
    err, call = calls[case]
    before = _model_state(m)
    with pytest.raises(err) as e:
        call()
    assert "validation_gradient's targets" in e.value.problem
    if err is TargetError and case != "not_probabilities":
        assert "to_soft_targets" in e.value.fix
    after = _model_state(m)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]


def test_validation_gradient_names_missing_params_or_head():
    m, params = _vg_setup()
    y = F.one_hot(torch.tensor([2, 0, 1]), 3).float()
    with pytest.raises(ConfigurationError, match="params=") as e:
        AF.validation_gradient(m, torch.randn(3, 4), y)
    assert "head=" in e.value.problem and "named_parameters" in e.value.fix
    with pytest.raises(ConfigurationError, match="head_name="):
        AF.validation_gradient(m, torch.randn(3, 4), y, head=m[2])
    # a correct call is the core's result
    from augplug.scores import validation_gradient
    x = torch.randn(3, 4)
    got, ref = AF.validation_gradient(m, x, y, params=params), validation_gradient(m, x, y, params=params)
    assert all(torch.equal(got.sums[k], ref.sums[k]) for k in ref.sums) and _hooks(m) == _hooks(_mlp(d=4))


# ------------------------------------------------------------------------------------ ISDA
def test_isda_manual_schedule_on_a_total_steps_loss_is_refused():
    m = _mlp()
    crit = ISDALoss.for_model(m, lambda0=0.5, total_steps=10)
    crit(m(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
    before = {k: v.clone() for k, v in crit.state_dict().items() if torch.is_tensor(v)}
    lam = crit.lam
    for call in (lambda: crit.set_epoch(5, 10), lambda: crit.set_progress(1.0)):
        with pytest.raises(ConfigurationError, match="total_steps=10") as e:
            call()
        assert "total_steps=None" in e.value.fix
    assert crit.lam == lam
    assert all(torch.equal(before[k], v) for k, v in crit.state_dict().items() if torch.is_tensor(v))
    manual = ISDALoss.for_model(_mlp(), lambda0=0.5)  # without total_steps the setters work
    manual.set_epoch(5, 10)
    assert manual.lam == 0.25


def test_isda_for_model_in_eval_mode_names_train_mode():
    m = _mlp()
    crit = ISDALoss.for_model(m)
    m.eval()
    before = {k: v.clone() for k, v in crit.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ShapeError, match="eval mode") as e:
        crit(m(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
    assert "model.train()" in e.value.fix and "torch.no_grad()" in e.value.fix
    assert all(torch.equal(before[k], v) for k, v in crit.state_dict().items() if torch.is_tensor(v))
    m.train()  # the same call in train mode works
    crit(m(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
    assert int(crit.steps) == 1


# ------------------------------------------------------------------------------------ TabularCutMix
@pytest.mark.parametrize("bad", [3, -1])
def test_tabular_cutmix_mix_label_out_of_range(bad):
    x = torch.randn(8, 5)
    y = torch.tensor([0, 1, 2, bad, 0, 1, 2, 0])
    cm = TabularCutMix(p=1.0, label="mix", num_classes=3, seed=0)
    state = cm.generator.get_state()
    with pytest.raises(TargetError, match="num_classes=3"):
        cm(x, y)
    assert torch.equal(cm.generator.get_state(), state)
    g = torch.Generator().manual_seed(1)  # the functional form checks before drawing from its generator
    gs = g.get_state()
    with pytest.raises(TargetError, match="num_classes=3"):
        tabular_cutmix(x, y, p=1.0, label="mix", num_classes=3, generator=g)
    assert torch.equal(g.get_state(), gs)
    x2, y2 = cm(x, y.clamp(0, 2))  # a good batch after the rejected one
    assert y2.shape == (8, 3) and torch.allclose(y2.sum(1), torch.ones(8))


@pytest.mark.parametrize("groups", [[1, 2], ["ab"], [[1.5, 2]], 3])
def test_tabular_cutmix_malformed_groups_rejected_at_construction(groups):
    with pytest.raises(ConfigurationError, match="groups must be a list of lists") as e:
        TabularCutMix(groups=groups)
    assert "groups=[[1, 2]]" in e.value.fix
    with pytest.raises(ConfigurationError, match="groups"):
        tabular_cutmix(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), groups=groups)
    assert TabularCutMix(groups=[[1, 2]]).groups == [[1, 2]]


# ------------------------------------------------------------------------------------ TabularMLP
def test_tabular_mlp_code_outside_cardinality_names_column():
    torch.manual_seed(0)
    m = TabularMLP(5, 3, cat_columns=[3], cat_cardinalities=[4]).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 5)
    x[:, 3] = torch.tensor([1., 7.])
    with pytest.raises(TargetError, match=r"column 3 of x .*cardinality 4.* code 7") as e:
        m(x)
    assert "0..3" in e.value.fix
    m2 = TabularMLP(3, 3, cat_cardinalities=[4, 2]).eval()
    with pytest.raises(TargetError, match=r"x_cat column 1 .*cardinality 2.* code -1"):
        m2(torch.randn(2, 3), torch.tensor([[1, 0], [2, -1]]))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_tabular_mlp_float_codes_treated_alike_in_both_forms():
    torch.manual_seed(0)
    two = TabularMLP(3, 3, cat_cardinalities=[4]).eval()
    one = TabularMLP(4, 3, cat_cardinalities=[4], cat_columns=[3]).eval()
    one.load_state_dict(two.state_dict())
    xn = torch.randn(1, 3)
    for code in (1.9, 1.5, float("nan")):
        with pytest.raises(TargetError, match="x_cat column 0 .*non-integer"):
            two(xn, torch.tensor([[code]]))
        with pytest.raises(TargetError, match="column 3 of x .*non-integer"):
            one(torch.cat([xn, torch.tensor([[code]])], 1))
    # integer-valued floats are codes in both forms, the same as integer codes
    ref = two(xn, torch.tensor([[2]]))
    assert torch.equal(two(xn, torch.tensor([[2.0]])), ref)
    assert torch.equal(one(torch.cat([xn, torch.tensor([[2.0]])], 1)), ref)
