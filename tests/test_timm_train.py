"""The timm training script, run in-process on tiny data (a timm test model at 16x16, 2-3 steps)."""
import csv
import os

import numpy as np
import pytest
import torch

import augplug
from augplug.methods import POLICIES

tt = pytest.importorskip("augplug.integrations.timm_train")

BASE = ["--dataset", "synthetic", "--synthetic-size", "96", "--model", "test_resnet", "--img-size", "16",
        "-b", "16", "--epochs", "1", "--max-steps", "3", "--val-split", "16", "--val-batch-size", "16",
        "--seed", "3", "--device", "cpu",  # CPU everywhere: the comparisons below are fp32-exact on CPU
        "--strength", "1",  # refine the views alone too (the default, 'auto', trains them as given)
        # timm's defaults (smoothing 0.1, 5 warm-up epochs, lr from --lr-base) off: hard labels, a real step size
        "--smoothing", "0", "--warmup-epochs", "0", "--lr", "0.05"]


def _method_available(name, options):
    try:
        POLICIES[name](**options)
        return True
    except Exception:
        return False


class Recorder(augplug.AugmentationRefiner):
    """The refiner, recording what the training loop passes to it."""

    calls = []

    def __call__(self, logits, targets, **kw):
        Recorder.calls.append({"logits_dtype": logits.dtype, "targets": targets.detach().clone(),
                               "index": None if kw.get("index") is None else kw["index"].clone(),
                               "num_original": kw.get("num_original", 0), "batch": logits.shape[0]})
        return super().__call__(logits, targets, **kw)


@pytest.fixture
def recorder(monkeypatch):
    Recorder.calls = []
    monkeypatch.setattr(tt, "AugmentationRefiner", Recorder)
    return Recorder


def _run(tmp_path, *extra):
    """The script with its run directory (timm's <output>/<experiment>) at ``tmp_path``."""
    return tt.main(BASE + ["--output", str(tmp_path.parent), "--experiment", tmp_path.name] + list(extra))


def test_default_strength_trains_views_alone_exactly_as_given(tmp_path):
    """--strength auto (augplug's default) without originals: the run equals the soft-target CE arm."""
    a = _run(tmp_path / "a", "--refiner", "saflex", "--strength", "auto", "--epochs", "2")
    b = _run(tmp_path / "b", "--refiner", "none", "--epochs", "2")
    for (k, p), q in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(p, q), k
    assert a["refiner"].stats["strength"] == 0.0


