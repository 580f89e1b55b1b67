"""Bad input gets a clear typed error, and a rejected call leaves the refiner's state unchanged."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug import AugmentationRefiner, SAflex
from augplug.errors import (AugplugError, ClassCountMismatchError, ConfigurationError, EmptyValidationError,
                            ModelModeError, NonFiniteError, ShapeError, TargetError, UnsupportedHeadError,
                            ValidationFailed)
from augplug.models import SmallCNN
from augplug.refiner import augmented_rows, num_val_batches
from augplug.refiner import refiner_kwargs
from augplug.share import AdaptiveShare

C = 4


def _loader(n=16, labels=None, bs=8):
    x = torch.randn(n, 1, 8, 8)
    y = torch.randint(0, C, (n,)) if labels is None else labels
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)


def _setup(loader=None, **kw):
    kw.setdefault("strength", 1.0)  # these calls hold augmented rows alone: refine them all the same
    torch.manual_seed(0)
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, loader if loader is not None else _loader(), **refiner_kwargs(kw))
    return model, opt, r


def _state(r):
    import copy
    return copy.deepcopy(r.state_dict())


def _same_state(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def _good_step(model, opt, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, C, (8,), generator=g)
    torch.manual_seed(seed)  # the user's dropout RNG
    loss = r(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


BAD_CALLS = {
    "label out of range": (lambda m, x: (m(x), torch.tensor([0, 1, 2, 9, 0, 1, 2, 3])), TargetError, "0..3"),
    "negative label": (lambda m, x: (m(x), torch.tensor([0, -100, 2, 1, 0, 1, 2, 3])), TargetError, "ignore_index"),
    "too few targets": (lambda m, x: (m(x), torch.zeros(5, dtype=torch.long)), ShapeError, "one target per"),
    "float 1-D targets": (lambda m, x: (m(x), torch.zeros(8)), TargetError, "integer"),
    "soft targets wrong width": (lambda m, x: (m(x), torch.full((8, 3), 1 / 3)), ShapeError, "width"),
    "soft targets not probabilities": (lambda m, x: (m(x), torch.randn(8, C)), TargetError, "probabilities"),
    "multi-hot targets": (lambda m, x: (m(x), torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 8)), TargetError, "multi-label"),
    "3-D logits": (lambda m, x: (m(x)[:, None], torch.zeros(8, dtype=torch.long)), ShapeError, "(batch, classes)"),
    "integer logits": (lambda m, x: (m(x).argmax(1, keepdim=True).expand(8, C).long(), torch.zeros(8, dtype=torch.long)),
                       TargetError, "floating"),
    "NaN logits": (lambda m, x: (m(x) + torch.tensor([float("nan")] + [0.0] * 7)[:, None], torch.zeros(8, dtype=torch.long)),
                   NonFiniteError, "NaN"),
    "inf logits": (lambda m, x: (m(x) * torch.tensor([1.0] * 7 + [float("inf")])[:, None], torch.zeros(8, dtype=torch.long)),
                   NonFiniteError, "GradScaler"),
    "detached logits": (lambda m, x: (m(x).detach(), torch.zeros(8, dtype=torch.long)), ModelModeError, "require grad"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_batch_rejected_state_unchanged(case):
    make, err, words = BAD_CALLS[case]
    model, opt, r = _setup()
    _good_step(model, opt, r, seed=1)
    before = _state(r)
    with pytest.raises(err, match=None) as info:
        r(*make(model, torch.randn(8, 1, 8, 8)))
    assert isinstance(info.value, AugplugError) and words in str(info.value) and info.value.fix
    _same_state(before, _state(r))
    # and the next good step is exactly what it would have been without the rejected call
    model2, opt2, r2 = _setup()
    _good_step(model2, opt2, r2, seed=1)
    model2.load_state_dict(model.state_dict())
    assert _good_step(model, opt, r, seed=2) == _good_step(model2, opt2, r2, seed=2)


def test_eval_mode_is_rejected():
    model, opt, r = _setup()
    model.eval()
    before = _state(r)
    with pytest.raises(ModelModeError, match="model.train"):
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long))
    _same_state(before, _state(r))


def test_empty_validation_loader():
    empty = DataLoader(TensorDataset(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    model, opt, r = _setup(loader=empty)
    before = _state(r)
    with pytest.raises(EmptyValidationError, match="no batches"):
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long))
    _same_state(before, _state(r))
    with pytest.raises(EmptyValidationError):
        AugmentationRefiner(model, opt, None)(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long))


def test_a_one_shot_or_unsized_validation_loader_is_rejected_when_the_refiner_is_built():
    """A generator yields one pass and then nothing; the refiner reads its loader again and again,
    so it is rejected at construction (before, the second pass failed inside a rollback with a
    message about a saved state). ``val_batches="all"`` needs ``len()``: also said at construction."""
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, C, (16,))
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    one_shot = ((x[i:i + 8], y[i:i + 8]) for i in (0, 8))
    with pytest.raises(ConfigurationError, match="one-shot iterator"):
        AugmentationRefiner(model, opt, one_shot, schedule=augplug.Schedule(val_batches=1))
    with pytest.raises(ConfigurationError, match="one-shot iterator"):
        AugmentationRefiner(model, opt, iter([(x, y)]), schedule=augplug.Schedule(val_batches=1))

    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))
    with pytest.raises(ConfigurationError, match="len"):
        AugmentationRefiner(model, opt, DataLoader(Unsized(), batch_size=8))
    r = AugmentationRefiner(model, opt, DataLoader(Unsized(), batch_size=8), method=SAflex(strength=1.0),
                            schedule=augplug.Schedule(val_batches=1, refresh_every=1))
    for _ in range(3):   # an unsized re-iterable loader is cycled with an integer val_batches
        loss = r(model(torch.randn(8, 1, 8, 8)), torch.randint(0, C, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r.stats["refreshed"]


@pytest.mark.parametrize("kind", ["tuples", "dicts"])
def test_a_dataset_passed_as_the_validation_loader_is_named(kind):
    """A ``Dataset`` (not a ``DataLoader`` over it) yields single samples whose target has no batch
    dimension; the error says so and names the fix (before: "targets must be class indices (B,)
    ... got shape ()"), and the state is unchanged."""
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, C, (16,))

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"image": x[i], "label": int(y[i])} if kind == "dicts" else (x[i], y[i])
    model, opt, r = _setup(loader=Samples())
    before = _state(r)
    with pytest.raises(ShapeError, match="single samples.*Dataset") as e:
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long))
    assert "DataLoader(dataset, batch_size=" in e.value.fix
    _same_state(before, _state(r))


