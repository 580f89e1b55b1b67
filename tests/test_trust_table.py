"""The trust benchmark: its table (which accuracy it shows, ``--metric``), its options and its settings."""
import pytest

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


@pytest.mark.parametrize("option", ["views_scale=0", "rest_rescale=0", "originals_first=1"])
def test_separate_pattern_options_are_refused_outside_it(capsys, option):
    from benchmarks.trust import main
    with pytest.raises(SystemExit):
        main(["--datasets", "digits", "--upstreams", "clean", "--patterns", "batch", "--arms", "refiner",
              "--seeds", "0", "--epochs", "1", "--set", option])
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


def test_the_unscaled_rest_ablation_trains_rest_plus_share_times_views():
    """``--set rest_rescale=0``: the parameters' gradient is ``grad CE(originals) + lam * grad CE(views)``,
    without the refiner's ``2 / (1 + lam)`` (which the default keeps, tests/test_rest.py)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from augplug import refiner_kwargs
    from augplug.share import AdaptiveShare
    from benchmarks.trust import _unscaled_rest

    def net():
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    g = torch.Generator().manual_seed(1)
    val = DataLoader(TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)),
                     batch_size=16)
    torch.manual_seed(0)
    model = net()
    r = _unscaled_rest()(model, torch.optim.SGD(model.parameters(), lr=0.0), val,
                         schedule=dict(refresh_every=1, budget=None),
                         **refiner_kwargs({"aug_weight": AdaptiveShare(init=0.25)}))
    for step in range(3):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        x_aug, y_aug = x + 0.5 * torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        model.zero_grad()
        (r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)).backward()
        lam = r.stats["aug_weight"] if step > 0 else 1.0   # the first call cannot know there is a rest
        assert r.stats["against_rest"] == (step > 0) and (step == 0 or lam < 1)
        ref = net()
        ref.load_state_dict(model.state_dict())
        (F.cross_entropy(ref(x), y) + lam * F.cross_entropy(ref(x_aug), y_aug)).backward()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_identity_upstream_weights_are_ranked_against_the_unbroken_views():
    """For ``identity`` the AUC's positives are the views whose class identity was kept (the odd
    classes): with two classes a weight that is higher exactly on class 1's views has AUC 1."""
    import math

    import torch

    from augplug.demo.study import binary_auc
    from benchmarks.trust import broken_class_mask, run
    out = run("cancer", "identity", "batch", "refiner", 0, 1, {})
    assert not math.isnan(out["auc_weight"]) and 0.0 <= out["auc_weight"] <= 1.0
    labels = torch.tensor([0, 1, 0, 1, 1])
    kept = ~broken_class_mask(2)[labels]
    assert binary_auc(labels.float().numpy(), kept.numpy()) == 1.0


def test_the_second_promise_compares_means_not_the_larger_control_per_seed():
    """Two controls alike but for noise, and a refiner that is one of them: both promises hold (it is
    the better control); the mean of ``refiner_s - max(none_s, upstream_s)`` is a full point under,
    because the larger of two noisy accuracies per seed lies above both means."""
    from benchmarks.trust import promises
    none = {0: 0.80, 1: 0.82, 2: 0.80, 3: 0.82}
    upstream = {0: 0.82, 1: 0.80, 2: 0.82, 3: 0.80}
    out = promises(dict(upstream), upstream, none)
    assert out["vs_upstream"] == 0 and out["vs_none"] == 0
    assert out["first"] and out["second"]
    assert abs(out["vs_seed_max"] + 1.0) < 1e-9


