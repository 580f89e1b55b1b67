"""Input checks of the influence method: every numeric option of ``InfluencePolicy`` and
``InfluenceScorer`` checked at construction, policy states checked against the model the policy
scores, and the scorer's parameter dicts (``direction=`` / ``grad=``) checked with a typed error that
names ``head_name=``."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug.errors import ConfigurationError, ShapeError
from augplug.influence import InfluenceScorer
from augplug.methods.base import Scoring
from augplug.methods.influence import InfluencePolicy, influence_weights
from fault_harness import same as _same

NAN, INF = float("nan"), float("inf")


def _val(d=6, c=3, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)),
                      batch_size=n)


def _batch(d=6, c=3, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    return torch.cat([x, x + 0.1]), torch.cat([y, y])


# ----------------------------------------------------------------------------- options (finding 1)
BAD_POLICY_OPTIONS = [
    ("damping", "0.01"), ("damping", NAN), ("damping", INF), ("damping", True), ("damping", -1e-2),
    ("cg_iters", True), ("cg_iters", 2.5), ("cg_iters", "100"), ("cg_iters", 0),
    ("cg_tol", NAN), ("cg_tol", INF), ("cg_tol", -1e-8), ("cg_tol", "1e-8"),
    ("lissa_depth", True), ("lissa_depth", 10.0), ("lissa_depth", 0),
    ("lissa_scale", NAN), ("lissa_scale", INF), ("lissa_scale", 0.0), ("lissa_scale", -2.0), ("lissa_scale", "2"),
    ("lissa_scale", True),
    ("temperature", "1"), ("temperature", NAN), ("temperature", INF), ("temperature", True), ("temperature", -1.0),
    ("buffer_size", True), ("buffer_size", 2.0), ("buffer_size", "2048"), ("buffer_size", 0),
    ("buffer_batches", True), ("buffer_batches", 2.0), ("buffer_batches", 0),
]


@pytest.mark.parametrize("name,value", BAD_POLICY_OPTIONS)
def test_policy_numeric_options_are_checked_at_construction(name, value):
    with pytest.raises(ConfigurationError) as e:
        InfluencePolicy(**{name: value})
    assert name in e.value.problem and repr(value) in e.value.problem
    assert f"{name}=" in e.value.fix


@pytest.mark.parametrize("options", [dict(solver="lissa", lissa_scale=NAN), dict(cg_iters=True),
                                     dict(buffer_size=True), dict(damping="0.01"), dict(temperature="1"),
                                     dict(solver="lissa", lissa_scale=-1.0)])
def test_refiner_refuses_bad_influence_options_before_anything_runs(options):
    """The audit's cases: NaN lissa_scale used to give NaN weights and a NaN step, bools ran 1 CG
    iteration / kept a 1-row buffer, text raised a raw TypeError, lissa_scale <= 0 waited for a refresh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = [len(m._forward_hooks) for m in model.modules()]
    with pytest.raises(ConfigurationError) as e:
        augplug.AugmentationRefiner(model, opt, _val(), method="influence", method_options=options)
    name = [k for k in options if k != "solver"][0]
    assert name in e.value.problem
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


BAD_SCORER_OPTIONS = BAD_POLICY_OPTIONS[:22] + [
    ("lissa_batch", True), ("lissa_batch", 0), ("lissa_batch", 8.0), ("seed", 1.5), ("seed", True), ("seed", "0"),
    ("seed", 2 ** 64),
]


