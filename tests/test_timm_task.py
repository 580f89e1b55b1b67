"""augplug.integrations.timm_task: timm's ClassificationTask with the refiner as its loss, trained
a few steps with Mixup soft targets, and its state through timm's own checkpoint helpers."""
import copy
import importlib
import io
import logging
import sys

import numpy as np
import pytest
import torch

import augplug

pytest.importorskip("timm.task")
import timm  # noqa: E402
from timm.data import Mixup  # noqa: E402
from fault_harness import same

timm_task = importlib.import_module("augplug.integrations.timm_task")
RefinedClassificationTask = timm_task.RefinedClassificationTask
CPU = torch.device("cpu")
NEW_TASK_API = hasattr(timm.task.TrainingTask, "get_task_state")   # timm >= 1.0.27
needs_task_state = pytest.mark.skipif(not NEW_TASK_API, reason="timm < 1.0.27: no task-state checkpoints")


def _val():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 4) for _ in range(2)]


def _setup(seed=0, **refiner_kw):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # the one refiner construction of this file; strength=1: refine these rows although no originals
    # are in the batch, so the weights are not all 1
    refiner = augplug.AugmentationRefiner(model, opt, _val(), method=augplug.SAflex(strength=1.0), seed=seed,
                                          schedule=augplug.Schedule(budget=None),  # exact resume needs the exact schedule
                                          **refiner_kw)
    return model, opt, refiner


