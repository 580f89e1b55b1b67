"""The trust benchmark's table: which accuracy it shows (``--metric``)."""
from benchmarks.trust import summarise


def _row(arm, seed, acc, acc_bn=None, upstream="random", pattern="separate"):
    r = {"dataset": "fmnist", "upstream": upstream, "pattern": pattern, "arm": arm, "seed": seed, "test_acc": acc}
    if acc_bn is not None:
        r["test_acc_bn"] = acc_bn
    return r


def test_the_table_shows_the_chosen_metric_and_leaves_out_runs_without_it():
    rows = [_row("none", s, 0.80, 0.90) for s in (0, 1)]
    rows += [_row("upstream", s, 0.70, 0.60) for s in (0, 1)]
    rows += [_row("refiner", s, 0.75, 0.95) for s in (0, 1)]
    rows.append(_row("refiner", 2, 0.75))  # no recalibrated accuracy: not in the test_acc_bn table
    rows.append(_row("upstream", 2, 0.70))
    header, lines = summarise(rows)
    (line,) = lines
    cells = dict(zip(header, line))
    assert cells["none"].startswith("80.00") and cells["refiner"].startswith("75.00")
    assert cells["refiner − upstream"] == "+5.00 ± 0.00 (3/3)"
    header, lines = summarise(rows, "test_acc_bn")
    cells = dict(zip(header, lines[0]))
    assert cells["none"].startswith("90.00") and cells["upstream"].startswith("60.00")
    assert cells["refiner − upstream"] == "+35.00 ± 0.00 (2/2)"
    assert cells["refiner − max(none, upstream)"] == "+5.00 ± 0.00 (2/2)"


def test_views_scale_is_refused_outside_the_separate_pattern(capsys):
    import pytest

    from benchmarks.trust import main
    with pytest.raises(SystemExit):
        main(["--datasets", "digits", "--upstreams", "clean", "--patterns", "batch", "--arms", "refiner",
              "--seeds", "0", "--epochs", "1", "--set", "views_scale=0"])
    assert "--patterns separate" in capsys.readouterr().err


def test_the_mild_upstream_keeps_labels_and_moves_views_a_little():
    import torch

    from benchmarks.trust import VIEWS, make_setting
    table = make_setting("cancer", "mild", 0)
    assert torch.equal(table["given"], table["y"][:, None].expand(-1, VIEWS))
    moved = table["views"] - table["x"][:, None]
    assert 0.08 < float(moved.std()) < 0.12   # noise of 0.1 standard deviations, nothing swapped
    images = make_setting("digits", "mild", 0)
    assert torch.equal(images["given"], images["y"][:, None].expand(-1, VIEWS))
    change = (images["views"] - images["x"][:, None]).abs().flatten(2).mean(-1)
    assert float((change > 0).float().mean()) > 0.5   # most views moved (an 8x8 image rounds small moves away)