def _check_summary(tmp_path, epochs):
    with open(os.path.join(tmp_path, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs
    for key in ("train_loss", "train_strength", "train_weight_mean", "train_kept_fraction", "train_relabel_rate",
                "eval_val_top1", "eval_test_top1", "lr"):
        assert key in rows[0]
    assert np.isfinite(float(rows[-1]["train_loss"]))
    return rows


@pytest.mark.parametrize("method", ["saflex", "l2rw", "none"])
def test_refiners_run_and_get_dataset_positions(tmp_path, recorder, method):
    out = _run(tmp_path, "--refiner", method)
    _check_summary(tmp_path, 1)
    assert out["refiner"].method == method
    assert len(recorder.calls) == 3
    train = tt.build_datasets(out["args"])["train"]
    for call in recorder.calls:
        idx = call["index"]
        assert idx is not None and idx.shape == (call["batch"],)
        assert len(set(idx.tolist())) == idx.numel()                  # a batch never repeats a position
        labels = torch.tensor([train.dataset.base[int(train.dataset.indices[i])][1] for i in idx])
        assert torch.equal(labels, call["targets"].long())             # index really points at the row's sample
    if method != "none":
        st = out["refiner"].stats
        assert st["weights"].shape == (16,) and torch.isfinite(st["weights"]).all()
        assert out["final"]["train_kept_fraction"] == out["final"]["train_kept_fraction"]  # not NaN


def test_none_refiner_equals_timms_own_loss(tmp_path):
    """The control arm through the refiner (soft-target CE) trains exactly like timm's CrossEntropyLoss."""
    a = _run(tmp_path / "a", "--refiner", "none", "--epochs", "2")
    b = _run(tmp_path / "b", "--refiner", "off", "--epochs", "2")
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5, abs=1e-6)
        assert ra["test_top1"] == rb["test_top1"]
    for pa, pb in zip(a["model"].parameters(), b["model"].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_reproducible_under_a_seed(tmp_path):
    a = _run(tmp_path / "a", "--refiner", "saflex", "--aa", "rand-m9-mstd0.5", "--epochs", "2")
    b = _run(tmp_path / "b", "--refiner", "saflex", "--aa", "rand-m9-mstd0.5", "--epochs", "2")
    for ra, rb in zip(a["history"], b["history"]):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def test_mixup_cutmix_soft_targets_reach_the_refiner(tmp_path, recorder):
    _run(tmp_path, "--refiner", "saflex", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1")
    _check_summary(tmp_path, 1)
    for call in recorder.calls:
        y = call["targets"]
        assert y.shape == (16, 10)
        torch.testing.assert_close(y.sum(1), torch.ones(16))
        assert float(y.min()) >= 0.1 / 10 - 1e-6                       # timm folds the smoothing in
        assert (y.max(1).values < 1).all()


def test_label_smoothing_without_mixup(tmp_path, recorder):
    _run(tmp_path, "--refiner", "l2rw", "--smoothing", "0.2")
    y = recorder.calls[0]["targets"]
    assert y.shape == (16, 10)
    torch.testing.assert_close(y.max(1).values, torch.full((16,), 0.8 + 0.02))
    torch.testing.assert_close(y.min(1).values, torch.full((16,), 0.02))


def test_amp_bf16_on_cpu(tmp_path, recorder):
    out = _run(tmp_path, "--refiner", "saflex", "--amp", "--device", "cpu")
    _check_summary(tmp_path, 1)
    assert all(c["logits_dtype"] == torch.bfloat16 for c in recorder.calls)
    assert torch.isfinite(out["refiner"].stats["weights"]).all()


def test_isda(tmp_path):
    pytest.importorskip("augplug.isda")
    out = _run(tmp_path, "--refiner", "saflex", "--isda", "--isda-lambda", "0.5", "--epochs", "2")
    _check_summary(tmp_path, 2)
    isda = out["refiner"].isda
    assert isda is not None and isda.lambda0 == 0.5
    assert isda.lam == pytest.approx(0.5 * 1 / 2)                      # the paper's schedule, set per epoch


def test_with_originals_pairs_rows(tmp_path, recorder):
    _run(tmp_path, "--refiner", "saflex", "--with-originals", "--aa", "rand-m9-mstd0.5")
    for call in recorder.calls:
        assert call["batch"] == 32 and call["num_original"] == 16
        assert torch.equal(call["index"][:16], call["index"][16:])
        assert torch.equal(call["targets"][:16], call["targets"][16:])


def test_validation_split_is_stratified_and_disjoint():
    args = tt.build_parser().parse_args(["--dataset", "digits", "--val-split", "0.25", "--img-size", "8"])
    ds = tt.build_datasets(args)
    tr, va = ds["train_indices"], ds["val_indices"]
    assert not set(tr) & set(va)
    pool_labels = ds["train"].dataset.base.labels
    assert len(va) == round(0.25 * len(pool_labels))
    counts = np.bincount(pool_labels[va], minlength=10)
    expected = 0.25 * np.bincount(pool_labels, minlength=10)
    assert np.all(np.abs(counts - expected) < 1.0)                     # largest-remainder rounding
    args = tt.build_parser().parse_args(["--dataset", "digits", "--val-split", "30", "--img-size", "8"])
    assert len(tt.build_datasets(args)["val_indices"]) == 30


def test_audit_files_and_rows(tmp_path):
    out = _run(tmp_path, "--refiner", "saflex", "--aa", "rand-m9-mstd0.5", "--audit")
    audit = out["audit"]
    assert audit.summary()["rows"] == 3 * 16
    assert os.path.exists(tmp_path / "audit.md") and os.path.exists(tmp_path / "audit.png")


def test_image_folder_data_dir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 4)):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / "data" / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    out = tt.main(["--data-dir", str(tmp_path / "data"), "--model", "test_resnet", "--img-size", "16", "-b", "8",
                   "--epochs", "1", "--max-steps", "2", "--val-split", "8", "--refiner", "saflex",
                   "--output", str(tmp_path), "--experiment", "run"])
    assert out["refiner"].stats["weights"].shape == (8,)
    assert out["final"]["test_top1"] >= 0


def test_fashion_mnist_falls_back_to_digits(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AUGPLUG_FMNIST_DIR", str(tmp_path / "missing"))
    args = tt.build_parser().parse_args(["--dataset", "fashion-mnist", "--img-size", "8"])
    with caplog.at_level("WARNING"):
        ds = tt.build_datasets(args)
    assert "falling back to --dataset digits" in caplog.text
    assert ds["num_classes"] == 10 and len(ds["train"]) + len(ds["val_indices"]) == 1797 - 359


def test_bad_flags_fail_with_a_fix(tmp_path):
    with pytest.raises(augplug.ConfigurationError, match="validation"):
        _run(tmp_path, "--refiner", "saflex", "--val-split", "0")
    with pytest.raises(augplug.ConfigurationError, match="even"):
        _run(tmp_path, "--mixup", "0.5", "-b", "15")


AUTODO = _method_available("autodo", {"num_points": 10, "num_classes": 10})
INFLUENCE = _method_available("influence", {})


def test_autodo_with_originals_is_refused_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--refiner", "autodo", "--with-originals")
    assert "drop --with-originals" in capsys.readouterr().err


@pytest.mark.skipif(not AUTODO, reason="augplug.methods.autodo is not available")
def test_autodo(tmp_path, recorder):
    out = _run(tmp_path, "--refiner", "autodo")
    _check_summary(tmp_path, 1)
    assert out["refiner"].method == "autodo"
    assert all(c["index"] is not None for c in recorder.calls)


@pytest.mark.skipif(not INFLUENCE, reason="augplug.methods.influence is not available")
def test_influence_gets_paired_originals(tmp_path, recorder):
    out = _run(tmp_path, "--refiner", "influence")
    _check_summary(tmp_path, 1)
    assert out["refiner"].method == "influence"
    assert all(c["num_original"] == 16 and c["batch"] == 32 for c in recorder.calls)


def test_fp16_grad_scaler_counts_only_real_updates(tmp_path, monkeypatch):
    """--amp --amp-dtype float16 goes through timm's NativeScaler; the refiner counts the steps taken."""
    taken = []

    def counting_optimizer(*a, **kw):
        opt = tt_create_optimizer(*a, **kw)
        opt.register_step_post_hook(lambda *_: taken.append(1))
        return opt

    tt_create_optimizer = tt.create_optimizer_v2
    monkeypatch.setattr(tt, "create_optimizer_v2", counting_optimizer)
    out = _run(tmp_path, "--refiner", "saflex", "--amp", "--amp-dtype", "float16", "--device", "cpu")
    refiner = out["refiner"]
    assert refiner.calls == 3
    assert refiner.step_count == len(taken) <= 3


def test_refiner_as_timm_task_criterion():
    """timm >= 1.0.23: ClassificationTask(model, criterion=refiner) gives the refiner's own loss."""
    task_mod = pytest.importorskip("timm.task")
    import timm

    def make():
        torch.manual_seed(0)
        m = timm.create_model("test_resnet", num_classes=3, in_chans=1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        val = [(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2] * 2 + [0, 1]))]
        return m, augplug.AugmentationRefiner(m, opt, val, method="saflex", strength=1.0)

    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 2, 1, 0])
    m1, r1 = make()
    task = task_mod.ClassificationTask(m1, criterion=r1, device=torch.device("cpu"), verbose=False)
    loss_task = task(x, y)["loss"]
    m2, r2 = make()
    loss_direct = r2(m2(x), y)
    torch.testing.assert_close(loss_task, loss_direct)
    torch.testing.assert_close(r1.stats["weights"], r2.stats["weights"])
    assert not torch.allclose(r1.stats["weights"], torch.ones(6))      # the refiner did weight the rows


