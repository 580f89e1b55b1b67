"""Redraw the bar plot of a quality or tabular results table from the table itself.

    python -m benchmarks.replot quality/quality_30ep_share tabular/tabular_holdout_letter_share

``benchmarks.quality`` and ``benchmarks.tabular`` draw one bar per (setting, arm) row: the mean and
sample standard deviation of the row's per-seed test accuracies. This draws the same bars from the
"mean ± std" column of ``benchmarks/results/<name>.md`` (as printed there, to two decimals), so a
plot can be redrawn after the plotting helper changes without training anything again. Writes
``benchmarks/results/<name>.png``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .common import results_dir, save_bar_plot

#: the plot titles of the studies whose tables this reads (the quality title names the noise kind)
TITLES = {"quality": "Fashion-MNIST, RandAugment + 30% {noise} corrupted views",
          "tabular": "UCI tables, MLP: CutMix with and without SAflex"}


def read_rows(text: str) -> List[Tuple[str, str, float, float]]:
    """``(setting or data set, arm, mean, std)`` of each row of the table's first block."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[1] == "arm" and cells[2].startswith("test acc % (mean ± std"):
            break
    else:
        raise ValueError("no table with 'arm' and 'test acc % (mean ± std)' columns")
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        mean, std = (float(v) for v in cells[2].split(" ± "))
        rows.append((cells[0], cells[1], mean, std))
    return rows


def replot(name: str) -> Path:
    study = name.split("/", 1)[0]
    if study not in TITLES:
        raise ValueError(f"{name!r}: only {sorted(TITLES)} tables can be redrawn")
    md = results_dir() / f"{name}.md"
    text = md.read_text(encoding="utf-8")
    noise = re.search(r"noise: (\w+)", text)
    title = TITLES[study].format(noise=noise.group(1) if noise else "")
    rows = read_rows(text)
    return save_bar_plot(md.with_suffix(".png"), [f"{s}\n{a}" for s, a, _, _ in rows], [r[2] for r in rows],
                         [r[3] for r in rows], "test accuracy (%)", title)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="+", help="tables under benchmarks/results, without .md (e.g. quality/quality)")
    for name in ap.parse_args(argv).names:
        print(f"wrote {replot(name)}")


if __name__ == "__main__":
    main()
