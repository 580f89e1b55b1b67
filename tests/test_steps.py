"""Update counting: the refiner's step_count equals the real parameter updates, whatever calls the
optimizer's step (subclasses calling super().step(), wrappers, closures, failing hooks, skipped AMP
steps)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from augplug.steps import StepCounter

from fault_harness import make_rig


def _model():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _backward(model):
    model.zero_grad()
    model(torch.randn(4, 3)).pow(2).sum().backward()


class CountingSGD(torch.optim.SGD):
    """A subclass whose step calls the parent's: torch wraps both steps, so post-step hooks fire
    twice per update once any plain SGD exists in the process."""

    def step(self, closure=None):
        return super().step(closure)


def test_subclass_calling_super_step_counts_once():
    _ = torch.optim.SGD(_model().parameters(), lr=0.1)  # another instance of the parent class
    m = _model()
    opt = CountingSGD(m.parameters(), lr=0.1)
    posts = []
    opt.register_step_post_hook(lambda *a: posts.append(1))
    counter = StepCounter(opt)
    for _ in range(6):
        _backward(m)
        opt.step()
    assert len(posts) > 6  # the double firing is real
    assert counter.count == 6


def test_a_failing_post_step_hook_still_counts_the_update():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    counter = StepCounter(opt)

    def boom(*a):
        raise RuntimeError("user hook")

    h = opt.register_step_post_hook(boom)
    _backward(m)
    with pytest.raises(RuntimeError, match="user hook"):
        opt.step()
    h.remove()
    assert counter.count == 1
    _backward(m)
    opt.step()
    assert counter.count == 2


def test_a_step_that_fails_before_updating_does_not_count():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    counter = StepCounter(opt)

    def closure():
        raise ValueError("closure failed")

    _backward(m)
    with pytest.raises(ValueError):
        opt.step(closure)
    assert counter.count == 0 and counter.failed == 1   # a failed step, counted as such
    opt.step()  # the retry updates once
    assert counter.count == 1 and counter.failed == 1


def test_a_completed_step_counts_even_without_gradients():
    """A step call that returns is one update of the schedule, as torch's own step hooks see it."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    counter = StepCounter(opt)
    opt.step()
    assert counter.count == 1


def test_counter_after_an_lr_scheduler_raises_no_scheduler_warning():
    import warnings
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    counter = StepCounter(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            _backward(m)
            opt.step()
            sched.step()
    assert counter.count == 2 and sched.last_epoch == 2


def test_lr_scheduler_wraps_over_the_counter_and_remove_restores_step():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    counter = StepCounter(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    for _ in range(3):
        _backward(m)
        opt.step()
        sched.step()
    assert counter.count == 3
    plain = torch.optim.SGD(_model().parameters(), lr=0.1)
    c2 = StepCounter(plain)
    c2.remove()
    assert "step" not in vars(plain)
    counter.remove()  # wrapped since by the scheduler: the counter only stops
    _backward(m)
    opt.step()
    assert counter.count == 3


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
    lambda p: torch.optim.Adam(p, lr=0.1, foreach=False),
    lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    lambda p: torch.optim.RMSprop(p, lr=0.01),
], ids=["adam-foreach", "adam-loop", "adamw-fused", "sgd-foreach", "rmsprop"])
def test_every_update_kernel_is_seen(make):
    m = _model()
    opt = make(m.parameters())
    counter = StepCounter(opt)
    for _ in range(4):
        _backward(m)
        opt.step()
    assert counter.count == 4


def test_skipped_amp_steps_are_not_counted():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    counter = StepCounter(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    taken = 0
    for i in range(5):
        m.zero_grad()
        x = torch.randn(4, 3)
        if i in (1, 3):
            x[0, 0] = float("inf")  # inf gradients: the scaler skips this step
        scaler.scale(m(x).pow(2).sum()).backward()
        before = m.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        taken += int(not torch.equal(before, m.weight))
    assert taken == 3 and counter.count == 3


def test_closure_optimizer_calling_the_refiner_inside_step():
    rig = make_rig("saflex", optimizer=lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3))
    seen = []
    for i in range(3):
        x, y, _ = rig.batch(i)

        def closure():
            rig.opt.zero_grad()
            loss = rig.refiner(rig.model(x), y, num_original=2)
            seen.append(rig.refiner.step_count)
            loss.backward()
            return loss

        rig.opt.step(closure)
    assert rig.refiner.step_count == 3
    # inside step i the refiner sees the i updates completed before it
    assert seen[0] == 0 and seen[-1] == 2 and sorted(seen) == seen


def test_timm_lookahead_counts_base_updates():
    from timm.optim import Lookahead
    rig = make_rig("saflex", optimizer=lambda p: Lookahead(torch.optim.SGD(p, lr=0.1), k=2))
    for i in range(5):
        rig.step(i)
    assert rig.refiner.step_count == 5


