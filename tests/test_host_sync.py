"""A refiner call reads one value back to the host (the input check), so on a GPU the training loop
waits for the device once per call, not once per diagnostic; ``refiner.stats`` summaries are computed
only when read."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.finite import nonfinite
from augplug.methods.saflex import SAFLEX_PAPER
from augplug.stats import StepStats
from augplug.refiner import refiner_kwargs

# tensor methods that copy values to the host (a device sync on CUDA)
_HOST_READS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero", "numpy"}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _setup(device="cpu", **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    val = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 4, (32,))), batch_size=16)
    return net, opt, AugmentationRefiner(net, opt, val, **refiner_kwargs(kw, refresh_every=4))


@pytest.mark.parametrize("kw", [{}, {"mode": "full"}, {"method": "l2rw"}, {"method": "none"},
                                {"weight_norm": "batch"}, dict(SAFLEX_PAPER), {"aug_weight": "adaptive"}],
                         ids=["default", "full", "l2rw", "none", "batch-norm", "paper", "adaptive-share"])
@pytest.mark.parametrize("targets", ["indices", "soft"])
@pytest.mark.parametrize("num_original", [4, 0], ids=["with-originals", "augmented-only"])
def test_one_host_read_per_call_between_refreshes(kw, targets, num_original):
    net, opt, refiner = _setup(**kw)
    for i in range(6):
        x = torch.randn(12, 8)
        y = torch.randint(0, 4, (12,))
        if targets == "soft":
            y = torch.softmax(torch.randn(12, 4), -1)
        opt.zero_grad()
        with HostReads() as reads:
            loss = refiner(net(x), y, num_original=num_original)
        loss.backward()
        opt.step()
        if not refiner.stats["refreshed"]:
            assert reads.names == ["__bool__"], (i, reads.names)


def test_nonfinite_reads_once_per_device():
    """The finiteness check of a refresh's direction (one tensor per parameter) waits for the device
    once, not once per tensor."""
    tensors = [torch.randn(3, 4), torch.randn(4), {"b": [torch.randn(2)]}, torch.arange(5)]
    with HostReads() as reads:
        assert not nonfinite(*tensors)
    assert reads.names == ["__bool__"]
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [t.clone() for t in tensors[:2]]
        broken[1][2] = bad
        with HostReads() as reads:
            assert nonfinite(tensors[0], broken, torch.arange(3))
        assert reads.names == ["__bool__"]
    assert not nonfinite() and not nonfinite(torch.arange(3)) and not nonfinite([torch.empty(0)])


class Order(TorchFunctionMode):
    """Appends "read" to ``events`` at every host read of a tensor."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _HOST_READS:
            self.events.append("read")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [{}, {"mode": "full"}, {"aug_weight": "adaptive"}], ids=["default", "full", "share"])
def test_between_refreshes_the_value_check_waits_until_the_work_is_queued(kw):
    """On a GPU the call's one sync should come after its work is queued (so the work waits behind
    the training forward, not the host): between refreshes the check is read after the policy ran.
    A refresh call checks first, before it reads the user's validation loader."""
    net, opt, refiner = _setup(**kw)
    events = []
    refine = refiner.policy.refine

    def traced(ctx):
        events.append("refine")
        return refine(ctx)

    refiner.policy.refine = traced
    for i in range(6):
        events.clear()
        x, y = torch.randn(12, 8), torch.randint(0, 4, (12,))
        logits = net(x)
        with Order(events):
            loss = refiner(logits, y, num_original=4)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if refiner.stats["refreshed"]:
            assert events[:2] == ["read", "refine"], (i, events)
        else:
            assert events == ["refine", "read"], (i, events)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device asserts exist only on CUDA")
