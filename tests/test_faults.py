"""Fault suite: bad training batches, bad validation data, bad options, across every refiner kind.

Each case asserts a typed error naming the problem and the fix, that the model, optimizer and
refiner are unchanged, and that the next good steps are bit-identical to a twin that never saw the
bad call (``fault_harness.assert_rejected``). The catalogue is in docs/reliability.md.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import augplug
from augplug import AugmentationRefiner
from augplug.errors import (ClassCountMismatchError, ConfigurationError, EmptyValidationError, ModelModeError,
                            NonFiniteError, ShapeError, TargetError)
from augplug.methods.autodo import PointIndexError

from augplug.refiner import refiner_kwargs
from fault_harness import (B, C, IMG, REFINER_KINDS, SCORING_KINDS, Net, PoisonableLoader, Rig, assert_rejected,
                           make_rig, poisoned, same, until_refresh, user_call, val_batches)

NAN, INF = float("nan"), float("inf")


def _poke(t, value, row=1, col=0):
    """A copy of ``t`` with one entry set to ``value`` (logits keep their graph, as a user's would)."""
    t = t.clone() if t.requires_grad else t.detach().clone()
    t.view(t.shape[0], -1)[row, col] = value
    return t


TRAINING_FAULTS = {
    # name: (change(logits, targets) -> (logits, targets, kwargs), error)
    "nan-logits": (lambda z, y: (_poke(z, NAN), y, {}), NonFiniteError),
    "inf-logits": (lambda z, y: (_poke(z, INF), y, {}), NonFiniteError),
    "nan-soft-targets": (lambda z, y: (z, _poke(F.one_hot(y, C).float(), NAN), {}), NonFiniteError),
    "negative-soft-targets": (lambda z, y: (z, F.one_hot(y, C).float() * 2 - 0.5, {}), TargetError),
    "soft-targets-not-summing-to-1": (lambda z, y: (z, F.one_hot(y, C).float() * 0.5, {}), TargetError),
    "label-too-large": (lambda z, y: (z, torch.where(torch.arange(B) == 3, C, y), {}), TargetError),
    "negative-label": (lambda z, y: (z, torch.where(torch.arange(B) == 3, -1, y), {}), TargetError),
    "float-1d-targets": (lambda z, y: (z, y.float(), {}), TargetError),
    "targets-wrong-rows": (lambda z, y: (z, y[:-1], {}), (ShapeError, TargetError)),
    "soft-targets-wrong-classes": (lambda z, y: (z, F.one_hot(y, C + 1).float(), {}), (ShapeError, TargetError)),
    "logits-1d": (lambda z, y: (z[:, 0], y, {}), ShapeError),
    "logits-3d": (lambda z, y: (z[:, :, None], y, {}), ShapeError),
    "empty-batch": (lambda z, y: (z[:0], y[:0], {}), (ShapeError, PointIndexError)),
    "num-original-too-large": (lambda z, y: (z, y, {"num_original": B + 1}), ShapeError),
    "num-original-not-an-integer": (lambda z, y: (z, y, {"num_original": 2.5}), ShapeError),
    "augmented-mask-wrong-dtype": (lambda z, y: (z, y, {"num_original": 0, "augmented": torch.ones(B)}), ShapeError),
    "augmented-mask-wrong-shape": (lambda z, y: (z, y, {"num_original": 0,
                                                        "augmented": torch.ones(B + 1, dtype=torch.bool)}), ShapeError),
    "both-num-original-and-mask": (lambda z, y: (z, y, {"num_original": 2,
                                                        "augmented": torch.ones(B, dtype=torch.bool)}),
                                   ConfigurationError),
}


@pytest.mark.parametrize("fault", sorted(TRAINING_FAULTS))
@pytest.mark.parametrize("kind", REFINER_KINDS)
def test_bad_training_batch(kind, fault):
    change, error = TRAINING_FAULTS[fault]
    if kind == "autodo" and fault in ("both-num-original-and-mask",):
        pytest.skip("covered by the other kinds")
    assert_rejected(kind, lambda rig: user_call(rig, change=change), error)


FEATURE_FAULTS = {
    "nan-features-override": ("saflex", lambda z, y, x: {"features": _poke(torch.randn(B, 12), NAN)}),
    "inf-features-override": ("l2rw", lambda z, y, x: {"features": _poke(torch.randn(B, 12), INF)}),
    "nan-features-isda": ("isda", lambda z, y, x: {"features": _poke(torch.randn(B, 12), NAN)}),
    "nan-inputs-full-mode": ("saflex-full", lambda z, y, x: {"inputs": _poke(x, NAN)}),
    "features-wrong-rows": ("saflex", lambda z, y, x: {"features": torch.randn(B - 1, 12)}),
    "inputs-wrong-rows": ("saflex-full", lambda z, y, x: {"inputs": x[:-1]}),
}


@pytest.mark.parametrize("case", sorted(FEATURE_FAULTS))
def test_bad_features_or_inputs(case):
    kind, extra = FEATURE_FAULTS[case]

    def fault(rig: Rig):
        x, y, _ = rig.batch(99)
        z = rig.model(x)
        return lambda: rig.refiner(z, y, num_original=rig.num_original, **extra(z, y, x))

    assert_rejected(kind, fault, NonFiniteError if "nan" in case or "inf" in case else ShapeError)


class NanSafeLinear(nn.Linear):
    """A head that maps NaN features to 0: finite logits from non-finite features."""

    def forward(self, x):
        return super().forward(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))


