"""What the learned share's signal says over a run: ``d = a_aug - a_orig`` by quarter of the updates.

    python -m benchmarks.share_trace

(Satellite, Spambase, Letter and Vehicle; clean, random-label and mild views; seeds 0-4.)

Runs the trust benchmark's refiner arm (``benchmarks.trust.run``, defaults, one-batch pattern unless
``--pattern`` names another) and records the signal the adaptive share steps on at every update
(``AdaptiveShare._signal``: the augmented rows' mean class-score agreement minus the originals'). For
each quarter of the run's updates the table gives the signal's mean over its standard deviation
within the quarter (a per-update signal-to-noise ratio; negative: the views agree with the
validation gradient less than the originals do, and the share falls), averaged over seeds, with the
final share and the test accuracy. One run per seed, in this process (the runs are small).

Writes ``benchmarks/results/trust/<out>.md``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import List, Optional, Sequence

import numpy as np

from .common import results_dir, write_markdown_table


def trace(dataset: str, upstream: str, pattern: str, seed: int, epochs: int, signal: str = "upstream"):
    """``(signals, run record)`` of one refiner run: the share's signal at each update, in order."""
    import augplug.share as share_module
    from . import trust
    signals: List[float] = []
    plain = share_module.AdaptiveShare._signal

    def spy(stats):
        d, valid = plain(stats)
        signals.append(float(d))
        return d, valid

    share_module.AdaptiveShare._signal = staticmethod(spy)
    try:
        options = {"share.signal": signal}
        out = trust.run(dataset, upstream, pattern, "refiner", seed, epochs, options)
    finally:
        share_module.AdaptiveShare._signal = staticmethod(plain)
    return np.asarray(signals), out


def quarters(d: np.ndarray) -> List[float]:
    """Mean over standard deviation of ``d`` in each quarter of its updates."""
    q = len(d) // 4
    return [float(d[i * q:(i + 1) * q].mean() / max(d[i * q:(i + 1) * q].std(), 1e-300)) for i in range(4)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["satellite", "spambase", "letter", "vehicle"])
    ap.add_argument("--upstreams", nargs="+", default=["clean", "random", "mild"])
    ap.add_argument("--pattern", default="batch")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--signal", default="upstream", choices=("upstream", "direction"),
                    help="the share's signal (AdaptiveShare(signal=...)): the default, or per unit of residual")
    ap.add_argument("--out", default="share_trace")
    args = ap.parse_args(argv)
    rows = []
    for dataset in args.datasets:
        for upstream in args.upstreams:
            per_seed, shares, accs, updates = [], [], [], 0
            for seed in args.seeds:
                d, out = trace(dataset, upstream, args.pattern, seed, args.epochs, args.signal)
                per_seed.append(quarters(d))
                shares.append(out["share"])
                accs.append(100 * out["test_acc"])
                updates = len(d)
            mean_q = np.mean(per_seed, axis=0)
            rows.append([dataset, upstream, str(updates), " / ".join(f"{v:+.2f}" for v in mean_q),
                         f"{statistics.median(shares):.3f} ({min(shares):.3f}–{max(shares):.3f})",
                         f"{statistics.mean(accs):.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    given = sys.argv[1:] if argv is None else list(argv)
    cmd = "python -m benchmarks.share_trace" + "".join(" " + a for a in given)
    text = write_markdown_table(
        None, ["data set", "upstream", "updates with a signal", "signal mean / sd by quarter of the run",
               "final share, median (range)", "refiner test accuracy (%)"], rows,
        title="The adaptive share's signal over a run",
        preamble=f"Command: `{cmd}`\n\nRefiner arm of `benchmarks.trust`, defaults (the share's signal "
                 f"`{args.signal}`), pattern `{args.pattern}`, "
                 f"{args.epochs} epochs, seeds {args.seeds}. The signal is `d = a_aug - a_orig` (the views' mean "
                 "class-score agreement with the validation gradient minus the originals'); per quarter of the "
                 "updates, its mean over its standard deviation, averaged over seeds. Negative: the share falls.")
    path = results_dir("trust") / f"{args.out}.md"
    path.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
