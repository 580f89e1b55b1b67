"""SAflex (Ding et al., ICLR 2024): a weight and a soft label per augmented sample.

The paper's rules, for upstream target ``y~`` (one-hot or Mixup/CutMix soft) and class scores ``g``:

    w  = 1[y~^T g >= 0], renormalized over the augmented batch
    y' = softmax((g + beta * y~ + G) / tau),   G ~ Gumbel(0, 1) i.i.d.

``y'`` is the entropy- and prior-regularised solution of the per-sample linear program
``max_{y' in simplex} y'^T g``. The weight uses the *upstream* label: because ``p^T g = 0``,
``max_c g_c >= 0`` always, so a learned label would always look helpful.

Options beyond the paper (all documented as deviations in the README):

``normalize="rms"``
    divide ``g`` by its root-mean-square over the batch, so that ``beta`` and ``tau`` keep their
    meaning while the validation gradient shrinks during training.
``normalize="center"``
    first subtract each class column's batch mean: ``g_ic - mean_j g_jc``. The removed part is the
    same for every sample (the validation residual on the bias and on the mean feature); left in, it
    switches whole classes on and off with the validation errors of the moment.
``weighting="soft"``
    ``w = 2 * sigmoid(y~^T g_hat / weight_tau)``, renormalized: a graded version of the hard sign
    test that does not discard borderline clean samples when ``g`` is noisy.
``threshold=t``
    keep samples with ``y~^T g >= t`` (in the units of the possibly normalized ``g``); the paper's
    rule is ``t = 0``.
``prior="log"``
    ``beta * log y~`` instead of ``beta * y~`` (keeps Mixup proportions when ``g`` is 0).
``beta=inf``
    keep the upstream targets (weights only).
``weight_signal="likelihood"``
    decide the weight from the current model's log-likelihood of the upstream label,
    ``l_i = y~_i^T log p_i``, standardised over the batch (``z_i = (l_i - mean l) / std l``), in
    place of the agreement ``y~^T g``: the small-loss criterion of the noisy-label literature (Arpit
    et al. 2017; Han et al. 2018). The same rule (``weighting``, ``weight_tau``, ``threshold``) turns
    ``z`` into weights. The soft labels (finite ``beta``) still come from ``g``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..distributed import all_reduce_sum_, is_distributed
from ..errors import ConfigurationError, ShapeError
from ..options import is_flag, is_integer, is_real
from ..pooled import PooledEvidence
from ..schedule import AUTO_BUDGET
from ..share import resolve_share
from ..targets import check_soft_pair
from ..transfer import to_device
from .base import Policy, RefineContext, renormalize

#: Values of :class:`SAflex`'s ``weighting`` (``saflex_targets`` takes all but ``"auto"``).
SAFLEX_WEIGHTINGS = ("auto", "soft", "hard", "none")

__all__ = ["saflex_targets", "SAflex", "normalize_scores", "standardize", "SAFLEX_PAPER", "WEIGHT_SIGNALS", "POLICY_WEIGHT_SIGNALS"]

#: The paper's rule as :class:`SAflex` options (``SAflex(**SAFLEX_PAPER)`` is ``SAflex.paper()``): hard
#: sign weights normalized over the augmented rows, Gumbel-softmax soft labels with beta = tau = 1 on
#: raw scores, augmented rows at their upstream share of the loss, full refinement in every batch.
SAFLEX_PAPER = dict(beta=1.0, tau=1.0, gumbel=True, weighting="hard", weight_tau=1.0, prior="linear", normalize=None,
                    threshold=0.0, weight_signal="agreement", weight_norm="augmented", aug_weight=1.0, strength=1.0)


def _global_normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    # batch statistics of the global batch: column sums, column sums of squares and the row count
    s = scores.double()
    stats = torch.cat([s.sum(0), s.pow(2).sum(0), s.new_tensor([float(s.shape[0])])]).cpu()
    all_reduce_sum_([stats])
    c = scores.shape[1]
    col_sum, col_sq, n = stats[:c], stats[c:2 * c], float(stats[-1])
    if n == 0:
        return scores
    if how == "center":
        mean = col_sum / n
        ms = float((col_sq - n * mean.pow(2)).clamp_min(0).sum()) / (n * c)
        scores = scores - mean.to(scores)
    else:
        ms = float(col_sq.sum()) / (n * c)
    return scores / max(ms ** 0.5, 1e-12)


def normalize_scores(scores: torch.Tensor, how: Optional[str], *, distributed: bool = False) -> torch.Tensor:
    """Rescale class scores over the batch.

    ``None``/``"none"``: unchanged. ``"rms"``: divided by the RMS of all entries. ``"center"``: each
    class column minus its batch mean (removes the part of ``g`` shared by every sample, i.e. which
    classes the validation set currently wants more of), then divided by the RMS.
    ``distributed=True``: inside an initialised process group the means and the RMS are those of the
    global batch (one all-reduce; every process must call it).
    """
    if how in (None, "none"):
        return scores
    if how not in ("center", "rms"):
        raise ConfigurationError(f"normalize must be None, 'none', 'rms' or 'center', got {how!r}",
                                 "use 'center', 'rms' or None")
    if distributed and is_distributed():
        return _global_normalize(scores, how)
    if how == "center":
        scores = scores - scores.mean(0, keepdim=True)
        how = "rms"
    return scores / (scores * scores).mean().sqrt().clamp_min(1e-12)


WEIGHT_SIGNALS = ("agreement", "likelihood")
#: values of the SAflex policy's (and the refiner's) ``weight_signal``
POLICY_WEIGHT_SIGNALS = WEIGHT_SIGNALS + ("auto",)


def standardize(values: torch.Tensor, *, distributed: bool = False) -> torch.Tensor:
    """``(x - mean x) / std x`` over a batch of scalars ``(B,)`` (population std; a constant batch
    gives zeros).

    ``distributed=True``: inside an initialised process group the mean and the std are those of the
    global batch (one all-reduce; every process must call it)."""
    if values.dim() != 1:
        raise ShapeError(f"standardize needs one value per row, shape (B,), got {tuple(values.shape)}",
                         "pass a 1-D tensor (e.g. the rows' log-likelihoods)")
    x = values.double()
    moments = torch.stack([x.sum(), x.pow(2).sum(), x.new_tensor(float(x.shape[0]))])
    if distributed:
        all_reduce_sum_([moments])  # a no-op outside a process group
    total, square, n = moments.unbind()
    mean = total / n.clamp_min(1.0)
    std = (square / n.clamp_min(1.0) - mean * mean).clamp_min(0).sqrt()
    return torch.where(std > 1e-12, (x - mean) / std.clamp_min(1e-12), torch.zeros_like(x)).to(values.dtype)


def _check_types(beta, tau, weight_tau, threshold, gumbel) -> None:
    """SAflex's numeric options are numbers (not NaN, not bools, not text) and ``gumbel`` a flag."""
    for name, value in (("beta", beta), ("tau", tau), ("weight_tau", weight_tau), ("threshold", threshold)):
        if not is_real(value):
            raise ConfigurationError(f"SAflex's {name} must be a number, got {value!r}",
                                     f"pass a float, e.g. {name}={SAFLEX_PAPER[name]}")
    if not is_flag(gumbel):
        raise ConfigurationError(f"SAflex's gumbel must be True or False, got {gumbel!r}",
                                 "pass gumbel=False (the default) or gumbel=True")


