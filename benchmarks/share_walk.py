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
    path = results_dir("trust") / f"{args.out}.md"
    path.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