@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_logits_narrower_than_the_classifier_are_named(mode):
    """Logits sliced to fewer classes than the classifier produces (a user dropping a background
    class): the error names the two class counts, in last-layer mode at the call (before: a bare
    RuntimeError from a broadcast), in full-model mode at the validation forward (before: a
    message about the validation inputs); the state is unchanged."""
    loader = _loader(labels=torch.tensor([0, 1, 2] * 5 + [0]))
    model, opt, r = _setup(loader=loader, mode=mode)
    before = _state(r)
    with pytest.raises(ShapeError, match="3 classes" if mode == "full" else "3 classes.*4 outputs"):
        r(model(torch.randn(8, 1, 8, 8))[:, :3], torch.zeros(8, dtype=torch.long))
    _same_state(before, _state(r))


def test_validation_class_count_mismatch_state_unchanged():
    loader = _loader(labels=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] * 2))  # 8 classes in validation, 4 in training
    model, opt, r = _setup(loader=loader)
    before = _state(r)
    with pytest.raises(ClassCountMismatchError, match="validation targets"):
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long))
    _same_state(before, _state(r))


def test_unsupported_heads():
    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(1, 4, 3)
            self.classifier = nn.Conv2d(4, C, 1)

        def forward(self, x):
            return self.classifier(self.body(x)).mean((2, 3))

    with pytest.raises(UnsupportedHeadError, match="mode='full'"):
        AugmentationRefiner(ConvHead(), None, _loader(), mode="last_layer")
    AugmentationRefiner(ConvHead(), None, _loader(), mode="full")  # full mode is fine

    class Distilled(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.head_dist = nn.Linear(4, C), nn.Linear(4, C)

        def get_classifier(self):
            return self.head, self.head_dist

    with pytest.raises(UnsupportedHeadError, match="distilled"):
        AugmentationRefiner(Distilled(), None, _loader())
    AugmentationRefiner(Distilled(), None, _loader(), classifier="head")  # naming the head works

    import timm
    headless = timm.create_model("resnet10t", num_classes=0, pretrained=False)
    with pytest.raises(UnsupportedHeadError, match="Identity"):
        AugmentationRefiner(headless, None, _loader())
    with pytest.raises(UnsupportedHeadError, match="no submodule"):
        AugmentationRefiner(headless, None, _loader(), classifier="nope")


def test_features_not_captured():
    model, opt, r = _setup()
    with torch.no_grad():
        logits = model(torch.randn(8, 1, 8, 8))
    with pytest.raises(ShapeError, match="features="):
        r(logits.requires_grad_(), torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("kw,words", [
    (dict(mode="jvp"), "unknown mode"), (dict(method="mixup"), "unknown method"), (dict(refresh_every=0), ">= 1"),
    (dict(tau=0.0), "tau"), (dict(beta=-1.0), "beta"), (dict(bn_mode="frozen"), "bn_mode"),
    (dict(orig_weight=0, aug_weight=0), "both 0"), (dict(weighting="sometimes"), "weighting"),
    (dict(orig_weight=float("inf")), "finite"), (dict(orig_weight=float("nan")), "finite"),
    (dict(orig_weight=1e39), "finite"), (dict(aug_weight=float("inf")), "finite"),
    (dict(aug_weight=float("nan")), "finite"), (dict(aug_weight=1e39), "finite")])
def test_bad_configuration(kw, words):
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    with pytest.raises(ConfigurationError, match=words):
        AugmentationRefiner(model, None, _loader(), **refiner_kwargs(kw))


def test_validate_lists_every_problem():
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    model.eval()
    empty = DataLoader(TensorDataset(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    logits = torch.randn(8, C)
    logits[0, 0] = float("nan")
    problems = augplug.validate(model, None, empty, logits=logits, targets=torch.zeros(8, dtype=torch.long))
    kinds = {type(p) for p in problems}
    assert {ModelModeError, EmptyValidationError, NonFiniteError} <= kinds
    with pytest.raises(ValidationFailed) as info:
        augplug.validate(model, None, empty, strict=True)
    assert "fix:" in str(info.value) and len(info.value.problems) == 2
    model.train()
    assert augplug.validate(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader()) == []
    _, _, r = _setup()
    assert r.validate() == []
    bad = _loader(labels=torch.full((16,), 7))
    assert any(isinstance(p, ClassCountMismatchError) for p in augplug.validate(model, None, bad))


def test_validate_unwraps_optimizer_wrappers_like_the_refiner():
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)

    class Outer:  # wrapper of a wrapper, inner one exposing the optimizer as original_optimizer
        def __init__(self, opt):
            self.optimizer = type("Mid", (), {"original_optimizer": opt})()

    assert augplug.validate(model, Outer(torch.optim.SGD(model.parameters(), lr=0.1)), _loader()) == []
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert any("none of the model's" in p.problem for p in augplug.validate(model, Outer(other), _loader()))
    problems = augplug.validate(model, object(), _loader())
    assert any(isinstance(p, ConfigurationError) and "step hook" in p.problem for p in problems)


@pytest.mark.parametrize("kw, err, match", [
    (dict(num_original=9), "ShapeError", "outside 0..8"),
    (dict(num_original=-1), "ShapeError", "outside 0..8"),
    (dict(num_original=True), "ShapeError", "boolean"),
    (dict(num_original=torch.tensor(True)), "ShapeError", "boolean"),
    (dict(num_original=2.0), "ShapeError", "integer count"),
    (dict(augmented=torch.ones(7, dtype=torch.bool)), "ShapeError", r"shape \(8,\)"),
    (dict(augmented=torch.ones(8)), "ShapeError", "bool tensor"),
    (dict(num_original=2, augmented=torch.ones(8, dtype=torch.bool)), "ConfigurationError", "not both"),
])
def test_augmented_rows_rejects_bad_row_selection(kw, err, match):
    with pytest.raises(getattr(augplug.errors, err), match=match):
        augmented_rows(8, kw.get("num_original", 0), kw.get("augmented"), "cpu", unit="pairs")
    mask, rows, n = augmented_rows(8, 3, None, "cpu")
    assert rows == slice(3, None) and n == 5 and mask.tolist() == [False] * 3 + [True] * 5
    m = torch.tensor([True, False] * 4)
    mask, rows, n = augmented_rows(8, 0, m, "cpu")
    assert rows is mask and n == 4


def test_num_val_batches():
    assert num_val_batches("all", lambda: 5) == 5 and num_val_batches("all", lambda: 0) == 1
    assert num_val_batches(3, lambda: 5) == 3
    with pytest.raises(ConfigurationError, match="len"):
        num_val_batches("all", lambda: len(iter([])))


@pytest.mark.parametrize("kw, words, fix", [
    (dict(beta=1.0), "unexpected keyword argument 'beta'", "method_options"),
    (dict(refresh_every=2), "unexpected keyword argument 'refresh_every'", "Schedule"),
    (dict(val_params="head"), "'val_params'", "last_layer"),
    (dict(refresh_evry=2), "'refresh_evry'", "refiner_kwargs"),
    (dict(method=SAflex), "the class SAflex", "instance"),
    (dict(method_options={"beta": "high"}), "beta must be a number", "beta="),
])
def test_options_that_moved_or_are_mistyped_get_a_clear_error(kw, words, fix):
    """Options that moved to the method or the schedule (or a class passed for an instance) get an
    error that says where they live now."""
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    with pytest.raises(ConfigurationError, match=words) as info:
        AugmentationRefiner(model, None, _loader(), **kw)
    assert fix in info.value.fix
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


BAD_ROW_KWARGS = {
    # what the call's keyword tensors must be: one row per sample, of the right kind and width
    "features of the wrong width": (lambda: dict(features=torch.randn(8, 5)), "takes 8 inputs"),
    "features with too few rows": (lambda: dict(features=torch.randn(7, 8)), "shape (8, ...)"),
    "integer features": (lambda: dict(features=torch.ones(8, 8, dtype=torch.long)), "floating"),
    "sources with too few rows": (lambda: dict(sources=torch.zeros(7, dtype=torch.long)), "shape (8,)"),
    "floating sources": (lambda: dict(sources=torch.zeros(8)), "integer"),
    "2-D index": (lambda: dict(index=torch.zeros(8, 1, dtype=torch.long)), "shape (8,)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROW_KWARGS))
@pytest.mark.parametrize("num_original", [0, 4])
def test_bad_row_tensors_rejected_state_unchanged(case, num_original):
    """Checked whether or not the call uses them (a wrong ``sources=`` is a mistake even where the
    policy pools nothing), before anything runs: a ShapeError naming the argument, state unchanged."""
    make, words = BAD_ROW_KWARGS[case]
    model, opt, r = _setup()
    _good_step(model, opt, r, seed=1)
    before = _state(r)
    with pytest.raises(ShapeError, match=None) as info:
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long), num_original=num_original, **make())
    assert words in str(info.value) and info.value.fix
    _same_state(before, _state(r))


@pytest.mark.parametrize("bad", [True, torch.tensor(True), 9, -1, 2.0])
def test_bad_num_original_rejected_state_unchanged(bad):
    """A ``num_original=`` that is not a count of rows in the batch (a boolean, out of range, a
    float) is a ShapeError from the refiner's call, and the refiner's state is as it was."""
    model, opt, r = _setup()
    _good_step(model, opt, r, seed=1)
    before = _state(r)
    with pytest.raises(ShapeError) as info:
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long), num_original=bad)
    assert "num_original" in str(info.value) and info.value.fix
    _same_state(before, _state(r))


def test_features_flattened_per_row_are_accepted():
    model, opt, r = _setup()
    x = torch.randn(8, 1, 8, 8)
    feats = model.features(x)  # the head's input, (8, 8)
    logits = model.fc(feats)
    y = torch.zeros(8, dtype=torch.long)
    flat = r(logits, y, features=feats.detach())  # computes the direction; the next call keeps it
    assert torch.equal(r(logits, y, features=feats.detach().view(8, 2, 4)), flat)


def test_missing_policy_options_are_named():
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    with pytest.raises(ConfigurationError) as info:
        AugmentationRefiner(model, None, _loader(), method="autodo")
    assert "['num_points', 'num_classes']" in str(info.value) and "tau" not in info.value.problem


@pytest.mark.parametrize("make,words", [
    (lambda m: dict(model=lambda t: t), "torch.nn.Module"),
    (lambda m: dict(optimizer=torch.optim.SGD(SmallCNN(1, C, img_size=8, width=4, hidden=8).parameters(), lr=0.1)),
     "none of the model's trainable parameters"),
    (lambda m: dict(seed="0"), "seed must be an integer"),
    (lambda m: dict(seed=1.5), "seed must be an integer")])
def test_bad_constructor_arguments(make, words):
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    kw = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), val_loader=_loader())
    kw.update(make(model))
    with pytest.raises(ConfigurationError, match=words):
        AugmentationRefiner(**kw)
    assert not model.fc._forward_hooks  # nothing left behind


