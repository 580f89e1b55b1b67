"""albumentations 2.x pipelines feeding the refiner; weights and relabels attributed to transforms."""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import augplug  # noqa: E402

A = pytest.importorskip("albumentations")
from albumentations.pytorch import ToTensorV2  # noqa: E402

from augplug import AugmentationRefiner  # noqa: E402
from augplug.report import AugmentationAudit, transform_names  # noqa: E402
from conftest import FlatNet  # noqa: E402


def _images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, n)


def _pipeline(seed):
    return A.Compose([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=0.0), A.RandomBrightnessContrast(p=0.5),
                      A.Normalize(mean=(0.5,), std=(0.25,)), ToTensorV2()], save_applied_params=True, seed=seed)


def _apply(pipe, images):
    outs = [pipe(image=im) for im in images]
    return torch.stack([o["image"] for o in outs]), [o["applied_transforms"] for o in outs]


def test_applied_params_name_what_was_applied():
    images, _ = _images()
    x, applied = _apply(_pipeline(0), images)
    assert x.shape == (24, 1, 8, 8) and x.dtype == torch.float32
    names = [transform_names(a) for a in applied]
    assert all("HorizontalFlip" in n for n in names)
    assert not any("VerticalFlip" in n or "Normalize" in n or "ToTensorV2" in n for n in names)
    with_bc = ["RandomBrightnessContrast" in n for n in names]
    assert 0 < sum(with_bc) < 24
    for i, n in enumerate(names):          # the rows without brightness/contrast are exactly the flipped image
        if "RandomBrightnessContrast" not in n:
            expected = (torch.from_numpy(images[i][:, ::-1, 0].copy()).float() / 255 - 0.5) / 0.25
            torch.testing.assert_close(x[i, 0], expected)


def test_pipeline_reproducible_under_a_seed():
    images, _ = _images()
    xa, na = _apply(_pipeline(7), images)
    xb, nb = _apply(_pipeline(7), images)
    torch.testing.assert_close(xa, xb)
    assert [transform_names(a) for a in na] == [transform_names(b) for b in nb]
    _, nc = _apply(_pipeline(8), images)
    assert [transform_names(a) for a in na] != [transform_names(c) for c in nc]




def test_refiner_weights_attributed_to_transforms():
    """Per-transform statistics from albumentations' applied params equal a hand computation."""
    torch.manual_seed(0)
    pipe = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.CoarseDropout(p=0.3),
                      A.Normalize(mean=(0.5,), std=(0.25,)), ToTensorV2()], save_applied_params=True, seed=1)
    clean = A.Compose([A.Normalize(mean=(0.5,), std=(0.25,)), ToTensorV2()])
    model = FlatNet(64, 16, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    vi, vl = _images(30, seed=9)
    val = [(torch.stack([clean(image=im)["image"] for im in vi]), torch.from_numpy(vl))]
    refiner = AugmentationRefiner(model, opt, val, method="saflex",
                                  method_options=dict(weighting='hard', beta=0.2, tau=0.3, normalize='rms'),
                                  schedule=dict(refresh_every=1))
    audit = AugmentationAudit(["a", "b", "c"])
    hand = {}
    for step in range(5):
        images, labels = _images(12, seed=step)
        x_aug, applied = _apply(pipe, images)
        x_orig = torch.stack([clean(image=im)["image"] for im in images])
        y = torch.from_numpy(labels)
        targets = torch.cat([y, y])
        loss = refiner(model(torch.cat([x_orig, x_aug])), targets, num_original=12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        st = refiner.stats
        audit.update(st, applied, targets)                 # albumentations' (name, params) lists, one per view
        for j, a in enumerate(applied):
            row = 12 + j
            w = float(st["weights"][row])
            rel = int(st["soft_targets"][row].argmax()) != int(y[j])
            for name in transform_names(a):
                hand.setdefault(name, []).append((w, w > 0, rel))
    recs = {r["transform"]: r for r in audit.records("transform")}
    assert set(recs) == set(hand)
    for name, rows in hand.items():
        arr = np.array(rows, dtype=float)
        assert recs[name]["rows"] == len(rows)
        np.testing.assert_allclose([recs[name]["weight_mean"], recs[name]["kept"], recs[name]["relabel_rate"]],
                                   arr.mean(0), rtol=1e-5)
    assert audit.summary()["rows"] == 60
    assert 0 < audit.summary()["kept"] < 1 and audit.summary()["relabel_rate"] > 0


def test_example_runs(tmp_path):
    ex = pytest.importorskip("augplug.integrations.albumentations_example")
    out = ex.main(["--epochs", "1", "--max-steps", "3", "--batch-size", "32", "--train-limit", "96",
                   "--val-size", "100", "--output", str(tmp_path)])
    audit = out["audit"]
    assert audit.summary()["rows"] == 96
    names = {r["transform"] for r in audit.records("transform")}
    assert "VerticalFlip" in names and not names & {"Normalize", "ToTensorV2", "Resize"}
    assert (tmp_path / "audit.md").exists() and (tmp_path / "audit.png").exists()


@pytest.mark.parametrize("flag,budget", [([], None), (["--budget", "auto"], "auto"), (["--budget", "0.2"], 0.2)])
def test_example_runs_the_exact_schedule_by_default(flag, budget, monkeypatch):
    """The docs print the example's audit as its output: under the default budget the schedule
    followed measured time, and the audit's digits changed from run to run."""
    ex = pytest.importorskip("augplug.integrations.albumentations_example")
    built = []

    def refiner(*args, **kwargs):
        built.append(kwargs["schedule"])
        return augplug.AugmentationRefiner(*args, **kwargs)
    monkeypatch.setattr(ex, "AugmentationRefiner", refiner)
    ex.main(["--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--train-limit", "32", "--val-size", "100",
             *flag])
    assert built == [{"budget": budget}]


@pytest.mark.parametrize("args,message", [(["--epochs", "0"], "--epochs must be at least 1"),
                                          (["--img-size", "0"], "--img-size must be at least 1"),
                                          (["--max-steps", "0"], "--max-steps must be at least 1"),
                                          (["--lr", "0"], "--lr must be positive"),
                                          (["--budget", "lots"], "budget")])
def test_example_rejects_bad_numbers(args, message, capsys):
    """Before: --epochs 0 died in a division by zero, --img-size 0 in a pydantic error from
    albumentations, and --lr 0 or --max-steps 0 trained nothing without a word."""
    ex = pytest.importorskip("augplug.integrations.albumentations_example")
    with pytest.raises(SystemExit):
        ex.main(args)
    assert message in capsys.readouterr().err


def _flips():
    return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.25)], save_applied_params=True)


