"""The stateless core, for users who drive their own loop: scores, policies, targets, losses.

The forms here check their arguments' values too (targets are probabilities, scores are finite: one
host read a call); the refiner calls the unchecked ones in :mod:`augplug.methods` and
:mod:`augplug.targets`, whose checks look at types and shapes only.
"""
import functools
from collections.abc import Mapping
from typing import Dict, Optional

import torch
from torch import nn

from . import scores as _scores
from . import targets as _targets
from .contrastive import clip_loss, contrastive_scores, contrastive_targets
from .errors import ConfigurationError, NonFiniteError, ShapeError, TargetError
from .heads import _check_linear, check_closed_form_head, output_logits, same_tensor, unwrap_model
from .isda import isda_logits, isda_per_sample_loss
from .methods import l2rw as _l2rw
from .methods import saflex as _saflex
from .methods.saflex import normalize_scores
from .scores import (GradSum, class_scores, double_backward_scores, full_scores, last_layer_scores,
                     scoring_mode)
from .tabular import tabular_cutmix
from .targets import _describe, check_soft_pair, to_soft_targets, value_problems

__all__ = ["class_scores", "full_scores", "last_layer_scores", "double_backward_scores", "validation_gradient",
           "scoring_mode", "saflex_targets", "normalize_scores", "l2rw_weights", "soft_cross_entropy",
           "to_soft_targets", "weighted_soft_ce", "isda_logits", "isda_per_sample_loss", "contrastive_scores",
           "contrastive_targets", "clip_loss", "tabular_cutmix"]


def validation_gradient(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    params: Optional[Dict[str, nn.Parameter]] = None,
    head: Optional[nn.Linear] = None,
    head_name: Optional[str] = None,
    bn: str = "eval",
    halves: bool = False,
) -> GradSum:
    """Summed cross-entropy gradient of one validation batch (:func:`augplug.scores.validation_gradient`),
    with its arguments checked first.

    ``targets``: ``(B, C)`` probabilities, one row per input and one column per class of the model's
    output (class indices: :func:`to_soft_targets` first). Pass either ``params`` (name -> trainable
    parameter, differentiated by autograd) or ``head`` with ``head_name`` (the final ``nn.Linear``, in
    closed form). ``params`` must be parameters of ``model`` itself (not of a copy or an EMA model),
    keyed by their names in it and trainable; ``head`` a submodule of ``model`` named ``head_name``,
    whose output is the logits the model returns. A :class:`~augplug.errors.TargetError`,
    :class:`~augplug.errors.ShapeError`, :class:`~augplug.errors.ConfigurationError` or
    :class:`~augplug.errors.UnsupportedHeadError` (a head that is not an ``nn.Linear``) names the
    first problem; nothing is changed.
    """
    net = unwrap_model(model)
    if params is not None:
        _check_params(net, params)
    if head is None and params is None:
        raise ConfigurationError(
            "validation_gradient needs params= (the parameters to differentiate) or head= with head_name= "
            "(the final linear layer, in closed form); neither was given",
            "pass params={n: p for n, p in model.named_parameters() if p.requires_grad}, or "
            "head=model.fc, head_name='fc'")
    if head is not None and not isinstance(head_name, str):
        raise ConfigurationError(f"head= needs head_name= (the prefix of the gradient's keys), got {head_name!r}",
                                 "pass the head's name in the model, e.g. head=model.fc, head_name='fc'")
    if head is not None:
        _check_head(net, head, head_name)
    if not (isinstance(targets, torch.Tensor) and targets.dim() == 2 and targets.is_floating_point()):
        # the functional API takes probabilities, as check_soft_pair (saflex_targets, l2rw_weights) does
        raise TargetError(f"validation_gradient's targets must be (B, C) floating probabilities, got "
                          f"{_describe(targets)}",
                          "convert class indices with augplug.functional.to_soft_targets(labels, num_classes)")
    _check_probabilities(targets, "validation_gradient's targets")  # probabilities, finite

    def check_output(module, args, output):
        try:
            logits = output_logits(output)
        except ShapeError:
            return None  # left to validation_gradient, which names it
        if logits.dim() != 2 or tuple(logits.shape) != tuple(targets.shape):
            raise ShapeError(f"validation_gradient's targets are {tuple(targets.shape)} but the model's output on "
                             f"the inputs is {tuple(logits.shape)}",
                             "pass (B, C) probabilities with one row per input and one column per class of the "
                             "model's output")
        return None

    head_outputs = []

    def check_head_output(module, args, output):
        """The logits must be what the head returned: the closed form differentiates them through it."""
        if not head_outputs:
            raise ConfigurationError(f"head= ({head_name!r}) was not called in the model's forward",
                                     "pass the final linear layer, the one that returns the logits")
        try:
            logits = output_logits(output)
        except ShapeError:
            return None
        # a head that ran more than once (deep supervision) passes where one of its calls gave the logits
        if any(z is logits or same_tensor(z, logits) for z in head_outputs):
            return None
        z = head_outputs[-1]
        if tuple(z.shape) != tuple(logits.shape) or not torch.allclose(z.to(logits.dtype), logits, rtol=1e-5,
                                                                       atol=1e-6, equal_nan=True):
            raise ConfigurationError(
                f"head= ({head_name!r}) returns {tuple(z.shape)} values that are not the model's logits "
                f"{tuple(logits.shape)}: the closed-form gradient would be that of another layer",
                "pass the final linear layer, whose output the model returns as its logits, or use params=")
        return None

    handles = [net.register_forward_hook(check_output)]
    if head is not None:
        handles.append(head.register_forward_hook(lambda m, a, o: head_outputs.append(o.detach())))
        handles.append(net.register_forward_hook(check_head_output))
    try:
        return _scores.validation_gradient(model, inputs, targets, params=params, head=head, head_name=head_name,
                                           bn=bn, halves=halves)
    finally:
        for handle in handles:
            handle.remove()


