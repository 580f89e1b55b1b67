"""Evidence pooled by cause: weights per (source, class) from agreements accumulated over many rows.

One augmented row's agreement ``a_i = y_i^T g_i`` (its gradient's alignment with the validation
direction) is a noisy reading. When the upstream says which operation or source produced each row
(a RandAugment op, an albumentations transform, a generative model), every row of a group
``k = (source, class)`` is a reading of the same question: does this kind of view help this class?
:class:`PooledEvidence` keeps, per group, exponentially decayed sums over refiner calls (one per update
without gradient accumulation)

    n_k = sum y_ic,    A_k = sum y_ic a_i,    Q_k = sum y_ic a_i^2       (rows i of source s)

(``y_ic``: the row's upstream target mass on class ``c``, 1 for a hard label; ``a_i`` here is the
row's agreement relative to the class, ``d_ic = (y_i^T g_i - r_c) / s``, with ``r_c`` the mean
agreement of the batch's originals of class ``c``, or of its augmented rows of ``c`` where it has no
originals of ``c``, and ``s`` the augmented rows' RMS agreement), and gives each group the weight

    w_k = 2 sigmoid(t_k / T),   t_k = (m_k - m) / sqrt(v_k / n_k),   m_k = A_k / n_k,  v_k = Q_k / n_k - m_k^2,
                                m = sum_k A_k / sum_k n_k

a t-statistic of how much more the group's views fall short of their class's reference than the
views of all groups do, squashed to (0, 2). The overall shortfall ``m`` (augmented views usually
help less than originals) is the share's business, not the weights': subtracting it keeps the
weights' mean near 1, so the mean-1 renormalization cannot blow up tiny differences between groups
that are all near 0. A group whose views consistently fall short more than the others is weighted
down once the evidence is several standard errors strong; a group with little or mixed evidence
stays near 1. Without originals the reference is the class's augmented rows, so only sources within
a class are compared. A row's weight is ``sum_c y_ic w_(s_i, c)``.

The weights of a batch are read from the sums *before* the batch is added: a row's own (noisy)
agreement does not choose its weight, which is the selection bias a per-sample weight carries.
In a process group the batch's sums are all-reduced, so every process keeps the same tables.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from .distributed import all_reduce_sum_, is_distributed
from .errors import ConfigurationError, ShapeError
from .options import is_integer, is_real

__all__ = ["PooledEvidence"]


class PooledEvidence:
    """Per-(source, class) evidence tables (see the module docstring).

    Args:
        num_sources: source ids lie in ``[0, num_sources)``.
        decay: per-call decay of the sums (0.995: the evidence of about the last 200 calls; with k
            micro-batches per update, about 200 / k updates: raise it to ``0.995 ** (1 / k)`` to keep 200).
        temperature: ``T``; a group at ``t = -T`` gets weight ``2 sigmoid(-1) = 0.54``.
    """

    def __init__(self, num_sources: int, *, decay: float = 0.995, temperature: float = 2.0):
        if not is_integer(num_sources) or num_sources < 1:
            raise ConfigurationError(f"the number of sources must be a positive integer, got {num_sources!r}",
                                     "pass how many source ids the upstream uses (e.g. the RandAugment ops)")
        if not (is_real(decay) and 0 < decay <= 1):
            raise ConfigurationError(f"decay must be a number in (0, 1], got {decay!r}", "use decay=0.995")
        if not (is_real(temperature) and 0 < temperature < math.inf):
            raise ConfigurationError(f"temperature must be a positive number, got {temperature!r}", "use temperature=2.0")
        self.num_sources, self.decay, self.temperature = int(num_sources), float(decay), float(temperature)
        #: (3, S, C) fp64: count, sum and sum of squares per group (None until the first update)
        self.tables: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ inputs
    def check_sources(self, sources, rows: int, device) -> torch.Tensor:
        """``sources`` as a (rows,) int64 tensor on ``device``, or a ShapeError naming the problem."""
        fix = f"pass sources= with one id in [0, {self.num_sources}) per row of the batch"
        if sources is None:
            raise ShapeError("pooled evidence needs the source of every row (sources= is missing)", fix)
        s = torch.as_tensor(sources)
        if s.is_floating_point() or s.is_complex() or s.dtype == torch.bool or s.shape != (rows,):
            raise ShapeError(f"sources= must be integer ids of shape ({rows},), got {s.dtype} {tuple(s.shape)}", fix)
        if rows:
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(s.long())).tolist())
            if lo < 0 or hi >= self.num_sources:
                raise ShapeError(f"sources= holds ids in [{lo}, {hi}], outside [0, {self.num_sources})", fix)
        return s.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------ weights and updates
    def weights(self, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(B,)`` fp32 weights of rows with these sources and (B, C) upstream targets."""
        if self.tables is None or self.tables.shape[2] != targets.shape[1]:
            return torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device)
        return (targets.double() * self.group_weights()[sources]).sum(-1).float()

    def t_statistics(self) -> torch.Tensor:
        """``(S, C)`` fp64 ``t_k`` of every group (0 where it has fewer than 2 rows of evidence): its
        mean relative agreement minus that of all groups together, in standard errors."""
        n, total, sq = self.tables.unbind()
        mean = total / n.clamp_min(1e-12)
        var = (sq / n.clamp_min(1e-12) - mean ** 2).clamp_min(0)
        overall = total.sum() / n.sum().clamp_min(1e-12)
        t = (mean - overall) / (var / n.clamp_min(1e-12)).sqrt().clamp_min(1e-12)
        return torch.where(n >= 2, t, torch.zeros_like(t))

    def group_weights(self, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(S, C)`` fp64 weight ``2 sigmoid(t_k / T)`` of every group (``t``: the groups'
        :meth:`t_statistics`, when already computed)."""
        return 2 * torch.sigmoid((self.t_statistics() if t is None else t) / self.temperature)

    def updated(self, sources: torch.Tensor, targets: torch.Tensor, agreements: torch.Tensor,
                reference: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *,
                distributed: bool = False) -> torch.Tensor:
        """The tables after adding a batch (not stored: the caller commits them).

        ``agreements``: (B,) ``y_i^T g_i`` of the augmented rows (raw scores). ``reference``: the
        targets (R, C) and agreements (R,) of the batch's originals. Each row enters its groups with
        ``d_ic = (a_i - r_c) / s``: its agreement minus the class's reference ``r_c`` (the originals'
        mean agreement in class ``c`` where the batch has originals of ``c``, else the augmented
        rows' own mean in ``c``), over ``s``, the RMS of the augmented rows' agreements (the scores'
        scale shrinks as training goes on; ``t`` does not care, the sums should not drift)."""
        y = targets.double()
        a = agreements.double()
        if reference is None:
            reference = (y.new_zeros((0, y.shape[1])), a.new_zeros(0))
        ry, ra = reference[0].double(), reference[1].double()
        per_class = torch.stack([ry.sum(0), (ry * ra[:, None]).sum(0), y.sum(0), (y * a[:, None]).sum(0)])
        scale = torch.stack([(a * a).sum(), a.new_tensor(float(a.shape[0]))])
        if distributed and is_distributed():
            all_reduce_sum_([per_class, scale])
        n_ref, a_ref, n_aug, a_aug = per_class.unbind()
        ref = torch.where(n_ref > 0, a_ref / n_ref.clamp_min(1e-300), a_aug / n_aug.clamp_min(1e-300))
        rms = (scale[0] / scale[1].clamp_min(1)).sqrt().clamp_min(1e-30)
        d = (a[:, None] - ref[None, :]) / rms  # (B, C)
        onehot = torch.zeros(sources.shape[0], self.num_sources, dtype=torch.float64, device=y.device)
        onehot[torch.arange(sources.shape[0], device=y.device), sources] = 1.0
        batch = torch.stack([onehot.t() @ y, onehot.t() @ (y * d), onehot.t() @ (y * d * d)])
        if distributed and is_distributed():
            all_reduce_sum_([batch])
        if self.tables is None or self.tables.shape != batch.shape:
            return batch
        return self.decay * self.tables.to(batch.device) + batch

    # ------------------------------------------------------------------ reading
    def table(self, source_names: Optional[List[str]] = None,
              class_names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
        """One dict per group with evidence: source, class, rows (decayed count), mean agreement,
        t and weight, sorted by weight (the most harmful first)."""
        if self.tables is None:
            return []
        for what, names, count, unit in (("source_names", source_names, self.num_sources, "sources"),
                                         ("class_names", class_names, int(self.tables.shape[2]), "classes")):
            if names is not None and len(names) != count:
                raise ConfigurationError(
                    f"{what} has {len(names)} names for {count} {unit}",
                    "pass one name per source id (id 0 included: the real rows, e.g. 'real')" if what == "source_names"
                    else "pass one name per class, in label order")
        t = self.t_statistics()
        w = self.group_weights(t)
        n, total, _ = self.tables.unbind()
        out = []
        for s, c in (n > 0).nonzero().tolist():
            mean = float(total[s, c] / n[s, c])
            out.append({"source": source_names[s] if source_names else s,
                        "class": class_names[c] if class_names else c,
                        "rows": float(n[s, c]), "mean_agreement": mean, "t": float(t[s, c]),
                        "weight": float(w[s, c])})
        return sorted(out, key=lambda r: r["weight"])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"tables": None if self.tables is None else self.tables.detach().cpu().clone()}

    def check_state(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"tables"}:
            raise ConfigurationError("the pooled evidence state has the wrong keys", "load a state saved by this policy")
        t = state["tables"]
        if t is None:
            return
        if not torch.is_tensor(t) or t.dim() != 3 or t.shape[0] != 3 or t.shape[1] != self.num_sources:
            raise ConfigurationError(f"the pooled evidence tables must have shape (3, {self.num_sources}, C), got "
                                     f"{getattr(t, 'shape', type(t).__name__)}", "load a state saved by this policy")
        if not bool(torch.isfinite(t).all()) or bool((t[0] < 0).any()) or bool((t[2] < 0).any()):
            raise ConfigurationError("the pooled evidence tables hold negative or non-finite counts",
                                     "load an intact checkpoint")

    def load_state_dict(self, state: Dict[str, Any], device=None) -> None:
        self.check_state(state)
        t = state["tables"]
        self.tables = None if t is None else t.to(device=device, dtype=torch.float64).clone()
