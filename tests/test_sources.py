"""Generated-sample sources: loading, the batch mixer's rows / mask / source ids, per-source statistics."""
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from augplug import AugmentationRefiner, ConfigurationError, ShapeError, TargetError
from augplug.sources import REAL, BatchMixer, GeneratedSamples, SourceAudit
from conftest import FlatNet


def _source(n, seed, shape=(1, 4, 4), classes=3):
    g = torch.Generator().manual_seed(seed)
    return GeneratedSamples(torch.rand((n,) + shape, generator=g), torch.randint(0, classes, (n,), generator=g))


def test_mixer_rows_mask_and_source_ids():
    a, b = _source(10, 0), _source(7, 1)
    mixer = BatchMixer({"diffA": a, "diffB": b}, per_batch={"diffA": 3, "diffB": 2}, seed=0)
    assert mixer.source_names == ["real", "diffA", "diffB"]
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    mb = mixer(x, y)
    assert mb.inputs.shape == (10, 1, 4, 4) and mb.num_real == 5
    assert mb.augmented.tolist() == [False] * 5 + [True] * 5
    assert mb.source_ids.tolist() == [REAL] * 5 + [1] * 3 + [2] * 2
    torch.testing.assert_close(mb.inputs[:5], x)
    assert torch.equal(mb.targets[:5], y)
    for row in range(5, 10):
        src = a if mb.source_ids[row] == 1 else b
        i = int(mb.index[row])
        torch.testing.assert_close(mb.inputs[row], src.images[i])
        assert int(mb.targets[row]) == int(src.labels[i])
    assert (mb.index[:5] == -1).all()
    mb2 = BatchMixer(a, per_batch=2, seed=0, real_augmented=True)(x, y, index=torch.arange(100, 105))
    assert mb2.augmented.all() and mb2.index[:5].tolist() == list(range(100, 105))


def test_sampling_without_replacement_and_seeded():
    src = _source(12, 0)
    seen = []
    mixer = BatchMixer(src, per_batch=4, seed=3)
    for _ in range(3):                                       # one pass over the source
        seen += mixer(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)).index[2:].tolist()
    assert sorted(seen) == list(range(12))
    nxt = mixer(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)).index[2:].tolist()
    assert len(set(nxt)) == 4                                # the next pass starts over in a new order

    def sequence(seed):
        torch.manual_seed(seed + 100)                        # the global RNG must not matter
        m = BatchMixer(src, per_batch=5, seed=seed)
        return [m(torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long)).index[1:].tolist() for _ in range(4)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)
    state = torch.get_rng_state()
    BatchMixer(src, per_batch=5, seed=1)(torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long))
    assert torch.equal(state, torch.get_rng_state())


def test_mixer_resume_from_state():
    src = _source(9, 2)
    m1 = BatchMixer(src, per_batch=4, seed=0)
    xb, yb = torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long)
    m1(xb, yb)
    state = m1.state_dict()
    rest1 = [m1(xb, yb).index.tolist() for _ in range(3)]
    m2 = BatchMixer(src, per_batch=4, seed=99)
    m2.load_state_dict(state)
    assert [m2(xb, yb).index.tolist() for _ in range(3)] == rest1


def test_soft_targets_get_one_hot_generated_rows():
    src = _source(6, 0, classes=3)
    y = torch.softmax(torch.randn(4, 3), -1)
    mb = BatchMixer(src, per_batch=3, seed=0)(torch.zeros(4, 1, 4, 4), y)
    assert mb.targets.shape == (7, 3)
    torch.testing.assert_close(mb.targets[:4], y)
    gen_labels = src.labels[mb.index[4:]]
    torch.testing.assert_close(mb.targets[4:], nn.functional.one_hot(gen_labels, 3).float())


def test_mismatched_images_fail_and_leave_the_mixer_unchanged():
    src = _source(8, 0, shape=(1, 5, 5))
    mixer = BatchMixer(src, per_batch=3, seed=0)
    ref = BatchMixer(src, per_batch=3, seed=0)
    with pytest.raises(ShapeError, match="transform"):
        mixer(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ShapeError, match="image_mode='L'"):   # only the channels differ: grey vs colour
        mixer(torch.zeros(2, 3, 5, 5), torch.zeros(2, dtype=torch.long))
    ok = (torch.zeros(2, 1, 5, 5), torch.zeros(2, dtype=torch.long))
    assert mixer(*ok).index.tolist() == ref(*ok).index.tolist()
    with pytest.raises(TargetError):
        BatchMixer(GeneratedSamples(torch.rand(4, 1, 5, 5), torch.tensor([0, 4, 1, 4])), per_batch=4, seed=0)(
            torch.zeros(2, 1, 5, 5), torch.full((2, 2), 0.5))  # generated class 4 outside 2 classes
    with pytest.raises(ConfigurationError):
        BatchMixer({"real": src})
    with pytest.raises(ConfigurationError):
        BatchMixer({"a": src}, per_batch={"b": 1})




