"""benchmarks.tabular_labels on a small synthetic table (no UCI download): per-epoch rows, and the
augmented rows' share reported as 1 for a fixed share and moving for the adaptive one."""
import pytest
import torch

from benchmarks import tabular, tabular_labels


def _splits(name, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)

    def part(n):
        x = torch.randn(n, 6, generator=g)
        return x, (x @ w).argmax(1)

    return part(512), part(64), part(64), 3


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setattr(tabular, "load_splits", _splits)
    monkeypatch.setattr(tabular_labels, "load_splits", _splits)


def test_fixed_share_arm_reports_share_one(synthetic, capsys):
    rows = tabular_labels.main(["--dataset", "spambase", "--seed", "0", "--epochs", "2"])
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["share"] == 1.0 and r["mean_abs_g"] > 0 and 0 < r["p_given"] <= 1 for r in rows)
    assert "share of the augmented rows, mean over epochs: 1.000" in capsys.readouterr().out


def test_adaptive_share_arm_reports_the_moving_share(synthetic):
    rows = tabular_labels.main(["--dataset", "spambase", "--seed", "0", "--epochs", "3",
                                "--arm", "orig+cutmix-p0.5+saflex-share"])
    assert len(rows) == 3 and all(0 < r["share"] <= 1 for r in rows)
    assert any(r["share"] < 1 for r in rows)


def test_non_saflex_arm_is_rejected():
    with pytest.raises(SystemExit):
        tabular_labels.main(["--arm", "cutmix-p0.5"])
