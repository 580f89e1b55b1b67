"""Checkpoints at their edges: truncated, converted or mixed-up states, generators the user's own
code reads too, and refiners that leave an Accelerator. Each bad state is refused with the refiner
unchanged; each good one resumes exactly."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner, SAflex, Schedule
from augplug.errors import ConfigurationError
from fault_harness import same

C = 4


def _val(shuffle=False, generator=None):
    g = torch.Generator().manual_seed(7)
    ds = TensorDataset(torch.randn(24, 8, generator=g), torch.randint(0, C, (24,), generator=g))
    return DataLoader(ds, batch_size=8, shuffle=shuffle, generator=generator)


def _build(val=None, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("schedule", Schedule(budget=None, refresh_every=2))
    return model, opt, AugmentationRefiner(model, opt, val if val is not None else _val(), **kw)


def _step(model, opt, ref, i):
    g = torch.Generator().manual_seed(1000 + i)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, C, (8,), generator=g)
    opt.zero_grad()
    loss = ref(model(x), y, num_original=4)
    loss.backward()
    opt.step()
    return loss.item()


def _trained(steps=5, **kw):
    model, opt, ref = _build(**kw)
    for i in range(steps):
        _step(model, opt, ref, i)
    return model, opt, ref


def _refused(ref, state, match):
    before = copy.deepcopy(ref.state_dict())
    with pytest.raises(ConfigurationError, match=match):
        ref.check_state_dict(state)
    with pytest.raises(ConfigurationError, match=match):
        ref.load_state_dict(state)
    same(before, ref.state_dict())


@pytest.mark.parametrize("key", ["window", "v_halves", "budget", "skipped_val_batches", "rest"])
def test_a_state_cut_short_is_refused(key):
    """A version-2 state without one of its entries loaded silently (the window then restarted and the
    resumed run drifted from the second step)."""
    _, _, saved = _trained(method=SAflex(strength="adaptive"))
    state = saved.state_dict()
    assert state["window"] is not None and state["v_halves"] is not None
    del state[key]
    _, _, ref = _trained(3, method=SAflex(strength="adaptive"))
    _refused(ref, state, rf"lacks \['{key}'\]")


@pytest.mark.parametrize("key, match", [("window", "no 'window' entry"), ("v_halves", "no 'v_halves' entry")])
def test_a_part_emptied_beside_its_direction_is_refused(key, match):
    _, _, saved = _trained(method=SAflex(strength="adaptive"))
    state = saved.state_dict()
    state[key] = None
    _, _, ref = _trained(3, method=SAflex(strength="adaptive"))
    _refused(ref, state, match)


def test_a_state_converted_to_another_dtype_is_refused():
    _, _, saved = _trained()
    for convert in (torch.Tensor.half, torch.Tensor.double):
        state = saved.state_dict()
        state["v"] = {k: convert(t) for k, t in state["v"].items()}
        _, _, ref = _trained(3)
        _refused(ref, state, "a state converted after the save")


def test_a_state_loaded_to_meta_is_refused():
    _, _, saved = _trained()
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, map_location="meta")
    _, _, ref = _trained(3)
    _refused(ref, state, "map_location='meta'")


def test_a_contrastive_state_is_refused_even_before_a_direction():
    from augplug.contrastive import ClassEmbeddings, ContrastiveRefiner
    sched = Schedule(budget=None, refresh_every=2, warmup_steps=10)   # no direction yet in either
    torch.manual_seed(0)
    image, text = nn.Linear(8, 16), ClassEmbeddings(C, 16)
    opt = torch.optim.SGD(list(image.parameters()) + list(text.parameters()), lr=0.1)
    cr = ContrastiveRefiner(image, text, opt, _val(), class_prompts=torch.arange(C), schedule=sched)
    for _ in range(3):
        opt.zero_grad()
        cr(torch.randn(8, 8), torch.randint(0, C, (8,)), num_original=4).backward()
        opt.step()
    cstate = cr.state_dict()
    assert cstate["v"] is None
    _, _, ref = _build(method=SAflex(aug_weight=1.0), schedule=sched)
    _refused(ref, cstate, "saved by a ContrastiveRefiner")
    with pytest.raises(ConfigurationError, match="saved by a AugmentationRefiner"):
        cr.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("change", ["short_rng", "generators_text", "generators_float", "generators_none_entry"])
def test_malformed_stream_rng_parts_are_configuration_errors(change):
    """A cut pass RNG state and generator states of the wrong type gave raw RuntimeError / TypeError."""
    _, _, saved = _trained(val=_val(True, torch.Generator().manual_seed(3)))
    state = saved.state_dict()
    stream = state["stream"]
    if change == "short_rng":
        stream["pass_rng_state"] = stream["pass_rng_state"][:100]
    elif change == "generators_text":
        stream["generator_states"] = "x"
    elif change == "generators_float":
        stream["generator_states"] = [stream["generator_states"][0].float()]
    else:
        stream["generator_states"] = [None]
    _, _, ref = _trained(3, val=_val(True, torch.Generator().manual_seed(3)))
    _refused(ref, state, "validation stream state")


def test_states_are_copies_both_ways():
    _, _, ref = _trained(val=_val(True, torch.Generator().manual_seed(3)))
    state = ref.state_dict()
    kept = copy.deepcopy(state)
    state["stream"]["pass_rng_state"].zero_()
    state["stream"]["generator_states"][0].zero_()
    same(kept, ref.state_dict())
    _, _, other = _trained(3, val=_val(True, torch.Generator().manual_seed(3)))
    other.load_state_dict(kept)
    loaded = copy.deepcopy(other.state_dict())
    kept["stream"]["pass_rng_state"].zero_()
    kept["stream"]["generator_states"][0].zero_()
    same(loaded, other.state_dict())


def _run_with_shared_generator(split=None, restore_generator_first=True, steps=10):
    """The validation loader's generator is also read by the user's own evaluation pass, and saved
    and restored by the user with everything else."""
    def build():
        val = _val(True, torch.Generator().manual_seed(3))
        model, opt, ref = _build(val=val, schedule=Schedule(budget=None, refresh_every=2, fresh_batches=None))
        return model, opt, ref, val

    model, opt, ref, val = build()
    losses = []
    for i in range(steps):
        if i == split:
            ck = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict(), "r": ref.state_dict(),
                                "g": val.generator.get_state()})
            ref.remove_hooks()
            model, opt, ref, val = build()
            if restore_generator_first:
                val.generator.set_state(ck["g"])
            model.load_state_dict(ck["m"])
            opt.load_state_dict(ck["o"])
            ref.load_state_dict(ck["r"])
            if not restore_generator_first:
                val.generator.set_state(ck["g"])
        losses.append(_step(model, opt, ref, i))
        if i % 3 == 2:
            with torch.no_grad():
                for xv, yv in val:
                    model(xv)
    return losses


@pytest.mark.parametrize("first", [True, False], ids=["generator_first", "generator_last"])
def test_resume_is_exact_whatever_order_a_shared_generator_is_restored_in(first):
    """Restored before the refiner's state, the user's generator was set back to the refiner's pass
    start by the load, and the resumed run drew other validation batches."""
    base = _run_with_shared_generator()
    for split in (3, 4, 7):
        assert _run_with_shared_generator(split, first) == base, split


def test_cached_rebuild_leaves_the_loaders_generator_where_it_was():
    gen = torch.Generator().manual_seed(3)
    model, opt, ref = _build(val=_val(True, gen), schedule=Schedule(budget=None, refresh_every=2,
                                                                  cache_validation=True))
    for i in range(3):
        _step(model, opt, ref, i)
    state = ref.state_dict()
    gen2 = torch.Generator().manual_seed(3)
    model2, opt2, ref2 = _build(val=_val(True, gen2), schedule=Schedule(budget=None, refresh_every=2,
                                                                       cache_validation=True))
    ref2.load_state_dict(state)
    gen2.manual_seed(11)   # the user's own use of it
    before = gen2.get_state()
    for i in range(3, 6):
        _step(model2, opt2, ref2, i)   # rebuilds the cached pass
    assert torch.equal(gen2.get_state(), before)


def test_remove_hooks_leaves_the_accelerators_checkpoints():
    """After remove_hooks() the dead refiner stayed registered: save_state wrote its stale state beside
    the new refiner's, and a resumed run with one refiner failed inside accelerate."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    r1 = AugmentationRefiner(model, opt, _val(), schedule=Schedule(budget=None), accelerator=acc)
    assert any(o is r1 for o in acc._custom_objects)
    r1.remove_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r2 = AugmentationRefiner(model, opt, _val(), schedule=Schedule(budget=None), accelerator=acc)
    assert [o for o in acc._custom_objects if isinstance(o, AugmentationRefiner)] == [r2]
    r2.remove_hooks()


