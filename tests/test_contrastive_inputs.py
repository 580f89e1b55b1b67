"""ContrastiveRefiner's inputs: a refused class-prompt call changes nothing (not even BatchNorm's
running statistics or the global RNG), dict inputs (a tokenizer's output) train like the tensors they
hold, bn_mode="train" scores over the whole training batch, class prompts given as a list or with
float ids, and the warning about scored parameters the optimizer never steps."""
import copy
import warnings
from collections import UserDict
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from augplug.contrastive import ClassEmbeddings, ContrastiveRefiner, contrastive_scores
from augplug.errors import AugplugError, NonFiniteError, ShapeError, TargetError

C, D, VOCAB, LEN = 4, 6, 11, 5


def _val(n=8, bs=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, C, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _bn_image(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, D))


# ---------------------------------------------------------------------------- refused calls change nothing
REFUSED = {
    "label out of range": (lambda: torch.tensor([0, 1, 2, 7, 0, 1]), TargetError, "0..3"),
    "soft targets of the wrong width": (lambda: torch.full((6, 5), 0.2), ShapeError, None),
    "fewer labels than images": (lambda: torch.tensor([0, 1, 2, 3, 0]), ShapeError, None),
    "NaN soft targets": (lambda: torch.full((6, C), float("nan")), AugplugError, None),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_class_prompt_call_leaves_model_buffers_and_global_rng_as_they_were(case):
    img = _bn_image()
    prompts = ClassEmbeddings(C, D)
    opt = torch.optim.SGD(list(img.parameters()) + list(prompts.parameters()), lr=0.1)
    r = ContrastiveRefiner(img, prompts, opt, _val(), class_prompts=torch.arange(C))
    img.train()
    loss = r(torch.randn(6, 8), torch.randint(0, C, (6,)), num_original=2)   # primed: a step taken
    opt.zero_grad(); loss.backward(); opt.step()
    model, state = copy.deepcopy(r.model.state_dict()), copy.deepcopy(r.state_dict())
    x = torch.randn(6, 8)
    rng = torch.get_rng_state()
    make, err, words = REFUSED[case]
    with pytest.raises(err, match=words) as info:
        r(x, make(), num_original=2)
    assert isinstance(info.value, AugplugError) and info.value.fix
    assert torch.equal(rng, torch.get_rng_state()), "the refused call drew from the global RNG (dropout)"
    after = r.model.state_dict()
    assert int(after["image.1.num_batches_tracked"]) == int(model["image.1.num_batches_tracked"])
    assert set(after) == set(model) and all(torch.equal(model[k], after[k]) for k in model)
    assert repr(state) == repr(r.state_dict())
    r(x, torch.randint(0, C, (6,)), num_original=2)   # and the refiner goes on


# ---------------------------------------------------------------------------- dict (tokenizer) inputs
class Text(nn.Module):
    """Token embeddings, mean pooling, a projection; takes ids, or a tokenizer's dict (its attention
    mask is all ones here, so the dict and the ids give the same embeddings, bit for bit)."""

    def __init__(self):
        super().__init__()
        self.tok, self.proj = nn.Embedding(VOCAB, 7), nn.Linear(7, D)

    def forward(self, t):
        ids = t["input_ids"] if isinstance(t, Mapping) else t
        return self.proj(torch.tanh(self.tok(ids).mean(1)))


class Image(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, D))

    def forward(self, x):
        return self.net(x["pixel_values"] if isinstance(x, Mapping) else x)


def _tokens(ids, kind):
    tok = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return UserDict(tok) if kind == "userdict" else tok   # a tokenizer's BatchEncoding is a UserDict


