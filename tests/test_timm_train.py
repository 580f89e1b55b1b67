"""The timm training script, run in-process on tiny data (a timm test model at 16x16, 2-3 steps)."""
import argparse
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import augplug

# skips where timm is too old for the script (TimmVersionError is an ImportError)
tt = pytest.importorskip("augplug.integrations.timm_train", exc_type=ImportError)

BASE = ["--dataset", "synthetic", "--synthetic-size", "96", "--model", "test_resnet", "--img-size", "16",
        "-b", "16", "--epochs", "1", "--max-steps", "3", "--val-split", "16", "--val-batch-size", "16",
        "--seed", "3", "--device", "cpu",  # CPU everywhere: the comparisons below are fp32-exact on CPU
        "--strength", "1",  # refine the views alone too (the default, 'auto', trains them as given)
        # timm's defaults (smoothing 0.1, 5 warm-up epochs, lr from --lr-base) off: hard labels, a real step size
        "--smoothing", "0", "--warmup-epochs", "0", "--lr", "0.05"]


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


def _run(tmp_path, *extra, base=BASE):
    """The script with its run directory (timm's <output>/<experiment>) at ``tmp_path``."""
    return tt.main(base + ["--output", str(tmp_path.parent), "--experiment", tmp_path.name] + list(extra))


#: BASE without its --strength (refused for the methods that have none)
NO_STRENGTH = [a for i, a in enumerate(BASE) if a != "--strength" and BASE[i - 1] != "--strength"]


def test_default_strength_trains_views_alone_exactly_as_given(tmp_path, caplog):
    """--strength auto (augplug's default) without originals: the run equals the soft-target CE arm,
    and the script says so and names --with-originals (the README's command once ran this way)."""
    import logging
    with caplog.at_level(logging.WARNING, logger="timm_train"):
        a = _run(tmp_path / "a", "--refiner", "saflex", "--strength", "auto", "--epochs", "2")
    assert any("--with-originals" in r.getMessage() and "as given" in r.getMessage() for r in caplog.records)
    b = _run(tmp_path / "b", "--refiner", "none", "--epochs", "2")
    for (k, p), q in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(p, q), k
    assert a["refiner"].stats["strength"] == 0.0


