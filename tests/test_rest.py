"""The separate pattern: ``refiner(model(x_aug), y_aug) + F.cross_entropy(model(x), y)``. The
refiner sees views alone; the capture's gradient hooks tell it what the rest of the loss (the
originals' term) did to the head, so that the adaptive share weighs the views against that term."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner, SAflex, refiner_kwargs
from augplug.errors import ConfigurationError, NonFiniteError, ShapeError
from augplug.scores import last_layer_scores
from augplug.share import AdaptiveShare

D, C = 6, 3


def _model():
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))


def _val():
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(48, D, generator=g), torch.randint(0, C, (48,), generator=g)),
                      batch_size=16)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)
    x_aug, y_aug = x + 0.5 * torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)
    return x, y, x_aug, y_aug


def _refiner(model, opt, init=0.4, signal="upstream", **kw):
    """A refiner whose share follows the plain agreements ``y^T g`` (``signal="upstream"``), which these
    tests work out by hand; the default direction signal has its own tests below."""
    return AugmentationRefiner(model, opt, _val(), schedule=dict(refresh_every=1, budget=None),
                               **refiner_kwargs({"aug_weight": AdaptiveShare(init=init, signal=signal), **kw}))


def _spy_share(r):
    """Record the statistics each call gives the share (the gather of a call that carries them:
    :meth:`AdaptiveShare.gather`)."""
    seen = []
    gather = r.share.gather

    def spy(stats, *args, base=None, **kw):
        if stats is not None:
            seen.append(stats.detach().clone())
        return gather(stats, *args, base=base, **kw)

    r.share.gather = spy
    return seen


@pytest.mark.parametrize("order", ["after", "before", "features"])
def test_rest_agreement_is_the_originals_mean_agreement(order):
    """The share's statistics at call k+1 hold, for call k: the views' sum of ``y^T g`` and their
    number, and the rest's agreement ``a_rest``, which for ``mean CE(originals)`` equals the
    originals' mean agreement ``y^T g`` computed directly (their features and logits at step k,
    the validation direction of call k), whatever scale the whole loss is multiplied by."""
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r = _refiner(model, opt)
    seen = _spy_share(r)
    expected = []
    for step in range(4):
        x, y, x_aug, y_aug = _batch(step)
        if order == "before":
            rest = F.cross_entropy(model(x), y)
            out_aug = model(x_aug)
            loss = r(out_aug, y_aug) + rest
        elif order == "features":
            h_aug = model[:2](x_aug)
            out_aug = model[2](h_aug)
            loss = r(out_aug, y_aug, features=h_aug) + F.cross_entropy(model(x), y)
        else:
            out_aug = model(x_aug)
            loss = r(out_aug, y_aug) + F.cross_entropy(model(x), y)
        v = r.validation_direction
        if v is None:   # call 0: nothing to score
            expected.append(None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            continue
        with torch.no_grad():
            h, logits = model[:2](x), model(x)
            g_orig = last_layer_scores(h, logits, v["2.weight"], v["2.bias"])
            g_aug = last_layer_scores(model[:2](x_aug), out_aug, v["2.weight"], v["2.bias"])
        a_orig = (F.one_hot(y, C) * g_orig).sum(-1).mean()
        aug_sum = (F.one_hot(y_aug, C) * g_aug).sum()
        expected.append(torch.stack([aug_sum.double(), torch.tensor(8.0, dtype=torch.float64),
                                     a_orig.double(), torch.tensor(1.0, dtype=torch.float64)]))
        opt.zero_grad()
        (5.0 * loss).backward()   # a loss scale (GradScaler, a user's factor) cancels
        opt.step()
    # call 0 cannot know of a rest (its gradient hooks start with it: an originals' forward run
    # before it is not seen); the first call that sees one has no earlier views to judge; each
    # later call judges the call before it
    first = 2 if order == "before" else 1
    assert len(seen) == 3 - first
    for k, stats in enumerate(seen, start=first):
        torch.testing.assert_close(stats, expected[k], rtol=1e-4, atol=1e-7)
    assert r.stats["against_rest"]


def test_separate_pattern_gradient_keeps_the_two_terms_total_weight():
    """With the views weighed against the rest of the loss at share ``lam``, the parameters' gradient
    is ``2 / (1 + lam) * (grad CE(originals) + lam * grad CE(views))``: the views' loss carries
    ``2 lam / (1 + lam)`` and the rest's output gradient is scaled by ``2 / (1 + lam)`` in its
    backward pass. Per-sample weights and targets stay the upstream's (the default strength)."""
    torch.manual_seed(0)
    model = _model()
    r = _refiner(model, torch.optim.SGD(model.parameters(), lr=0.0), init=0.25)
    for step in range(3):
        x, y, x_aug, y_aug = _batch(step)
        model.zero_grad()
        loss = r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)
        loss.backward()
        got = [p.grad.clone() for p in model.parameters()]
        lam = r.stats["aug_weight"]
        assert r.stats["against_rest"] == (step > 0)
        # the first call cannot know there is a rest: the views' loss is plain upstream's then
        lam_ref, scale = (lam, 2 / (1 + lam)) if step > 0 else (1.0, 1.0)
        assert torch.equal(r.stats["weights"], torch.ones(8))
        ref = _model()   # a copy without the refiner's hooks (deepcopy would copy them)
        ref.load_state_dict(model.state_dict())
        plain = F.cross_entropy(ref(x), y) + lam_ref * F.cross_entropy(ref(x_aug), y_aug)
        (scale * plain).backward()
        for a, p in zip(got, ref.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("soft", [False, True])
def test_views_alone_without_a_rest_train_as_upstream(soft):
    """No other forward trains the model (views alone, or Mixup soft targets): every step's loss is
    bit for bit that of plain upstream training, and the share is never asked."""
    def run(method):
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        r = AugmentationRefiner(model, opt, _val(), method=method, schedule=dict(refresh_every=1, budget=None))
        losses = []
        for step in range(4):
            _, _, x_aug, y_aug = _batch(step)
            t = 0.7 * F.one_hot(y_aug, C) + 0.3 * F.one_hot(y_aug.roll(1), C) if soft else y_aug
            loss = r(model(x_aug), t)
            losses.append(loss.detach())
            assert not r.stats["against_rest"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return losses, r

    a, r = run("saflex")
    b, _ = run("none")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert float(r.share.state_dict()["updates"]) == 0


def _separate_run(steps, state=None, offset=0, reject_first=False):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    r = _refiner(model, opt)
    if state is not None:
        model.load_state_dict(state[0]), opt.load_state_dict(state[1]), r.load_state_dict(state[2])
    for step in range(offset, offset + steps):
        x, y, x_aug, y_aug = _batch(step)
        if reject_first and step == offset:
            with pytest.raises(ShapeError):   # a rejected call right after loading loses nothing
                r(model(x_aug), y_aug[:5])
        loss = r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, r


def test_resume_is_bit_exact_in_the_separate_pattern():
    """The state holds the signal of the last backward pass and that the head's gradients are
    tracked: 3 steps, save, load, 3 steps equal 6 steps."""
    m, _, r = _separate_run(6)
    m1, o1, r1 = _separate_run(3)
    state = copy.deepcopy((m1.state_dict(), o1.state_dict(), r1.state_dict()))
    assert state[2]["rest"] is not None and state[2]["rest"]["tracking"]
    for reject_first in (False, True):
        # a fresh copy each time: Adam's load_state_dict keeps the saved tensors and steps them in place
        m2, _, r2 = _separate_run(3, state=copy.deepcopy(state), offset=3, reject_first=reject_first)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
        assert r.share.state_dict() == r2.share.state_dict()


def test_a_bad_rest_state_is_rejected_and_changes_nothing():
    good = _separate_run(3)[2].state_dict()
    r = _separate_run(1)[2]
    before = copy.deepcopy(r.state_dict())
    bad_states = [({"tracking": True}, ConfigurationError),
                  ({"tracking": True, "signal": torch.zeros(4, dtype=torch.float64)}, ConfigurationError),
                  ({"tracking": False, "signal": torch.zeros(5, dtype=torch.float64)}, ConfigurationError),
                  ("yes", ConfigurationError),
                  ({"tracking": True, "signal": torch.full((5,), float("nan"), dtype=torch.float64)}, NonFiniteError)]
    for bad, error in bad_states:
        with pytest.raises(error):
            r.load_state_dict({**good, "rest": bad})
        after = r.state_dict()
        assert after["rest"]["tracking"] and torch.equal(after["rest"]["signal"], before["rest"]["signal"])
        assert after["share"] == before["share"] and after["step_count"] == before["step_count"]


def test_a_rejected_call_loses_nothing():
    """A call rejected for a bad target shape leaves the separate-term bookkeeping as it was: the
    run goes on exactly as without that call."""
    def run(reject):
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        r = _refiner(model, opt)
        for step in range(4):
            x, y, x_aug, y_aug = _batch(step)
            out_aug = model(x_aug)
            if reject and step == 2:
                with pytest.raises(ShapeError):
                    r(out_aug, y_aug[:5])
            loss = r(out_aug, y_aug) + F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], r.share.state_dict()

    (p1, s1), (p2, s2) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2)) and s1 == s2


