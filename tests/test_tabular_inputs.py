"""Input and configuration checks of the tabular module: TabularMLP's categorical columns and input
widths (both forms), and TabularCutMix's seed range and generator-state content. Every refusal is a
typed error naming the problem and the fix, and a refused call changes nothing."""
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import augplug
from augplug.errors import ConfigurationError, ShapeError
from augplug.tabular import TabularCutMix, TabularMLP


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ TabularMLP: categorical columns
@pytest.mark.parametrize("x_cat", [torch.randint(0, 4, (8, 2)), torch.randint(0, 1000, (8, 7))])
def test_mlp_without_cardinalities_refuses_x_cat(x_cat):
    torch.manual_seed(0)
    model = TabularMLP(num_features=5, num_classes=3, batch_norm=True)
    before = _state(model)
    with pytest.raises(ShapeError, match=rf"embeds 0 categorical columns.*x_cat with {x_cat.shape[1]} columns") as e:
        model(torch.randn(8, 5), x_cat)
    assert "cat_cardinalities" in e.value.fix
    assert _same(before, _state(model))  # BatchNorm's running statistics did not move
    assert model(torch.randn(8, 5)).shape == (8, 3)
    assert model(torch.randn(8, 5), torch.zeros(8, 0, dtype=torch.long)).shape == (8, 3)  # 0 columns: 0 embedded


def test_mlp_categorical_column_count_must_match_cardinalities():
    torch.manual_seed(0)
    model = TabularMLP(num_features=5, num_classes=3, cat_cardinalities=(4, 4))
    xn = torch.randn(8, 5)
    with pytest.raises(ShapeError, match=r"embeds 2 categorical columns.*x_cat with 3 columns"):
        model(xn, torch.randint(0, 4, (8, 3)))
    with pytest.raises(ShapeError, match=r"embeds 2 categorical columns.*no x_cat"):
        model(xn)
    with pytest.raises(ShapeError, match=r"x_cat must be a 2-D tensor with the 8 rows"):
        model(xn, torch.randint(0, 4, (7, 2)))


# ------------------------------------------------------------------ TabularMLP: cat_columns at construction
@pytest.mark.parametrize("num_features,cards,cols,match", [
    (5, (4, 9), [3, 7], r"column\(s\) \[7\] outside 0..4: with cat_columns, num_features is the full width of x"),
    (13, (4, 9), [3, 20], r"column\(s\) \[20\] outside 0..12"),
    (13, (4, 9), [3, -1], r"column\(s\) \[-1\] outside 0..12"),
    (13, (4, 9), [3, 3], r"column\(s\) \[3\] more than once"),
    (13, (4, 9), [3], r"same length, got 1 columns \[3\] and 2 cardinalities"),
    (13, (4,), [3.5], r"cat_columns must be a list of column indices"),
    (13, (0,), [3], r"cat_cardinalities must be positive integers"),
], ids=["docs-width-5", "beyond-width", "negative", "duplicate", "count", "float-index", "cardinality-0"])
def test_mlp_impossible_cat_columns_rejected_at_construction(num_features, cards, cols, match):
    with pytest.raises(ConfigurationError, match=match) as e:
        TabularMLP(num_features=num_features, num_classes=3, cat_cardinalities=cards, cat_columns=cols)
    assert e.value.fix


# ------------------------------------------------------------------ TabularMLP: widths in forward
@pytest.mark.parametrize("width", [12, 14])
def test_mlp_one_tensor_form_wrong_width(width):
    torch.manual_seed(0)
    model = TabularMLP(num_features=13, num_classes=3, cat_cardinalities=(4, 9), cat_columns=[3, 7], batch_norm=True)
    before = _state(model)
    x = torch.zeros(16, width)
    with pytest.raises(ShapeError, match=rf"x has {width} columns, the model takes 13 \(11 numeric and the "
                                         r"categorical columns \[3, 7\]\)") as e:
        model(x)
    assert "num_features=13" in e.value.fix
    assert _same(before, _state(model))


