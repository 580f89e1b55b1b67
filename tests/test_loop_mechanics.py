"""Training-loop mechanics a practitioner meets: a refiner dropped without ``remove_hooks()``, a
second refiner on the same model, a classifier or model replaced mid-run, a checkpoint whose
validation window does not fit the loader, SAM-style optimizers, copies of a refiner, a lone
augmented row under BatchNorm in train mode, fp64 models, and a new optimizer without the head."""
import copy
import gc
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug import AugmentationRefiner, Schedule
from augplug.errors import ConfigurationError, ShapeError
from augplug.isda import ISDALoss

D, C = 8, 3
_G = torch.Generator().manual_seed(1)
_W = torch.randn(C, D, generator=_G)
_XV = torch.randn(64, D, generator=_G)
_VAL = TensorDataset(_XV, (_XV @ _W.t()).argmax(-1))


def _val(batch_size=32):
    return DataLoader(_VAL, batch_size=batch_size)


def _mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(16)] if bn else []
    return nn.Sequential(nn.Linear(D, 16), *mid, nn.ReLU(), nn.Linear(16, C))


def _data(s, rows=16):
    g = torch.Generator().manual_seed(s)
    x = torch.randn(rows, D, generator=g)
    return x, (x @ _W.t()).argmax(-1)


def _separate_steps(model, opt, r, steps):
    for s in steps:
        x, y = _data(s)
        x_aug, y_aug = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(s)), (y + 1) % C
        loss = r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


# ------------------------------------------------------------- a refiner no longer called, or dropped
@pytest.mark.parametrize("drop", [True, False], ids=["deleted", "kept-but-not-called"])
def test_training_after_the_separate_pattern_without_the_refiner_is_plain(drop):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _val(), method=augplug.SAflex(aug_weight=augplug.share.AdaptiveShare(lr=0.5)),
                            schedule=Schedule(budget=None, refresh_every=1))
    _separate_steps(model, opt, r, range(12))
    assert float(r.stats["aug_weight"]) < 0.5   # the rest was scaled by 2 / (1 + share) > 1.3
    if drop:
        del r
        gc.collect()
    x, y = _data(99)
    opt.step()   # the update that follows the last refined backward
    plain = copy.deepcopy(model)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), model[2].weight)[0]
    g_plain = torch.autograd.grad(F.cross_entropy(plain(x), y), plain[2].weight)[0]
    assert torch.equal(g, g_plain)


def test_a_second_refiner_on_a_model_that_still_carries_the_first_ones_hooks_warns():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = AugmentationRefiner(model, opt, _val())
    with pytest.warns(RuntimeWarning, match="remove_hooks"):
        AugmentationRefiner(model, opt, _val())
    first.remove_hooks()
    copied = copy.deepcopy(model)   # a copy's hooks are inert, and not another refiner's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AugmentationRefiner(copied, torch.optim.SGD(copied.parameters(), lr=0.1), _val())
    standalone = _mlp()   # a standalone ISDA criterion's hooks are not a refiner's either
    ISDALoss.for_model(standalone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AugmentationRefiner(standalone, torch.optim.SGD(standalone.parameters(), lr=0.1), _val())


# ------------------------------------------------------------------ the classifier or model replaced
def test_a_replaced_classifier_is_named_and_the_call_changes_nothing():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _val(), schedule=Schedule(budget=None))
    _separate_steps(model, opt, r, range(2))
    model[2] = nn.Linear(16, C)
    state = copy.deepcopy(r.state_dict())
    x, y = _data(5)
    with pytest.raises(ConfigurationError, match="replaced"):
        r(model(x), y, num_original=8)
    assert str(r.state_dict()) == str(state)


@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_logits_of_a_model_rebuilt_mid_run_name_the_cause_not_inputs(mode):
    model = _mlp()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), mode=mode,
                            schedule=Schedule(budget=None))
    rebuilt = _mlp(1)
    rebuilt.load_state_dict(model.state_dict())
    x, y = _data(0)
    with pytest.raises(ShapeError, match="no training forward of the model this refiner was built on") as info:
        r(rebuilt(x), y, num_original=8)
    assert "rebuilt" in info.value.problem and "load this one's state_dict()" in info.value.fix


