"""The augmentation audit: per-transform / per-class statistics against brute-force sums."""
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from augplug import AugmentationRefiner, ShapeError, TargetError
from augplug.report import IDENTITY, AugmentationAudit, TracedRandAugment, transform_names
from conftest import FlatNet

OPS = ["Rotate", "Invert", "Equalize", "ShearX"]


def _fake_stats(g, batch=12, classes=4, active=True):
    aug = torch.rand(batch, generator=g) < 0.7
    aug[0] = True
    w = torch.rand(batch, generator=g) * 2
    w[torch.rand(batch, generator=g) < 0.25] = 0.0
    w[~aug] = 1.0
    soft = torch.softmax(3 * torch.randn(batch, classes, generator=g), -1)
    scores = torch.randn(batch, classes, generator=g)
    return {"weights": w, "soft_targets": soft, "scores": scores, "augmented": aug, "active": active}


def _random_names(rng, batch):
    out = []
    for _ in range(batch):
        k = rng.randint(0, 2)
        out.append(tuple(rng.sample(OPS, k)))
    return out


def _brute(calls):
    """Expected per-transform, per-class and per-cell means from explicit loops."""
    cells = defaultdict(list)
    by_t = defaultdict(list)
    by_c = defaultdict(list)
    for st, names, y in calls:
        ys = y if y.dim() == 2 else F.one_hot(y, st["soft_targets"].shape[1]).float()
        for i in range(len(names)):
            if not bool(st["augmented"][i]):
                continue
            c = int(ys[i].argmax())
            rec = (float(st["weights"][i]), float(st["weights"][i] > 0),
                   float(st["soft_targets"][i].argmax() != c), float((ys[i] * st["scores"][i]).sum()))
            ts = [t for t in dict.fromkeys(names[i])] or [IDENTITY]
            for t in ts:
                cells[(t, c)].append(rec)
                by_t[t].append(rec)
            by_c[c].append(rec)
    mean = lambda recs: np.mean(np.array(recs), 0)  # noqa: E731
    return ({k: (len(v), mean(v)) for k, v in by_t.items()}, {k: (len(v), mean(v)) for k, v in by_c.items()},
            {k: (len(v), mean(v)) for k, v in cells.items()})


def _check(rec, n, m):
    assert rec["rows"] == n
    np.testing.assert_allclose([rec["weight_mean"], rec["kept"], rec["relabel_rate"], rec["agreement_mean"]], m,
                               rtol=1e-5, atol=1e-6)


def test_audit_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    audit = AugmentationAudit(["a", "b", "c", "d"])
    calls = []
    for step in range(6):
        st = _fake_stats(g)
        names = _random_names(rng, 12)
        y = torch.randint(0, 4, (12,), generator=g) if step % 2 else torch.softmax(torch.randn(12, 4, generator=g), -1)
        assert audit.update(st, names, y)
        calls.append((st, names, y))
    by_t, by_c, cells = _brute(calls)
    recs = audit.records("transform")
    assert {r["transform"] for r in recs} == set(by_t)
    for r in recs:
        _check(r, *by_t[r["transform"]])
    assert [r["rows"] for r in recs] == sorted((r["rows"] for r in recs), reverse=True)
    for r in audit.records("class"):
        _check(r, *by_c["abcd".index(r["class"])])
    for r in audit.records("transform_class"):
        _check(r, *cells[(r["transform"], "abcd".index(r["class"]))])
    total_rows = sum(int(st["augmented"].sum()) for st, _, _ in calls)
    assert audit.summary()["rows"] == total_rows
    ts, cls, mat = audit.matrix("relabel_rate")
    for (t, c), (n, m) in cells.items():
        assert mat[ts.index(t), c] == pytest.approx(m[2])


def test_names_per_augmented_row_equal_names_per_row():
    g = torch.Generator().manual_seed(1)
    st = _fake_stats(g)
    names = _random_names(random.Random(1), 12)
    y = torch.randint(0, 4, (12,), generator=g)
    a, b = AugmentationAudit(num_classes=4), AugmentationAudit(num_classes=4)
    a.update(st, names, y)
    b.update(st, [n for n, m in zip(names, st["augmented"].tolist()) if m], y)
    assert a.records("transform_class") == b.records("transform_class")