def test_accelerate_wrapped_optimizer_with_gradient_accumulation():
    from accelerate import Accelerator
    rig = make_rig("saflex")
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = acc.prepare(rig.model, rig.opt)
    updates = 0
    for i in range(6):
        with acc.accumulate(model):
            x, y, _ = rig.batch(i)
            loss = rig.refiner(model(x), y, num_original=2)
            acc.backward(loss)
            before = rig.model.fc.weight.detach().clone()
            opt.step()
            opt.zero_grad()
            updates += int(not torch.equal(before, rig.model.fc.weight))
    assert updates == 3 and rig.refiner.step_count == 3


def test_refiner_without_optimizer_counts_calls():
    rig = make_rig("saflex", optimizer=None)
    rig.refiner._steps = None  # built with an optimizer by the rig; count calls instead
    start = rig.refiner.step_count
    x, y, _ = rig.batch(0)
    rig.refiner(rig.model(x), y)
    assert rig.refiner.step_count == start + 1


def test_resume_mid_run_restores_the_count():
    rig = make_rig("saflex")
    for i in range(3):
        rig.step(i)
    state = rig.refiner.state_dict()
    other = make_rig("saflex")
    other.refiner.load_state_dict(state)
    assert other.refiner.step_count == 3
    other.step(3)
    assert other.refiner.step_count == 4


# ---------------------------------------------------------------------------------- a replaced optimizer
def _refiner_rig():
    from torch.utils.data import DataLoader, TensorDataset

    from augplug import AugmentationRefiner
    from augplug.models import MLP
    torch.manual_seed(0)
    model = MLP(8, 3, hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    val = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=16)
    refiner = AugmentationRefiner(model, opt, val, seed=0, schedule=dict(budget=None))
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    return model, opt, refiner, batch


def _steps(model, opt, refiner, batch, n, accumulate=1):
    x, y = batch
    for i in range(n * accumulate):
        (refiner(model(x), y, num_original=8) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()


def test_a_replaced_optimizer_is_noticed_and_its_updates_counted():
    """A run that builds a new optimizer and keeps the refiner: its updates were never counted, so the
    validation direction was never refreshed again. Three calls in a row that find the model updated
    without a counted step now count such updates, and one warning names set_optimizer."""
    model, opt, refiner, batch = _refiner_rig()
    _steps(model, opt, refiner, batch, 5)
    assert refiner.step_count == 5
    second = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match=r"refiner\.set_optimizer") as record:
        _steps(model, second, refiner, batch, 20)
    assert sum("set_optimizer" in str(w.message) for w in record) == 1
    assert refiner.step_count >= 5 + 20 - 3   # all but the first uncounted updates
    assert refiner._v_step > 5                # and the direction is refreshed again


def test_set_optimizer_counts_the_new_one_exactly():
    model, opt, refiner, batch = _refiner_rig()
    _steps(model, opt, refiner, batch, 5)
    second = torch.optim.SGD(model.parameters(), lr=0.01)
    refiner.set_optimizer(second)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # no warning
        _steps(model, second, refiner, batch, 20)
    assert refiner.step_count == 25 and refiner.optimizer is second
    opt.step()                             # the old one is no longer counted, and has its own step back
    assert refiner.step_count == 25 and "step" not in vars(opt)


def test_set_optimizer_rejects_a_foreign_optimizer_and_changes_nothing():
    from augplug.errors import ConfigurationError
    model, opt, refiner, batch = _refiner_rig()
    _steps(model, opt, refiner, batch, 3)
    with pytest.raises(ConfigurationError, match="none of the model"):
        refiner.set_optimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    assert refiner.optimizer is opt
    _steps(model, opt, refiner, batch, 2)
    assert refiner.step_count == 5


@pytest.mark.parametrize("between", ["accumulation", "checkpoint load"])
def test_no_false_alarm(between):
    """Gradient accumulation (calls without updates) and a one-off weight load between two steps are
    not a replaced optimizer: no warning, and the count stays the optimizer's."""
    import copy
    import warnings
    model, opt, refiner, batch = _refiner_rig()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if between == "accumulation":
            _steps(model, opt, refiner, batch, 10, accumulate=4)
        else:
            saved = copy.deepcopy(model.state_dict())
            _steps(model, opt, refiner, batch, 4)
            model.load_state_dict(saved)
            _steps(model, opt, refiner, batch, 6)
    assert refiner.step_count == 10


def test_a_closure_driven_optimizer_is_not_a_replaced_one():
    """LBFGS evaluates its closure, and so calls the refiner, several times inside one step, with
    updates of its own between them: those calls are not a replaced optimizer (before: the warning
    naming set_optimizer, and every closure call counted as a step). The count is the steps taken."""
    import warnings
    torch.manual_seed(0)
    model, _, refiner, (x, y) = _refiner_rig()
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5)
    refiner.set_optimizer(lbfgs)
    calls = []

    def closure():
        lbfgs.zero_grad()
        loss = refiner(model(x), y, num_original=8)
        loss.backward()
        calls.append(1)
        return loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            lbfgs.step(closure)
    assert len(calls) > 3 * 4 and refiner.step_count == 4
