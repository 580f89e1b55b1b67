"""Options as sweeps and config files give them (numpy scalars, text, 0, inf, NaN), the validation
loader's own generators across a failed first pass and across a resume with persistent workers,
``validate()`` on the loaders the refiner refuses, and the fix texts of malformed logits."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import augplug
from augplug import AugmentationRefiner, Schedule
from augplug.checks import validate
from augplug.errors import ConfigurationError, ShapeError, TargetError
from augplug.methods.autodo import AutoDO
from augplug.methods.saflex import SAflex, saflex_targets
from augplug.pooled import PooledEvidence
from augplug.sources import BatchMixer
from augplug.targets import check_logits
from augplug.valve import RefinementStrength

C, D = 4, 6
_X = torch.randn(32, D, generator=torch.Generator().manual_seed(5))
_Y = torch.randint(0, C, (32,), generator=torch.Generator().manual_seed(6))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))


def _step_batch(s):
    g = torch.Generator().manual_seed(100 + s)
    return torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)


# ------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("weight_tau", [0.0, -1.0, math.inf])
def test_saflex_weight_temperature_must_be_positive_and_finite(weight_tau):
    # 0 gives 0/0 = NaN weights for a centred agreement of 0; a negative one inverts the weighting
    with pytest.raises(ConfigurationError, match="weight_tau"):
        SAflex(weight_tau=weight_tau)


def test_a_tiny_label_temperature_gives_one_hot_rows_not_nan():
    scores = torch.tensor([[3.0, -1.0, 0.5], [0.0, 0.0, 2.0]])
    targets = torch.eye(3)[[0, 1]]
    _, soft = saflex_targets(scores, targets, beta=1.0, tau=1e-45)
    assert torch.isfinite(soft).all()
    assert torch.equal(soft.amax(-1), torch.ones(2)) and torch.equal(soft.sum(-1), torch.ones(2))
    with pytest.raises(ConfigurationError, match="tau"):
        SAflex(beta=1.0, tau=math.inf)


@pytest.mark.parametrize("gumbel", ["false", "no", 0, None])
def test_saflex_gumbel_takes_true_or_false_only(gumbel):
    with pytest.raises(ConfigurationError, match="gumbel"):
        SAflex(gumbel=gumbel)
    assert SAflex(gumbel=np.bool_(True)).gumbel is True


def test_numpy_scalars_from_a_sweep_are_accepted_as_their_python_types():
    s = Schedule(refresh_every=np.int64(4), val_batches=np.int64(2), warmup_steps=np.int32(3), budget=np.float32(0.2))
    assert (s.refresh_every, s.val_batches, s.warmup_steps) == (4, 2, 3)
    assert all(type(v) is int for v in (s.refresh_every, s.val_batches, s.warmup_steps))
    assert SAflex(pool=np.int64(4)).pool.num_sources == 4
    assert SAflex(beta=np.float32(1.0), tau=np.float64(0.5)).beta == 1.0
    policy = AutoDO(np.int64(8), np.int64(3), hyper_lr=np.float32(0.1))
    assert (policy.num_points, policy.num_classes) == (8, 3)
    assert RefinementStrength(init=np.float64(0.5)).init == 0.5
    for bad in (True, 4.0, "4"):
        with pytest.raises(ConfigurationError, match="refresh_every"):
            Schedule(refresh_every=bad)


@pytest.mark.parametrize("build", [
    lambda: RefinementStrength(init="0.5"),
    lambda: RefinementStrength(init=True),
    lambda: RefinementStrength(lr=math.nan),
    lambda: PooledEvidence(4, decay="0.99"),
    lambda: PooledEvidence(4, temperature="2"),
    lambda: PooledEvidence(np.float64(4.0)),
    lambda: BatchMixer([TensorDataset(_X, _Y)], per_batch="x"),
    lambda: BatchMixer([TensorDataset(_X, _Y)], per_batch=math.nan),
    lambda: BatchMixer([TensorDataset(_X, _Y)], per_batch=2.5),
    lambda: AutoDO(8, 3, label_smoothing="x"),
    lambda: AutoDO(8, 3, hyper_lr=math.inf),
    lambda: AutoDO(8, 3, hyper_lr={"W": math.nan}),
    lambda: AutoDO(8, 3, damping=math.nan),
    lambda: AutoDO(8, 3, alpha=math.inf),
    lambda: AutoDO(8, 3, tau=0.0),
    lambda: AutoDO(8, 3, every=1.5),
], ids=["strength-init-text", "strength-init-bool", "strength-lr-nan", "pool-decay-text", "pool-temperature-text", "pool-float-count",
        "mixer-text", "mixer-nan", "mixer-fraction", "autodo-smoothing-text", "autodo-lr-inf", "autodo-lr-nan",
        "autodo-damping-nan", "autodo-alpha-inf", "autodo-tau-0", "autodo-every-float"])
def test_options_given_as_text_or_non_finite_are_configuration_errors(build):
    with pytest.raises(ConfigurationError):
        build()


# ----------------------------------------------------------- the loader's generator, a failed first pass
class _FlakyVal(Dataset):
    """The validation set; its ``fail_on``-th item read raises ``exc`` once."""

    def __init__(self, fail_on=None, exc=OSError):
        self.fail_on, self.exc, self.reads = fail_on, exc, 0

    def __len__(self):
        return 32

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.fail_on:
            raise self.exc("transient failure")
        return _X[i], _Y[i]


def _run_with_a_failure(fail_on, exc, cache):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(7)
    loader = DataLoader(_FlakyVal(fail_on, exc), batch_size=8, shuffle=True, generator=gen)
    r = AugmentationRefiner(model, opt, loader,
                            schedule=Schedule(budget=None, refresh_every=2, cache_validation=cache))
    losses, s, refused = [], 0, 0
    while len(losses) < 4:
        x, y = _step_batch(s)
        logits = model(x)
        before = gen.get_state()
        try:
            loss = r(logits, y, num_original=4)
        except exc:
            refused += 1
            assert torch.equal(gen.get_state(), before)   # the loader's own generator is given back
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        s += 1
    return losses, [p.detach().clone() for p in model.parameters()], refused


@pytest.mark.parametrize("cache", [False, True], ids=["stream", "cached"])
@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_a_failure_in_the_first_validation_pass_gives_the_loaders_generator_back(exc, cache):
    twin, p_twin, _ = _run_with_a_failure(None, exc, cache)
    got, p_got, refused = _run_with_a_failure(20, exc, cache)   # item 20: inside the first pass
    assert refused == 1
    assert got == twin
    assert all(torch.equal(a, b) for a, b in zip(p_got, p_twin))


# ------------------------------------------------------------------- resume with persistent workers
class _Val(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return _X[i], _Y[i]


def _persistent_run(persistent):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(_Val(), batch_size=8, shuffle=True, num_workers=1, persistent_workers=persistent)
    r = AugmentationRefiner(model, opt, loader, schedule=Schedule(budget=None, refresh_every=1, val_batches=1))
    return model, opt, r


def _train_steps(model, opt, r, steps):
    losses = []
    for s in steps:
        x, y = _step_batch(s)
        loss = r(model(x), y, num_original=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("resume_on_a_used_loader", [False, True], ids=["fresh-loader", "loader-read-before"])
def test_a_resume_with_persistent_workers_reads_the_same_validation_batches(resume_on_a_used_loader):
    # the second pass of a persistent-worker loader resets its iterator, which draws no new base seed
    # for the workers: a restored stream must open its pass the same way to draw the same order
    warnings.simplefilter("ignore")
    model, opt, r = _persistent_run(True)
    _train_steps(model, opt, r, range(6))            # 6 reads of 4 batches: the second pass is open
    assert r.state_dict()["stream"]["by_reset"] is True
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), r.state_dict()))
    continued = _train_steps(model, opt, r, range(6, 10))
    model2, opt2, r2 = _persistent_run(True)
    if resume_on_a_used_loader:   # e.g. the user evaluated on the loader before loading the checkpoint
        for _ in r2._stream.loader:
            pass
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    r2.load_state_dict(saved[2])
    assert _train_steps(model2, opt2, r2, range(6, 10)) == continued


# ------------------------------------------------------------------------------------ validate()
def test_validate_reports_what_the_refiner_refuses_and_reads_nothing_it_keeps():
    model = _mlp()
    listed = [(_X[:8], _Y[:8].tolist())]
    problems = validate(model, val_loader=listed)
    assert len(problems) == 1 and isinstance(problems[0], TargetError) and "list" in str(problems[0])

    def batches():
        yield _X[:8], _Y[:8]
        yield _X[8:16], _Y[8:16]
    once = batches()
    problems = validate(model, val_loader=once)
    assert len(problems) == 1 and isinstance(problems[0], ConfigurationError) and "one-shot" in str(problems[0])
    assert len(list(once)) == 2   # nothing was drawn from it

    g = torch.Generator().manual_seed(3)
    shuffled = DataLoader(TensorDataset(_X, _Y), batch_size=8, sampler=torch.utils.data.RandomSampler(_X, generator=g))
    before = g.get_state()
    assert validate(model, val_loader=shuffled) == []
    assert torch.equal(g.get_state(), before)


# --------------------------------------------------------------- the model fails on a validation batch
class _Flattening(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.fc = nn.Linear(D, 8), nn.Linear(8, C)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x.flatten(1))))


@pytest.mark.parametrize("bad", ["numpy-inputs", "tuple-inputs", "one-row-batch-norm"])
def test_a_model_failing_on_a_validation_batch_is_a_shape_error_that_changes_nothing(bad):
    torch.manual_seed(0)
    if bad == "numpy-inputs":
        model = _mlp()
        loader = [(_X[:8].numpy(), _Y[:8])]
        kw = {}
    elif bad == "tuple-inputs":   # inputs for a model that takes two tensors, model(x_num, x_cat)
        model = _Flattening()
        loader = [((_X[:8, :3], _X[:8, 3:]), _Y[:8])]
        kw = {}
    else:   # BatchNorm in train mode cannot normalize one row: the loader's last batch holds one
        model = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, C))
        loader = DataLoader(TensorDataset(_X[:17], _Y[:17]), batch_size=8)
        kw = dict(bn_mode="train")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, loader, schedule=Schedule(budget=None, refresh_every=1), **kw)
    x, y = _step_batch(0)
    logits = model(x)
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(r.state_dict())
    with pytest.raises(ShapeError, match="the model failed on a validation batch") as info:
        r(logits, y, num_original=4)
    assert "drop_last" in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    assert str(r.state_dict()) == str(state)


def test_compute_validation_direction_checks_the_class_count_and_changes_nothing_when_refused():
    model = _mlp()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            DataLoader(TensorDataset(_X, _Y), batch_size=8, shuffle=True))
    rng, stream = r._rng.state.clone(), r._stream.state_dict()
    for bad in (C + 1, float(C), "4", 1):
        with pytest.raises(ShapeError, match="num_classes"):
            r.compute_validation_direction(bad)
    assert torch.equal(r._rng.state, rng) and str(r._stream.state_dict()) == str(stream)
    assert r.compute_validation_direction(np.int64(C)).count == 32   # the whole loader: val_batches="all"
    # a failure after the stream moved: a label out of range in the loader's second batch
    bad = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              [(_X[:8], _Y[:8]), (_X[8:16], torch.full((8,), C + 2))])
    rng, stream = bad._rng.state.clone(), bad._stream.state_dict()
    with pytest.raises(augplug.errors.ClassCountMismatchError):
        bad.compute_validation_direction(C)
    assert torch.equal(bad._rng.state, rng) and str(bad._stream.state_dict()) == str(stream)


# ------------------------------------------------------------------------ fix texts for logits
@pytest.mark.parametrize("shape, fix", [((8,), "two logits per sample"), ((8, 1), "two logits per sample"),
                                        ((8, C, 1), "reshape(8, 4)"), ((8, C, 3), "movedim(1, -1)")])
def test_malformed_logits_get_a_fix_that_fits_their_shape(shape, fix):
    with pytest.raises(ShapeError) as info:
        check_logits(torch.randn(*shape))
    assert fix in info.value.fix


class _FlakyOnceVal(Dataset):
    """The validation set read by worker processes; its ``fail_at``-th read raises once (a marker
    file makes it once across the processes that read it)."""

    def __init__(self, marker=None, fail_at=20):
        self.marker, self.reads, self.fail_at = marker, 0, fail_at

    def __len__(self):
        return 32

    def __getitem__(self, i):
        self.reads += 1
        if self.marker is not None and self.reads == self.fail_at and not self.marker.exists():
            self.marker.touch()
            raise OSError("transient failure")
        return _X[i], _Y[i]


def _persistent_run_with_a_failure(marker, fail_at=20):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_FlakyOnceVal(marker, fail_at), batch_size=8, shuffle=True, num_workers=1, persistent_workers=True)
    r = AugmentationRefiner(model, opt, loader, schedule=Schedule(budget=None, refresh_every=1, val_batches=1))
    losses, s, refused = [], 0, 0
    while len(losses) < 6:
        x, y = _step_batch(s)
        try:
            loss = r(model(x), y, num_original=4)
        except OSError:
            refused += 1
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        s += 1
    return losses, refused


@pytest.mark.parametrize("fail_at", [3, 20], ids=["first-call", "later-call"])
def test_a_failure_in_the_first_pass_of_a_persistent_worker_loader_equals_its_twin(tmp_path, fail_at):
    # a failed first call started the loader's persistent workers: the retry must open its pass as
    # the twin's first pass was opened (a new iterator, not a reset of the failed call's)
    warnings.simplefilter("ignore")
    twin, _ = _persistent_run_with_a_failure(None)
    got, refused = _persistent_run_with_a_failure(tmp_path / "failed", fail_at)
    assert refused == 1 and got == twin


@pytest.mark.parametrize("option", [dict(beta=math.nan), dict(threshold=math.nan), dict(gumbel="false"), dict(tau="1"),
                                    dict(threshold=math.inf)], ids=["beta-nan", "threshold-nan", "gumbel-text",
                                                                    "tau-text", "threshold-inf"])
def test_the_functional_saflex_rule_checks_its_options_as_the_policy_does(option):
    scores, targets = torch.randn(4, 3), torch.eye(3)[[0, 1, 2, 0]]
    with pytest.raises(ConfigurationError):
        saflex_targets(scores, targets, **option)
    with pytest.raises(ConfigurationError):
        SAflex(**option)
