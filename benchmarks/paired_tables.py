"""Paired differences between rows of committed result tables, matched by seed.

    python -m benchmarks.paired_tables REFERENCE COMPARED

Each side names one row of one or more tables under ``benchmarks/results/``:
``table[+table...]:setting:arm`` for quality and tabular tables (the row whose first two cells are
``setting`` and ``arm``, its per-seed column read against the table's ``seeds [...]``), or
``table:arm`` for a demo table (its "Per seed (a to b): arm v / v / ...;" line). Tables joined by ``+``
pool their seeds (e.g. three runs of three seeds each). A REFERENCE of several rows separated by
``,`` is their per-seed maximum (the better of two controls on each seed). Prints the mean ± standard
deviation of COMPARED − REFERENCE over the common seeds, with how many seeds are better, equal and
worse.
"""
from __future__ import annotations

import argparse
import re
from typing import Dict, List, Optional, Sequence

from .common import mean_std, read_markdown_table, results_dir


def _seeds(text: str) -> List[int]:
    found = re.search(r"seeds \[([\d, ]+)\]", text)
    if not found:
        raise ValueError("the table names no seeds [...]")
    return [int(s) for s in found.group(1).split(",")]


def row_values(table: str, setting: Optional[str], arm: str) -> Dict[int, float]:
    """``{seed: accuracy}`` of one row of ``benchmarks/results/<table>.md``."""
    text = (results_dir() / f"{table}.md").read_text(encoding="utf-8")
    if setting is None:  # a demo table: "Per seed (3 to 9): none 98.4 / ...; upstream ..."
        line = next((ln for ln in text.splitlines() if ln.startswith("Per seed")), None)
        if line is None:
            raise ValueError(f"{table}: no 'Per seed' line")
        first, last = (int(v) for v in re.search(r"\((\d+) to (\d+)\)", line).groups())
        for part in line.split(":", 1)[1].rstrip(".").split(";"):
            name, values = part.strip().split(" ", 1)
            if name == arm:
                return dict(zip(range(first, last + 1), (float(v) for v in values.split(" / "))))
        raise ValueError(f"{table}: no arm {arm!r} in its 'Per seed' line")
    seeds = _seeds(text)
    header, body = read_markdown_table(text, lambda cells: "per seed" in cells, f"a 'per seed' column ({table})")
    at = header.index("per seed")
    for cells in body:
        if cells[0] == setting and cells[1] == arm:
            values = [float(v) for v in cells[at].split(" / ")]
            if len(values) != len(seeds):
                raise ValueError(f"{table}: {len(values)} values for seeds {seeds}")
            return dict(zip(seeds, values))
    raise ValueError(f"{table}: no row {setting!r} / {arm!r}")


def side(spec: str) -> Dict[int, float]:
    """The per-seed values a side names (a ``,``-separated list: their per-seed maximum)."""
    best: Dict[int, float] = {}
    for i, one in enumerate(spec.split(",")):
        tables, *keys = one.split(":")
        setting, arm = (None, keys[0]) if len(keys) == 1 else keys
        values: Dict[int, float] = {}
        for table in tables.split("+"):
            values.update(row_values(table, setting, arm))
        best = values if i == 0 else {s: max(best[s], v) for s, v in values.items() if s in best}
    return best


def compare(reference: str, compared: str) -> str:
    a, b = side(reference), side(compared)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit("no seeds in common")
    d = [round(b[s] - a[s], 6) for s in seeds]
    mean, sd = mean_std(d)
    return (f"{compared} − {reference}, seeds {seeds}: {mean:+.2f} ± {sd:.2f} points "
            f"(better {sum(x > 0 for x in d)}, equal {sum(x == 0 for x in d)}, worse {sum(x < 0 for x in d)})")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("compared")
    args = ap.parse_args(argv)
    print(compare(args.reference, args.compared))


if __name__ == "__main__":
    main()