def _train_pairs(as_dict, steps=3):
    torch.manual_seed(0)
    img, txt = Image(), Text()
    opt = torch.optim.SGD(list(img.parameters()) + list(txt.parameters()), lr=0.2)
    g = torch.Generator().manual_seed(5)
    val = [(torch.randn(4, 8, generator=g), torch.randint(0, VOCAB, (4, LEN), generator=g)) for _ in range(2)]
    if as_dict:
        val = [({"pixel_values": x}, _tokens(t, as_dict)) for x, t in val]
    r = ContrastiveRefiner(img, txt, opt, val, schedule=dict(refresh_every=2, budget=None))
    img.train(); txt.train()
    out = []
    for k in range(steps):
        x, t = torch.randn(6, 8, generator=g), torch.randint(0, VOCAB, (6, LEN), generator=g)
        if as_dict:
            x, t = {"pixel_values": x}, _tokens(t, as_dict)
        loss = r(x, t, num_original=2)
        opt.zero_grad(); loss.backward(); opt.step()
        out.append((loss.detach(), r.stats["scores"], r.stats["weights"]))
    return out, [p.detach() for p in r.model.parameters()]


@pytest.mark.parametrize("kind", ["dict", "userdict"])
def test_pairs_given_as_dicts_train_like_the_tensors_they_hold(kind):
    plain, plain_params = _train_pairs(False)
    dicts, dict_params = _train_pairs(kind)
    for a, b in zip(plain, dicts):
        assert all(torch.equal(u, w) for u, w in zip(a, b))
    assert bool(plain[-1][1].abs().sum() > 0)   # the scores were computed, not left at 0
    assert all(torch.equal(a, b) for a, b in zip(plain_params, dict_params))


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_class_prompt_images_given_as_a_dict_train_like_the_tensor(bn_mode):
    def run(as_dict):
        torch.manual_seed(0)
        img, prompts = Image(), ClassEmbeddings(C, D)
        opt = torch.optim.SGD(list(img.parameters()) + list(prompts.parameters()), lr=0.2)
        val = [({"pixel_values": x} if as_dict else x, y) for x, y in _val()]
        r = ContrastiveRefiner(img, prompts, opt, val, class_prompts=torch.arange(C), bn_mode=bn_mode,
                               schedule=dict(budget=None))
        img.train()
        g, out = torch.Generator().manual_seed(3), []
        for _ in range(3):
            x, y = torch.randn(6, 8, generator=g), torch.randint(0, C, (6,), generator=g)
            loss = r({"pixel_values": x} if as_dict else x, y, num_original=2)
            opt.zero_grad(); loss.backward(); opt.step()
            out += [loss.detach(), r.stats["scores"]]
        return out + [p.detach() for p in r.model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_a_dict_whose_tensors_disagree_on_rows_is_refused_before_the_forward():
    torch.manual_seed(0)
    img, txt = Image(), Text()
    val = [(torch.randn(4, 8), torch.randint(0, VOCAB, (4, LEN)))]
    r = ContrastiveRefiner(img, txt, None, val)
    img.train(); txt.train()
    before = copy.deepcopy(r.model.state_dict())
    bad = {"input_ids": torch.randint(0, VOCAB, (6, LEN)), "attention_mask": torch.ones(5, LEN, dtype=torch.long)}
    with pytest.raises(ShapeError, match="disagree.*'input_ids' has 6.*'attention_mask' has 5") as info:
        r(torch.randn(6, 8), bad)
    assert info.value.fix
    with pytest.raises(ShapeError, match="6 images but 5 texts"):
        r(torch.randn(6, 8), _tokens(torch.randint(0, VOCAB, (5, LEN)), "dict"))
    nan = torch.randn(6, 8)
    nan[2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="images contain NaN"):   # checked inside the dict too
        r({"pixel_values": nan}, _tokens(torch.randint(0, VOCAB, (6, LEN)), "dict"))
    after = r.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- bn_mode="train"
def test_bn_train_scores_every_row_with_the_training_batch_statistics():
    img = _bn_image(dropout=0.0)
    prompts = ClassEmbeddings(C, D)
    opt = torch.optim.SGD(list(img.parameters()) + list(prompts.parameters()), lr=0.1)
    r = ContrastiveRefiner(img, prompts, opt, _val(), class_prompts=torch.arange(C), bn_mode="train",
                           schedule=dict(refresh_every=1, budget=None))
    img.train()
    g = torch.Generator().manual_seed(4)
    for n_orig in (4, 5):   # two augmented rows, then a single one (a batch of one for BatchNorm)
        x, y = torch.randn(6, 8, generator=g), torch.randint(0, C, (6,), generator=g)
        loss = r(x, y, num_original=n_orig)
        assert torch.isfinite(loss)
        v = r.validation_direction
        whole = contrastive_scores(r.model, x, torch.arange(C), v, directions=("image_to_text",), bn="train")
        got = r.stats["scores"]
        assert torch.allclose(got[n_orig:], whole["image_to_text"][n_orig:], rtol=1e-5, atol=1e-7)
        assert bool(got[n_orig:].abs().sum() > 0)
        opt.zero_grad(); loss.backward(); opt.step()


# ---------------------------------------------------------------------------- class prompt ids
class PromptTower(nn.Module):
    """A text encoder of class ids (an embedding inside a module of the user's)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(C, D)

    def forward(self, ids):
        return torch.tanh(self.emb(ids))


@pytest.mark.parametrize("encoder", [ClassEmbeddings, PromptTower])
def test_class_prompts_as_a_list_of_ints_train_like_the_tensor(encoder):
    def run(prompts_ids):
        img = _bn_image(dropout=0.0)
        prompts = encoder(C, D) if encoder is ClassEmbeddings else encoder()
        opt = torch.optim.SGD(list(img.parameters()) + list(prompts.parameters()), lr=0.1)
        r = ContrastiveRefiner(img, prompts, opt, _val(), class_prompts=prompts_ids, schedule=dict(budget=None))
        img.train()
        g, out = torch.Generator().manual_seed(2), []
        for _ in range(2):
            loss = r(torch.randn(6, 8, generator=g), torch.randint(0, C, (6,), generator=g), num_original=2)
            opt.zero_grad(); loss.backward(); opt.step()
            out.append(loss.detach())
        return out + [p.detach() for p in r.model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(torch.arange(C)), run(list(range(C)))))


@pytest.mark.parametrize("ids", [torch.tensor([0., 1., 2., 3.5]), torch.tensor([0., 1., 2., 3.]), [0, 1, 2.5, 3],
                                 torch.tensor([True, False, True, True]), [0, 1, True, 3]],
                         ids=["float-tensor", "integral-float-tensor", "float-in-list", "bool-tensor", "bool-in-list"])
@pytest.mark.parametrize("encoder", ["ClassEmbeddings", "nn.Embedding"])
def test_float_or_bool_class_prompt_ids_are_refused_at_construction(ids, encoder):
    text = ClassEmbeddings(C, D) if encoder == "ClassEmbeddings" else nn.Embedding(C, D)
    with pytest.raises(TargetError, match="must be integers") as info:
        ContrastiveRefiner(nn.Linear(8, D), text, None, _val(), class_prompts=ids)
    assert "torch.arange(4)" in info.value.fix


class FieldsText(nn.Module):
    """Takes tokenized prompts as a tuple or a dict of (ids, mask)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)

    def forward(self, t):
        ids, mask = (t["input_ids"], t["attention_mask"]) if isinstance(t, Mapping) else t
        m = mask.unsqueeze(-1).float()
        return (self.tok(ids) * m).sum(1) / m.sum(1)


