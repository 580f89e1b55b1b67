"""Paired differences between two runs of the trust study (same settings and seeds).

    python -m benchmarks.paired trust/defaults trust/window --out trust/window_vs_exact

Reads ``benchmarks/results/<A>.jsonl`` and ``<B>.jsonl``, matches the refiner arm's runs by data set,
upstream, pattern and seed, and writes a table of B − A in test accuracy (points) with the weights'
AUC of both, to ``<out>.md``.
"""
from __future__ import annotations

import argparse
import shlex
import statistics as st
import sys
from typing import Dict, List, Optional, Tuple

from .common import read_runs, results_dir


def _runs(name: str) -> Dict[Tuple, dict]:
    return {(r["dataset"], r["upstream"], r["pattern"], r["seed"]): r for r in read_runs(name) if r["arm"] == "refiner"}


def _auc(rs: List[dict]) -> Optional[float]:
    vals = [r.get("auc_weight") for r in rs]
    if any(v is None or v != v for v in vals):
        return None
    return st.mean(vals)


def table(a_name: str, b_name: str) -> str:
    a, b = _runs(a_name), _runs(b_name)
    keys = sorted(set(a) & set(b))
    groups: Dict[Tuple, List[Tuple]] = {}
    for k in keys:
        groups.setdefault(k[:3], []).append(k)
    lines = [f"| data set | upstream | pattern | {a_name} | {b_name} | difference (better / equal / worse) | AUC {a_name} / {b_name} |",
             "|---|---|---|---|---|---|---|"]
    diffs: List[float] = []
    for g, ks in groups.items():
        xa = [100 * a[k]["test_acc"] for k in ks]
        xb = [100 * b[k]["test_acc"] for k in ks]
        d = [y - x for x, y in zip(xa, xb)]
        diffs += d
        auc_a, auc_b = _auc([a[k] for k in ks]), _auc([b[k] for k in ks])
        auc = "–" if auc_a is None or auc_b is None else f"{auc_a:.3f} / {auc_b:.3f}"
        sd = lambda v: st.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(f"| {g[0]} | {g[1]} | {g[2]} | {st.mean(xa):.2f} ± {sd(xa):.2f} | {st.mean(xb):.2f} ± {sd(xb):.2f} | "
                     f"{st.mean(d):+.2f} ± {sd(d):.2f} ({sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / "
                     f"{sum(x < 0 for x in d)}) | {auc} |")
    if not diffs:
        raise SystemExit(f"no refiner runs in common between {a_name} and {b_name}")
    summary = (f"All {len(diffs)} paired runs: {st.mean(diffs):+.3f} ± {st.stdev(diffs) if len(diffs) > 1 else 0.0:.3f} "
               f"points; better {sum(x > 0 for x in diffs)}, equal {sum(x == 0 for x in diffs)}, "
               f"worse {sum(x < 0 for x in diffs)}.")
    return "\n".join(lines) + "\n\n" + summary + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="the reference run (name under benchmarks/results/, no extension)")
    ap.add_argument("b", help="the run compared with it")
    ap.add_argument("--out", required=True, help="results name for the table (no extension)")
    args = ap.parse_args(argv)
    text = table(args.a, args.b)
    command = "python -m benchmarks.paired " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    out = results_dir() / f"{args.out}.md"
    out.write_text(f"<!-- {command} -->\n\nTest accuracy (%), mean ± std over seeds; the difference is "
                   f"{args.b} − {args.a}, paired by seed.\n\n" + text, encoding="utf-8")
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
