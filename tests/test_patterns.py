"""The usage patterns of the README: originals through their own forward, concatenated with the
augmented rows' logits, are one batch to the refiner (the recommended form of the separate pattern)."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.scores import last_layer_scores


def test_two_forwards_concatenated_are_one_batch():
    """Each forward keeps its own BatchNorm statistics; the refiner reads the classifier features of
    both forwards, in order, and scores the views from them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    val = DataLoader(TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)),
                     batch_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, val, method_options=dict(weighting="soft"), schedule=dict(refresh_every=1))
    for step in range(3):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        x_aug, y_aug = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
        logits = torch.cat([model(x), model(x_aug)])  # two training forwards
        with torch.no_grad():  # what the head received in each forward (not captured: no grad)
            features = torch.cat([model[:3](x), model[:3](x_aug)])
        loss = r(logits, torch.cat([y, y_aug]), num_original=16)
        v = r.validation_direction
        expected = last_layer_scores(features[16:], logits[16:], v["3.weight"], v["3.bias"])
        torch.testing.assert_close(r.stats["scores"][16:], expected, rtol=1e-5, atol=1e-6)
        assert float((r.stats["weights"][16:] - 1).abs().max()) > 1e-4  # the views were refined
        opt.zero_grad()
        loss.backward()
        opt.step()


def _two_forwards_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    val = DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)),
                     batch_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, val, method_options=dict(strength=1.0),
                            schedule=dict(refresh_every=1, budget=None))
    x, x_aug = torch.randn(8, 6, generator=g), 3 * torch.randn(8, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, r, x, x_aug, y


@pytest.mark.parametrize("mode", ["last_layer", "full"])
def test_concat_reads_the_order_of_the_concatenation_not_of_the_forwards(mode):
    """``out_aug = model(x_aug); out = model(x); refiner(torch.cat([out, out_aug]), ..., num_original=)``:
    the views' forward ran first, the logits put the originals first. The refiner reads the order of
    the concatenation from the autograd graph (no device sync) and scores the views from their own
    features (inputs in full mode), as when the forwards run in the logits' order; nothing is warned.
    Joining the forwards in the order they ran scored the views from the originals' features."""
    import warnings
    scores = {}
    for order in ("originals first", "views first"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        g = torch.Generator().manual_seed(1)
        val = DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)),
                         batch_size=16)
        r = AugmentationRefiner(model, torch.optim.SGD(model.parameters(), lr=0.1), val, mode=mode,
                                schedule=dict(refresh_every=1, budget=None))
        x, x_aug = torch.randn(8, 6, generator=g), 3 * torch.randn(10, 6, generator=g)
        y = torch.randint(0, 3, (18,), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            if order == "originals first":
                out, out_aug = model(x), model(x_aug)
            else:
                out_aug, out = model(x_aug), model(x)
            r(torch.cat([out, out_aug]), y, num_original=8)
        scores[order] = r.stats["scores"][8:].clone()
        if mode == "last_layer":
            torch.testing.assert_close(scores[order], _expected_scores(model, r, x_aug, out_aug), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["views first"], scores["originals first"], rtol=1e-5, atol=1e-6)


def _expected_scores(model, r, x_aug, logits):
    with torch.no_grad():
        features = model[:2](x_aug)
    v = r.validation_direction
    return last_layer_scores(features, logits, v["2.weight"], v["2.bias"])


def test_views_scored_from_their_own_forward_when_the_originals_ran_after_them():
    """``out_aug = model(x_aug); out = model(x); loss = refiner(out_aug, y) + ce(out, y)``: two
    forwards of the same size, the refiner called with the first one's logits. It scores the views
    from their own features (the head's output is matched by storage), not from the originals',
    which ran last."""
    model, r, x, x_aug, y = _two_forwards_setup()
    out_aug = model(x_aug)
    model(x)
    r(out_aug, y)
    torch.testing.assert_close(r.stats["scores"], _expected_scores(model, r, x_aug, out_aug), rtol=1e-5, atol=1e-6)


def test_converted_logits_are_matched_to_their_forward_by_value():
    """Logits converted after the head (a copy, as Accelerate's mixed precision makes) share no
    storage with it; the forward whose head output equals them by value is the one scored."""
    model, r, x, x_aug, y = _two_forwards_setup()
    out_aug = model(x_aug)
    model(x)
    logits = out_aug.double().float()   # the same values in new memory
    r(logits, y)
    torch.testing.assert_close(r.stats["scores"], _expected_scores(model, r, x_aug, logits), rtol=1e-5, atol=1e-6)


def test_storage_decides_before_values():
    """Two forwards whose head outputs are equal by value (a head with zero weights outputs its bias
    for every row) but whose features differ: the logits' own forward is found by storage."""
    model, r, x, x_aug, y = _two_forwards_setup()
    with torch.no_grad():
        model[2].weight.zero_()
    out_aug = model(x_aug)
    model(x)
    features = r._capture.features(8, out_aug)
    with torch.no_grad():
        torch.testing.assert_close(features, model[:2](x_aug))
    r.remove_hooks()


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_full_mode_scores_the_views_own_inputs_when_the_originals_ran_after_them(bn_mode):
    """The same order in full-model mode: the refiner scores the views from their own captured
    inputs (forward mode, ``bn_mode="eval"``) and reruns their own forward (the replay,
    ``bn_mode="train"``), as a twin that saw only the views' forward does."""
    import copy
    torch.manual_seed(0)
    # with batch statistics also dropout, whose masks the replay must draw again from the views' forward
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16), nn.Dropout(0.3)] if bn_mode == "train" else []) + [
        nn.ReLU(), nn.Linear(16, 3)]
    model = nn.Sequential(*layers)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    val = DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)),
                     batch_size=16)
    make = lambda m: AugmentationRefiner(m, torch.optim.SGD(m.parameters(), lr=0.1), val, mode="full",  # noqa: E731
                                         bn_mode=bn_mode, seed=0, method_options=dict(strength=1.0),
                                         schedule=dict(refresh_every=1, budget=None))
    r, r_twin = make(model), make(twin)
    x, x_aug = torch.randn(8, 6, generator=g), 3 * torch.randn(8, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(5)
    out_aug = model(x_aug)
    model(x)
    r(out_aug, y)
    torch.manual_seed(5)
    r_twin(twin(x_aug), y)
    assert r.stats["score_pass"] == r_twin.stats["score_pass"] == ("finite_difference" if bn_mode == "train" else "forward_mode"), r.stats["score_pass"]
    torch.testing.assert_close(r.stats["scores"], r_twin.stats["scores"], rtol=1e-4, atol=1e-6)


def test_logits_computed_from_the_output_with_two_fitting_forwards_warn_once():
    """Logits scaled after the head match no forward by storage or value; with two forwards of the
    batch's size since the last call the choice of the most recent is a guess, said once. With one
    candidate (the views' forward alone) it is no guess; that the logits are not the head's output
    is said once (the scores assume they are)."""
    import warnings
    model, r, x, x_aug, y = _two_forwards_setup()
    with pytest.warns(RuntimeWarning, match="row for row") as seen:
        r(model(x_aug) / 2.0, y)   # one forward since the last call: no guess
    assert not any("most recent is used" in str(w.message) for w in seen)
    model(x_aug)
    out = model(x)
    with pytest.warns(RuntimeWarning, match="most recent is used"):
        r(out / 2.0, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x_aug)
        r(model(x) / 2.0, y)   # warned once per refiner
    r.remove_hooks()