class PairPooled(nn.Module):
    """Two prompts per class, averaged: returns C embeddings for 2C prompts."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)

    def forward(self, ids):
        e = self.tok(ids).mean(1)
        return e.view(-1, 2, D).mean(1)


def test_prompt_count_checked_before_the_forward_where_it_can_be_counted():
    ids, mask = torch.randint(0, VOCAB, (C, LEN)), torch.ones(C, LEN, dtype=torch.long)
    x, bad = torch.randn(6, 8), torch.tensor([0, 1, 2, 7, 0, 1])
    # tokenized prompts as a dict: counted (C rows), labels checked before the encoders run
    img = _bn_image()
    r = ContrastiveRefiner(img, FieldsText(), None, _val(), class_prompts={"input_ids": ids, "attention_mask": mask})
    img.train()
    r(x, torch.randint(0, C, (6,)))
    nb, rng = int(img[1].num_batches_tracked), torch.get_rng_state()
    with pytest.raises(TargetError, match="0..3"):
        r(x, bad)
    assert int(img[1].num_batches_tracked) == nb and torch.equal(rng, torch.get_rng_state())
    # a tuple of tensors cannot be counted up front (one tensor per prompt, or fields?): it still
    # works, its labels checked against the similarities after the forward
    r = ContrastiveRefiner(nn.Linear(8, D), FieldsText(), None, _val(), class_prompts=(ids, mask))
    r(x, torch.randint(0, C, (6,)))
    with pytest.raises(TargetError, match="0..3"):
        r(x, bad)
    # an encoder that does not return one embedding per counted prompt is named
    r = ContrastiveRefiner(nn.Linear(8, D), PairPooled(), None, _val(),
                           class_prompts=torch.randint(0, VOCAB, (2 * C, LEN)))
    with pytest.raises(ShapeError, match="returned 4 embeddings for the 8 class prompts") as info:
        r(x, torch.randint(0, C, (6,)))
    assert "one embedding per class prompt" in info.value.fix
    with pytest.raises(ShapeError, match="1 prompt"):
        ContrastiveRefiner(nn.Linear(8, D), ClassEmbeddings(C, D), None, _val(), class_prompts=[2])


# ---------------------------------------------------------------------------- scored but never stepped
def _unstepped_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning) and "scored" in str(w.message)]


def test_warns_once_about_scored_parameters_the_optimizer_never_steps_and_only_about_those():
    torch.manual_seed(0)
    img = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, D))
    prompts, scale = ClassEmbeddings(C, D), nn.Parameter(torch.tensor(2.0))
    kw = dict(class_prompts=torch.arange(C), logit_scale=scale)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = ContrastiveRefiner(img, prompts, torch.optim.AdamW(img.parameters(), lr=1e-3), _val(), **kw)
        for _ in range(2):
            r(torch.randn(6, 8), torch.randint(0, C, (6,)), num_original=3)
    msgs = _unstepped_warnings(record)
    assert len(msgs) == 1, msgs
    assert "'logit_scale'" in msgs[0] and "'text.weight'" in msgs[0] and "does not hold 2" in msgs[0]
    assert "Add them to the optimizer" in msgs[0] and "score_params" in msgs[0] and "requires_grad_(False)" in msgs[0]
    assert [w.filename for w in record if "scored" in str(w.message)] == [__file__]   # the user's line

    with warnings.catch_warnings(record=True) as record:   # the same, but held only with lr=0
        warnings.simplefilter("always")
        opt = torch.optim.SGD([{"params": img.parameters()}, {"params": [prompts.weight, scale], "lr": 0.0}], lr=0.1)
        ContrastiveRefiner(img, prompts, opt, _val(), **kw)
        r.set_optimizer(torch.optim.SGD(list(img.parameters()) + [prompts.weight], lr=0.1))   # scale left out
    msgs = _unstepped_warnings(record)
    assert len(msgs) == 2 and "lr=0" in msgs[0] and "'text.weight'" in msgs[0], msgs
    assert "does not hold 1" in msgs[1] and "'logit_scale'" in msgs[1] and "text.weight" not in msgs[1]

    # no warning when every scored parameter steps
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ContrastiveRefiner(img, prompts, torch.optim.SGD(list(img.parameters()) + [prompts.weight, scale], lr=0.1),
                           _val(), **kw)
        ContrastiveRefiner(img, prompts, torch.optim.SGD(img.parameters(), lr=0.1), _val(),   # not scored
                           score_params=["image.0.weight", "image.2.weight"], **kw)
        ContrastiveRefiner(img, ClassEmbeddings(C, D, trainable=False), torch.optim.SGD(img.parameters(), lr=0.1),
                           _val(), class_prompts=torch.arange(C))                           # frozen prompts
        ContrastiveRefiner(img, prompts, None, _val(), **kw)                                # no optimizer
        ContrastiveRefiner(img, prompts, torch.optim.SGD(img.parameters(), lr=0.1), _val(), method="none", **kw)
    assert _unstepped_warnings(record) == []