def test_features_passed_with_their_graph_train_like_detached_ones():
    """Scores are constants: features passed as ``features=`` while they still carry the training
    graph give the same parameter gradient as the same features detached (one batch of originals
    and views, full refinement)."""
    grads = []
    for detach in (False, True):
        torch.manual_seed(0)
        model = _model()
        r = _refiner(model, torch.optim.SGD(model.parameters(), lr=0.0), weighting="soft")
        x, y, x_aug, y_aug = _batch(0)
        h = model[:2](torch.cat([x, x_aug]))
        loss = r(model[2](h), torch.cat([y, y_aug]), num_original=8, features=h.detach() if detach else h)
        assert r.stats["active"] and float((r.stats["weights"][8:] - 1).abs().max()) > 1e-4
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_a_rest_state_is_rejected_by_a_refiner_without_an_adaptive_share():
    state = {**_separate_run(3)[2].state_dict(), "share": None}
    model = _model()
    r = AugmentationRefiner(model, None, _val(), **refiner_kwargs({"aug_weight": 1.0}))
    before = r.state_dict()
    with pytest.raises(ConfigurationError, match="separate-term"):
        r.load_state_dict(state)
    after = r.state_dict()
    assert after["rest"] is None and after["step_count"] == before["step_count"] and not r._capture.track_gradients


