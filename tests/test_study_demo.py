"""The study harness behind the demo and benchmarks, and a smoke run of the demo."""
import numpy as np
import pytest
import torch

from augplug.demo.study import binary_auc, corrupt_views, make_view_bank


def test_binary_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for ties in (False, True):
        s = rng.normal(size=200)
        if ties:
            s = np.round(s, 1)
        pos = rng.random(200) < 0.3
        assert abs(binary_auc(s, pos) - metrics.roc_auc_score(pos, s)) < 1e-12
    assert np.isnan(binary_auc([1.0, 2.0], [True, True]))


def test_corrupt_views_rate_and_always_wrong():
    labels = torch.arange(1000) % 10
    lab, noisy = corrupt_views(labels, 4, 0.3, 10, seed=1)
    assert lab.shape == (1000, 4) and abs(float(noisy.float().mean()) - 0.3) < 0.03
    assert torch.all(lab[noisy] != labels[:, None].expand(1000, 4)[noisy])
    assert torch.equal(lab[~noisy], labels[:, None].expand(1000, 4)[~noisy])
    lab2, _ = corrupt_views(labels, 4, 0.3, 10, seed=1)
    assert torch.equal(lab, lab2)


def test_view_bank_is_seeded_and_leaves_global_rngs_alone():
    import random
    from timm.data.auto_augment import rand_augment_transform
    imgs = (torch.rand(5, 8, 8) * 255).to(torch.uint8)
    tf = rand_augment_transform("rand-m9-mstd0.5", {"img_mean": (128,)})
    state = random.getstate()
    a = make_view_bank(imgs, tf, 3, seed=2)
    assert random.getstate() == state
    b = make_view_bank(imgs, tf, 3, seed=2)
    assert a.shape == (5, 3, 8, 8) and a.dtype == torch.uint8 and torch.equal(a, b)


def test_demo_smoke(tmp_path, capsys):
    from augplug.__main__ import main
    main(["demo", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for arm in ("none", "upstream", "upstream+SAflex", "upstream+L2RW"):
        assert f"| {arm} |" in out
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.json").exists()
    assert (tmp_path / "demo.png").exists()


def test_demo_budget_option(monkeypatch, capsys):
    """``--budget`` reaches the refined arms' schedule (default: the exact schedule, None); a bad
    value is a usage error naming the choices, before any training."""
    import augplug.demo.cli as cli
    from augplug.__main__ import main
    seen = []

    def fake_run_arm(data, arm, seed, **kw):
        seen.append(kw["refiner_kwargs"]["budget"])
        return {"test_acc": 0.5}

    monkeypatch.setattr(cli, "run_arm", fake_run_arm)
    monkeypatch.setattr(cli, "load_digits_study", lambda seed, **kw: None)
    main(["demo", "--seeds", "0", "--out", "", "--no-progress"])
    main(["demo", "--seeds", "0", "--out", "", "--no-progress", "--budget", "auto"])
    main(["demo", "--seeds", "0", "--out", "", "--no-progress", "--budget", "0.2"])
    assert seen == [None] * 4 + ["auto"] * 4 + [0.2] * 4
    assert "refiners: the exact schedule (budget=None)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--budget", "lots"])
    assert "budget must be 'auto', 'none' or a positive fraction" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--epochs", "0"], "--epochs must be at least 1"),
                                          (["--noise", "1.5"], "--noise is the share"),
                                          (["--seeds", "-3"], "--seeds must be integers in"),
                                          (["--seeds", "1", "1"], "--seeds repeats a seed")])
def test_demo_rejects_bad_numbers_before_training(args, message, monkeypatch, capsys):
    """Out-of-range numbers are usage errors naming the option (before: a ValueError traceback from
    deep in the data or training code, for example for --epochs -1 or --seeds -3)."""
    import augplug.demo.cli as cli
    from augplug.__main__ import main
    monkeypatch.setattr(cli, "run_arm", lambda *a, **k: pytest.fail("trained despite a bad option"))
    with pytest.raises(SystemExit):
        main(["demo", "--out", "", "--no-progress", *args])
    assert message in capsys.readouterr().err


def _tiny_study(noisy: bool):
    from augplug.demo.study import StudyData
    g = torch.Generator().manual_seed(0)
    n, v = 48, 2
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    views = x[:, None] + 0.3 * torch.randn(n, v, 1, 8, 8, generator=g)
    labels, _ = corrupt_views(y, v, 0.5 if noisy else 0.0, 3, seed=0)
    test_x, test_y = torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    return StudyData(x, y, x[:12], y[:12], test_x, test_y, views, labels, 3)


@pytest.mark.parametrize("aug_only", [False, True])
def test_oracle_weights_arm_is_upstream_when_no_view_is_corrupted(aug_only):
    from augplug.models import SmallCNN
    from augplug.demo.study import run_arm

    def run(arm, noisy):   # the trained parameters
        models = []
        run_arm(_tiny_study(noisy), arm, 0, epochs=2, batch_size=16, aug_only=aug_only,
                model_fn=lambda: models.append(SmallCNN(1, 3, img_size=8, width=4, hidden=8)) or models[-1])
        return torch.cat([p.detach().flatten() for p in models[0].parameters()])

    torch.testing.assert_close(run("oracle-weights", False), run("upstream", False), rtol=1e-5, atol=1e-6)
    # with corrupted views it trains on a different loss (the comparison above is not vacuous)
    assert float((run("oracle-weights", True) - run("upstream", True)).abs().max()) > 1e-3


def test_view_batches_cover_every_image_once_per_epoch():
    """The view-bank studies' training order: each epoch a permutation of the images in batches,
    one view index per image, reproducible from the generator; bad sizes are refused."""
    import torch

    from augplug.demo.study import view_batches

    batches = list(view_batches(10, 3, 4, 2, torch.Generator().manual_seed(0)))
    assert [len(i) for i, _ in batches] == [4, 4, 2] * 2
    for epoch in (batches[:3], batches[3:]):
        assert sorted(torch.cat([i for i, _ in epoch]).tolist()) == list(range(10))
        assert all(((v >= 0) & (v < 3)).all() for _, v in epoch)
    again = list(view_batches(10, 3, 4, 2, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches, again))
    with pytest.raises(ValueError, match="batch_size"):
        next(view_batches(10, 3, 0, 1, torch.Generator()))


@pytest.mark.filterwarnings("ignore:budget=0.1")
def test_demo_budget_benchmark_pairs_the_two_schedules(monkeypatch, tmp_path):
    """``benchmarks.demo_budget`` runs each refined arm under both schedules for every seed and
    writes the paired table (a one-epoch smoke run)."""
    bench = pytest.importorskip("benchmarks.demo_budget")
    pytest.importorskip("sklearn")
    monkeypatch.setattr(bench, "results_dir", lambda study=None: tmp_path)
    bench.main(["--seeds", "0", "--epochs", "1", "--out", "smoke"])
    text = (tmp_path / "smoke.md").read_text()
    for arm in ("upstream+SAflex", "upstream+L2RW"):
        assert f"| {arm} |" in text
    assert "(0 / 1 / 0)" in text or "(1 / 0 / 0)" in text or "(0 / 0 / 1)" in text
    assert "reads every" in text and "estimate" in text
