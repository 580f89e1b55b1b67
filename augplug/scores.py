"""Class-score vectors ``g`` and validation gradients: the one quantity every method is built on.

With ``log p = log_softmax(f_theta(x))``, ``J(x) = d log p / d theta`` (C x P) and the validation
descent direction ``v = -grad_theta L_val``::

    g(x) = J(x) v   in R^C     (g_c > 0: raising log p_c(x) lowers the validation loss)

so that for any target ``y`` on the simplex, ``y^T g(x) = grad l(x, y) . grad L_val`` is the
first-order drop of the validation loss after one SGD step on ``(x, y)``. Three ways to compute it:

``"full"``
    forward-mode AD (``torch.autograd.forward_ad``) through the whole model with tangent ``v`` on
    its trainable parameters: one forward-equivalent, no stored activations. Works with BatchNorm in
    either mode (running statistics are restored afterwards) and with timm models.
``"last_layer"``
    closed form on the final linear layer ``z = W a + b`` from the features ``a`` the classifier
    received: ``u = V_W a + v_b``, ``g = u - (p^T u) 1``. Almost free.
``"double_backward"``
    reverse-over-reverse: ``g = d/d zeta [ (d/d theta sum_i zeta_i^T log p_i) . v ]`` for layers
    without forward-mode formulas (1 forward + 2 backwards).

:func:`finite_difference_scores` approximates ``"full"`` with plain no-grad forwards at parameters
moved along ``v`` (two forwards, central difference; one when ``log p(x; theta)`` is at hand).

The log-softmax Jacobian (not the logit Jacobian) is used throughout: the two differ by a
per-sample shift ``(p^T g_logit) 1`` that changes the sign test ``y^T g >= 0``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import ConfigurationError, ShapeError, UnsupportedHeadError, UnsupportedModelError
from .heads import NON_REENTRANT, ForwardReplay, output_logits, reentrant_checkpoint, same_tensor, unwrap_model

__all__ = [
    "SCORE_MODES",
    "output_logits",
    "scoring_mode",
    "buffers_on_copies",
    "preserved_parameters",
    "forward_mode_duals",
    "GradSum",
    "grad_sums",
    "validation_gradient",
    "last_layer_scores",
    "full_scores",
    "finite_difference_scores",
    "FD_RELATIVE_STEP",
    "REPLAY_TOLERANCE",
    "BaseMismatchError",
    "ForwardModeUnsupportedError",
    "double_backward_scores",
    "class_scores",
]

SCORE_MODES = ("full", "last_layer", "double_backward", "auto")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def buffers_on_copies(model: nn.Module):
    """Run extra passes on copies of every buffer (BatchNorm's running statistics and any other a
    forward in training mode updates), then swap the module's own tensors back untouched.

    Restoring them in place instead would bump their version counters, and the training forward's
    graph, which saved them, could then not run its backward. A buffer shared by several modules
    gets one copy, so it stays shared during the pass."""
    copies: Dict[int, torch.Tensor] = {}
    saved = []
    try:
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    saved.append((m, name, b))
                    m._buffers[name] = copies.setdefault(id(b), b.detach().clone())
        yield
    finally:
        for m, name, b in saved:
            m._buffers[name] = b


@contextmanager
def scoring_mode(model: nn.Module, bn: str = "eval"):
    """Run extra passes with dropout off and BatchNorm in ``bn`` mode, changing nothing persistent.

    ``bn="eval"`` uses the running statistics; ``bn="train"`` uses the batch statistics, updating
    copies of the running statistics (and ``num_batches_tracked``, :func:`buffers_on_copies`): the
    module's own tensors are never written. All modules' ``training`` flags are restored on exit.
    """
    if bn not in ("eval", "train"):
        raise ConfigurationError(f"bn_mode must be 'eval' or 'train', got {bn!r}",
                                 "use 'eval' (running statistics) or 'train' (batch statistics)")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if bn == "train":
            for m in model.modules():
                if isinstance(m, _BN_TYPES):
                    m.train()
        with buffers_on_copies(model) if bn == "train" else nullcontext():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def preserved_parameters(model: nn.Module):
    """Put every module's own parameter objects back after a ``functional_call``.

    With a submodule registered under two names (``nn.Sequential(lin, act, lin)``, tied layers),
    ``torch.func.functional_call`` can leave plain tensors without ``requires_grad`` in place of the
    parameters, which would silently stop their training.
    """
    saved = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]
    try:
        yield
    finally:
        for m, name, p in saved:
            if m._parameters.get(name) is not p:
                m._parameters[name] = p


def _parameters_named_in(net: nn.Module, v: Dict[str, torch.Tensor], fix: str) -> Dict[str, nn.Parameter]:
    """``net``'s parameters by name, a tied weight under each of its names; a
    :class:`ConfigurationError` with ``fix`` when ``v`` names parameters ``net`` does not have."""
    named = dict(net.named_parameters(remove_duplicate=False))
    unknown = [n for n in v if n not in named]
    if unknown:
        raise ConfigurationError(f"the validation direction names unknown parameters {unknown[:3]}", fix)
    return named


@contextmanager
def forward_mode_duals(net: nn.Module, v: Dict[str, torch.Tensor], *, bn: str, device_type: str, fix: str):
    """Dual parameters ``name -> make_dual(param, v[name])`` for one forward-mode pass of ``net``.

    Inside: no grad, dropout off and BatchNorm in ``bn`` mode (on copies of the buffers), autocast off (its
    casts drop tangents), a dual level, and the model's own parameters put back on exit. Raises
    :class:`ConfigurationError` with ``fix`` when ``v`` names parameters ``net`` does not have.
    """
    named = _parameters_named_in(net, v, fix)
    with torch.no_grad(), scoring_mode(net, bn), torch.autocast(device_type, enabled=False), fwAD.dual_level(), \
            preserved_parameters(net):
        with warnings.catch_warnings():   # torch's forward AD scripts a helper at first use, which torch deprecates
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
            duals = {n: fwAD.make_dual(named[n].detach(), t.to(named[n].dtype)) for n, t in v.items()}
        yield duals


@dataclass
class GradSum:
    """Sum over samples of per-sample loss gradients, with the number of samples.

    Kept as sums so batches (and processes) combine exactly; ``direction()`` is ``v = -sum/count``.
    """

    sums: Dict[str, torch.Tensor]
    count: int
    loss_sum: Union[float, torch.Tensor] = 0.0  # a 0-dim fp64 tensor on the device (read it lazily)
    skipped: int = 0  # validation batches skipped as non-finite while this sum was built (augplug.core)
    #: the same sum over two disjoint halves of the samples (alternate rows), when asked for
    halves: Optional[Tuple["GradSum", "GradSum"]] = None
    #: the validation window after this refresh (``Schedule.fresh_batches``; kept by the core on commit)
    window: Optional[Any] = None

    def add(self, other: "GradSum") -> "GradSum":
        if not self.sums:
            return other
        halves = None
        if self.halves is not None and other.halves is not None:
            halves = (self.halves[0].add(other.halves[0]), self.halves[1].add(other.halves[1]))
        return GradSum({k: self.sums[k] + other.sums[k] for k in self.sums},
                       self.count + other.count, self.loss_sum + other.loss_sum, halves=halves)

    @staticmethod
    def sum_of(parts) -> "GradSum":
        """The sum of several sums (an empty sum for none)."""
        total = GradSum({}, 0)
        for part in parts:
            total = total.add(part)
        return total

    def direction(self) -> Dict[str, torch.Tensor]:
        count = self.count.clamp_min(1) if torch.is_tensor(self.count) else max(self.count, 1)
        return {k: -(s / count) for k, s in self.sums.items()}


def _forward_logits(model: nn.Module, inputs) -> torch.Tensor:
    return output_logits(model(inputs))


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
    """Summed cross-entropy gradient of one validation batch.

    ``targets`` are (B, C) probabilities. With ``head``/``head_name`` given (last-layer mode) the
    gradient of the head's weight and bias is computed in closed form from the features the head
    receives, ``sum_j (p_j - y_j) a_j^T``; otherwise ``params`` (name -> parameter of the unwrapped
    model) are differentiated by autograd without touching ``.grad``. ``halves=True`` also returns
    the sums over the two fixed halves of the validation samples (:func:`half_mask`;
    ``GradSum.halves``, the total is their sum), from the same forward pass.
    """
    net = unwrap_model(model)
    y = targets.float()
    if head is not None:
        a, logits = head_features(net, inputs, head, bn=bn)
        mask = half_mask(inputs, y.shape[0], y.device) if halves else None
        return _head_gradient(a, logits, y, head_name, head.bias is not None, mask)
    if not params:
        raise ConfigurationError("no trainable parameters to differentiate",
                                 "make sure the model has parameters with requires_grad=True")
    with torch.enable_grad(), scoring_mode(net, bn):
        logits = _forward_logits(net, inputs)
        if logits.dim() != 2 or logits.shape[-1] != y.shape[-1]:
            raise ShapeError(f"the model's output on a validation batch has shape {tuple(logits.shape)}, but the "
                             f"logits the refiner was called with have {y.shape[-1]} classes",
                             "call the refiner with the model's own output, all classes")
        if not halves:
            loss = -(y * F.log_softmax(logits.float(), -1)).sum()
            return GradSum(grad_sums(loss, params), int(y.shape[0]), loss.detach().double())
        per = -(y * F.log_softmax(logits.float(), -1)).sum(-1)
        m = half_mask(inputs, y.shape[0], y.device).float()
        parts = []
        for k, mk in enumerate((m, 1 - m)):
            loss = (per * mk).sum()
            parts.append(GradSum(grad_sums(loss, params, retain_graph=k == 0), mk.sum(), loss.detach().double()))
    return _from_halves(*parts, int(y.shape[0]))


def head_features(model: nn.Module, inputs, head: nn.Module, *, bn: str = "eval") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(features (B, A) fp32, logits (B, C))`` of a batch: what the head receives and returns in a
    scoring pass (no grad, dropout off, BatchNorm in ``bn`` mode, running statistics untouched).

    The logits are the head's own output where it is one (B, C) row per sample, as the closed form
    assumes and the validation window rebuilds them: a model with several outputs (a multi-task dict
    with no ``logits`` entry, a named head that is not its first output) is scored through the head
    named. Otherwise (a head applied per token) they are the model's output."""
    net = unwrap_model(model)
    feats, outs = [], []

    def record(module, args, output):
        feats.append(args[0].detach())
        outs.append(output.detach() if isinstance(output, torch.Tensor) else None)

    h = head.register_forward_hook(record)
    try:
        with torch.no_grad(), scoring_mode(net, bn):
            out = net(inputs)
    finally:
        h.remove()
    if not feats:
        raise ShapeError(f"the classifier did not run in the model's forward on a validation batch "
                         f"({type(head).__name__} of {type(net).__name__})",
                         "pass classifier= naming the layer whose output is the logits in evaluation too "
                         "(an auxiliary head that runs only in training cannot be scored)")
    k = len(feats) - 1
    if k > 0:   # the head ran more than once (deep supervision): the call whose output the model returns
        model_out = _logits_or_none(out)
        calls = [i for i, z in enumerate(outs) if z is not None and model_out is not None and same_tensor(z, model_out)]
        if not calls:
            raise UnsupportedHeadError(
                f"the classifier ran {len(feats)} times in one forward of the model on a validation batch (e.g. "
                f"auxiliary outputs of deep supervision through the same head) and none of its outputs is the "
                f"logits the model returns, so the call the logits come from is not known",
                "use mode='full', or pass classifier= naming a layer that runs once and returns the logits")
        k = calls[-1]
    a, z = feats[k], outs[k]
    rows = a.shape[0]
    if z is not None and z.dim() == 2 and z.shape[0] == rows:
        return a.flatten(1).float(), z
    return a.flatten(1).float(), output_logits(out)