def test_rows_mask_and_warmup_are_skipped():
    g = torch.Generator().manual_seed(2)
    st = _fake_stats(g)
    y = torch.randint(0, 4, (12,), generator=g)
    audit = AugmentationAudit(num_classes=4)
    assert not audit.update({**st, "active": False}, ["Rotate"] * 12, y)
    assert audit.summary()["rows"] == 0
    rows = torch.zeros(12, dtype=torch.bool)
    rows[:3] = True
    audit.update(st, ["Rotate"] * 12, y, rows=rows)
    assert audit.summary()["rows"] == int((st["augmented"] & rows).sum())


def test_transform_names_parsing():
    assert transform_names(None) == (IDENTITY,)
    assert transform_names(()) == (IDENTITY,)
    assert transform_names("Rotate") == ("Rotate",)
    assert transform_names("Rotate|Equalize") == ("Rotate", "Equalize")
    assert transform_names("") == (IDENTITY,)
    assert transform_names(["Contrast", "Contrast", "Rotate"]) == ("Contrast", "Rotate")
    applied = [("HorizontalFlip", {"x": 1}), ("Normalize", {}), ("ToTensorV2", {})]
    assert transform_names(applied) == ("HorizontalFlip",)
    assert transform_names([("Normalize", {}), ("ToTensorV2", {})]) == (IDENTITY,)
    with pytest.raises(TargetError):
        transform_names(3)


def test_bad_input_raises_and_changes_nothing():
    g = torch.Generator().manual_seed(3)
    st = _fake_stats(g)
    y = torch.randint(0, 4, (12,), generator=g)
    audit = AugmentationAudit(num_classes=4)
    audit.update(st, ["Rotate"] * 12, y)
    before = audit.records("transform_class")
    with pytest.raises(ShapeError):
        audit.update(st, ["Rotate"] * 5, y)                      # neither B nor the augmented count
    with pytest.raises(TargetError):
        audit.update(st, [7] + ["Rotate"] * 11, y)               # a name that is not a string (row 0 is augmented)
    with pytest.raises(TargetError):
        audit.update(st, ["Rotate"] * 12, torch.full((12,), 9))  # label outside the classes
    with pytest.raises(ShapeError):
        AugmentationAudit(num_classes=5).update(st, ["Rotate"] * 12, y)
    assert audit.records("transform_class") == before and audit.updates == 1


def test_tables_and_plot(tmp_path):
    g = torch.Generator().manual_seed(4)
    audit = AugmentationAudit(["a", "b", "c", "d"])
    for _ in range(3):
        audit.update(_fake_stats(g), _random_names(random.Random(4), 12), torch.randint(0, 4, (12,), generator=g))
    df = audit.table()
    assert list(df.columns) == ["transform", "rows", "weight_mean", "kept", "relabel_rate", "agreement_mean"]
    md = audit.table("class", format="markdown")
    assert md.splitlines()[0].startswith("| class | rows |") and len(md.splitlines()) == 2 + len(audit.records("class"))
    srt = audit.records(sort="weight_mean")
    assert [r["weight_mean"] for r in srt] == sorted((r["weight_mean"] for r in srt), reverse=True)
    path = audit.plot(tmp_path / "audit.png")
    assert path.stat().st_size > 1000


def _pil_images(n=40, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), mode="L") for _ in range(n)]


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-n1-p1.0", "rand-m7-n3-mstd0"])
def test_traced_randaugment_equals_timm(config):
    """Same seeds -> the same image as timm's own RandAugment; names are the ops whose gate passed."""
    from timm.data.auto_augment import rand_augment_transform

    ra = rand_augment_transform(config, {"img_mean": (128,)})
    traced = TracedRandAugment(ra)
    imgs = _pil_images()
    random.seed(5)
    np.random.seed(5)
    ref = [np.asarray(ra(im)) for im in imgs]
    random.seed(5)
    np.random.seed(5)
    out = [traced(im) for im in imgs]
    for r, (im, names), src in zip(ref, out, imgs):
        np.testing.assert_array_equal(r, np.asarray(im))
        assert set(names) <= set(traced.op_names)
        if not names:
            np.testing.assert_array_equal(np.asarray(im), np.asarray(src))
    if "n1-p1.0" in config:
        assert all(len(n) == 1 for _, n in out)
    else:
        assert any(len(n) == 0 for _, n in out) and any(len(n) >= 2 for _, n in out)