# --------------------------------------------------------------------------- the validation window
def test_a_state_whose_window_does_not_fit_the_loader_is_refused_and_changes_nothing():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _val(32), schedule=Schedule(budget=None, refresh_every=1))
    _separate_steps(model, opt, r, range(3))
    saved = r.state_dict()
    assert len(saved["window"]["slots"]) == 2
    other = AugmentationRefiner(_mlp(), None, _val(16), schedule=Schedule(budget=None, refresh_every=1))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ConfigurationError, match="window holds 2 batches, but this refiner reads 4"):
        other.load_state_dict(saved)
    assert str(other.state_dict()) == str(before)
    same = AugmentationRefiner(_mlp(), None, _val(32), schedule=Schedule(budget=None, refresh_every=1))
    same.load_state_dict(saved)   # the loader it was saved with
    fewer = AugmentationRefiner(_mlp(), None, _val(16), schedule=Schedule(budget=None, refresh_every=1, val_batches=1))
    with pytest.raises(ConfigurationError, match="val_batches=1"):
        fewer.load_state_dict(saved)


# ------------------------------------------------------------------------------------ optimizers
class _SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as it is usually written: the real optimizer is
    ``.base_optimizer``, driven by ``first_step`` (a perturbation in place) and ``second_step``."""

    def __init__(self, params, base, rho=0.05, **kw):
        super().__init__(params, dict(rho=rho, **kw))
        self.base_optimizer = base(self.param_groups, **kw)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"] if p.grad is not None]).norm()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.state[p]["old"] = p.data.clone()
                    p.add_(p.grad * g["rho"] / (norm + 1e-12))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old"]
        self.base_optimizer.step()
        self.zero_grad()


def test_a_sam_optimizer_counts_one_update_per_second_step():
    model = _mlp()
    opt = _SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    r = AugmentationRefiner(model, opt, _val(), schedule=Schedule(budget=None))
    assert r.optimizer is opt.base_optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "updated without a counted step" warning either
        for s in range(6):
            x, y = _data(s)
            r(model(torch.cat([x, x.flip(0)])), torch.cat([y, y.flip(0)]), num_original=16).backward()
            opt.first_step()
            F.cross_entropy(model(x), y).backward()
            opt.second_step()
    assert r.step_count == 6


def test_a_new_optimizer_without_the_classifier_warns_as_the_constructor_does():
    model = _mlp()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val())
    with pytest.warns(RuntimeWarning, match="holds none of the classifier"):
        r.set_optimizer(torch.optim.SGD(model[0].parameters(), lr=0.1))


# ------------------------------------------------------------------------------------------ copies
@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_refiner_cannot_be_copied_and_says_what_to_save_instead(copier):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _val())
    _separate_steps(model, opt, r, range(1))
    with pytest.raises(ConfigurationError, match="cannot be copied or pickled") as info:
        copier(r)
    assert "state_dict()" in info.value.fix
    copy.deepcopy(model)   # the model itself still copies (its hooks become inert)


# ---------------------------------------------------------- one augmented row, BatchNorm in train mode
def test_a_lone_augmented_row_is_scored_with_the_training_batchs_statistics_under_autocast():
    model = _mlp(bn=True)
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), mode="full",
                            bn_mode="train", schedule=Schedule(budget=None))
    x, y = _data(0, rows=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # autocast: forward mode, not the replay
        loss = r(model(x), y, num_original=8)
    assert r.stats["score_pass"] == "forward_mode"
    assert torch.isfinite(loss) and torch.isfinite(r.stats["scores"]).all()
    assert r.stats["scores"][8].abs().sum() > 0


# ------------------------------------------------------------------------------------------- fp64
def test_an_fp64_model_gets_an_fp64_loss_with_cross_entropys_gradient():
    model = _mlp().double()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), method="none")
    x, y = _data(0)
    loss = r(model(x.double()), y)
    assert loss.dtype == torch.float64
    g = torch.autograd.grad(loss, model[2].weight)[0]
    g_ce = torch.autograd.grad(F.cross_entropy(model(x.double()), y), model[2].weight)[0]
    torch.testing.assert_close(g, g_ce, rtol=1e-12, atol=1e-14)


def test_a_classifier_frozen_mid_run_warns_once():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _val(), schedule=Schedule(budget=None))
    _separate_steps(model, opt, r, range(1))
    model[2].requires_grad_(False)
    with pytest.warns(RuntimeWarning, match="has been frozen"):
        _separate_steps(model, opt, r, range(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _separate_steps(model, opt, r, range(2, 4))