def _logits_or_none(out) -> Optional[torch.Tensor]:
    try:
        return output_logits(out)
    except ShapeError:
        return None


def _head_gradient(a: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, head_name: str, bias: bool,
                   mask: Optional[torch.Tensor] = None) -> GradSum:
    """Closed-form summed cross-entropy gradient of a linear head, ``sum_j (p_j - y_j) a_j^T`` (and
    the bias's ``sum_j (p_j - y_j)``), from its features and logits; ``mask``: the rows of half A
    (:func:`half_mask`), to add the two halves' sums."""
    logp = F.log_softmax(logits.float(), -1)
    r = logp.exp() - y  # (B, C) residual: d CE / d z

    def head_sum(m: Optional[torch.Tensor]) -> GradSum:  # m: (B,) 0/1 row mask, or None for all rows
        rm, ym = (r, y) if m is None else (r * m[:, None], y * m[:, None])
        sums = {f"{head_name}.weight": rm.t() @ a}
        if bias:
            sums[f"{head_name}.bias"] = rm.sum(0)
        count = int(y.shape[0]) if m is None else m.sum()
        return GradSum(sums, count, (-(ym * logp).sum()).double())

    if mask is None:
        return head_sum(None)
    m = mask.float()
    return _from_halves(head_sum(m), head_sum(1 - m), int(y.shape[0]))