def _check_summary(tmp_path, epochs):
    with open(os.path.join(tmp_path, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs
    for key in ("train_loss", "train_strength", "train_aug_weight", "train_weight_ess", "train_moved_weight",
                "train_moved_class_weight", "train_relabel_rate",
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
        assert out["final"]["train_weight_ess"] == out["final"]["train_weight_ess"]  # not NaN


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
    exact = ("--refiner-budget", "none")   # bit-reproducible: the exact schedule, not one driven by measured time
    a = _run(tmp_path / "a", "--refiner", "saflex", "--aa", "rand-m9-mstd0.5", "--epochs", "2", *exact)
    b = _run(tmp_path / "b", "--refiner", "saflex", "--aa", "rand-m9-mstd0.5", "--epochs", "2", *exact)
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
    # 32x32, not 16x16: at 16x16 test_resnet's layer4 gets a 1x1 map, and torch's CPU bf16 weight
    # gradient of a 3x3 stride-2 convolution on a 1x1 map reads uninitialized memory (non-finite or
    # wrong gradients, depending on what the allocator hands out: `test_cpu_bf16_conv_on_1x1_maps`)
    out = _run(tmp_path, "--refiner", "saflex", "--amp", "--device", "cpu", "--img-size", "32")
    _check_summary(tmp_path, 1)
    assert all(c["logits_dtype"] == torch.bfloat16 for c in recorder.calls)
    assert torch.isfinite(out["refiner"].stats["weights"]).all()


def test_cpu_bf16_conv_on_1x1_maps():
    """Documents the torch behaviour the bf16 test above avoids: on a 1x1 map the CPU bf16 weight
    gradient of a 3x3 stride-2 padded convolution differs from the fp32 gradient of the same
    bf16-rounded operands by far more than bf16 rounding (or is not finite), while on a 2x2 map it
    agrees. Skipped once torch computes it right, so the bf16 test may go back to 16x16."""
    def worst_error(side):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(192, 96, 3, stride=2, padding=1, bias=False)
        worst = 0.0
        for _ in range(6):
            junk = [torch.randn(1000 * (j + 1)) * 1e30 for j in range(50)]   # dirty the allocator's memory
            del junk
            x = torch.randn(16, 192, side, side)
            conv.weight.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
            out.float().sum().backward()
            w = conv.weight.detach().bfloat16().float().requires_grad_()
            torch.nn.functional.conv2d(x.bfloat16().float(), w, stride=2, padding=1).sum().backward()
            err = (conv.weight.grad.float() - w.grad).abs().max() / w.grad.abs().max()
            worst = max(worst, float(err) if torch.isfinite(err) else float("inf"))
        return worst

    assert worst_error(2) < 0.01   # the comparison works where torch is right
    if worst_error(1) < 0.01:
        pytest.skip("torch's CPU bf16 convolution gradient is right on 1x1 maps in this version")


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


def test_audit_beside_the_learned_share_says_the_weights_read_one(tmp_path, caplog):
    """With originals and --strength auto every view keeps weight 1 beside the learned share: the
    audit's weight columns would read 1, so the run says what to pass for a weight per view."""
    args = ["--refiner", "saflex", "--strength", "auto", "--with-originals", "--aa", "rand-m9-mstd0.5", "--audit",
            "--epochs", "1"]
    with caplog.at_level("WARNING"):
        out = _run(tmp_path / "a", *args)
    assert "weighting=soft" in caplog.text and float(out["refiner"].stats["weights"].std()) == 0.0
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = _run(tmp_path / "b", *args, "--refiner-kwargs", "weighting=soft")
    assert "weighting=soft" not in caplog.text and float(out["refiner"].stats["weights"].std()) > 0


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




def test_autodo_with_originals_is_refused_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--refiner", "autodo", "--with-originals")
    assert "drop --with-originals" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--epochs", "0"], "--epochs must be at least 1"),
                                          (["-b", "0"], "--batch-size must be at least 1"),
                                          (["--lr", "-0.1"], "--lr must be positive"),
                                          (["--workers", "-1"], "--workers must be >= 0"),
                                          (["--max-steps", "-1"], "--max-steps must be at least 1"),
                                          (["--val-split", "1.5"], "a fraction in [0, 1)"),
                                          (["--val-split", "-3"], "a fraction in [0, 1)"),
                                          (["--train-subset", "0"], "--train-subset must be"),
                                          (["--strength", "abc"], "'auto', 'adaptive' or a number"),
                                          (["--val-batches", "xyz"], "'all' or a count"),
                                          (["--refiner-budget", "abc"], "budget must be")])
def test_bad_numbers_are_usage_errors(tmp_path, capsys, args, message):
    """Before: --epochs 0 died in timm's scheduler with a bare AssertionError, -b 0 in the loader."""
    with pytest.raises(SystemExit):
        _run(tmp_path, *args)
    assert message in capsys.readouterr().err


def test_autodo(tmp_path, recorder):
    out = _run(tmp_path, "--refiner", "autodo", base=NO_STRENGTH)
    _check_summary(tmp_path, 1)
    assert out["refiner"].method == "autodo"
    assert all(c["index"] is not None for c in recorder.calls)


def test_influence_gets_paired_originals(tmp_path, recorder):
    out = _run(tmp_path, "--refiner", "influence", base=NO_STRENGTH)
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
        return m, augplug.AugmentationRefiner(m, opt, val, method="saflex", method_options=dict(strength=1.0))

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


# ------------------------------------------------------------------------------- checkpoints, resume, timm's layout
# Everything with state or randomness across the resume point: the refiner (refresh every 2 updates, so
# the direction in use at the stop was computed before it) with ISDA, Mixup/CutMix, RandAugment, drop
# path, an EMA, gradient accumulation (5 micro-batches per epoch in updates of 2, 2 and 1), warm-up.
RESUME = ["--refiner", "saflex", "--refiner-budget", "none", "--isda", "--refresh-every", "2", "--epochs", "3", "--max-steps", "3",
          "--grad-accum-steps", "2", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1",
          "--aa", "rand-m9-mstd0.5", "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9",
          "--warmup-epochs", "1", "--checkpoint-hist", "2"]


def _rows(run_dir):
    with open(os.path.join(run_dir, "summary.csv")) as f:
        lines = [line for line in f.read().splitlines() if line]
    assert sum(line.startswith("epoch,") for line in lines) == 1, "one header"
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in csv.DictReader(lines)]


