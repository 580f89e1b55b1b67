"""Find the classifier head of timm / torchvision / custom models and capture what flows through it.

The head is found, in order, from: a module or a dotted name the user passes; timm's
``get_classifier()``; the attributes ``fc``, ``classifier``, ``head`` (a Sequential's last Linear, or
``head.fc``); the last module of an ``nn.Sequential``; and, for a model that names no head (a wrapper
holding a timm or torchvision model, torchvision's ViT with its ``heads``), the one linear head its
submodules name that way. Last-layer scoring needs it to be an ``nn.Linear``; anything else
raises :class:`~augplug.errors.UnsupportedHeadError` naming the alternatives.
"""
from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from typing import Any, Deque, List, Optional, Tuple, Union

import torch
from torch import nn

from .errors import ShapeError, UnsupportedHeadError, UnsupportedModelError, warn_at_caller

__all__ = ["same_tensor", "in_backward", "reentrant_checkpoint", "NON_REENTRANT", "REENTRANT_FIX", "hidden_by_checkpoint", "unwrap_model", "is_compiled", "find_classifier", "check_closed_form_head", "tied_names", "output_logits", "ActivationCapture", "ForwardReplay", "GradientSlot"]


def _wrapper_chain(model: nn.Module):
    """``model``, then each module it wraps: DDP/DataParallel (``.module``), ``torch.compile``
    (``._orig_mod``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        yield model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Kept by hand rather than ``accelerate.utils.extract_model_from_parallel``: this runs on every
    refiner call, where accelerate's version (which also scans for compiled submodules and checks for
    DeepSpeed and FSDP) measured 170 µs a call against 1.6 µs here."""
    for model in _wrapper_chain(model):
        pass
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` wraps ``model`` (possibly inside DDP/DataParallel)."""
    return any(hasattr(m, "_orig_mod") for m in _wrapper_chain(model))


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise UnsupportedHeadError("the classifier module passed is not a submodule of the model",
                               "pass a module of this model, or its dotted name, as classifier=")


def _check_linear(name: str, head) -> None:
    if isinstance(head, nn.Linear):
        return
    if isinstance(head, (tuple, list)):
        raise UnsupportedHeadError(
            f"the model has {len(head)} classifier heads (a distilled model such as DeiT/LeViT-distilled), whose "
            f"outputs its forward combines (timm averages them in training too)",
            "use mode='full', which scores the logits as the model computes them; name one head with classifier= "
            "only where the logits passed are that head's output alone (timm: model.set_distilled_training(True), "
            "and the first of the outputs)")
    if isinstance(head, nn.Identity):
        raise UnsupportedHeadError(
            f"the classifier '{name}' is nn.Identity (the model was built with num_classes=0)",
            "build the model with its number of classes, or pass the real classifier module as classifier=")
    if isinstance(head, nn.Conv2d):
        raise UnsupportedHeadError(
            f"the classifier '{name}' is a Conv2d; last-layer mode needs an nn.Linear",
            "use mode='full' (forward-mode scores through the whole model), or replace the 1x1 conv by nn.Linear")
    if isinstance(head, nn.Sequential):
        inner = [(f"{name}.{n}" if name else n, m) for n, m in head.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d))]
        if inner and isinstance(inner[-1][1], nn.Conv2d):
            raise UnsupportedHeadError(
                f"the classifier '{name}' is a Sequential whose last classifying layer '{inner[-1][0]}' is a "
                f"Conv2d; last-layer mode needs an nn.Linear",
                "use mode='full' (forward-mode scores through the whole model)")
        if inner:
            raise UnsupportedHeadError(
                f"the classifier '{name}' is a Sequential with modules after its last nn.Linear '{inner[-1][0]}'; "
                f"last-layer mode needs the layer whose output is the logits",
                f"pass classifier='{inner[-1][0]}' if its output is the logits unchanged, else use mode='full'")
    raise UnsupportedHeadError(
        f"the classifier '{name}' is a {type(head).__name__}; last-layer mode needs an nn.Linear",
        "use mode='full', or pass the final nn.Linear as classifier=")


#: ``nn.Linear`` subclasses whose ``forward`` is known to compute ``F.linear(input, weight, bias)`` (by the
#: module and qualified name of the function): timm's ``Linear`` overrides it only to cast under TorchScript
_PLAIN_LINEAR_FORWARDS = {("timm.layers.linear", "Linear.forward"), ("timm.models.layers.linear", "Linear.forward")}


def _plain_forward(head: nn.Linear) -> bool:
    """Whether ``head``'s forward is ``nn.Linear.forward`` or one known to compute the same."""
    if "forward" in vars(head):   # a forward set on the instance
        return False
    fwd = type(head).forward
    return fwd is nn.Linear.forward or (getattr(fwd, "__module__", None), getattr(fwd, "__qualname__", None)) in \
        _PLAIN_LINEAR_FORWARDS


def check_closed_form_head(name: str, head: nn.Module) -> None:
    """Refuse a linear classifier whose output is not ``W a + b`` with ``W`` and ``b`` parameters the
    optimizer steps, which last-layer (closed-form) scores assume: a parametrized head (weight norm,
    spectral norm: the optimizer steps the parametrization's tensors, not ``W``) and an ``nn.Linear``
    subclass with a forward of its own (a cosine / NormedLinear classifier). Raises
    :class:`~augplug.errors.UnsupportedHeadError` naming ``mode='full'``."""
    if not isinstance(head, nn.Linear):
        return
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(head):
        raise UnsupportedHeadError(
            f"the classifier '{name}' is parametrized ({', '.join(head.parametrizations.keys())}: e.g. weight_norm "
            f"or spectral_norm), so the optimizer steps the parametrization's tensors, not the weight that "
            f"last-layer scores measure a step on",
            "use mode='full' (scores through the parameters that train), or a plain nn.Linear classifier")
    weights = [(n, t) for n, t in (("weight", head.weight), ("bias", head.bias)) if t is not None]
    computed = [n for n, t in weights if not isinstance(t, nn.Parameter)]
    if computed:   # torch.nn.utils.weight_norm / spectral_norm (the hook-based ones) recompute them per forward
        raise UnsupportedHeadError(
            f"the classifier '{name}' computes its {' and '.join(computed)} from other tensors before each "
            f"forward (torch.nn.utils.weight_norm or spectral_norm: the optimizer steps "
            f"{', '.join(n for n, _ in head.named_parameters(recurse=False)) or 'other tensors'}), not the weight "
            f"that last-layer scores measure a step on",
            "use mode='full' (scores through the parameters that train), or a plain nn.Linear classifier")
    if not _plain_forward(head):
        raise UnsupportedHeadError(
            f"the classifier '{name}' is a {type(head).__name__}, an nn.Linear with a forward of its own (e.g. a "
            f"cosine / normalized classifier), whose output last-layer scores cannot assume is weight @ a + bias",
            "use mode='full' (scores through the model as it computes), or a plain nn.Linear classifier")


def tied_names(model: nn.Module, name: str, head: nn.Module) -> List[str]:
    """The names under which ``model`` holds the classifier's own parameters (``head``, at dotted
    ``name``) elsewhere too: a weight tied to an embedding or another layer (``fc.weight =
    other.weight``), whose other use last-layer scores do not see."""
    own = {id(p) for p in head.parameters(recurse=False)}
    prefix = f"{name}." if name else ""
    return [n for n, p in unwrap_model(model).named_parameters(remove_duplicate=False)
            if id(p) in own and not (n.startswith(prefix) and "." not in n[len(prefix):])]


def find_classifier(model: nn.Module, classifier: Union[None, str, nn.Module] = None) -> Tuple[str, nn.Linear]:
    """Return ``(dotted_name, module)`` of the model's linear classifier head.

    ``classifier`` may be the module itself or its dotted name inside ``model``.
    """
    model = unwrap_model(model)
    if isinstance(classifier, nn.Module):
        name = _name_of(model, classifier)
        _check_linear(name, classifier)
        return name, classifier
    if isinstance(classifier, str):
        try:
            head = model.get_submodule(classifier)
        except AttributeError:
            raise UnsupportedHeadError(f"the model has no submodule named '{classifier}'",
                                       "pass a dotted name listed by model.named_modules()") from None
        _check_linear(classifier, head)
        return classifier, head
    if classifier is not None:
        raise UnsupportedHeadError(f"classifier= must be a module or a name, got {type(classifier).__name__}",
                                   "pass the nn.Linear head or its dotted name")
    head = _known_head(model)
    if head is None:
        found = _heads_in_children(model)
        trains = [(n, h) for n, h in found if any(p.requires_grad for p in h.parameters())]
        if len(found) > 1 and trains:   # a frozen copy (an EMA model held beside the trained one) never trains
            found = trains
        own = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
        if found and own:   # a wrapper's own linear layer beside a backbone's head: either may give the logits
            raise UnsupportedHeadError(
                f"{type(model).__name__} has linear layers of its own ({', '.join(own)}) beside the head of a "
                f"submodule ({', '.join(n for n, _ in found)}), and the refiner cannot tell which one produces "
                f"the logits",
                f"pass the layer whose output is the logits as classifier= (e.g. classifier='{own[-1]}')")
        if len(found) == 1:
            name, head = found[0]
            return name, head
        if found:
            raise UnsupportedHeadError(
                f"{type(model).__name__} has no classifier head of its own, and {len(found)} of its submodules hold "
                f"one: {', '.join(n for n, _ in found)}",
                f"pass the head to score as classifier= (for example classifier='{found[0][0]}'), or use mode='full'")
        raise UnsupportedHeadError(
            f"could not find a classifier head on {type(model).__name__}",
            "pass classifier=<the final nn.Linear module or its name>, or use mode='full'")
    name = _name_of(model, head)
    _check_linear(name, head)
    aux = getattr(model, "aux_head", None)
    if isinstance(aux, nn.Linear) and aux is not head:   # timm's VOLO: logits = head + 0.5 max_tokens aux_head
        raise UnsupportedHeadError(
            f"{type(model).__name__} adds the output of an auxiliary head ('{_name_of(model, aux)}', over every "
            f"token) to the output of its classifier '{name}', so the logits are not one linear layer's output",
            "use mode='full', which scores the logits as the model computes them (or build the model without "
            "the auxiliary head: timm's use_aux_head=False)")
    return name, head


def _known_head(model: nn.Module):
    """The head a model names itself: timm's ``get_classifier()``, else the attribute ``fc``,
    ``classifier`` or ``head`` (a Sequential's last module when that is a Linear; ``head.fc``),
    else the last module of an ``nn.Sequential``; None when it names none."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, (tuple, list)):
            _check_linear("get_classifier()", head)
        if head is not None:
            return head
    named = []
    for attr in ("fc", "classifier", "head"):
        cand = getattr(model, attr, None)
        if isinstance(cand, nn.Sequential) and len(cand) and isinstance(cand[-1], nn.Linear):
            cand = cand[-1]
        elif isinstance(cand, nn.Module) and not isinstance(cand, nn.Linear) and isinstance(getattr(cand, "fc", None), nn.Linear):
            cand = cand.fc
        if isinstance(cand, nn.Module):
            named.append((attr, cand))
    linear = [(a, c) for i, (a, c) in enumerate(named)
              if isinstance(c, nn.Linear) and all(c is not d for _, d in named[:i])]
    if len(linear) > 1:   # e.g. a main head and an auxiliary (deep-supervision) one: a guess would be silent
        names = ", ".join(f"'{_name_of(model, c)}'" for _, c in linear)
        raise UnsupportedHeadError(
            f"{type(model).__name__} has {len(linear)} linear layers named as a classifier head ({names}), and "
            f"the refiner cannot tell which one produces the logits",
            f"pass the head whose output is the logits as classifier= (e.g. classifier='{_name_of(model, linear[0][1])}')")
    if named:
        return named[0][1]
    if isinstance(model, nn.Sequential) and len(model):
        return model[-1]
    return None


def _heads_in_children(model: nn.Module):
    """``(dotted name, Linear)`` of every linear head a submodule names for itself, for a model that
    names none (a wrapper holding a timm or torchvision model as ``self.backbone``): each child that is
    not itself a Linear is searched as a model, its own children in turn when it names no head."""
    found = []
    for child_name, child in model.named_children():
        if isinstance(child, nn.Linear):
            continue
        try:
            head = _known_head(child)
        except UnsupportedHeadError:
            continue
        if head is None:
            found += [(f"{child_name}.{n}", h) for n, h in _heads_in_children(child)]
        elif isinstance(head, nn.Linear):
            found.append((f"{child_name}.{_name_of(child, head)}", head))
    return found


def output_logits(out) -> torch.Tensor:
    """The logits in what a model's forward returned: the tensor itself, a ``logits`` field (a
    namedtuple or dataclass, wherever the field sits), the ``logits`` entry of a mapping (Hugging
    Face's ``ModelOutput``), or else the first element of a tuple or list (auxiliary outputs after it)."""
    named = getattr(out, "logits", None) if not isinstance(out, (torch.Tensor, Mapping)) else None
    if isinstance(named, torch.Tensor):   # a namedtuple or dataclass with a logits field, wherever it sits
        return named
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
        out = out.logits
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"the model's forward returned a {type(out).__name__}, in which the refiner finds no "
                         "logits (a tensor, the first element of a tuple, or a 'logits' entry or attribute)",
                         "return the logits, or put them under the key or attribute 'logits' (a multi-task "
                         "model: build the refiner on a small nn.Module whose forward returns the one task's "
                         "logits, or use mode='last_layer' with classifier= naming that task's head)")
    return out


def _first_parameter(module: nn.Module) -> Optional[str]:
    """The name of the first positional parameter of ``module.forward``: a forward called by keyword
    (``model(pixel_values=x)``, as Hugging Face models are) is recorded when that keyword is it, so
    that calling the model with the recorded input as its first argument runs the same forward."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return next((p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same values in memory: one storage, offset, shape and strides."""
    return (a.shape == b.shape and a.stride() == b.stride() and a.device == b.device and a.dtype == b.dtype
            and a.storage_offset() == b.storage_offset()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _run_start(chunks, end: int, rows: int) -> Optional[int]:
    """The first of the forwards ``start:end`` (the most recent ones before ``end``) that together
    hold exactly ``rows`` rows; None when no such run exists."""
    total, start = 0, end
    while start > 0 and total < rows:
        start -= 1
        total += chunks[start].shape[0]
    return start if total == rows and end > start else None


def _joined(tensors):
    """The recorded tensors of several forwards as one batch (rows stacked)."""
    if len(tensors) == 1:
        return tensors[0]
    shapes = [tuple(t.shape[1:]) for t in tensors]
    if len(set(shapes)) > 1:   # inputs of another resolution, in full mode: no one batch to score
        raise ShapeError("the logits come from forwards whose inputs have different shapes per row "
                         f"({', '.join(map(str, shapes))}), which cannot be scored as one batch of model inputs",
                         "use last-layer mode (the default), or call the refiner once per forward, each with "
                         "that forward's logits")
    return torch.cat(tensors, 0)


def _cat_order(logits: torch.Tensor, nodes, chunks, rows: int) -> Optional[List[int]]:
    """The recorded forwards, in the order their outputs were concatenated into ``logits`` along the
    rows (``torch.cat([model(x), model(x_aug)])`` in any order of the forwards), read from the
    autograd graph: ``logits`` made by one ``torch.cat`` of outputs whose graph nodes are
    ``nodes[k]``. None when the logits are not such a concatenation (no device sync either way)."""
    fn = getattr(logits, "grad_fn", None)
    if fn is None or type(fn).__name__ != "CatBackward0" or getattr(fn, "_saved_dim", 0) not in (0, -2):
        return None
    order: List[int] = []
    for part, _ in fn.next_functions:
        k = next((i for i, node in enumerate(nodes) if node is not None and node is part), None)
        if k is None or k in order:
            return None
        order.append(k)
    contiguous = sorted(order) == list(range(min(order), max(order) + 1)) if order else False
    return order if len(order) > 1 and contiguous and sum(chunks[k].shape[0] for k in order) == rows else None


@dataclass(frozen=True)
class ForwardReplay:
    """What a training forward drew from the random number generators, recorded as it began: with
    these states set again, a rerun of the same modules in the same modes on the same input draws
    the same dropout (and stochastic-depth) masks.

    ``cpu_rng``: ``torch.get_rng_state()``; ``cuda_rng``: ``(device index, state)`` when the input was
    on a CUDA device; ``autocast``: whether autocast was on for the input's device type.
    """

    cpu_rng: torch.Tensor
    cuda_rng: Optional[Tuple[int, torch.Tensor]]
    autocast: bool

    @classmethod
    def before(cls, x: torch.Tensor) -> "ForwardReplay":
        dev = x.device
        cuda = (dev.index if dev.index is not None else torch.cuda.current_device(),
                torch.cuda.get_rng_state(dev)) if dev.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, torch.is_autocast_enabled(dev.type))

    @contextmanager
    def rng(self):
        """Run the block with the generators as they were when the forward began; restore them after."""
        devices = [self.cuda_rng[0]] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng[1], self.cuda_rng[0])
            yield


class GradientSlot:
    """Keeps the gradient a tensor receives in backward passes, detached and added up over several
    (``tensor.register_hook(slot.receive)``; the hook changes nothing)."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None

    def receive(self, grad: torch.Tensor) -> None:
        g = grad.detach()
        self.grad = g if self.grad is None else self.grad + g


class _HeadForward(GradientSlot):
    """One recorded forward of the classifier head: its input features, whether a refiner call used
    it, and (with gradient tracking) the gradient its output received in the backward pass."""

    __slots__ = ("features", "used", "node", "unscaled")

    def __init__(self, features: torch.Tensor, node=None):
        super().__init__()
        #: ``node``: the autograd node of the head's output (to read the order of a concatenation);
        #: ``unscaled``: its gradient arrived while the rest's scale was armed for an earlier update
        self.features, self.used, self.node, self.unscaled = features, False, node, False


def in_backward() -> bool:
    """Whether the caller runs inside an autograd backward pass (a checkpointed forward's recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


#: The autograd node of ``torch.utils.checkpoint(..., use_reentrant=True)``'s output.
_REENTRANT_NODE = "CheckpointFunctionBackward"


def reentrant_checkpoint(tensor: Any, limit: int = 10_000) -> bool:
    """Whether ``tensor``'s autograd graph (its first ``limit`` nodes) holds a reentrant activation
    checkpoint, whose inner forward runs under ``no_grad``: the hooks see no training forward there,
    and ``torch.autograd.grad`` cannot reach the parameters inside it."""
    node = getattr(tensor, "grad_fn", None)
    seen, todo = set(), [node] if node is not None else []
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == _REENTRANT_NODE:
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


#: What to use instead of a reentrant checkpoint, in every error and warning about one.
NON_REENTRANT = "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (torch's recommended setting)"

#: The fix for a model that runs its classifier (or all of it) in a reentrant checkpoint.
REENTRANT_FIX = (f"use {NON_REENTRANT}, or pass the classifier's input as features= (last-layer mode) / the model "
                 "input as inputs= (full mode)")


def hidden_by_checkpoint(what: str) -> UnsupportedModelError:
    """The error of a capture that recorded nothing because the logits come through a reentrant
    checkpoint (:func:`reentrant_checkpoint`): its forward runs under ``no_grad``."""
    return UnsupportedModelError(
        f"the logits come through torch.utils.checkpoint(..., use_reentrant=True), whose forward runs under "
        f"no_grad, so the hooks could not record {what} (the recomputation in the backward pass comes too late)",
        REENTRANT_FIX)


def _inert_capture() -> "ActivationCapture":
    """What a copy of a model gets for a refiner's capture (:meth:`ActivationCapture.__reduce_ex__`):
    hooks that record nothing and change no gradient."""
    capture = object.__new__(ActivationCapture)
    capture._paused, capture._input_open, capture.rest_scale, capture._rest_armed = 1, False, None, None
    return capture


def other_captures(*modules: Optional[nn.Module]) -> List["ActivationCapture"]:
    """The live refiner captures (:attr:`ActivationCapture.of_refiner`) whose hooks sit on ``modules``:
    another refiner's, built on the same model and not removed. The inert ones of copied models, and
    those of a standalone criterion (``ISDALoss.for_model``), are left out."""
    found: List[ActivationCapture] = []
    for module in modules:
        hooks = [] if module is None else [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        for hook in hooks:
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, ActivationCapture) and getattr(owner, "of_refiner", False) and \
                    all(owner is not c for c in found):
                found.append(owner)
    return found


class ActivationCapture:
    """Forward hooks that record, during the user's own training forwards, the classifier's input
    features and (optionally) the model's input.

    Records only when the module is in training mode and autograd is on, so evaluation loops under
    ``model.eval()`` / ``torch.no_grad()`` are ignored. Several forwards before one refiner call
    (e.g. originals and augmented samples run separately) are concatenated in order.
    Stored tensors are detached (features keep their graph with ``keep_graph=True``, for policies that
    differentiate through them), and only the last ``max_chunks`` forwards are kept, so training-mode
    forwards that are never followed by a refiner call cannot pile up.

    The outputs of each forward are kept too (detached: the head's beside its features, the model's
    beside its input), so that :meth:`features` and :meth:`inputs` can tell which forward a call's
    logits come from when several ran since the last call (a second forward for the originals, run
    after the views' forward, must not lend its features or inputs to the views).

    With ``track_gradients`` on, each head forward whose output needs a gradient also gets a
    gradient hook on that output, which keeps (detached) the gradient the output receives in the
    backward pass. :meth:`other_gradients` then lists the forwards that no refiner call used but
    that the loss trained: the rest of the user's loss (``refiner(model(x_aug), y_aug) +
    F.cross_entropy(model(x), y)``), whose last-layer gradient is ``sum_i G_i h_i^T`` with ``G`` the
    output gradient and ``h`` the features.
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module], capture_inputs: bool, max_chunks: int = 8,
                 keep_graph: bool = False, record_replay: bool = False, of_refiner: bool = False):
        self.keep_graph, self.record_replay = keep_graph, record_replay
        #: a refiner's capture (:func:`other_captures` warns about a second one on a model)
        self.of_refiner = of_refiner
        self._features: Deque[torch.Tensor] = deque(maxlen=max_chunks)
        self._outputs: Deque[Optional[torch.Tensor]] = deque(maxlen=max_chunks)   # the head's, per forward
        #: each recorded output's version counter as its forward returned: a later in-place change of the
        #: output (``z = fc(h); z /= T``) keeps its storage but not its values (_pick)
        self._output_versions: Deque[Optional[int]] = deque(maxlen=max_chunks)
        self._inputs: Deque[torch.Tensor] = deque(maxlen=max_chunks)
        #: the type of a training forward's first input that is not a tensor (a dict of tensors), or None
        self.odd_input: Optional[str] = None
        self._model_outputs: Deque[Optional[torch.Tensor]] = deque(maxlen=max_chunks)  # the model's, per input
        self._model_nodes: Deque[Any] = deque(maxlen=max_chunks)   # their autograd nodes (_cat_order)
        self._model_output_versions: Deque[Optional[int]] = deque(maxlen=max_chunks)   # as _output_versions
        self._replays: Deque[ForwardReplay] = deque(maxlen=max_chunks)
        self._forwards: Deque[_HeadForward] = deque(maxlen=max_chunks)   # beside _features
        #: forwards with a gradient hook whose backward pass may still come (kept across clear())
        self._awaiting: Deque[_HeadForward] = deque(maxlen=4 * max_chunks)
        #: hook the head's output gradients (see the class docstring)
        self.track_gradients = False
        #: a 0-dim tensor that scales the gradient reaching the outputs of forwards no refiner call
        #: used (the rest of the loss), or None; set by :meth:`arm_rest`, for one update
        self.rest_scale: Optional[torch.Tensor] = None
        self._rest_armed: Optional[tuple] = None   # (step counter, its count, head weight, its version)
        self._head = head
        self._input_open = False   # the pre-hook recorded an input whose forward has not returned yet
        self._warned_guess = False  # warned once that a call's forwards were guessed (_pick)
        self._value_checked = False  # compared once logits that are not the output tensor (_pick)
        self._warned_values = False  # warned once that the logits are not the output (_warn_not_outputs)
        self._head_checked = None   # logits_are_head_outputs' value comparison (None: not made since a recheck)
        self._paused = 0
        self._handles = []
        self._head_hooked = head is not None
        if head is not None:
            self._handles.append(head.register_forward_hook(self._feature_hook))
        #: the keyword under which a forward called by keyword takes its input (_first_parameter)
        self._input_keyword = _first_parameter(model) if capture_inputs else None
        self.captures_inputs = bool(capture_inputs)
        if capture_inputs:
            self._handles.append(model.register_forward_pre_hook(self._input_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._model_output_hook))

    def _received(self, record: _HeadForward, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient hook of a recorded head output: keep the gradient as it arrives; for a forward
        no refiner call used, pass it on scaled by ``rest_scale`` when that is set."""
        record.receive(grad)
        if record.used or self.rest_scale is None:
            return None
        if not self._rest_current():   # a backward before this update's refiner call (rest_backward_early)
            record.unscaled = True
            return None
        return grad * self.rest_scale.to(grad.dtype)

    def rest_backward_early(self) -> bool:
        """Whether a forward no refiner call used got its gradient while the rest's scale was armed for an
        earlier update: the rest of the loss was backpropagated before this update's refiner call, and
        so was not rescaled."""
        return any(r.unscaled and not r.used and r.grad is not None for r in self._awaiting)

    def arm_rest(self, scale: Optional[torch.Tensor], counter=None) -> None:
        """Scale the rest of the loss by ``scale`` (None: not at all) until the model is next updated:
        a step of ``counter`` (the refiner's :class:`~augplug.steps.StepCounter`, or None) or an
        in-place change of the classifier's weight. A refiner call arms it again for its own update,
        so the scale reaches only backward passes of updates that have a refiner call: once the
        refiner is no longer called (dropped without :meth:`remove`), later training is plain."""
        weight = getattr(self._head, "weight", None)
        weight = weight if isinstance(weight, torch.Tensor) else None
        self.rest_scale = scale
        self._rest_armed = None if scale is None else (
            counter, None if counter is None else counter.count, weight, None if weight is None else weight._version)

    def _rest_current(self) -> bool:
        """Whether the update :meth:`arm_rest` was armed for is still the current one."""
        counter, count, weight, version = self._rest_armed
        return (counter is None or counter.count == count) and (weight is None or weight._version == version)

    @property
    def records_features(self) -> bool:
        """Whether a classifier head is hooked (its features recorded)."""
        return bool(self._handles) and self._head_hooked

    def __reduce_ex__(self, protocol):
        # a copied or pickled model (an EMA copy, ``torch.save(model)``) carries this capture's hooks:
        # the copy's hooks get an inert capture, so that the copy trains like a plain model (no
        # recording, no rescaled gradients) and pickling does not need the recorded tensors
        return (_inert_capture, ())

    def _active(self, module: nn.Module) -> bool:
        # a forward run inside a backward pass is activation checkpointing's recomputation of a forward
        # already seen (or, reentrant, hidden from the hooks): never a training forward of its own
        return self._paused == 0 and module.training and torch.is_grad_enabled() and not in_backward()

    def _feature_hook(self, module, args, output):
        if self._active(module) and args and isinstance(args[0], torch.Tensor):
            h = args[0].detach()
            self._features.append(args[0] if self.keep_graph else h)
            self._outputs.append(output.detach() if isinstance(output, torch.Tensor) else None)
            self._output_versions.append(output._version if isinstance(output, torch.Tensor) else None)
            record = _HeadForward(h, output.grad_fn if isinstance(output, torch.Tensor) else None)
            self._forwards.append(record)
            if self.track_gradients and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(partial(self._received, record))
                self._awaiting.append(record)

    def _input_hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get(self._input_keyword) if kwargs else None
        if x is not None and not isinstance(x, torch.Tensor) and self._active(module):
            self.odd_input = type(x).__name__
        if self._active(module) and isinstance(x, torch.Tensor):
            x = x.detach()
            self._inputs.append(x)
            self._model_outputs.append(None)
            self._model_output_versions.append(None)
            self._model_nodes.append(None)
            self._input_open = True
            if self.record_replay:
                self._replays.append(ForwardReplay.before(x))

    def _model_output_hook(self, module, args, output):
        if self._input_open:
            self._input_open = False
            try:
                out = output_logits(output)
                self._model_outputs[-1], self._model_nodes[-1] = out.detach(), out.grad_fn
                self._model_output_versions[-1] = out._version
            except ShapeError:   # no logits to match calls to forwards by; the scores say so if needed
                pass

    def features(self, rows: int, logits: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Features of the last ``rows`` samples seen by the head (flattened to 2-D), or None; with
        ``logits``, those of the forward the logits come from (:meth:`_pick`)."""
        out = self.claim(rows, logits)
        return None if out is None else out.flatten(1)

    def last_feature_shape(self) -> Optional[torch.Size]:
        """The shape of the classifier input of the most recent recorded forward, or None."""
        return self._features[-1].shape if self._features else None

    def claim(self, rows: int, logits: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The features of the forward(s) the logits come from (:meth:`_pick`, not flattened), marked
        as used by a refiner call, so that :meth:`other_gradients` does not count them."""
        # where model inputs are captured (full mode) the logits are the model's output, checked there
        out, start, end = self._pick(self._features, self._outputs, rows, logits,
                                     [f.node for f in self._forwards], check_values=not self.captures_inputs,
                                     versions=list(self._output_versions))
        if out is not None:
            for k in range(start, end):
                self._forwards[k].used = True
        return out

    def other_gradients(self):
        """``[(features (n, A), output gradient (n, C))]`` of the recorded head forwards that no
        refiner call used and whose backward pass has come (``track_gradients``)."""
        return [(r.features.flatten(1), r.grad) for r in self._awaiting if r.grad is not None and not r.used]

    def drop_graded(self) -> None:
        """Forget the forwards whose backward pass has come (used or not); the others keep waiting."""
        waiting = [r for r in self._awaiting if r.grad is None]
        self._awaiting.clear()
        self._awaiting.extend(waiting)

    def inputs(self, rows: int, logits: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The model inputs of the last ``rows`` samples, or None; with ``logits``, those of the
        forward the logits come from (:meth:`_pick`)."""
        return self._pick(self._inputs, self._model_outputs, rows, logits, list(self._model_nodes),
                          versions=list(self._model_output_versions))[0]

    def replay(self, rows: int, logits: Optional[torch.Tensor] = None) -> Optional["ForwardReplay"]:
        """How to rerun the training forward that alone saw the ``rows`` rows (the one ``logits``
        come from, :meth:`_pick`). None when the batch came from several forwards, no input was
        captured, or the capture was not asked to ``record_replay``."""
        if not self.record_replay or not self._inputs:
            return None
        out, start, end = self._pick(self._inputs, self._model_outputs, rows, logits, list(self._model_nodes),
                                     versions=list(self._model_output_versions))
        return self._replays[start] if out is not None and end - start == 1 else None

    def _pick(self, chunks, outputs, rows: int, logits: Optional[torch.Tensor], nodes=None, check_values=True,
              versions=None):
        """``(tensor, start, end)``: the recorded tensors of forwards ``start:end`` (concatenated),
        the forwards a call's ``rows`` rows come from; ``(None, 0, 0)`` when no run of recent
        forwards adds up to ``rows``.

        Without ``logits``: the most recent forwards. With them, first the forward whose output the
        logits are, by storage (the output itself or a view of it: no arithmetic, no device sync);
        then, where other forwards ran since the last call and the storage tells nothing (logits
        converted after the forward, as Accelerate's mixed precision does), by value: the most
        recent run of forwards whose outputs equal the logits. Where none does (logits computed
        from the output), the most recent forwards, with a one-time warning when an earlier run of
        forwards would also have fitted (the choice is then a guess). Logits that are one
        ``torch.cat`` of recorded outputs are matched through the autograd graph first, in the order
        of the concatenation, whatever the order of the forwards (``nodes``: the outputs' graph nodes,
        beside ``chunks``). An output found by storage whose version counter moved since its forward
        (``versions``, beside ``chunks``) was changed in place after the forward (``z /= T``): it is the
        forward the rows come from, but not its output's values, and ``check_values`` warns as for
        logits computed out of place (reading the counter needs no device sync)."""
        n = len(chunks)
        if logits is not None:
            for k in range(n - 1, -1, -1):
                o = outputs[k]
                if o is not None and same_tensor(o, logits):
                    if check_values and versions is not None and len(versions) == n and \
                            versions[k] is not None and o._version != versions[k]:
                        self._warn_not_outputs()
                    return chunks[k], k, k + 1
            order = _cat_order(logits, nodes, chunks, rows) if nodes is not None and len(nodes) == n else None
            if order is not None:
                return _joined([chunks[k] for k in order]), min(order), max(order) + 1
        start = _run_start(chunks, n, rows)
        if start is None:
            return None, 0, 0
        if logits is not None and start > 0:   # earlier forwards not in this batch: match by value
            target = logits.detach()
            for end in range(n, 0, -1):
                first = _run_start(chunks, end, rows)
                outs = list(outputs)[first:end] if first is not None else []
                if not outs or any(o is None or o.dim() != target.dim() for o in outs):
                    continue
                joined = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
                if joined.shape == target.shape and torch.equal(joined.to(target.dtype), target):
                    return _joined(list(chunks)[first:end]), first, end
            if not self._warned_guess and any(_run_start(chunks, end, rows) is not None for end in range(1, start + 1)):
                self._warned_guess = True
                warn_at_caller(
                    f"the logits passed are not the output of any of the {n} training forwards since the last "
                    f"call (computed from it, e.g. scaled), and more than one run of those forwards has their "
                    f"{rows} rows: the most recent is used. Call the refiner right after the forward that "
                    f"produced the logits, or pass features= (inputs= in full mode)")
        if check_values and logits is not None and start == 0 and not self._value_checked:
            self._check_logits_are_outputs(list(outputs), logits)
        return _joined(list(chunks)[start:]), start, n

    def _check_logits_are_outputs(self, outs, logits: torch.Tensor) -> None:
        """Once per capture, where the logits are not the classifier's output tensor itself (nor a
        view of it): compare their values with that output (one device sync, once), and warn when
        they differ. The scores assume the logits are the classifier's output row for row: logits
        changed after it (a temperature, a normalization) or rows reordered or replaced after the
        forward give wrong scores without any error."""
        if any(o is None for o in outs) or not outs:
            return
        target = logits.detach()
        if not bool(torch.isfinite(target).all()):   # the call is rejected for that; judge a good one
            return
        self._value_checked = True
        joined = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        if joined.numel() == target.numel() and torch.equal(joined.reshape(target.shape).to(target.dtype), target):
            return   # the output itself (a 1x1 convolution's, flattened)
        self._warn_not_outputs()

    def logits_are_head_outputs(self, rows: int, logits: torch.Tensor) -> bool:
        """Whether ``logits`` are, row for row, the classifier's output of the forward(s) they come from
        (full mode's closed-form calls, which assume it): by storage and version counter (no sync);
        else by value once, and again after :meth:`recheck_values` (one device sync each). True when
        nothing recorded tells."""
        versions = list(self._output_versions)
        out, start, end = self._pick(self._outputs, self._outputs, rows, logits,
                                     [f.node for f in self._forwards], check_values=False, versions=versions)
        if out is None or any(o is None for o in list(self._outputs)[start:end]):
            return True
        if same_tensor(out, logits) and end - start == 1:
            return versions[start] is None or out._version == versions[start]
        if self._head_checked is None:
            target = logits.detach()
            self._head_checked = (out.shape == target.shape and
                                  torch.equal(out.to(target.dtype), target))
        return self._head_checked

    def slices_a_forward(self, logits: torch.Tensor) -> bool:
        """Whether ``logits`` are some of the rows of a larger recorded output (the classifier's, or
        the model's): views sliced out of one forward of originals and views. Storage only: no sync."""
        try:
            ptr = logits.untyped_storage().data_ptr()
        except RuntimeError:
            return False
        for o in list(self._outputs) + list(self._model_outputs):
            if o is not None and o.device == logits.device and o.shape[0] > logits.shape[0] and \
                    o.untyped_storage().data_ptr() == ptr:
                return True
        return False

    def recheck_values(self) -> None:
        """Compare the logits with the classifier's output again at the next call that computes them
        (:meth:`_check_logits_are_outputs`; a refresh calls this): a learnable scale after the head that
        starts at 1 passes the first check and moves later. Still warns at most once."""
        if not self._warned_values:
            self._value_checked = False
        self._head_checked = None

    def _warn_not_outputs(self) -> None:
        """Warn, once per capture, that the logits are not the output of their forward."""
        if self._warned_values:
            return
        self._warned_values = True
        warn_at_caller(
            "the logits passed are not, row for row, the output of the forward they come from (the classifier's "
            "output; the model's in full mode): changed after it (e.g. divided by a temperature, normalized) or "
            "their rows reordered. The scores assume they are that output, so they would be wrong. Pass that "
            "output itself as the logits, in the forward's row order (a temperature belongs inside the "
            "classifier's module), or pass features= for the rows as you pass them")

    @property
    def recorded_nothing(self) -> bool:
        """Whether no training forward was recorded since the last :meth:`clear` (neither features
        nor inputs)."""
        return not self._features and not self._inputs

    def clear(self) -> None:
        self._features.clear()
        self._outputs.clear()
        self._output_versions.clear()
        self._model_output_versions.clear()
        self._forwards.clear()
        self._model_outputs.clear()
        self._model_nodes.clear()
        self._input_open = False
        self._inputs.clear()
        self._replays.clear()
        self.odd_input = None

    @contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
        self._awaiting.clear()
