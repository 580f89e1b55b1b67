"""Contrastive SAflex: scores against per-row gradient oracles (both CLIP directions, class prompts,
a timm encoder), the validation direction, the identity limit, typed errors with unchanged state,
and resume."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from augplug.contrastive import (DIRECTIONS, ClassEmbeddings, ContrastiveRefiner, DualEncoder, clip_loss,
                                 contrastive_scores, contrastive_targets, contrastive_validation_gradient)
from augplug.errors import AugplugError, ConfigurationError, NonFiniteError, ShapeError, TargetError
from augplug.refiner import refiner_kwargs

VOCAB, LEN, DIM = 12, 5, 6


class TinyImage(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Dropout(0.3), nn.Linear(10, DIM))

    def forward(self, x):
        return self.net(x)


class TinyText(nn.Module):
    """Token embeddings, mean pooling, a projection: a small text encoder."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 7)
        self.proj = nn.Linear(7, DIM)

    def forward(self, ids):
        return self.proj(torch.tanh(self.tok(ids).mean(1)))


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g).double(), torch.randint(0, VOCAB, (n, LEN), generator=g)


def _models(seed=0):
    torch.manual_seed(seed)
    img, txt = TinyImage().double(), TinyText().double()
    img.net[1].running_mean.normal_()  # non-trivial running statistics
    scale = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    return img, txt, scale


def _row_grad_oracle(dual, images, texts, v, direction):
    """g[i, c] = d log_softmax(row i)_c / d theta . v, one autograd.grad per (row, candidate)."""
    named = dict(dual.named_parameters())
    names = list(v)
    s = dual(images, texts)
    lp = F.log_softmax(s, 1) if direction == "image_to_text" else F.log_softmax(s.t(), 1)
    out = torch.zeros(lp.shape, dtype=torch.float64)
    for i in range(lp.shape[0]):
        for c in range(lp.shape[1]):
            gr = torch.autograd.grad(lp[i, c], [named[n] for n in names], retain_graph=True, allow_unused=True)
            out[i, c] = sum((gi * v[n]).sum() for gi, n in zip(gr, names) if gi is not None)
    return out


def _vmap_oracle_i2t(dual, images, texts, v):
    """Second oracle (torch.func): per-row loss gradients -grad CE(row i, e_c) by vmap(grad), dotted with v."""
    params = {n: p.detach() for n, p in dual.named_parameters()}
    buffers = dict(dual.named_buffers())
    b = images.shape[0]

    def row_loss(sub, pick):  # pick: a (B, B) one-hot selecting (row i, candidate c)
        p = dict(params)
        p.update(sub)
        s = functional_call(dual, (p, buffers), (images, texts))
        return -(F.log_softmax(s, 1) * pick).sum()

    sub = {n: params[n] for n in v}
    picks = torch.eye(b * b, dtype=images.dtype).reshape(b * b, b, b)
    per = vmap(grad(row_loss), in_dims=(None, 0))(sub, picks)
    return -sum((per[n] * v[n]).reshape(b * b, -1).sum(1) for n in v).reshape(b, b)


def _refiner(img, txt, scale, loader, **kw):
    params = list(img.parameters()) + list(txt.parameters()) + [scale]
    opt = torch.optim.SGD(params, lr=0.05)
    kw.setdefault("refresh_every", 1)
    return opt, ContrastiveRefiner(img, txt, opt, loader, logit_scale=scale, **refiner_kwargs(kw, refiner=ContrastiveRefiner))


