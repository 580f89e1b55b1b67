"""How far the learned share wanders under a signal of pure noise, for each step rule.

    python -m benchmarks.share_walk

When the augmented rows help exactly as much as the originals, the share's signal is pure noise and
``log lam`` does a random walk. Two tables:

1. The spread (standard deviation over 400 walks, started far from the bounds) of ``log lam`` after
   ``T`` updates of standard normal noise, for the default step ``0.2 / sqrt(t)``, the horizon rule
   ``0.4 / sqrt(T)`` and the fixed step 0.01. Each with the running RMS the library uses
   (``augplug.online.normalized_step``: an average started at 0 and bias-corrected) and with the RMS
   used before that correction (an average started at the first square, reimplemented here for the
   comparison).
2. The final share of the four 3,000-update noise walks of
   ``tests/test_share.py::test_pure_noise_moves_the_share_only_with_evidence_off`` (same generator and
   seed), through ``AdaptiveShare`` itself: default step, ``lr=0.01``, and the default step with
   ``evidence=3``.
3. Drift against spread over the 192 updates of an 8-epoch trust run: the mean movement of ``log lam``
   under a consistent signal (per-update signal-to-noise ratio 0.1 to 1: normal noise around a mean
   of -SNR) and its spread under pure noise, for the default step and for a step in units of the
   running t-statistic, ``0.2 / sqrt(t) * clip(m / se, -c, c) / c`` (``m`` the bias-corrected running
   mean of the signal, ``se`` its standard error over ``min(t, 100)`` updates; not a library rule:
   the comparison behind "a faster rule trades spread for speed" in ``docs/trust.md``), and for the
   default step with ``AdaptiveShare(boost=c)`` (the step times ``clip(|z| / 3, 1, c)`` from the
   8th update on, ``z`` the running mean over its standard error).

Writes ``benchmarks/results/trust/share_walk.md``.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, List, Optional, Sequence

import torch

from augplug.online import normalized_step
from augplug.share import WANDER, AdaptiveShare

from .common import results_dir, write_markdown_table

DECAY = 0.99


def spread(updates: int, step: Callable[[int], float], corrected: bool, walks: int = 400, seed: int = 0) -> float:
    """Standard deviation over ``walks`` of the summed normalized steps after ``updates`` updates."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(updates, walks, generator=g, dtype=torch.float64)
    log = torch.zeros(walks, dtype=torch.float64)
    ms = torch.zeros(walks, dtype=torch.float64)
    zero = torch.zeros(walks, dtype=torch.float64)
    for t in range(updates):
        d = noise[t]
        count = torch.full((walks,), t, dtype=torch.int64)
        if corrected:
            s, ms, _, _ = normalized_step(d, count, ms, zero, zero, lr=step(t + 1), decay=DECAY, evidence=None)
        else:  # the rule before the bias correction: an average started at the first square
            ms = d * d if t == 0 else DECAY * ms + (1 - DECAY) * d * d
            s = step(t + 1) * d / ms.clamp_min(1e-300).sqrt()
        log = log + s
    return float(log.std())


def pure_noise_finals() -> List[List[str]]:
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(3000, generator=g, dtype=torch.float64) for _ in range(4)]
    rows = []
    for name, make in (("default step", lambda: AdaptiveShare(evidence=None)),
                       ("lr=0.01", lambda: AdaptiveShare(lr=0.01, evidence=None)),
                       ("default step, evidence=3", lambda: AdaptiveShare(evidence=3.0))):
        finals = []
        for d in noise:
            share = make()
            for v in d:
                share.load_state_dict(share.propose(torch.stack([v.double(), torch.ones((), dtype=torch.float64),
                                                                 torch.zeros((), dtype=torch.float64),
                                                                 torch.ones((), dtype=torch.float64)])))
            finals.append(f"{float(share.value):.2f}")
        rows.append([name, " / ".join(finals)])
    return rows


