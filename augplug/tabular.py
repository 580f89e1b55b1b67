"""Tables: CutMix for rows of numeric and categorical features, and an MLP for tables.

CutMix on a table replaces a random subset of a row's features by the same features of another row
of the batch (Yun et al.'s CutMix with "a rectangle of pixels" read as "a subset of columns"; the
tabular form is the one used by SAINT and by the SAflex paper's tabular experiments). Because values
are copied, never interpolated, every column keeps its dtype and every categorical column keeps its
domain: a replaced category is a category another row really has.

    cutmix = TabularCutMix(p=0.5, proportion=(0.1, 0.5), seed=0)
    for x, y in loader:                       # any DataLoader of tensors
        x, y = cutmix(x, y)                   # or cutmix(x_num, x_cat, y)
        loss = refiner(model(x), y)           # ordinary AugmentationRefiner; classifier = model.fc

Labels are kept by default (``label="keep"``); ``label="mix"`` mixes the two rows' labels by the
share of features replaced. Why keep is the default: in a table the columns are not exchangeable the
way pixels of an image roughly are, so "30 % of the columns came from row j" says little about how
much of row j's class the new row carries (one decisive column can flip the class, ten irrelevant
ones change nothing). Keeping the label is the usual choice for tabular CutMix, returns integer
labels that work with any loss, and leaves the relabelling to SAflex, which measures per row whether
the kept label helps the validation loss (weights, with ``SAflex(weighting="soft")``) and what label
would help more (soft targets, with a finite ``beta``); by default it weighs the rows as a whole, by
their learned share, beside originals in the batch.

The transform draws every random number from its own ``torch.Generator`` (seeded, saved in
``state_dict``), so it never touches the global RNG and replays exactly under a seed.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import ConfigurationError, NonFiniteError, ShapeError, TargetError
from .models import MLP
from .targets import to_soft_targets

__all__ = ["tabular_cutmix", "TabularCutMix", "TabularMLP"]

Proportion = Union[float, Tuple[float, float]]


def _check_proportion(proportion: Proportion) -> Tuple[float, float]:
    if isinstance(proportion, (tuple, list)):
        if len(proportion) != 2:
            raise ConfigurationError(f"proportion must be a float or a (low, high) pair, got {proportion!r}",
                                     "use e.g. proportion=0.3 or proportion=(0.1, 0.5)")
        lo, hi = float(proportion[0]), float(proportion[1])
    else:
        lo = hi = float(proportion)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigurationError(f"proportion must lie in [0, 1] with low <= high, got {proportion!r}",
                                 "use a share of the features to replace, e.g. 0.3 or (0.1, 0.5)")
    return lo, hi


def _check_groups(groups) -> Optional[List[List[int]]]:
    """``groups`` as a list of lists of column indices (None for none); a :class:`ConfigurationError`
    unless it is a list of lists of integers (a flat list such as ``[1, 2]`` is one)."""
    if groups is None:
        return None
    try:
        out = []
        for g in groups:
            if isinstance(g, (str, bytes)):
                raise TypeError(g)
            cols = list(g)
            if any(isinstance(c, bool) for c in cols):
                raise TypeError(cols)
            out.append([operator.index(c) for c in cols])
    except TypeError:
        raise ConfigurationError(f"groups must be a list of lists of column indices, got {groups!r}",
                                 "wrap each group of columns swapped together in its own list, e.g. "
                                 "groups=[[1, 2]] (not groups=[1, 2])") from None
    return out


def _column_units(n_cols: int, groups: Optional[Sequence[Sequence[int]]]) -> torch.Tensor:
    """``unit_of[c]``: the unit (a single column, or a group swapped together) column ``c`` belongs to."""
    unit_of = torch.full((n_cols,), -1, dtype=torch.long)
    next_unit = 0
    for g in _check_groups(groups) or ():
        cols = torch.as_tensor(g, dtype=torch.long)
        if cols.numel() == 0:
            continue
        if int(cols.min()) < 0 or int(cols.max()) >= n_cols:
            raise ConfigurationError(f"group {list(g)} names columns outside 0..{n_cols - 1}",
                                     "list column indices of the concatenated [numeric, categorical] features")
        if bool((unit_of[cols] >= 0).any()):
            raise ConfigurationError(f"group {list(g)} overlaps another group",
                                     "put each column in at most one group")
        unit_of[cols] = next_unit
        next_unit += 1
    rest = unit_of < 0
    unit_of[rest] = torch.arange(next_unit, next_unit + int(rest.sum()))
    return unit_of


def _check_seed(seed) -> int:
    """``seed`` as an int within ``torch.Generator.manual_seed``'s range ``[-2**63, 2**64)``; a
    :class:`ConfigurationError` for anything else (a float, text, a bool, a number beyond that range)."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)  # ints, NumPy integers and 0-dim integer tensors
        if not -2 ** 63 <= value < 2 ** 64:   # torch.Generator.manual_seed's range
            raise TypeError
    except TypeError:
        raise ConfigurationError(f"seed must be an integer in [-2**63, 2**64) (torch.Generator's range), got {seed!r}",
                                 "pass an integer seed such as seed=0") from None
    return int(value)


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor inside a ``torch.func`` transform (its values cannot be read)."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))


