"""Ways a new user calls the refiner that it must refuse with a clear error, changing nothing: a call
under ``torch.no_grad()``, a call after ``remove_hooks()``, a linear classifier run on every token,
full-model scores of forwards at two resolutions; and a state taken with ISDA on that training does
not change afterwards."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner, Schedule
from augplug.errors import ConfigurationError, ModelModeError, ShapeError, TargetError, UnsupportedHeadError

C = 5


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, C))


def _val(shape=(3, 16, 16), n=32):
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g)),
                      batch_size=16)


def _batches(n=6, rows=4, shape=(3, 16, 16)):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(rows, *shape, generator=g), torch.randint(0, C, (rows,), generator=g)) for _ in range(n)]


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def _train(pattern, probe=None, **kw):
    """Six steps of the one-batch or separate pattern; ``probe(model, refiner)`` runs after step 2.
    Returns the losses and the final parameters."""
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    refiner = AugmentationRefiner(model, opt, _val(), schedule=Schedule(refresh_every=1, budget=None), **kw)
    losses = []
    for i, (x, y) in enumerate(_batches()):
        x_aug = x.flip(-1)
        if pattern == "batch":
            loss = refiner(model(torch.cat([x, x_aug])), torch.cat([y, y]), num_original=len(x))
        else:
            loss = refiner(model(x_aug), y) + F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if i == 1 and probe is not None:
            probe(model, refiner)
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("pattern", ["batch", "separate"])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_call_with_gradients_disabled_is_refused_and_changes_nothing(pattern, context):
    """Logging a loss through the refiner under no_grad was accepted: it took the features of an
    earlier training forward with as many rows, and moved the refiner's state and later training."""
    def probe(model, refiner):
        before = copy.deepcopy(refiner.state_dict())
        x, y = _batches(1, rows=4)[0]
        with context():
            out = model(x)
            with pytest.raises(ModelModeError, match="gradients disabled"):
                refiner(out, y)
        assert _same(before, refiner.state_dict())

    plain, params = _train(pattern)
    probed, probed_params = _train(pattern, probe)
    assert plain == probed
    assert all(torch.equal(a, b) for a, b in zip(params, probed_params))


def test_a_call_after_remove_hooks_names_it():
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    refiner = AugmentationRefiner(model, opt, _val())
    x, y = _batches(1, rows=8)[0]
    refiner(model(x), y, num_original=4).backward()
    opt.step()
    refiner.remove_hooks()
    before = copy.deepcopy(refiner.state_dict())
    with pytest.raises(ConfigurationError, match="hooks were removed"):
        refiner(model(x), y, num_original=4)
    assert _same(before, refiner.state_dict())


