"""An alternative rule for the learned share, measured in the trust benchmark and not adopted:
coin betting (Krichevsky–Trofimov), a parameter-free online learner, in place of the normalized walk.

    python -m benchmarks.trust ... --arms refiner --set share.rule=betting share.wealth=1.0 ...

The share's default rule (:class:`augplug.share.AdaptiveShare`) moves ``log lam`` by ``0.2 / sqrt(t)``
times the signal over its running RMS: a consistent signal moves it at a bounded pace, and pure noise
makes it wander. Coin betting needs no step size. With the normalized signal as a coin
``c_t = clip(d_t / rms, -1, 1)`` it bets ``x_{t+1} = (sum_s c_s) / (t + 1) * W_t`` on ``log lam``
(relative to the start), its wealth ``W_t = W_{t-1} + c_t x_t`` starting at ``wealth``: under pure
noise the bet stays near 0 (the share near its start), and under consistent evidence the wealth, and
with it the move, grows exponentially. The bounds ``[min_share, max_share]`` are kept by the reduction
of Cutkosky and Orabona (2018): outside them the coin that pushes further out counts 0 and the one
that pulls back in counts double (clipped to ``[-1, 1]``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from augplug.online import normalized_step
from augplug.share import AdaptiveShare

__all__ = ["BettingShare"]


class BettingShare(AdaptiveShare):
    """:class:`~augplug.share.AdaptiveShare` with the coin-betting rule above (benchmark use: its extra
    state, the wealth, the coins' sum and the last bet, is not part of a refiner checkpoint's checks)."""

    EXTRA = ("wealth", "coins", "bet")

    def __init__(self, wealth: float = 1.0, **options):
        super().__init__(**options)
        self.initial_wealth = float(wealth)
        self.wealth = torch.tensor(self.initial_wealth, dtype=torch.float64)
        self.coins = torch.tensor(0.0, dtype=torch.float64)
        self.bet = torch.tensor(0.0, dtype=torch.float64)

    def propose(self, stats: Optional[torch.Tensor]) -> Dict[str, Any]:
        if stats is None:
            return {k: getattr(self, k) for k in self._fields() + self.EXTRA}
        d, valid = self._signal(stats)
        dev = d.device
        value, ms_old, updates, test_mean, test_square = (getattr(self, k).to(dev) for k in self._fields())
        unit, ms, _, _ = normalized_step(d, updates, ms_old, test_mean, test_square, lr=1.0, decay=self.decay,
                                         evidence=None)
        coin = unit.clamp(-1, 1)
        bet = self.bet.to(dev)
        low, high = math.log(self.min_share / self.init), math.log(self.max_share / self.init)
        coin = torch.where(bet > high, coin.clamp(max=0) * 2, torch.where(bet < low, coin.clamp(min=0) * 2, coin))
        coin = coin.clamp(-1, 1)
        wealth = self.wealth.to(dev) + coin * bet
        coins = self.coins.to(dev) + coin
        new_bet = coins / (updates + 2).double() * wealth
        log_share = (math.log(self.init) + new_bet).clamp(math.log(self.min_share), math.log(self.max_share))

        def keep(new, old):
            return torch.where(valid, new, old)

        return {"log_share": keep(log_share, value), "mean_square": keep(ms, ms_old), "updates": updates + valid.long(),
                "test_mean": test_mean, "test_square": test_square, "wealth": keep(wealth, self.wealth.to(dev)),
                "coins": keep(coins, self.coins.to(dev)), "bet": keep(new_bet, bet)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        for k in self.EXTRA:
            if k in state:
                v = state[k]
                setattr(self, k, v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64))

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), **{k: float(getattr(self, k)) for k in self.EXTRA}}

    def to(self, device):
        super().to(device)
        for k in self.EXTRA:
            setattr(self, k, getattr(self, k).to(device))
        return self