def saflex_targets(
    scores: torch.Tensor,
    targets: torch.Tensor,
    beta: float = math.inf,
    tau: float = 1.0,
    *,
    gumbel: bool = False,
    generator: Optional[torch.Generator] = None,
    weighting: str = "soft",
    weight_tau: float = 1.0,
    prior: str = "linear",
    normalize: Optional[str] = "center",
    renormalize_weights: bool = True,
    threshold: float = 0.0,
    distributed: bool = False,
    weight_signal: str = "agreement",
    log_probs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAflex weights ``(B,)`` and soft targets ``(B, C)`` from scores and targets.

    ``scores``: ``g`` (B, C), "positive = helps". ``targets``: upstream probabilities (B, C).
    The defaults are augplug's measured rule for per-sample weights (centred, RMS-normalized scores,
    soft weights, upstream labels kept; :class:`SAflex` itself weighs no row by default, see there);
    ``**SAFLEX_PAPER`` minus the mixing options gives the paper's rule
    (``normalize=None, weighting="hard", beta=1, gumbel=True``).
    Weights are renormalized to mean 1 over the batch (all 0 stays all 0) unless
    ``renormalize_weights=False``, which returns them on their absolute scale (1 = neutral).
    The Gumbel noise is drawn on the CPU from ``generator`` (pass one for reproducibility).
    ``distributed=True`` takes the score normalization's batch statistics over all processes.
    ``weight_signal``: ``"agreement"`` (the paper: ``y~^T g``, on the possibly normalized ``g``) or
    ``"likelihood"`` (the standardised ``y~^T log_probs``; pass ``log_probs`` (B, C), the rows'
    log-softmax outputs).
    """
    check_soft_pair(scores, targets)
    _check_types(beta, tau, weight_tau, threshold, gumbel)
    if not 0 < tau < math.inf:
        raise ConfigurationError(f"tau must be a finite number > 0, got {tau}",
                                 "use a small positive tau for sharp labels")
    if not 0 < weight_tau < math.inf:
        raise ConfigurationError(f"weight_tau must be a finite number > 0, got {weight_tau}",
                                 "use a small positive weight_tau for sharp weights, or weighting='hard' / 'none'")
    if beta < 0:
        raise ConfigurationError(f"beta must be >= 0, got {beta}", "beta=0 relabels freely, larger keeps labels")
    if not math.isfinite(threshold):
        raise ConfigurationError(f"threshold must be a finite number, got {threshold}", "use threshold=0.0 (the paper)")
    weighting = "none" if weighting is None else weighting
    if weighting not in ("hard", "soft", "none"):
        raise ConfigurationError(f"weighting must be 'hard', 'soft' or 'none', got {weighting!r}",
                                 "use 'hard' (the paper) or 'soft'")
    if prior not in ("linear", "log"):
        raise ConfigurationError(f"prior must be 'linear' or 'log', got {prior!r}", "use 'linear' (the paper)")
    if weight_signal not in WEIGHT_SIGNALS:
        raise ConfigurationError(f"weight_signal must be one of {WEIGHT_SIGNALS}, got {weight_signal!r}",
                                 "use 'agreement' (the paper) or 'likelihood'")
    if weight_signal == "likelihood" and (log_probs is None or log_probs.shape != targets.shape):
        got = "nothing" if log_probs is None else f"shape {tuple(log_probs.shape)}"
        raise ConfigurationError(f"weight_signal='likelihood' needs log_probs of shape {tuple(targets.shape)}, "
                                 f"got {got}", "pass log_probs=torch.log_softmax(logits, -1) for the same rows")
    y = targets.float()
    g = normalize_scores(scores.float(), normalize, distributed=distributed)
    if weight_signal == "likelihood":
        agreement = standardize((y * log_probs.detach().float()).sum(-1), distributed=distributed)
    else:
        agreement = (y * g).sum(-1)
    if weighting == "hard":
        raw = (agreement >= threshold).float()
    elif weighting == "soft":
        raw = 2 * torch.sigmoid((agreement - threshold) / weight_tau)
    else:
        raw = torch.ones_like(agreement)
    weights = renormalize(raw) if renormalize_weights else raw
    if math.isinf(beta):
        return weights, y
    anchor = y if prior == "linear" else y.clamp_min(1e-6).log()
    z = g + beta * anchor
    if gumbel:
        u = to_device(torch.rand(z.shape, generator=generator, dtype=torch.float32), z.device)
        z = z - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    # shifted by the row maximum first, so that a tiny tau gives one-hot rows instead of inf - inf
    soft = torch.softmax((z - z.amax(-1, keepdim=True)) / tau, -1)
    return weights, soft


class SAflex(Policy):
    """SAflex as a policy: :func:`saflex_targets` with fixed hyperparameters, and how the refiner mixes
    the refined rows into the loss.

    The defaults are augplug's measured ones (``docs/saflex.md``, ``docs/trust.md``): the augmented
    rows' share of the loss learned when originals are in the batch or trained by the rest of the
    loss (``aug_weight="adaptive"``), each view with its upstream label (``beta=inf``) and, within
    the learned share, at weight 1 (``weighting="auto"``: on the trust study per-sample weights
    beside the learned share tied the share alone where the defaults were chosen and cost accuracy on
    small held-out tables); centred, RMS-normalized scores for the per-sample weights
    (``normalize="center"``; the share's statistics, ``stats["scores"]`` and the audits' agreement
    columns use the raw scores ``g``). ``weighting="auto"`` is ``"none"`` under a learned share
    and ``strength="auto"``, and ``"soft"`` otherwise (a fixed ``aug_weight``, per-sample refinement
    asked for with ``strength``, or an option that only acts through per-sample weights:
    ``threshold``, ``weight_tau``, ``weight_signal``, ``weight_norm="class"`` or ``"batch"``):
    ``w = 2 * sigmoid`` of the row's agreement, normalized
    per class for a batch of augmented rows alone (``weight_norm="auto"``). A finite ``beta`` gives
    soft labels. Per-sample refinement applies beside originals (``strength="auto"``); views alone
    are trained as given unless ``strength=1.0``. :meth:`paper` gives the paper's rule.

    ``weight_signal`` also accepts ``"auto"``: ``"likelihood"`` for a batch of augmented rows alone
    and ``"agreement"`` when originals are in it (decided on the global batch in a process group).
    ``weight_norm``, ``aug_weight``, ``strength``: see :class:`~augplug.methods.Policy` and
    :class:`~augplug.AugmentationRefiner`.

    ``pool``: None (no pooled evidence), the number of source ids, or a
    :class:`~augplug.pooled.PooledEvidence`: each augmented row's weight is multiplied by the
    evidence pooled over earlier updates for its (source, class) group; the refiner call then needs
    ``sources=`` (one id per row). Measured not to beat per-sample weights on the trust study
    (``docs/trust.md``); ``refiner.policy.pool.table()`` lists the groups, the most harmful first.
    """

    name = "saflex"
    #: the default schedule's budget (measured: the trust study, the held-out tables, the digits demo)
    auto_budget = AUTO_BUDGET

    def __init__(self, beta: float = math.inf, tau: float = 1.0, *, gumbel: bool = False, weighting: str = "auto",
                 weight_tau: float = 1.0, prior: str = "linear", normalize: Optional[str] = "center",
                 threshold: float = 0.0, weight_signal: str = "agreement", weight_norm: str = "auto",
                 aug_weight="adaptive", strength="auto", pool=None):
        _check_types(beta, tau, weight_tau, threshold, gumbel)   # the values: by saflex_targets below
        self.beta, self.tau, self.gumbel, self.threshold = float(beta), float(tau), bool(gumbel), float(threshold)
        weighting = "none" if weighting is None else weighting  # None: no per-sample weighting, as "none"
        if not (isinstance(weighting, str) and weighting in SAFLEX_WEIGHTINGS):
            raise ConfigurationError(f"weighting must be one of {SAFLEX_WEIGHTINGS}, got {weighting!r}",
                                     "use 'auto' (the default: weight 1 beside a learned share, soft weights "
                                     "elsewhere), 'soft' for a weight per view, 'hard' (the paper) or 'none'")
        self.weighting, self.weight_tau, self.prior, self.normalize = weighting, float(weight_tau), prior, normalize
        if weight_signal not in POLICY_WEIGHT_SIGNALS:
            raise ConfigurationError(f"weight_signal must be one of {POLICY_WEIGHT_SIGNALS}, got {weight_signal!r}",
                                     "use 'agreement' (the paper, the default), 'likelihood' or 'auto'")
        self.weight_signal = weight_signal
        # validate once, eagerly
        saflex_targets(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), self.beta, self.tau, gumbel=False,
                       weighting="soft" if weighting == "auto" else weighting, weight_tau=self.weight_tau,
                       threshold=self.threshold, prior=prior, normalize=normalize,
                       weight_signal="likelihood" if weight_signal == "auto" else weight_signal,
                       log_probs=torch.zeros(1, 2))
        self._set_mixing(weight_norm, aug_weight, strength)
        if weighting == "auto":   # one thing weighs the views: the learned share, or a weight per view
            learned = resolve_share(self.aug_weight)[1] is not None
            by_default = isinstance(self.strength, str) and self.strength == "auto"
            # an option that only acts through per-sample weights asks for them
            weights_asked = (self.threshold != 0.0 or self.weight_tau != 1.0 or self.weight_signal != "agreement"
                             or self.weight_norm not in ("auto", "augmented"))
            self.weighting = "none" if learned and by_default and not weights_asked else "soft"
        if pool is None or isinstance(pool, PooledEvidence):
            self.pool = pool
        elif is_integer(pool):
            self.pool = PooledEvidence(int(pool))
        else:
            raise ConfigurationError(f"pool must be None, a number of sources or a PooledEvidence, got {pool!r}",
                                     "pass pool=<number of source ids>, and sources= to each refiner call")
        self._pending = None
        #: (the call's sources=, its batch size, the checked ids) during a call: the check reads the ids
        #: back (a device sync), so the refiner's check before the call and the refinement share it
        self._checked = None

    # ------------------------------------------------------------------ pooled evidence
    def _sources(self, ctx: RefineContext) -> torch.Tensor:
        """The call's ``sources=`` checked (:meth:`PooledEvidence.check_sources`), once per call: by
        :meth:`check_call` where the refiner called it, else here."""
        checked = self._checked
        if checked is None or checked[0] is not ctx.sources or checked[1] != ctx.batch:
            checked = (ctx.sources, ctx.batch, self.pool.check_sources(ctx.sources, ctx.batch, ctx.targets.device))
        elif checked[2].device != ctx.targets.device:
            checked = checked[:2] + (checked[2].to(ctx.targets.device),)
        self._checked = checked
        return checked[2]

    @property
    def reads_sources(self) -> bool:
        return self.pool is not None

    def check_call(self, *, index=None, sources=None, batch: int = 0) -> None:
        if self.pool is not None and sources is not None:
            device = sources.device if torch.is_tensor(sources) else "cpu"
            self._checked = (sources, batch, self.pool.check_sources(sources, batch, device))

    @property
    def has_state(self) -> bool:
        return self.pool is not None

    def state_dict(self):
        return self.pool.state_dict() if self.pool is not None else None

    def check_state(self, state) -> None:
        if self.pool is not None:
            self.pool.check_state(state)

    def load_state_dict(self, state) -> None:
        if self.pool is not None:
            self.pool.load_state_dict(state)
            self._pending = None

    def observe(self, ctx: RefineContext, scores: torch.Tensor) -> None:
        """Queue this batch's agreements for the pooled evidence (the weights were read before),
        with the originals' agreements as the per-class reference."""
        if self.pool is None:
            return
        rows, y = ctx.rows, ctx.targets[ctx.rows].float()
        sources = self._sources(ctx)[rows]
        reference = None
        if ctx.n_augmented < ctx.batch:
            orig = ~ctx.augmented
            y_orig = ctx.targets[orig].float()
            reference = (y_orig, (y_orig * ctx.scores(orig)).sum(-1))
        self._pending = self.pool.updated(sources, y, (y * scores.float()).sum(-1), reference, distributed=True)

    def commit(self) -> None:
        if self._pending is not None:
            self.pool.tables = self._pending
        self._pending = self._checked = None

    def rollback(self) -> None:
        self._pending = self._checked = None

    @classmethod
    def paper(cls, **overrides) -> "SAflex":
        """The paper's rule (:data:`SAFLEX_PAPER`), with any option overridden."""
        return cls(**{**SAFLEX_PAPER, **overrides})

    def call_inputs(self, ctx: RefineContext):
        extra = {}
        if self.pool is not None:
            extra["sources"] = self._sources(ctx)[ctx.rows]
        if self.weight_signal == "agreement":
            return extra
        extra["log_probs"] = torch.log_softmax(ctx.logits[ctx.rows].detach().float(), -1)
        if self.weight_signal == "auto":
            extra["originals"] = ctx.batch - ctx.n_augmented
        return extra

    def signal_for(self, originals: Optional[int]) -> str:
        """The weight signal for a batch with ``originals`` original rows on this process (``"auto"``:
        decided from the count over all processes, one all-reduce in a process group)."""
        if self.weight_signal != "auto":
            return self.weight_signal
        total = float(originals or 0)
        if is_distributed():
            count = torch.tensor([total], dtype=torch.float64)
            all_reduce_sum_([count])
            total = float(count[0])
        return "likelihood" if total == 0 else "agreement"

    def __call__(self, scores, targets, generator=None, log_probs=None, originals=None, sources=None):
        weights, soft = saflex_targets(scores, targets, self.beta, self.tau, gumbel=self.gumbel, generator=generator,
                                       weighting=self.weighting, weight_tau=self.weight_tau, prior=self.prior,
                                       normalize=self.normalize, renormalize_weights=False, threshold=self.threshold,
                                       distributed=True, weight_signal=self.signal_for(originals),
                                       log_probs=log_probs)
        if self.pool is not None:  # the evidence of earlier batches, pooled by (source, class)
            if sources is None:
                raise ShapeError("SAflex(pool=...) needs the rows' sources", "pass sources= to the refiner call")
            weights = weights * self.pool.weights(sources, targets.float()).to(weights)
        return weights, soft

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, tau={self.tau}, gumbel={self.gumbel}, weighting={self.weighting!r}, "
                f"weight_tau={self.weight_tau}, prior={self.prior!r}, normalize={self.normalize!r}, "
                f"threshold={self.threshold}, weight_signal={self.weight_signal!r}, {self.mixing_repr()}"
                + (f", pool={self.pool.num_sources}" if self.pool is not None else ""))
