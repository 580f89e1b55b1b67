"""SAflex and L2RW rules against their equations, including the edge cases."""
import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from augplug.errors import ConfigurationError
from augplug.functional import l2rw_weights, saflex_targets
from augplug.methods import SAflex, class_renormalize, renormalize


# the paper's rule through the functional form (whose defaults are SAflex()'s measured ones)
paper_targets = functools.partial(saflex_targets, gumbel=True, weighting="hard", normalize=None)


def test_functional_defaults_match_the_policy_class():
    """Composer's rule: SAflex() and saflex_targets() agree on every option they share."""
    fn = inspect.signature(saflex_targets).parameters
    cls = inspect.signature(SAflex).parameters
    shared = [n for n in cls if n in fn]
    assert set(shared) >= {"beta", "tau", "gumbel", "weighting", "weight_tau", "prior", "normalize", "threshold",
                           "weight_signal"}
    # but weighting: the class weighs the views by one thing, the learned share by default ("auto" is
    # "none" there) and per-sample weights elsewhere ("soft", the function's rule)
    assert {n: fn[n].default for n in shared if n != "weighting"} == \
        {n: cls[n].default for n in shared if n != "weighting"}
    assert (fn["weighting"].default, cls["weighting"].default) == ("soft", "auto")
    assert SAflex().weighting == "none"
    assert SAflex(strength=1.0).weighting == SAflex(aug_weight=1.0).weighting == SAflex(strength="adaptive").weighting \
        == fn["weighting"].default
    # and SAflex.paper() is the paper's rule
    p = SAflex.paper()
    assert (p.beta, p.tau, p.gumbel, p.weighting, p.normalize, p.weight_norm, p.aug_weight, p.strength) == \
        (1.0, 1.0, True, "hard", None, "augmented", 1.0, 1.0)


def _case(seed=0, b=16, c=5):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, c, generator=g)
    y = F.one_hot(torch.randint(0, c, (b,), generator=g), c).float()
    return scores, y


def test_paper_rule_by_hand():
    scores, y = _case()
    beta, tau = 0.7, 0.4
    w, soft = paper_targets(scores, y, beta, tau, gumbel=False)
    keep = ((y * scores).sum(1) >= 0).float()
    assert torch.allclose(w, keep * len(keep) / keep.sum())
    assert torch.allclose(soft, torch.softmax((scores + beta * y) / tau, 1))
    assert abs(float(w.mean()) - 1) < 1e-6