def test_numpy_and_tensor_seeds_are_integers():
    import numpy as np
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    assert AugmentationRefiner(model, None, _loader(), seed=np.int64(3)).seed == 3
    assert AugmentationRefiner(model, None, _loader(), seed=torch.tensor(4)).seed == 4


def test_a_validation_batch_with_more_inputs_than_targets_is_named():
    """8 inputs and 6 labels in a validation batch: a ShapeError that says so, not a broadcasting
    error from deep inside the scores; nothing changes."""
    bad = [(torch.randn(8, 1, 8, 8), torch.randint(0, C, (6,)))]
    model, opt, r = _setup(bad)
    before = _state(r)
    with pytest.raises(ShapeError, match="8 inputs but 6 targets"):
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long))
    _same_state(before, _state(r))


def test_logits_changed_after_the_classifier_are_warned_once():
    """Logits that are not the classifier's output row for row (a temperature applied after it, rows
    reordered after the forward) would give wrong scores silently: one RuntimeWarning names it;
    the classifier's output itself, or a view of it, is not compared (no device sync) and not
    warned."""
    import warnings
    model, opt, r = _setup()
    x, y = torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r(model(x), y)
        r(model(x)[:, :], y)          # a view of the output
    with pytest.warns(RuntimeWarning, match="row for row"):
        r(model(x) / 0.1, y)
    model, opt, r = _setup()
    with pytest.warns(RuntimeWarning, match="reordered"):
        r(model(x)[torch.arange(7, -1, -1)], y)