def head_gradient(features: torch.Tensor, targets: torch.Tensor, head: nn.Module, head_name: str,
                  mask: Optional[torch.Tensor] = None) -> GradSum:
    """The last-layer validation gradient of cached ``features`` (B, A) with (B, C) ``targets``, at the
    head's current weights: exact for the head however old the features are."""
    w = head.weight.detach().flatten(1).float()
    b = head.bias.detach().float() if head.bias is not None else None
    return _head_gradient(features, F.linear(features, w, b), targets.float(), head_name, b is not None, mask)


_PROJECTIONS: Dict[tuple, torch.Tensor] = {}


def half_mask(inputs, rows: int, device=None) -> torch.Tensor:
    """Which half (True: A) each validation row belongs to, decided by its content, so that a sample
    stays in the same half however the loader batches or shuffles it: a fixed pseudo-random
    projection of the row (fp64), its fractional part above or below 1/2. Inputs that are not one
    tensor with a row per sample (dicts, token lists) fall back to alternate rows."""
    if not torch.is_tensor(inputs) or inputs.dim() == 0 or inputs.shape[0] != rows:
        return torch.arange(rows, device=device) % 2 == 0
    flat = inputs.detach().reshape(rows, -1).double()
    key = (flat.shape[1], flat.device)
    if key not in _PROJECTIONS:
        g = torch.Generator().manual_seed(0x5EED)
        _PROJECTIONS[key] = (torch.rand(flat.shape[1], generator=g, dtype=torch.float64) * 2 - 1).to(flat.device) * 997.0
    h = flat @ _PROJECTIONS[key]
    return (torch.frac(h.abs()) < 0.5).to(device or flat.device)