def test_a_state_taken_with_isda_is_a_copy():
    """``state_dict()`` copies ISDA's statistics like every other part: training on does not change
    a state taken earlier (an in-memory "best" checkpoint), and resuming from it equals resuming
    from a deep copy taken at the same point."""
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    refiner = AugmentationRefiner(model, opt, _val(), isda=True)
    batches = _batches(6, rows=8)
    for i, (x, y) in enumerate(batches):
        loss = refiner(model(x), y, num_original=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 2:
            kept, copied = refiner.state_dict(), copy.deepcopy(refiner.state_dict())
    assert _same(kept["isda"], copied["isda"])
    assert not _same(refiner.state_dict()["isda"], kept["isda"])


class _TokenClassifier(nn.Module):
    """A linear classifier run on every token, its outputs averaged after it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(12, 8)
        self.head = nn.Linear(8, C)

    def forward(self, x):   # (B, T, 12)
        return self.head(self.emb(x)).mean(1)


def test_a_linear_classifier_on_every_token_needs_full_mode():
    g = torch.Generator().manual_seed(0)
    val = DataLoader(TensorDataset(torch.randn(32, 6, 12, generator=g), torch.randint(0, C, (32,), generator=g)),
                     batch_size=16)
    x, y = torch.randn(8, 6, 12, generator=g), torch.randint(0, C, (8,), generator=g)
    torch.manual_seed(0)
    model = _TokenClassifier()
    refiner = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.05), val)
    before = copy.deepcopy(refiner.state_dict())
    with pytest.raises(UnsupportedHeadError, match="mode='full'"):
        refiner(model(x), y, num_original=4)
    assert _same(before, refiner.state_dict())
    refiner.remove_hooks()
    full = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.05), val, mode="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # the logits are the model's output: no warning
        loss = full(model(x), y, num_original=4)
    assert torch.isfinite(loss) and full.stats["active"]


def test_full_mode_refuses_one_call_over_forwards_of_two_resolutions():
    torch.manual_seed(0)
    model = _net()
    refiner = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.05), _val(), mode="full")
    x, y = _batches(1, rows=4)[0]
    small = F.interpolate(x, size=12)
    before = copy.deepcopy(refiner.state_dict())
    with pytest.raises(ShapeError, match="different shapes"):
        refiner(torch.cat([model(x), model(small)]), torch.cat([y, y]), num_original=4)
    assert _same(before, refiner.state_dict())
    last_layer = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.05), _val())
    assert torch.isfinite(last_layer(torch.cat([model(x), model(small)]), torch.cat([y, y]), num_original=4))


def test_two_forwards_then_two_calls_says_why():
    """A call drops the forwards recorded before it: the second of two calls made after both forwards
    has no features, and the error says so."""
    torch.manual_seed(0)
    model = _net()
    refiner = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.05), _val())
    x, y = _batches(1, rows=8)[0]
    first, second = model(x), model(x.flip(-1))
    refiner(first, y, num_original=4)
    with pytest.raises(ShapeError, match="drops the forwards recorded before it"):
        refiner(second, y, num_original=4)


# ---------------------------------------------------------------------------- audits, sources, contrastive
def _audited():
    from augplug.report import AugmentationAudit
    stats = {"weights": torch.tensor([1., 0.5, 1.5, 1.]), "soft_targets": torch.eye(3)[[0, 1, 2, 0]],
             "augmented": torch.tensor([False, True, True, True]), "scores": torch.zeros(4, 3), "active": True}
    audit = AugmentationAudit(["a", "b", "c"])
    audit.update(stats, ["identity", "Rot", "Flip", "Rot"], torch.tensor([0, 1, 2, 0]))
    return audit


@pytest.mark.parametrize("change", ["classes", "total", "cells", "missing"])
def test_a_rejected_audit_state_leaves_the_audit_as_it_was(change):
    """load_state_dict reset the audit before checking the state, and merge added the cells before a
    malformed total failed: both now check the whole state first."""
    audit = _audited()
    good = copy.deepcopy(audit.state_dict())
    bad = copy.deepcopy(good)
    if change == "classes":
        bad["num_classes"] = 5
    elif change == "total":
        bad["total"] = None
    elif change == "cells":
        bad["cells"][0] = ["Rot", 1, "many", 0.5, 1, 0, 0.0]
    else:
        del bad["updates"]
    for apply in (audit.load_state_dict, audit.merge):
        with pytest.raises((ShapeError, ConfigurationError)):
            apply(bad)
        assert _same(audit.state_dict(), good)
    audit.merge(good)
    assert audit.summary()["rows"] == 6


def test_source_names_cannot_hold_the_audit_separator():
    from augplug.sources import BatchMixer, GeneratedSamples, SourceAudit
    gen = GeneratedSamples(torch.rand(5, 1, 2, 3), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ConfigurationError, match="must not contain"):
        BatchMixer({"sd-v1.5|cfg7": gen}, per_batch=3)
    with pytest.raises(ConfigurationError, match="must not contain"):
        SourceAudit(["real", "a|b"])
    assert BatchMixer({"sd-v1.5_cfg7": gen}, per_batch=3).source_names == ["real", "sd-v1.5_cfg7"]


def test_a_mixer_state_saved_over_a_source_of_another_size_is_refused():
    from augplug.sources import BatchMixer, GeneratedSamples

    def source(n):
        return GeneratedSamples(torch.rand(n, 1, 2, 3), torch.arange(n) % 3)

    x, y = torch.randn(4, 1, 2, 3), torch.zeros(4, dtype=torch.long)
    for saved in (5, 10):
        other = BatchMixer({"g": source(saved)}, per_batch=2)
        other(x, y)
        mixer = BatchMixer({"g": source(3)}, per_batch=2)
        before = copy.deepcopy(mixer.state_dict())
        with pytest.raises(ConfigurationError, match="another size"):
            mixer.load_state_dict(other.state_dict())
        assert _same(mixer.state_dict(), before)
    with pytest.raises(ConfigurationError, match="malformed"):
        mixer.load_state_dict({"gen": before["gen"]})
    same = BatchMixer({"g": source(3)}, per_batch=2)
    same(x, y)
    mixer.load_state_dict(same.state_dict())
    assert torch.equal(mixer(x, y).index, same(x, y).index)


def test_contrastive_options_that_would_be_ignored_or_misread_are_refused():
    from augplug.contrastive import ClassEmbeddings, ContrastiveRefiner
    torch.manual_seed(0)
    img, txt = nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), nn.Linear(5, 8)
    opt = torch.optim.SGD(list(img.parameters()) + list(txt.parameters()), lr=0.1)
    val = [(torch.randn(6, 3, 4), torch.randn(6, 5))]
    with pytest.raises(ConfigurationError, match="list"):
        ContrastiveRefiner(img, txt, opt, val, score_params="image.1.weight")
    prompts = ClassEmbeddings(4, 8)
    opt = torch.optim.SGD(list(img.parameters()) + list(prompts.parameters()), lr=0.1)
    labelled = [(torch.randn(6, 3, 4), torch.randint(0, 4, (6,)))]
    with pytest.raises(ConfigurationError, match="image_to_text"):
        ContrastiveRefiner(img, prompts, opt, labelled, class_prompts=torch.arange(4), directions=("text_to_image",))
    with pytest.raises(TargetError, match=r"\[0, 4\)"):
        ContrastiveRefiner(img, prompts, opt, labelled, class_prompts=torch.arange(6))
    ok = ContrastiveRefiner(img, prompts, opt, labelled, class_prompts=torch.arange(4), directions=("image_to_text",))
    assert ok.directions == ("image_to_text",)


# ---------------------------------------------------------------------------- the example scripts
def test_accelerate_example_refuses_fp16_on_the_cpu(capsys):
    from augplug.integrations import accelerate_train as at
    with pytest.raises(SystemExit):
        at.parse_args(["--cpu", "--mixed-precision", "fp16"])
    assert "needs a GPU" in capsys.readouterr().err


def test_accelerate_example_resumes_where_it_stopped(tmp_path):
    """--resume goes on from the saved run's updates (it restarted at epoch 0), and --max-steps is
    checked before a step (a resumed run past it made one more update)."""
    pytest.importorskip("sklearn")
    from augplug.integrations import accelerate_train as at
    base = ["--cpu", "--epochs", "2", "--no-progress", "--budget", "none"]
    first = at.main(base + ["--max-steps", "3", "--output", str(tmp_path / "a"), "--save-state"])
    assert first["refiner_updates"] == 3
    ckpt = str(tmp_path / "a" / "checkpoint")
    again = at.main(base + ["--max-steps", "2", "--output", str(tmp_path / "b"), "--resume", ckpt])
    assert again["refiner_updates"] == 3 and again["history"] == []
    with warnings.catch_warnings():   # --max-steps stops the run, it does not change the share's horizon:
        warnings.simplefilter("error", RuntimeWarning)   # the resumed refiner has the saved options
        on = at.main(base + ["--max-steps", "5", "--output", str(tmp_path / "c"), "--resume", ckpt])
    assert on["refiner_updates"] == 5 and on["history"][0]["epoch"] == 0


# ---------------------------------------------------------------------------- third audit
class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def test_autodo_augment_refuses_an_empty_batch():
    torch.manual_seed(0)
    model = _Small()
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val((1, 8, 8)), method="autodo",
                            method_options=dict(num_points=8, num_classes=4))
    with pytest.raises(ShapeError, match="no rows"):
        r.augment(torch.randn(0, 1, 8, 8), torch.arange(0))


def test_validate_leaves_the_random_streams_as_they_were():
    torch.manual_seed(0)
    model = _net()
    loader = DataLoader(TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, C, (32,))), batch_size=8,
                        shuffle=True)
    own = torch.Generator().manual_seed(5)
    seeded = DataLoader(loader.dataset, batch_size=8, shuffle=True, generator=own)
    r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert r.validate() == []
    assert torch.equal(torch.rand(3), expected)
    before = own.get_state()
    from augplug.checks import validate
    validate(model, val_loader=seeded)
    assert torch.equal(own.get_state(), before)


def test_more_validation_batches_than_the_loader_holds_is_refused():
    torch.manual_seed(0)
    model = _net()
    with pytest.raises(ConfigurationError, match="twice"):
        AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), schedule=Schedule(val_batches=3))
    AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), _val(), schedule=Schedule(val_batches=2))


def test_a_classifier_whose_learning_rate_is_0_warns_unless_a_warm_up_starts_there():
    torch.manual_seed(0)
    model = _net()
    head = list(model[4].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in head)]
    opt = torch.optim.SGD([{"params": rest}, {"params": head, "lr": 0.0}], lr=0.1)
    with pytest.warns(RuntimeWarning, match="lr=0"):
        AugmentationRefiner(model, opt, _val()).remove_hooks()
    warm = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(warm, lambda step: step / 10)   # the rate starts at 0 (a warm-up)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        AugmentationRefiner(model, warm, _val()).remove_hooks()


def test_a_classifier_tied_to_another_layer_is_not_taken_for_frozen():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.emb, self.fc = nn.Linear(16, 8), nn.Linear(8, 4), nn.Linear(8, 4)
            self.fc.weight = self.emb.weight

        def forward(self, x):
            return self.fc(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = [(torch.randn(8, 16), torch.randint(0, 4, (8,)))]
    r = AugmentationRefiner(model, opt, val, mode="full", schedule=Schedule(budget=None, model_scores_every=2))
    for _ in range(3):   # a model score pass, then a closed-form one
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        loss = r(model(x), y, num_original=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and torch.isfinite(r.stats["scores"]).all()


def test_the_demo_checks_its_output_folder_and_seeds_before_training(tmp_path, capsys):
    from augplug.demo.cli import main as demo
    (tmp_path / "afile").write_text("x")
    for argv, words in ((["--out", str(tmp_path / "afile")], "cannot create"),
                        (["--seeds", str(2 ** 32)], "2**32 - 1")):
        with pytest.raises(SystemExit):
            demo(argv + ["--epochs", "1", "--no-progress"])
        assert words in capsys.readouterr().err