def _is_integral(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool((t == t.round()).all())


def tabular_cutmix(
    x_num: Optional[torch.Tensor],
    targets: torch.Tensor,
    x_cat: Optional[torch.Tensor] = None,
    *,
    p: float = 0.5,
    proportion: Proportion = (0.1, 0.5),
    label: str = "keep",
    num_classes: Optional[int] = None,
    groups: Optional[Sequence[Sequence[int]]] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """CutMix a batch of table rows; returns ``(x_num, x_cat, targets, augmented)``.

    Each row is augmented with probability ``p``: a partner row ``j != i`` is drawn uniformly from
    the batch, a share ``lam`` of the row's feature units (``proportion``, fixed or drawn uniformly
    from ``(low, high)`` per row; ``round(lam * units)`` of them) is picked at random, and those
    features are copied from row ``j``. Units are single columns, except the column ``groups`` (e.g.
    the columns of a one-hot encoded category), which are swapped together. Numeric and categorical
    columns are chosen jointly: column indices of ``groups`` refer to ``[numeric..., categorical...]``.

    Args:
        x_num: ``(B, Dn)`` numeric features (any dtype) or None.
        targets: class indices ``(B,)`` or probabilities ``(B, C)``.
        x_cat: ``(B, Dc)`` categorical codes (integer tensor) or None.
        p: probability that a row is augmented.
        proportion: share of feature units replaced in an augmented row.
        label: ``"keep"`` (default: the row keeps its label) or ``"mix"`` (``(1 - r) y_i + r y_j``
            with ``r`` the share of units actually replaced; returns ``(B, C)`` float targets).
        num_classes: needed for ``label="mix"`` with class-index targets.
        groups: lists of columns swapped as one unit.
        generator: the random source. None: a fresh generator with torch's default seed, i.e. the same
            draws on every call; pass a seeded one (or use :class:`TabularCutMix`).

    ``augmented`` is a bool ``(B,)`` mask of the rows that received features from a partner (pass it
    as ``augmented=`` to :class:`~augplug.AugmentationRefiner`). Inputs are not modified in place.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ConfigurationError(f"p must lie in [0, 1], got {p}", "use the probability that a row is augmented")
    lo, hi = _check_proportion(proportion)
    if label not in ("keep", "mix"):
        raise ConfigurationError(f"label must be 'keep' or 'mix', got {label!r}",
                                 "use 'keep' (labels unchanged) or 'mix' (mixed by the replaced share)")
    if x_num is None and x_cat is None:
        raise ShapeError("tabular_cutmix needs numeric features, categorical features, or both",
                         "pass x_num=(B, Dn) and/or x_cat=(B, Dc)")
    parts = [t for t in (x_num, x_cat) if t is not None]
    for name, t in (("x_num", x_num), ("x_cat", x_cat)):
        if t is not None and (not torch.is_tensor(t) or t.dim() != 2):
            raise ShapeError(f"{name} must be a 2-D tensor (rows, columns), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}",
                             "pass one row per sample and one column per feature")
    batch = parts[0].shape[0]
    if any(t.shape[0] != batch for t in parts) or not torch.is_tensor(targets) or targets.dim() == 0 \
            or targets.shape[0] != batch:
        raise ShapeError("features and targets must have the same number of rows",
                         "pass the tensors of one batch, as the DataLoader yields them")
    if x_cat is not None and x_cat.is_floating_point():
        raise TargetError(f"x_cat must hold integer category codes, got {x_cat.dtype}",
                          "pass categorical columns as a LongTensor, or use TabularCutMix(categorical=mask)")
    if x_num is not None and x_num.is_floating_point() and not bool(torch.isfinite(x_num).all()):
        raise NonFiniteError("x_num contains NaN/inf", "impute missing values before augmenting")
    soft_in = targets.dim() == 2
    if label == "mix" and not soft_in:
        if targets.is_floating_point():
            raise TargetError("1-D floating targets", "pass class indices as an integer tensor, or (B, C) probabilities")
        if num_classes is None:
            raise ConfigurationError("label='mix' with class indices needs num_classes",
                                     "pass num_classes=C")
    one_hot = None
    if label == "mix" and not soft_in:  # checked before any draw, so a rejected batch moves no generator
        try:
            one_hot = to_soft_targets(targets, int(num_classes))
        except TargetError as e:
            raise TargetError(f"label='mix' with num_classes={num_classes}: {e.problem}",
                              f"pass class indices in 0..{int(num_classes) - 1}, or the number of classes as "
                              "num_classes=") from None
    dn = 0 if x_num is None else x_num.shape[1]
    n_cols = dn + (0 if x_cat is None else x_cat.shape[1])
    unit_of = _column_units(n_cols, groups)
    n_units = int(unit_of.max()) + 1 if n_cols else 0

    g = generator if generator is not None else torch.Generator()
    chosen = torch.rand(batch, generator=g) < float(p)
    if batch < 2:
        chosen = torch.zeros_like(chosen)
    partner = (torch.arange(batch) + torch.randint(1, max(batch, 2), (batch,), generator=g)) % max(batch, 1)
    lam = lo + (hi - lo) * torch.rand(batch, generator=g)
    k = torch.round(lam * n_units).long()
    ranks = torch.rand(batch, n_units, generator=g).argsort(1).argsort(1)  # a random permutation per row
    swap_unit = (ranks < k[:, None]) & chosen[:, None]
    swap_col = swap_unit[:, unit_of] if n_cols else torch.zeros(batch, 0, dtype=torch.bool)
    augmented = swap_unit.any(1)

    def mix(t: Optional[torch.Tensor], cols: torch.Tensor) -> Optional[torch.Tensor]:
        if t is None:
            return None
        m = cols.to(t.device)
        return torch.where(m, t[partner.to(t.device)], t)

    new_num = mix(x_num, swap_col[:, :dn])
    new_cat = mix(x_cat, swap_col[:, dn:])
    if label == "keep":
        new_y = targets
    else:
        y = targets.float() if soft_in else one_hot
        share = (swap_unit.float().sum(1) / max(n_units, 1)).to(y.device)[:, None]
        new_y = (1 - share) * y + share * y[partner.to(y.device)]
    return new_num, new_cat, new_y, augmented.to(parts[0].device)


class TabularCutMix:
    """CutMix as a batch transform for any DataLoader of tensors, with its own seeded generator.

    Call it on a batch as the loader yields it:

    - ``cutmix(x, y)``: ``x`` is one tensor; columns flagged by ``categorical`` (a bool mask or a list
      of indices) hold category codes and must be integer-valued (checked), all others are numeric;
    - ``cutmix(x_num, x_cat, y)``: numeric float tensor plus categorical integer tensor.

    It returns the same structure (plus the ``augmented`` row mask last when ``return_mask=True``).
    Options are those of :func:`tabular_cutmix`. ``state_dict()`` / ``load_state_dict()`` save the
    generator, so a resumed run draws the same augmentations. Apply it in the main process (on the
    batch inside the training loop); a copy inside each DataLoader worker would repeat the same draws.
    """

    def __init__(self, p: float = 0.5, proportion: Proportion = (0.1, 0.5), *, label: str = "keep",
                 num_classes: Optional[int] = None, categorical=None,
                 groups: Optional[Sequence[Sequence[int]]] = None, seed: int = 0, return_mask: bool = False):
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigurationError(f"p must lie in [0, 1], got {p}", "use the probability that a row is augmented")
        _check_proportion(proportion)
        if label not in ("keep", "mix"):
            raise ConfigurationError(f"label must be 'keep' or 'mix', got {label!r}",
                                     "use 'keep' (labels unchanged) or 'mix' (mixed by the replaced share)")
        self.p, self.proportion, self.label, self.num_classes = float(p), proportion, label, num_classes
        self.categorical = categorical
        self.groups = _check_groups(groups) or None
        self.return_mask = bool(return_mask)
        self.seed = _check_seed(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _cat_mask(self, n_cols: int) -> torch.Tensor:
        c = torch.as_tensor(self.categorical)
        if c.dtype == torch.bool:
            if c.shape != (n_cols,):
                raise ShapeError(f"categorical mask has {c.numel()} entries, the batch has {n_cols} columns",
                                 "pass one bool per column")
            return c
        mask = torch.zeros(n_cols, dtype=torch.bool)
        idx = c.long().flatten()
        if idx.numel() and (int(idx.min()) < -n_cols or int(idx.max()) >= n_cols):
            raise ShapeError(f"categorical columns {idx.tolist()} are outside 0..{n_cols - 1}",
                             "pass column indices of the batch tensor")
        mask[idx] = True
        return mask

    def __call__(self, *batch: torch.Tensor):
        if len(batch) == 2:
            x, y = batch
            if not torch.is_tensor(x) or x.dim() != 2:
                raise ShapeError("the first tensor must be (rows, columns)", "pass the features as a 2-D tensor")
            if self.categorical is not None:
                m = self._cat_mask(x.shape[1])
                if m.any() and not _is_integral(x[:, m]):
                    raise TargetError("columns flagged categorical hold non-integer values",
                                      "pass category codes (0, 1, 2, ...) in the categorical columns")
            # one tensor: every column is copied, never interpolated, so categorical columns stay in domain
            xn, xc = x, None
        elif len(batch) == 3:
            xn, xc, y = batch
        else:
            raise ShapeError(f"TabularCutMix takes (x, y) or (x_num, x_cat, y), got {len(batch)} tensors",
                             "pass the batch tensors in one of those orders")
        gen_state = self.generator.get_state()
        try:
            xn, xc_new, yn, aug = tabular_cutmix(xn, y, xc, p=self.p, proportion=self.proportion, label=self.label,
                                                 num_classes=self.num_classes, groups=self.groups,
                                                 generator=self.generator)
        except BaseException:  # a rejected batch leaves the generator where it was
            self.generator.set_state(gen_state)
            raise
        out = (xn, yn) if xc is None else (xn, xc_new, yn)
        return out + (aug,) if self.return_mask else out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` (checked first: a rejected state changes nothing)."""
        g = state.get("generator") if isinstance(state, dict) else None
        own = self.generator.get_state()
        if not torch.is_tensor(g) or g.dtype != own.dtype or g.shape != own.shape:
            raise ConfigurationError("a TabularCutMix state needs the 'generator' state it saved",
                                     "load a state saved by TabularCutMix.state_dict()")
        try:  # tried on a scratch generator first, so an invalid state leaves this one where it was
            torch.Generator().set_state(g.clone())
        except RuntimeError as e:
            raise ConfigurationError(f"the 'generator' entry is not a valid torch.Generator state "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                                     "load a state saved by TabularCutMix.state_dict(), unmodified") from None
        self.generator.set_state(g.clone())

    def __repr__(self) -> str:
        return (f"TabularCutMix(p={self.p}, proportion={self.proportion!r}, label={self.label!r}, "
                f"groups={self.groups!r}, seed={self.seed})")


def _check_cat_columns(cat_columns, num_features: int, n_cards: int) -> List[int]:
    """``cat_columns`` as a list of distinct column indices in ``0..num_features-1``, one per
    cardinality; a :class:`ConfigurationError` naming the problem otherwise."""
    try:
        if isinstance(cat_columns, (str, bytes)):
            raise TypeError
        cols = list(cat_columns)
        if any(isinstance(c, bool) for c in cols):
            raise TypeError
        cols = [operator.index(c) for c in cols]
    except TypeError:
        raise ConfigurationError(f"cat_columns must be a list of column indices, got {cat_columns!r}",
                                 "pass the indices of the categorical columns of x, e.g. cat_columns=[3, 7]") from None
    if len(cols) != n_cards:
        raise ConfigurationError(f"cat_columns and cat_cardinalities must have the same length, got {len(cols)} "
                                 f"columns {cols} and {n_cards} cardinalities",
                                 "give one cardinality per categorical column")
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise ConfigurationError(f"cat_columns {cols} name column(s) {dup} more than once",
                                 "list each categorical column of x once")
    outside = [c for c in cols if not 0 <= c < num_features]
    if outside:
        raise ConfigurationError(
            f"cat_columns {cols} name column(s) {outside} outside 0..{num_features - 1}: with cat_columns, "
            f"num_features is the full width of x (numeric and categorical columns together), here {num_features}",
            "pass num_features=x.shape[1] (all columns of x, the categorical ones included) and cat_columns as "
            "non-negative indices into x")
    return cols


class TabularMLP(nn.Module):
    """An MLP for tables: optional category embeddings in front of :class:`augplug.models.MLP`.

    Two ways to give categorical columns:

    - ``forward(x_num, x_cat=None)``: numeric ``(B, Dn)`` features with ``Dn == num_features`` and
      categorical codes ``(B, Dc)`` with ``Dc == len(cat_cardinalities)`` (no ``x_cat``, or one with
      no columns, when the model has no ``cat_cardinalities``); each categorical column ``k`` is
      embedded in ``embed_dim`` dimensions (cardinality ``cat_cardinalities[k]``) and concatenated to
      the numeric features.
    - ``cat_columns`` at construction, then ``forward(x)``: one tensor ``(B, num_features)`` whose
      columns ``cat_columns`` (distinct indices in ``0..num_features-1``, one per cardinality) hold the
      codes. Here ``num_features`` is the **full width** of ``x``, numeric and categorical columns
      together; the numeric part is ``num_features - len(cat_columns)`` columns wide. This is the form
      to use with :class:`~augplug.AugmentationRefiner`, whose validation loader yields ``(x, y)``.

    Impossible ``cat_columns`` (duplicates, negative, beyond ``num_features``, a count other than
    ``len(cat_cardinalities)``) raise a :class:`~augplug.errors.ConfigurationError` at construction;
    inputs of the wrong width or number of categorical columns a :class:`~augplug.errors.ShapeError`
    naming the expected and given widths, before any parameter is used. In both forms the codes must
    be integer values in ``0..cardinality-1`` of their column (checked: a
    :class:`~augplug.errors.TargetError` names the column otherwise; floats holding integer values are
    fine, other floats are not rounded but rejected). The body is ``depth`` hidden layers of ``hidden``
    units with optional BatchNorm and dropout; the classifier is the ``nn.Linear`` reachable as
    ``model.fc`` (found by augplug).
    """

    def __init__(self, num_features: int, num_classes: int, *, cat_cardinalities: Sequence[int] = (),
                 cat_columns: Optional[Sequence[int]] = None, embed_dim: int = 8, hidden: int = 256, depth: int = 2,
                 dropout: float = 0.1, batch_norm: bool = False):
        super().__init__()
        try:
            if isinstance(num_features, bool):
                raise TypeError
            num_features = operator.index(num_features)
            if num_features < 0:
                raise TypeError
        except TypeError:
            raise ConfigurationError(f"num_features must be a non-negative integer, got {num_features!r}",
                                     "pass the number of input columns") from None
        try:
            cards = list(cat_cardinalities)
            if any(isinstance(k, bool) for k in cards):
                raise TypeError
            cards = [operator.index(k) for k in cards]
            if any(k < 1 for k in cards):
                raise TypeError
        except TypeError:
            raise ConfigurationError(f"cat_cardinalities must be positive integers, got {cat_cardinalities!r}",
                                     "give each categorical column's number of categories (its codes are "
                                     "0..cardinality-1)") from None
        self.cat_columns = None if cat_columns is None else _check_cat_columns(cat_columns, num_features, len(cards))
        self.num_features = num_features
        self.embeddings = nn.ModuleList(nn.Embedding(int(k), embed_dim) for k in cards)
        n_num = num_features - (len(self.cat_columns) if self.cat_columns is not None else 0)
        self.num_numeric = n_num
        self.mlp = MLP(n_num + embed_dim * len(self.embeddings), num_classes, hidden=hidden, depth=depth,
                       dropout=dropout, batch_norm=batch_norm)

    @property
    def fc(self) -> nn.Linear:
        return self.mlp.fc

    def _codes(self, x_cat: torch.Tensor, columns: Optional[Sequence[int]]) -> torch.Tensor:
        """``x_cat`` (B, Dc) as long codes, after checking (one device sync) that every code is an
        integer value in ``0..cardinality-1`` of its column; ``columns``: where the codes sit in the
        single input tensor (the ``cat_columns`` form), None for the two-tensor form. Inside
        ``torch.func`` transforms (``vmap`` of per-sample gradients), where values cannot be read,
        the codes are not checked."""
        codes = x_cat.long() if x_cat.dtype == torch.bool else x_cat
        if _is_functorch_wrapped(codes):
            return codes.long()
        cards = torch.tensor([e.num_embeddings for e in self.embeddings], device=x_cat.device)
        fractional = codes != codes.round() if codes.is_floating_point() else torch.zeros_like(codes, dtype=torch.bool)
        outside = ((codes < 0) | (codes >= cards)) & ~fractional
        bad_value, bad_range = torch.stack([fractional.any(), outside.any()]).tolist()
        if bad_value or bad_range:
            bad = fractional if bad_value else outside
            row, k = (int(i) for i in bad.nonzero()[0])
            where = f"column {columns[k]} of x" if columns is not None else f"x_cat column {k}"
            value, card = codes[row, k].item(), int(cards[k])
            if bad_value:
                raise TargetError(f"{where} (categorical, cardinality {card}) holds the non-integer code {value:g} "
                                  f"(row {row})",
                                  "pass category codes as integer values 0, 1, 2, ... (floats are not rounded); "
                                  "categorical columns must not be standardised or interpolated")
            raise TargetError(f"{where} (categorical, cardinality {card}) holds the code {value:g} (row {row}), "
                              f"outside 0..{card - 1}",
                              f"encode that column's categories as 0..{card - 1}, or build the model with a larger "
                              "cat_cardinalities entry for it")
        return codes.long()

    def _check_inputs(self, x, x_cat) -> None:
        """Shapes of a forward call (no values read, so it also runs inside ``torch.func`` transforms):
        a :class:`ShapeError` naming the expected and given widths and columns."""
        n_cat = len(self.embeddings)
        if not torch.is_tensor(x) or x.dim() != 2:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ShapeError(f"TabularMLP takes the features as a 2-D tensor (rows, columns), got {got}",
                             "call model(x) (cat_columns form) or model(x_num, x_cat) with 2-D tensors; with "
                             "AugmentationRefiner use the cat_columns form: its validation loader yields (x, y) with "
                             "the category codes inside x")
        if x_cat is None and self.cat_columns is not None:
            if x.shape[1] != self.num_features:
                raise ShapeError(f"x has {x.shape[1]} columns, the model takes {self.num_features} "
                                 f"({self.num_numeric} numeric and the categorical columns {self.cat_columns})",
                                 f"pass x with num_features={self.num_features} columns, the category codes in "
                                 f"columns {self.cat_columns}, or build the model for x's width")
            return
        if x_cat is not None and (not torch.is_tensor(x_cat) or x_cat.dim() != 2 or x_cat.shape[0] != x.shape[0]):
            got = tuple(x_cat.shape) if torch.is_tensor(x_cat) else type(x_cat).__name__
            raise ShapeError(f"x_cat must be a 2-D tensor with the {x.shape[0]} rows of x_num, got {got}",
                             "pass the categorical codes of the same rows as a (rows, columns) tensor")
        given = 0 if x_cat is None else x_cat.shape[1]
        if given != n_cat:
            got = "no x_cat" if x_cat is None else f"x_cat with {given} columns"
            if n_cat == 0:
                raise ShapeError(f"the model embeds 0 categorical columns (built without cat_cardinalities), got {got}",
                                 "build TabularMLP with cat_cardinalities=(one cardinality per x_cat column), or "
                                 "call model(x_num) without x_cat")
            raise ShapeError(f"the model embeds {n_cat} categorical columns (len(cat_cardinalities)), got {got}",
                             "pass x_cat with one column per cardinality given at construction")
        if x.shape[1] != self.num_numeric:
            raise ShapeError(f"x_num has {x.shape[1]} columns, the model takes {self.num_numeric} numeric columns"
                             + (f" (num_features={self.num_features} minus the {n_cat} cat_columns)"
                                if self.cat_columns is not None else f" (num_features={self.num_features})"),
                             f"pass x_num with {self.num_numeric} columns, or build the model with "
                             "num_features=x_num.shape[1]")

    def forward(self, x: torch.Tensor, x_cat: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_inputs(x, x_cat)
        columns = None
        if x_cat is None and self.cat_columns is not None:
            keep = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
            keep[self.cat_columns] = False
            columns = self.cat_columns
            x_cat = x[:, self.cat_columns]
            x = x[:, keep]
        parts = [x.float()] if x.shape[1] else []
        if len(self.embeddings):
            codes = self._codes(x_cat, columns)
            parts += [emb(codes[:, k]) for k, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat(parts, 1))