def _from_halves(a: GradSum, b: GradSum, count: int) -> GradSum:
    return GradSum({k: a.sums[k] + b.sums[k] for k in a.sums}, count, a.loss_sum + b.loss_sum, halves=(a, b))


_REENTRANT_DIFF_FIX = f"use {NON_REENTRANT}, or last-layer (closed-form) scores where the classifier runs outside the checkpoint"


def check_reached(output: torch.Tensor, names, grads, what: str) -> None:
    """Raise :class:`~augplug.errors.UnsupportedModelError` when some of ``grads`` (``torch.autograd.grad``
    of ``output`` with ``allow_unused=True``) are None because the parameters sit inside a reentrant
    activation checkpoint, which ``torch.autograd.grad`` cannot reach (their part of ``what`` would
    silently be 0). Parameters that ``output`` does not use stay allowed."""
    if all(g is not None for g in grads) or not reentrant_checkpoint(output):
        return
    unreached = [n for n, g in zip(names, grads) if g is None]
    raise UnsupportedModelError(
        f"the model runs part of its forward in torch.utils.checkpoint(..., use_reentrant=True), whose "
        f"parameters torch.autograd.grad cannot reach: {what} would be 0 for {len(unreached)} of {len(names)} "
        f"parameters ({', '.join(unreached[:3])}{', ...' if len(unreached) > 3 else ''})", _REENTRANT_DIFF_FIX)


def grad_sums(loss: torch.Tensor, params: Dict[str, nn.Parameter], retain_graph: bool = False) -> Dict[str, torch.Tensor]:
    """``d loss / d p`` for each named parameter, detached fp32 (zeros where ``loss`` does not depend on it)."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, retain_graph=retain_graph)
    check_reached(loss, names, grads, "the validation direction")
    return {n: (g.detach().float() if g is not None else torch.zeros_like(params[n], dtype=torch.float32))
            for n, g in zip(names, grads)}


def last_layer_scores(
    features: torch.Tensor,
    logits: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Closed-form ``g`` (B, C) for ``z = W a + b``: ``u = V_W a + v_b``, ``g = u - (p^T u) 1``.

    ``features``: what the head received, one row per sample (flattened per row); ``logits``: what it
    returned, ``(B, C)``; ``v_weight`` ``(C, A)`` and ``v_bias`` ``(C,)``: the direction's head entries.
    Mismatched shapes raise :class:`~augplug.errors.ShapeError` (shapes only: no device sync)."""
    _check_last_layer_shapes(features, logits, v_weight, v_bias)
    u = features.flatten(1).float() @ v_weight.float().t()
    if v_bias is not None:
        u = u + v_bias.float()
    p = torch.softmax(logits.detach().float(), -1)
    return u - (p * u).sum(-1, keepdim=True)


