"""The stateless core, for users who drive their own loop: scores, policies, targets, losses."""
from typing import Dict, Optional

import torch
from torch import nn

from . import scores as _scores
from .contrastive import clip_loss, contrastive_scores, contrastive_targets
from .errors import ConfigurationError, ShapeError, TargetError
from .heads import output_logits, unwrap_model
from .isda import isda_logits, isda_per_sample_loss
from .methods.l2rw import l2rw_weights
from .methods.saflex import normalize_scores, saflex_targets
from .scores import (GradSum, class_scores, double_backward_scores, full_scores, last_layer_scores,
                     scoring_mode)
from .tabular import tabular_cutmix
from .targets import _describe, soft_cross_entropy, to_soft_targets, weighted_soft_ce

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
    closed form). A :class:`~augplug.errors.TargetError`, :class:`~augplug.errors.ShapeError` or
    :class:`~augplug.errors.ConfigurationError` names the first problem; nothing is changed.
    """
    if head is None and params is None:
        raise ConfigurationError(
            "validation_gradient needs params= (the parameters to differentiate) or head= with head_name= "
            "(the final linear layer, in closed form); neither was given",
            "pass params={n: p for n, p in model.named_parameters() if p.requires_grad}, or "
            "head=model.fc, head_name='fc'")
    if head is not None and not isinstance(head_name, str):
        raise ConfigurationError(f"head= needs head_name= (the prefix of the gradient's keys), got {head_name!r}",
                                 "pass the head's name in the model, e.g. head=model.fc, head_name='fc'")
    if not (isinstance(targets, torch.Tensor) and targets.dim() == 2 and targets.is_floating_point()):
        # the functional API takes probabilities, as check_soft_pair (saflex_targets, l2rw_weights) does
        raise TargetError(f"validation_gradient's targets must be (B, C) floating probabilities, got "
                          f"{_describe(targets)}",
                          "convert class indices with augplug.functional.to_soft_targets(labels, num_classes)")
    try:
        to_soft_targets(targets, targets.shape[1], what="validation_gradient's targets")  # probabilities, finite
    except TargetError as e:
        raise TargetError(e.problem, "apply softmax to logits-like targets; convert class indices with "
                          "augplug.functional.to_soft_targets(labels, num_classes)") from None

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

    handle = unwrap_model(model).register_forward_hook(check_output)
    try:
        return _scores.validation_gradient(model, inputs, targets, params=params, head=head, head_name=head_name,
                                           bn=bn, halves=halves)
    finally:
        handle.remove()
