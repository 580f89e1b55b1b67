"""SAflex for contrastive objectives: CLIP-style InfoNCE over a batch of pairs, and FLYP-style
fine-tuning against class prompts.

A batch of ``B`` image–text pairs gives similarity logits ``S = s * f(x) t(u)^T`` (``B x B``; ``f``,
``t`` the two encoders with L2-normalized outputs, ``s = exp(logit_scale)``). CLIP's loss reads each
row as a ``B``-way classification whose correct class is the diagonal: image ``i`` against the ``B``
texts (image→text, rows of ``S``) and text ``j`` against the ``B`` images (text→image, columns of
``S``). With ``log p_i = log_softmax_j(S_ij)`` (and the same down the columns) the class scores are
exactly the core's::

    g_ic = d log p_ic / d theta . v,     v = -grad_theta L_val,

where ``theta`` are the parameters of *both* encoders (and a learnable logit scale) and ``L_val`` is
the same contrastive loss on a clean validation batch of pairs. ``g_ic > 0``: raising the
probability that row ``i`` picks candidate ``c`` lowers the validation loss. The row's upstream
target is the identity pairing ``e_i``, so SAflex's rules become

    w_i  = 1[g_ii >= 0]                      (the positive pair decides the weight)
    y'_i = softmax((g_i + beta e_i + G)/tau)  (a soft target over the B candidates)

and any option of :func:`augplug.methods.saflex_targets` applies (centred scores, graded weights, ...).
``g`` is computed by one forward-mode pass (``torch.autograd.forward_ad``) through both encoders with
tangent ``v``; a single pass gives both directions, because they are two log-softmaxes of one ``S``.

FLYP-style fine-tuning (Goyal et al., 2023) uses class prompts as the texts: ``S`` is ``B x C``
(every image against the ``C`` prompt embeddings, fixed or learnable, e.g. :class:`ClassEmbeddings`),
which is a ``C``-way classification with labels as targets. :class:`ContrastiveRefiner` covers both:

    refiner = ContrastiveRefiner(image_encoder, text_encoder, optimizer, val_pairs)        # CLIP pairs
    loss = refiner(images, texts)

    refiner = ContrastiveRefiner(image_encoder, ClassEmbeddings(10, 64), optimizer, val_loader,
                                 class_prompts=torch.arange(10))                             # FLYP
    loss = refiner(images, labels)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import (AugplugError, ConfigurationError, ModelModeError, NonFiniteError, ShapeError,
                     TargetError)
from .errors import warn_at_caller as _warn_at_caller
from .finite import nonfinite
from .heads import unwrap_model
from .methods import Policy, renormalize, saflex_targets
from .core import RefinerCore, check_part_presence, unwrap_optimizer
from .distributed import world_size as dist_world_size
from .refiner import (DEFAULTS, _group_lr, augmented_rows, build_policy, check_shell_options,
                      reject_moved_options)
from .schedule import Schedule, resolve_schedule
from .scores import GradSum, forward_mode_duals, grad_sums, scoring_mode
from .share import resolve_share
from .valve import apply_strength, resolve_strength
from .targets import soft_cross_entropy, to_soft_targets
from .transfer import to_device

__all__ = [
    "DIRECTIONS",
    "DualEncoder",
    "ClassEmbeddings",
    "check_similarity",
    "contrastive_scores",
    "contrastive_validation_gradient",
    "contrastive_targets",
    "clip_loss",
    "ContrastiveRefiner",
]

#: The two readings of a similarity matrix: rows (image→text) and columns (text→image).
DIRECTIONS = ("image_to_text", "text_to_image")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class DualEncoder(nn.Module):
    """Two encoders and a logit scale, returning similarity logits ``S = exp(logit_scale) * a b^T``.

    Args:
        image_encoder, text_encoder: any modules mapping a batch to ``(N, D)`` embeddings (tuple
            outputs: the first element). They may be the same module (shared weights; its parameters
            are then named ``image.*`` only).
        logit_scale: the log of the multiplier (CLIP's convention, default ``log(1/0.07)``). A float is
            fixed (a buffer); an ``nn.Parameter`` is learned (put it in your optimizer).
        normalize: L2-normalize both embeddings (cosine similarities), as CLIP does.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module,
                 logit_scale: Union[float, nn.Parameter] = math.log(1 / 0.07), normalize: bool = True):
        super().__init__()
        self.image = image_encoder
        # One module used for both sides is registered once: a submodule registered under two names
        # would be reparametrised twice by torch.func.functional_call, which then fails to restore it.
        self.shared = image_encoder is text_encoder
        if not self.shared:
            self.text = text_encoder
        if isinstance(logit_scale, nn.Parameter):
            self.logit_scale = logit_scale
        else:
            self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.normalize = bool(normalize)

    @property
    def image_encoder(self) -> nn.Module:
        return self.image

    @property
    def text_encoder(self) -> nn.Module:
        return self.image if self.shared else self.text

    def embed(self, images, texts) -> Tuple[torch.Tensor, torch.Tensor]:
        a, b = _first(self.image(images)), _first(self.text_encoder(texts))
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ShapeError(f"the encoders return embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}",
                             "make both encoders return (N, D) embeddings of the same width D")
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return a, b

    def forward(self, images, texts) -> torch.Tensor:
        a, b = self.embed(images, texts)
        return self.logit_scale.exp() * (a @ b.t())