def _load(path):
    """A checkpoint as timm's resume reads it (weights only, plus the args Namespace)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    out = tt.main(BASE + ["--output", str(run.parent), "--experiment", run.name] + RESUME)
    return run, out


def test_stop_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    """3 epochs in one go == 1 epoch, stop, `--resume auto` to 3: bit-identical weights, EMA, optimizer
    and refiner, and the same summary rows; a third `--resume auto` finds the run complete."""
    full_dir, full = uninterrupted
    run = tmp_path / "run"
    first = _run(run, *RESUME, "--resume", "auto", "--stop-epoch", "1")   # nothing to resume yet: a fresh run
    assert [r["epoch"] for r in first["history"]] == [0]
    ckpt = _load(run / "last.pth.tar")
    assert ckpt["epoch"] == 0 and ckpt["task_state"]["refiner"]["step_count"] == 3 and "state_dict_ema" in ckpt
    second = _run(run, *RESUME, "--resume", "auto")
    assert [r["epoch"] for r in second["history"]] == [1, 2]
    assert second["refiner"].step_count == full["refiner"].step_count == 9 and second["refiner"].calls == 15
    _assert_same_tensors(full["model"].state_dict(), second["model"].state_dict())
    ema = lambda out: out["task"].get_trainable_module(ema=True).state_dict()  # noqa: E731
    _assert_same_tensors(ema(full), ema(second))
    assert not torch.equal(ema(full)["module.fc.weight"], full["model"].state_dict()["fc.weight"])
    a, b = (_load(d / "last.pth.tar") for d in (full_dir, run))
    assert a["epoch"] == b["epoch"] == 2
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_tensors(sa, sb)
    ra, rb = a["task_state"]["refiner"], b["task_state"]["refiner"]
    assert ra.keys() == rb.keys() and ra["step_count"] == rb["step_count"] and torch.equal(ra["rng_state"], rb["rng_state"])
    _assert_same_tensors(ra["v"], rb["v"])
    _assert_same_tensors({k: ra["isda"][k] for k in ("mean", "cov")}, {k: rb["isda"][k] for k in ("mean", "cov")})
    assert _rows(run) == _rows(full_dir)                                  # summary continued, not restarted
    if hasattr(tt.CheckpointSaver, "load_state_dict_from_checkpoint"):  # timm >= 1.0.31 continues its history
        kept = sorted(p.name for p in run.glob("checkpoint-*.pth.tar"))
        assert kept == sorted(p.name for p in full_dir.glob("checkpoint-*.pth.tar")) and len(kept) == 2
    assert yaml.safe_load((run / "args.yaml").read_text())["resume"] == "auto"
    third = _run(run, *RESUME, "--resume", "auto")                        # complete: nothing to do
    assert third["history"] == [] and _rows(run) == _rows(full_dir)


def test_resume_without_the_refiner_state_diverges(tmp_path, uninterrupted, caplog):
    """Control for the test above: the same stop and resume from a checkpoint whose refiner state was
    dropped (a fresh refiner: new direction, refresh schedule and random stream) ends elsewhere."""
    full_dir, full = uninterrupted
    _run(tmp_path / "part", *RESUME, "--stop-epoch", "1")
    ckpt = _load(tmp_path / "part" / "last.pth.tar")
    del ckpt["task_state"]
    torch.save(ckpt, tmp_path / "no_refiner.pth.tar")
    with caplog.at_level("WARNING"):
        out = _run(tmp_path / "resumed", *RESUME, "--resume", str(tmp_path / "no_refiner.pth.tar"))
    assert "no refiner state" in caplog.text
    assert [r["epoch"] for r in out["history"]] == [1, 2]
    assert not torch.equal(out["model"].state_dict()["fc.weight"], full["model"].state_dict()["fc.weight"])


def test_timm_layout_default_output_dir_and_a_fresh_run_into_an_existing_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tt.main(BASE + ["--refiner", "none", "--epochs", "2"])          # no --output, no --experiment
    run = Path(out["output_dir"])
    assert run.parent.resolve() == (tmp_path / "output" / "train").resolve()
    assert run.name.endswith("-test_resnet-16")
    for f in ("args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar", "checkpoint-0.pth.tar",
              "checkpoint-1.pth.tar"):
        assert (run / f).is_file(), f
    assert [r["epoch"] for r in _rows(run)] == ["0", "1"]
    best = _load(run / "model_best.pth.tar")
    assert best["metric"] == max(r["val_top1"] for r in out["history"])   # ranked on the clean validation split
    # the same experiment again without --resume: timm starts its summary over (the file stays)
    again = tt.main(BASE + ["--refiner", "none", "--epochs", "1", "--output", str(run.parent), "--experiment", run.name])
    assert again["output_dir"] == str(run) and [r["epoch"] for r in _rows(run)] == ["0"]


def test_summary_rule_without_timms_trim_summary(tmp_path, monkeypatch):
    """timm < 1.0.31 has no trim_summary; the script applies the same rule itself."""
    run = tmp_path / "run"
    _run(run, "--refiner", "none", "--epochs", "3", "--stop-epoch", "2")
    monkeypatch.setattr(tt, "_timm_trim_summary", None)
    with open(run / "summary.csv", "a") as f:                             # a row a crash left behind
        f.write("2,9,9,9,9,9,9,9,9,9,9,9\n")
    _run(run, "--refiner", "none", "--epochs", "3", "--resume", str(run / "last.pth.tar"))
    assert [r["epoch"] for r in _rows(run)] == ["0", "1", "2"]
    _run(run, "--refiner", "none", "--epochs", "1")
    assert [r["epoch"] for r in _rows(run)] == ["0"]


def test_resume_errors_name_the_fix(tmp_path):
    with pytest.raises(SystemExit):
        tt.main(BASE + ["--resume", "auto"])                              # no --experiment
    with pytest.raises(augplug.ConfigurationError, match="no such checkpoint"):
        _run(tmp_path, "--resume", str(tmp_path / "missing.pth.tar"))
    with pytest.raises(augplug.ConfigurationError, match="stop-epoch"):
        _run(tmp_path, "--epochs", "2", "--stop-epoch", "3")


def test_gradient_accumulation_counts_updates(tmp_path):
    """5 micro-batches in updates of 2: 3 optimizer updates (the last one short), 5 refiner calls."""
    out = _run(tmp_path, "--refiner", "saflex", "--grad-accum-steps", "2", "--max-steps", "3")
    assert out["refiner"].calls == 5 and out["refiner"].step_count == 3


# 68 synthetic images less 16 held out, in batches of 4: 13 micro-batches an epoch (all of them: --max-steps 3
# of 5 would be 15); updates of 5 micro-batches leave a last group of 3
SHORT_LAST_GROUP = ["--synthetic-size", "68", "-b", "4", "--grad-accum-steps", "5"]


def test_short_last_group_is_one_update(tmp_path, monkeypatch):
    """13 micro-batches in updates of 5: updates after micro-batches 5, 10 and 13 (ceil(13 / 5) = 3 an
    epoch, what the schedule and a resume count), and the last three losses each divided by 3."""
    class LastLoss(augplug.AugmentationRefiner):
        def __call__(self, *a, **kw):
            loss = super().__call__(*a, **kw)
            self.last_loss = loss.detach()
            return loss

    seen = []
    backward = tt._backward

    def recording_backward(loss, task, optimizer, loss_scaler, args, need_update):
        seen.append((task.refiner.calls, float(task.refiner.last_loss) / float(loss.detach()), need_update))
        backward(loss, task, optimizer, loss_scaler, args, need_update)

    monkeypatch.setattr(tt, "AugmentationRefiner", LastLoss)
    monkeypatch.setattr(tt, "_backward", recording_backward)
    out = _run(tmp_path, *SHORT_LAST_GROUP, "--refiner", "none", "--epochs", "2")
    assert [calls for calls, _, update in seen if update] == [5, 10, 13, 18, 23, 26]
    assert [divisor for _, divisor, _ in seen] == pytest.approx(([5] * 10 + [3] * 3) * 2)
    assert out["refiner"].step_count == 2 * 3 and out["refiner"].calls == 26


@pytest.mark.parametrize("counted_by", [["--sched-on-updates"], ["--model-ema", "--model-ema-warmup"]],
                         ids=["sched-on-updates", "ema-warmup"])
def test_resume_after_a_short_last_group_equals_the_uninterrupted_run(tmp_path, counted_by):
    """A resume restarts the update count at epochs x updates per epoch; with a last group of 3
    micro-batches (more than one) the per-update schedule and the EMA warm-up see the same counts
    as the uninterrupted run: the same weights and EMA."""
    flags = [*SHORT_LAST_GROUP, "--refiner", "saflex", "--refiner-budget", "none", "--epochs", "2",
             "--warmup-epochs", "1", *counted_by]
    full = _run(tmp_path / "full", *flags)
    _run(tmp_path / "part", *flags, "--stop-epoch", "1")
    resumed = _run(tmp_path / "part", *flags, "--resume", "auto")
    assert [r["epoch"] for r in resumed["history"]] == [1]
    assert full["refiner"].step_count == resumed["refiner"].step_count == 2 * 3
    _assert_same_tensors(full["model"].state_dict(), resumed["model"].state_dict())
    if "--model-ema" in counted_by:
        ema = lambda out: out["task"].get_trainable_module(ema=True).state_dict()  # noqa: E731
        _assert_same_tensors(ema(full), ema(resumed))


def test_control_arm_logs_no_refiner_statistics(tmp_path):
    """--refiner none refines nothing: its strength, share, weight ESS, moved weight and relabel rate are
    NaN in the log and the summary (not 1, 1, 1, 0, 0, which read like a refined run's)."""
    out = _run(tmp_path, "--refiner", "none")
    keys = ("strength", "aug_weight", "weight_ess", "moved_weight", "moved_class_weight", "relabel_rate")
    assert all(np.isnan(out["final"][f"train_{k}"]) for k in keys)
    assert np.isfinite(out["final"]["train_loss"])
    row = _check_summary(tmp_path, 1)[0]
    assert all(np.isnan(float(row[f"train_{k}"])) for k in keys)


@pytest.mark.parametrize("method", ["autodo", "influence"])
def test_strength_is_a_usage_error_for_a_method_without_one(tmp_path, capsys, method):
    """--strength would be ignored by autodo and influence (they have no strength): refused at parse
    time; without the flag the default is 'auto', recorded as such."""
    with pytest.raises(SystemExit):
        _run(tmp_path / "bad", "--refiner", method, "--strength", "0")
    err = capsys.readouterr().err
    assert f"--refiner {method} has none" in err and "drop --strength" in err
    out = _run(tmp_path / "default", "--refiner", "saflex", base=NO_STRENGTH)
    assert out["args"].strength == "auto" and out["refiner"].stats["strength"] == 0.0
    assert yaml.safe_load((tmp_path / "default" / "args.yaml").read_text())["strength"] == "auto"


def test_audit_added_on_resume_is_refused_with_a_fix_the_cli_can_apply(tmp_path):
    """A run started without --audit, resumed with it: the checkpoint has no audit to continue. The fix
    names what to do on the command line (no strict=False), and the refused resume changes nothing."""
    run = tmp_path / "run"
    flags = ["--refiner", "saflex", "--aa", "rand-m9-mstd0.5", "--epochs", "2"]
    _run(run, *flags, "--stop-epoch", "1")
    rows, ckpt, args_yaml = _rows(run), (run / "last.pth.tar").read_bytes(), (run / "args.yaml").read_text()
    with pytest.raises(augplug.ConfigurationError) as info:
        _run(run, *flags, "--resume", "auto", "--audit")
    assert "without --audit" in info.value.problem
    assert "resume without --audit" in info.value.fix and "strict" not in info.value.fix
    assert _rows(run) == rows and (run / "last.pth.tar").read_bytes() == ckpt and (run / "args.yaml").read_text() == args_yaml
    assert [r["epoch"] for r in _run(run, *flags, "--resume", "auto")["history"]] == [1]   # the fix works


def test_accumulated_updates_equal_full_batch_updates(tmp_path):
    """Without batch statistics (a ViT) and without refinement, 2 micro-batches of 8 accumulate the
    gradient of one batch of 16: the same data order, the same weights after 3 updates."""
    vit = ["--model", "test_vit", "--model-kwargs", "img_size=16", "patch_size=4", "--refiner", "none",
           "--color-jitter", "0", "--train-interpolation", "bilinear"]
    a = _run(tmp_path / "full", *vit, "-b", "16")
    b = _run(tmp_path / "accum", *vit, "-b", "8", "--grad-accum-steps", "2")
    assert a["refiner"].step_count == b["refiner"].step_count == 3 and b["refiner"].calls == 6
    for (k, p), q in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)