def test_scores_match_per_row_gradients_both_directions():
    img, txt, scale = _models()
    val = DataLoader(TensorDataset(*_pairs(6, 1)), batch_size=6)
    opt, r = _refiner(img, txt, scale, val)
    x, t = _pairs(5, 2)
    img.train(); txt.train()
    loss = r(x, t)
    assert torch.isfinite(loss)
    v = r.validation_direction
    assert set(v) == {n for n, _ in r.model.named_parameters()}  # both encoders and the logit scale
    img.eval(); txt.eval()
    for d in DIRECTIONS:
        oracle = _row_grad_oracle(r.model, x, t, v, d)
        assert torch.allclose(r.stats["directions"][d]["scores"].double(), oracle, rtol=1e-5, atol=1e-9), d
        assert oracle.abs().max() > 1e-4  # not a vacuous comparison
        # both encoders matter: dropping either side's tangent changes the scores
        for side in ("image.", "text."):
            part = {n: t_ for n, t_ in v.items() if not n.startswith(side)}
            g_part = contrastive_scores(r.model, x, t, part, directions=(d,))[d]
            assert not torch.allclose(g_part.double(), oracle, rtol=1e-3, atol=1e-6)
    assert torch.allclose(_vmap_oracle_i2t(r.model, x, t, v),
                          r.stats["directions"]["image_to_text"]["scores"].double(), rtol=1e-5, atol=1e-9)
    # the scoring passes left the BatchNorm buffers and the train/eval flags as they were
    assert img.training is False  # we set eval above ourselves


def test_validation_direction_is_minus_gradient_of_clip_loss():
    img, txt, scale = _models()
    xv, tv = _pairs(6, 1)
    opt, r = _refiner(img, txt, scale, DataLoader(TensorDataset(xv, tv), batch_size=6))
    img.train(); txt.train()
    bn_before = img.net[1].running_mean.clone()
    r(*_pairs(4, 3))
    v = r.validation_direction
    dual = r.model
    img.eval(); txt.eval()
    s = dual(xv, tv)
    target = torch.arange(6)
    ref = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target))
    grads = torch.autograd.grad(ref, [p for _, p in dual.named_parameters()])
    for (n, _), gr in zip(dual.named_parameters(), grads):
        assert torch.allclose(v[n].double(), -gr, rtol=1e-5, atol=1e-6), n  # v is kept in fp32
    assert abs(r.stats["val_loss"] - float(ref.detach())) < 1e-6
    # the training forward updated the BatchNorm statistics once (the user's forward); scoring did not
    img2, txt2, _ = _models()
    img2.train()
    img2(_pairs(4, 3)[0])
    assert torch.allclose(img.net[1].running_mean, img2.net[1].running_mean)
    assert not torch.allclose(bn_before, img.net[1].running_mean)


def test_loss_is_refined_clip_loss():
    img, txt, scale = _models()
    opt, r = _refiner(img, txt, scale, DataLoader(TensorDataset(*_pairs(6, 1)), batch_size=6),
                      beta=1.0, tau=0.5, gumbel=True, weighting="hard", normalize=None, weight_tau=1.0)
    img.eval(); txt.eval()  # dropout off so that the loss can be recomputed
    x, t = _pairs(5, 4)
    r.check_train_mode = False
    loss = r(x, t, num_original=1)
    st = r.stats["directions"]
    s = r.model(x, t)
    ref = clip_loss(s, weights={d: st[d]["weights"] for d in DIRECTIONS},
                    soft_targets={d: st[d]["soft_targets"] for d in DIRECTIONS})
    assert torch.allclose(loss, ref.to(loss.dtype), atol=1e-6)
    for d in DIRECTIONS:
        w, y = st[d]["weights"], st[d]["soft_targets"]
        assert w[0] == 1 and torch.equal(y[0], torch.eye(5, dtype=y.dtype)[0])  # the original pair
        g = st[d]["scores"]
        kept = (g[1:].diagonal(offset=1) >= 0)  # weight from the positive pair g_ii
        assert torch.equal(w[1:] > 0, kept)
        assert torch.allclose(y.sum(1), torch.ones(5, dtype=y.dtype))