@pytest.mark.parametrize("kind", ["saflex", "share", "isda", "l2rw"])
def test_nan_in_captured_features_with_finite_logits(kind):
    def fault(rig: Rig):
        head = rig.model.fc
        safe = NanSafeLinear(head.in_features, head.out_features)
        safe.load_state_dict(head.state_dict())
        x, y, _ = rig.batch(99)
        feats = rig.model.body(x)
        feats[2, 3] = NAN
        # run the head module itself so the refiner's hook captures the NaN features
        z = safe(feats)
        assert torch.isfinite(z).all()
        rig.refiner._capture._feature_hook(head, (feats,), z)
        return lambda: rig.refiner(z, y, num_original=rig.num_original)

    assert_rejected(kind, fault, NonFiniteError)


def test_model_in_eval_mode():
    def fault(rig):
        x, y, _ = rig.batch(99)
        rig.model.eval()
        z = rig.model(x)
        rig.model.train()

        def call():
            rig.model.eval()
            try:
                rig.refiner(z, y)
            finally:
                rig.model.train()
        return call
    assert_rejected("saflex", fault, ModelModeError)


AUTODO_INDEX_FAULTS = {
    "missing": lambda idx: None,
    "float": lambda idx: idx.float(),
    "bool": lambda idx: idx > 3,
    "wrong-length": lambda idx: idx[:-1],
    "out-of-range": lambda idx: torch.where(torch.arange(B) == 0, 10_000, idx),
    "negative": lambda idx: torch.where(torch.arange(B) == 0, -1, idx),
    "duplicate": lambda idx: torch.where(torch.arange(B) == 0, idx[1], idx),
    "not-a-tensor": lambda idx: object(),
}


@pytest.mark.parametrize("fault", sorted(AUTODO_INDEX_FAULTS))
@pytest.mark.parametrize("where", ["loss", "augment"])
def test_autodo_bad_index(fault, where):
    change = AUTODO_INDEX_FAULTS[fault]

    def fault(rig):
        x, y, index = rig.batch(99)
        if where == "augment":
            return lambda: rig.refiner.augment(x, change(index))
        z = rig.model(rig.refiner.augment(x, index))
        return lambda: rig.refiner(z, y, index=change(index))

    assert_rejected("autodo", fault, PointIndexError)


# ----------------------------------------------------------------------------- validation data
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", [k for k in SCORING_KINDS if k != "saflex-cached"])  # a cache reads the loader once
def test_non_finite_validation_batch_rejected_when_asked(kind, value):
    def fault(rig):
        until_refresh(rig)
        return poisoned(rig, user_call(rig), poison={0, 1, 2}, value=value)

    assert_rejected(kind, fault, NonFiniteError, prime=2, bad_val_batch="raise")


def _skip_equals_dropped(kind, **options):
    """A NaN batch inserted into the validation stream is skipped: the run equals one whose loader
    never had it (apart from the stream's position and the skip counter)."""
    clean = PoisonableLoader(val_batches(n=3))
    dirty = PoisonableLoader(val_batches(n=3))
    bad = (torch.full((8, *IMG), NAN), torch.randint(0, C, (8,)))
    dirty.extra = {1: bad}
    opts = dict(val_batches=3) if kind != "autodo" else {}
    opts.update(options)
    a = make_rig(kind, val=clean, **opts)
    b = make_rig(kind, val=dirty, **opts)
    with pytest.warns(RuntimeWarning, match="skipped") as caught:
        for i in range(6):
            assert a.step(i) == b.step(i)
    package = os.path.dirname(os.path.abspath(augplug.__file__))
    skips = [w for w in caught if "skipped" in str(w.message)]
    assert skips and not any(os.path.abspath(w.filename).startswith(package + os.sep) for w in skips)  # the caller's line
    sa, sb = a.snapshot(), b.snapshot()
    assert sb["refiner"]["skipped_val_batches"] > 0 and sa["refiner"]["skipped_val_batches"] == 0
    for s in (sa, sb):
        s["refiner"].pop("stream"), s["refiner"].pop("skipped_val_batches")
    same(sa, sb)
    assert b.refiner.stats["skipped_val_batches"] == sb["refiner"].get("skipped_val_batches", b.refiner.skipped_val_batches)