def test_per_source_statistics_equal_a_hand_computation():
    """SAflex (hard weights, soft labels) on real + two generated sources; per-source means by hand."""
    torch.manual_seed(0)
    model = FlatNet(16, 12, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = [(torch.rand(30, 1, 4, 4), torch.randint(0, 3, (30,)))]
    refiner = AugmentationRefiner(model, opt, val, method="saflex",
                                  method_options=dict(weighting='hard', beta=0.2, tau=0.3, normalize='rms', strength=1.0),
                                  schedule=dict(refresh_every=1))
    mixer = BatchMixer({"good": _source(40, 1), "noisy": _source(40, 2)}, per_batch={"good": 4, "noisy": 6}, seed=0,
                       real_augmented=True)
    audit = SourceAudit(mixer.source_names, num_classes=3)
    hand = {n: {"w": [], "kept": [], "relabel": []} for n in mixer.source_names}
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        x, y = torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        mb = mixer(x, y)
        loss = refiner(model(mb.inputs), mb.targets, augmented=mb.augmented)
        opt.zero_grad()
        loss.backward()
        opt.step()
        st = refiner.stats
        audit.update(st, mb.source_ids, mb.targets)
        for row in range(mb.inputs.shape[0]):
            name = mixer.source_names[int(mb.source_ids[row])]
            w = float(st["weights"][row])
            hand[name]["w"].append(w)
            hand[name]["kept"].append(w > 0)
            hand[name]["relabel"].append(int(st["soft_targets"][row].argmax()) != int(mb.targets[row]))
    per = audit.per_source()
    assert set(per) == {"real", "good", "noisy"}
    for name, h in hand.items():
        assert per[name]["rows"] == len(h["w"])
        assert per[name]["weight_mean"] == pytest.approx(np.mean(h["w"]), rel=1e-5)
        assert per[name]["kept"] == pytest.approx(np.mean(h["kept"]))
        assert per[name]["relabel_rate"] == pytest.approx(np.mean(h["relabel"]))
    assert any(per[n]["kept"] < 1 for n in per) and any(per[n]["relabel_rate"] > 0 for n in per)
    md = audit.table(format="markdown")
    assert md.startswith("| source | rows |")
    assert list(audit.table()["source"]) == ["real", "noisy", "good"]    # by row count


def test_source_audit_counts_only_refined_rows():
    torch.manual_seed(0)
    model = FlatNet(16, 12, 3)
    refiner = AugmentationRefiner(model, None, [(torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,)))],
                                  method_options=dict(strength=1.0))
    mixer = BatchMixer(_source(10, 1), per_batch=3, seed=0)
    audit = SourceAudit(mixer.source_names, num_classes=3)
    mb = mixer(torch.rand(5, 1, 4, 4), torch.randint(0, 3, (5,)))
    refiner(model(mb.inputs), mb.targets, augmented=mb.augmented)
    audit.update(refiner.stats, mb.source_ids, mb.targets)
    assert audit.per_source().keys() == {"generated"} and audit.per_source()["generated"]["rows"] == 3
    with pytest.raises(ShapeError):
        audit.update(refiner.stats, torch.full((8,), 5), mb.targets)


def test_load_npz_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "gen.npz", images=imgs, labels=labels)
    ds = GeneratedSamples.load(tmp_path / "gen.npz", num_classes=3)
    assert len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and y == 1
    torch.testing.assert_close(x, torch.from_numpy(imgs[4]).permute(2, 0, 1).float() / 255)
    with pytest.raises(TargetError):
        GeneratedSamples.load(tmp_path / "gen.npz", num_classes=2)


def test_load_pt_weights_only(tmp_path):
    torch.save({"x": torch.rand(5, 1, 4, 4), "y": torch.arange(5) % 2}, tmp_path / "gen.pt")
    ds = GeneratedSamples.load(tmp_path / "gen.pt")
    assert len(ds) == 5 and ds[3][1] == 1

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"images": torch.rand(2, 1, 4, 4), "labels": torch.zeros(2), "extra": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError):
        GeneratedSamples.load(tmp_path / "bad.pt")


def test_load_image_folder_maps_classes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls_name, n in (("dog", 2), ("bird", 3)):
        (tmp_path / "gen" / cls_name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "gen" / cls_name / f"{i}.png")
    classes = ["cat", "dog", "bird"]                       # the training set's order
    ds = GeneratedSamples.load(tmp_path / "gen", classes=classes)
    assert sorted(ds.labels.tolist()) == [1, 1, 2, 2, 2]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 6, 6) and float(x.max()) <= 1
        assert y == int(ds.labels[i])
    path, folder_label = ds.images.samples[0]
    assert ds[0][1] == classes.index(ds.images.classes[folder_label])
    mb = BatchMixer(ds, per_batch=5, seed=0)(torch.zeros(1, 3, 6, 6), torch.zeros(1, dtype=torch.long))
    assert sorted(mb.targets[1:].tolist()) == [1, 1, 2, 2, 2]
    with pytest.raises(TargetError, match="not training classes"):
        GeneratedSamples.load(tmp_path / "gen", classes=["cat", "dog"])