def test_a_none_validation_batch_is_named_not_taken_for_the_end_of_the_pass():
    """A collate_fn that drops bad batches yields None: a ShapeError that says so. Before, None was
    read as the end of the pass and the validation set was silently cut short."""
    good = (torch.randn(8, 1, 8, 8), torch.randint(0, C, (8,)))
    model, opt, r = _setup([good, None, good])
    before = _state(r)
    with pytest.raises(ShapeError, match="yielded None"):
        r(model(torch.randn(8, 1, 8, 8)), torch.zeros(8, dtype=torch.long))
    _same_state(before, _state(r))


def test_a_classifier_that_cannot_train_is_warned_at_construction():
    """Last-layer scores measure what a step on the classifier does: a frozen classifier, or an
    optimizer that holds none of its parameters, gets one RuntimeWarning when the refiner is built."""
    import warnings
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.fc
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader()).remove_hooks()
    body = [p for n, p in model.named_parameters() if not any(p is q for q in head.parameters())]
    with pytest.warns(RuntimeWarning, match="holds none of the classifier"):
        AugmentationRefiner(model, torch.optim.SGD(body, lr=0.1), _loader()).remove_hooks()
    for p in head.parameters():
        p.requires_grad_(False)
    with pytest.warns(RuntimeWarning, match="frozen"):
        AugmentationRefiner(model, torch.optim.SGD(body, lr=0.1), _loader()).remove_hooks()


