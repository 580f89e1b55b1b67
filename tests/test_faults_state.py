"""Fault suite, resumable state: a bad ``load_state_dict`` raises a typed error and changes nothing
(the next good steps equal a twin's); random truncations and corruptions are tried with hypothesis."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from augplug.errors import AugplugError, ConfigurationError, NonFiniteError, ShapeError
from augplug.isda import ISDALoss
from augplug.tabular import TabularCutMix

from fault_harness import C, KINDS, assert_rejected, make_rig, same

NAN = float("nan")
STATE_KINDS = list(KINDS)


def _saved(kind, steps=3, **options):
    """A state saved by a rig of ``kind`` after ``steps`` good steps."""
    rig = make_rig(kind, **options)
    for i in range(steps):
        rig.step(100 + i)
    return copy.deepcopy(rig.refiner.state_dict())


def _load(state):
    return lambda rig: (lambda: rig.refiner.load_state_dict(state))


def _first_tensor(d):
    return next(iter(d.values()))


STATE_FAULTS = {
    # name: (change(state) -> state, error)
    "not-a-dict": (lambda s: [s], ConfigurationError),
    "wrong-version": (lambda s: {**s, "version": 99}, ConfigurationError),
    "version-as-text": (lambda s: {**s, "version": str(s["version"])}, ConfigurationError),
    "direction-after-the-last-update": (lambda s: {**s, "v_step": s["step_count"] + 50}, ConfigurationError),
    "a-model-state-dict": (lambda s: {"fc.weight": torch.zeros(2, 2)}, ConfigurationError),
    "wrong-method": (lambda s: {**s, "method": "other"}, ConfigurationError),
    "nan-direction": (lambda s: {**s, "v": {k: torch.full_like(t, NAN) for k, t in s["v"].items()}}, NonFiniteError),
    "inf-direction": (lambda s: {**s, "v": {k: t.clone().fill_(float("inf")) for k, t in s["v"].items()}},
                      NonFiniteError),
    "direction-other-class-count": (lambda s: {**s, "v": {k: t[:-1] for k, t in s["v"].items()}}, ShapeError),
    "direction-missing-key": (lambda s: {**s, "v": dict(list(s["v"].items())[1:])}, ConfigurationError),
    "direction-extra-key": (lambda s: {**s, "v": {**s["v"], "extra.weight": torch.zeros(2)}}, ConfigurationError),
    "direction-not-a-dict": (lambda s: {**s, "v": _first_tensor(s["v"])}, ConfigurationError),
    "nan-val-loss": (lambda s: {**s, "val_loss": NAN}, NonFiniteError),
    "text-val-loss": (lambda s: {**s, "val_loss": "1.3"}, ConfigurationError),
    "negative-step-count": (lambda s: {**s, "step_count": -3}, ConfigurationError),
    "string-calls": (lambda s: {**s, "calls": "7"}, ConfigurationError),
    "float-v-step": (lambda s: {**s, "v_step": 1.5}, ConfigurationError),
    "bad-rng-state": (lambda s: {**s, "rng_state": torch.zeros(3)}, ConfigurationError),
    "negative-skipped": (lambda s: {**s, "skipped_val_batches": -1}, ConfigurationError),
    "stream-not-a-dict": (lambda s: {**s, "stream": 5}, ConfigurationError),
    "stream-truncated": (lambda s: {**s, "stream": {}}, ConfigurationError),
    "stream-other-cache-setting": (lambda s: {**s, "stream": {**s["stream"], "cached": not s["stream"].get("cached")}},
                                   ConfigurationError),
    "stream-position-past-the-pass": (lambda s: {**s, "stream": {**s["stream"], "consumed": 50}}
                                      if "consumed" in s["stream"] else {**s, "stream": {**s["stream"], "pos": -1}},
                                      ConfigurationError),
}
_CORE_KEYS = ("version", "method", "step_count", "calls", "v", "v_step", "val_loss", "rng_state", "stream")


@pytest.mark.parametrize("fault", sorted(STATE_FAULTS))
@pytest.mark.parametrize("kind", ["saflex", "saflex-full", "contrastive"])
def test_bad_state(kind, fault):
    change, error = STATE_FAULTS[fault]
    state = _saved(kind)
    if fault == "stream-position-past-the-pass" and kind != "saflex":
        pytest.skip("one kind suffices")
    assert_rejected(kind, _load(change(state)), error)


@pytest.mark.parametrize("key", _CORE_KEYS + ("policy", "isda", "share"))
@pytest.mark.parametrize("kind", ["autodo", "isda", "share", "influence", "contrastive"])
def test_truncated_state(kind, key):
    state = _saved(kind)
    if key not in state or (state[key] is None and key in ("policy", "isda", "share")):
        pytest.skip(f"{kind} keeps no {key!r}")
    state.pop(key)
    assert_rejected(kind, _load(state), ConfigurationError)


def test_state_with_more_classes_is_refused_before_anything_changes():
    """A 5-class state into a 4-class refiner: a ShapeError, the counters untouched."""
    import fault_harness as fh
    saved_c = fh.C
    try:
        fh.C = 5
        big = make_rig("saflex")
        big.step(0), big.step(1), big.step(2)
        state = copy.deepcopy(big.refiner.state_dict())
    finally:
        fh.C = saved_c
    e = assert_rejected("saflex", _load(state), ShapeError)
    assert "classes" in e.problem


@pytest.mark.parametrize("kind", ["share", "contrastive"])
def test_share_setting_mismatch_is_refused_both_ways(kind):
    adaptive = _saved(kind, aug_weight="adaptive")
    fixed = _saved(kind, aug_weight=1.0)
    assert_rejected(kind, _load(fixed), ConfigurationError, aug_weight="adaptive")
    assert_rejected(kind, _load(adaptive), ConfigurationError, aug_weight=1.0)


@pytest.mark.parametrize("field", ["log_share", "mean_square", "test_mean"])
def test_non_finite_share_state(field):
    state = _saved("share")
    state["share"] = {**state["share"], field: NAN}
    assert_rejected("share", _load(state), NonFiniteError)


@pytest.mark.parametrize("field,value", [("log_share", 3.0), ("log_share", -1e6), ("log_share", True),
                                         ("updates", 2.5), ("updates", -1), ("updates", True)])
def test_share_state_out_of_bounds_or_not_a_count(field, value):
    """A share above max_share (it would weigh the views 20 times the originals), below min_share, a
    bool for a number, or a count that is not a whole number >= 0: refused, nothing changed."""
    state = _saved("share")
    state["share"] = {**state["share"], field: value}
    assert_rejected("share", _load(state), ConfigurationError)


AUTODO_FAULTS = {
    "other-num-points": (lambda p: {**p, "config": {**p["config"], "num_points": 5}}, ConfigurationError),
    "nan-weight-table": (lambda p: {**p, "tables": {**p["tables"], "weight_logits":
                                                    torch.full_like(p["tables"]["weight_logits"], NAN)}},
                         NonFiniteError),
    "mis-shaped-table": (lambda p: {**p, "tables": {**p["tables"], "label_logits": p["tables"]["label_logits"][:, :2]}},
                         ConfigurationError),
    "no-tables": (lambda p: {"config": p["config"]}, ConfigurationError),
}


@pytest.mark.parametrize("fault", sorted(AUTODO_FAULTS))
def test_bad_autodo_state(fault):
    change, error = AUTODO_FAULTS[fault]
    state = _saved("autodo")
    state["policy"] = change(state["policy"])
    assert_rejected("autodo", _load(state), error)


@pytest.mark.parametrize("fault", ["nan-mean", "mis-shaped-cov", "missing-count", "other-classes"])
def test_bad_isda_state_through_the_refiner(fault):
    state = _saved("isda")
    isda = dict(state["isda"])
    if fault == "nan-mean":
        isda["mean"] = torch.full_like(isda["mean"], NAN)
        error = NonFiniteError
    elif fault == "mis-shaped-cov":
        isda["cov"] = isda["cov"][:1]
        error = ConfigurationError
    elif fault == "missing-count":
        isda.pop("count")
        error = ConfigurationError
    else:
        isda["_extra_state"] = {**isda["_extra_state"], "num_classes": C + 1}
        error = ConfigurationError
    state["isda"] = isda
    assert_rejected("isda", _load(state), error)


def test_bad_influence_state():
    state = _saved("influence")
    state["policy"] = {**state["policy"], "buffer": torch.full_like(state["policy"]["buffer"], NAN)}
    assert_rejected("influence", _load(state), NonFiniteError)


def test_standalone_isda_load_is_atomic():
    loss = ISDALoss(C, 6, covariance="full")
    before = copy.deepcopy(loss.state_dict())
    bad = copy.deepcopy(before)
    bad["mean"] = torch.full_like(bad["mean"], NAN)
    with pytest.raises(NonFiniteError):
        loss.load_state_dict(bad)
    same(before, loss.state_dict())


@pytest.mark.parametrize("bad", [{}, {"generator": torch.zeros(3)}, {"generator": "x"}, None])
def test_tabular_cutmix_bad_state(bad):
    cm = TabularCutMix(p=0.5, seed=3)
    before = cm.state_dict()["generator"].clone()
    with pytest.raises(ConfigurationError):
        cm.load_state_dict(bad)
    assert torch.equal(cm.state_dict()["generator"], before)


# ----------------------------------------------------------------------------- property-based
def _paths(state, prefix=()):
    """Every (path, value) in a nested state."""
    if isinstance(state, dict):
        for k, v in state.items():
            yield prefix + (k,), v
            yield from _paths(v, prefix + (k,))


def _set(state, path, value):
    state = copy.deepcopy(state)
    d = state
    for k in path[:-1]:
        d = d[k]
    if value is _DROP:
        d.pop(path[-1])
    else:
        d[path[-1]] = value
    return state


_DROP = object()


def _corruptions(state):
    """hypothesis strategy: one random corruption of a nested state."""
    paths = [p for p, _ in _paths(state)]
    tensor_paths = [p for p, v in _paths(state) if torch.is_tensor(v) and v.is_floating_point() and v.numel()]

    def nan_at(args):
        path, frac = args
        t = dict(_paths(state))[path].clone()
        t.view(-1)[int(frac * (t.numel() - 1))] = NAN
        return _set(state, path, t)

    def reshape(args):
        path, cut = args
        t = dict(_paths(state))[path]
        return _set(state, path, t.flatten()[: max(t.numel() - cut, 0)])

    return st.one_of(
        st.sampled_from(paths).map(lambda p: _set(state, p, _DROP)),
        st.tuples(st.sampled_from(tensor_paths), st.floats(0, 1)).map(nan_at),
        st.tuples(st.sampled_from(tensor_paths), st.integers(1, 3)).map(reshape),
        st.tuples(st.sampled_from(paths), st.sampled_from([None, "x", -1, 2.5, [], {}])).map(
            lambda a: _set(state, a[0], a[1])),
    )


@pytest.mark.parametrize("kind", ["saflex", "autodo", "share", "contrastive", "isda"])
def test_random_state_corruptions_load_whole_or_not_at_all(kind):
    """Any corruption either loads (it changed nothing that matters) or raises an augplug error and
    leaves the refiner exactly as it was; a refiner that loaded keeps training with finite weights."""
    saved = _saved(kind)
    rig = make_rig(kind)
    rig.step(0)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_corruptions(saved))
    def check(bad):
        before = copy.deepcopy(rig.refiner.state_dict())
        try:
            rig.refiner.load_state_dict(bad)
        except AugplugError as e:
            assert e.fix
            same(before, rig.refiner.state_dict())
            return
        probe = make_rig(kind)
        probe.refiner.load_state_dict(bad)
        probe.step(7)
        assert all(torch.isfinite(p).all() for p in probe.model.parameters())
        rig.refiner.load_state_dict(before)

    check()


def test_a_state_that_is_not_a_refiners_says_so():
    """A model's or an optimizer's state_dict passed by mistake is named as such, with its keys."""
    assert_rejected("saflex", _load({"fc.weight": torch.zeros(2, 2)}), ConfigurationError,
                    match=r"not a refiner state: it has no 'version' key \(keys: fc.weight")


def test_a_validation_loss_saved_as_a_tensor_loads():
    """A state whose validation loss is a one-element tensor (converted by a checkpoint tool) is
    intact: it loads, and the refiner goes on exactly as before."""
    state = _saved("saflex")
    state["val_loss"] = torch.tensor(state["val_loss"])
    rig = make_rig("saflex")
    rig.refiner.load_state_dict(state)
    assert rig.refiner.state_dict()["val_loss"] == float(state["val_loss"])
