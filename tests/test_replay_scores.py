"""Full-model scores on the training forward itself (``mode="full"``, ``bn_mode="train"``): one-sided
finite differences against the training logits, with the forward's dropout masks replayed, checked
against an exact oracle (forward-mode AD through the same forward, same masks)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.heads import ForwardReplay
from augplug.scores import (BaseMismatchError, finite_difference_scores, full_scores, scoring_mode,
                            validation_gradient)
from benchmarks.fd_scores import training_forward_oracle

C = 6


def _net(dropout=0.3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(dropout),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(32, C)).train()


def _batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, C, (n,), generator=g)


def _direction(net):
    xv, yv = _batch(seed=2)
    return validation_gradient(net, xv, F.one_hot(yv, C).float(), params=dict(net.named_parameters()),
                               bn="eval").direction()


def _oracle(net, x, v, replay):
    """Exact J v of the training forward (forward-mode AD through the same forward, same masks)."""
    return training_forward_oracle(net, x, v, replay)


def _training_forward(net, x):
    """The replay record and the logits of one training forward."""
    replay = ForwardReplay.before(x)
    return replay, net(x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_replayed_difference_matches_the_exact_jvp_of_the_training_forward():
    net = _net()
    x, _ = _batch()
    v = _direction(net)
    replay, logits = _training_forward(net, x)
    g = finite_difference_scores(net, x, v, base_log_probs=F.log_softmax(logits.detach(), -1), replay=replay)
    oracle = _oracle(net, x, v, replay)
    assert _rel(g, oracle) < 2e-2  # measured 0.3 %
    y = F.one_hot(torch.arange(32) % C, C).float()
    a, a_oracle = (y * g).sum(1), (y * oracle).sum(1)
    assert int((a.sign() != a_oracle.sign()).sum()) <= 1
    # without the replay the dropout masks differ: the difference is then noise
    g_fresh = finite_difference_scores(net, x, v, base_log_probs=F.log_softmax(logits.detach(), -1),
                                       replay=ForwardReplay(torch.get_rng_state(), None, False))
    assert _rel(g_fresh, oracle) > 1.0


def test_replay_leaves_module_buffers_generators_and_graph_alone():
    net = _net()
    x, y = _batch()
    v = _direction(net)
    replay, logits = _training_forward(net, x)
    bufs = {n: (b, b._version, b.clone()) for n, b in net.named_buffers()}
    after_forward = torch.get_rng_state()
    finite_difference_scores(net, x, v, base_log_probs=F.log_softmax(logits.detach(), -1), replay=replay)
    for n, b in net.named_buffers():
        assert b is bufs[n][0] and b._version == bufs[n][1] and torch.equal(b, bufs[n][2]), n
    assert torch.equal(torch.get_rng_state(), after_forward)
    F.cross_entropy(logits, y).backward()  # the training graph is intact


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_scoring_passes_never_write_the_module_buffers(bn):
    """The training forward's graph saved BatchNorm's running statistics; a scoring pass that wrote
    them in place (even to restore them) made its backward fail."""
    net = _net(dropout=0.0)
    x, y = _batch()
    v = _direction(net)
    logits = net(x)
    versions = {n: b._version for n, b in net.named_buffers()}
    full_scores(net, x, v, bn=bn)
    with scoring_mode(net, bn):
        net(x)
    assert {n: b._version for n, b in net.named_buffers()} == versions
    F.cross_entropy(logits, y).backward()


def test_base_from_another_forward_is_detected():
    net = _net()
    x, _ = _batch()
    v = _direction(net)
    replay, logits = _training_forward(net, x)
    with pytest.raises(BaseMismatchError, match="differ"):
        finite_difference_scores(net, x, v, base_log_probs=F.log_softmax(logits.detach() / 2, -1), replay=replay,
                                 base_tolerance=0.01)


def _refiner(net, **kw):
    xv, yv = _batch(64, seed=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    r = AugmentationRefiner(net, opt, DataLoader(TensorDataset(xv, yv), batch_size=32), mode="full",
                            bn_mode="train", method_options=dict(strength=1.0), **kw)
    return r, opt


def test_refiner_full_train_mode_scores_the_training_forward():
    net = _net()
    r, opt = _refiner(net)
    x, y = _batch()
    for step in range(3):
        replay, logits = _training_forward(net, x)
        opt.zero_grad()
        loss = r(logits, y, num_original=8)
        assert r.stats["score_pass"] == "finite_difference"
        oracle = _oracle(net, x, r.validation_direction, replay)[8:]
        assert _rel(r.stats["scores"][8:], oracle) < 2e-2
        loss.backward()
        opt.step()


def test_refiner_uses_forward_mode_when_the_forward_cannot_be_replayed():
    net = _net(dropout=0.0)
    r, opt = _refiner(net)
    x, y = _batch()
    # the batch from two forwards (their own batch statistics): forward mode
    logits = torch.cat([net(x[:8]), net(x[8:])])
    r(logits, y, num_original=8).backward()
    assert r.stats["score_pass"] == "forward_mode"
    # logits changed by the caller: a warning, and forward mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r(net(x) / 3, y, num_original=8).backward()
    assert r.stats["score_pass"] == "forward_mode"
    assert any("not the model's output" in str(w.message) for w in caught)
    # BatchNorm in eval mode for scoring: forward mode, as before
    r_eval = AugmentationRefiner(net, None, r.val_loader, mode="full", method_options=dict(strength=1.0))
    r_eval(net(x), y, num_original=8)
    assert r_eval.stats["score_pass"] == "forward_mode"
    r.remove_hooks()
    r_eval.remove_hooks()