def test_identical_encoders_identity_limit():
    torch.manual_seed(0)
    enc = TinyText().double()
    dual = DualEncoder(enc, enc, logit_scale=2.0)
    t = torch.randint(0, VOCAB, (6, LEN), generator=torch.Generator().manual_seed(0))
    v = {n: torch.randn_like(p) for n, p in dual.named_parameters()}
    g = contrastive_scores(dual, t, t, v)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in enc.parameters())  # restored
    # one shared module and the same inputs: S is symmetric, so both readings give the same scores
    assert torch.allclose(g["image_to_text"], g["text_to_image"], atol=1e-6)
    diag_mass = []
    for beta in (0.0, 1.0, 3.0, 10.0, 30.0, 100.0):
        w, y = contrastive_targets(g["image_to_text"], beta=beta, tau=1.0, gumbel=False, normalize="rms")
        diag_mass.append(float(y.diagonal().mean()))
        assert torch.allclose(y.sum(1), torch.ones(6))
    assert all(a <= b + 1e-7 for a, b in zip(diag_mass, diag_mass[1:]))
    assert diag_mass[-1] > 1 - 1e-6
    _, y_inf = contrastive_targets(g["image_to_text"], beta=100.0, gumbel=False, normalize="rms")
    assert torch.allclose(y_inf, torch.eye(6), atol=1e-6)
    # and the refiner with identical encoders on unaugmented pairs trains towards the identity pairing
    loader = DataLoader(TensorDataset(t, t), batch_size=6)
    r = ContrastiveRefiner(enc, enc, None, loader, logit_scale=2.0,
                           method_options=dict(beta=100.0, tau=1.0, gumbel=False))
    enc.train()
    r(t, t)
    for d in DIRECTIONS:
        assert torch.allclose(r.stats["directions"][d]["soft_targets"], torch.eye(6), atol=1e-6)


def test_class_prompts_reduce_to_c_way_classification():
    torch.manual_seed(0)
    img = TinyImage().double()
    prompts = ClassEmbeddings(4, DIM).double()
    x = torch.randn(10, 8).double()
    y = torch.randint(0, 4, (10,))
    val = DataLoader(TensorDataset(torch.randn(8, 8).double(), torch.randint(0, 4, (8,))), batch_size=8)
    opt = torch.optim.SGD(list(img.parameters()) + list(prompts.parameters()), lr=0.1)
    r = ContrastiveRefiner(img, prompts, opt, val, class_prompts=torch.arange(4), logit_scale=1.0,
                           schedule=dict(refresh_every=1))
    img.train()
    r(x, y)
    assert r.stats["logits"].shape == (10, 4) and r.directions == ("image_to_text",)
    v = r.validation_direction
    assert "text.weight" in v
    img.eval()
    oracle = _row_grad_oracle(r.model, x, torch.arange(4), v, "image_to_text")
    assert torch.allclose(r.stats["scores"].double(), oracle, rtol=1e-5, atol=1e-9)
    # with originals in the batch only the augmented rows are scored, with the same values
    img.train()
    r(x, y, num_original=3)
    assert torch.all(r.stats["scores"][:3] == 0) and torch.all(r.stats["weights"][:3] == 1)
    img.eval()
    oracle = _row_grad_oracle(r.model, x, torch.arange(4), r.validation_direction, "image_to_text")
    assert torch.allclose(r.stats["scores"][3:].double(), oracle[3:], rtol=1e-5, atol=1e-9)
    # the unrefined loss is ordinary cross-entropy over the C prompt logits
    r0 = ContrastiveRefiner(img, prompts, opt, val, method="none", class_prompts=torch.arange(4),
                            logit_scale=1.0, check_train_mode=False)
    assert torch.allclose(r0(x, y).double(), F.cross_entropy(r.model(x, torch.arange(4)), y), atol=1e-6)
    # fixed class embeddings: no tangent on them, scores still match the oracle
    fixed = ClassEmbeddings(4, DIM, trainable=False).double()
    rf = ContrastiveRefiner(img, fixed, None, val, class_prompts=torch.arange(4), logit_scale=1.0,
                            check_train_mode=False)
    rf(x, y)
    assert "text.weight" not in rf.validation_direction
    oracle = _row_grad_oracle(rf.model, x, torch.arange(4), rf.validation_direction, "image_to_text")
    assert torch.allclose(rf.stats["scores"].double(), oracle, rtol=1e-5, atol=1e-9)


def test_timm_image_encoder_with_text_encoder():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    img = timm.create_model("test_resnet", num_classes=DIM, pretrained=False).double()
    txt = TinyText().double()
    g = torch.Generator().manual_seed(0)
    xv, tv = torch.randn(4, 3, 32, 32, generator=g).double(), torch.randint(0, VOCAB, (4, LEN), generator=g)
    r = ContrastiveRefiner(img, txt, None, DataLoader(TensorDataset(xv, tv), batch_size=4),
                           schedule=dict(refresh_every=1))
    x, t = torch.randn(3, 3, 32, 32, generator=g).double(), torch.randint(0, VOCAB, (3, LEN), generator=g)
    img.train(); txt.train()
    r(x, t)
    v = r.validation_direction
    img.eval(); txt.eval()
    oracle = _row_grad_oracle(r.model, x, t, v, "text_to_image")
    assert torch.allclose(r.stats["directions"]["text_to_image"]["scores"].double(), oracle, rtol=1e-4, atol=1e-9)


