"""Class scores g from each mode against brute-force per-sample gradient dot products."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augplug import functional as AF
from augplug.errors import UnsupportedModelError
from conftest import brute_force_class_scores, loop_class_scores

C = 5


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _data(n=6, nv=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.double)
    xv = torch.randn(nv, 1, 8, 8, generator=g, dtype=torch.double)
    yv = F.one_hot(torch.randint(0, C, (nv,), generator=g), C).double()
    return x, xv, yv


def _direction(model, xv, yv, params=None):
    params = params or {n: p for n, p in model.named_parameters() if p.requires_grad}
    return AF.validation_gradient(model, xv, yv, params=params, bn="eval").direction()


@pytest.mark.parametrize("mode", ["full", "double_backward", "auto"])
def test_full_model_scores_match_oracle(tiny_cnn, mode):
    x, xv, yv = _data()
    tiny_cnn.train()
    v = _direction(tiny_cnn, xv, yv)
    g = AF.class_scores(tiny_cnn, x, v, mode=mode, bn="eval")
    tiny_cnn.eval()
    oracle = brute_force_class_scores(tiny_cnn, x, v, C)
    assert g.shape == (6, C) and g.dtype == torch.float32
    assert rel_err(g, oracle) <= 1e-4


def test_last_layer_scores_match_oracle_when_only_head_trains(tiny_cnn):
    x, xv, yv = _data()
    for p in tiny_cnn.parameters():
        p.requires_grad_(False)
    head = tiny_cnn[-1]
    for p in head.parameters():
        p.requires_grad_(True)
    tiny_cnn.eval()
    gs = AF.validation_gradient(tiny_cnn, xv, yv, head=head, head_name="8")
    # closed-form head gradient equals autograd's
    auto = AF.validation_gradient(tiny_cnn, xv, yv, params=dict(head.named_parameters(prefix="8")))
    for k in gs.sums:
        assert torch.allclose(gs.sums[k].double(), auto.sums[k].double(), atol=1e-6)
    v = gs.direction()
    feats = []
    h = head.register_forward_hook(lambda m, a, o: feats.append(a[0]))
    logits = tiny_cnn(x)
    h.remove()
    g = AF.class_scores(tiny_cnn, v=v, mode="last_layer", features=feats[0], logits=logits, head_name="8")
    oracle = brute_force_class_scores(tiny_cnn, x, v, C)
    assert rel_err(g, oracle) <= 1e-4
    # and the full forward-mode pass agrees with the closed form on this model
    assert rel_err(AF.class_scores(tiny_cnn, x, v, mode="full"), oracle) <= 1e-4


def test_scores_are_centred_and_sign_means_helps(tiny_cnn):
    """p^T g = 0; an SGD step on the highest-scoring sample lowers the validation loss."""
    x, xv, yv = _data(n=16)
    tiny_cnn.eval()
    y = F.one_hot(torch.randint(0, C, (16,), generator=torch.Generator().manual_seed(3)), C).double()
    v = _direction(tiny_cnn, xv, yv)
    g = AF.class_scores(tiny_cnn, x, v, mode="full")
    p = torch.softmax(tiny_cnn(x), -1)
    assert (p * g.double()).sum(1).abs().max() < 1e-5
    agree = (y * g).sum(1)
    best, worst = int(agree.argmax()), int(agree.argmin())
    assert agree[best] > 0 > agree[worst]

    def val_loss_after_step(i):
        m = copy.deepcopy(tiny_cnn)
        loss = -(y[i:i + 1] * F.log_softmax(m(x[i:i + 1]), -1)).sum()
        grads = torch.autograd.grad(loss, list(m.parameters()))
        with torch.no_grad():
            for prm, gr in zip(m.parameters(), grads):
                prm -= 1e-3 * gr
        return float(-(yv * F.log_softmax(m(xv), -1)).sum(1).mean())

    with torch.no_grad():
        base = float(-(yv * F.log_softmax(tiny_cnn(xv), -1)).sum(1).mean())
    assert val_loss_after_step(best) < base < val_loss_after_step(worst)
    # first-order prediction: drop = lr * y^T g
    assert abs((base - val_loss_after_step(best)) - 1e-3 * float(agree[best])) < 1e-3 * float(agree[best]) * 0.05


def test_logit_jacobian_would_differ(tiny_cnn):
    """The log-softmax Jacobian is used: scores differ from logit-Jacobian scores by (p^T g_logit) 1."""
    x, xv, yv = _data()
    tiny_cnn.eval()
    v = _direction(tiny_cnn, xv, yv)
    g = AF.class_scores(tiny_cnn, x, v, mode="full")
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call
    with torch.no_grad(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), v[n].double()) for n, p in tiny_cnn.named_parameters()}
        g_logit = fwAD.unpack_dual(functional_call(tiny_cnn, duals, (x,))).tangent
    p = torch.softmax(tiny_cnn(x), -1)
    assert torch.allclose(g.double(), g_logit - (p * g_logit).sum(1, keepdim=True), atol=1e-6)
    assert not torch.allclose(g.double(), g_logit, atol=1e-4)


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_scoring_leaves_batchnorm_and_modes_untouched(tiny_cnn, bn):
    x, xv, yv = _data()
    tiny_cnn.train()
    before = {k: b.clone() for k, b in tiny_cnn.state_dict().items()}
    v = _direction(tiny_cnn, xv, yv)
    AF.validation_gradient(tiny_cnn, xv, yv, params=dict(tiny_cnn.named_parameters()), bn=bn)
    AF.class_scores(tiny_cnn, x, v, mode="full", bn=bn)
    AF.class_scores(tiny_cnn, x, v, mode="double_backward", bn=bn)
    after = tiny_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in tiny_cnn.modules())


def test_train_mode_bn_scores_use_batch_statistics(tiny_cnn):
    x, xv, yv = _data(n=8)
    v = _direction(tiny_cnn, xv, yv)
    g_train = AF.class_scores(tiny_cnn, x, v, mode="full", bn="train")
    g_db = AF.class_scores(tiny_cnn, x, v, mode="double_backward", bn="train")
    assert rel_err(g_train, g_db) <= 1e-4
    assert not torch.allclose(g_train, AF.class_scores(tiny_cnn, x, v, mode="full", bn="eval"))


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, go):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return go * (s + x * s * (1 - s))


class _Swish(nn.Module):
    def forward(self, x):
        return _NoForwardAD.apply(x)


def test_auto_falls_back_to_double_backward():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), _Swish(), nn.Linear(8, C)).double()
    x = torch.randn(5, 6, dtype=torch.double)
    xv, yv = torch.randn(7, 6, dtype=torch.double), F.one_hot(torch.arange(7) % C, C).double()
    v = _direction(m, xv, yv)
    with pytest.raises(UnsupportedModelError, match="(?s)forward-mode AD.*mode='auto'"):
        AF.class_scores(m, x, v, mode="full")
    import augplug.scores as S
    S._warned_fallback.clear()
    with pytest.warns(RuntimeWarning, match="double-backward"):
        g = AF.class_scores(m, x, v, mode="auto")
    assert rel_err(g, loop_class_scores(m, x, v, C)) <= 1e-4


def test_auto_reports_models_supporting_neither(monkeypatch):
    import augplug.scores as S

    def no_double_backward(*a, **k):
        raise RuntimeError("derivative for aten::some_fused_op_backward is not implemented")

    monkeypatch.setattr(S, "double_backward_scores", no_double_backward)
    S._warned_fallback.clear()
    m = nn.Sequential(nn.Linear(4, 6), _Swish(), nn.Linear(6, 3))
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.warns(RuntimeWarning):
        with pytest.raises(UnsupportedModelError, match="last_layer"):
            AF.class_scores(m, torch.randn(3, 4), v, mode="auto")


def test_timm_resnet_with_batchnorm_matches_oracle():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=C, pretrained=False).double()
    m.train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.double)
    xv = torch.randn(4, 3, 32, 32, dtype=torch.double)
    yv = F.one_hot(torch.arange(4) % C, C).double()
    before = {k: b.clone() for k, b in m.state_dict().items()}
    v = _direction(m, xv, yv)
    g = AF.class_scores(m, x, v, mode="full")
    assert all(torch.equal(before[k], m.state_dict()[k]) for k in before)
    m.eval()
    assert rel_err(g, brute_force_class_scores(m, x, v, C)) <= 1e-4


def test_full_scores_keep_shared_submodules_trainable():
    # one nn.Linear registered under two names: the forward-mode pass must leave it a trainable Parameter
    from augplug.scores import double_backward_scores, full_scores

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x = torch.randn(5, 4)
    g = full_scores(model, x, v)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    assert model[0].weight is lin.weight and model[2].weight is lin.weight
    torch.testing.assert_close(g, double_backward_scores(model, x, v), rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("mode,act", [("double_backward", "tanh"), ("double_backward", "swish"), ("auto", "swish")])
def test_frozen_parameters_that_v_covers_count_in_every_mode(mode, act):
    """v computed before the body was frozen (a fine-tuning stage): every mode gives J(x) v over every
    parameter v names, as the scores are defined; double backward dropped the frozen ones (0.037 off
    a largest score of 0.39), so mode='auto' changed the numbers when it fell back. No flag changes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh() if act == "tanh" else _Swish(), nn.Linear(5, C)).double()
    xv, yv = torch.randn(12, 6, dtype=torch.double), F.one_hot(torch.arange(12) % C, C).double()
    v = _direction(m, xv, yv)
    x = torch.randn(4, 6, dtype=torch.double)
    oracle = loop_class_scores(m, x, v, C)   # J(x) v, by autograd while every parameter is trainable
    head_only = loop_class_scores(m, x, {k: v[k] for k in ("2.weight", "2.bias")}, C)
    assert rel_err(head_only, oracle) > 1e-2     # the frozen layer's part is not negligible here
    for p in m[0].parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # auto's fallback warning
        g = AF.class_scores(m, x, v, mode=mode)
    assert [p.requires_grad for p in m.parameters()] == [False, False, True, True]
    assert all(isinstance(p, nn.Parameter) and p.grad is None for p in m.parameters())
    assert rel_err(g, oracle) <= 1e-4
    if act == "tanh":   # and forward mode agrees, so mode='auto' gives the same numbers either way
        assert rel_err(AF.class_scores(m, x, v, mode="full"), oracle) <= 1e-4


