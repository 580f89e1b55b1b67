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
    # refresh calls also read the validation labels, which are checked on the host before the copy
    assert counts == [1] * 8, counts


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