def _state(r):
    return copy.deepcopy(r.state_dict())


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


BAD = {
    "mismatched batch sizes": (lambda x, t: (x, t[:3]), ShapeError, "texts"),
    "NaN images": (lambda x, t: (torch.where(torch.arange(5)[:, None] == 2, float("nan"), x), t), NonFiniteError, "NaN"),
    "bad mask": (lambda x, t: (x, t), ShapeError, "bool"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_typed_error_state_unchanged(case):
    img, txt, scale = _models()
    opt, r = _refiner(img, txt, scale, DataLoader(TensorDataset(*_pairs(6, 1)), batch_size=3, shuffle=True))
    img.train(); txt.train()
    r(*_pairs(5, 2))
    before = _state(r)
    params = [p.detach().clone() for p in r.model.parameters()]
    bufs = [b.detach().clone() for b in r.model.buffers()]
    make, err, words = BAD[case]
    x, t = make(*_pairs(5, 3))
    kw = {"augmented": torch.ones(4, dtype=torch.bool)} if case == "bad mask" else {}
    with pytest.raises(err, match=words) as info:
        r(x, t, **kw)
    assert isinstance(info.value, AugplugError) and info.value.fix
    assert _same(before, _state(r))
    assert all(torch.equal(a, b) for a, b in zip(params, r.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bufs, r.model.buffers()))


def test_functional_bad_input():
    with pytest.raises(ShapeError, match="square"):
        clip_loss(torch.randn(4, 5))
    with pytest.raises(ShapeError, match="square"):
        contrastive_targets(torch.randn(3, 4))
    with pytest.raises(NonFiniteError):
        clip_loss(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(TargetError):
        clip_loss(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ConfigurationError):
        clip_loss(torch.randn(3, 3), directions=("sideways",))
    with pytest.raises(ShapeError):
        clip_loss(torch.randn(3, 3), weights={"image_to_text": torch.ones(4)})
    # a validation loader whose batches are not pairs
    img, txt, scale = _models()
    bad_val = DataLoader(TensorDataset(torch.randn(6, 8).double(), torch.randint(0, VOCAB, (6, LEN))), batch_size=3)
    dual = DualEncoder(img, txt)
    with pytest.raises(ShapeError, match="square"):
        contrastive_validation_gradient(dual, torch.randn(3, 8).double(), torch.randint(0, VOCAB, (2, LEN)),
                                        dict(dual.named_parameters()))
    assert bad_val is not None
    for name in ("autodo", "mixup"):  # a registered policy it cannot run, and an unknown name
        with pytest.raises(ConfigurationError, match="for contrastive refinement"):
            ContrastiveRefiner(img, txt, None, bad_val, method=name)
    with pytest.raises(ConfigurationError):
        ContrastiveRefiner(img, txt, None, bad_val, score_params=["image.nope"])
    # the class normalization, with the reason it does not apply ("auto" reads as "augmented" here)
    with pytest.raises(ConfigurationError, match="not classes.*got 'class'") as info:
        ContrastiveRefiner(img, txt, None, bad_val, method_options=dict(weight_norm="class"))
    assert "'auto'" not in info.value.fix and "'augmented' (the paper)" in info.value.fix
    assert ContrastiveRefiner(img, txt, None, bad_val, method_options=dict(weight_norm="auto")).weight_norm == "augmented"
    with pytest.raises(ConfigurationError, match=r"got 'augmentd'") as info:
        ContrastiveRefiner(img, txt, None, bad_val, method_options=dict(weight_norm='augmentd'))  # a typo: the valid values
    assert "not classes" not in str(info.value)


def test_prompt_mode_bad_labels_state_unchanged():
    torch.manual_seed(0)
    img = TinyImage().double()
    prompts = ClassEmbeddings(4, DIM).double()
    val = DataLoader(TensorDataset(torch.randn(8, 8).double(), torch.randint(0, 4, (8,))), batch_size=4)
    r = ContrastiveRefiner(img, prompts, None, val, class_prompts=torch.arange(4))
    img.train()
    r(torch.randn(6, 8).double(), torch.randint(0, 4, (6,)))
    before = _state(r)
    with pytest.raises(TargetError, match="0..3"):
        r(torch.randn(6, 8).double(), torch.tensor([0, 1, 2, 7, 0, 1]))
    assert _same(before, _state(r))


def test_resume_bit_for_bit_and_global_rng():
    def run(steps, resume_at=None):
        img, txt, scale = _models()
        img.net[3].p = 0.0  # no dropout: the refiner then uses no global randomness at all
        val = DataLoader(TensorDataset(*_pairs(12, 1)), batch_size=4, shuffle=True)
        opt, r = _refiner(img, txt, scale, val, refresh_every=2, beta=1.0, gumbel=True, val_batches=1)
        img.train(); txt.train()
        losses = []
        for k in range(steps):
            if k == resume_at:
                saved = (_state(r), copy.deepcopy(img.state_dict()), copy.deepcopy(txt.state_dict()),
                         scale.detach().clone(), copy.deepcopy(opt.state_dict()))
                img, txt, scale = _models(seed=5)
                img.net[3].p = 0.0
                opt, r = _refiner(img, txt, scale, val, refresh_every=2, beta=1.0, gumbel=True, val_batches=1)
                img.load_state_dict(saved[1]); txt.load_state_dict(saved[2])
                with torch.no_grad():
                    scale.copy_(saved[3])
                opt.load_state_dict(saved[4])
                r.load_state_dict(saved[0])
                img.train(); txt.train()
            loss = r(*_pairs(5, 10 + k), num_original=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    assert run(5) == run(5, resume_at=3)


def test_refiner_leaves_global_rng_untouched():
    img, txt, scale = _models()
    img.net[3].p = 0.0
    val = DataLoader(TensorDataset(*_pairs(12, 1)), batch_size=4, shuffle=True)
    opt, r = _refiner(img, txt, scale, val, beta=1.0, gumbel=True, val_batches=2)
    img.eval(); txt.eval()  # no dropout, no BatchNorm update: the user's forward draws nothing either
    r.check_train_mode = False
    batches = [_pairs(5, 10 + k) for k in range(3)]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    for x, t in batches:
        r(x, t)
    assert torch.equal(torch.get_rng_state(), rng)


def _flushed(share):
    """The state the share steps to once the update its pending statistics were gathered for has come
    (what the next call after an optimizer step commits)."""
    return share.gather(None, share.pending_step, share.pending_step + 1)


def _share_expected(g, ys, aug, **share_kw):
    """What AdaptiveShare.propose gives for scores ``g`` (per direction, every row scored), upstream
    signal, both directions pooled."""
    from augplug.share import AdaptiveShare, share_agreements
    stats = sum(share_agreements((ys[d][aug] * g[d][aug]).sum(-1), None, (ys[d][~aug] * g[d][~aug]).sum(-1))
                for d in g)
    return AdaptiveShare(**share_kw).propose(stats)


def test_adaptive_share_defaults_to_the_upstream_signal():
    """The classification refiners' default share signal (direction) is not the contrastive
    refiner's: ``aug_weight="adaptive"`` and a share that names no signal follow the upstream
    agreements here; a named signal is kept."""
    from augplug.share import AdaptiveShare
    img, prompts = TinyImage().double(), ClassEmbeddings(4, DIM).double()
    val = DataLoader(TensorDataset(torch.randn(8, 8).double(), torch.randint(0, 4, (8,))), batch_size=8)
    for aug_weight, want in (("adaptive", "upstream"), (AdaptiveShare(), "upstream"),
                             (AdaptiveShare(signal="refined"), "refined")):
        r = ContrastiveRefiner(img, prompts, None, val, class_prompts=torch.arange(4), logit_scale=1.0,
                               method_options=dict(aug_weight=aug_weight))
        assert r.share.signal == want and not r.share.needs_probs


def test_adaptive_share_class_prompts_by_hand():
    """The share's update from oracle scores of originals and augmented rows; the loss uses the share
    held at the call, the next call the updated one."""
    from augplug.share import AdaptiveShare
    torch.manual_seed(0)
    img = TinyImage().double()
    prompts = ClassEmbeddings(4, DIM).double()
    x, y = torch.randn(10, 8).double(), torch.randint(0, 4, (10,))
    val = DataLoader(TensorDataset(torch.randn(8, 8).double(), torch.randint(0, 4, (8,))), batch_size=8)
    opt = torch.optim.SGD(list(img.parameters()) + list(prompts.parameters()), lr=0.1)
    r = ContrastiveRefiner(img, prompts, opt, val, class_prompts=torch.arange(4), logit_scale=1.0,
                           method_options=dict(aug_weight=AdaptiveShare(init=0.5, lr=0.1)),
                           schedule=dict(refresh_every=1))
    img.train()
    loss = r(x, y, num_original=4)
    assert r.stats["aug_weight"] == pytest.approx(0.5)
    img.eval()
    g = {"image_to_text": _row_grad_oracle(r.model, x, torch.arange(4), r.validation_direction, "image_to_text")}
    ys = {"image_to_text": F.one_hot(y, 4).double()}
    aug = torch.arange(10) >= 4
    want = _share_expected(g, ys, aug, init=0.5, lr=0.1)
    assert int(r.share.updates) == 0 and float(r.aug_weight) == pytest.approx(0.5)   # gathered, not stepped
    stepped = _flushed(r.share)
    assert float(stepped["log_share"]) == pytest.approx(float(want["log_share"]), rel=1e-6, abs=1e-9)
    assert float(stepped["mean_square"]) == pytest.approx(float(want["mean_square"]), rel=1e-6)
    assert int(stepped["updates"]) == 1 and float(stepped["log_share"].exp()) != pytest.approx(0.5)
    # the refined rows' scores are the oracle's; the originals' are reported as zeros
    assert torch.allclose(r.stats["scores"][4:].double(), g["image_to_text"][4:], rtol=1e-5, atol=1e-9)
    assert torch.all(r.stats["scores"][:4] == 0)
    # the loss weighed the augmented rows by the share held at the call
    per = -(r.stats["soft_targets"].double() * F.log_softmax(r.stats["logits"].double(), 1)).sum(1)
    w = r.stats["weights"].double()
    want_loss = (per[:4].sum() + 0.5 * (w[4:] * per[4:]).sum()) / (4 + 0.5 * 6)
    assert float(loss.detach()) == pytest.approx(float(want_loss), rel=1e-6)
    new_share = float(stepped["log_share"].exp())
    opt.zero_grad()
    loss.backward()
    opt.step()
    img.train()
    r(x, y, num_original=4)   # the first call after the update uses the moved share
    assert r.stats["aug_weight"] == pytest.approx(new_share)
    # without originals there is nothing to compare: the share stays
    state = copy.deepcopy(r.share.state_dict())
    r(x, y)
    assert _same(state, r.share.state_dict())


def test_adaptive_share_pairs_pools_both_directions():
    img, txt, scale = _models()
    val = DataLoader(TensorDataset(*_pairs(6, 1)), batch_size=6)
    from augplug.share import AdaptiveShare
    opt, r = _refiner(img, txt, scale, val, aug_weight=AdaptiveShare(init=0.5, lr=0.1))
    x, t = _pairs(6, 2)
    img.train(); txt.train()
    r(x, t, num_original=2)
    img.eval(); txt.eval()
    v = r.validation_direction
    g = {d: _row_grad_oracle(r.model, x, t, v, d) for d in DIRECTIONS}
    ys = {d: torch.eye(6, dtype=torch.float64) for d in DIRECTIONS}
    aug = torch.arange(6) >= 2
    want = _share_expected(g, ys, aug, init=0.5, lr=0.1)
    # the first step is lr times the sign of d; the running mean square holds d itself
    stepped = _flushed(r.share)
    assert float(stepped["log_share"]) == pytest.approx(float(want["log_share"]), rel=1e-6, abs=1e-9)
    assert float(stepped["mean_square"]) == pytest.approx(float(want["mean_square"]), rel=1e-6)
    # one direction alone would give another step
    one = _share_expected({"image_to_text": g["image_to_text"]}, ys, aug, init=0.5, lr=0.1)
    assert float(one["mean_square"]) != pytest.approx(float(want["mean_square"]), rel=1e-3)


def test_adaptive_share_state_rejected_call_and_resume():
    from augplug.share import AdaptiveShare
    img, txt, scale = _models()
    val = DataLoader(TensorDataset(*_pairs(6, 1)), batch_size=6)
    opt, r = _refiner(img, txt, scale, val, aug_weight=AdaptiveShare(init=0.5, lr=0.1))
    img.train(); txt.train()
    for k in range(3):
        r(*_pairs(6, 10 + k), num_original=2)
    before = _state(r)
    # no optimizer step between the calls (the rig's optimizer is not stepped): the three calls are one
    # update's, gathered
    assert before["share"] is not None and before["share"]["pending_step"] == 0
    x, t = _pairs(6, 20)
    with pytest.raises(NonFiniteError):
        r(torch.where(torch.arange(6)[:, None] == 4, float("nan"), x), t, num_original=2)
    assert _same(before, _state(r))
    # a fresh adaptive refiner resumes the share; a fixed-share refiner refuses the state and keeps its own
    _, r2 = _refiner(img, txt, scale, val, aug_weight=AdaptiveShare(init=0.5, lr=0.1))
    r2.load_state_dict(before)
    assert float(r2.aug_weight) == pytest.approx(float(r.aug_weight)) and _same(before, _state(r2))
    _, r3 = _refiner(img, txt, scale, val)
    fixed = _state(r3)
    with pytest.raises(ConfigurationError, match="adaptive share"):
        r3.load_state_dict(before)
    assert _same(fixed, _state(r3)) and r3.aug_weight == 1.0
    assert "AdaptiveShare" in repr(r) and "aug_weight=1.0" in repr(r3)


def test_adaptive_share_refined_signal_uses_policy_targets_and_weights():
    from augplug.share import AdaptiveShare, share_agreements
    torch.manual_seed(1)
    img = TinyImage().double()
    prompts = ClassEmbeddings(4, DIM).double()
    x, y = torch.randn(10, 8).double(), torch.randint(0, 4, (10,))
    val = DataLoader(TensorDataset(torch.randn(8, 8).double(), torch.randint(0, 4, (8,))), batch_size=8)
    kw = dict(init=0.5, lr=0.1, signal="refined")
    r = ContrastiveRefiner(img, prompts, None, val, class_prompts=torch.arange(4), logit_scale=1.0,
                           method_options=dict(beta=1.0, gumbel=False, aug_weight=AdaptiveShare(**kw)),
                           schedule=dict(refresh_every=1))
    img.train()
    r(x, y, num_original=4)
    img.eval()
    g = _row_grad_oracle(r.model, x, torch.arange(4), r.validation_direction, "image_to_text")
    soft, w, yo = r.stats["soft_targets"].double(), r.stats["weights"].double(), F.one_hot(y, 4).double()
    assert not torch.allclose(soft[4:], yo[4:])  # relabelled: the two signals differ
    want = AdaptiveShare(**kw).propose(share_agreements((soft[4:] * g[4:]).sum(-1), w[4:], (yo[:4] * g[:4]).sum(-1)))
    stepped = _flushed(r.share)
    assert float(stepped["mean_square"]) == pytest.approx(float(want["mean_square"]), rel=1e-5)
    assert float(stepped["log_share"]) == pytest.approx(float(want["log_share"]), rel=1e-6, abs=1e-9)


def test_pairs_that_all_weigh_zero_train_nothing():
    """``aug_weight=0`` on a batch of augmented pairs alone: the loss is 0 with a zero gradient (it was
    0 / 0, a NaN)."""
    img, txt, scale = _models()
    val = DataLoader(TensorDataset(*_pairs(6, 1)), batch_size=6)
    opt, r = _refiner(img, txt, scale, val, aug_weight=0.0)
    x, t = _pairs(5, 2)
    img.train(); txt.train()
    loss = r(x, t)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in opt.param_groups[0]["params"])
