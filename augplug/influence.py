"""Influence functions: :class:`InfluenceScorer`, the influence of up-weighting or replacing samples.

After Lee, Park, Pham, Yoo (CVPR 2020) and Lee & Yoo (ICLR 2019 precursor).

Notation: ``theta`` are the parameters scored (by default the linear head ``z = W a + b``),
``H`` the Hessian of the **mean** training loss with respect to ``theta``, ``lambda`` the damping,
``grad L_val`` the gradient of the mean validation loss, and

    s_val = (H + lambda I)^-1 grad L_val.

Koh & Liang's influence of up-weighting a training point ``z`` is ``I_up(z) = -s_val^T grad l(z)``
(negative = up-weighting ``z`` lowers the validation loss). Replacing ``z`` by its augmented version
``z~`` (weight ``+eps`` on ``z~``, ``-eps`` on ``z``) has the influence

    I(z -> z~) = -s_val^T (grad l(z~) - grad l(z)),

and with ``eps = 1/n`` the validation loss changes by about ``I(z -> z~) / n``.

**Sign used by augplug** ("positive = helps", like every score the package returns)::

    upweight score    = -I_up(z)        =  s_val^T grad l(z)
    replacement score = -I(z -> z~)     =  s_val^T (grad l(z~) - grad l(z))

A positive replacement score predicts that training on ``z~`` instead of ``z`` **lowers** the
validation loss (by about ``score / n``). Koh & Liang's ``I_up`` is the negative of the upweight
score; :meth:`InfluenceScorer.koh_liang_i_up` returns it for comparison with other libraries.

The connection to the class scores ``g = J(x) v`` of :mod:`augplug.scores` (``J`` the Jacobian of
``log softmax``): the per-sample gradient is ``grad l(x, y) = -J(x)^T y``, so with the direction
``u = -s_val = (H + lambda I)^-1 v`` (``v = -grad L_val``)::

    h(x) = J(x) u          ("influence class scores", (B, C))
    upweight score         =  y^T h(x)
    replacement score      =  y~^T h(x~) - y^T h(x)

so the influence scores are the refiner's class scores along ``u`` instead of ``v``.

Curvature (``H``): ``scope="last_layer"`` uses the exact closed form of
:mod:`augplug.curvature` over cached penultimate features; ``scope="full"`` takes Hessian-vector
products of the mean training cross-entropy with respect to any set of model parameters by double
backward (``hvp="double_backward"``) or ``torch.func`` forward-over-reverse (``hvp="func"``), over a
list of training batches (small models). The solves ``(H + lambda I) x = b`` (``"cg"``,
``"explicit"``, ``"lissa"``) come from :mod:`augplug.ihvp`; ``damping > 0`` is required because the
head Hessian is singular along the softmax's shift direction.

The refiner policy built on the scorer, ``method="influence"``, is
:class:`augplug.methods.influence.InfluencePolicy`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .curvature import head_hessian, head_hvp
from .errors import ConfigurationError, NonFiniteError, ShapeError, UnsupportedHeadError, UnsupportedModelError
from .heads import check_closed_form_head
from .ihvp import conjugate_gradient, explicit_solve, lissa, power_iteration
from .options import is_integer, is_real
from .scores import grad_sums, output_logits, scoring_mode

__all__ = ["InfluenceScorer", "SOLVERS", "SCOPES", "check_solver_options"]

SOLVERS = ("cg", "explicit", "lissa")
SCOPES = ("last_layer", "full")


def check_real_option(owner: str, name: str, value: Any, *, minimum: float, strict: bool, example: str,
                      optional: bool = False) -> None:
    """Raise a :class:`ConfigurationError` naming ``owner``'s option ``name`` unless ``value`` is a finite
    number (numpy's included; not a bool, not text, not NaN or inf) above ``minimum`` (``strict``) or at
    least ``minimum``; ``optional``: None is accepted too."""
    if optional and value is None:
        return
    ok = is_real(value) and math.isfinite(float(value)) and (float(value) > minimum if strict
                                                               else float(value) >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigurationError(f"{owner}'s {name} must be a finite number {bound}"
                                 f"{' or None' if optional else ''}, got {value!r}", f"pass e.g. {name}={example}")


def check_integer_option(owner: str, name: str, value: Any, *, minimum: int, example: str,
                         optional: bool = False) -> None:
    """Raise a :class:`ConfigurationError` naming ``owner``'s option ``name`` unless ``value`` is an integer
    (numpy's included; not a bool, not a float, not text) of at least ``minimum``; ``optional``: None too."""
    if optional and value is None:
        return
    if not (is_integer(value) and int(value) >= minimum):
        raise ConfigurationError(f"{owner}'s {name} must be an integer >= {minimum}"
                                 f"{' or None' if optional else ''} (not a bool), got {value!r}",
                                 f"pass e.g. {name}={example}")


def check_solver_options(owner: str, *, damping: Any, cg_iters: Any, cg_tol: Any, lissa_depth: Any,
                         lissa_scale: Any) -> None:
    """The numeric solver options shared by :class:`InfluenceScorer` and the influence policy."""
    check_real_option(owner, "damping", damping, minimum=0.0, strict=True, example="1e-2 (1e-3 to 1e-1: the head "
                      "Hessian is singular along the softmax shift, so damping must be > 0)")
    check_integer_option(owner, "cg_iters", cg_iters, minimum=1, example="100")
    check_real_option(owner, "cg_tol", cg_tol, minimum=0.0, strict=False, example="1e-8")
    check_integer_option(owner, "lissa_depth", lissa_depth, minimum=1, example="1000")
    check_real_option(owner, "lissa_scale", lissa_scale, minimum=0.0, strict=True, optional=True,
                      example="None (1.1 times a power-iteration estimate of the largest eigenvalue of "
                              "H + damping I), or a number above that eigenvalue")


def _suggest_head_name(keys: Sequence[str], expected: Sequence[str]) -> Optional[str]:
    """The ``head_name=`` under which a dict with ``keys`` has the scorer's ``expected`` parameters."""
    names = [k.rsplit(".", 1)[-1] for k in expected]                  # "weight", "bias"
    for key in keys:
        if isinstance(key, str) and key.endswith("." + names[0]):
            prefix = key[: -len(names[0]) - 1]
            if all(f"{prefix}.{n}" in keys for n in names):
                return prefix
    if all(n in keys for n in names):
        return "None"
    return None


class InfluenceScorer:
    """``s_val = (H + damping I)^-1 grad L_val`` and the influence of up-weighting / replacing samples.

    Last-layer scope (the default, the paper's practice)::

        scorer = InfluenceScorer(model.fc, damping=1e-2)       # or head_name= to key dicts as "fc.weight"
        scorer.fit(train_features)                              # (N, A): cached penultimate features
        scorer.set_validation(val_features, val_targets)        # computes grad L_val and s_val
        score = scorer.replacement_scores(aug_feats, aug_logits, y_aug, feats, logits, y)   # +: helps

    Full-model scope (small models)::

        scorer = InfluenceScorer(model=net, scope="full")      # params: all trainable (or params=[names])
        scorer.fit(data=[(x, y), ...])                         # training batches for the HVPs
        scorer.set_validation(data=[(xv, yv)])

    All scores follow the package sign (module docstring). Every method that takes features and
    logits is differentiable in them (the augmentation network is trained through
    :meth:`replacement_scores`); ``s_val`` itself is a constant.

    Args:
        head: the ``nn.Linear`` classifier (last-layer scope).
        head_name: prefix for parameter dicts (``"<head_name>.weight"``); ``None`` uses ``"weight"``/``"bias"``.
        model, params: the model and the names of the parameters scored (full scope; default all trainable).
        scope: ``"last_layer"`` or ``"full"``.
        damping: ``lambda`` added to the Hessian (> 0). Put the optimizer's L2 weight decay in it when
            it applies to the scored parameters (it is part of the training objective's Hessian).
        solver: ``"cg"``, ``"explicit"`` or ``"lissa"``.
        cg_iters, cg_tol: conjugate-gradient budget and relative residual tolerance.
        lissa_depth, lissa_scale, lissa_batch: LiSSA recursion depth, scale (``None``: 1.1 times a
            power-iteration estimate of the largest eigenvalue of ``H + lambda I``) and minibatch size
            of the stochastic products (``None``: exact products on all cached data).
        hvp: ``"double_backward"`` or ``"func"`` (``torch.func`` forward-over-reverse), full scope.
        curvature: ``"hessian"`` (exact) or ``"gauss_newton"`` (``J^T (diag p - p p^T) J``: positive
            semi-definite, so CG is safe on non-convex networks), full scope. On a linear head the
            two coincide; last-layer scope is always exact.
        bn: BatchNorm mode of the full-scope passes (``"eval"`` or ``"train"``; running statistics are
            never changed).
        seed: seed of LiSSA's minibatch sampling and the power iteration.
    """

    def __init__(self, head: Optional[nn.Linear] = None, *, head_name: Optional[str] = None,
                 model: Optional[nn.Module] = None, params: Optional[Sequence[str]] = None,
                 scope: str = "last_layer", damping: float = 1e-2, solver: str = "cg", cg_iters: int = 100,
                 cg_tol: float = 1e-10, lissa_depth: int = 1000, lissa_scale: Optional[float] = None,
                 lissa_batch: Optional[int] = None, hvp: str = "double_backward", curvature: str = "hessian",
                 bn: str = "eval", seed: int = 0):
        if scope not in SCOPES:
            raise ConfigurationError(f"scope must be one of {SCOPES}, got {scope!r}", "use 'last_layer' or 'full'")
        if solver not in SOLVERS:
            raise ConfigurationError(f"solver must be one of {SOLVERS}, got {solver!r}", "use 'cg' (the default)")
        check_solver_options("InfluenceScorer", damping=damping, cg_iters=cg_iters, cg_tol=cg_tol,
                             lissa_depth=lissa_depth, lissa_scale=lissa_scale)
        check_integer_option("InfluenceScorer", "lissa_batch", lissa_batch, minimum=1, optional=True,
                             example="None (exact products on all cached data) or a minibatch size such as 64")
        if not (is_integer(seed) and -2 ** 63 <= int(seed) < 2 ** 64):   # torch.Generator.manual_seed's range
            raise ConfigurationError(f"InfluenceScorer's seed must be an integer in [-2**63, 2**64) (not a bool), "
                                     f"got {seed!r}", "pass e.g. seed=0")
        if curvature not in ("hessian", "gauss_newton"):
            raise ConfigurationError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}",
                                     "use 'gauss_newton' when the network's Hessian is indefinite")
        if hvp not in ("double_backward", "func"):
            raise ConfigurationError(f"hvp must be 'double_backward' or 'func', got {hvp!r}", "use 'double_backward'")
        if scope == "last_layer":
            if not isinstance(head, nn.Linear):
                raise UnsupportedHeadError(
                    f"last-layer influence needs an nn.Linear head, got {type(head).__name__}",
                    "pass the final nn.Linear as head=, or use scope='full' with model=")
            check_closed_form_head(head_name or "head", head)
            self.bias = head.bias is not None
        else:
            if model is None:
                raise ConfigurationError("scope='full' needs model=", "pass the model whose parameters are scored")
            named = {n: p for n, p in model.named_parameters() if p.requires_grad}
            names = list(named) if params is None else list(params)
            unknown = [n for n in names if n not in named]
            if unknown or not names:
                raise ConfigurationError(f"unknown or frozen parameter names {unknown[:3]}" if unknown
                                         else "no trainable parameters to score",
                                         "pass names from model.named_parameters() with requires_grad=True")
            self.param_names = names
        self.head, self.head_name, self.model, self.scope = head, head_name, model, scope
        self.damping, self.solver = float(damping), solver
        self.cg_iters, self.cg_tol = int(cg_iters), float(cg_tol)
        self.lissa_depth = int(lissa_depth)
        self.lissa_scale = None if lissa_scale is None else float(lissa_scale)
        self.lissa_batch = None if lissa_batch is None else int(lissa_batch)
        self.hvp_kind, self.curvature, self.bn, self.seed = hvp, curvature, bn, int(seed)
        self._features: Optional[torch.Tensor] = None
        self._probs: Optional[torch.Tensor] = None
        self._data: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
        self._grad_val: Optional[Dict[str, torch.Tensor]] = None
        self._s_val: Optional[Dict[str, torch.Tensor]] = None
        self.info: Dict[str, float] = {}

    # ------------------------------------------------------------------ parameter layout
    def keys(self) -> List[str]:
        """The names of the scored parameters, in the order of the flat vector."""
        if self.scope == "full":
            return list(self.param_names)
        pre = f"{self.head_name}." if self.head_name else ""
        return [pre + "weight"] + ([pre + "bias"] if self.bias else [])

    def _shapes(self) -> Dict[str, torch.Size]:
        if self.scope == "full":
            named = dict(self.model.named_parameters())
            return {n: named[n].shape for n in self.param_names}
        k = self.keys()
        out = {k[0]: self.head.weight.shape}
        if self.bias:
            out[k[1]] = self.head.bias.shape
        return out

    @property
    def dim(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self._shapes().values())

    def flatten(self, d: Dict[str, torch.Tensor]) -> torch.Tensor:
        """A parameter dict as one flat fp64 vector (row-major ``[W | b]`` in last-layer scope)."""
        shapes = self._shapes()
        missing = [k for k in shapes if k not in d]
        if missing:
            raise ConfigurationError(f"the parameter dict lacks {missing}", f"pass a dict with the keys {list(shapes)}")
        if self.scope == "last_layer":
            k = self.keys()
            M = d[k[0]].double()
            if self.bias:
                M = torch.cat([M, d[k[1]].double()[:, None]], 1)
            return M.reshape(-1)
        return torch.cat([d[n].double().reshape(-1) for n in shapes])

    def unflatten(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        shapes = self._shapes()
        if self.scope == "last_layer":
            k = self.keys()
            C = self.head.out_features
            M = x.reshape(C, -1)
            out = {k[0]: M[:, : self.head.in_features].float()}
            if self.bias:
                out[k[1]] = M[:, -1].float()
            return out
        out, i = {}, 0
        for n, s in shapes.items():
            m = int(torch.Size(s).numel())
            out[n] = x[i:i + m].reshape(s).float()
            i += m
        return out

    # ------------------------------------------------------------------ curvature data
    def _head_params(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.head.weight.detach(), (self.head.bias.detach() if self.bias else None)

    def _head_probs(self, features: torch.Tensor) -> torch.Tensor:
        W, b = self._head_params()
        z = features.flatten(1).double() @ W.double().t()
        if b is not None:
            z = z + b.double()
        return torch.softmax(z, -1)

    def fit(self, features: Optional[torch.Tensor] = None, *, data=None) -> "InfluenceScorer":
        """Set the training data the Hessian is taken over.

        Last-layer scope: ``features`` (N, A), the head's inputs for training samples (detached; the
        probabilities use the head's current weights). Full scope: ``data``, a list of ``(inputs,
        targets)`` batches (targets as class indices or probabilities). Clears ``s_val``.
        """
        if self.scope == "last_layer":
            if features is None or features.dim() < 2 or features.shape[0] == 0:
                raise ShapeError("fit() needs a non-empty (N, A) feature tensor in last-layer scope",
                                 "pass the head's input features of training samples")
            a = features.detach().flatten(1)
            if a.shape[1] != self.head.in_features:
                raise ShapeError(f"features have {a.shape[1]} columns, the head takes {self.head.in_features}",
                                 "pass the classifier's input features")
            if not bool(torch.isfinite(a).all()):
                raise NonFiniteError("training features contain NaN/inf", "check the model's forward")
            self._features = a
            self._probs = self._head_probs(a)
        else:
            if not data:
                raise ShapeError("fit() needs data=[(inputs, targets), ...] in full scope", "pass training batches")
            self._data = [(x, y) for x, y in data]
        self._s_val = None
        return self

    def _hvp_flat(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(H + damping I) x for a flat fp64 vector; ``rows`` restricts the data (LiSSA minibatches)."""
        if self.scope == "last_layer":
            if self._features is None:
                raise ConfigurationError("no training features for the Hessian", "call fit(features) first")
            a, p = self._features, self._probs
            if rows is not None:
                a, p = a[rows], p[rows]
            V = x.reshape(self.head.out_features, -1)
            return head_hvp(a, p, V, self.bias).reshape(-1) + self.damping * x
        return self.flatten(self._model_hvp(self.unflatten(x), rows)) + self.damping * x

    @contextmanager
    def _transforms_named(self):
        """Name what the torch.func products (Gauss-Newton, ``hvp="func"``) cannot run through: activation
        checkpointing (saved-tensor hooks) or an operation without a forward-mode rule (the hook-based
        weight norm); ``curvature="hessian"`` with ``hvp="double_backward"`` uses plain autograd."""
        try:
            yield
        except (RuntimeError, NotImplementedError) as e:
            msg = str(e)
            transform = self.curvature == "gauss_newton" or self.hvp_kind == "func"
            if not transform or not (isinstance(e, NotImplementedError) or "saved tensor hooks" in msg
                                     or "forward AD" in msg or "torch.func" in msg or "functorch" in msg):
                raise
            raise UnsupportedModelError(
                f"the influence method's curvature products (torch.func jvp / vjp, curvature={self.curvature!r}, "
                f"hvp={self.hvp_kind!r}) cannot run through this model: {msg.splitlines()[0][:160]}",
                "pass curvature='hessian' with hvp='double_backward' (plain autograd; for the refiner "
                "method='influence', method_options=dict(curvature='hessian')), or use mode='last_layer'") from None

    def _model_hvp(self, v: Dict[str, torch.Tensor], rows=None) -> Dict[str, torch.Tensor]:
        if self._data is None:
            raise ConfigurationError("no training data for the Hessian", "call fit(data=[(x, y), ...]) first")
        from .targets import to_soft_targets
        from torch.func import functional_call, grad, jvp, vjp

        net = self.model
        named = dict(net.named_parameters())
        names = self.param_names
        batches = self._data if rows is None else [self._data[int(i)] for i in rows]
        total = sum(int(x.shape[0]) for x, _ in batches)
        out = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in names}
        device_type = next(iter(named.values())).device.type if named else "cpu"

        def own(buffers):   # copies made inside the transform: BatchNorm in train mode updates them in place
            return {n: b.clone() for n, b in buffers.items()}

        # autocast off: its casts do not carry forward-mode tangents (a raw dtype error inside jvp)
        with scoring_mode(net, self.bn), torch.autocast(device_type, enabled=False), self._transforms_named():
            for x, y in batches:
                if self.curvature == "gauss_newton":
                    buffers = dict(net.named_buffers())
                    fixed = {n: p.detach() for n, p in named.items() if n not in names}

                    def logits_fn(sub, x=x):
                        return output_logits(functional_call(net, ({**fixed, **sub}, own(buffers)), (x,)))

                    primals = {n: named[n].detach() for n in names}
                    tangents = {n: v[n].to(named[n]) for n in names}
                    logits, jv = jvp(logits_fn, (primals,), (tangents,))
                    p = torch.softmax(logits, -1)
                    r = p * jv - p * (p * jv).sum(-1, keepdim=True)
                    _, pullback = vjp(logits_fn, primals)
                    (hv,) = pullback(r)
                elif self.hvp_kind == "func":
                    buffers = dict(net.named_buffers())
                    fixed = {n: p.detach() for n, p in named.items() if n not in names}

                    def loss_fn(sub, x=x, y=y):
                        logits = output_logits(functional_call(net, ({**fixed, **sub}, own(buffers)), (x,)))
                        ys = to_soft_targets(y, logits.shape[1], batch_size=logits.shape[0]).to(logits)
                        return -(ys * F.log_softmax(logits, -1)).sum()

                    primals = {n: named[n].detach() for n in names}
                    tangents = {n: v[n].to(named[n]) for n in names}
                    _, hv = jvp(grad(loss_fn), (primals,), (tangents,))
                else:
                    with torch.enable_grad():
                        logits = output_logits(net(x))
                        ys = to_soft_targets(y, logits.shape[1], batch_size=logits.shape[0]).to(logits)
                        loss = -(ys * F.log_softmax(logits, -1)).sum()
                        gr = torch.autograd.grad(loss, [named[n] for n in names], create_graph=True)
                        dot = sum((g * v[n].to(g)).sum() for g, n in zip(gr, names))
                        hv_list = torch.autograd.grad(dot, [named[n] for n in names], allow_unused=True)
                    hv = {n: (h if h is not None else torch.zeros_like(named[n])) for n, h in zip(names, hv_list)}
                for n in names:
                    out[n] += hv[n].detach().float()
        return {n: t / max(total, 1) for n, t in out.items()}

    def hessian(self) -> torch.Tensor:
        """The dense damped Hessian ``H + damping I`` (D, D), fp64 (small problems only)."""
        if self.scope == "last_layer":
            if self._features is None:
                raise ConfigurationError("no training features for the Hessian", "call fit(features) first")
            H = head_hessian(self._features, self._probs, self.bias)
        else:
            D = self.dim
            eye = torch.eye(D, dtype=torch.float64)
            H = torch.stack([self._hvp_flat(eye[i]) - self.damping * eye[i] for i in range(D)], 1)
            H = (H + H.t()) / 2
        return H + self.damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)

    def hvp(self, v: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``(H + damping I) v`` for a parameter dict."""
        return self.unflatten(self._hvp_flat(self.flatten(v)))

    # ------------------------------------------------------------------ solves
    def solve(self, b: Dict[str, torch.Tensor], x0: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """``(H + damping I)^-1 b`` with the configured solver (``x0`` warm-starts CG)."""
        flat = self.flatten(b)
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteError("the right-hand side of the influence solve holds NaN/inf",
                                 "check the validation gradient")
        dev = self._features.device if self._features is not None else flat.device
        flat = flat.to(dev)
        if self.solver == "explicit":
            x, self.info = explicit_solve(self.hessian().to(dev), flat)
        elif self.solver == "cg":
            start = None if x0 is None else self.flatten(x0).to(dev)
            x, self.info = conjugate_gradient(self._hvp_flat, flat, iters=self.cg_iters, tol=self.cg_tol, x0=start)
        else:
            x, self.info = self._lissa(flat)
        return self.unflatten(x)

    def _lissa(self, flat: torch.Tensor):
        scale = self.lissa_scale
        if scale is None:
            top = power_iteration(self._hvp_flat, flat.numel(), flat.dtype, flat.device, seed=self.seed)
            scale = 1.1 * max(top, self.damping)
        n = self._features.shape[0] if self.scope == "last_layer" else len(self._data)
        if self.lissa_batch is None or self.lissa_batch >= n:
            return lissa(self._hvp_flat, flat, scale=scale, depth=self.lissa_depth)
        g = torch.Generator().manual_seed(self.seed)

        def stochastic(x):
            rows = torch.randperm(n, generator=g)[: self.lissa_batch]
            return self._hvp_flat(x, rows.to(flat.device) if self.scope == "last_layer" else rows)

        return lissa(stochastic, flat, scale=scale, depth=self.lissa_depth)

    # ------------------------------------------------------------------ validation gradient and s_val
    def head_gradient(self, features: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Closed-form gradient of the mean cross-entropy of ``(features, targets)`` w.r.t. the head."""
        from .targets import to_soft_targets

        y = to_soft_targets(targets, self.head.out_features, batch_size=features.shape[0]).double().to(features.device)
        a = features.detach().flatten(1).double()
        r = self._head_probs(a) - y
        k = self.keys()
        out = {k[0]: (r.t() @ a / a.shape[0]).float()}
        if self.bias:
            out[k[1]] = r.mean(0).float()
        return out

    def model_gradient(self, data) -> Dict[str, torch.Tensor]:
        """Gradient of the mean cross-entropy over ``data`` batches w.r.t. the scored parameters (full scope)."""
        from .targets import to_soft_targets

        named = dict(self.model.named_parameters())
        params = [named[n] for n in self.param_names]
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        count = 0
        device_type = params[0].device.type if params else "cpu"
        with scoring_mode(self.model, self.bn), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            for x, y in data:
                logits = output_logits(self.model(x))
                ys = to_soft_targets(y, logits.shape[1], batch_size=logits.shape[0]).to(logits)
                loss = -(ys * F.log_softmax(logits, -1)).sum()
                grads = grad_sums(loss, dict(zip(self.param_names, params)))
                for s, n in zip(sums, self.param_names):
                    s += grads[n]
                count += int(x.shape[0])
        if count == 0:
            raise ShapeError("the validation data hold no samples", "pass at least one non-empty batch")
        return {n: s / count for n, s in zip(self.param_names, sums)}

    def set_validation(self, features: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None, *,
                       data=None, grad: Optional[Dict[str, torch.Tensor]] = None,
                       direction: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Compute ``grad L_val`` and ``s_val = (H + damping I)^-1 grad L_val``; returns ``s_val``.

        Give one of: ``features`` and ``targets`` of the validation set (last-layer scope),
        ``data`` (full scope: validation batches), ``grad`` (``grad L_val`` as a dict) or
        ``direction`` (the refiner's ``v = -grad L_val``).
        """
        given = sum(x is not None for x in (features, data, grad, direction))
        if given != 1:
            raise ConfigurationError("set_validation needs exactly one of features=/targets=, data=, grad=, direction=",
                                     "pass the validation set one way")
        if features is not None:
            if self.scope != "last_layer" or targets is None:
                raise ConfigurationError("features= needs targets= and last-layer scope", "pass both, or data=")
            g = self.head_gradient(features, targets)
        elif data is not None:
            g = self.model_gradient(data) if self.scope == "full" else self._head_gradient_from_data(data)
        elif grad is not None:
            g = self._pick(grad, "grad=")
        else:
            g = {k: -t for k, t in self._pick(direction, "direction=").items()}
        s = self.solve(g, x0=self._s_val)
        self._grad_val, self._s_val = {k: t.detach().clone() for k, t in g.items()}, s
        return s

    def _pick(self, given: Any, what: str) -> Dict[str, torch.Tensor]:
        """The scored parameters' entries of a parameter dict (``grad=`` / ``direction=``), checked:
        a typed error names the keys found and expected (and, in last-layer scope, the ``head_name=``
        that would match them) and any entry of the wrong shape."""
        expected = self.keys()
        if not isinstance(given, Mapping):
            raise ConfigurationError(f"{what} must be a dict of tensors keyed {expected}, got {type(given).__name__}",
                                     f"pass a dict with the keys {expected}")
        missing = [k for k in expected if k not in given]
        if missing:
            found = list(given)
            shown = found[:8] + (["..."] if len(found) > 8 else [])
            problem = f"{what} has the keys {shown}, this scorer expects {expected} (it lacks {missing})"
            hint = _suggest_head_name(found, expected) if self.scope == "last_layer" else None
            if hint is not None:
                raise ConfigurationError(
                    problem + f": the scorer was built with head_name={self.head_name!r}",
                    "build the scorer without head_name= (its keys are then 'weight'/'bias')" if hint == "None" else
                    f"build the scorer with head_name={hint!r} (InfluenceScorer(head, head_name={hint!r})), the "
                    f"classifier's name in the model, as the refiner's validation_direction keys it")
            raise ConfigurationError(problem, f"pass a dict with the keys {expected}"
                                     + (", or build the scorer with the head_name= of the dict's keys"
                                        if self.scope == "last_layer" else ""))
        shapes = self._shapes()
        for k in expected:
            t = given[k]
            if not torch.is_tensor(t) or tuple(t.shape) != tuple(shapes[k]):
                raise ShapeError(f"{what}'s {k!r} is {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}, "
                                 f"the scored parameter has shape {tuple(shapes[k])}",
                                 "pass the gradient or direction of this model's scored parameters")
        return {k: given[k] for k in expected}

    def _head_gradient_from_data(self, data):
        raise ConfigurationError("data= needs scope='full'", "in last-layer scope pass features= and targets=")

    @property
    def s_val(self) -> Dict[str, torch.Tensor]:
        """``(H + damping I)^-1 grad L_val`` (Koh & Liang's ``s_test``), parameter name -> tensor."""
        if self._s_val is None:
            raise ConfigurationError("s_val has not been computed", "call set_validation(...) after fit(...)")
        return self._s_val

    @property
    def grad_val(self) -> Dict[str, torch.Tensor]:
        if self._grad_val is None:
            raise ConfigurationError("the validation gradient has not been computed", "call set_validation(...)")
        return self._grad_val

    @property
    def direction(self) -> Dict[str, torch.Tensor]:
        """``u = -s_val``: the direction whose class scores are the influence class scores."""
        return {k: -t for k, t in self.s_val.items()}

    # ------------------------------------------------------------------ scores (package sign: + helps)
    def class_scores(self, features: Optional[torch.Tensor] = None, logits: Optional[torch.Tensor] = None, *,
                     inputs=None) -> torch.Tensor:
        """Influence class scores ``h = J(x) u`` (B, C), ``u = -s_val``; ``y^T h = -I_up(x, y)``.

        Last-layer scope: from ``features`` (B, A) and ``logits`` (B, C) (differentiable in both;
        logits are recomputed from the features by the head when omitted). Full scope: ``inputs``.
        """
        u = self.direction
        if self.scope == "full":
            from .scores import class_scores
            return class_scores(self.model, inputs, u, mode="full", bn=self.bn)
        k = self.keys()
        if logits is None:
            logits = self.head(features.flatten(1))
        dt = torch.promote_types(features.dtype, torch.float32)  # fp32 at least, fp64 kept
        a = features.flatten(1).to(dt)
        q = a @ u[k[0]].to(a).t()
        if self.bias:
            q = q + u[k[1]].to(a)
        p = torch.softmax(logits.to(dt), -1)
        return q - (p * q).sum(-1, keepdim=True)

    def upweight_scores(self, features=None, logits=None, targets=None, *, inputs=None) -> torch.Tensor:
        """``-I_up(z) = s_val^T grad l(z)`` (B,): positive = up-weighting ``z`` lowers the validation loss."""
        h = self.class_scores(features, logits, inputs=inputs)
        from .targets import to_soft_targets
        y = to_soft_targets(targets, h.shape[1], batch_size=h.shape[0]).to(h)
        return (y * h).sum(-1)

    def koh_liang_i_up(self, features=None, logits=None, targets=None, *, inputs=None) -> torch.Tensor:
        """Koh & Liang's ``I_up(z) = -grad L_val^T H^-1 grad l(z)`` (negative = helps): ``-upweight_scores``."""
        return -self.upweight_scores(features, logits, targets, inputs=inputs)

    def replacement_scores(self, aug_features=None, aug_logits=None, aug_targets=None, features=None, logits=None,
                           targets=None, *, aug_inputs=None, inputs=None) -> torch.Tensor:
        """``-I(z -> z~) = s_val^T (grad l(z~) - grad l(z))`` (B,): positive = the replacement helps.

        Row ``i`` of the augmented tensors pairs with row ``i`` of the original ones. Differentiable
        in ``aug_features`` / ``aug_logits`` (the augmentation network's training signal).
        """
        new = self.upweight_scores(aug_features, aug_logits, aug_targets, inputs=aug_inputs)
        old = self.upweight_scores(features, logits, targets, inputs=inputs)
        if new.shape != old.shape:
            raise ShapeError(f"{new.shape[0]} augmented rows but {old.shape[0]} original rows",
                             "pass one original per augmented row (repeat originals for several views)")
        return new - old

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        return {"features": self._features, "s_val": self._s_val, "grad_val": self._grad_val}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        feats = state.get("features")
        if feats is not None:
            self.fit(feats)
        self._s_val, self._grad_val = state.get("s_val"), state.get("grad_val")