def test_gumbel_noise_is_standard_gumbel_before_tau():
    scores, y = _case()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _, soft = paper_targets(scores, y, 1.0, 0.5, gumbel=True, generator=g1)
    u = torch.rand(scores.shape, generator=g2)
    gumbel = -torch.log(-torch.log(u))
    assert torch.allclose(soft, torch.softmax((scores + y + gumbel) / 0.5, 1), atol=1e-6)
    # reproducible with the same generator, different otherwise
    _, again = paper_targets(scores, y, 1.0, 0.5, gumbel=True, generator=torch.Generator().manual_seed(3))
    _, other = paper_targets(scores, y, 1.0, 0.5, gumbel=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(soft, again) and not torch.equal(soft, other)


def test_all_weights_zero_guard():
    scores, y = _case()
    scores = scores - 100 * y  # every upstream label looks harmful
    w, soft = paper_targets(scores, y, 1.0, 1.0, gumbel=False)
    assert torch.equal(w, torch.zeros_like(w)) and torch.isfinite(soft).all()
    w_l2rw = l2rw_weights(scores, y)
    assert torch.equal(w_l2rw, torch.zeros_like(w_l2rw))


def test_large_beta_keeps_labels_and_small_tau_is_one_hot():
    scores, y = _case()
    _, soft = paper_targets(scores, y, 1e4, 1.0, gumbel=False)
    assert torch.allclose(soft, y, atol=1e-6)
    _, keep = paper_targets(scores, y, math.inf, 1.0)
    assert torch.equal(keep, y)
    _, sharp = paper_targets(scores, y, 0.5, 1e-4, gumbel=False)
    assert torch.equal(sharp, F.one_hot((scores + 0.5 * y).argmax(1), y.shape[1]).float())
    _, free = paper_targets(scores, y, 0.0, 1e-4, gumbel=False)  # beta = 0: the LP solution argmax g
    assert torch.equal(free.argmax(1), scores.argmax(1))


def test_soft_upstream_targets_mixup():
    scores, _ = _case()
    lam = 0.7
    a, b = torch.arange(16) % 5, (torch.arange(16) + 2) % 5
    y = lam * F.one_hot(a, 5).float() + (1 - lam) * F.one_hot(b, 5).float()
    w, soft = paper_targets(scores, y, 2.0, 1.0, gumbel=False)
    keep = ((y * scores).sum(1) >= 0).float()
    assert torch.allclose(w, renormalize(keep))
    assert torch.allclose(soft, torch.softmax(scores + 2.0 * y, 1))
    _, soft_log = paper_targets(torch.zeros_like(scores), y, 1.0, 1.0, gumbel=False, prior="log")
    assert torch.allclose(soft_log, y, atol=1e-5)  # log prior keeps the mixing proportions when g = 0


def test_options_normalize_soft_threshold_absolute():
    scores, y = _case()
    w_a, _ = paper_targets(scores, y, 1.0, 1.0, gumbel=False, normalize="rms")
    w_b, _ = paper_targets(scores * 1e-6, y, 1.0, 1.0, gumbel=False, normalize="rms")
    assert torch.allclose(w_a, w_b)
    _, s_a = paper_targets(scores, y, 1.0, 1.0, gumbel=False, normalize="rms")
    _, s_b = paper_targets(scores * 1e-6, y, 1.0, 1.0, gumbel=False, normalize="rms")
    assert torch.allclose(s_a, s_b, atol=1e-5)  # scale-free soft labels
    agree = (y * scores).sum(1)
    w_soft, _ = paper_targets(scores, y, 1.0, 1.0, gumbel=False, weighting="soft", weight_tau=0.5,
                               renormalize_weights=False)
    assert torch.allclose(w_soft, 2 * torch.sigmoid(agree / 0.5))
    w_thr, _ = paper_targets(scores, y, 1.0, 1.0, gumbel=False, threshold=0.3, renormalize_weights=False)
    assert torch.equal(w_thr, (agree >= 0.3).float())
    w_none, _ = paper_targets(scores, y, 1.0, 1.0, gumbel=False, weighting="none")
    assert torch.equal(w_none, torch.ones(16))


def test_l2rw_formula():
    scores, y = _case()
    raw = (y * scores).sum(1).clamp_min(0)
    assert torch.allclose(l2rw_weights(scores, y), raw * 16 / raw.sum())


def test_likelihood_weights_by_hand():
    scores, y = _case(3)
    # soft upstream targets too (a Mixup row): the log-likelihood is the target-weighted log-probability
    y[0] = torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0])
    logp = torch.log_softmax(torch.randn(16, 5, generator=torch.Generator().manual_seed(4)), -1)
    ll = (y * logp).sum(1).double()
    z = ((ll - ll.mean()) / ll.std(unbiased=False)).float()
    w, soft = paper_targets(scores, y, math.inf, gumbel=False, weighting="soft", weight_tau=0.5,
                             weight_signal="likelihood", log_probs=logp, renormalize_weights=False)
    assert torch.allclose(w, 2 * torch.sigmoid(z / 0.5), atol=1e-6)
    assert torch.equal(soft, y)
    # the scores play no part in the weights; the order of the weights is that of the likelihood
    w2, _ = paper_targets(-scores, y, math.inf, weighting="soft", weight_signal="likelihood", log_probs=logp)
    assert torch.equal(torch.argsort(w2), torch.argsort(ll.float()))
    hard, _ = paper_targets(scores, y, math.inf, weighting="hard", threshold=0.3, weight_signal="likelihood",
                             log_probs=logp, renormalize_weights=False)
    assert torch.equal(hard, (z >= 0.3).float())
    # invariant to a per-batch shift and scale of the log-likelihood (only the ranks and spread matter)
    w3, _ = paper_targets(scores, y, math.inf, weighting="soft", weight_tau=0.5, weight_signal="likelihood",
                           log_probs=3 * logp, renormalize_weights=False)
    assert torch.allclose(w3, w, atol=1e-6)
    # a constant likelihood (or one row) gives neutral weights
    w1, _ = paper_targets(scores[:1], y[:1], math.inf, weighting="soft", weight_signal="likelihood",
                           log_probs=logp[:1], renormalize_weights=False)
    assert w1.tolist() == [1.0]
    # the soft labels (finite beta) still come from the scores
    _, s_l = paper_targets(scores, y, 1.0, gumbel=False, weight_signal="likelihood", log_probs=logp)
    _, s_a = paper_targets(scores, y, 1.0, gumbel=False)
    assert torch.equal(s_l, s_a)


def test_standardize_by_formula_and_edge_cases():
    from augplug.errors import ShapeError
    from augplug.methods.saflex import standardize

    x = torch.tensor([1.0, 2.0, 4.0, 9.0])
    expected = (x - x.mean()) / x.std(unbiased=False)
    assert torch.allclose(standardize(x), expected, atol=1e-6)
    assert standardize(torch.full((5,), 3.0)).tolist() == [0.0] * 5     # constant batch: zeros
    assert standardize(torch.zeros(0)).shape == (0,)
    with pytest.raises(ShapeError, match="shape"):
        standardize(torch.zeros(3, 2))


def test_likelihood_weights_need_log_probs():
    scores, y = _case()
    with pytest.raises(ConfigurationError, match="log_probs"):
        paper_targets(scores, y, weight_signal="likelihood")
    with pytest.raises(ConfigurationError, match="log_probs"):
        paper_targets(scores, y, weight_signal="likelihood", log_probs=torch.zeros(3, 5))


