"""``validate()``: every problem augplug would meet with a model, optimizer, validation loader and
batch, each with its fix, before training starts."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, List, Optional

import torch
from torch import nn

from .core import optimizer_problem
from .errors import AugplugError, EmptyValidationError, ModelModeError, ShapeError, TargetError, ValidationFailed
from .heads import find_classifier
from .rng import PrivateRNG
from .targets import check_logits, to_soft_targets
from .validation import ValidationStream, generator_states, set_generator_states

__all__ = ["validate"]


@contextmanager
def _rng_kept(loader):
    """Restore, on leaving, the global torch RNG and the loader's own ``generator`` (a shuffled
    DataLoader draws its order from one of them when iterated, its sampler's ``generator=`` included),
    so that a check leaves the training run's random streams as they were."""
    saved = generator_states(loader)
    with PrivateRNG():   # the global generator: a private state inside, the user's restored on exit
        try:
            yield
        finally:
            set_generator_states(loader, saved)


def validate(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    val_loader: Optional[Iterable] = None,
    *,
    mode: str = "last_layer",
    classifier=None,
    num_classes: Optional[int] = None,
    logits: Optional[torch.Tensor] = None,
    targets: Optional[torch.Tensor] = None,
    strict: bool = False,
) -> List[AugplugError]:
    """Check a model / optimizer / validation loader / batch for everything augplug needs.

    Returns the list of problems (empty when all is well); with ``strict=True`` raises
    :class:`ValidationFailed` holding all of them instead. Nothing is modified. Checks:

    - the model is in training mode;
    - in last-layer mode, the classifier head can be found and is an ``nn.Linear``;
    - the optimizer holds at least one of the model's trainable parameters;
    - the validation loader yields at least one sample, its targets are in range and agree with
      ``num_classes`` (taken from ``logits`` or the head when not given);
    - ``logits`` and ``targets`` (a training batch) have matching shapes, finite values, valid labels.

    Arguments of the wrong kind (a ``val_loader`` that cannot be iterated, ``logits`` that are not a
    tensor) are problems in the list too. An error the loader itself raises while its first batch is
    read (an ``OSError`` from a file) is the user's own and propagates unchanged.
    """
    problems: List[AugplugError] = []
    if not model.training:
        problems.append(ModelModeError(
            "the model is in eval mode",
            "call model.train() before training steps; augplug switches to eval itself where needed"))
    head = None
    if mode in ("last_layer", "auto"):
        try:
            _, head = find_classifier(model, classifier)
        except AugplugError as e:
            problems.append(e)
    if logits is not None and not torch.is_tensor(logits):
        problems.append(ShapeError(f"logits must be a torch.Tensor of shape (batch, classes), got "
                                   f"{type(logits).__name__}", "pass the model's output for a training batch"))
        logits = None
    if num_classes is None and logits is not None and logits.dim() == 2:
        num_classes = logits.shape[1]
    if num_classes is None and isinstance(head, nn.Linear):
        num_classes = head.out_features
    if optimizer is not None:
        try:
            problem = optimizer_problem(model.parameters(), optimizer)
            if problem is not None:
                problems.append(problem)
        except AugplugError as e:
            problems.append(e)
    if logits is not None:
        try:
            check_logits(logits)
            if targets is not None:
                to_soft_targets(targets, logits.shape[1], batch_size=logits.shape[0])
        except AugplugError as e:
            problems.append(e)
    if val_loader is not None:
        try:
            # the refiner's own stream: it refuses one-shot iterators before reading, and empty loaders
            with _rng_kept(val_loader):   # reading one batch draws the loader's shuffle: give it back
                _, y = ValidationStream(val_loader, PrivateRNG()).next()
            if not torch.is_tensor(y):
                raise TargetError(f"validation targets must be a torch.Tensor, got {type(y).__name__}",
                                  "make the validation loader yield tensors of class indices (B,) or probabilities "
                                  "(B, C), e.g. a DataLoader's default collate")
            if y.numel() == 0:
                raise EmptyValidationError(
                    "the validation loader's first batch is empty",
                    "pass a loader over at least one clean labelled sample")
            if num_classes is not None:
                to_soft_targets(y, num_classes, what="validation targets")
        except AugplugError as e:
            problems.append(e)
    if strict and problems:
        raise ValidationFailed(problems)
    return problems
