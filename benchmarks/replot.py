"""Redraw the bar plot of a quality, tabular or contrastive results table from the table itself.

    python -m benchmarks.replot quality/quality_30ep_share tabular/tabular_holdout_letter_share

``benchmarks.quality``, ``benchmarks.tabular`` and ``benchmarks.contrastive`` draw one bar per row
(setting and arm, or arm): the mean and sample standard deviation of the row's per-seed test
accuracies. This draws the same bars from the
"mean ± std" column of ``benchmarks/results/<name>.md`` (as printed there, to two decimals), so a
plot can be redrawn after the plotting helper changes without training anything again. Writes
``benchmarks/results/<name>.png``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .common import read_markdown_table, results_dir, save_bar_plot

#: the plot titles of the studies whose tables this reads (with the noise kind or share the table names)
TITLES = {"quality": "Fashion-MNIST, RandAugment + 30% {noise} corrupted views",
          "tabular": "UCI tables, MLP: CutMix with and without SAflex",
          "contrastive": "FLYP-style Fashion-MNIST, RandAugment + {percent} corrupted views"}


#: the start of the accuracy column's header
ACCURACY = "test acc % (mean ± std"


def read_rows(text: str) -> List[Tuple[str, float, float]]:
    """``(label, mean, std)`` of each row of the table's first block, the label being the cells
    before the accuracy column on two lines (``"setting\narm"``, or the arm alone)."""
    def is_header(cells):
        return "arm" in cells[:2] and any(c.startswith(ACCURACY) for c in cells)

    cells, body = read_markdown_table(text, is_header, f"'arm' and '{ACCURACY})' columns")
    at = next(k for k, c in enumerate(cells) if c.startswith(ACCURACY))
    rows = []
    for row in body:
        mean, std = (float(v) for v in row[at].split(" ± "))
        rows.append(("\n".join(row[:at]), mean, std))
    return rows


def replot(name: str) -> Path:
    study = name.split("/", 1)[0]
    if study not in TITLES:
        raise ValueError(f"{name!r}: only {sorted(TITLES)} tables can be redrawn")
    md = results_dir() / f"{name}.md"
    text = md.read_text(encoding="utf-8")
    noise, percent = re.search(r"noise: (\w+)", text), re.search(r"(\d+)% of the views", text)
    title = TITLES[study].format(noise=noise.group(1) if noise else "", percent=f"{percent.group(1)}%" if percent else "")
    rows = read_rows(text)
    return save_bar_plot(md.with_suffix(".png"), [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                         "test accuracy (%)", title)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="+", help="tables under benchmarks/results, without .md (e.g. quality/quality)")
    for name in ap.parse_args(argv).names:
        print(f"wrote {replot(name)}")


if __name__ == "__main__":
    main()