def _check_last_layer_shapes(features, logits, v_weight, v_bias) -> None:
    """A :class:`ShapeError` unless the shapes of :func:`last_layer_scores`' arguments fit together
    (Python comparisons of shapes only)."""
    for name, t in (("features", features), ("logits", logits), ("the direction's head weight", v_weight)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"last-layer scores need {name} as a tensor, got {type(t).__name__}",
                             "pass the classifier's input features, the logits and validation_gradient's direction")
    if v_weight.dim() != 2 or logits.dim() != 2 or logits.shape[1] != v_weight.shape[0]:
        raise ShapeError(f"the direction's head weight has shape {tuple(v_weight.shape)} but the logits have shape "
                         f"{tuple(logits.shape)}: the head must map features to the logits' classes",
                         "pass head_name= of the final linear layer (the one that returns the logits) and its logits")
    if features.dim() < 2 or features.shape[0] != logits.shape[0] \
            or math.prod(features.shape[1:]) != v_weight.shape[1]:
        raise ShapeError(f"features of shape {tuple(features.shape)} do not fit the head: it takes "
                         f"{v_weight.shape[1]} inputs per row and the logits have {logits.shape[0]} rows",
                         "pass what the classifier received for these rows (e.g. from a forward hook on the head), "
                         "one row per logits row")
    if v_bias is not None and (not isinstance(v_bias, torch.Tensor) or tuple(v_bias.shape) != (v_weight.shape[0],)):
        raise ShapeError(f"the direction's head bias must have shape ({v_weight.shape[0]},), got "
                         f"{tuple(v_bias.shape) if isinstance(v_bias, torch.Tensor) else type(v_bias).__name__}",
                         "pass the direction validation_gradient returned for this head")


def _as_direction(v) -> Dict[str, torch.Tensor]:
    """``v`` as a ``name -> tangent`` mapping: a :class:`GradSum` gives its ``direction()``; anything else
    that is not a mapping is a :class:`ConfigurationError` (type checks only)."""
    if isinstance(v, GradSum):
        return v.direction()
    if not isinstance(v, Mapping):
        raise ConfigurationError(f"the validation direction v must be a dict name -> tensor, got {type(v).__name__}",
                                 "pass validation_gradient(...).direction() (or the GradSum itself)")
    return v


class ForwardModeUnsupportedError(UnsupportedModelError):
    """An operation of the model has no forward-mode AD formula (:func:`full_scores`)."""


def _forward_ad_missing(e: BaseException) -> bool:
    """Whether ``e`` says that forward-mode AD is missing for an operation."""
    msg = str(e)
    return (isinstance(e, NotImplementedError) or "forward AD" in msg or "forward-mode" in msg
            or "jvp" in msg.lower())


def full_scores(model: nn.Module, inputs, v: Dict[str, torch.Tensor], *, bn: str = "eval") -> torch.Tensor:
    """``g`` (B, C) by one forward-mode pass through the whole model with tangent ``v``.

    ``v`` maps parameter names of the unwrapped model to tangents; parameters not in ``v`` get a
    zero tangent, and every parameter named in ``v`` gets its tangent, frozen ones
    (``requires_grad=False``) included. The pass runs in fp32 with autocast switched off: autocast's
    cast of a dual weight does not carry the tangent, so mixed precision is not used for the
    forward-mode pass. A :class:`GradSum` is taken as its ``direction()``.
    """
    net = unwrap_model(model)
    v = _as_direction(v)
    device_type = inputs.device.type if torch.is_tensor(inputs) else "cpu"
    with forward_mode_duals(net, v, bn=bn, device_type=device_type,
                            fix="compute the validation gradient on this model") as duals:
        if torch.is_tensor(inputs) and inputs.is_floating_point():
            inputs = inputs.to(next(net.parameters()).dtype)
        try:
            out = functional_call(net, duals, (inputs,), strict=False)
        except (NotImplementedError, RuntimeError) as e:
            if not _forward_ad_missing(e):
                raise
            raise ForwardModeUnsupportedError(
                f"forward-mode AD is not implemented for an operation in {type(net).__name__} "
                f"({str(e).splitlines()[0][:160]})",
                "use mode='auto' (double-backward scores where forward mode is missing), or mode='last_layer' "
                "(closed form on a plain nn.Linear head; not for a weight-normalized one); for timm attention models "
                "timm.layers.set_fused_attn(False) before creating the model avoids the fused kernel") from e
        logp = F.log_softmax(output_logits(out).float(), -1)
        tangent = fwAD.unpack_dual(logp).tangent
    if tangent is None:
        return torch.zeros_like(logp)
    return tangent.float()


