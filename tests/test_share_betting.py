"""The coin-betting share of benchmarks/share_betting.py (a measured alternative to the default
rule): it reaches its floor under consistent evidence, stays near its start under noise, and keeps
its bounds."""
import math

import torch

from benchmarks.share_betting import BettingShare


def _feed(share, signals):
    for d in signals:
        share.load_state_dict(share.propose(torch.tensor([float(d), 1.0, 0.0, 1.0], dtype=torch.float64)))
    return float(share.value)


def test_consistent_evidence_turns_views_off_and_noise_leaves_them_on():
    g = torch.Generator().manual_seed(0)
    assert _feed(BettingShare(), -1.0 - torch.rand(60, generator=g)) == torch.tensor(1e-3).float().item()
    finals = [_feed(BettingShare(), torch.randn(200, generator=torch.Generator().manual_seed(s))) for s in range(20)]
    assert sorted(finals)[10] > 0.7                 # the median run stays near the start
    # the default walk under the same noise wanders further
    from augplug.share import AdaptiveShare
    walks = [_feed(AdaptiveShare(), torch.randn(200, generator=torch.Generator().manual_seed(s))) for s in range(20)]
    assert sum(abs(math.log(f)) for f in finals) < sum(abs(math.log(w)) for w in walks)


def test_the_bounds_hold_and_a_reversed_signal_comes_back():
    share = BettingShare()
    assert _feed(share, [1.0] * 30) == 1.0          # max_share
    assert _feed(share, [-1.0] * 40) < 0.05         # pulled back in and down at once