def test_generated_sources_are_mixed_in_and_audited(tmp_path, recorder):
    from PIL import Image

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "diffA.npz", images=rng.integers(0, 255, (20, 12, 12, 3), dtype=np.uint8),
             labels=np.arange(20) % 10)
    for c in ("class2", "class7"):                         # a folder source with two of the ten classes
        os.makedirs(tmp_path / "diffB" / c)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "diffB" / c / f"{i}.png")
    out = _run(tmp_path / "run", "--refiner", "saflex", "--generated", str(tmp_path / "diffA.npz"),
               "--generated", str(tmp_path / "diffB"), "--generated-per-batch", "4")
    assert out["mixer"].source_names == ["real", "diffA", "diffB"]
    for call in recorder.calls:
        assert call["batch"] == 16 + 4 + 4
        assert call["index"] is None
        tail = call["targets"][20:]
        assert set(tail.tolist()) <= {2, 7}                 # folder classes mapped to the training classes
    per = out["sources"].per_source()
    assert {k: v["rows"] for k, v in per.items()} == {"real": 48, "diffA": 12, "diffB": 12}
    assert (tmp_path / "run" / "sources.md").exists()
    with pytest.raises(augplug.ConfigurationError, match="generated"):
        _run(tmp_path / "bad", "--refiner", "off", "--generated", str(tmp_path / "diffA.npz"))


def test_generated_images_become_model_inputs():
    x = torch.rand(1, 8, 8)
    tf = tt.ToModelInput(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), in_chans=3)
    out = tf(x)
    up = torch.nn.functional.interpolate(x[None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)[0]
    expected = (up.expand(3, -1, -1) - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(out, expected)
    rgb = torch.rand(3, 16, 16)
    torch.testing.assert_close(tt.ToModelInput(16, (0.5,), (0.5,), in_chans=1)(rgb), (rgb.mean(0, keepdim=True) - 0.5) / 0.5)