class ClassEmbeddings(nn.Module):
    """Learnable (or, with ``trainable=False``, fixed random) class-prompt embeddings.

    ``forward(class_ids)`` returns the embeddings of the given classes, ``(len(class_ids), dim)``; as
    the text encoder of a FLYP-style :class:`ContrastiveRefiner` it is called with
    ``class_prompts=torch.arange(num_classes)``.
    """

    def __init__(self, num_classes: int, dim: int, trainable: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        w = torch.randn(int(num_classes), int(dim), generator=g) / math.sqrt(dim)
        self.weight = nn.Parameter(w, requires_grad=bool(trainable))

    def forward(self, class_ids) -> torch.Tensor:
        ids = class_ids if torch.is_tensor(class_ids) else torch.as_tensor(class_ids, device=self.weight.device)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TargetError(f"class ids must be integers, got {ids.dtype}", "pass integer ids, e.g. torch.arange(C)")
        return self.weight[ids.long()]

    def check_ids(self, class_ids) -> torch.Tensor:
        """Raise a :class:`TargetError` unless ``class_ids`` are integer ids (a 1-D tensor, or a list of
        ints) that index these embeddings; returns them as a tensor (checked once, when a refiner is
        built with them as its class prompts)."""
        return _checked_ids(class_ids, self.weight.shape[0], "class embeddings", "ClassEmbeddings")


def _checked_ids(class_ids, n: int, what: str, owner: str) -> torch.Tensor:
    """``class_ids`` as a 1-D integer tensor indexing ``n`` embeddings, or a :class:`TargetError`: float
    or bool ids (which indexing would truncate or misread), ids that are not 1-D, ids outside [0, n)."""
    fix = f"pass class_prompts=torch.arange({n}) (integer ids, one per class prompt)"
    if torch.is_tensor(class_ids):
        ids = class_ids
    else:
        if isinstance(class_ids, (list, tuple)) and any(isinstance(i, bool) for i in class_ids):
            raise TargetError(f"class prompt ids must be integers, got booleans in {list(class_ids)[:6]!r}", fix)
        try:
            ids = torch.as_tensor(class_ids)
        except (TypeError, ValueError, RuntimeError):
            raise TargetError(f"class prompt ids must be integers, got {type(class_ids).__name__} "
                              f"{class_ids!r:.80}", fix) from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TargetError(f"class prompt ids must be integers, got {ids.dtype} ids {ids.flatten()[:6].tolist()}"
                          + (" (indexing would read them truncated)" if ids.is_floating_point() else ""), fix)
    if ids.dim() != 1:
        raise ShapeError(f"class prompt ids must be a 1-D tensor (one id per class prompt), got shape "
                         f"{tuple(ids.shape)}", fix)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise TargetError(f"class prompt ids must lie in [0, {n}) for these {n} {what}, got ids from "
                          f"{int(ids.min())} to {int(ids.max())}",
                          f"pass class_prompts=torch.arange({n}), or build {owner} with as many classes "
                          "as the prompts")
    return ids


# ---------------------------------------------------------------------------------------------- checks
def check_similarity(similarity: torch.Tensor, square: bool = True, what: str = "similarity logits") -> None:
    """Raise a typed error unless ``similarity`` is a finite floating 2-D tensor (square if asked)."""
    if not torch.is_tensor(similarity) or similarity.dim() != 2:
        raise ShapeError(f"{what} must be a 2-D tensor, got "
                         f"{tuple(similarity.shape) if torch.is_tensor(similarity) else type(similarity).__name__}",
                         "pass the (B, B) image-text similarity logits of one batch")
    if not similarity.is_floating_point():
        raise TargetError(f"{what} must be floating point, got {similarity.dtype}", "pass raw similarity logits")
    if square and similarity.shape[0] != similarity.shape[1]:
        raise ShapeError(f"{what} have shape {tuple(similarity.shape)}; a batch of pairs gives a square matrix",
                         "pass as many texts as images (pair i = image i with text i), or use class_prompts= "
                         "for a C-way (FLYP-style) setup")
    if similarity.shape[0] == 0 or similarity.shape[1] < 2:
        raise ShapeError(f"{what} have shape {tuple(similarity.shape)}; need at least 2 candidates per row",
                         "use batches of at least two pairs")
    if not bool(torch.isfinite(similarity.detach()).all()):
        raise NonFiniteError(f"{what} contain NaN/inf",
                             "check the inputs and the logit scale (clamp it, e.g. at log(100), as CLIP does)")


def _check_inputs(x, what: str) -> None:
    """NaN/inf in an input: a tensor, or the tensors inside a mapping, list or tuple (one read per device)."""
    if nonfinite(x):
        raise NonFiniteError(f"{what} contain NaN/inf", "check the data pipeline (normalization, augmentation)")


def _rows(x, what: str = "the input") -> Optional[int]:
    """The rows of a batch: a tensor's first dimension; a mapping's (a tokenizer's output such as
    ``{"input_ids", "attention_mask"}``) from its tensors, which must agree (a :class:`ShapeError`
    otherwise); a list's or tuple's length (one element a row: strings, per-sample tensors); None
    when it has none (a 0-dim tensor, another object, a mapping without tensors)."""
    if torch.is_tensor(x):
        return x.shape[0] if x.dim() > 0 else None
    if isinstance(x, Mapping):
        counts = {}
        for key, value in x.items():
            if torch.is_tensor(value) or isinstance(value, Mapping):
                n = _rows(value, f"{what}[{key!r}]")
                if n is not None:
                    counts[key] = n
        if len(set(counts.values())) > 1:
            raise ShapeError(f"{what} is a mapping whose tensors disagree on the number of rows: "
                             + ", ".join(f"{k!r} has {n}" for k, n in counts.items()),
                             "give every tensor one row per sample, batch first (a tokenizer: padding=True, "
                             "return_tensors='pt')")
        return next(iter(counts.values()), None)
    if isinstance(x, (list, tuple)):
        return len(x)
    return None


def _take_rows(x, rows):
    """The rows ``rows`` (a bool mask) of a tensor or of a plain dict of tensors (0-dim tensors and
    non-sequence values unchanged), or None for other inputs, and for dicts holding lists or other
    mappings that may hold rows too (the caller then uses every row)."""
    if torch.is_tensor(x):
        return x[rows] if x.dim() > 0 else x
    if type(x) is not dict:
        return None
    out = {}
    for key, value in x.items():
        if torch.is_tensor(value) or type(value) is dict:
            value = _take_rows(value, rows)
            if value is None:
                return None
        elif isinstance(value, (Mapping, list, tuple)):
            return None
        out[key] = value
    return out


def _check_directions(directions) -> Tuple[str, ...]:
    d = (directions,) if isinstance(directions, str) else tuple(directions)
    if not d or any(x not in DIRECTIONS for x in d) or len(set(d)) != len(d):
        raise ConfigurationError(f"directions must be a non-empty subset of {DIRECTIONS}, got {directions!r}",
                                 "use both (CLIP's symmetric loss) or one of them")
    return d


def _log_probs(similarity: torch.Tensor, direction: str) -> torch.Tensor:
    """Rows of the direction's B-way classification: ``(anchors, candidates)`` log-probabilities."""
    s = similarity if similarity.dtype == torch.float64 else similarity.float()
    return F.log_softmax(s, -1) if direction == "image_to_text" else F.log_softmax(s.t(), -1)


# ---------------------------------------------------------------------------------------------- scores
def contrastive_scores(model: DualEncoder, images, texts, v: Dict[str, torch.Tensor], *,
                       directions: Sequence[str] = DIRECTIONS, bn: str = "eval") -> Dict[str, torch.Tensor]:
    """Class scores ``g`` of every row of each direction, by one forward-mode pass with tangent ``v``.

    Returns ``{direction: g}`` with ``g`` of shape ``(anchors, candidates)`` in fp32: ``(B_img, B_txt)``
    for ``"image_to_text"``, ``(B_txt, B_img)`` for ``"text_to_image"``. ``v`` maps parameter names of
    ``model`` (``image.*``, ``text.*``, ``logit_scale``) to tangents; others get a zero tangent. Runs
    with dropout off and BatchNorm in ``bn`` mode (running statistics untouched), autocast off.
    """
    directions = _check_directions(directions)
    net = unwrap_model(model)
    first = next(net.parameters(), None)
    dev = first.device.type if first is not None else "cpu"
    with forward_mode_duals(net, v, bn=bn, device_type=dev,
                            fix="compute it with contrastive_validation_gradient on this model") as duals:
        s = functional_call(net, duals, (images, texts), strict=False)
        out = {}
        for d in directions:
            tangent = fwAD.unpack_dual(_log_probs(s, d)).tangent
            rows = s.shape[0] if d == "image_to_text" else s.shape[1]
            cols = s.shape[1] if d == "image_to_text" else s.shape[0]
            out[d] = (torch.zeros(rows, cols, device=s.device) if tangent is None else tangent.float().clone())
    return out


def _row_losses_sum(s: torch.Tensor, directions, targets: Optional[torch.Tensor]) -> torch.Tensor:
    """Sum over rows of the directions' cross-entropies, averaged over the directions."""
    total = 0.0
    for d in directions:
        lp = _log_probs(s, d)
        y = targets if targets is not None else torch.eye(lp.shape[0], lp.shape[1], device=lp.device)
        total = total + soft_cross_entropy(lp, y).sum()
    return total / len(directions)


def contrastive_validation_gradient(model: DualEncoder, images, texts, params: Dict[str, nn.Parameter], *,
                                    targets: Optional[torch.Tensor] = None,
                                    directions: Sequence[str] = DIRECTIONS, bn: str = "eval") -> GradSum:
    """Summed gradient of the contrastive loss of one validation batch, with its row count.

    Pairs (``targets=None``): the loss is ``sum_i CE(row_i, e_i)`` averaged over ``directions``, so
    ``GradSum.direction()`` is ``-grad`` of CLIP's mean loss. Class prompts: ``texts`` are the prompts
    and ``targets`` the ``(B, C)`` probabilities; only image→text rows exist.
    """
    net = unwrap_model(model)
    if not params:
        raise ConfigurationError("no trainable parameters to differentiate",
                                 "make sure the encoders have parameters with requires_grad=True")
    with torch.enable_grad(), scoring_mode(net, bn):
        s = net(images, texts)
        if targets is None:
            check_similarity(s, square=True, what="validation similarity logits")
            loss = _row_losses_sum(s, directions, None)
        else:
            check_similarity(s, square=False, what="validation similarity logits")
            loss = _row_losses_sum(s, ("image_to_text",), targets.float())
        sums = grad_sums(loss, params)
    return GradSum(sums, int(s.shape[0]), float(loss.detach()))


# ---------------------------------------------------------------------------------------------- targets and loss
def contrastive_targets(scores: torch.Tensor, beta: float = 1.0, tau: float = 1.0, *, gumbel: bool = True,
                        generator: Optional[torch.Generator] = None, weighting: str = "hard",
                        weight_tau: float = 1.0, prior: str = "linear", normalize: Optional[str] = None,
                        threshold: float = 0.0, renormalize_weights: bool = True
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAflex weights ``(B,)`` and soft targets ``(B, B)`` for one direction of a batch of pairs.

    ``scores`` is ``g`` of that direction (square: row ``i`` = anchor ``i``, column ``c`` = candidate
    ``c``, positive pair on the diagonal). The upstream target is the identity pairing, so this is
    :func:`augplug.methods.saflex_targets` with ``targets = I``: weight ``1[g_ii >= 0]`` and soft
    target ``softmax((g_i + beta e_i + G)/tau)`` with the paper's defaults.
    """
    check_similarity(scores, square=True, what="contrastive scores")
    eye = torch.eye(scores.shape[0], device=scores.device)
    return saflex_targets(scores, eye, beta, tau, gumbel=gumbel, generator=generator, weighting=weighting,
                          weight_tau=weight_tau, prior=prior, normalize=normalize,
                          renormalize_weights=renormalize_weights, threshold=threshold)


def clip_loss(similarity: torch.Tensor, *, weights: Optional[Dict[str, torch.Tensor]] = None,
              soft_targets: Optional[Dict[str, torch.Tensor]] = None,
              directions: Sequence[str] = DIRECTIONS) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss on ``(B, B)`` similarity logits, optionally refined.

    ``weights`` / ``soft_targets`` map a direction to per-row weights ``(B,)`` and targets ``(B, B)``
    (constants; missing entries: weight 1, identity target). The loss is the mean over ``directions``
    of ``sum_i w_i CE(row_i, y'_i) / B``.
    """
    directions = _check_directions(directions)
    check_similarity(similarity, square=True)
    b = similarity.shape[0]
    total = 0.0
    for d in directions:
        lp = _log_probs(similarity, d)
        y = (soft_targets or {}).get(d)
        y = torch.eye(b, device=lp.device) if y is None else y.detach().float()
        if y.shape != (b, b):
            raise ShapeError(f"soft targets for {d} have shape {tuple(y.shape)}, expected {(b, b)}",
                             "pass one target row over the B candidates per anchor")
        per = -(y * lp).sum(-1)
        w = (weights or {}).get(d)
        if w is not None:
            if w.shape != (b,):
                raise ShapeError(f"weights for {d} have shape {tuple(w.shape)}, expected {(b,)}", "pass one weight per row")
            per = per * w.detach().float()
        total = total + per.sum() / b
    return total / len(directions)


def _prompt_input(class_prompts, text_encoder: nn.Module):
    """The class prompts as the text encoder takes them: integer ids for :class:`ClassEmbeddings` and
    ``nn.Embedding`` (a list converted, float or bool ids refused, the range checked); a list of ints
    as a tensor for other encoders; any other input unchanged."""
    encoder = unwrap_model(text_encoder)
    if isinstance(encoder, ClassEmbeddings):
        return encoder.check_ids(class_prompts)
    if isinstance(encoder, nn.Embedding):
        return _checked_ids(class_prompts, encoder.num_embeddings, "embeddings", "the nn.Embedding")
    if isinstance(class_prompts, (list, tuple)) and class_prompts and \
            all(isinstance(i, int) and not isinstance(i, bool) for i in class_prompts):
        return torch.tensor(class_prompts, dtype=torch.long)
    return class_prompts


def _prompt_count(class_prompts) -> Optional[int]:
    """The number of class prompts, known before any forward: the rows of a tensor or of a mapping's
    tensors, the length of a list of texts or ids; None for a list or tuple holding tensors (one per
    prompt, or the fields of a batch: ambiguous) and other inputs, whose labels are then checked
    against the similarities after the forward."""
    if isinstance(class_prompts, (list, tuple)) and \
            any(torch.is_tensor(p) or isinstance(p, (Mapping, list, tuple)) for p in class_prompts):
        return None
    return _rows(class_prompts, "class_prompts")


# ---------------------------------------------------------------------------------------------- refiner
class ContrastiveRefiner(RefinerCore):
    """SAflex (or L2RW / no refinement) for contrastive training of two encoders, in two lines.

    Pairs (CLIP-style)::

        refiner = ContrastiveRefiner(image_encoder, text_encoder, optimizer, val_loader)
        loss = refiner(images, texts)          # runs both encoders, returns the refined CLIP loss

    ``val_loader`` yields clean ``(images, texts)`` pairs. Class prompts (FLYP-style)::

        refiner = ContrastiveRefiner(image_encoder, text_encoder, optimizer, val_loader,
                                     class_prompts=prompts)   # text_encoder(prompts) -> (C, D)
        loss = refiner(images, labels)         # labels (B,) or probabilities (B, C)

    ``val_loader`` then yields clean ``(images, labels)``. The refiner runs the training forward itself
    (both encoders in train mode, so it is the user's forward), then, once the warm-up is over, scores
    the augmented rows by forward-mode AD through both encoders (dropout off, BatchNorm in ``bn_mode``,
    running statistics untouched) and applies the policy per direction. Augmented rows are marked with
    ``num_original=n`` (the first ``n`` pairs are originals) or ``augmented=mask``; by default every row
    is augmented. A pair's augmentation marks both its rows (image ``i`` → texts, text ``i`` → images).

    Args:
        image_encoder, text_encoder: ``(N, ...) -> (N, D)`` modules (may be the same module).
        optimizer: its post-step hook counts updates (refresh schedule, warm-up); ``None``: every call.
        val_loader: clean validation batches (see above), cycled forever.
        method: ``"saflex"``, ``"l2rw"``, ``"none"`` or a :class:`~augplug.methods.Policy` (its
            ``__call__(scores, targets, generator)`` is used with the identity / label targets).
        class_prompts: the text encoder's input for the ``C`` class prompts (FLYP-style), or None (pairs);
            the text encoder returns one embedding per prompt. For :class:`ClassEmbeddings` (or an
            ``nn.Embedding``) 1-D integer ids: float or bool ids are refused (:class:`TargetError`);
            a list of ints is converted to a tensor. Their number (rows of a tensor or of a dict's
            tensors, length of a list of texts) is known before any forward, so a call's targets are
            checked before the encoders run.
        logit_scale, normalize_features: see :class:`DualEncoder`.
        directions: for pairs, which readings of ``S`` are trained and refined (default both, as CLIP).
        score_params: ``"all"`` trainable parameters of both encoders (and a learnable logit scale), or a
            list of their names in :class:`DualEncoder` (``image.*``, ``text.*``, ``logit_scale``):
            the parameters ``v`` and ``g`` are taken over.
        method_options: options of the method named by ``method``. By name, ``"saflex"`` and
            ``"l2rw"`` mix the rows as the paper does here (``weight_norm="augmented"``,
            ``aug_weight=1.0``, ``strength=1.0``, so SAflex's ``weighting="auto"`` weighs each pair:
            the contrastive results were measured so) unless
            ``method_options`` say otherwise; a policy instance keeps its own options, with
            ``weight_norm="auto"`` read as ``"augmented"`` (a row's targets are candidates of the
            batch, not classes, so there is no class normalization). ``aug_weight="adaptive"`` (or
            an :class:`~augplug.share.AdaptiveShare`) learns the augmented pairs' share as the core
            refiner does, with the ``"upstream"`` signal (``"adaptive"`` here builds
            ``AdaptiveShare(signal="upstream")``; the direction signal is not measured on
            similarities); it needs originals in the batch, scores them too (one more forward-mode
            row each) and pools both CLIP directions. ``strength``: a number in [0, 1] or
            ``"auto"`` (refine only batches that hold originals), as in the core refiner.
        bn_mode, schedule, orig_weight, seed, check_train_mode: as in :class:`~augplug.AugmentationRefiner`.
    """

    #: The options a method named here gets unless ``method_options`` set them.
    PRESETS = {"saflex": dict(weight_norm="augmented", aug_weight=1.0, strength=1.0)}

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optimizer=None, val_loader=None,
                 method: Union[str, Policy] = "saflex", *, method_options: Optional[Dict[str, Any]] = None,
                 class_prompts=None, logit_scale: Union[float, nn.Parameter] = math.log(1 / 0.07),
                 normalize_features: bool = True, directions: Sequence[str] = DIRECTIONS,
                 score_params: Union[str, Sequence[str]] = "all", bn_mode: str = DEFAULTS["bn_mode"],
                 schedule: Union[None, Schedule, Dict[str, Any]] = None, orig_weight: float = DEFAULTS["orig_weight"],
                 seed: int = 0, check_train_mode: bool = True, **moved: Any):
        reject_moved_options(moved, type(self).__name__)
        self.directions = _check_directions(directions)
        schedule = resolve_schedule(schedule)
        self.policy = build_policy(
            method, method_options, allowed=("saflex", "none", "l2rw"), presets=self.PRESETS,
            unknown=(f"unknown method {method!r} for contrastive refinement",
                     "use 'saflex', 'l2rw', 'none' or a Policy whose __call__ maps scores to targets"))
        aug_weight, self.share = resolve_share(self.policy.aug_weight, signal="upstream")
        if self.share is not None and self.share.needs_probs:
            raise ConfigurationError("the contrastive refiner's share has no 'direction' signal (measured for "
                                     "classification refiners only)",
                                     "use aug_weight='adaptive' (the upstream signal here), AdaptiveShare(signal='upstream') or 'refined'")
        weight_norm = "augmented" if self.policy.weight_norm == "auto" else self.policy.weight_norm
        check_shell_options(bn_mode, weight_norm, orig_weight, aug_weight,
                            weight_norms=("augmented", "batch", "none"),
                            why="a row's targets are candidates of the batch, not classes, so there is no "
                                "class normalization")
        self.fixed_strength, strength = resolve_strength(self.policy.strength)
        if strength is not None:
            raise ConfigurationError("the contrastive refiner has no adaptive refinement strength",
                                     "set the method's strength to a number in [0, 1] or 'auto'")
        if (self.fixed_strength is None or self.fixed_strength != 1.0) and not self.policy.needs_scores:
            raise ConfigurationError(f"a refinement strength other than 1 needs a policy that scores rows; "
                                     f"{self.policy.name!r} does not", "use strength=1.0")
        self.method = self.policy.name
        if self.share is not None and not self.policy.needs_scores:
            raise ConfigurationError(f"aug_weight='adaptive' needs a policy that scores the rows; "
                                     f"{self.policy.name!r} does not",
                                     "use method='saflex' or 'l2rw', or a fixed aug_weight")
        self.model = DualEncoder(image_encoder, text_encoder, logit_scale, normalize_features)
        self.prompt_mode = class_prompts is not None
        self.class_prompts = _prompt_input(class_prompts, text_encoder) if self.prompt_mode else None
        # the number of class prompts (the text encoder returns one embedding each), known before any
        # forward, so that a call's labels are checked before the encoders run (None: not countable,
        # checked against the similarities after the forward)
        self._num_prompts = _prompt_count(self.class_prompts) if self.prompt_mode else None
        if self._num_prompts is not None and self._num_prompts < 2:
            raise ShapeError(f"class_prompts hold {self._num_prompts} prompt(s); a C-way classification needs at "
                             "least 2", "pass one prompt per class, e.g. class_prompts=torch.arange(num_classes)")
        if self.prompt_mode:
            if self.directions != ("image_to_text",) and tuple(DIRECTIONS) != self.directions:
                raise ConfigurationError(
                    f"with class_prompts= each image is scored against the class prompts only "
                    f"('image_to_text'), but directions={tuple(directions)!r} was asked for",
                    "drop directions= (class prompts train 'image_to_text'), or train pairs without class_prompts=")
            self.directions = ("image_to_text",)
        named = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if isinstance(score_params, str) and score_params != "all":
            raise ConfigurationError(f"score_params must be 'all' or a list of parameter names, got the string "
                                     f"{score_params!r}", f"pass a list: score_params=[{score_params!r}]")
        if score_params != "all":
            missing = [n for n in score_params if n not in named]
            if missing:
                raise ConfigurationError(f"score_params names {missing[:3]} that are not trainable parameters",
                                         f"use names from {sorted(named)[:6]}...")
        self.score_params = score_params
        self.bn_mode = bn_mode
        self.orig_weight, self.weight_norm = float(orig_weight), weight_norm
        # the augmented rows' share: a float, or (adaptive) a 0-dim tensor updated on the encoders' device
        if self.share is not None:
            self.share.to(self._device())
        self.aug_weight = self.share.value if self.share is not None else float(aug_weight)
        self.check_train_mode = check_train_mode
        # Schedule(budget="auto") is the exact schedule here: the contrastive refiner's quality under a
        # budget was not measured (an explicit budget= applies)
        self._init_core(optimizer, val_loader, schedule, seed=seed, needs_validation=self.policy.needs_scores,
                        auto_budget=None)
        self.stats: Dict[str, Any] = {}
        if self.share is not None:
            self.share.bind(self)
        self._warn_about_unstepped(optimizer)

    # ------------------------------------------------------------------ helpers
    def set_optimizer(self, optimizer) -> None:
        super().set_optimizer(optimizer)
        self._warn_about_unstepped(optimizer)

    set_optimizer.__doc__ = (RefinerCore.set_optimizer.__doc__ or "") + """
        Warns as the constructor does when the new optimizer does not step a scored parameter."""

    def _warn_about_unstepped(self, optimizer) -> None:
        """Scores measure what a step on the scored parameters does: warn (at construction and at
        :meth:`set_optimizer`) about scored parameters the optimizer never steps (not held, or held
        only in groups with lr=0), e.g. trainable class embeddings or a learnable logit scale left out."""
        if optimizer is None or not self.policy.needs_scores:
            return
        groups = getattr(unwrap_optimizer(optimizer), "param_groups", None)
        if groups is None:
            return
        held = {id(p) for g in groups for p in g.get("params", [])}
        moving = {id(p) for g in groups if _group_lr(g) != 0 for p in g.get("params", [])}
        scored = self._params()
        for names, how in (([n for n, p in scored.items() if id(p) not in held], "does not hold"),
                           ([n for n, p in scored.items() if id(p) in held and id(p) not in moving],
                            "holds only in groups with lr=0")):
            if names:
                shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                _warn_at_caller(
                    f"the optimizer {how} {len(names)} scored parameter(s) ({shown}): they enter "
                    "the validation direction v and the scores g, but the optimizer never moves them, so the scores "
                    "measure a step it does not take. Add them to the optimizer, or leave them out of the scores "
                    "(score_params=[...] without them, or freeze them with requires_grad_(False))")

    def remove_hooks(self) -> None:
        """Detach the optimizer's step hook; later calls raise a
        :class:`~augplug.errors.ConfigurationError` (build a new refiner, and load this one's
        :meth:`state_dict` into it to go on)."""
        self._remove_step_hook()
        self._hooks_removed = True

    def _params(self) -> Dict[str, nn.Parameter]:
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.score_params != "all":
            named = {n: named[n] for n in self.score_params}
        return named

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _to_device(self, x):
        return to_device(x, self._device())

    def _prompts(self):
        return self._to_device(self.class_prompts)

    def _prepare_val_batch(self, x, t, num_classes: Optional[int]):
        """One validation batch on the encoders' device, checked: class prompts give ``(images, (B, C)
        soft targets)`` (labels checked where they are, then copied); pairs give ``(images, texts)``
        with as many texts as images."""
        x = self._to_device(x)
        if self.prompt_mode:
            return x, self._to_device(to_soft_targets(t, num_classes, what="validation targets"))
        t = self._to_device(t)
        images, texts = _rows(x, "a validation image batch"), _rows(t, "a validation text batch")
        if images != texts:
            raise ShapeError(f"a validation batch holds {images} images and {texts} texts",
                             "make the validation loader yield (images, texts) pairs")
        return x, t

    def compute_validation_direction(self, num_classes: Optional[int] = None) -> GradSum:
        """Sum the validation contrastive-loss gradient over one refresh's batches (advances the
        stream; non-finite batches are skipped or rejected as ``bad_val_batch`` says)."""
        params = self._params()

        def gradient(x, t):
            if self.prompt_mode:
                return contrastive_validation_gradient(self.model, x, self._prompts(), params, targets=t,
                                                       bn=self.bn_mode)
            return contrastive_validation_gradient(self.model, x, t, params, directions=self.directions,
                                                   bn=self.bn_mode)

        return self._validation_sum(lambda x, t: self._prepare_val_batch(x, t, num_classes), gradient,
                                    lambda t: t.shape[0] if self.prompt_mode else (_rows(t) or 0))

    def _direction_shapes(self) -> Dict[str, torch.Size]:
        return {n: p.shape for n, p in self._params().items()}

    # ------------------------------------------------------------------ the loss
    def _checked_call(self, images, texts_or_targets, num_original, augmented):
        """Check the call's inputs, run both encoders and check the similarities; a typed error names
        the first problem. Returns ``(batch, augmented mask, similarities, soft targets by direction)``."""
        self._check_can_train()
        if self.check_train_mode and not (self.model.image_encoder.training and self.model.text_encoder.training):
            raise ModelModeError("the refiner was called with the encoders in eval mode",
                                 "call .train() on the encoders before training steps, or pass check_train_mode=False")
        # everything that can be checked without the encoders is checked before they run: their
        # training forward moves BatchNorm's running statistics and draws dropout masks
        batch = _rows(images, "the image batch")
        if not batch:
            raise ShapeError(f"the image batch is empty or its rows cannot be counted ({type(images).__name__})",
                             "pass a (B, ...) tensor with B >= 1, or a dict of (B, ...) tensors")
        _check_inputs(images, "images")
        if not self.prompt_mode:
            texts = _rows(texts_or_targets, "the text batch")
            if texts != batch:
                raise ShapeError(f"the batch holds {batch} images but "
                                 f"{texts if texts is not None else 'an uncountable number of'} texts "
                                 f"({type(texts_or_targets).__name__})",
                                 "pass one text per image (pair i = images[i], texts[i]): a (B, ...) tensor, a dict "
                                 "of (B, ...) tensors (a tokenizer's output) or a list of B texts")
            _check_inputs(texts_or_targets, "texts")
            if batch < 2:
                raise ShapeError("a contrastive batch needs at least 2 pairs", "use a larger batch")
        aug = augmented_rows(batch, num_original, augmented, self._device(), unit="pairs")[0]
        labels = None
        if self.prompt_mode and self._num_prompts is not None:
            labels = to_soft_targets(texts_or_targets, self._num_prompts, batch_size=batch)
        s = self.model(images, self._prompts() if self.prompt_mode else texts_or_targets)
        check_similarity(s, square=not self.prompt_mode)
        if self.prompt_mode:
            if labels is None:   # prompts that cannot be counted: checked against the similarities
                labels = to_soft_targets(texts_or_targets, s.shape[1], batch_size=batch)
            elif s.shape[1] != self._num_prompts:
                raise ShapeError(f"the text encoder returned {s.shape[1]} embeddings for the {self._num_prompts} "
                                 "class prompts", "make the text encoder return one embedding per class prompt "
                                 "(a (C, D) tensor for C prompts), or pass class_prompts with one row per class")
            ys = {"image_to_text": labels.to(s.device)}
        else:
            ys = {d: torch.eye(batch, device=s.device) for d in self.directions}
        return batch, aug, s, ys

    def __call__(self, images, texts_or_targets, *, num_original: int = 0,
                 augmented: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run both encoders on the batch and return the refined contrastive loss (a scalar).

        Args:
            images: the image batch (any input the image encoder takes), ``B`` rows: a ``(B, ...)``
                tensor, a dict (any mapping) of ``(B, ...)`` tensors, or a list of ``B`` items.
            texts_or_targets: pairs: the ``B`` texts (text-encoder input, counted as the images are,
                e.g. a tokenizer's ``{"input_ids", "attention_mask"}``); class prompts: the targets,
                class indices ``(B,)`` or probabilities ``(B, C)``.
            num_original / augmented: which pairs are originals (trained on as given) and which are
                augmented (refined).

        A call refused for its inputs (a typed error) changes nothing: the error is raised before the
        encoders run (their training forward would move BatchNorm's running statistics and draw
        dropout masks). What only the forward shows (non-finite similarities, embeddings of the wrong
        shape) is refused after it, with the refiner's state unchanged.
        """
        started = self._budget_begin()
        distributed = dist_world_size() > 1
        try:
            batch, aug, s, ys = self._checked_call(images, texts_or_targets, num_original, augmented)
        except AugplugError:
            if distributed:  # the other processes must reject this step too
                self._group_rejects(torch.ones((), dtype=torch.float64))
            raise
        if distributed:
            self._raise_for_peers(self._group_rejects(torch.zeros((), dtype=torch.float64)))

        distributed = dist_world_size() > 1
        n_aug = int(aug.sum())
        active = self.step_count >= self.warmup_steps
        used_strength = self.fixed_strength
        if used_strength is None:  # "auto": refine only beside originals (of the global batch)
            used_strength = 1.0 if self._global_count(batch - n_aug) > 0 else 0.0
            active = active and used_strength > 0
        # the adaptive share compares the augmented rows' agreement with the originals': score both.
        # In a process group every process takes part in the collectives (refresh, the policy's and
        # the share's batch statistics, the weights' normalization), whatever its rows.
        share_on = self.share is not None and active and (distributed or 0 < n_aug < batch)
        refine = active or not self.policy.needs_scores
        stats = None
        prior_share, early = self._begin_share()   # the share this call uses
        used_share = self.aug_weight
        v_new = None
        snapshot = self._snapshot()
        try:
            weights = {d: torch.ones(batch, device=s.device) for d in self.directions}
            soft = {d: ys[d].clone() for d in self.directions}
            scores = {d: torch.zeros_like(ys[d]) for d in self.directions}
            refreshed = False
            if refine and (n_aug or distributed):
                g_all = None
                if self.policy.needs_scores:
                    refreshed = self.direction_is_due()
                    if refreshed:
                        v_new = self.compute_validation_direction(s.shape[1])
                        v = v_new.direction()
                    else:
                        v = self.validation_direction
                    g_all = self._scores(images, texts_or_targets, v, aug, batch, score_all=share_on)
                gen = self.noise_generator()
                for d in self.directions:
                    g = g_all[d][aug] if g_all is not None else None
                    w, y2 = self.policy(g, ys[d][aug], gen)
                    weights[d][aug] = w.to(weights[d]).detach()
                    soft[d][aug] = y2.to(soft[d]).detach()
                    if g is not None:
                        scores[d][aug] = g
                    if used_strength != 1.0:
                        weights[d], soft[d] = apply_strength(weights[d], soft[d], ys[d], aug, used_strength)
                if share_on:
                    stats = self._share_statistics(g_all, ys, weights, soft, aug, distributed)
            share_state = self._gather_share(early, stats, self.step_count)
            denoms = self._normalize(weights, aug, n_aug, batch)
        except BaseException:
            self.aug_weight = prior_share
            self._restore(snapshot)
            raise

        loss = 0.0
        for d in self.directions:
            per = soft_cross_entropy(_log_probs(s, d), soft[d])
            coef = torch.where(aug, self.aug_weight * weights[d], torch.full_like(weights[d], self.orig_weight))
            loss = loss + (coef * per).sum() / denoms[d]
        loss = loss / len(self.directions)

        # commit
        self._commit_share(share_state)
        self._commit_direction(v_new)
        self._count_call()
        self.stats = self._summarise(s, weights, soft, scores, ys, aug, active and n_aug > 0, refreshed, used_share,
                                     used_strength)
        self._budget_end(started)
        return loss

    def _scores(self, images, texts_or_targets, v, aug, batch: int, score_all: bool) -> Dict[str, torch.Tensor]:
        """Scores of every row of each direction (rows not scored stay 0)."""
        subset = (_take_rows(images, aug) if self.prompt_mode and not score_all and self.bn_mode != "train"
                  else None)
        if subset is not None:
            # rows are independent given the prompts (scoring runs BatchNorm on its running
            # statistics): score the augmented rows only. With bn_mode="train" every row is scored, so
            # that BatchNorm normalizes with the training batch's statistics (and a single augmented
            # row is no batch of one), and the rows needed are kept.
            g_aug = contrastive_scores(self.model, subset, self._prompts(), v, directions=self.directions,
                                       bn=self.bn_mode)
            return {d: g.new_zeros(batch, g.shape[1]).index_put_((aug.nonzero().flatten(),), g)
                    for d, g in g_aug.items()}
        return contrastive_scores(self.model, images, self._prompts() if self.prompt_mode else texts_or_targets, v,
                                  directions=self.directions, bn=self.bn_mode)

    def _normalize(self, weights: Dict[str, torch.Tensor], aug, n_aug: int, batch: int) -> Dict[str, Any]:
        """Normalize the augmented rows' weights (in place) and return each direction's loss
        denominator, over the global batch of all processes: each process returns
        ``denominator_global / world``, so data-parallel gradient averaging yields the loss of one
        process holding the whole global batch."""
        world = dist_world_size()
        renorm = self.weight_norm == "augmented" and self.policy.needs_scores
        if world == 1:
            out = {}
            for d in self.directions:
                if renorm and n_aug:
                    weights[d][aug] = renormalize(weights[d][aug])
                if self.weight_norm == "batch":
                    coef = torch.where(aug, self.aug_weight * weights[d], torch.full_like(weights[d], self.orig_weight))
                    out[d] = coef.sum().clamp_min(1e-12)
                else:
                    out[d] = self._loss_denominator(n_aug, batch - n_aug, 1)
            return out
        # one all-reduce: per direction the augmented rows' weight sum, then the counts
        sums = [weights[d][aug].sum() if n_aug else torch.zeros((), device=aug.device) for d in self.directions]
        w_sums, n_all, n_orig_all = self._global_weight_sums(sums, n_aug, batch, aug.device)
        out = {}
        for d, w_sum in zip(self.directions, w_sums):
            if renorm:
                if n_aug:
                    weights[d][aug] = weights[d][aug] * (n_all / w_sum) if w_sum > 0 else 0.0
                w_sum = n_all if w_sum > 0 else 0.0
            out[d] = self._loss_denominator(w_sum if self.weight_norm == "batch" else n_all, n_orig_all, world)
        return out

    def _share_statistics(self, g_all, ys, weights, soft, aug, distributed: bool = False) -> torch.Tensor:
        """The adaptive share's statistics of this batch's scores (every row scored), pooled over the
        trained directions (:meth:`AdaptiveShare.gather` sums them over an update's calls):
        agreements ``y^T g`` of the augmented rows (upstream targets, weight 1, for
        ``signal="upstream"``; the policy's targets and weights for ``"refined"``) against the
        originals' (their targets)."""
        stats = sum(self.share.batch_statistics(ys[d], g_all[d], soft[d], weights[d], aug,
                                                self.share.agreement(ys[d][~aug], g_all[d][~aug]),
                                                distributed=distributed)
                    for d in self.directions)
        return stats

    def _summarise(self, s, weights, soft, scores, ys, aug, active, refreshed, aug_weight, strength) -> Dict[str, Any]:
        d0 = self.directions[0]
        n = max(int(aug.sum()), 1)
        out: Dict[str, Any] = {
            "logits": s.detach(),
            "augmented": aug.detach(),
            "weights": weights[d0].detach(),
            "soft_targets": soft[d0].detach(),
            "scores": scores[d0].detach(),
            "directions": {d: {"weights": weights[d].detach(), "soft_targets": soft[d].detach(),
                               "scores": scores[d].detach()} for d in self.directions},
            "active": bool(active),
            "refreshed": bool(refreshed),
            "step": self.step_count,
            "skipped_val_batches": self.skipped_val_batches,
            "val_loss": self._val_loss,
            "aug_weight": float(aug_weight),
            "strength": float(strength),
            **self._schedule_stats(),
        }
        wa = weights[d0][aug]
        out["weight_mean"] = float(wa.mean()) if wa.numel() else float("nan")
        out["kept_fraction"] = float((wa > 0).float().sum() / n)
        out["relabel_rate"] = float((soft[d0][aug].argmax(-1) != ys[d0][aug].argmax(-1)).float().sum() / n)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume bit-for-bit (with the encoders' and optimizer's own state)."""
        state = self._core_state()
        state["share"] = self.share.state_dict() if self.share is not None else None
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the whole state is checked first (a rejected one changes nothing)."""
        self.check_state_dict(state)
        self._load_core_state(state)
        if self.share is not None:
            self._load_share(state["share"])

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise the error :meth:`load_state_dict` would raise for ``state``, and change nothing."""
        self._check_core_state(state)
        check_part_presence(state, "share", self.share is not None, "an adaptive share (aug_weight='adaptive')")
        if self.share is not None:
            self.share.check_state(state["share"])

    def __repr__(self) -> str:
        return (f"ContrastiveRefiner(method={self.policy!r}, prompts={self.prompt_mode}, directions={self.directions}, "
                f"bn_mode={self.bn_mode!r}, schedule={self.schedule!r}"
                + (f", aug_weight={self.share!r}" if self.share is not None else f", aug_weight={self.aug_weight}") + ")")