def test_mlp_two_tensor_form_wrong_numeric_width():
    torch.manual_seed(0)
    with pytest.raises(ShapeError, match=r"x_num has 6 columns, the model takes 5 numeric columns"):
        TabularMLP(num_features=5, num_classes=3)(torch.randn(16, 6))
    model = TabularMLP(num_features=5, num_classes=3, cat_cardinalities=(4,))
    with pytest.raises(ShapeError, match=r"x_num has 4 columns, the model takes 5"):
        model(torch.randn(16, 4), torch.randint(0, 4, (16, 1)))
    # a cat_columns model called with two tensors takes the numeric part only
    both = TabularMLP(num_features=6, num_classes=3, cat_cardinalities=(4,), cat_columns=[5])
    with pytest.raises(ShapeError, match=r"x_num has 6 columns, the model takes 5 numeric columns \(num_features=6 "
                                         r"minus the 1 cat_columns\)"):
        both(torch.randn(16, 6), torch.randint(0, 4, (16, 1)))


def test_mlp_tuple_input_points_to_the_cat_columns_form():
    model = TabularMLP(num_features=5, num_classes=3, cat_cardinalities=(4, 4))
    with pytest.raises(ShapeError, match=r"2-D tensor \(rows, columns\), got tuple") as e:
        model((torch.randn(8, 5), torch.randint(0, 4, (8, 2))))
    assert "cat_columns" in e.value.fix and "AugmentationRefiner" in e.value.fix


def _docs_block(after: str, index: int = 0) -> str:
    """The ``index``-th python block of docs/tabular.md after the line starting with ``after``."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "tabular.md").read_text()
    assert after in text, f"docs/tabular.md has no {after!r}"
    return re.findall(r"```python\n(.*?)```", text[text.index(after):], re.S)[index]


def test_docs_cat_columns_form_and_refiner_recipe_run():
    """docs/tabular.md: the one-tensor form with num_features the full width of x, and the recipe for
    the refiner (codes inside x, loaders of (x, y)) run as written."""
    torch.manual_seed(0)

    def table(n):  # 13 columns, codes in 3 (4 categories) and 7 (9 categories), one-hot in 10..12
        x = torch.cat([torch.randn(n, 3), torch.randint(0, 4, (n, 1)).float(), torch.randn(n, 3),
                       torch.randint(0, 9, (n, 1)).float(), torch.randn(n, 2),
                       torch.eye(3)[torch.randint(0, 3, (n,))]], 1)
        return x, torch.randint(0, 3, (n,))

    x, y = table(16)
    env = dict(torch=torch, augplug=augplug, TabularCutMix=TabularCutMix, TabularMLP=TabularMLP, x=x, y=y,
               val_loader=DataLoader(TensorDataset(*table(16)), batch_size=8),
               train_loader=DataLoader(TensorDataset(*table(16)), batch_size=8))
    exec(_docs_block("or one tensor `x` (B, 13)"), env)
    assert env["logits"].shape == (16, 3) and env["model"].num_numeric == 11
    exec(_docs_block("### With the refiner"), env)
    assert torch.isfinite(env["loss"]) and env["refiner"].step_count > 0


# ------------------------------------------------------------------ TabularCutMix: seed and state
def test_cutmix_seed_must_lie_in_torch_range():
    for seed in (2 ** 70, 2 ** 64, -2 ** 63 - 1, 1.5, "3", True):
        with pytest.raises(ConfigurationError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)") as e:
            TabularCutMix(seed=seed)
        assert "seed=0" in e.value.fix
    for seed in (0, 2 ** 64 - 1, -2 ** 63):  # the edges of torch's range are accepted
        c = TabularCutMix(seed=seed)
        assert c.seed == seed
        assert torch.equal(c.generator.get_state(), torch.Generator().manual_seed(seed).get_state())


def test_cutmix_invalid_generator_content_rejected_and_generator_unchanged():
    c = TabularCutMix(seed=0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    c(x, y)
    before = c.generator.get_state().clone()
    with pytest.raises(ConfigurationError, match="not a valid torch.Generator state") as e:
        c.load_state_dict({"generator": torch.zeros_like(before)})
    assert "TabularCutMix.state_dict()" in e.value.fix
    assert torch.equal(c.generator.get_state(), before)
    # a good state still loads afterwards
    c.load_state_dict(TabularCutMix(seed=4).state_dict())
    assert torch.equal(c.generator.get_state(), torch.Generator().manual_seed(4).get_state())
