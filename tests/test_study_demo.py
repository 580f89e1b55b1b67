"""The study harness behind the demo and benchmarks, and a smoke run of the demo."""
import numpy as np
import pytest
import torch

from augplug.study import binary_auc, corrupt_views, make_view_bank


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