@pytest.mark.parametrize("kw", [dict(tau=0), dict(beta=-1), dict(weighting="x"), dict(prior="x"),
                                dict(normalize="l1"), dict(weight_signal="loss")])
def test_bad_options(kw):
    args = dict(beta=1.0, tau=1.0)
    args.update(kw)
    with pytest.raises(ConfigurationError):
        SAflex(**args)


def test_class_renormalize_keeps_each_class_share_for_one_hot_targets():
    torch.manual_seed(0)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    w = torch.rand(9) * 2
    out = class_renormalize(w, F.one_hot(y, 4).float())
    for c in range(3):
        assert float(out[y == c].mean()) == pytest.approx(1.0, rel=1e-6)
        # within a class the order and ratios of the weights are kept
        ratio = out[y == c] / w[y == c]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert float(out.sum()) == pytest.approx(9.0, rel=1e-6)
    # plain renormalization moves weight between classes; the class version does not
    assert float(renormalize(w)[y == 0].sum()) != pytest.approx(3.0, rel=1e-3)


def test_class_renormalize_soft_targets_by_formula_and_zero_class():
    torch.manual_seed(1)
    y = torch.softmax(torch.randn(6, 3) * 2, -1)
    w = torch.rand(6)
    n, m = y.sum(0), (y * w[:, None]).sum(0)
    expected = w * (y @ (n / m))
    out = class_renormalize(w, y)
    assert torch.allclose(out, expected, rtol=1e-6)
    assert float(out.sum()) == pytest.approx(6.0, rel=1e-6)   # the total is the batch size
    # a class whose rows all have weight 0 stays at 0; the others keep their mean of 1
    hard = F.one_hot(torch.tensor([0, 0, 1, 1]), 2).float()
    out = class_renormalize(torch.tensor([0.0, 0.0, 0.5, 1.5]), hard)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.5])
    assert class_renormalize(torch.zeros(3), F.one_hot(torch.tensor([0, 1, 1]), 2).float()).tolist() == [0, 0, 0]


def test_class_renormalize_rejects_mismatched_shapes():
    from augplug.errors import ShapeError
    for w, y in [(torch.ones(3), torch.ones(4, 2)), (torch.ones(3, 1), torch.ones(3, 2)),
                 (torch.ones(3), torch.tensor([0, 1, 1]))]:
        with pytest.raises(ShapeError, match=r"weights \(B,\) and targets \(B, C\)"):
            class_renormalize(w, y)


def test_policy_registry_builds_by_name_and_rejects_what_it_cannot():
    import augplug
    from augplug.methods import POLICIES, Policy

    class Halve(Policy):
        """Every augmented row at weight 1/2 (absolute), targets unchanged."""
        name = "halve"
        refiner_renormalizes = False

        def __init__(self, *, factor: float = 0.5):
            self.factor = factor

        def __call__(self, scores, targets, generator=None):
            return torch.full((targets.shape[0],), self.factor), targets.float()

    try:
        assert augplug.register_policy("halve", Halve) is Halve
        assert "halve" in augplug.list_policies()
        assert isinstance(augplug.create_policy("halve", factor=0.25), Halve)
        with pytest.raises(ConfigurationError, match="does not use the option.*beta") as info:
            augplug.create_policy("halve", beta=1.0)
        assert "factor" in info.value.fix
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        val = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
        r = augplug.AugmentationRefiner(model, None, val, method="halve", method_options={"factor": 0.25})
        r(model(torch.randn(6, 4)), torch.randint(0, 3, (6,)), num_original=2)
        assert torch.equal(r.stats["weights"], torch.tensor([1, 1, 0.25, 0.25, 0.25, 0.25]))
    finally:
        POLICIES.pop("halve", None)
    with pytest.raises(ConfigurationError, match="needs a Policy subclass"):
        augplug.register_policy("bad", object)
    with pytest.raises(ConfigurationError, match="non-empty string"):
        augplug.register_policy("", Halve)
    with pytest.raises(ConfigurationError, match="unknown method 'halve'"):
        augplug.create_policy("halve")


def test_refiner_kwargs_sorts_a_flat_configuration():
    from augplug import refiner_kwargs
    from augplug.contrastive import ContrastiveRefiner

    assert refiner_kwargs(refresh_every=1, beta=1.0, seed=3, fresh_batches=None) == {
        "seed": 3, "schedule": {"refresh_every": 1, "fresh_batches": None}, "method_options": {"beta": 1.0}}
    assert refiner_kwargs({"mode": "full"}, strength="auto") == {"mode": "full", "method_options": {"strength": "auto"}}
    # the contrastive shell's own options stay with it
    assert refiner_kwargs({"class_prompts": [0, 1], "warmup_steps": 2}, refiner=ContrastiveRefiner) == {
        "class_prompts": [0, 1], "schedule": {"warmup_steps": 2}}
    assert refiner_kwargs() == {}
