"""The augmented rows' share of the loss, learned online from the class scores.

With originals and augmented rows in one batch the refiner's loss is

    L(lam) = (sum_orig l_i + lam * sum_aug w_i l_i) / (n_orig + lam * sum_aug w_i)

(``lam`` is ``aug_weight``; ``lam -> 0`` is training on the originals alone, ``lam = 1`` the
upstream mixture). After one SGD step ``theta' = theta - eta * grad L`` the validation loss moves, to
first order, by

    d L_val(theta') / d lam = -eta * (W_aug / N) * (n_orig / N) * (a_aug - a_orig)

with ``N = n_orig + lam * W_aug``, ``W_aug = sum_aug w_i`` and ``a = mean of y_i^T g_i`` (the
class-score agreement ``grad l_i . grad L_val``, weighted by ``w`` over the augmented rows). So the
validation loss falls by raising ``lam`` exactly when the (refined) augmented rows' gradients agree
with the validation gradient more than the originals' do. :class:`AdaptiveShare` follows the sign of
that derivative in log space, with steps normalised by a running RMS of ``a_aug - a_orig`` (the
agreements shrink by orders of magnitude during training, the step size should not):

    log lam <- clip(log lam + lr * d / rms(d), log min_share, log max_share),   d = a_aug - a_orig

The signal is first order and one step ahead: it sees label noise at once but not the slower benefit
of augmentation as a regulariser, so it leans toward the originals (README, "Adaptive share").
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from .distributed import all_reduce_sum_, is_distributed
from .errors import ConfigurationError

__all__ = ["AdaptiveShare", "share_agreements"]


def share_agreements(agree_aug: torch.Tensor, weights_aug: torch.Tensor, agree_orig: torch.Tensor,
                     *, distributed: bool = False) -> Optional[Tuple[float, float]]:
    """``(a_aug, a_orig)``: the ``w``-weighted mean agreement of the augmented rows and the mean
    agreement of the originals, over the global batch when ``distributed``; None when either side
    is empty (or all augmented weights are 0), i.e. when the loss does not depend on the share."""
    stats = torch.stack([
        (weights_aug.double() * agree_aug.double()).sum(), weights_aug.double().sum(),
        agree_orig.double().sum(), agree_orig.new_tensor(float(agree_orig.shape[0]), dtype=torch.float64),
    ]).cpu()
    if distributed and is_distributed():
        all_reduce_sum_([stats])
    wa_sum, w_sum, ao_sum, n_orig = (float(t) for t in stats)
    if w_sum <= 0 or n_orig <= 0:
        return None
    return wa_sum / w_sum, ao_sum / n_orig


class AdaptiveShare:
    """The augmented rows' weight ``lam`` in the loss, moved by its first-order validation hypergradient.

    Args:
        lr: step of ``log lam`` per optimizer update, in units of the running RMS of the signal
            (0.01: about 100 consistent updates to change ``lam`` by a factor e).
        init: starting share (1: the upstream mixture).
        min_share, max_share: bounds of ``lam`` (``max_share > 1`` lets augmented rows outweigh
            the originals).
        decay: EMA decay of the signal's mean square.
    """

    def __init__(self, lr: float = 0.01, init: float = 1.0, min_share: float = 1e-3, max_share: float = 1.0,
                 decay: float = 0.99):
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigurationError(f"the share's lr must be a positive number, got {lr}", "use lr=0.01")
        if not (0 < min_share <= init <= max_share and math.isfinite(max_share)):
            raise ConfigurationError(
                f"the share needs 0 < min_share <= init <= max_share < inf, got {min_share}, {init}, {max_share}",
                "use AdaptiveShare(init=1.0, min_share=1e-3, max_share=1.0)")
        if not 0 <= decay < 1:
            raise ConfigurationError(f"decay must be in [0, 1), got {decay}", "use decay=0.99")
        self.lr, self.decay = float(lr), float(decay)
        self.init, self.min_share, self.max_share = float(init), float(min_share), float(max_share)
        self.log_share = math.log(self.init)
        self.mean_square: Optional[float] = None
        self.updates = 0

    @property
    def value(self) -> float:
        return math.exp(self.log_share)

    def propose(self, agreements: Optional[Tuple[float, float]]) -> Dict[str, Any]:
        """The state after one update from ``share_agreements(...)`` (None: unchanged), without
        changing this object; :meth:`load_state_dict` commits it."""
        state = self.state_dict()
        if agreements is None:
            return state
        a_aug, a_orig = agreements
        d = a_aug - a_orig
        if not math.isfinite(d):
            return state
        ms = d * d if self.mean_square is None else self.decay * self.mean_square + (1 - self.decay) * d * d
        step = self.lr * d / math.sqrt(ms) if ms > 0 else 0.0
        state.update(log_share=min(math.log(self.max_share), max(math.log(self.min_share), self.log_share + step)),
                     mean_square=ms, updates=self.updates + 1)
        return state

    def state_dict(self) -> Dict[str, Any]:
        return {"log_share": self.log_share, "mean_square": self.mean_square, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.log_share = float(state["log_share"])
        self.mean_square = None if state["mean_square"] is None else float(state["mean_square"])
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return (f"AdaptiveShare(lr={self.lr}, init={self.init}, min_share={self.min_share}, "
                f"max_share={self.max_share}, decay={self.decay})")