@pytest.mark.parametrize("bad", [4, -1, 1000])
def test_cuda_out_of_range_label_between_refreshes(bad):
    """An out-of-range label on a call that checks its values at the end is used clamped until
    then: the call raises the TargetError naming it, and CUDA stays usable (no device assert)."""
    from augplug.errors import TargetError

    net, opt, refiner = _setup("cuda")
    x = torch.randn(12, 8, device="cuda")
    y = torch.randint(0, 4, (12,), device="cuda")
    refiner(net(x), y, num_original=4).backward()   # refreshes; the next call does not
    assert not refiner.direction_is_due()
    with pytest.raises(TargetError, match="labels in"):
        refiner(net(x), torch.where(torch.arange(12, device="cuda") == 5, bad, y), num_original=4)
    loss = refiner(net(x), y, num_original=4)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


def test_stats_summaries_are_lazy_and_computed_once():
    calls = []

    def summaries():
        calls.append(1)
        return {"weight_mean": 1.0, "val_loss": 2.0}

    st = StepStats({"weights": torch.ones(3), "step": 7}, summaries, summary_keys=("weight_mean", "val_loss"))
    assert st["step"] == 7 and not calls
    assert list(st) == ["weights", "step", "weight_mean", "val_loss"] and len(st) == 4
    assert st["weight_mean"] == 1.0 and st.get("val_loss") == 2.0 and len(calls) == 1
    assert dict(st)["val_loss"] == 2.0 and len(calls) == 1
    with pytest.raises(KeyError):
        st["nope"]
    assert "weight_mean" in st and "nope" not in st


def test_refiner_stats_values_match_the_batch():
    net, opt, refiner = _setup()
    x, y = torch.randn(12, 8), torch.randint(0, 4, (12,))
    refiner(net(x), y, num_original=4).backward()
    st = refiner.stats
    w = st["weights"][4:]
    assert st["weight_mean"] == pytest.approx(float(w.mean()))
    assert st["kept_fraction"] == pytest.approx(float((w > 0).float().mean()))
    assert isinstance(st["val_loss"], float) and st["val_loss"] > 0
    assert {"weights", "soft_targets", "scores", "augmented", "active", "refreshed", "step", "weight_mean",
            "weight_std", "kept_fraction", "relabel_rate", "agreement_mean", "val_loss"} <= set(st)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device syncs exist only on CUDA")
@pytest.mark.parametrize("mode", ["last_layer", "full"])
@pytest.mark.parametrize("num_original", [4, 0], ids=["with-originals", "augmented-only"])
def test_cuda_one_sync_per_call(mode, num_original):
    net, opt, refiner = _setup("cuda", mode=mode)
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(8):
            x, y = torch.randn(12, 8, device="cuda"), torch.randint(0, 4, (12,), device="cuda")
            opt.zero_grad()
            logits = net(x)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = refiner(logits, y, num_original=num_original)
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # a call waits for the device once (its input check); a refresh call (every 4th) once more, to
    # check the new validation direction before using it. The validation batches are checked on
    # the host before they are copied. Without originals the default refines nothing (strength
    # "auto"), so it never refreshes.
    assert counts == ([2, 1, 1, 1] * 2 if num_original else [1] * 8), counts


def test_autodo_diagnostics_are_read_only_on_demand():
    torch.manual_seed(0)
    n = 64
    x, y = torch.randn(n, 8), torch.randint(0, 4, (n,))
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    val = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 4, (32,))), batch_size=16)
    r = AugmentationRefiner(net, opt, val, method="autodo",
                            method_options=dict(num_points=n, num_classes=4, models='WS', every=1),
                            schedule=dict(refresh_every=4))
    counts = []
    for i in range(4):
        idx = torch.arange(i * 16, (i + 1) * 16)
        with HostReads() as reads:
            loss = r(net(x[idx]), y[idx], index=idx)
        counts.append(len(reads.names))
        opt.zero_grad()
        loss.backward()
        opt.step()
    st = r.policy.last_stats
    assert st["hyper_step"]
    with HostReads() as reads:
        assert st["hyper_steps"] == 4 and 0 < st["weight_mean"] and st["hypergrad_norm_W"] >= 0
    assert reads.names  # the summaries were read back now, not during the calls
    # index checks and the lazy table updates still read a few values; 15 diagnostics no longer
    assert max(counts[1:]) <= 10, counts