@pytest.mark.parametrize("kind", SCORING_KINDS)
def test_non_finite_validation_batch_skipped_like_a_dropped_batch(kind):
    _skip_equals_dropped(kind)


@pytest.mark.parametrize("fresh", [None, "auto"])
def test_skipping_with_val_batches_all_reads_one_pass_of_good_batches(fresh):
    """The exact schedule reads one pass per refresh; the window fills with one pass of good
    batches and then refreshes one good batch at a time: either way the run equals one without the
    bad batch."""
    clean = PoisonableLoader(val_batches(n=3))
    dirty = PoisonableLoader(val_batches(n=3))
    dirty.extra = {2: (torch.full((8, *IMG), NAN), torch.randint(0, C, (8,)))}
    a, b = make_rig("saflex", val=clean, fresh_batches=fresh), make_rig("saflex", val=dirty, fresh_batches=fresh)
    with pytest.warns(RuntimeWarning):
        for i in range(5):
            assert a.step(i) == b.step(i)
    same(a.refiner.validation_direction, b.refiner.validation_direction)
    skipped = 3 if fresh is None else 1
    assert b.refiner.skipped_val_batches == skipped and b.refiner.stats["skipped_val_batches"] == skipped


@pytest.mark.parametrize("kind", ["saflex", "contrastive", "saflex-cached"])
def test_nan_soft_validation_targets_are_skipped(kind):
    batches = val_batches(n=3)
    soft = [(x, F.one_hot(y, C).float()) for x, y in batches]
    soft[1] = (soft[1][0], torch.full_like(soft[1][1], NAN))
    rig = make_rig(kind, val=PoisonableLoader(soft))
    with pytest.warns(RuntimeWarning):
        for i in range(3):
            rig.step(i)
    assert rig.refiner.skipped_val_batches >= 1
    assert all(torch.isfinite(p).all() for p in rig.model.parameters())


@pytest.mark.parametrize("bad", ["skip", "raise"])
@pytest.mark.parametrize("kind", ["saflex", "saflex-full", "autodo", "contrastive"])
def test_every_validation_batch_non_finite(kind, bad):
    def fault(rig):
        until_refresh(rig)
        return poisoned(rig, user_call(rig), poison={0, 1, 2})

    assert_rejected(kind, fault, NonFiniteError, prime=2, bad_val_batch=bad)


@pytest.mark.parametrize("kind", ["saflex", "saflex-full", "l2rw", "autodo", "influence"])
def test_validation_images_with_the_wrong_channel_count(kind):
    def fault(rig):
        until_refresh(rig)
        return poisoned(rig, user_call(rig), batches=val_batches(n=3, shape=(3, 6, 6)))

    e = assert_rejected(kind, fault, ShapeError, prime=2, match="validation batch")
    assert "channels" in e.fix


@pytest.mark.parametrize("kind", ["saflex", "contrastive"])
def test_validation_labels_out_of_range(kind):
    def fault(rig):
        until_refresh(rig)
        return poisoned(rig, user_call(rig), batches=[(x, torch.full_like(y, C + 3)) for x, y in rig.val.batches])

    assert_rejected(kind, fault, (TargetError, ClassCountMismatchError), prime=2)


@pytest.mark.parametrize("kind", ["saflex", "autodo", "contrastive", "influence"])
def test_keyboard_interrupt_in_the_validation_loader_mid_refresh(kind):
    """Interrupted mid-refresh, the retry equals an uninterrupted run (AutoDO keeps its pending
    augmentation record)."""
    def fault(rig):
        until_refresh(rig)
        return poisoned(rig, user_call(rig), interrupt_at=1)

    # a whole pass per refresh (the exact schedule), so that the interrupt falls inside the refresh
    assert_rejected(kind, fault, KeyboardInterrupt, prime=2, fresh_batches=None,
                    **({"val_batches": "all"} if kind == "autodo" else {}))