def test_traced_single_op_is_that_op():
    """With one op per view, re-applying the named op with the same magnitude draw gives the image."""
    from timm.data.auto_augment import rand_augment_transform

    ra = rand_augment_transform("rand-m9-n1-p1.0", {"img_mean": (128,)})   # no magnitude noise
    traced = TracedRandAugment(ra)
    by_name = {op.name: op for op in ra.ops}
    for k, im in enumerate(_pil_images(15, seed=1)):
        np.random.seed(k)
        random.seed(k)
        out, (name,) = traced(im)
        np.random.seed(k)
        np.random.choice(len(ra.ops), 1)     # the op draw; with p=1 there is no gate draw
        random.seed(k)                       # the op's own draws (e.g. the sign of a rotation)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(by_name[name](im)))




def test_audit_with_a_real_refiner():
    """Weighted means from the refiner's own stats, hard weights and soft labels (kept < 1, relabels)."""
    torch.manual_seed(0)
    model = FlatNet(16, 12, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = [(torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,)))]
    ref = AugmentationRefiner(model, opt, val, method="saflex",
                              method_options=dict(weighting='hard', beta=0.2, tau=0.3, normalize='rms'),
                              schedule=dict(refresh_every=1))
    audit = AugmentationAudit(["x", "y", "z"])
    g = torch.Generator().manual_seed(1)
    w_all, relabel_all, kept_all = [], [], []
    for _ in range(5):
        x = torch.randn(16, 1, 4, 4, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = ref(model(x), y, num_original=6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        st = ref.stats
        audit.update(st, ["op"] * 16, y)
        a = st["augmented"]
        w_all.append(st["weights"][a])
        kept_all.append((st["weights"][a] > 0).float())
        relabel_all.append((st["soft_targets"][a].argmax(1) != y[a]).float())
    s = audit.summary()
    assert s["rows"] == 50
    assert s["weight_mean"] == pytest.approx(float(torch.cat(w_all).mean()), rel=1e-5)
    assert s["kept"] == pytest.approx(float(torch.cat(kept_all).mean()))
    assert s["relabel_rate"] == pytest.approx(float(torch.cat(relabel_all).mean()))
    assert 0 < s["kept"] < 1 and s["relabel_rate"] > 0


def test_merge_and_state_dict_equal_one_audit():
    """Two audits over halves of the calls, merged (or restored from a state), equal one audit over all."""
    g = torch.Generator().manual_seed(6)
    rng = random.Random(6)
    calls = [(_fake_stats(g), _random_names(rng, 12), torch.randint(0, 4, (12,), generator=g)) for _ in range(6)]
    whole, a, b = (AugmentationAudit(["a", "b", "c", "d"]) for _ in range(3))
    for k, call in enumerate(calls):
        whole.update(*call)
        (a if k % 2 else b).update(*call)
    merged = AugmentationAudit(["a", "b", "c", "d"]).merge(a).merge(b.state_dict())
    for by in ("transform", "class", "transform_class"):
        key = lambda r: (r.get("transform", ""), r.get("class", ""))  # noqa: E731
        for r1, r2 in zip(sorted(whole.records(by), key=key), sorted(merged.records(by), key=key)):
            assert r1.keys() == r2.keys()
            for k in r1:
                assert r1[k] == (r2[k] if isinstance(r2[k], str) else pytest.approx(r2[k], rel=1e-12))
    restored = AugmentationAudit(["a", "b", "c", "d"])
    restored.load_state_dict(whole.state_dict())
    assert restored.records("transform_class") == whole.records("transform_class")
    assert restored.summary() == whole.summary() and restored.updates == 6
    with pytest.raises(ShapeError):
        AugmentationAudit(num_classes=3).merge(whole)
