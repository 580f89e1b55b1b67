"""Accelerate integration: the launched script (2 processes), gradient accumulation, mixed precision,
scaler-skipped steps and checkpointing through ``accelerator.save_state`` / ``load_state``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from augplug import AugmentationRefiner

ROOT = Path(__file__).resolve().parents[1]


def _accelerator(**kw):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, **kw)


def _problem(seed=0, n=48, d=6, c=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, c))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, d), torch.randint(0, c, (20,))),
                                      batch_size=10, shuffle=True)
    return model, opt, x, y, val


def test_launched_script_two_processes(tmp_path):
    # CPU processes (gloo) also on a machine with a GPU: hide it, or rank 1 reaches for a second device
    env = dict(os.environ, ACCELERATE_USE_CPU="true", NO_ALBUMENTATIONS_UPDATE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(ROOT / "integrations" / "accelerate_train.py"), "--epochs", "1", "--max-steps", "3", "--grad-accum", "2",
           "--output", str(tmp_path), "--save-state"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_processes"] == 2
    assert "accelerate_train: world size 2" in proc.stdout and res["world_size_warning"] is None
    assert res["refiner_updates"] == 3          # real optimizer updates
    assert res["refiner_calls"] == 6            # micro-batches: 2 per update
    ckpt = tmp_path / "checkpoint"
    assert any(p.name.startswith("custom_checkpoint") for p in ckpt.iterdir())


def test_gradient_accumulation_counts_real_updates_only():
    acc = _accelerator(gradient_accumulation_steps=3)
    model, opt, x, y, val = _problem()
    model, opt = acc.prepare(model, opt)
    refiner = AugmentationRefiner(model, opt, val, accelerator=acc, method_options=dict(strength=1.0),
                                  schedule=dict(refresh_every=1))
    refreshes = []
    for i in range(9):
        with acc.accumulate(model):
            rows = slice(4 * i, 4 * i + 4)
            loss = refiner(model(x[rows]), y[rows])
            refreshes.append(refiner.stats["refreshed"])
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
    assert refiner.calls == 9
    assert refiner.step_count == 3
    # refresh_every=1 update: the direction is recomputed once per real update, on its first micro-batch
    assert refreshes == [True, False, False] * 3


def _weights(dtype):
    model, opt, x, y, val = _problem(seed=1)
    refiner = AugmentationRefiner(model, opt, val, method_options=dict(strength=1.0),
                                  schedule=dict(refresh_every=1))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(x[:16])
        loss = refiner(logits, y[:16], num_original=4)
    assert loss.dtype == torch.float32 or dtype != torch.float32
    return refiner.stats


def test_bf16_autocast_weights_match_fp32():
    s32, s16 = _weights(torch.float32), _weights(torch.bfloat16)
    assert s16["weights"].dtype == torch.float32 and s16["scores"].dtype == torch.float32
    assert float((s32["weights"] - 1).abs().max()) > 0.05       # non-trivial weights
    torch.testing.assert_close(s16["weights"], s32["weights"], atol=0.03, rtol=0.03)
    # the scores themselves agree to bf16 precision
    rel = (s16["scores"] - s32["scores"]).norm() / s32["scores"].norm()
    assert float(rel) < 0.03


def test_scaler_skipped_step_does_not_advance_refinement():
    model, opt, x, y, val = _problem(seed=2)
    refiner = AugmentationRefiner(model, opt, val, method_options=dict(strength=1.0),
                                  schedule=dict(refresh_every=1))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    loss = refiner(model(x[:8]), y[:8])
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert refiner.step_count == 1
    loss = refiner(model(x[8:16]), y[8:16])
    assert refiner.stats["refreshed"]
    scaler.scale(loss).backward()
    next(model.parameters()).grad.fill_(float("inf"))   # overflow: the scaler skips this update
    scaler.step(opt)
    scaler.update()
    assert refiner.step_count == 1
    refiner(model(x[16:24]), y[16:24])
    assert not refiner.stats["refreshed"]                 # no real update happened since the refresh


def _run_with_checkpoint(tmp_path, save_at=None, load=None, steps=6):
    acc = _accelerator()
    model, opt, x, y, val = _problem(seed=3)
    model, opt = acc.prepare(model, opt)
    refiner = AugmentationRefiner(model, opt, val, accelerator=acc, seed=5, schedule=dict(refresh_every=2))
    start = 0
    if load is not None:
        acc.load_state(load)
        start = refiner.step_count
    losses = []
    for i in range(start, steps):
        loss = refiner(model(x[6 * i: 6 * i + 6]), y[6 * i: 6 * i + 6], num_original=2)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if save_at is not None and i + 1 == save_at:
            acc.save_state(str(tmp_path / "ckpt"))
    return losses


def test_accelerate_save_and_load_state_resumes_exactly(tmp_path):
    full = _run_with_checkpoint(tmp_path, save_at=3)
    resumed = _run_with_checkpoint(tmp_path, load=str(tmp_path / "ckpt"))
    assert resumed == full[3:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs CUDA")
def test_fp16_cuda_weights_match_fp32():
    model, opt, x, y, val = _problem(seed=1)
    model = model.cuda()
    val = [(a.cuda(), b.cuda()) for a, b in val]
    out = {}
    for dtype in (torch.float32, torch.float16):
        refiner = AugmentationRefiner(model, opt, val, method_options=dict(strength=1.0),
                                      schedule=dict(refresh_every=1))
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            refiner(model(x[:16].cuda()), y[:16].cuda(), num_original=4)
        out[dtype] = refiner.stats["weights"].cpu()
    torch.testing.assert_close(out[torch.float16], out[torch.float32], atol=0.02, rtol=0.02)


def test_example_logs_what_the_refinement_decided_through_accelerate_trackers(tmp_path):
    """The example's per-epoch rows go to accelerator.log: here a recording tracker stands for
    TensorBoard / W&B; the rows carry the weights' spread, the share, the strength and the refresh
    interval, not the weights' mean (1 by construction)."""
    from accelerate.tracking import GeneralTracker

    from augplug.integrations.accelerate_train import main

    class Recording(GeneralTracker):
        name = "recording"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logged, self.config = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    _accelerator()   # reset any state an earlier test left
    rec = Recording()
    res = main(["--epochs", "2", "--no-progress", "--cpu", "--output", str(tmp_path)], trackers=[rec])
    assert rec.config is not None and rec.config["refiner"] == "saflex"
    assert [s for s, _ in rec.logged] == [0, 1]
    row = rec.logged[-1][1]
    for key in ("test_acc", "weight_std", "weight_ess", "moved_weight", "aug_weight", "strength", "refresh_interval"):
        assert key in row, key
    assert "weight_mean" not in row and 0 < row["weight_ess"] <= 1
    assert res["history"][-1]["moved_weight"] == row["moved_weight"]


