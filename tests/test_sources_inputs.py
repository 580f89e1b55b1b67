"""The audit, generated sources and pooled evidence given what practitioners give them: random
conversions, integer image batches, ids of the wrong kind, images of several sizes or layouts,
malformed states."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import augplug
from augplug.errors import ConfigurationError, ShapeError
from augplug.pooled import PooledEvidence
from augplug.report import IGNORED_TRANSFORMS, AugmentationAudit
from augplug.sources import BatchMixer, GeneratedSamples, SourceAudit
from fault_harness import same


def test_albumentations_to_gray_is_an_augmentation_not_a_conversion():
    """ToGray (p=0.5 by default) was dropped from the names, so grey views were filed as identity."""
    assert "ToGray" not in IGNORED_TRANSFORMS and "Normalize" in IGNORED_TRANSFORMS


def _generated(n=6, dtype=np.float32, shape=(3, 8, 8)):
    rng = np.random.RandomState(0)
    images = rng.rand(n, *shape).astype(dtype)
    return GeneratedSamples.from_arrays(images, np.zeros(n, dtype=np.int64))


def test_the_mixer_refuses_to_cast_float_images_into_an_integer_batch():
    """Float images in [0, 1] cast to a uint8 real batch became 0: black rows, silently."""
    mixer = BatchMixer(_generated(), per_batch=2, seed=0)
    before = copy.deepcopy(mixer.state_dict())
    with pytest.raises(ShapeError, match="torch.float32 images, the real batch is torch.uint8"):
        mixer(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    same(before, mixer.state_dict())
    out = mixer(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))   # floats both: mixed as before
    assert out.inputs.shape == (6, 3, 8, 8)


def test_generated_images_of_several_sizes_are_a_shape_error():
    gen = GeneratedSamples([(torch.rand(3, 8, 8), 0), (torch.rand(3, 16, 16), 0)], torch.zeros(2, dtype=torch.long),
                           num_classes=1)
    with pytest.raises(ShapeError, match="several shapes"):
        gen.batch(torch.tensor([0, 1]))


def test_from_arrays_reads_channels_last_images():
    hwc = np.random.RandomState(0).rand(5, 8, 8, 3).astype(np.float32)
    gen = GeneratedSamples.from_arrays(hwc, np.zeros(5, dtype=np.int64))
    assert tuple(gen.images.shape) == (5, 3, 8, 8)
    assert torch.equal(gen.images[:, 1], torch.from_numpy(hwc[..., 1]))
    chw = GeneratedSamples.from_arrays(hwc.transpose(0, 3, 1, 2), np.zeros(5, dtype=np.int64))
    assert torch.equal(chw.images, gen.images)


def test_the_mixer_state_checks_its_generator_state_and_takes_numpy_positions():
    mixer = BatchMixer(_generated(), per_batch=2, seed=0)
    mixer(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    state = mixer.state_dict()
    for gen in (state["gen"][:100], torch.zeros_like(state["gen"])):
        bad = dict(state, gen=gen)
        before = copy.deepcopy(mixer.state_dict())
        with pytest.raises(ConfigurationError, match="generator state"):
            mixer.load_state_dict(bad)
        same(before, mixer.state_dict())
    mixer.load_state_dict(dict(state, pos=[np.int64(p) for p in state["pos"]]))


def test_an_empty_class_folder_is_a_configuration_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(ConfigurationError, match="one sub-folder per class"):
        GeneratedSamples.from_folder(tmp_path)


@pytest.mark.parametrize("ids", [torch.tensor([0.0, 1.7, 1.2]), torch.tensor([True, False, True])])
def test_source_audit_refuses_ids_that_are_not_integers(ids):
    audit = SourceAudit(["real", "a", "b"], num_classes=2)
    stats = {"weights": torch.ones(3), "soft_targets": torch.eye(2)[[0, 1, 0]],
             "augmented": torch.ones(3, dtype=torch.bool), "scores": torch.zeros(3, 2), "active": True}
    with pytest.raises(ShapeError, match="integer ids"):
        audit.update(stats, ids, torch.tensor([0, 1, 0]))


def _audit_state():
    stats = {"weights": torch.tensor([1., 1.2, 0.8, 0.0]), "soft_targets": torch.eye(3)[[0, 1, 2, 0]],
             "augmented": torch.tensor([False, True, True, True]), "scores": torch.zeros(4, 3), "active": True}
    a = AugmentationAudit(["cat", "dog", "frog"])
    a.update(stats, ["x", "Rotate", "Equalize|Rotate", "identity"], torch.tensor([0, 1, 2, 0]))
    return a.state_dict()


@pytest.mark.parametrize("change, error, match", [
    (lambda s: s["cells"][0].__setitem__(1, 7), ShapeError, "outside 0..2"),
    (lambda s: s["cells"][0].__setitem__(1, -1), ShapeError, "outside 0..2"),
    (lambda s: s["cells"][0].__setitem__(2, -5), ConfigurationError, "impossible sums"),
    (lambda s: s["cells"][0].__setitem__(3, float("nan")), ConfigurationError, "impossible sums"),
    (lambda s: s.__setitem__("num_classes", "three"), ConfigurationError, "not a number of classes"),
    (lambda s: s["by_class"][0].__setitem__(1, 99), ConfigurationError, "do not add up|impossible"),
    (lambda s: s.__setitem__("class_names", ["frog", "cat", "dog"]), ShapeError, "same order"),
])
def test_audit_states_that_cannot_be_are_refused_and_change_nothing(change, error, match):
    """Each was accepted: classes outside the audit's (a -1 filed under the last class), negative or
    NaN sums, totals that do not add up, class names in another order (rows under other classes)."""
    state = _audit_state()
    change(state)
    for how in ("load_state_dict", "merge"):
        audit = AugmentationAudit(["cat", "dog", "frog"])
        audit.merge(_audit_state())
        before = copy.deepcopy(audit.state_dict())
        with pytest.raises(error, match=match):
            getattr(audit, how)(state)
        same(before, audit.state_dict())


def test_a_state_without_a_class_count_needs_an_audit_that_has_one():
    state = _audit_state()
    state["num_classes"] = None
    state["class_names"] = None
    with pytest.raises(ConfigurationError, match="over how many classes"):
        AugmentationAudit().load_state_dict(state)
    AugmentationAudit(num_classes=3).load_state_dict(state)


def test_pooled_table_checks_its_names():
    pool = PooledEvidence(3)
    pool.tables = pool.updated(torch.tensor([0, 1, 2, 1]), torch.eye(2)[[0, 1, 0, 1]], torch.randn(4))
    with pytest.raises(ConfigurationError, match="source_names has 2 names for 3 sources"):
        pool.table(source_names=["a", "b"])
    with pytest.raises(ConfigurationError, match="class_names has 3 names for 2 classes"):
        pool.table(class_names=["x", "y", "z"])
    assert len(pool.table(["real", "a", "b"], ["x", "y"])) > 0


def test_pooled_sources_on_views_alone_warn_that_nothing_is_gathered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    val = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    r = augplug.AugmentationRefiner(model, opt, val, method=augplug.SAflex(pool=2),
                                    schedule=augplug.Schedule(budget=None))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            r(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)), sources=torch.randint(0, 2, (8,))).backward()
    msgs = [str(m.message) for m in w if "gathers no evidence" in str(m.message)]
    assert len(msgs) == 1 and "strength=1.0" in msgs[0]
