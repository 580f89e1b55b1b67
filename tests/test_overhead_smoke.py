"""Smoke test of benchmarks/overhead.py: a --quick run on SmallCNN writes the expected report."""
import math
import re

import pytest
import torch

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


@pytest.mark.timeout(120)
def test_quick_run_writes_report(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = overhead.main(["--quick", "--models", "smallcnn", "--out", "overhead_smoke",
                                "--results-dir", str(tmp_path), "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)

    md = tmp_path / "overhead_smoke.md"
    assert md.exists() and result["markdown"] == md
    assert (tmp_path / "overhead_smoke.png").exists()
    text = md.read_text(encoding="utf-8")
    assert "python -m benchmarks.overhead --quick --models smallcnn" in text
    assert torch.__version__ in text and "rounds" in text

    steps = _table_rows(text, "model")
    assert [r[1] for r in steps] == list(overhead.CONFIG_LABELS)
    for row in steps:
        assert row[0] == "smallcnn"
        ms, ratio = float(row[2]), float(row[3])  # a failed configuration would not parse
        assert ms > 0 and math.isfinite(ratio) and ratio > 0
    assert float(steps[0][3]) == 1.0  # plain against itself

    breakdown = _table_rows(text, "model | component")
    labels = [r[1] for r in breakdown]
    assert labels == [label for _, label in overhead.BREAKDOWN_ITEMS] + [overhead.BREAKDOWN_OTHER]
    for row in breakdown[:-1]:
        assert float(row[2]) > 0 and float(row[3]) > 0


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
        result = overhead.main(["--quick", "--models", "smallcnn", "--num-original", "16", "--no-breakdown",
                                "--no-plot", "--out", "overhead_orig", "--results-dir", str(tmp_path),
                                "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "overhead_orig.md").read_text(encoding="utf-8")
    assert "num_original=16" in text
    labels = [r[1] for r in _table_rows(text, "model")]
    assert labels == [overhead.PLAIN] + [c.label for c in overhead.configs_for(16)]
    assert len(labels) == len(overhead.CONFIG_LABELS) + len(overhead.FIXED_SHARE_CONFIGS)
    assert all(r.error is None for r in result["steps"])


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