#: Default length of the parameter step of :func:`finite_difference_scores` relative to the
#: parameters' norm, ``||eps v|| = FD_RELATIVE_STEP * ||theta||`` (norms over the parameters named in
#: ``v``): about 100 fp32 ulps per parameter. Smaller steps drown the difference in the forwards'
#: rounding (error ~ 1/step), larger ones cross more ReLU/max-pool kinks and add curvature; measured
#: on SmallCNN and resnet18, the error is flat between 3e-6 and 3e-5 (docs/benchmarks.md,
#: "Finite-difference scores").
FD_RELATIVE_STEP = 1e-5


#: Largest change of a log-probability that the step of :func:`finite_difference_scores` may cause
#: before the base is taken not to be ``log p(x; theta)`` of the rows (``base_tolerance``).
REPLAY_TOLERANCE = 0.01


class BaseMismatchError(ShapeError):
    """The base log-probabilities given to :func:`finite_difference_scores` are not those of its forward."""


def finite_difference_scores(
    model: nn.Module,
    inputs,
    v: Dict[str, torch.Tensor],
    *,
    bn: str = "eval",
    eps: Union[None, float, torch.Tensor] = None,
    base_log_probs: Optional[torch.Tensor] = None,
    replay: Optional[ForwardReplay] = None,
    base_tolerance: Optional[float] = None,
) -> torch.Tensor:
    """``g`` (B, C) from no-grad forwards at parameters moved along ``v``: a stand-in for
    :func:`full_scores` that needs only plain forwards (no forward-mode formulas, no tangents).

    ``replay`` (with ``base_log_probs`` from the training forward it describes, see
    :class:`~augplug.heads.ForwardReplay`): the forward reruns the training forward itself, every
    module in its current mode (``bn`` is not used: BatchNorm in training mode takes the batch's
    statistics) and the random generators reset, so dropout draws the same masks; the module's
    buffers (BatchNorm's running statistics) are not touched and the generators are left as they were.
    ``base_tolerance``: with ``base_log_probs``, raise :class:`BaseMismatchError` when the moved
    forward's log-probabilities differ from the base by more than this anywhere (the base then did
    not come from a forward of these rows at these parameters; a step of ``FD_RELATIVE_STEP`` moves
    them by far less, ``REPLAY_TOLERANCE``).

    Without ``base_log_probs``: the central difference
    ``(log p(x; theta + eps v) - log p(x; theta - eps v)) / (2 eps)``, two forwards, error O(eps^2).
    With ``base_log_probs`` (``log p(x; theta)``, fp32, from a forward of the same rows with the same
    parameters, BatchNorm in the same ``bn`` mode and dropout off): the one-sided difference, one
    forward, error O(eps). The moved parameters are passed through ``functional_call``; the model's
    own parameters are never modified, and BatchNorm's running statistics are restored.

    ``eps`` (the multiplier of ``v``) defaults to ``FD_RELATIVE_STEP * ||theta|| / ||v||``, computed
    on the device (no host sync). The result is centred, ``g - (p^T g) 1`` with ``p`` the softmax at
    ``theta``, as exact log-softmax scores are. Forwards run in the parameters' precision with
    autocast off; fp16/bf16 parameters are refused, their rounding swamps the difference. At a
    ReLU input exactly 0 (e.g. timm's zero-initialised last BatchNorm of a residual block) the
    central difference takes slope 1/2 where forward mode takes 0.
    """
    net = unwrap_model(model)
    named = _parameters_named_in(net, v, "compute the validation gradient on this model")
    names = list(v)
    thetas = [named[n].detach() for n in names]
    low = sorted({str(t.dtype) for t in thetas if t.dtype not in (torch.float32, torch.float64)})
    if low:
        raise ConfigurationError(f"finite-difference scores need fp32 or fp64 parameters, got {', '.join(low)}",
                                 "keep the parameters in fp32 (autocast is fine) or use full_scores")
    tangents = [v[n].to(t.dtype) for n, t in zip(names, thetas)]
    device_type = inputs.device.type if torch.is_tensor(inputs) else "cpu"
    one_sided = base_log_probs is not None
    if thetas:
        dtype, device = thetas[0].dtype, thetas[0].device
        if eps is None:
            theta_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(thetas)).to(dtype))
            v_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tangents)).to(dtype))
            # v = 0 gives a finite eps and a zero difference; theta = 0 falls back to a unit scale
            eps = FD_RELATIVE_STEP * torch.where(theta_norm > 0, theta_norm, torch.ones_like(theta_norm)) \
                / v_norm.clamp_min(torch.finfo(dtype).tiny)
        else:
            eps = torch.as_tensor(eps, dtype=dtype, device=device)

    step = torch._foreach_mul(tangents, eps) if thetas else []  # eps v, once for both sides

    def logits(sign: int) -> torch.Tensor:
        """The logits at ``theta + sign * eps v``."""
        if sign == 0:
            moved = thetas
        else:
            moved = torch._foreach_add(thetas, step) if sign > 0 else torch._foreach_sub(thetas, step)
        out = output_logits(functional_call(net, dict(zip(names, moved)), (x,), strict=False))
        return out if out.dtype == torch.float64 else out.float()

    x = inputs
    rows = x.shape[0] if torch.is_tensor(x) and x.dim() > 0 else None
    if one_sided and (base_log_probs.dim() != 2 or (rows is not None and base_log_probs.shape[0] != rows)):
        raise ShapeError(f"base_log_probs has shape {tuple(base_log_probs.shape)} for {rows} input rows",
                         "pass log_softmax of the logits of exactly these rows, shape (rows, classes)")
    if replay is not None and not one_sided:
        raise ConfigurationError("replay= needs base_log_probs=", "pass log_softmax of the training forward's logits")
    # the rerun of a training forward updates copies of the buffers (BatchNorm's running statistics),
    # never the module's own, which the training forward's graph may still need
    modes = scoring_mode(net, bn) if replay is None else buffers_on_copies(net)
    rng = replay.rng() if replay is not None else nullcontext()
    with torch.no_grad(), modes, rng, torch.autocast(device_type, enabled=False), preserved_parameters(net):
        if torch.is_tensor(x) and x.is_floating_point() and thetas:
            x = x.to(thetas[0].dtype)
        if not thetas:
            return torch.zeros_like(logits(0), dtype=torch.float32)
        upper = logits(1)
        if one_sided:
            base = base_log_probs.detach().to(upper.dtype)
            if base.shape != upper.shape:
                raise ShapeError(f"base_log_probs has shape {tuple(base.shape)}, the model gives "
                                 f"{tuple(upper.shape)}", "pass log_softmax of the logits of exactly these rows")
            gap = F.log_softmax(upper, -1) - base
            if base_tolerance is not None and bool(gap.abs().amax() > base_tolerance):
                raise BaseMismatchError(
                    f"base_log_probs differ from the forward's log-probabilities by {float(gap.abs().amax()):.3g} "
                    f"(tolerance {base_tolerance:g})",
                    "pass log_softmax of the logits the model returned for exactly these inputs")
            d = gap / eps
            p = base.exp()
        else:
            lower = logits(-1)
            d = (upper - lower) / (2 * eps)
            p = torch.softmax((upper + lower) / 2, -1)
        # the log-softmax Jacobian is (I - 1 p^T) times the logit Jacobian: centring the difference
        # gives p^T g = 0 exactly, and y^T g = (y - p)^T d damps the rounding noise of confident rows
        g = d - (p * d).sum(-1, keepdim=True)
    return g.float()