@pytest.mark.parametrize("calls", [1, 2])
def test_two_calls_of_views_alone_before_one_backward_warn_once(calls):
    """Two augmentation pipelines through two refiner calls and one backward pass: only the first
    call of each step is weighed against the rest of the loss, so one warning names the fix (one
    call with all the views). One call per step, and gradient accumulation, do not warn."""
    import warnings
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = _refiner(model, opt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(8):
            x, y, x_aug, y_aug = _batch(step)
            for accumulate in range(2):     # two backward passes per optimizer step
                loss = sum(r(model(x_aug + 0.1 * k), y_aug) for k in range(calls)) + F.cross_entropy(model(x), y)
                loss.backward()
            opt.step()
            opt.zero_grad()
    warned = [w for w in record if "before one backward pass" in str(w.message)]
    assert len(warned) == (1 if calls == 2 else 0)
    if calls == 2:
        assert "torch.cat" in str(warned[0].message)


def test_full_model_mode_trains_separate_views_as_given():
    """Full-model mode hooks the model's inputs, not the head: the separate pattern's views are
    trained exactly as plain upstream trains them (the share is never asked)."""
    def run(method, mode):
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        r = AugmentationRefiner(model, opt, _val(), method=method, mode=mode,
                                schedule=dict(refresh_every=1, budget=None))
        for step in range(4):
            x, y, x_aug, y_aug = _batch(step)
            loss = r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)
            assert not r.stats["against_rest"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach() for p in model.parameters()], r

    a, r = run("saflex", "full")
    b, _ = run("none", "last_layer")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert float(r.share.state_dict()["updates"]) == 0


# ------------------------------------------------------------------------- the share's direction signal
def _direction(targets, scores, logits):
    """``y^T g / |y - p|`` per row, by hand."""
    return (targets * scores).sum(-1) / (targets - logits.softmax(-1)).norm(dim=-1)