@pytest.mark.parametrize("name,value", BAD_SCORER_OPTIONS)
def test_scorer_numeric_options_are_checked_at_construction(name, value):
    with pytest.raises(ConfigurationError) as e:
        InfluenceScorer(nn.Linear(3, 2), **{name: value})
    assert name in e.value.problem and repr(value) in e.value.problem and f"{name}=" in e.value.fix


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    p = InfluencePolicy(damping=np.float32(0.5), cg_iters=np.int64(7), cg_tol=np.float64(1e-9), lissa_depth=np.int32(9),
                        lissa_scale=np.float64(3.0), temperature=np.float32(2.0), buffer_size=np.int64(16),
                        buffer_batches=np.int16(3))
    o = p.solver_options
    assert (o["damping"], o["cg_iters"], o["lissa_depth"], o["lissa_scale"]) == (0.5, 7, 9, 3.0)
    assert type(o["cg_iters"]) is int and type(o["lissa_scale"]) is float
    assert (p.buffer_size, p.buffer_batches, p.temperature) == (16, 3, 2.0) and type(p.buffer_size) is int
    sc = InfluenceScorer(nn.Linear(3, 2), lissa_scale=np.float32(2.0), lissa_batch=np.int64(4), seed=np.int64(3))
    assert (sc.lissa_scale, sc.lissa_batch, sc.seed) == (2.0, 4, 3) and type(sc.lissa_batch) is int
    assert InfluenceScorer(nn.Linear(3, 2), cg_tol=0).cg_tol == 0.0   # 0: run the whole CG budget


@pytest.mark.parametrize("temperature", ["1", NAN, INF, True, 0])
def test_influence_weights_checks_its_temperature(temperature):
    with pytest.raises(ConfigurationError, match="temperature") as e:
        influence_weights(torch.zeros(3), temperature=temperature)
    assert "temperature=1.0" in e.value.fix


# ----------------------------------------------------------------------------- states (finding 2)
def _refiner(hidden, c=3, warmup=10, mode="last_layer"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, c))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = augplug.AugmentationRefiner(model, opt, _val(c=c), method="influence", mode=mode,
                                    schedule=dict(budget=None, warmup_steps=warmup))
    return model, r


def _scoring(model, mode="last_layer"):
    return Scoring(net=model, mode=mode, bn_mode="eval", head=model[2], head_name="2", capture=None,
                   params=lambda: {n: p for n, p in model.named_parameters() if p.requires_grad})


def test_state_of_another_feature_width_is_refused_at_load():
    """The audit's case, on a refiner that has run: a warm-up state of a 5-wide head (buffer, no u)
    into a 7-wide one is refused by load_state_dict, and the refiner is as it was."""
    m5, r5 = _refiner(5)
    x, y = _batch()
    r5(m5(x), y, num_original=4)
    state = copy.deepcopy(r5.state_dict())
    assert state["policy"]["buffer"].shape[1] == 5 and state["policy"]["u"] is None
    m7, r7 = _refiner(7)
    r7(m7(x), y, num_original=4)
    before = copy.deepcopy(r7.state_dict())
    with pytest.raises(ShapeError) as e:
        r7.load_state_dict(state)
    assert "5" in e.value.problem and "7" in e.value.problem
    _same(before, r7.state_dict())
    r7(m7(x), y, num_original=4)   # still works
    assert r7.policy.state_dict()["buffer"].shape == (16, 7)


def test_state_of_another_feature_width_on_a_fresh_refiner_is_refused_at_load():
    """A refiner that has not run tells its policy what it scores before loading, so a state of another
    head is refused by load_state_dict itself (typed, nothing changed); a state refused only at the first
    call would already have replaced the refiner's own."""
    m5, r5 = _refiner(5)
    x, y = _batch()
    r5(m5(x), y, num_original=4)
    state = copy.deepcopy(r5.state_dict())
    m7, r7 = _refiner(7)
    before = copy.deepcopy(r7.state_dict())
    with pytest.raises(ShapeError) as e:
        r7.load_state_dict(state)
    assert "5 features" in e.value.problem and "takes 7" in e.value.problem
    _same(before, r7.state_dict())
    r7(m7(x), y, num_original=4)   # runs on with its own state
    assert r7.policy.state_dict()["buffer"].shape[1] == 7
    # the policy on its own, never told what it scores, checks the state at its first call instead
    m7b, r7b = _refiner(7)
    r7b.policy.load_state_dict(state["policy"])
    loaded = copy.deepcopy(r7b.state_dict())
    with pytest.raises(ShapeError, match="5 features"):
        r7b(m7b(x), y, num_original=4)
    _same(loaded, r7b.state_dict())
    # a state of the same model loads into a fresh refiner and runs on
    m2, r2 = _refiner(5)
    r2.load_state_dict(state)
    r2(m2(x), y, num_original=4)
    assert r2.policy.state_dict()["buffer"].shape == (16, 5)