def double_backward_scores(model: nn.Module, inputs, v: Dict[str, torch.Tensor], *, bn: str = "eval") -> torch.Tensor:
    """``g`` (B, C) by reverse-over-reverse differentiation (fallback for layers without forward AD).

    The same quantity as :func:`full_scores`, ``J(x) v`` over every parameter named in ``v``: a frozen
    parameter (``requires_grad=False``) that ``v`` covers is differentiated through a detached copy
    that requires grad, passed by ``functional_call`` (its ``requires_grad`` flag is never changed).
    A :class:`ConfigurationError` names parameters ``v`` has that the model lacks; a :class:`GradSum`
    is taken as its ``direction()``.
    """
    net = unwrap_model(model)
    v = _as_direction(v)
    named = _parameters_named_in(net, v, "compute the validation gradient on this model")  # tied: each name
    names = list(v)
    # frozen parameters named in v: a leaf per tensor (tied names share it), passed to functional_call
    leaves: Dict[int, torch.Tensor] = {}
    frozen = {n: leaves.setdefault(id(named[n]), named[n].detach().requires_grad_())
              for n in names if not named[n].requires_grad}
    wrt = [frozen.get(n, named[n]) for n in names]
    with torch.enable_grad(), scoring_mode(net, bn):
        if frozen:
            with preserved_parameters(net):
                out = functional_call(net, frozen, (inputs,), strict=False)
            logp = F.log_softmax(output_logits(out).float(), -1)
        else:
            logp = F.log_softmax(_forward_logits(net, inputs).float(), -1)
        zeta = torch.zeros_like(logp, requires_grad=True)
        u = torch.autograd.grad((zeta * logp).sum(), wrt, create_graph=True, allow_unused=True)
        check_reached(logp, names, u, "the scores")
        dot = sum((ui.float() * v[n].float()).sum() for n, ui in zip(names, u) if ui is not None)
        if not torch.is_tensor(dot) or not dot.requires_grad:
            return torch.zeros_like(logp).detach()
        (g,) = torch.autograd.grad(dot, zeta)
    return g.detach().float()