@pytest.mark.parametrize("pattern", ["batch", "separate"])
def test_direction_signal_is_each_rows_agreement_per_unit_of_residual(pattern):
    """The share's default signal, ``"direction"``: its statistics hold the views' summed
    ``y^T g / |y - p|`` and their number, and the originals' mean of the same: computed in the batch
    (one call), or from the rest's head gradients (separate pattern, where the loss's scale cancels
    because each row's gradient is taken as a direction)."""
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r = AugmentationRefiner(model, opt, _val(), schedule=dict(refresh_every=1, budget=None),
                            **refiner_kwargs({"aug_weight": AdaptiveShare(init=0.4)}))   # the default signal
    assert r.share.signal == "direction"
    seen = _spy_share(r)
    expected = []
    for step in range(4):
        x, y, x_aug, y_aug = _batch(step)
        if pattern == "batch":
            out = model(torch.cat([x, x_aug]))
            loss = r(out, torch.cat([y, y_aug]), num_original=len(x))
        else:
            out_aug = model(x_aug)
            loss = r(out_aug, y_aug) + F.cross_entropy(model(x), y)
        v = r.validation_direction
        if v is not None:
            with torch.no_grad():
                lo, la = model(x), model(x_aug)
                g_orig = last_layer_scores(model[:2](x), lo, v["2.weight"], v["2.bias"])
                g_aug = last_layer_scores(model[:2](x_aug), la, v["2.weight"], v["2.bias"])
            yo, ya = F.one_hot(y, C).float(), F.one_hot(y_aug, C).float()
            expected.append(torch.stack([_direction(ya, g_aug, la).sum().double(), torch.tensor(8.0, dtype=torch.float64),
                                         _direction(yo, g_orig, lo).mean().double(), torch.tensor(1.0, dtype=torch.float64)]))
        else:
            expected.append(None)
        opt.zero_grad()
        (5.0 * loss).backward()
        opt.step()
    if pattern == "batch":   # each call judges its own batch
        pairs = [(s, e) for s, e in zip(seen, expected) if e is not None]
    else:                    # each call judges the call before it
        pairs = list(zip(seen, expected[1:len(seen) + 1]))
    # the originals' (or the rest's rows') statistic is their sum and count, as share_agreements keeps
    # them (a process group pools them)
    pairs = [(s, torch.stack([e[0], e[1], e[2] * 8, e[1]])) for s, e in pairs]
    assert len(pairs) >= 2
    for stats, want in pairs:
        torch.testing.assert_close(stats, want, rtol=1e-4, atol=1e-7)


def test_direction_signal_needs_probabilities_and_is_not_the_contrastive_refiners():
    """The direction signal divides by the residual (and needs the probabilities for it); a share that
    names no signal is the refiner's: direction in the classification refiner (also for
    ``aug_weight="adaptive"``); the contrastive refiner rejects an explicit direction signal (its
    default: ``tests/test_contrastive.py``)."""
    from augplug.contrastive import ContrastiveRefiner
    t, g = torch.eye(3)[[0, 1]], torch.randn(2, 3)
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])
    for share in (AdaptiveShare(signal="direction"), AdaptiveShare()):   # unresolved: read as direction
        with pytest.raises(ShapeError, match="probabilities"):
            share.agreement(t, g)
        torch.testing.assert_close(share.agreement(t, g, p), (t * g).sum(-1) / (t - p).norm(dim=-1))
    torch.testing.assert_close(AdaptiveShare(signal="upstream").agreement(t, g, p), (t * g).sum(-1))
    assert AugmentationRefiner(_model(), None, _val()).share.signal == "direction"   # aug_weight="adaptive"
    share = AdaptiveShare()
    assert AugmentationRefiner(_model(), None, _val(), method=SAflex(aug_weight=share)).share is share
    assert share.signal == "direction"
    assert AdaptiveShare(signal="refined").signal == "refined"   # a named signal is kept
    with pytest.raises(ConfigurationError, match="direction"):
        ContrastiveRefiner(_model(), None, _val(), method=SAflex(aug_weight=AdaptiveShare(signal="direction")))


def test_a_state_saved_between_micro_batches_resumes_exactly():
    """The separate pattern with three micro-batches per update, saved after a micro-batch's backward
    (with the model's accumulated gradients): the restored refiner books the views it judges next
    to the update they were trained in, and continues exactly like the uninterrupted one. Booking
    them to the update before (the state without the last call's update count) steps the share an
    update early."""
    def run(cut=None):
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        r = _refiner(model, opt, init=0.5, signal="direction")
        losses, k = [], 0
        for update in range(4):
            for micro in range(3):
                x, y, x_aug, y_aug = _batch(10 * update + micro)
                loss = (r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)) / 3
                loss.backward()
                losses.append(float(loss.detach()))
                k += 1
                if k == cut:   # save, and go on with fresh objects restored from the save
                    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), r.state_dict(),
                                           [p.grad.clone() for p in model.parameters()]))
                    r.remove_hooks()
                    model = _model()
                    opt = torch.optim.SGD(model.parameters(), lr=0.05)
                    r = _refiner(model, opt, init=0.5, signal="direction")
                    model.load_state_dict(saved[0])
                    opt.load_state_dict(saved[1])
                    r.load_state_dict(saved[2])
                    for p, g in zip(model.parameters(), saved[3]):
                        p.grad = g.clone()
            opt.step()
            opt.zero_grad()
        return losses, float(r.share.log_share)

    plain = run()
    for cut in (4, 5, 7):   # after the first micro-batch of an update, and within it
        assert run(cut) == plain, cut