def test_double_backward_with_a_frozen_tied_layer_matches_full():
    from augplug.scores import double_backward_scores, full_scores

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    lin.requires_grad_(False)
    x = torch.randn(5, 4)
    g = double_backward_scores(model, x, v)
    assert model[0].weight is lin.weight and model[2].weight is lin.weight
    assert isinstance(lin.weight, nn.Parameter) and not lin.weight.requires_grad
    assert g.abs().max() > 0.1
    torch.testing.assert_close(g, full_scores(model, x, v), rtol=1e-4, atol=1e-6)

def test_grad_sums_matches_autograd_and_fills_unused_with_zeros():
    from augplug.scores import grad_sums

    torch.manual_seed(0)
    used, unused = nn.Linear(3, 2).double(), nn.Linear(2, 2)
    params = {"w": used.weight, "b": used.bias, "other": unused.weight}
    loss = used(torch.randn(5, 3, dtype=torch.float64)).pow(2).sum()
    ref = torch.autograd.grad(loss, [used.weight, used.bias], retain_graph=True)
    out = grad_sums(loss, params)
    assert list(out) == ["w", "b", "other"]
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in out.values())
    torch.testing.assert_close(out["w"], ref[0].float())
    torch.testing.assert_close(out["b"], ref[1].float())
    assert torch.equal(out["other"], torch.zeros(2, 2))