def test_the_second_promise_fails_below_the_better_control_and_needs_the_first():
    from benchmarks.trust import promises
    none = {0: 0.90, 1: 0.90}
    upstream = {0: 0.85, 1: 0.85}
    short = promises({0: 0.8985, 1: 0.8985}, upstream, none)      # 0.15 points under no augmentation
    assert short["first"] and not short["second"]
    assert abs(short["vs_none"] + 0.15) < 1e-9
    near = promises({0: 0.8995, 1: 0.8995}, upstream, none)       # 0.05 under: within the tolerance
    assert near["second"]
    # views help: the better control is upstream, and the refiner must reach it
    below_upstream = promises({0: 0.92, 1: 0.92}, {0: 0.94, 1: 0.94}, none)
    assert not below_upstream["first"] and not below_upstream["second"]
    assert "second" not in promises({0: 0.9}, {0: 0.9})          # no originals trained: first promise only
    with pytest.raises(KeyError):
        promises({0: 0.9, 1: 0.9}, {0: 0.9}, {0: 0.9, 1: 0.9})   # a control without the refiner's seed


def test_the_readme_counts_the_promises_as_the_committed_runs_give_them():
    """The README's counts over its trust table are what ``python -m benchmarks.trust_bars`` computes
    from the runs in ``benchmarks/results/trust``."""
    from pathlib import Path

    from benchmarks.trust_bars import count
    _, totals = count()
    assert totals["settings"] == 192
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key in ("first", "second"):
        assert f"{totals[key]} of {totals['settings']}" in readme, key
    assert f"{totals['second_seed_max']} of {totals['settings']}" in readme
    assert f"{totals['better_control_seed_max']} of {totals['settings']}" in readme


def test_a_variant_is_counted_on_its_own_settings_and_paired_with_the_default(tmp_path, monkeypatch):
    """``benchmarks.trust_bars --variant NAME`` reads ``trust/NAME_<table>`` with the default table's
    controls, leaves out settings it did not run, and pairs its refiner runs with the default's."""
    import json

    import benchmarks.trust_bars as bars

    def results_dir(study=None):
        path = tmp_path / study if study else tmp_path
        path.mkdir(parents=True, exist_ok=True)
        return path

    import benchmarks.common as common
    monkeypatch.setattr(bars, "results_dir", results_dir)
    monkeypatch.setattr(common, "results_dir", results_dir)   # read_runs
    monkeypatch.setattr(bars, "SETTINGS", [("row", "t", ["digits"], ["random"], ["batch"]),
                                           ("row", "u", ["digits"], ["clean"], ["batch"])])
    trust = results_dir("trust")

    def write(name, rows, controls=None):
        header = f"<!-- python -m benchmarks.trust --out trust/{name}" + (f" --controls trust/{controls}" if controls else "")
        (trust / f"{name}.md").write_text(header + " -->\n")
        (trust / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(arm, seed, acc, upstream="random"):
        return {"dataset": "digits", "upstream": upstream, "pattern": "batch" if arm != "none" else "none",
                "arm": arm, "seed": seed, "test_acc": acc}

    controls = [run("none", s, 0.90) for s in (0, 1)] + [run("upstream", s, 0.85) for s in (0, 1)]
    controls += [run("upstream", s, 0.85, "clean") for s in (0, 1)]
    write("controls", controls + [run("refiner", s, 0.10) for s in (0, 1)])   # a refiner run the tables ignore
    write("t", [run("refiner", s, 0.8995) for s in (0, 1)], "controls")
    write("u", [run("refiner", s, 0.8995, "clean") for s in (0, 1)], "controls")
    write("v_t", [run("refiner", s, 0.901) for s in (0, 1)], "controls")
    # the current default's one-batch runs are the s0_ tables (every view at weight 1 in the share)
    write("s0_t", [run("refiner", s, 0.80) for s in (0, 1)], "controls")
    write("s0_u", [run("refiner", s, 0.80, "clean") for s in (0, 1)], "controls")
    cells, totals = bars.count(named=True)
    assert totals["settings"] == 2 and totals["first"] == 2 and totals["second"] == 2
    cells, totals = bars.count()
    assert [c["table"] for c in cells] == ["s0_t", "s0_u"] and totals["first"] == 0
    cells, totals = bars.count("v")
    assert totals["settings"] == 1 and cells[0]["table"] == "v_t"
    assert abs(cells[0]["vs_default"] - 0.15) < 1e-9 and abs(totals["vs_default"] - 0.15) < 1e-9
    assert abs(cells[0]["vs_none"] - 0.1) < 1e-9 and cells[0]["second"]
