"""``refiner.stats``: the last call's diagnostics, with scalar summaries computed on first read.

The tensors of a call (weights, soft targets, scores, the augmented mask) are stored as they are;
the scalar summaries (``weight_mean``, ``kept_fraction``, ``val_loss``, ...) need values on the host,
which on a GPU means waiting for the device. They are therefore computed only when one of them is
read, all at once, so a training loop that never looks at them never waits for them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, Optional

__all__ = ["StepStats", "SPREAD_KEYS", "weight_spread"]

#: what the refinement decided, as scalars that are not constant by construction
SPREAD_KEYS = ("weight_ess", "moved_weight", "moved_class_weight")


def weight_spread(weights, targets) -> Dict[str, float]:
    """How far the augmented rows' weights ``(n,)`` (upstream targets ``(n, C)``) are from uniform.

    ``weight_ess``: the effective sample size ``(sum w)^2 / sum w^2`` as a fraction of ``n`` (1: all
    equal; ``k/n``: ``k`` rows carry the weight). ``moved_weight``: the share of the total weight moved
    between rows, ``1/2 sum_i |w_i / sum w - 1/n|`` (0 to 1). ``moved_class_weight``: the share moved
    between upstream classes, ``1/2 sum_c |m_c / sum m - n_c / n|`` with ``m_c = sum_i y_ic w_i`` and
    ``n_c = sum_i y_ic`` (0 when every class keeps its share, as ``weight_norm="class"`` makes it).
    NaN without rows or without weight."""
    n = int(weights.shape[0])
    total = float(weights.sum()) if n else 0.0
    if n == 0 or total <= 0:
        return {k: float("nan") for k in SPREAD_KEYS}
    w = weights.double()
    y = targets.double()
    share = w / w.sum()
    mass, count = (y * w[:, None]).sum(0), y.sum(0)
    return {"weight_ess": float(w.sum() ** 2 / (w.pow(2).sum() * n)),
            "moved_weight": float(0.5 * (share - 1.0 / n).abs().sum()),
            "moved_class_weight": float(0.5 * (mass / mass.sum() - count / count.sum()).abs().sum())}


class StepStats(Mapping):
    """A read-only mapping of one refiner call's diagnostics.

    ``eager`` holds the entries available at once; ``summaries`` is called at most once, on the first
    read of any other key (or of the whole mapping: ``dict(stats)``, ``stats.items()``), and returns
    the scalar summaries as Python floats.
    """

    #: the scalar summaries of a refiner call
    SUMMARY_KEYS = ("weight_mean", "weight_std", "kept_fraction", "relabel_rate", "agreement_mean", "val_loss")

    def __init__(self, eager: Dict[str, Any], summaries: Optional[Callable[[], Dict[str, float]]] = None,
                 summary_keys: tuple = SUMMARY_KEYS):
        self._eager = dict(eager)
        self._summaries = summaries
        self._keys = tuple(self._eager) + (tuple(k for k in summary_keys if k not in self._eager)
                                           if summaries is not None else ())
        self._computed: Optional[Dict[str, float]] = None

    def _all(self) -> Dict[str, Any]:
        if self._computed is None:
            self._computed = self._summaries() if self._summaries is not None else {}
        return self._computed

    def __getitem__(self, key: str) -> Any:
        if key in self._eager:
            return self._eager[key]
        if key in self._keys:
            return self._all()[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        scalars = {k: v for k, v in self.items() if isinstance(v, (bool, int, float))}
        return f"StepStats({scalars})"