def drift_and_spread(rule: str, c: Optional[float], snr: float, updates: int = 192, walks: int = 400,
                     seed: int = 0) -> float:
    """Mean (``snr > 0``: the signal's mean is ``-snr``) or spread (``snr == 0``) of ``log lam`` after
    ``updates`` updates of the default step (``rule="walk"``), the t-statistic step (``"t"``, cap ``c``)
    or the default step with ``AdaptiveShare(boost=c)`` (``"boost"``)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(updates, walks, generator=g, dtype=torch.float64) - snr
    log = torch.zeros(walks, dtype=torch.float64)
    zero = torch.zeros(walks, dtype=torch.float64)
    ms, mean, sq = zero.clone(), zero.clone(), zero.clone()
    for t in range(updates):
        d, lr = noise[t], WANDER / (2 * math.sqrt(t + 1))
        if rule in ("walk", "boost"):
            count = torch.full((walks,), t, dtype=torch.int64)
            s, ms, mean, sq = normalized_step(d, count, ms, mean, sq, lr=lr, decay=DECAY, evidence=None,
                                              boost=c if rule == "boost" else None)
        else:
            mean, sq = DECAY * mean + (1 - DECAY) * d, DECAY * sq + (1 - DECAY) * d * d
            corr = 1 - DECAY ** (t + 1)
            m, q = mean / corr, sq / corr
            se = ((q - m * m).clamp_min(1e-24) / min(t + 1, 1 / (1 - DECAY))).sqrt()
            s = lr * (m / se).clamp(-c, c) / c
        log = log + s
    return float(log.std()) if snr == 0 else float(log.mean())


def drift_rows() -> List[List[str]]:
    rows = []
    for name, rule, c in (("default 0.2/sqrt(t) * d/rms(d)", "walk", None),
                          *((f"t-statistic, c = {c}", "t", float(c)) for c in (3, 6, 10, 20)),
                          *((f"default, boost = {c}", "boost", float(c)) for c in (2, 4, 8))):
        sd = drift_and_spread(rule, c, 0.0)
        moves = [drift_and_spread(rule, c, snr) for snr in (0.1, 0.3, 0.5, 1.0)]
        rows.append([name, f"{sd:.2f}", " / ".join(f"{v:.2f}" for v in moves), " / ".join(f"{-v / sd:.1f}" for v in moves)])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, nargs="+", default=[64, 190, 2370])
    ap.add_argument("--out", default="share_walk")
    args = ap.parse_args(argv)
    rows = []
    for updates in args.updates:
        rules = (("default 0.2/sqrt(t)", lambda t: WANDER / (2 * math.sqrt(t))),
                 (f"horizon 0.4/sqrt({updates})", lambda t: WANDER / math.sqrt(updates)),
                 ("fixed 0.01", lambda t: 0.01))
        for name, step in rules:
            rows.append([str(updates), name, f"{spread(updates, step, True):.2f}", f"{spread(updates, step, False):.2f}"])
    cmd = "python -m benchmarks.share_walk" + ("" if argv is None else " " + " ".join(argv))
    text = write_markdown_table(
        None, ["updates T", "step rule", "spread of log lam, RMS bias-corrected (the library's)",
               "spread, RMS started at the first square (before the correction)"], rows,
        title="The learned share under pure noise",
        preamble=f"Command: `{cmd}`\n\n400 walks of standard normal signals, decay {DECAY}; the spread is the "
                 "standard deviation of log lam after T updates (bounds never reached).")
    text += "\n" + write_markdown_table(
        None, ["share", "final share of the four 3,000-update noise walks of the test"], pure_noise_finals(),
        preamble="Through `AdaptiveShare` itself, the noise of "
                 "`tests/test_share.py::test_pure_noise_moves_the_share_only_with_evidence_off` (seed 0).")
    text += "\n" + write_markdown_table(
        None, ["step rule", "spread under pure noise", "mean move at SNR 0.1 / 0.3 / 0.5 / 1",
               "move / spread at SNR 0.1 / 0.3 / 0.5 / 1"], drift_rows(),
        preamble="Drift against spread after 192 updates (an 8-epoch trust run of 3,000 rows), 400 walks, "
                 "the signal normal with mean -SNR and standard deviation 1: how far a consistent signal "
                 "moves log lam, in units of how far pure noise spreads it.")
    path = results_dir("trust") / f"{args.out}.md"
    path.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
