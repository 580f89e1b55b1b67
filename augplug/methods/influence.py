"""``method="influence"``: weight each augmented row by the influence of replacing its original with it.

The scores come from :class:`augplug.influence.InfluenceScorer` (notation and the "positive =
helps" sign are in :mod:`augplug.influence`): with ``u = (H + damping I)^-1 v`` (``v`` the refiner's
validation direction), an augmented row ``z~`` paired with its original ``z`` scores
``s_val^T (grad l(z~) - grad l(z))``, computed as the refiner's class scores along ``u``.
This file holds the policy and its functional parts: :func:`pair_rows` (which original each
augmented row replaces) and :func:`influence_weights` (scores to weights).

``InfluenceScorer``, ``conjugate_gradient``, ``lissa``, ``head_hvp`` and ``head_hessian`` are
re-exported here (their homes: :mod:`augplug.influence`, :mod:`augplug.ihvp`, :mod:`augplug.curvature`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..curvature import head_hessian, head_hvp
from ..errors import ConfigurationError, NonFiniteError, ShapeError
from ..finite import nonfinite
from ..ihvp import conjugate_gradient, lissa
from ..influence import InfluenceScorer, check_integer_option, check_real_option, check_solver_options
from ..options import is_real
from .base import Policy, RefineContext, Scoring

__all__ = [
    "conjugate_gradient",
    "lissa",
    "head_hessian",
    "head_hvp",
    "InfluenceScorer",
    "InfluencePolicy",
    "influence_weights",
    "pair_rows",
]


# ----------------------------------------------------------------------------- weights and pairing
def influence_weights(scores: torch.Tensor, *, weighting: str = "soft", temperature: float = 1.0,
                      normalize: Optional[str] = "rms", threshold: Optional[float] = None) -> torch.Tensor:
    """Absolute weights (1 = an ordinary sample) from replacement scores (B,), "positive = helps".

    ``normalize="rms"`` divides by the scores' root-mean-square over the batch (their raw scale
    shrinks as training goes on); ``weighting``: ``"soft"`` ``2 sigmoid(s / temperature)``,
    ``"hard"`` ``1[s >= 0]``, ``"relu"`` ``max(s, 0)``, ``"none"`` all ones. ``threshold`` (in the
    normalized units) additionally filters: rows with ``s < threshold`` get weight 0.
    """
    if weighting not in ("soft", "hard", "relu", "none"):
        raise ConfigurationError(f"weighting must be 'soft', 'hard', 'relu' or 'none', got {weighting!r}",
                                 "use 'soft' (the default)")
    if normalize not in (None, "none", "rms"):
        raise ConfigurationError(f"normalize must be 'rms' or None, got {normalize!r}", "use 'rms'")
    check_real_option("influence_weights", "temperature", temperature, minimum=0.0, strict=True, example="1.0")
    if threshold is not None and not is_real(threshold):
        raise ConfigurationError(f"influence_weights' threshold must be a number or None, got {threshold!r}",
                                 "pass a float in the normalized score units, e.g. threshold=0.0, or None "
                                 "(no filter)")
    s = scores.detach().float()
    if normalize == "rms" and s.numel():
        s = s / s.pow(2).mean().sqrt().clamp_min(1e-30)
    if weighting == "soft":
        w = 2 * torch.sigmoid(s / temperature)
    elif weighting == "hard":
        w = (s >= 0).float()
    elif weighting == "relu":
        w = s.clamp_min(0)
    else:
        w = torch.ones_like(s)
    if threshold is not None:
        w = torch.where(s >= threshold, w, torch.zeros_like(w))
    return w


def pair_rows(augmented: torch.Tensor, index: Optional[torch.Tensor] = None, pairing: str = "auto") -> Optional[torch.Tensor]:
    """For each augmented row (in order), the batch row of its original; ``None`` for ``pairing="none"``.

    ``"position"``: with ``n`` original rows and ``m = k n`` augmented rows, the ``j``-th augmented row
    pairs with the ``(j mod n)``-th original row (both counted in batch order): the layout of
    ``torch.cat([x, aug1(x), aug2(x), ...])`` with ``num_original=n``. ``"index"``: the original row
    with the same dataset index (``index=`` of the refiner call). ``"auto"``: ``"index"`` when an index
    is given, else ``"position"``. Raises :class:`~augplug.errors.ShapeError` when no pairing exists.
    """
    if pairing not in ("auto", "position", "index", "none"):
        raise ConfigurationError(f"pairing must be 'auto', 'position', 'index' or 'none', got {pairing!r}",
                                 "use 'auto'")
    if pairing == "none":
        return None
    aug_rows = augmented.nonzero().flatten()
    orig_rows = (~augmented).nonzero().flatten()
    n, m = orig_rows.numel(), aug_rows.numel()
    if pairing == "index" or (pairing == "auto" and index is not None):
        if index is None:
            raise ConfigurationError("pairing='index' needs index= in the refiner call",
                                     "pass index= (dataset positions of the rows) or use pairing='position'")
        idx = torch.as_tensor(index).to(augmented.device).flatten()
        if idx.numel() != augmented.numel():
            raise ShapeError(f"index= has {idx.numel()} entries for {augmented.numel()} rows", "pass one index per row")
        match = idx[aug_rows][:, None] == idx[orig_rows][None, :]
        found = match.any(1)
        if m and not bool(found.all()):
            bad = aug_rows[~found][:5].tolist()
            raise ShapeError(f"augmented rows {bad} have no original row with the same dataset index in the batch",
                             "include each augmented sample's original in the batch (num_original=...), "
                             "or use pairing='none' (influence of adding the augmented sample)")
        return orig_rows[match.float().argmax(1)] if m else orig_rows[:0]
    if m == 0:
        return orig_rows[:0]
    if n == 0 or m % n != 0:
        raise ShapeError(
            f"cannot pair {m} augmented rows with {n} original rows: the influence of a replacement needs each "
            f"augmented row's original in the batch",
            "put the originals first and their views after, in the same order (torch.cat([x, aug(x)]) with "
            "num_original=len(x); k views per original are fine), pass index= to pair by dataset index, or use "
            "method_options={'pairing': 'none'} to score the augmented rows on their own")
    return orig_rows[torch.arange(m, device=augmented.device) % n]


# ----------------------------------------------------------------------------- the refiner policy
class InfluencePolicy(Policy):
    """``AugmentationRefiner(..., method="influence", method_options={...})``.

    For each augmented row ``z~`` paired with its original ``z`` (see :func:`pair_rows`), the
    replacement score ``s_val^T (grad l(z~) - grad l(z))`` ("positive = helps") is computed with the
    refiner's class scores along ``u = (H + damping I)^-1 v`` (``v`` = the refiner's validation
    direction); weights follow from :func:`influence_weights`, soft targets stay the upstream ones.

    ``H`` is the Hessian of the mean training loss w.r.t. the scored parameters:

    - refiner ``mode="last_layer"``: the closed-form head Hessian over a buffer of the last
      ``buffer_size`` training rows' classifier features (probabilities from the head's current
      weights at solve time);
    - other modes: Hessian-vector products over the last ``buffer_batches`` training batches
      (originals only; inputs and upstream targets), for small models.

    The weights are absolute; the refiner's ``weight_norm`` rescales them (``"augmented"``: mean 1
    over the augmented rows of the global batch). In a process group the curvature buffers, the
    solve and ``normalize="rms"`` use each process's own rows.

    ``u`` is re-solved whenever the refiner recomputes ``v`` (its ``refresh_every``), warm-started
    from the previous solution. ``stats``: after each call ``last_influence`` holds the augmented
    rows' replacement scores and ``solve_info`` the last solve's iterations and residual.

    Reported ``scores`` (the refiner's ``stats["scores"]``): for an augmented row
    ``h(x~) - (y^T h(x)) 1`` (so ``c``-th entry = replacement score if ``x~`` carried class ``c``;
    ``y~^T`` of the row is the replacement score), for an original row ``h(x)``.

    Args:
        damping, solver, cg_iters, cg_tol, lissa_depth, lissa_scale: see :class:`InfluenceScorer`.
        pairing: ``"auto"``, ``"position"``, ``"index"`` or ``"none"`` (score augmented rows by
            their up-weighting influence alone, ``s_val^T grad l(z~)``).
        weighting, temperature, normalize, threshold: see :func:`influence_weights`.
        buffer_size: rows of training features kept for the last-layer Hessian.
        buffer_batches: training batches kept for full-model Hessian-vector products.
        curvature: full-model curvature, ``"gauss_newton"`` (default: positive semi-definite, so CG
            cannot break down on a non-convex network) or ``"hessian"``; unused in last-layer mode,
            where the head Hessian is exact and positive semi-definite.
    """

    name = "influence"
    needs_features = True

    def __init__(self, damping: float = 1e-2, solver: str = "cg", cg_iters: int = 100, cg_tol: float = 1e-8,
                 lissa_depth: int = 1000, lissa_scale: Optional[float] = None, pairing: str = "auto",
                 weighting: str = "soft", temperature: float = 1.0, normalize: Optional[str] = "rms",
                 threshold: Optional[float] = None, buffer_size: int = 2048, buffer_batches: int = 2,
                 curvature: str = "gauss_newton"):
        # every numeric option is checked here, before anything runs (a NaN or a bool would reach the
        # solve at the first refresh, and a NaN weight the model's step)
        owner = "the influence policy"
        check_solver_options(owner, damping=damping, cg_iters=cg_iters, cg_tol=cg_tol, lissa_depth=lissa_depth,
                             lissa_scale=lissa_scale)
        check_real_option(owner, "temperature", temperature, minimum=0.0, strict=True, example="1.0")
        if threshold is not None and not is_real(threshold):   # -inf: no filter, as None
            raise ConfigurationError(f"the influence policy's threshold must be a number or None, got {threshold!r}",
                                     "pass a float in the normalized score units, e.g. threshold=0.0, or None "
                                     "(no filter)")
        check_integer_option(owner, "buffer_size", buffer_size, minimum=1, example="2048")
        check_integer_option(owner, "buffer_batches", buffer_batches, minimum=1, example="2")
        if pairing not in ("auto", "position", "index", "none"):
            raise ConfigurationError(f"pairing must be 'auto', 'position', 'index' or 'none', got {pairing!r}",
                                     "use 'auto'")
        influence_weights(torch.zeros(1), weighting=weighting, temperature=temperature, normalize=normalize)
        # validate the solver options once with a throwaway head
        InfluenceScorer(nn.Linear(1, 2), damping=damping, solver=solver, cg_iters=cg_iters, cg_tol=cg_tol,
                        lissa_depth=lissa_depth, lissa_scale=lissa_scale, curvature=curvature)
        self.curvature = curvature
        self.solver_options = dict(damping=float(damping), solver=solver, cg_iters=int(cg_iters), cg_tol=float(cg_tol),
                                   lissa_depth=int(lissa_depth),
                                   lissa_scale=None if lissa_scale is None else float(lissa_scale))
        self.pairing = pairing
        self.weighting, self.temperature, self.normalize = weighting, float(temperature), normalize
        self.threshold = None if threshold is None else float(threshold)
        self.buffer_size, self.buffer_batches = int(buffer_size), int(buffer_batches)
        self._buffer: Optional[torch.Tensor] = None          # (N, A) features (last-layer mode)
        self._batches: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (inputs, soft targets) (full modes)
        self._u: Optional[Dict[str, torch.Tensor]] = None
        self._u_step = -1
        self.last_influence: Optional[torch.Tensor] = None
        self.solve_info: Dict[str, float] = {}
        # what the policy scores, learned at its calls (set_scoring): a state is checked against it
        self._scoring: Optional[Scoring] = None
        self._classes: Optional[int] = None
        self._unchecked = False     # the state was loaded before the policy knew the model: checked next call

    def set_scoring(self, scoring: Scoring, num_classes: Optional[int] = None) -> None:
        """Tell the policy what it scores (the refiner's :class:`~augplug.methods.base.Scoring`: the
        classifier, mode and scored parameters; and the number of classes). :meth:`refine` does on every
        call; from then on :meth:`check_state` refuses, before anything is loaded, a state saved for
        another model (a buffer of another feature width, a direction ``u`` over other parameters or of
        other shapes, curvature batches of another number of classes). A refiner that calls it before
        loading gets that check for a policy that has not run yet, too."""
        self._scoring = scoring
        if num_classes is not None:
            self._classes = int(num_classes)

    def _layout(self) -> Optional[Dict[str, Any]]:
        """Feature width, classes and ``u``'s names and shapes of what the policy scores (None: not known)."""
        scoring = self._scoring
        if scoring is None:
            return None
        head = scoring.head
        linear = isinstance(head, nn.Linear)
        classes = self._classes if self._classes is not None else (int(head.out_features) if linear else None)
        if scoring.mode == "last_layer":
            u = None
            if linear:
                pre = f"{scoring.head_name}." if scoring.head_name else ""
                u = {pre + "weight": tuple(head.weight.shape)}
                if head.bias is not None:
                    u[pre + "bias"] = tuple(head.bias.shape)
        else:
            u = {n: tuple(p.shape) for n, p in scoring.params().items()}
        return {"width": int(head.in_features) if linear else None, "classes": classes, "u": u}

    def _layout_problem(self, buffer, batches, u, holder: str) -> Optional[Exception]:
        """The first way a buffer / curvature batches / ``u`` do not fit what this policy scores, as
        the error to raise (None when they fit, or while the policy does not know what it scores)."""
        lay = self._layout()
        if lay is None:
            return None
        fix = ("load a state saved by a refiner with the same model (classifier width, number of classes, "
               "mode and scored parameters), or leave the refiner's state out and start afresh")
        if buffer is not None and lay["width"] is not None and buffer.shape[1] != lay["width"]:
            return ShapeError(f"{holder} a feature buffer of {buffer.shape[1]} features per row, but this model's "
                              f"classifier takes {lay['width']} (a state saved with another model?)", fix)
        if lay["classes"] is not None:
            for i, (x, t) in enumerate(batches):
                if t.dim() != 2 or t.shape[1] != lay["classes"] or x.dim() == 0 or x.shape[0] != t.shape[0]:
                    return ShapeError(f"{holder} curvature batch {i} with inputs {tuple(x.shape)} and targets "
                                      f"{tuple(t.shape)}; this model has {lay['classes']} classes, so the targets "
                                      f"must be (rows, {lay['classes']}), one row per input", fix)
        if u is not None and lay["u"] is not None:
            if set(u) != set(lay["u"]):
                return ConfigurationError(f"{holder} a direction u over {sorted(u)}, but this refiner scores "
                                          f"{sorted(lay['u'])} (a state saved with another model or mode?)", fix)
            bad = [k for k in u if tuple(u[k].shape) != lay["u"][k]]
            if bad:
                k = bad[0]
                return ShapeError(f"{holder} a direction u whose {k!r} has shape {tuple(u[k].shape)}, this "
                                  f"model's is {lay['u'][k]} (another number of classes or features?)", fix)
        return None

    @property
    def direction(self) -> Optional[Dict[str, torch.Tensor]]:
        """The current ``u = (H + damping I)^-1 v = -s_val`` (None before the first solve)."""
        return self._u

    def _scorer(self, scoring) -> InfluenceScorer:
        if scoring.mode == "last_layer":
            return InfluenceScorer(scoring.head, head_name=scoring.head_name, **self.solver_options)
        return InfluenceScorer(model=scoring.net, params=list(scoring.params()), scope="full",
                               bn=scoring.bn_mode, curvature=self.curvature, **self.solver_options)

    _STATE = ("_buffer", "_batches", "_u", "_u_step", "solve_info", "last_influence")

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        """Put the buffer and the solved direction back as they were before the failed call."""
        undo, self._undo = getattr(self, "_undo", None), None
        if undo is not None:
            for name, value in zip(self._STATE, undo):
                setattr(self, name, value)

    def refine(self, ctx: RefineContext):
        self._undo = tuple(getattr(self, name) for name in self._STATE)  # attributes are replaced, never mutated
        self.set_scoring(ctx.scoring, ctx.num_classes)
        if self._unchecked:   # a state loaded before the policy knew the model: checked now, before anything runs
            problem = self._layout_problem(self._buffer, self._batches, self._u,
                                           "the influence policy's state (loaded before its first call) holds")
            if problem is not None:
                raise problem
            self._unchecked = False
        y, aug = ctx.targets, ctx.augmented
        B, C = ctx.batch, ctx.num_classes
        weights = torch.ones(B, dtype=torch.float32, device=y.device)
        soft = y.clone()
        scores = torch.zeros(B, C, dtype=torch.float32, device=y.device)
        # validate everything before touching state
        pairs = pair_rows(aug, ctx.index, self.pairing) if ctx.n_augmented else None
        last_layer = ctx.scoring.mode == "last_layer"
        if last_layer:
            feats = ctx.features().detach().float()
            new_buffer = feats if self._buffer is None else torch.cat([self._buffer.to(feats), feats])[-self.buffer_size:]
            new_batches = self._batches
        else:
            x = ctx.inputs()
            keep = ~aug
            if not bool(keep.any()):
                keep = torch.ones_like(aug)
            new_batches = (self._batches + [(x[keep].detach(), y[keep].detach())])[-self.buffer_batches:]
            new_buffer = self._buffer
        if ctx.n_augmented == 0 or not ctx.active:
            self._buffer, self._batches = new_buffer, new_batches
            return weights, soft, scores

        v = ctx.direction()
        u, u_step, info = self._u, self._u_step, self.solve_info
        if u is None or ctx.refreshed or set(u) != set(v):
            scorer = self._scorer(ctx.scoring)
            scorer.fit(new_buffer) if last_layer else scorer.fit(data=new_batches)
            warm = u if (u is not None and set(u) == set(v)) else None
            u = scorer.solve({k: v[k] for k in scorer.keys()}, x0=warm)
            u = {k: t.to(v[k]) for k, t in u.items()}
            u_step, info = ctx.step, dict(scorer.info)
        rows = aug.clone()
        if pairs is not None:
            rows[pairs] = True
        h = torch.zeros(B, C, dtype=torch.float32, device=y.device)
        h[rows] = ctx.scores(rows, u).to(h)
        up = (y * h).sum(-1)                              # s_val^T grad l(x_i, y_i) for every scored row
        aug_rows = aug.nonzero().flatten()
        if pairs is None:
            base = torch.zeros(aug_rows.numel(), device=y.device)
        else:
            base = up[pairs]
        infl = up[aug_rows] - base                        # replacement scores, + = helps
        w = influence_weights(infl, weighting=self.weighting, temperature=self.temperature,
                              normalize=self.normalize, threshold=self.threshold)
        weights[aug_rows] = w.to(weights)
        scores[rows] = h[rows]
        scores[aug_rows] = h[aug_rows] - base[:, None]
        # commit
        self._buffer, self._batches = new_buffer, new_batches
        self._u, self._u_step, self.solve_info = u, u_step, info
        self.last_influence = infl.detach()
        return weights, soft, scores

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        return {
            "buffer": None if self._buffer is None else self._buffer.detach().clone(),
            "batches": [(x.detach().clone(), t.detach().clone()) for x, t in self._batches],
            "u": None if self._u is None else {k: t.detach().clone() for k, t in self._u.items()},
            "u_step": self._u_step,
        }

    def check_state(self, state: object) -> None:
        """Raise (changing nothing) unless ``state`` is a complete, finite influence-policy state that
        fits what this policy scores (buffer width, classes, ``u``'s names and shapes), once it knows
        that (:meth:`set_scoring`; a state loaded before is checked at the next call)."""
        keys = {"buffer", "batches", "u", "u_step"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ConfigurationError("influence policy state has the wrong keys",
                                     "load a state saved by InfluencePolicy.state_dict()")
        buf = state["buffer"]
        if buf is not None and (not torch.is_tensor(buf) or buf.dim() != 2 or not buf.is_floating_point()):
            raise ShapeError("influence policy buffer must be a 2-D tensor", "load a state saved by this policy")
        batches, u = state["batches"], state["u"]
        if not isinstance(batches, list) or not all(isinstance(b, (tuple, list)) and len(b) == 2 and
                                                    all(torch.is_tensor(t) for t in b) for b in batches):
            raise ConfigurationError("influence policy 'batches' must be a list of (inputs, targets) tensor pairs",
                                     "load a state saved by this policy")
        if u is not None and (not isinstance(u, dict) or not all(isinstance(k, str) and torch.is_tensor(t)
                                                                 for k, t in u.items())):
            raise ConfigurationError("influence policy 'u' must be a dict of tensors", "load a state saved by this policy")
        if not isinstance(state["u_step"], int) or isinstance(state["u_step"], bool):
            raise ConfigurationError("influence policy 'u_step' must be an int", "load a state saved by this policy")
        problem = self._layout_problem(buf, batches, u, "the influence policy state holds")
        if problem is not None:
            raise problem
        if nonfinite(buf, batches, u):
            raise NonFiniteError("the influence policy state holds NaN/inf", "load an intact checkpoint")

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.check_state(state)
        buf = state["buffer"]
        self._buffer = None if buf is None else buf.clone()
        self._batches = [(x.clone(), t.clone()) for x, t in state["batches"]]
        self._u = None if state["u"] is None else {k: t.clone() for k, t in state["u"].items()}
        self._u_step = int(state["u_step"])
        self._undo = None
        self._unchecked = self._scoring is None   # check_state could not check it against the model

    def extra_repr(self) -> str:
        o = self.solver_options
        return (f"damping={o['damping']}, solver={o['solver']!r}, pairing={self.pairing!r}, "
                f"weighting={self.weighting!r}, temperature={self.temperature}, normalize={self.normalize!r}, "
                f"threshold={self.threshold}, buffer_size={self.buffer_size}")