def test_policy_checks_u_keys_and_shapes_against_the_head():
    m5, r5 = _refiner(5, warmup=0)
    x, y = _batch()
    r5(m5(x), y, num_original=4)
    state = copy.deepcopy(r5.policy.state_dict())
    assert set(state["u"]) == {"2.weight", "2.bias"}
    m7 = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    p = InfluencePolicy()
    p.check_state(state)                      # what it scores is not known yet: nothing to check against
    p.set_scoring(_scoring(m7))
    no_buffer = {**state, "buffer": None}
    with pytest.raises(ShapeError, match="'2.weight' has shape"):
        p.check_state(no_buffer)
    with pytest.raises(ShapeError, match="feature buffer of 5"):
        p.check_state(state)
    renamed = {**no_buffer, "u": {"fc." + k[2:]: t for k, t in state["u"].items()}}
    p.set_scoring(_scoring(m5))
    p.check_state(no_buffer)
    with pytest.raises(ConfigurationError, match="direction u over"):
        p.check_state(renamed)
    with pytest.raises(ShapeError):
        p.load_state_dict({**state, "buffer": torch.zeros(3, 7)})
    assert p.state_dict()["buffer"] is None and p.state_dict()["u"] is None   # the refused load changed nothing


def test_full_mode_state_of_another_number_of_classes_is_refused():
    m4, r4 = _refiner(5, c=4, mode="full")
    x, y = _batch(c=4)
    r4(m4(x), y, num_original=4)
    state = copy.deepcopy(r4.state_dict())
    assert state["policy"]["batches"][0][1].shape[1] == 4
    m3, r3 = _refiner(5, c=3, mode="full")
    x3, y3 = _batch(c=3)
    r3(m3(x3), y3, num_original=4)
    before = copy.deepcopy(r3.state_dict())
    with pytest.raises(ShapeError, match="3 classes"):
        r3.policy.check_state(state["policy"])
    with pytest.raises((ShapeError, ConfigurationError)):
        r3.load_state_dict(state)
    _same(before, r3.state_dict())


# ----------------------------------------------------------------------------- scorer dicts (finding 3)
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_scorer_without_head_name_names_head_name_for_a_refiner_direction():
    """The audit's case: InfluenceScorer(model.fc) given the refiner's validation_direction ('fc.weight',
    'fc.bias') raised a raw KeyError: 'weight'."""
    torch.manual_seed(0)
    model = _Net()
    ref = augplug.AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val())
    x, y = _batch()
    ref(model(x), y, num_original=4)
    direction = ref.validation_direction
    scorer = InfluenceScorer(model.fc, damping=1e-2).fit(model.body(x).detach())
    with pytest.raises(ConfigurationError) as e:
        scorer.set_validation(direction=direction)
    assert "head_name" in e.value.problem and "'fc.weight'" in e.value.problem and "'weight'" in e.value.problem
    assert "head_name='fc'" in e.value.fix
    with pytest.raises(ConfigurationError, match="grad="):
        scorer.set_validation(grad={k: -t for k, t in direction.items()})
    with pytest.raises(ConfigurationError):
        scorer.s_val                           # the refused calls computed nothing
    named = InfluenceScorer(model.fc, head_name="fc", damping=1e-2).fit(model.body(x).detach())
    s = named.set_validation(direction=direction)
    assert set(s) == {"fc.weight", "fc.bias"}


def test_scorer_dicts_other_mismatches():
    head = nn.Linear(5, 3)
    named = InfluenceScorer(head, head_name="fc").fit(torch.randn(8, 5))
    with pytest.raises(ConfigurationError) as e:
        named.set_validation(direction={"weight": torch.zeros(3, 5), "bias": torch.zeros(3)})
    assert "without head_name" in e.value.fix
    plain = InfluenceScorer(head).fit(torch.randn(8, 5))
    with pytest.raises(ConfigurationError, match="lacks"):
        plain.set_validation(grad={"other": torch.zeros(3, 5)})
    with pytest.raises(ConfigurationError, match="dict"):
        plain.set_validation(grad=torch.zeros(3, 5))
    with pytest.raises(ShapeError, match="'weight'"):
        plain.set_validation(grad={"weight": torch.zeros(3, 4), "bias": torch.zeros(3)})