_warned_fallback = set()


def class_scores(
    model: nn.Module,
    inputs=None,
    v: Optional[Dict[str, torch.Tensor]] = None,
    *,
    mode: str = "full",
    features: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
    head_name: Optional[str] = None,
    bn: str = "eval",
) -> torch.Tensor:
    """Class-score vectors ``g = J_logsoftmax(x) v`` (B, C), fp32, "positive = helps".

    ``mode="full"``/``"double_backward"`` need ``inputs``; ``"last_layer"`` needs the classifier's
    input ``features``, the ``logits`` and ``head_name`` (to read ``v[head_name + '.weight']``);
    ``"auto"`` tries ``"full"`` and falls back to ``"double_backward"`` when an operation has no
    forward-mode derivative (the two give the same numbers, frozen parameters named in ``v`` included).
    ``v``: the direction (``name -> tensor``), or the :class:`GradSum` whose ``direction()`` it is.
    """
    if v is None:
        raise ConfigurationError("class_scores needs the validation direction v",
                                 "compute it with validation_gradient(...).direction()")
    v = _as_direction(v)
    if mode == "last_layer":
        if features is None or logits is None or head_name is None:
            raise ConfigurationError("last-layer scores need features=, logits= and head_name=",
                                     "pass the classifier's input features and the logits")
        v_weight = v.get(f"{head_name}.weight")
        if v_weight is None:
            raise ConfigurationError(
                f"the validation direction has no entry {head_name + '.weight'!r} for head_name={head_name!r} "
                f"(it has {sorted(v)[:4]})",
                "pass head_name= the classifier's name in the model, as given to validation_gradient(head_name=)")
        return last_layer_scores(features, logits, v_weight, v.get(f"{head_name}.bias"))
    if inputs is None:
        raise ConfigurationError(f"mode={mode!r} needs the model inputs",
                                 "pass inputs= (the batch fed to the model)")
    if mode == "full":
        return full_scores(model, inputs, v, bn=bn)
    if mode == "double_backward":
        return double_backward_scores(model, inputs, v, bn=bn)
    if mode == "auto":
        try:
            return full_scores(model, inputs, v, bn=bn)
        except ForwardModeUnsupportedError as e:
            msg = str(e.__cause__)
            key = type(unwrap_model(model)).__name__
            if key not in _warned_fallback:
                _warned_fallback.add(key)
                warnings.warn(f"forward-mode AD is not available for an operation in {key} ({msg.splitlines()[0][:120]}); "
                              "using double-backward scores instead", RuntimeWarning, stacklevel=2)
            try:
                return double_backward_scores(model, inputs, v, bn=bn)
            except RuntimeError as e2:
                raise UnsupportedModelError(
                    f"{key} supports neither forward-mode AD nor double backward: {str(e2).splitlines()[0][:200]}",
                    "use mode='last_layer' (closed form on the linear head); for attention models disable fused "
                    "attention (timm.layers.set_fused_attn(False))") from e2
    raise ConfigurationError(f"unknown score mode {mode!r}", f"use one of {SCORE_MODES}")