@pytest.mark.parametrize("make,words", [
    (lambda m: AugmentationRefiner(m, None, _loader(), isda="yes"), "isda must be"),
    (lambda m: AugmentationRefiner(m, None, _loader(), isda={"bogus": 1}), "isda="),
    (lambda m: AugmentationRefiner(m, None, _loader(), seed=2 ** 70), "seed"),
    (lambda m: AugmentationRefiner(m, None, _loader(), check_train_mode="no"), "check_train_mode"),
    (lambda m: SAflex(aug_weight=AdaptiveShare(init="1")), "init must be a number"),
    (lambda m: SAflex(aug_weight=AdaptiveShare(evidence="3")), "evidence must be a number"),
    (lambda m: SAflex(aug_weight=AdaptiveShare(lr="0.1")), "'0.1'"),
])
def test_mistyped_options_get_a_configuration_error(make, words):
    """Mistyped options: a ConfigurationError naming the option, not a TypeError or ValueError from
    deep inside (and the NumPy integers that counts elsewhere accept are accepted as a horizon)."""
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    with pytest.raises(ConfigurationError, match=words):
        make(model)
    import numpy as np
    assert AdaptiveShare(horizon=np.int64(100)).horizon == 100


def test_more_mistyped_or_mismatched_options_are_named():
    """An accelerator= that is not an Accelerator, a negative ISDA memory budget, AutoDO tables built
    for another number of classes than the logits have, influence on a model without a linear
    classifier in full mode, and AutoDO's augment() on a batch that is not images: each a typed
    error that names the real problem (before: an AttributeError, a silent switch to diagonal
    covariances, a raw index error, a fix that said to use the mode already given, a fix that said
    to convert a float batch to float)."""
    from augplug.errors import UnsupportedHeadError
    model = SmallCNN(1, C, img_size=8, width=4, hidden=8)
    with pytest.raises(ConfigurationError, match="Accelerator"):
        AugmentationRefiner(model, None, _loader(), accelerator=object())
    with pytest.raises(ConfigurationError, match="memory_budget"):
        AugmentationRefiner(model, None, _loader(), isda={"memory_budget": -5})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, _loader(), method="autodo", method_options=dict(num_points=40, num_classes=3))
    x, idx = torch.randn(8, 1, 8, 8), torch.arange(8)
    before = _state(r)
    with pytest.raises(ShapeError, match="num_classes=3"):
        r(model(r.augment(x, idx)), torch.zeros(8, dtype=torch.long), index=idx)
    _same_state(before, _state(r))
    r.remove_hooks()

    class ConvHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
            self.classifier = torch.nn.Conv2d(4, C, 1)

        def forward(self, x):
            return self.classifier(self.body(x)).flatten(1)

    with pytest.raises(UnsupportedHeadError, match="in every mode") as info:
        AugmentationRefiner(ConvHead(), None, _loader(), method="influence", mode="full")
    assert "mode='full'" not in info.value.fix.split("with")[0]
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))
    r = AugmentationRefiner(flat, None, _loader(), method="autodo", method_options=dict(num_points=40, num_classes=C))
    with pytest.raises(ShapeError, match="batch of images"):
        r.augment(torch.randn(8, 64), torch.arange(8))
