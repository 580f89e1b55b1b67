"""AutoDO policy inside the refiner: initial tables, hypergradients against the autograd oracle,
lazy updates, resume, bad input, symmetric KL, reports."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.data import IndexedDataset
from augplug.errors import ConfigurationError
from augplug.hypergrad import per_sample_loss
from augplug.methods.autodo import AutoDO, PointIndexError, format_class_report
from augplug.models import SmallCNN

N, C, B = 40, 4, 8


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, 8, 8, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    xv = torch.randn(16, 1, 8, 8, generator=g)
    yv = torch.randint(0, C, (16,), generator=g)
    # shuffled by the refiner's private RNG (a loader with its own generator is not restored on resume)
    return x, y, DataLoader(TensorDataset(xv, yv), batch_size=8, shuffle=True)


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, C, img_size=8, width=4, hidden=8)


def _refiner(model, opt, val, mode="last_layer", **opts):
    kw = dict(num_points=N, num_classes=C)
    kw.update(opts)
    return AugmentationRefiner(model, opt, val, method="autodo", mode=mode, method_options=kw,
                               schedule=dict(val_batches=1, refresh_every=1))


def _step(model, opt, ref, x, y, idx, seed):
    torch.manual_seed(seed)  # dropout masks
    xa = ref.augment(x[idx], idx)
    loss = ref(model(xa), y[idx], index=idx)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def test_initial_tables_match_the_paper():
    pol = AutoDO(N, 10, labels=torch.arange(N) % 10)
    assert torch.allclose(pol.weights(), torch.ones(N), atol=1e-6)
    s = pol.soft_labels()
    assert torch.allclose(s[torch.arange(N), torch.arange(N) % 10], torch.full((N,), 1 - 0.05 + 0.005), atol=1e-5)
    assert torch.allclose(s.sum(1), torch.ones(N))
    assert torch.allclose(pol.gate_probabilities(), torch.full((N, 6), 0.2), atol=1e-6)
    assert torch.allclose(pol.magnitude_scales(), torch.full((N, 6), 0.5), atol=1e-6)
    # the paper's closed form of the initial label logits, log(1 - C + C / eps), up to a row constant
    lg = pol.tables.label_logits[0]
    assert abs(float(lg[0] - lg[1]) - math.log(1 - 10 + 10 / 0.05)) < 1e-4
    assert AutoDO(N, 10, augment="shared").tables.gate_logits.shape == (1, 6)


def test_training_loop_with_indexed_dataset_and_lazy_rows():
    x, y, val = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = _refiner(model, opt, val)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=B, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    xb, yb, idx = next(iter(loader))
    before = {k: v.clone() for k, v in ref.policy.tables.state_dict().items()}
    state = torch.get_rng_state()
    xa = ref.augment(xb, idx)
    assert torch.equal(torch.get_rng_state(), state)  # private randomness only
    out = model(xa)  # (dropout draws from the global RNG here)
    state = torch.get_rng_state()
    loss = ref(out, yb, index=idx)
    assert torch.equal(torch.get_rng_state(), state)
    opt.zero_grad()
    loss.backward()
    opt.step()
    st, pol = ref.stats, ref.policy
    assert st["weights"].shape == (B,) and st["soft_targets"].shape == (B, C) and st["scores"].shape == (B, C)
    assert pol.last_stats["hyper_step"] and st["scores"].abs().sum() > 0
    after = pol.tables.state_dict()
    other = torch.ones(N, dtype=torch.bool)
    other[idx] = False
    for k in ("weight_logits", "label_logits", "gate_logits", "magnitude_logits", "rms_weight_logits",
              "rms_label_logits", "rms_gate_logits", "rms_magnitude_logits", "given_labels"):
        assert torch.equal(after[k][other], before[k][other]), k          # untouched rows, values and state
        assert not torch.equal(after[k][idx], before[k][idx]), k         # every visited row moved
    assert torch.equal(pol.tables.given_labels[idx], yb)
    for xb, yb, idx in loader:  # a full epoch runs
        loss = ref(model(ref.augment(xb, idx)), yb, index=idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool(pol.seen().all())
    rows = pol.class_report(true_labels=y)
    assert len(rows) == C and {"weight_mean", "relabelled", "recovered", "p_rotate"} <= set(rows[0])
    assert "| class |" in format_class_report(rows)


def _hypergrads(hyper_params, mode, models="AWS", loss="ce"):
    x, y, val = _data(1)
    model = _model(1)
    ref = _refiner(model, None, val, mode=mode, models=models, hyper_params=hyper_params, loss=loss,
                   alpha=0.05, neumann_steps=4)
    idx = torch.arange(3, 3 + B)
    torch.manual_seed(11)
    xa = ref.augment(x[idx], idx)
    ref(model(xa), y[idx], index=idx)
    return ref.policy.last_hypergradients


@pytest.mark.parametrize("loss", ["ce", "sym_kl"])
def test_closed_form_hypergradients_equal_autograd_oracle(loss):
    """Head path (closed-form HVPs, features with their graph) == generic reverse-over-reverse IFT
    over the same head parameters, for W, S and the augmentation gates/magnitudes."""
    fast = _hypergrads("head", "last_layer", loss=loss)
    slow = _hypergrads(["fc"], "full", loss=loss)
    assert torch.allclose(fast["W"], slow["W"], rtol=1e-4, atol=1e-9)
    assert torch.allclose(fast["S"], slow["S"], rtol=1e-4, atol=1e-9)
    assert torch.equal(fast["A"][0], slow["A"][0])
    assert torch.allclose(fast["A"][1], slow["A"][1], rtol=1e-3, atol=1e-9)
    assert torch.allclose(fast["A"][2], slow["A"][2], rtol=1e-3, atol=1e-9)
    assert fast["A"][1].abs().sum() > 0 and fast["A"][2].abs().sum() > 0 and fast["W"].abs().sum() > 0


def test_more_layers_option_runs_and_differs_from_head_only():
    head = _hypergrads(["fc"], "full", models="W")
    more = _hypergrads(["fc", "features.9"], "full", models="W")
    assert torch.isfinite(more["W"]).all() and not torch.allclose(head["W"], more["W"])
    with pytest.raises(ConfigurationError, match="mode='full'"):
        _hypergrads(["features.9"], "last_layer", models="W")


def test_weight_hypergradient_sign_follows_validation_alignment():
    """Rows whose training gradient points along the validation gradient get negative dL_val/dw
    (their weight grows): the sign of -grad loss_i . u, computed independently by autograd."""
    x, y, val = _data(2)
    model = _model(2)
    ref = _refiner(model, None, val, models="W", augment="off", alpha=0.05, neumann_steps=0)
    idx = torch.arange(B)
    torch.manual_seed(0)
    ref(model(x[idx]), y[idx], index=idx)
    hg = ref.policy.last_hypergradients["W"]
    v = ref.validation_direction  # -grad L_val
    torch.manual_seed(0)  # the same training-mode forward (dropout mask, batch statistics) as above
    feats = model.features(x[idx]).detach()
    fc = model.fc
    signs = []
    for i in range(B):
        z = fc(feats[i:i + 1])
        gw, gb = torch.autograd.grad(F.cross_entropy(z, y[idx][i:i + 1]), [fc.weight, fc.bias])
        align = float((gw * v["fc.weight"]).sum() + (gb * v["fc.bias"]).sum())  # = -grad l_i . grad L_val
        signs.append(math.copysign(1, align))
    # T = 0: u = alpha grad L_val, dL/dw_i = -(alpha/B) grad l_i . grad L_val = (alpha/B) * align_i
    assert [math.copysign(1, float(h)) for h in hg] == signs


def test_resume_from_state_dict_is_bitwise_exact():
    x, y, val = _data(3)
    model = _model(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref = _refiner(model, opt, val, hyper_lr={"W": 0.2, "S": 0.1, "A": 0.05})
    batches = [torch.randperm(N, generator=torch.Generator().manual_seed(s))[:B] for s in range(8)]
    for s in range(4):
        _step(model, opt, ref, x, y, batches[s], s)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ref": ref.state_dict()})
    first = [_step(model, opt, ref, x, y, batches[s], s) for s in range(4, 8)]
    tables = {k: v.clone() for k, v in ref.policy.tables.state_dict().items()}

    model2 = _model(99)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    _, _, val2 = _data(3)
    ref2 = _refiner(model2, opt2, val2, hyper_lr={"W": 0.2, "S": 0.1, "A": 0.05})
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    ref2.load_state_dict(saved["ref"])
    second = [_step(model2, opt2, ref2, x, y, batches[s], s) for s in range(4, 8)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(tables[k], v) for k, v in ref2.policy.tables.state_dict().items())
    # torch.save / torch.load(weights_only=True) round trip of the policy state
    import io
    buf = io.BytesIO()
    torch.save(ref.policy.state_dict(), buf)
    buf.seek(0)
    ref2.policy.load_state_dict(torch.load(buf, weights_only=True))
    with pytest.raises(ConfigurationError):
        AutoDO(N + 1, C).load_state_dict(ref.policy.state_dict())


@pytest.mark.parametrize("bad", ["missing", "range", "negative", "repeat", "float", "bool", "shape", "2d"])
def test_bad_index_raises_typed_error_and_leaves_tables_unchanged(bad):
    x, y, val = _data(4)
    model = _model(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = _refiner(model, opt, val)
    idx = torch.arange(B)
    _step(model, opt, ref, x, y, idx, 0)  # some state to protect
    index = {"missing": None, "range": torch.arange(N - 2, N - 2 + B), "negative": torch.arange(-1, B - 1),
             "repeat": torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), "float": idx.float(), "bool": idx < 4,
             "shape": torch.arange(B - 1), "2d": idx[:, None]}[bad]
    before = {k: v.clone() for k, v in ref.policy.tables.state_dict().items()}
    calls, step = ref.calls, ref.step_count
    with pytest.raises(PointIndexError) as err:
        ref.augment(x[:B], index)
    assert err.value.fix
    with pytest.raises(PointIndexError):
        ref(model(x[:B]), y[:B], index=index)
    assert all(torch.equal(before[k], v) for k, v in ref.policy.tables.state_dict().items())
    assert ref.calls == calls and ref.step_count == step and ref.policy._pending == []
    # a valid call afterwards works
    _step(model, opt, ref, x, y, idx, 1)


def test_bad_options_are_configuration_errors():
    for kw in (dict(models="AX"), dict(models="A", augment="off"), dict(loss="mse"), dict(alpha=0),
               dict(hyper_lr=-1), dict(hyper_lr={"Q": 0.1}), dict(ops=["spin"]), dict(every=0),
               dict(labels=torch.full((N,), C)), dict(hyper_params=[])):
        with pytest.raises(ConfigurationError):
            AutoDO(N, C, **kw)
    with pytest.raises(ConfigurationError):
        AutoDO(0, C)


def test_symmetric_kl_training_gradient():
    """With loss='sym_kl' the refiner's loss has the logit gradient of sum_i w_i symKL(s_i, p_i) / B."""
    x, y, val = _data(5)
    model = _model(5)
    ref = _refiner(model, None, val, loss="sym_kl", models="WS", augment="off", start_step=10)
    idx = torch.arange(B)
    torch.manual_seed(0)
    logits = model(x[idx]).detach().requires_grad_()
    (g_ref,) = torch.autograd.grad(ref(logits, y[idx], index=idx), logits)
    w = ref.policy.weights()[idx]
    s = ref.policy.soft_labels()[idx]
    (g_oracle,) = torch.autograd.grad((w * per_sample_loss(logits, s, "sym_kl")).sum() / B, logits)
    assert torch.allclose(g_ref, g_oracle, atol=1e-6)