class _Output(dict):
    """An output object in the style of Hugging Face's ``ModelOutput``: a dict with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _Net(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap
        self.body, self.classifier = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        logits = self.classifier(torch.tanh(self.body(x)))
        return {"tensor": logits, "tuple": (logits, logits.sum()), "dict": {"logits": logits, "aux": logits * 2},
                "output": _Output(logits=logits)}[self.wrap]


@pytest.mark.parametrize("wrap", ["tuple", "dict", "output"])
def test_scores_read_logits_from_tuples_dicts_and_output_objects(wrap):
    """Models whose forward returns a tuple, a dict with 'logits' or a ModelOutput-style object (Hugging
    Face image classifiers) score exactly like the same network returning the tensor, in every
    model-forward mode and in the validation gradient (a dict was a KeyError deep in the scores)."""
    torch.manual_seed(0)
    plain = _Net("tensor")
    other = _Net(wrap)
    other.load_state_dict(plain.state_dict())
    x, xv, yv = torch.randn(5, 6), torch.randn(7, 6), F.one_hot(torch.randint(0, 3, (7,)), 3).float()

    def direction(model):
        return AF.validation_gradient(model, xv, yv, params=dict(model.named_parameters())).direction()

    v = direction(plain)
    assert all(torch.equal(v[k], w) for k, w in direction(other).items())
    for mode in ("full", "double_backward"):
        expected = AF.class_scores(plain, x, v, mode=mode)
        torch.testing.assert_close(AF.class_scores(other, x, v, mode=mode), expected)
    from augplug.scores import finite_difference_scores
    torch.testing.assert_close(finite_difference_scores(other, x, v), finite_difference_scores(plain, x, v))


def test_a_forward_without_logits_is_named():
    from augplug.errors import ShapeError

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return {"scores": self.fc(x)}

    model = NoLogits()
    x, y = torch.randn(4, 6), F.one_hot(torch.randint(0, 3, (4,)), 3).float()
    with pytest.raises(ShapeError, match="'logits'") as e:
        AF.validation_gradient(model, x, y, params=dict(model.named_parameters()))
    assert "mode='last_layer'" in e.value.fix


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_the_refiner_trains_a_model_with_a_modeloutput(mode):
    from torch.utils.data import DataLoader, TensorDataset

    from augplug import AugmentationRefiner
    torch.manual_seed(0)
    model = _Net("output")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    val = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,))), batch_size=8)
    r = AugmentationRefiner(model, opt, val, mode=mode, method_options=dict(strength=1.0))
    for _ in range(5):
        loss = r(model(torch.randn(8, 6)).logits, torch.randint(0, 3, (8,)), num_original=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and r.stats["active"]


class _KeywordNet(nn.Module):
    """A forward that takes its input by keyword and returns a dict, as Hugging Face classifiers do."""

    def __init__(self):
        super().__init__()
        self.body, self.classifier = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, pixel_values=None, labels=None):
        return {"logits": self.classifier(torch.tanh(self.body(pixel_values)))}


def test_full_mode_records_inputs_passed_by_keyword():
    """``model(pixel_values=x)`` with a dict output trains in full mode exactly like ``model(x)`` with the
    logits returned, also when two forwards of one size precede the call and the call is given the
    first one's logits (matched by the model's output). Before, no input was recorded (a ShapeError
    asked for ``inputs=``)."""
    from torch.utils.data import DataLoader, TensorDataset

    from augplug import AugmentationRefiner

    def run(keyword):
        torch.manual_seed(0)
        model = _KeywordNet() if keyword else _Net("tensor")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        val = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,))), batch_size=8)
        r = AugmentationRefiner(model, opt, val, mode="full", method_options=dict(strength=1.0), seed=0)
        g = torch.Generator().manual_seed(1)
        weights = []
        for _ in range(4):
            x_aug, x, y = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            out_aug = model(pixel_values=x_aug)["logits"] if keyword else model(x_aug)
            out = model(pixel_values=x)["logits"] if keyword else model(x)
            loss = r(out_aug, y) + F.cross_entropy(out, y)
            weights.append(r.stats["weights"].clone())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.stack(weights)

    keyword, positional = run(True), run(False)
    assert positional.std() > 1e-3            # the weights say something
    torch.testing.assert_close(keyword, positional)