def test_example_share_steps_for_the_runs_length(tmp_path, monkeypatch):
    """The example knows its number of updates (epochs x updates per epoch: 31 for one epoch of the
    digits here) and gives it to SAflex's share; --max-steps stops the run without shortening it."""
    import augplug.integrations.accelerate_train as at
    from augplug.share import AdaptiveShare

    made = []

    class Recording(AdaptiveShare):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(at, "AdaptiveShare", Recording)
    _accelerator()   # reset any state an earlier test left
    at.main(["--epochs", "1", "--max-steps", "3", "--no-progress", "--cpu", "--output", str(tmp_path)])
    assert len(made) == 1 and made[0].horizon == 31 and made[0].lr == pytest.approx(0.4 / 31 ** 0.5)


def test_example_budget_reaches_the_schedule(tmp_path):
    """--budget: the example's refiner runs under Schedule(budget=...) and logs its measured share;
    with --budget none (the exact schedule) the rows carry no share."""
    import augplug.integrations.accelerate_train as at

    _accelerator()   # reset any state an earlier test left
    res = at.main(["--epochs", "1", "--max-steps", "12", "--budget", "0.5", "--no-progress", "--cpu",
                   "--output", str(tmp_path / "a")])
    row = res["history"][-1]
    assert isinstance(row["overhead"], float) and row["overhead"] > 0 and row["refresh_interval"] >= 4
    _accelerator()
    res = at.main(["--epochs", "1", "--max-steps", "3", "--budget", "none", "--no-progress", "--cpu",
                   "--output", str(tmp_path / "b")])
    assert res["history"][-1]["overhead"] is None


@pytest.mark.parametrize("args,message", [(["--epochs", "0"], "--epochs must be at least 1"),
                                          (["-b", "0"], "--batch-size must be at least 1"),
                                          (["--grad-accum", "0"], "--grad-accum must be at least 1"),
                                          (["--lr", "-1"], "--lr must be positive"),
                                          (["--noise", "2"], "--noise is the share"),
                                          (["--refiner", "nope"], "invalid choice"),
                                          (["--budget", "abc"], "--budget: budget must be"),
                                          (["--budget", "0"], "--budget: budget must be"),
                                          (["--resume", "/nonexistent/folder"], "not a folder")])
def test_example_rejects_bad_numbers(args, message, capsys):
    """Before: -b 0 and --lr -1 died in torch with a traceback, --grad-accum 0 in a division by zero,
    and --noise 2 trained silently."""
    from augplug.integrations.accelerate_train import parse_args
    with pytest.raises(SystemExit):
        parse_args(args)
    assert message in capsys.readouterr().err


def _launch_example(tmp_path, name, *args, port):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", NO_ALBUMENTATIONS_UPDATE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "integrations" / "accelerate_train.py"), "--no-progress", "--budget", "none",
           "--output", str(tmp_path / name), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / name / "results.json").read_text())
    assert res["num_processes"] == 2
    return res


def test_example_on_two_processes_follows_one_process_schedule_and_resumes_in_its_epoch(tmp_path):
    """Accelerate steps a prepared scheduler once per process at every update: the cosine schedule
    is written in those steps, so at each update two processes use one process's rate; and a resume
    maps the saved updates to epochs counted on each process's share of the loader."""
    # the digits study's loader: its per-process share gives the updates of an epoch
    first = _launch_example(tmp_path, "epoch", "--epochs", "3", "--max-steps", "1000", port=29521)
    per_epoch = first["history"][0]["updates"]
    assert [h["updates"] for h in first["history"]] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    for h in first["history"]:   # the rate of one process after that many of the run's updates
        assert h["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * h["updates"] / (3 * per_epoch))), abs=1e-9)
    saved = _launch_example(tmp_path, "two", "--epochs", "3", "--max-steps", str(2 * per_epoch), "--save-state",
                            port=29523)
    assert saved["refiner_updates"] == 2 * per_epoch
    resumed = _launch_example(tmp_path, "resumed", "--epochs", "3", "--resume", str(tmp_path / "two" / "checkpoint"),
                              port=29525)
    assert [(h["epoch"], h["updates"]) for h in resumed["history"]] == [(2, 3 * per_epoch)]