def test_schedule_start_and_every():
    x, y, val = _data(6)
    model = _model(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = _refiner(model, opt, val, start_step=2, every=3, augment="shared")
    flags = []
    for s in range(9):
        _step(model, opt, ref, x, y, torch.arange(B) + (s % 4) * B, s)
        flags.append(ref.policy.last_stats["hyper_step"])
    assert flags == [False, False, True, False, False, True, False, False, True]
    assert int(ref.policy.tables.hyper_steps) == 3 and ref.policy.tables.gate_logits.shape[0] == 1


def test_indexed_dataset_positions_and_concatenated_parts():
    a = TensorDataset(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    b = TensorDataset(torch.ones(2, 1), torch.ones(2, dtype=torch.long))
    ds = IndexedDataset(ConcatDataset([a, b]))
    assert [ds[i][-1] for i in range(5)] == [0, 1, 2, 3, 4] and ds[-1][-1] == 4
    with pytest.raises(IndexError):
        ds[5]
    # separately indexed parts would restart their positions at 0 and collide in the tables
    with pytest.raises(ConfigurationError, match="restart"):
        IndexedDataset(ConcatDataset([IndexedDataset(a), IndexedDataset(b)]))
    with pytest.raises(ConfigurationError):
        IndexedDataset(IndexedDataset(a))
    with pytest.raises(ValueError, match="duplicates"):
        IndexedDataset.check_unique(torch.tensor([1, 1]))


def test_isda_composes_when_available():
    pytest.importorskip("augplug.isda")
    x, y, val = _data(7)
    model = _model(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = AugmentationRefiner(model, opt, val, method="autodo", isda=True,
                              method_options=dict(num_points=N, num_classes=C), schedule=dict(val_batches=1))
    for s in range(3):
        loss = _step(model, opt, ref, x, y, torch.arange(B) + s * B, s)
        assert torch.isfinite(loss)
    assert ref.policy.last_stats["hyper_step"]


def test_a_batch_whose_rows_all_weigh_zero_trains_nothing():
    """``orig_weight=0`` and a batch of originals only: every row weighs 0, so the loss is 0 and the
    model's weights stay as they were (the denominator was 0, and the 0 / 0 surfaced as NaN
    hypergradients)."""
    x, y, val = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = AugmentationRefiner(model, opt, val, method="autodo", method_options=dict(num_points=N, num_classes=C),
                              orig_weight=0.0, schedule=dict(val_batches=1, refresh_every=1))
    before = copy.deepcopy(dict(model.named_parameters()))
    idx = torch.arange(8)
    for _ in range(3):
        loss = ref(model(x[idx]), y[idx], index=idx, augmented=torch.zeros(8, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        assert loss.item() == 0.0
        opt.step()
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())   # BatchNorm's statistics move


def test_targets_that_leave_their_positions_label_warn_once():
    """AutoDO learns a soft label per dataset position and does not read later targets: a batch-local
    index= (every batch numbered 0..B-1) shows as targets that disagree with the label a position was
    first seen with, and warns once; the documented loop (fixed positions) does not warn."""
    x, y, val = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = _refiner(model, opt, val)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in range(2):   # the same positions with their own labels, twice
            _step(model, opt, ref, x, y, torch.arange(8), s)
    local = torch.arange(8)
    with pytest.warns(RuntimeWarning, match="first seen with"):
        loss = ref(model(ref.augment(x[8:16], local)), y[8:16], index=local)   # rows 8..15 numbered 0..7
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once
        ref(model(ref.augment(x[16:24], local)), y[16:24], index=local).backward()


def test_an_option_a_method_does_not_take_is_named_with_the_fix_to_leave_it_out():
    _, _, val = _data()
    model = _model()
    with pytest.raises(ConfigurationError, match="does not use the option") as info:
        AugmentationRefiner(model, None, val, method="autodo",
                            method_options=dict(num_points=N, num_classes=C, weight_norm="batch"))
    assert "leave them out" in info.value.fix