def test_a_state_of_another_backbone_with_the_same_classifier_is_refused():
    """The direction covers the classifier only (last-layer mode), so a state of another backbone with
    a classifier of the same shape loaded, window and all. States record the model's layout."""
    class Net(nn.Module):
        def __init__(self, depth):
            super().__init__()
            self.body = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(8, 8), nn.ReLU())])
            self.fc = nn.Linear(8, C)

        def forward(self, x):
            return self.fc(self.body(x))

    def trained(depth, steps):
        torch.manual_seed(0)
        model = Net(depth)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref = AugmentationRefiner(model, opt, _val(), schedule=Schedule(budget=None, refresh_every=2))
        for i in range(steps):
            _step(model, opt, ref, i)
        return ref

    state = trained(2, 5).state_dict()
    ref = trained(1, 3)
    _refused(ref, state, r"saved for another model \(body\.2\.weight")
    trained(2, 3).load_state_dict(state)   # the same architecture loads
    for layout in ("layers", [["fc.weight"]], [["fc.weight", ["x", 8]]], [["fc.weight", None]]):
        _refused(ref, {**state, "model": layout}, "not a parameter layout")   # before: a raw error for the last two
    legacy = dict(state)
    del legacy["model"]                    # a state from before the layout was recorded
    ref.load_state_dict(legacy)