def test_a_copy_of_the_model_trains_like_a_plain_model():
    """``copy.deepcopy(model)`` (an EMA copy, a second run) and ``torch.save(model)`` carry the
    refiner's hooks: the copy's hooks record nothing and leave its gradients alone (the rest's
    rescaling 2 / (1 + share) stays the original's), and the original refiner goes on."""
    import io
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r = _refiner(model, opt, init=0.5)
    for step in range(3):
        x, y, x_aug, y_aug = _batch(step)
        loss = r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r._capture.rest_scale is not None   # the original rescales the rest's gradient
    twin = copy.deepcopy(model)
    plain = _model()
    plain.load_state_dict(model.state_dict())
    x, y, _, _ = _batch(9)
    F.cross_entropy(twin(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for a, b in zip(twin.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    torch.save(model, io.BytesIO())
    x, y, x_aug, y_aug = _batch(10)
    r(model(x_aug), y_aug).backward()
    assert r.stats["against_rest"]


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_accumulated_micro_batches_step_the_share_once_per_update_and_share_it(micro_batches):
    """With k micro-batches per update the share stepped twice per update (the first gather of an
    update's first call flushed the update before's statistics without its last micro-batch, the
    last one then stepped again), and the micro-batches of one update used different shares. Now:
    one step per update, every call of an update uses its first call's share, and a run without
    accumulation is unchanged."""
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r = _refiner(model, opt, init=0.5, signal="direction")
    shares, updates = [], 8
    for update in range(updates):
        used = []
        for micro in range(micro_batches):
            x, y, x_aug, y_aug = _batch(10 * update + micro)
            loss = (r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)) / micro_batches
            used.append(r.stats["aug_weight"])
            loss.backward()
        opt.step()
        opt.zero_grad()
        shares.append(used)
        assert len(set(used)) == 1, (update, used)
    assert r.stats["against_rest"]
    # the statistics of an update are complete at the next update's first call: one step for each
    # update but the last (the first update's later micro-batches judge its first one's views)
    assert int(r.share.updates) == updates - 1
    assert len({s[0] for s in shares}) > 1   # the share moved


def test_views_sliced_out_of_one_forward_are_refused_at_the_first_call():
    """``z = model(cat[x, x_aug]); refiner(z[n:], y_aug) + CE(z[:n], y)``: the whole forward was taken as
    the rest of the loss (the views rescaled twice, their rows in the rest's agreement), silently with
    ``features=`` and from the third call without. Refused at once, nothing changed; the one-call form
    trains."""
    from fault_harness import same
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r = _refiner(model, opt, init=0.5, signal="direction")
    x, y, x_aug, y_aug = _batch(0)
    before = copy.deepcopy(r.state_dict())
    for features in (False, True):
        h = model[:2](torch.cat([x, x_aug]))
        z = model[2](h)
        kw = {"features": h[8:]} if features else {}
        with pytest.raises(ShapeError, match="some of the rows of a larger forward"):
            r(z[8:], y_aug, **kw)
        same(before, r.state_dict())
    z = model(torch.cat([x, x_aug]))
    r(z, torch.cat([y, y_aug]), num_original=8).backward()


def test_a_rest_backpropagated_before_the_refiner_call_warns_once():
    """``CE(model(x), y).backward(); refiner(model(x_aug), y_aug).backward()``: the originals' gradient
    is counted in the share's signal but cannot be rescaled (the scale is armed at the call). The
    documented order does not warn."""
    import warnings

    def run(early):
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        r = _refiner(model, opt, init=0.5, signal="direction")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for step in range(6):
                x, y, x_aug, y_aug = _batch(step)
                opt.zero_grad()
                if early:
                    F.cross_entropy(model(x), y).backward()
                    r(model(x_aug), y_aug).backward()
                else:
                    (r(model(x_aug), y_aug) + F.cross_entropy(model(x), y)).backward()
                opt.step()
        return [str(m.message) for m in w if "backpropagated before" in str(m.message)]

    assert len(run(True)) == 1
    assert run(False) == []