def _fired(pipeline, n=600):
    img = np.zeros((4, 4, 3), np.uint8)
    return [frozenset(t for t, _ in pipeline(image=img)["applied_transforms"]) for _ in range(n)]


def test_seeded_transforms_fire_independently_and_repeat():
    """Compose(seed=) gives every transform the same stream in albumentations 2.0.8: every vertical flip
    is also a horizontal one. seed_albumentations gives each its own, and repeats under a seed."""
    from augplug.data import seed_albumentations
    same_stream = _fired(A.Compose(_flips().transforms, save_applied_params=True, seed=0))
    v = [f for f in same_stream if "VerticalFlip" in f]
    assert v and all("HorizontalFlip" in f for f in v)   # what the helper is for
    p = _flips()
    seed_albumentations(p, 0)
    fired = _fired(p)
    v = [f for f in fired if "VerticalFlip" in f]
    both = sum("HorizontalFlip" in f for f in v)
    assert 0.3 * len(v) < both < 0.7 * len(v)            # about half, as for independent draws
    q = _flips()
    seed_albumentations(q, 0)
    assert _fired(q) == fired
    r = _flips()
    seed_albumentations(r, 1)
    assert _fired(r) != fired


def test_worker_init_gives_each_worker_its_own_draws():
    from augplug.data import albumentations_worker_init, seed_albumentations

    class Views(torch.utils.data.Dataset):
        def __init__(self):
            self.pipeline = _flips()
            seed_albumentations(self.pipeline, 0)

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return "|".join(t for t, _ in self.pipeline(image=np.zeros((4, 4, 3), np.uint8))["applied_transforms"])

    def draws(seed, init):
        loader = torch.utils.data.DataLoader(Views(), batch_size=8, num_workers=2, worker_init_fn=init,
                                             generator=torch.Generator().manual_seed(seed))
        return [list(b) for b in loader]

    plain = draws(0, None)
    assert plain[0] == plain[1]                           # both workers start from the same copy
    seeded = draws(0, albumentations_worker_init)
    assert seeded[0] != seeded[1] and seeded == draws(0, albumentations_worker_init)


def test_seeding_helpers_name_what_they_take():
    from augplug.data import albumentations_worker_init, seed_albumentations
    with pytest.raises(TypeError, match="takes an albumentations Compose"):
        seed_albumentations(lambda image: image, 0)

    class NoPipeline(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i

    loader = torch.utils.data.DataLoader(NoPipeline(), batch_size=2, num_workers=1,
                                         worker_init_fn=albumentations_worker_init)
    with pytest.raises(Exception, match="'pipeline' attribute"):
        list(loader)