def test_drop_path_reaches_the_model(tmp_path):
    out = _run(tmp_path, "--refiner", "none", "--drop-path", "0.2")
    rates = [m.drop_prob for m in out["model"].modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)


def test_torchcompile_trains_like_eager(tmp_path):
    """--torchcompile (here the 'eager' backend: Dynamo without code generation) trains the compiled
    model with the refiner's hooks firing, to the same weights as the plain run."""
    a = _run(tmp_path / "plain", "--refiner", "saflex")
    b = _run(tmp_path / "compiled", "--refiner", "saflex", "--torchcompile", "eager")
    assert hasattr(b["task"].get_trainable_module(), "_orig_mod")
    assert not torch.allclose(b["refiner"].stats["weights"], torch.ones(16))
    for (k, p), q in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


def test_timm_defaults():
    """Flags named as in timm's train.py default to timm's values (deviations are listed in --help)."""
    args = tt.build_parser().parse_args([])
    assert (args.smoothing, args.warmup_epochs, args.weight_decay, args.lr, args.lr_base, args.lr_base_size) == \
        (0.1, 5, 2e-5, None, 0.1, 256)
    assert (args.checkpoint_hist, args.model_ema_decay, args.grad_accum_steps, args.drop_path, args.log_interval) == \
        (10, 0.9998, 1, None, 50)
    assert (args.color_jitter, args.scale, args.train_interpolation, args.output, args.experiment) == \
        (0.4, [0.08, 1.0], "random", "", "")
    tt._resolve_lr(args)
    assert args.lr == pytest.approx(0.1 * 64 / 256)
    help_text = tt.build_parser().format_help()
    for flag in tt.DEVIATIONS:
        assert flag in help_text