def _check_params(net: nn.Module, params) -> None:
    """A :class:`ConfigurationError` unless ``params`` maps names of ``net`` to those very parameters,
    each trainable (identity and flags only: no values read)."""
    fix = "pass params={n: p for n, p in model.named_parameters() if p.requires_grad} (of the model passed)"
    if not isinstance(params, Mapping):
        raise ConfigurationError(f"params= must be a dict name -> parameter of the model, got {type(params).__name__}",
                                 fix)
    named = dict(net.named_parameters(remove_duplicate=False))
    names_of = {}
    for n, p in named.items():
        names_of.setdefault(id(p), n)
    for k, p in params.items():
        if named.get(k) is p:
            continue
        if isinstance(p, torch.Tensor) and id(p) in names_of:
            raise ConfigurationError(f"params[{k!r}] is the model's parameter {names_of[id(p)]!r}, not {k!r}",
                                     "key each parameter by its name in the model: dict(model.named_parameters())")
        what = "not a parameter of this model" if k in named else f"{k!r} names no parameter of this model"
        raise ConfigurationError(
            f"params[{k!r}] is {what} (a copy's, an EMA model's or a detached tensor): its gradient would be 0",
            fix)
    frozen = [k for k, p in params.items() if not p.requires_grad]
    if frozen:
        raise ConfigurationError(f"params= holds frozen parameters (requires_grad=False): {frozen[:4]}",
                                 "leave them out: " + fix)


def _check_head(net: nn.Module, head, head_name: str) -> None:
    """A typed error unless ``head`` is an ``nn.Linear`` of ``net`` named ``head_name`` (no values read)."""
    if not isinstance(head, nn.Module):
        raise ConfigurationError(f"head= must be the model's final nn.Linear, got {type(head).__name__}",
                                 "pass the module, e.g. head=model.fc, head_name='fc'")
    names = [n for n, m in net.named_modules(remove_duplicate=False) if m is head]
    if not names:
        raise ConfigurationError("head= is not a submodule of the model passed (another model's, or a copy's)",
                                 "pass the final linear layer of this model, e.g. head=model.fc, head_name='fc'")
    if head_name not in names:
        raise ConfigurationError(f"head_name={head_name!r} does not name head= in the model: it is {names[0]!r}",
                                 f"pass head_name={names[0]!r} (the gradient's keys are the head's parameter names)")
    _check_linear(head_name, head)
    check_closed_form_head(head_name, head)


def _check_scores_and_targets(fn: str, scores: torch.Tensor, targets: torch.Tensor) -> None:
    """Types and shapes (:func:`~augplug.targets.check_soft_pair`), then the values with one host read:
    ``targets`` probabilities (:func:`to_soft_targets`'s check), ``scores`` finite."""
    check_soft_pair(scores, targets)
    if not bool(value_problems(scores, targets)):
        return
    _check_probabilities(targets, f"{fn}'s targets")
    bad = (~torch.isfinite(scores.detach())).any(1).nonzero().flatten().tolist()
    raise NonFiniteError(f"{fn}'s scores contain NaN/inf in {len(bad)} row(s) (rows {bad[:8]})",
                         "score finite inputs with a finite model and direction (check the validation gradient)")


@functools.wraps(_l2rw.l2rw_weights)
def l2rw_weights(scores: torch.Tensor, targets: torch.Tensor, *, distributed: bool = False) -> torch.Tensor:
    _check_scores_and_targets("l2rw_weights", scores, targets)
    return _l2rw.l2rw_weights(scores, targets, distributed=distributed)


@functools.wraps(_saflex.saflex_targets)
def saflex_targets(scores: torch.Tensor, targets: torch.Tensor, *args, **kwargs):
    _check_scores_and_targets("saflex_targets", scores, targets)
    return _saflex.saflex_targets(scores, targets, *args, **kwargs)


def _check_loss_targets(fn: str, logits: torch.Tensor, soft_targets: torch.Tensor) -> None:
    """Types and shapes, then ``soft_targets`` probabilities (one host read). The logits' values are
    not checked: a NaN/inf loss is how mixed-precision training notices an overflow."""
    check_soft_pair(logits, soft_targets, "soft_targets")
    _check_probabilities(soft_targets, f"{fn}'s soft_targets")


def _check_probabilities(targets: torch.Tensor, what: str) -> None:
    """:func:`to_soft_targets`' value check of (B, C) floating targets (one host read), its fix naming
    the functional API's conversion of class indices."""
    try:
        to_soft_targets(targets, targets.shape[1], what=what)
    except TargetError as e:
        raise TargetError(e.problem, "apply softmax to logits-like targets; convert class indices with "
                          "augplug.functional.to_soft_targets(labels, num_classes)") from None


@functools.wraps(_targets.soft_cross_entropy)
def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    _check_loss_targets("soft_cross_entropy", logits, soft_targets)
    return _targets.soft_cross_entropy(logits, soft_targets)


@functools.wraps(_targets.weighted_soft_ce)
def weighted_soft_ce(logits: torch.Tensor, soft_targets: torch.Tensor, weights: Optional[torch.Tensor] = None,
                     reduction: str = "mean") -> torch.Tensor:
    _check_loss_targets("weighted_soft_ce", logits, soft_targets)
    return _targets.weighted_soft_ce(logits, soft_targets, weights, reduction)
