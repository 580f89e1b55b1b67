"""Properties of the learned scalars (``augplug.online.NormalizedWalk``: the adaptive share and the
refinement strength) under arbitrary signals, found with hypothesis: the scalar stays in its bounds,
only valid signals count, a proposal changes nothing until committed, and a state restored from
``state_dict`` continues exactly like the original."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from augplug.share import AdaptiveShare
from augplug.valve import RefinementStrength

SIGNAL = st.one_of(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
                   st.sampled_from([0.0, 1e-300, -1e-300, float("nan"), float("inf"), -float("inf")]))


def _share_stats(value: float, count: float):
    # [sum_aug w*a, sum_aug w, sum_orig a, n_orig]: d = value - 0 when count > 0
    return torch.tensor([value * count, count, 0.0, 1.0], dtype=torch.float64)


def _strength_stats(value: float, count: float):
    return torch.tensor([value * count, count], dtype=torch.float64)


CASES = {
    "share": (lambda: AdaptiveShare(evidence=None), lambda s: float(s.log_share),
              (math.log(1e-3), 0.0), _share_stats),
    "share-evidence": (lambda: AdaptiveShare(lr=0.05, init=0.5, evidence=2.0), lambda s: float(s.log_share),
                       (math.log(1e-3), 0.0), _share_stats),
    "strength": (lambda: RefinementStrength(init=0.5, lr=0.1), lambda s: float(s.gamma), (0.0, 1.0),
                 _strength_stats),
}


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(sorted(CASES)),
       signals=st.lists(st.tuples(SIGNAL, st.sampled_from([0.0, 1.0, 3.0])), min_size=1, max_size=40),
       cut=st.integers(min_value=0, max_value=40))
def test_walks_stay_in_bounds_count_valid_signals_and_resume_exactly(case, signals, cut):
    make, value, (low, high), stats = CASES[case]
    walk, valid = make(), 0
    twin = None
    for i, (d, count) in enumerate(signals):
        if i == min(cut, len(signals) - 1):  # a resumed twin from this point on
            twin = make()
            twin.load_state_dict(walk.state_dict())
        before = walk.state_dict()
        proposal = walk.propose(stats(d, count))
        assert walk.state_dict() == before  # proposing changes nothing
        walk.load_state_dict(proposal)
        if twin is not None:
            twin.load_state_dict(twin.propose(stats(d, count)))
            assert twin.state_dict() == walk.state_dict()
        signal = d * count / max(count, 1.0) if count > 0 else float("nan")
        valid += int(count > 0 and math.isfinite(d * count) and math.isfinite(signal))
        assert low - 1e-12 <= value(walk) <= high + 1e-12
        assert all(math.isfinite(v) for v in walk.state_dict().values() if not isinstance(v, list))
        assert int(walk.updates) == valid


def _walk(spike_at=None, updates=300, spike=1000.0):
    """A share on a noisy, consistently negative signal (mean -0.3, spread 1), with one signal
    ``spike`` times larger at update ``spike_at``: its log share after each update."""
    g = torch.Generator().manual_seed(0)
    share, out = AdaptiveShare(), []
    for t in range(updates):
        d = float(torch.randn((), generator=g)) - 0.3
        if t == spike_at:
            d *= spike
        share.load_state_dict(share.propose(_share_stats(d, 1.0)))
        out.append(float(share.log_share))
    return out


def test_one_outlying_signal_does_not_freeze_the_walk():
    """One signal a thousand times the others (a loss spike) entered the running RMS whole: the
    RMS grew ~100-fold and every later step was ~100 times smaller for hundreds of updates (the share
    stopped falling: 0.37 after 200 updates where it reached 0.01 without the spike). Clipped at
    10 RMS, the walk after the spike falls about as fast as without it."""
    plain, spiked = _walk(), _walk(spike_at=20)
    fall_plain, fall_spiked = plain[20] - plain[299], spiked[21] - spiked[299]
    assert fall_plain > 1.0
    assert fall_spiked > 0.7 * fall_plain, (fall_plain, fall_spiked)
    assert _walk(spike_at=3) != plain   # before CLIP_AFTER updates a signal is not clipped