def _batches(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    np.random.seed(seed)   # timm's Mixup draws from NumPy's global generator
    return [mixup(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _step(task, opt, x, y):
    loss = task(x, y)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _train(task, opt, batches):
    return [_step(task, opt, x, y) for x, y in batches]


def test_mixup_soft_targets_train_with_the_refiners_loss():
    """Four updates on Mixup/CutMix soft targets: the task's loss is the refiner's, step for step,
    and the two models end bit-identical."""
    batches = _batches()
    assert batches[0][1].shape == (8, 4) and not torch.equal(batches[0][1].max(1).values, torch.ones(8))
    model, opt, refiner = _setup()
    task = RefinedClassificationTask(model, refiner, device=CPU, verbose=False)
    twin = _setup()
    for x, y in batches:
        out = task(x, y)
        assert set(out) == {"loss", "output"} and out["output"].shape == (8, 4)
        task_loss = out["loss"]
        direct = twin[2](twin[0](x), y)
        assert torch.equal(task_loss.detach(), direct.detach())
        assert torch.equal(refiner.stats["weights"], twin[2].stats["weights"])
        assert torch.equal(refiner.stats["soft_targets"], twin[2].stats["soft_targets"])
        for o, loss in ((opt, task_loss), (twin[1], direct)):
            o.zero_grad()
            loss.backward()
            o.step()
    assert not torch.allclose(refiner.stats["weights"], torch.ones(8))       # the refiner did weight the rows
    assert refiner.step_count == 4
    for (k, p), q in zip(model.state_dict().items(), twin[0].state_dict().values()):
        assert torch.equal(p, q), k


def test_loss_is_not_a_plain_soft_target_cross_entropy():
    """Control for the test above: the refined loss differs from timm's SoftTargetCrossEntropy."""
    from timm.loss import SoftTargetCrossEntropy

    (x, y), = _batches(1)
    model, _, refiner = _setup()
    task = RefinedClassificationTask(model, refiner, device=CPU, verbose=False)
    out = task(x, y)
    assert not torch.allclose(out["loss"], SoftTargetCrossEntropy()(out["output"], y))


def _saved(obj):
    """``obj`` through torch.save / torch.load(weights_only=True), as a checkpoint file holds it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_refiner_state(a, b):
    same(a.state_dict(), b.state_dict())


def test_state_dict_round_trips_the_refiner():
    """``task.state_dict()`` holds the refiner's state; loading it into a fresh task continues identically."""
    batches = _batches(6)
    model, opt, refiner = _setup()
    task = RefinedClassificationTask(model, refiner, device=CPU, verbose=False)
    _train(task, opt, batches[:3])
    sd, opt_state = _saved(task.state_dict()), _saved(opt.state_dict())
    assert "_extra_state" in sd and sd["_extra_state"]["refiner"]["step_count"] == 3

    model2, opt2, refiner2 = _setup(seed=5)          # other initial weights and refiner seed
    task2 = RefinedClassificationTask(model2, refiner2, device=CPU, verbose=False)
    task2.load_state_dict(sd)
    opt2.load_state_dict(opt_state)
    _same_refiner_state(refiner, refiner2)
    assert _train(task, opt, batches[3:]) == _train(task2, opt2, batches[3:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@needs_task_state
def test_checkpoint_saver_and_resume_carry_the_refiner(tmp_path):
    """timm's CheckpointSaver(task=task) writes the refiner under 'task_state' (not into the EMA's);
    resume_task_checkpoint restores it: the resumed task continues exactly like the original."""
    from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
    from timm.utils import CheckpointSaver

    batches = _batches(6)
    model, opt, refiner = _setup()
    task = RefinedClassificationTask(model, refiner, device=CPU, verbose=False)
    task.setup_ema(decay=0.5)
    for x, y in batches[:3]:
        _step(task, opt, x, y)
        task.update_ema()
    saver = CheckpointSaver(model, opt, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task)
    saver.save_checkpoint(epoch=0)
    ckpt = torch.load(tmp_path / "last.pth.tar", weights_only=True)
    assert ckpt["task_state"]["refiner"]["step_count"] == 3 and "task_state_ema" not in ckpt
    assert "state_dict_ema" in ckpt

    model2, opt2, refiner2 = _setup(seed=5)
    task2 = RefinedClassificationTask(model2, refiner2, device=CPU, verbose=False)
    task2.setup_ema(decay=0.5)
    assert resume_task_checkpoint(task2, str(tmp_path / "last.pth.tar"), optimizer=opt2, log_info=False) == 1
    load_task_ema_checkpoint(task2, str(tmp_path / "last.pth.tar"))
    _same_refiner_state(refiner, refiner2)
    for p, q in zip(task.get_trainable_module(ema=True).parameters(), task2.get_trainable_module(ema=True).parameters()):
        assert torch.equal(p, q)
    assert _train(task, opt, batches[3:]) == _train(task2, opt2, batches[3:])
    _same_refiner_state(refiner, refiner2)


@needs_task_state
def test_dropping_the_refiner_state_changes_the_continuation(tmp_path, caplog):
    """Control: a checkpoint without the refiner's state resumes with a fresh refiner (warned), and
    the continuation differs, so the test above can fail."""
    from timm.task import resume_task_checkpoint
    from timm.utils import CheckpointSaver

    batches = _batches(6)
    model, opt, refiner = _setup()
    task = RefinedClassificationTask(model, refiner, device=CPU, verbose=False)
    _train(task, opt, batches[:3])
    CheckpointSaver(model, opt, checkpoint_dir=str(tmp_path), task=task).save_checkpoint(epoch=0)
    ckpt = torch.load(tmp_path / "last.pth.tar", weights_only=True)
    del ckpt["task_state"]
    torch.save(ckpt, tmp_path / "no_refiner.pth.tar")
    model2, opt2, refiner2 = _setup()
    task2 = RefinedClassificationTask(model2, refiner2, device=CPU, verbose=False)
    with caplog.at_level(logging.WARNING):
        resume_task_checkpoint(task2, str(tmp_path / "no_refiner.pth.tar"), optimizer=opt2, log_info=False)
    assert "no refiner state" in caplog.text
    assert refiner2.step_count == 0
    assert _train(task, opt, batches[3:]) != _train(task2, opt2, batches[3:])


def test_stateful_objects_are_checkpointed_with_the_refiner():
    from augplug.report import AugmentationAudit

    model, _, refiner = _setup()
    audit = AugmentationAudit(num_classes=4)
    task = RefinedClassificationTask(model, refiner, stateful={"audit": audit}, device=CPU, verbose=False)
    (x, y), = _batches(1)
    task(x, y)
    audit.update(refiner.stats, ["op"] * 8, y)
    state = task.get_task_state()
    assert set(state) == {"refiner", "audit"} and task.get_task_state(ema=True) == {}
    model2, _, refiner2 = _setup()
    audit2 = AugmentationAudit(num_classes=4)
    task2 = RefinedClassificationTask(model2, refiner2, stateful={"audit": audit2}, device=CPU, verbose=False)
    task2.load_task_state(state)
    assert audit2.state_dict() == audit.state_dict() and audit2.updates == 1
    with pytest.raises(augplug.ConfigurationError, match="lacks"):
        task2.load_task_state({"refiner": state["refiner"]})
    task2.load_task_state({"refiner": state["refiner"]}, strict=False)
    with pytest.raises(augplug.ConfigurationError, match="state_dict"):
        RefinedClassificationTask(model2, refiner2, stateful={"audit": object()}, verbose=False)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained_task_with_audit(num_classes=4):
    """A task with an audit over ``num_classes`` classes, three updates in (refiner step_count 3)."""
    from augplug.report import AugmentationAudit

    model, opt, refiner = _setup()
    audit = AugmentationAudit(num_classes=num_classes)
    task = RefinedClassificationTask(model, refiner, stateful={"audit": audit}, device=CPU, verbose=False)
    for x, y in _batches(3):
        _step(task, opt, x, y)
        audit.update(refiner.stats, ["op"] * 8, y)
    return task


def test_a_refused_stateful_part_changes_nothing():
    """An audit state over 4 classes into an audit over 5 is refused, and neither the refiner (which
    comes first in the state) nor the model moved: through load_task_state and task.load_state_dict."""
    from augplug.report import AugmentationAudit

    task = _trained_task_with_audit()
    state, sd = task.get_task_state(), task.state_dict()
    assert state["refiner"]["step_count"] == 3
    for load in ("load_task_state", "load_state_dict"):
        model2, _, refiner2 = _setup(seed=5)
        audit2 = AugmentationAudit(num_classes=5)
        task2 = RefinedClassificationTask(model2, refiner2, stateful={"audit": audit2}, device=CPU, verbose=False)
        before, weights = refiner2.state_dict(), _weights(model2)
        with pytest.raises(augplug.ShapeError, match="5"):
            task2.load_task_state(state) if load == "load_task_state" else task2.load_state_dict(sd)
        assert refiner2.step_count == 0, load
        same(refiner2.state_dict(), before)
        assert audit2.updates == 0 and audit2.num_classes == 5
        same(_weights(model2), weights)


def test_load_state_dict_passes_strict_to_the_task_state():
    """A task state without the audit part: refused by task.load_state_dict (nothing loaded), loaded
    without it under strict=False (the audit keeps its state), as load_task_state does."""
    from augplug.report import AugmentationAudit

    sd = _trained_task_with_audit().state_dict()
    sd["_extra_state"] = {"refiner": sd["_extra_state"]["refiner"]}
    model2, _, refiner2 = _setup(seed=5)
    task2 = RefinedClassificationTask(model2, refiner2, stateful={"audit": AugmentationAudit(num_classes=4)},
                                      device=CPU, verbose=False)
    with pytest.raises(augplug.ConfigurationError, match="lacks"):
        task2.load_state_dict(sd)
    assert refiner2.step_count == 0
    task2.load_state_dict(sd, strict=False)
    assert refiner2.step_count == 3 and task2.stateful["audit"].updates == 0


class _Counter:
    """A stateful object without a check method (its load_state_dict is all it has)."""

    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_a_refused_refiner_state_puts_back_the_parts_loaded_before_it():
    """A stateful object that cannot be checked is loaded before the refiner; when the refiner then
    refuses its state (here ISDA statistics it does not keep), that object gets its old state back."""
    model, _, refiner = _setup(isda={"lambda0": 0.5})
    counter = _Counter(7)
    task = RefinedClassificationTask(model, refiner, stateful={"counter": counter}, device=CPU, verbose=False)
    model2, _, refiner2 = _setup(seed=5)                       # no ISDA: refuses the state's ISDA part
    counter2 = _Counter(1)
    task2 = RefinedClassificationTask(model2, refiner2, stateful={"counter": counter2}, device=CPU, verbose=False)
    before = refiner2.state_dict()
    with pytest.raises(augplug.ConfigurationError, match="isda"):
        task2.load_task_state(task.get_task_state())
    assert counter2.n == 1
    same(refiner2.state_dict(), before)
    task2.load_task_state({"refiner": refiner2.state_dict(), "counter": {"n": 9}})   # a fitting one loads
    assert counter2.n == 9


def test_a_plain_classification_task_state_dict_loads_with_a_fresh_refiner(caplog):
    """docs/timm.md: a state without task state (a plain ClassificationTask's) loads the weights and
    keeps the refiner as built, with a warning, strict or not; a missing weight is still an error."""
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import ClassificationTask

    model, _, _ = _setup()
    sd = ClassificationTask(model, criterion=SoftTargetCrossEntropy(), verbose=False).state_dict()
    assert "_extra_state" not in sd
    for strict in (True, False):
        model2, _, refiner2 = _setup(seed=5)
        task2 = RefinedClassificationTask(model2, refiner2, device=CPU, verbose=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=timm_task.__name__):
            task2.load_state_dict(sd, strict=strict)
        assert "no refiner state" in caplog.text, strict
        same(_weights(model2), _weights(model))
        assert refiner2.step_count == 0
    model3, _, refiner3 = _setup(seed=5)
    task3 = RefinedClassificationTask(model3, refiner3, device=CPU, verbose=False)
    lacking = {k: v for k, v in sd.items() if not k.endswith("fc.bias")}
    with pytest.raises(RuntimeError, match="fc.bias"):
        task3.load_state_dict(lacking)


@needs_task_state
def test_a_refused_checkpoint_leaves_the_model_as_it_was(tmp_path):
    """resume_task_checkpoint of a checkpoint whose refiner state this refiner refuses (it keeps ISDA
    statistics, the checkpoint has none): refused before the model's weights are loaded."""
    from timm.task import resume_task_checkpoint
    from timm.utils import CheckpointSaver

    model, opt, refiner = _setup()
    task = RefinedClassificationTask(model, refiner, device=CPU, verbose=False)
    _train(task, opt, _batches(3))
    CheckpointSaver(model, opt, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task).save_checkpoint(epoch=0)
    model2, opt2, refiner2 = _setup(seed=5, isda={"lambda0": 0.5})
    task2 = RefinedClassificationTask(model2, refiner2, device=CPU, verbose=False)
    weights, opt_state = _weights(model2), copy.deepcopy(opt2.state_dict())
    with pytest.raises(augplug.ConfigurationError, match="isda"):
        resume_task_checkpoint(task2, str(tmp_path / "last.pth.tar"), optimizer=opt2, log_info=False)
    same(_weights(model2), weights)
    assert not torch.equal(weights["fc.weight"], model.fc.weight)    # the checkpoint's weights do differ
    same(opt2.state_dict(), opt_state)
    assert refiner2.step_count == 0


def test_refiner_of_another_model_or_a_plain_loss_is_refused():
    model, _, refiner = _setup()
    other = timm.create_model("test_resnet", num_classes=4)
    with pytest.raises(augplug.ConfigurationError, match="different model"):
        RefinedClassificationTask(other, refiner, verbose=False)
    with pytest.raises(augplug.ConfigurationError, match="ClassificationTask"):
        RefinedClassificationTask(model, torch.nn.CrossEntropyLoss(), verbose=False)


def test_compiled_model_is_the_refiners_model():
    """torch.compile wraps the model (``_orig_mod``); the task accepts it and trains through it."""
    model, _, refiner = _setup()
    compiled = torch.compile(model, backend="eager")
    task = RefinedClassificationTask(compiled, refiner, device=CPU, verbose=False)
    (x, y), = _batches(1)
    twin = _setup()
    torch.testing.assert_close(task(x, y)["loss"], twin[2](twin[0](x), y))


def test_old_timm_fails_with_a_fix(monkeypatch):
    """Without ``timm.task`` (timm < 1.0.23) the import fails with the version to install."""
    monkeypatch.setitem(sys.modules, "timm.task", None)          # makes `from timm.task import ...` fail
    monkeypatch.delitem(sys.modules, "augplug.integrations.timm_task")
    with pytest.raises(ImportError) as info:
        importlib.import_module("augplug.integrations.timm_task")
    assert isinstance(info.value, augplug.ConfigurationError)
    assert "1.0.23" in info.value.problem and 'pip install -U "timm>=1.0.23"' in info.value.fix