def test_keyboard_interrupt_in_a_window_refresh():
    """The same with the validation window (last-layer default): the interrupt hits its one fresh
    batch, and the window is left as it was."""
    def fault(rig):
        until_refresh(rig)
        return poisoned(rig, user_call(rig), interrupt_at=0)

    assert_rejected("saflex", fault, KeyboardInterrupt, prime=2)


def test_autodo_interrupted_after_augment_retries_like_an_uninterrupted_step():
    a, b = make_rig("autodo", val_batches="all"), make_rig("autodo", val_batches="all")
    for i in range(2):
        a.step(i), b.step(i)
    x, y, index = a.batch(5)
    torch.manual_seed(5)
    xa = a.refiner.augment(x, index)
    za = a.model(xa)
    a.val.interrupt_at = 1
    with pytest.raises(KeyboardInterrupt):
        a.refiner(za, y, index=index)
    # the user retries the loss on the same forward
    loss_a = a.refiner(za, y, index=index)
    torch.manual_seed(5)
    loss_b = b.refiner(b.model(b.refiner.augment(x, index)), y, index=index)
    assert torch.equal(loss_a, loss_b)
    same(a.refiner.state_dict(), b.refiner.state_dict())


@pytest.mark.parametrize("kind", ["saflex", "contrastive"])
def test_validation_batch_not_a_pair(kind):
    def fault(rig):
        until_refresh(rig)
        return poisoned(rig, user_call(rig), batches=[(x,) for x, _ in rig.val.batches])
    assert_rejected(kind, fault, ShapeError, prime=2)


# ----------------------------------------------------------------------------- construction
def _hooks(model, opt):
    """Forward hooks on the model; step hooks and an instance-level step wrapper on the optimizer."""
    fwd = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return fwd, len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks), "step" in vars(opt)


CONSTRUCTION_FAULTS = {
    "no-validation-loader": (dict(val_loader=None), EmptyValidationError),
    "unknown-method": (dict(method="nope"), ConfigurationError),
    "unknown-mode": (dict(mode="nope"), ConfigurationError),
    "bad-refresh": (dict(refresh_every=0), ConfigurationError),
    "bad-val-batches": (dict(val_batches=0), ConfigurationError),
    "bad-bn-mode": (dict(bn_mode="x"), ConfigurationError),
    "bad-bad-val-batch": (dict(bad_val_batch="ignore"), ConfigurationError),
    "bad-weight-norm": (dict(weight_norm="x"), ConfigurationError),
    "class-norm-with-autodo": (dict(method="autodo", weight_norm="class",
                                    method_options={"num_points": 4, "num_classes": C}), ConfigurationError),
    "adaptive-share-with-none": (dict(method="none", aug_weight="adaptive"), ConfigurationError),
    "negative-weights": (dict(orig_weight=-1.0), ConfigurationError),
    "bad-classifier-name": (dict(classifier="nope"), Exception),
    "bad-optimizer": (dict(optimizer=object()), ConfigurationError),
}


@pytest.mark.parametrize("fault", sorted(CONSTRUCTION_FAULTS))
def test_rejected_constructor_leaves_no_hooks(fault):
    kw, error = CONSTRUCTION_FAULTS[fault]
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hooks(model, opt)
    args = dict(optimizer=opt, val_loader=PoisonableLoader(val_batches()))
    args.update(kw)
    with pytest.raises(error):
        AugmentationRefiner(model, args.pop("optimizer"), args.pop("val_loader"), **refiner_kwargs(args))
    assert _hooks(model, opt) == before


def test_remove_hooks_removes_every_hook():
    rig = make_rig("saflex-full", isda=True)
    rig.refiner.remove_hooks()
    assert _hooks(rig.model, rig.opt)[0] == 0
    assert _hooks(rig.model, rig.opt)[1:] == (0, False)


# ----------------------------------------------------------------------------- dtypes
def test_autodo_on_a_float64_model():
    rig = make_rig("autodo", val=PoisonableLoader([(x.double(), y) for x, y in val_batches()]))
    rig.model.double()
    for i in range(3):
        x, y, index = rig.batch(i)
        loss = rig.refiner(rig.model(rig.refiner.augment(x.double(), index)), y, index=index)
        rig.opt.zero_grad()
        loss.backward()
        rig.opt.step()
    assert rig.refiner.policy.tables.hyper_steps.item() > 0
    assert all(torch.isfinite(p).all() for p in rig.model.parameters())