def test_a_state_records_its_options_and_a_resume_under_others_warns():
    """A state saved under per-sample weights and loaded into a refiner built with the defaults used
    to load silently and train on without them; it still loads, and the warning names each option
    that differs with both values."""
    _, _, saved = _trained(method=SAflex(weighting="soft", beta=2.0))
    state = saved.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)   # plain strings: a weights-only load reads them
    assert state["options"]["method"] == "SAflex" and state["options"]["method.weighting"] == "'soft'"
    _, _, ref = _trained(3)
    with pytest.warns(RuntimeWarning, match="other options") as caught:
        ref.load_state_dict(state)
    text = str(caught[0].message)
    assert "method.weighting: saved 'soft', here 'none'" in text and "method.beta: saved 2.0, here inf" in text
    assert "schedule" not in text and "bn_mode" not in text   # options alike are not listed
    same(ref.state_dict()["v"], state["v"])             # and the state is loaded
    _, _, alike = _trained(3, method=SAflex(weighting="soft", beta=2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alike.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "options"}   # states before options were recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alike.load_state_dict(older)


@pytest.mark.parametrize("options", [["method"], {"method": 1}, {2: "SAflex"}])
def test_a_malformed_options_table_is_refused(options):
    _, _, saved = _trained()
    state = saved.state_dict()
    state["options"] = options
    _, _, ref = _trained(3)
    _refused(ref, state, "'options' is not a table")


def test_option_fields_reads_nested_reprs_and_quoted_commas():
    from augplug.options import option_fields
    text = "R(method=P(a='x, y(', b=[1, 2], share=S(lr=None)), mode='m', 3)"
    assert option_fields(text) == {"method": "P", "method.a": "'x, y('", "method.b": "[1, 2]", "method.share": "S",
                                   "method.share.lr": "None", "mode": "'m'", "#2": "3"}
    assert option_fields("plain") == {} and option_fields("R()") == {}


@pytest.mark.parametrize("option, value, listed", [("orig_weight", 2.0, "orig_weight: saved 2.0, here 1.0"),
                                                   ("isda", {"lambda0": 0.1}, "isda.lambda0: saved 0.1, here 0.5")])
def test_the_shells_own_options_are_recorded_too(option, value, listed):
    _, _, saved = _trained(**{option: value})
    _, _, ref = _trained(3, **({"isda": True} if option == "isda" else {}))
    with pytest.warns(RuntimeWarning, match="other options") as caught:
        ref.load_state_dict(saved.state_dict())
    assert listed in str(caught[0].message)


def test_the_seed_of_the_per_call_noise_is_restored_with_the_state():
    """The noise of a call is drawn from the seed and the call count: a state carries its seed, as it
    carries the RNG state, so a refiner built with another seed resumes the saved run's draws."""
    _, _, saved = _trained(seed=3)
    _, _, ref = _trained(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # restored, not another option
        ref.load_state_dict(saved.state_dict())
    assert ref.seed == 3 and torch.equal(ref.noise_generator().get_state(), saved.noise_generator().get_state())
    state = saved.state_dict()
    state["seed"] = "3"
    _refused(ref, state, "'seed' is '3', not an integer")


def test_a_resume_for_another_run_length_says_the_horizon_follows_it():
    from augplug.share import AdaptiveShare
    _, _, saved = _trained(method=SAflex(aug_weight=AdaptiveShare(horizon=100)))
    _, _, ref = _trained(3, method=SAflex(aug_weight=AdaptiveShare(horizon=200)))
    with pytest.warns(RuntimeWarning, match="horizon is the run's length"):
        ref.load_state_dict(saved.state_dict())
