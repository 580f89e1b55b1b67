"""Smoke test of benchmarks/overhead.py: a --quick run on SmallCNN writes the expected report; the
L2RW peer's look-ahead meta-gradient against two independent oracles."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import augplug.scores
from benchmarks import overhead


def _table_rows(text: str, first_header: str):
    """Cells of the markdown table whose header row starts with ``| first_header |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


@pytest.mark.timeout(180)
def test_quick_run_writes_report(tmp_path):
    threads = torch.get_num_threads()
    original_scores = augplug.scores.class_scores
    try:
        result = overhead.main(["--quick", "--models", "smallcnn", "--val-sizes", "64", "128", "--out",
                                "overhead_smoke", "--results-dir", str(tmp_path), "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert augplug.scores.class_scores is original_scores  # the finite-difference patch is undone

    md = tmp_path / "overhead_smoke.md"
    assert md.exists() and result["markdown"] == md
    assert (tmp_path / "overhead_smoke.png").exists()
    text = md.read_text(encoding="utf-8")
    assert "python -m benchmarks.overhead --quick --models smallcnn --val-sizes 64 128" in text
    assert torch.__version__ in text and "rounds" in text and "val_batches='all'" in text

    steps = _table_rows(text, "model")
    labels = [c.label for c in overhead.CONFIGS]
    assert [r[1] for r in steps] == [overhead.PLAIN] + labels + labels + [overhead.PEER]
    assert [r[2] for r in steps] == ["—"] + ["64"] * len(labels) + ["128"] * len(labels) + ["64 per step"]
    assert "budget" not in text.split("| model |", 1)[1].splitlines()[0]  # no --budgets: no budget column
    for row in steps:
        assert row[0] == "smallcnn"
        ms, ratio = float(row[3]), float(row[4])  # a failed configuration would not parse
        assert ms > 0 and math.isfinite(ratio) and ratio > 0
    assert float(steps[0][4]) == 1.0  # plain against itself
    assert all(r.error is None for r in result["steps"])

    breakdown = _table_rows(text, "model | component")
    labels = [r[1] for r in breakdown]
    assert labels == [label for _, label in overhead.BREAKDOWN_ITEMS] + [overhead.BREAKDOWN_OTHER]
    for row in breakdown[:-1]:
        assert float(row[2]) > 0 and float(row[3]) > 0


@pytest.mark.timeout(120)
def test_budgets_are_passed_through_and_configs_selected(tmp_path, monkeypatch):
    """--budgets: every selected configuration once per value, with Schedule(budget=VALUE) given to
    the refiner (recorded here by a stand-in); --configs picks the configurations."""
    seen = []

    class Recording(overhead.AugmentationRefiner):
        def __init__(self, *args, schedule=None, **kwargs):
            seen.append((schedule or {}).get("budget", "absent"))
            super().__init__(*args, schedule=schedule, **kwargs)

    monkeypatch.setattr(overhead, "AugmentationRefiner", Recording)
    fd_rows = []  # rows scored by finite differences (the fd-r4 configuration)

    def counting_fd(model, inputs, v, **kwargs):
        fd_rows.append(inputs.shape[0])
        return augplug.scores.finite_difference_scores(model, inputs, v, **kwargs)

    monkeypatch.setattr(overhead, "finite_difference_scores", counting_fd)
    threads = torch.get_num_threads()
    try:
        result = overhead.main(["--quick", "--models", "smallcnn", "--val-sizes", "64", "--budgets", "0.5", "2",
                                "--configs", "ll-r4", "fd-r4", "--no-breakdown", "--no-plot", "--out", "budgets",
                                "--results-dir", str(tmp_path), "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert seen == [0.5, 2, 0.5, 2]
    # fd-r4, 2 budgets, (warm-up 1 + 3 rounds x K 4) steps each; under a budget the model score
    # passes may be spaced out (closed-form scores between), each scoring the 64 rows
    assert fd_rows and set(fd_rows) == {64} and len(fd_rows) <= 2 * 13
    text = (tmp_path / "budgets.md").read_text(encoding="utf-8")
    steps = _table_rows(text, "model")
    assert [(r[1], r[3]) for r in steps] == [
        (overhead.PLAIN, "—"), ("saflex full (finite differences), refresh 4", "0.5"),
        ("saflex full (finite differences), refresh 4", "2"), ("saflex last_layer, refresh 4", "0.5"),
        ("saflex last_layer, refresh 4", "2")]
    assert all(r.error is None for r in result["steps"]) and "budget= 0.5 / 2" in text
    # the budget's choice column: refresh interval for every budgeted row, the score interval for full mode
    assert [r[-1].startswith("refresh every ") for r in steps] == [False, True, True, True, True]
    assert ["model scores every" in r[-1] for r in steps] == [False, True, True, False, False]
    # --replot redraws the figure from the table alone: one bar per refined row, as timed
    replot = overhead.main(["--replot", "budgets", "--results-dir", str(tmp_path)])
    assert (tmp_path / "budgets.png").stat().st_size > 0
    assert [(r.key, r.val_size, r.budget, r.ratio) for r in replot["steps"]] == [
        (r.key, r.val_size, r.budget, float(f"{r.ratio:.3f}")) for r in result["steps"] if r.label != overhead.PLAIN]


def test_finite_difference_patch_routes_full_scores_only(tiny_cnn):
    x = torch.randn(4, 1, 8, 8, dtype=torch.double)
    v = {n: torch.randn_like(p) for n, p in tiny_cnn.named_parameters()}
    calls = [0, 0]
    with overhead.finite_difference_patch(calls):
        g = augplug.scores.class_scores(tiny_cnn, x, v, mode="full")
        db = augplug.scores.class_scores(tiny_cnn, x, v, mode="double_backward")
    assert calls == [1, 2]
    assert torch.equal(g, augplug.scores.finite_difference_scores(tiny_cnn, x, v))
    assert torch.allclose(db, augplug.scores.double_backward_scores(tiny_cnn, x, v))
    with pytest.raises(RuntimeError, match="finite_difference_patch"):
        overhead.with_finite_differences(lambda: None)()


def _lookahead_oracles(model, x, y, xv, yv, lr):
    """Two independent values of d L_val(theta - lr grad sum_i eps_i l_i) / d eps_i at eps = 0:
    central differences in eps (plain forwards at moved parameters, no double backward) and the
    closed form -lr grad l_i . grad L_val (the virtual step is zero at eps = 0)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    call = torch.func.functional_call

    def losses(p):
        return F.cross_entropy(call(model, (p, dict(buffers)), (x,)), y, reduction="none")

    def val_loss(p):
        return F.cross_entropy(call(model, (p, dict(buffers)), (xv,)), yv)

    per_sample = []
    for i in range(x.shape[0]):
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        per_sample.append(dict(zip(p, torch.autograd.grad(losses(p)[i], list(p.values())))))
    p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    g_val = dict(zip(p, torch.autograd.grad(val_loss(p), list(p.values()))))
    closed = torch.stack([-lr * sum((gi[n] * g_val[n]).sum() for n in params) for gi in per_sample])
    h = 1e-4
    fd = []
    for gi in per_sample:
        up = val_loss({n: params[n] - lr * h * gi[n] for n in params})
        down = val_loss({n: params[n] + lr * h * gi[n] for n in params})
        fd.append((up - down) / (2 * h))
    return torch.stack(fd).detach(), closed.detach()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lookahead_meta_gradient_matches_oracles(tiny_cnn, mode):
    """The L2RW peer's meta-gradient, BatchNorm in batch (train) or running (eval) statistics,
    dropout off (so that every pass sees the same function)."""
    model = tiny_cnn.train() if mode == "train" else tiny_cnn.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.double), torch.randn(5, 1, 8, 8, generator=g, dtype=torch.double)
    y, yv = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (5,), generator=g)
    before = copy.deepcopy(model.state_dict())
    meta = overhead.lookahead_meta_gradient(model, x, y, xv, yv, lr=0.1)
    fd, closed = _lookahead_oracles(model, x, y, xv, yv, lr=0.1)
    assert meta.shape == (6,) and float(meta.abs().max()) > 1e-4
    assert torch.allclose(meta, closed, rtol=1e-8, atol=1e-12)
    assert torch.allclose(meta, fd, rtol=1e-6, atol=1e-10)
    for k, t in model.state_dict().items():  # neither the parameters nor the running statistics moved
        assert torch.equal(t, before[k]), k


def test_l2rw_weights_from_meta():
    w = overhead.l2rw_weights_from_meta(torch.tensor([-2.0, 1.0, -6.0, 0.0]))
    assert torch.allclose(w, torch.tensor([0.25, 0.0, 0.75, 0.0]))
    assert torch.equal(overhead.l2rw_weights_from_meta(torch.tensor([1.0, 0.0])), torch.zeros(2))


def test_block_length_must_cover_refresh_period(tmp_path):
    with pytest.raises(SystemExit):
        overhead.main(["--quick", "--k", "6", "--models", "smallcnn", "--results-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_amp_needs_cuda(tmp_path):
    with pytest.raises(SystemExit):
        overhead.main(["--quick", "--amp", "--device", "cpu", "--results-dir", str(tmp_path)])


@pytest.mark.timeout(120)
def test_quick_run_with_originals_times_the_share(tmp_path):
    """--num-original: the refined rows see originals (the adaptive share moves) and fixed-share rows are added."""
    threads = torch.get_num_threads()
    try:
        result = overhead.main(["--quick", "--models", "smallcnn", "--num-original", "16", "--val-sizes", "64", "--no-breakdown",
                                "--no-plot", "--out", "overhead_orig", "--results-dir", str(tmp_path),
                                "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "overhead_orig.md").read_text(encoding="utf-8")
    assert "num_original=16" in text
    labels = [r[1] for r in _table_rows(text, "model")]
    assert labels == [overhead.PLAIN] + [c.label for c in overhead.configs_for(16)] + [overhead.PEER]
    assert len(labels) == len(overhead.CONFIG_LABELS) + len(overhead.FIXED_SHARE_CONFIGS)
    assert all(r.error is None for r in result["steps"])


@pytest.mark.parametrize("bad", [["--val-batches", "0"], ["--val-batches", "some"], ["--val-sizes", "0"],
                                 ["--configs", "nope"]])
def test_bad_axis_values_are_refused(tmp_path, bad):
    with pytest.raises(SystemExit):
        overhead.main(["--quick", "--models", "smallcnn", "--results-dir", str(tmp_path), "--device", "cpu"] + bad)
    assert not any(tmp_path.iterdir())


def test_num_original_must_leave_augmented_rows(tmp_path):
    with pytest.raises(SystemExit):
        overhead.main(["--quick", "--models", "smallcnn", "--batch", "8", "--num-original", "8",
                       "--results-dir", str(tmp_path), "--device", "cpu"])
    assert not any(tmp_path.iterdir())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA timing path needs a GPU"))])
def test_isda_overhead_child_reports_one_configuration(device):
    """benchmarks.isda times one configuration in a child process and prints it as JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "benchmarks.isda", "--overhead-one", "C=100, diagonal", "--rounds", "2",
           "--warmup", "1", "--batch", "4", "--side", "32", "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                         timeout=170)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["name"] == "C=100, diagonal" and res["covariance"] == "diagonal" and res["features"] == 512
    assert res["plain_ms"] > 0 and res["isda_ms"] > 0 and 0 < res["loss_fwd_ms"] < res["isda_ms"]
    assert res["q25"] <= res["ratio"] <= res["q75"] and res["seen_classes"] > 0
    assert res["stats_mib"] == pytest.approx(2 * 100 * 512 * 4 / 2 ** 20, rel=0.05)


def test_call_cost_measures_one_model():
    from benchmarks.call_cost import measure

    row = measure("smallcnn", 3)
    assert row[0] == "smallcnn" and len(row) == 6
    # plain step, warm call, call after a sleep (ms); aten ops per call
    assert float(row[1]) > 0 and float(row[3]) > 0 and float(row[4]) > 0 and float(row[5]) > 50


def test_sync_cost_writes_one_row_per_configuration(tmp_path):
    from benchmarks import sync_cost

    threads = torch.get_num_threads()
    try:
        text = sync_cost.main(["--device", "cpu", "--models", "smallcnn", "--rounds", "2", "--threads", "1",
                               "--results-dir", str(tmp_path), "--out", "sc"])
    finally:
        torch.set_num_threads(threads)
    rows = _table_rows(text, "model")
    assert [r[1] for r in rows] == ["plain", "plain + one sync", "refiner, kept direction", "refiner, exact schedule"]
    assert all(r[-1] == "" and float(r[3]) > 0 for r in rows)
    assert (tmp_path / "sc.md").read_text(encoding="utf-8") == text