def test_saflex_share_steps_for_the_runs_length(tmp_path, monkeypatch):
    """The script knows the run's updates (1 epoch of --max-steps 3): SAflex's learned share steps
    0.4 / sqrt(3); an aug_weight the user sets is kept."""
    built = []

    class Keep(augplug.AugmentationRefiner):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    monkeypatch.setattr(tt, "AugmentationRefiner", Keep)
    _run(tmp_path, "--refiner", "saflex", "--with-originals")
    assert built[-1].share.horizon == 3 and built[-1].share.lr == pytest.approx(0.4 / 3 ** 0.5)
    _run(tmp_path / "fixed", "--refiner", "saflex", "--with-originals", "--method-options", "aug_weight=0.5")
    assert built[-1].share is None and float(built[-1].aug_weight) == 0.5


def test_refiner_budget_reaches_the_schedule(tmp_path):
    """--refiner-budget: the refiner gets Schedule(budget=...), and in full-model mode the budget
    spaces out the model's score passes (stats name both intervals); the default is 'auto', 'none' the
    exact schedule; a bad value is a clear error."""
    out = _run(tmp_path / "a", "--refiner", "saflex", "--refiner-mode", "full", "--refiner-budget", "0.5")
    refiner = out["refiner"]
    assert refiner.schedule.budget == 0.5
    assert {"refresh_interval", "model_scores_every", "overhead"} <= set(refiner.stats)
    default = _run(tmp_path / "b", "--refiner", "saflex")
    assert default["refiner"].schedule.budget == "auto" and "overhead" in default["refiner"].stats
    plain = _run(tmp_path / "d", "--refiner", "saflex", "--refiner-budget", "none")
    assert plain["refiner"].schedule.budget is None and "overhead" not in plain["refiner"].stats
    with pytest.raises(SystemExit):   # a usage error at parse time, naming the flag
        _run(tmp_path / "c", "--refiner", "saflex", "--refiner-budget", "-1")


def test_generated_with_strength_auto_warns_that_nothing_is_weighed(tmp_path, caplog):
    """The mixer's batches hold no originals, so --strength auto trains every row as given: the
    script says so (before training and at the end, where no sources.md is written)."""
    import logging
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "gen.npz", images=rng.integers(0, 255, (20, 12, 12, 3), dtype=np.uint8),
             labels=np.arange(20) % 10)
    with caplog.at_level(logging.WARNING, logger="timm_train"):
        _run(tmp_path / "run", "--refiner", "saflex", "--generated", str(tmp_path / "gen.npz"), "--strength", "auto")
    warned = [r.getMessage() for r in caplog.records if "--generated" in r.getMessage()]
    assert len(warned) == 2 and all("--strength 1" in m for m in warned)
    assert not (tmp_path / "run" / "sources.md").exists()


def test_audit_without_randaugment_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path / "run", "--refiner", "saflex", "--audit")
    err = capsys.readouterr().err
    assert "--aa rand-" in err and "data split" not in err
