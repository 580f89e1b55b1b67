"""Small helpers shared by the benchmark scripts: result paths, statistics,
markdown tables, plots, seeding, thread limits and timing."""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "results_dir",
    "read_runs",
    "mean_std",
    "fmt_mean_std",
    "write_markdown_table",
    "read_markdown_table",
    "set_threads",
    "seed_everything",
    "Timer",
    "save_bar_plot",
]

_BENCH_DIR = Path(__file__).resolve().parent


def parse_value(s: str):
    """A command-line ``KEY=VALUE`` value: int, float (``inf`` too), true / false / none, or the string."""
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(s.lower(), s)


def parse_sets(pairs: Iterable[str]) -> dict:
    """``--set KEY=VALUE`` arguments as a dict of parsed values (:func:`parse_value`)."""
    return {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def share_options(options: dict) -> dict:
    """Refiner options with ``share_*`` keys (``--set share_signal=upstream``, ``--set share_lr=0.02``)
    turned into ``aug_weight=AdaptiveShare(signal=..., lr=...)``; other keys are passed through."""
    share = {k[len("share_"):]: v for k, v in options.items() if k.startswith("share_")}
    out = {k: v for k, v in options.items() if not k.startswith("share_")}
    if share:
        from augplug.share import AdaptiveShare

        out["aug_weight"] = AdaptiveShare(**share)
    return out


def results_dir(study: Optional[str] = None) -> Path:
    """Return ``benchmarks/results/<study>`` (one folder per study; ``benchmarks/results`` without a
    study), created if missing."""
    path = _BENCH_DIR / "results" / study if study else _BENCH_DIR / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_runs(name: str) -> List[Dict]:
    """The runs in ``benchmarks/results/<name>.jsonl`` (``name`` with its study, e.g.
    ``trust/summary``): one JSON object per line, blank lines skipped."""
    path = results_dir() / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of ``values``.

    The standard deviation is ``0.0`` for a single value. Raises ``ValueError``
    for an empty input.
    """
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return mean, std


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, int, int]:
    """Differences ``a[i] - b[i]`` of two runs paired by position (e.g. by seed): their mean and
    sample standard deviation, how many are positive, and how many there are. Raises ``ValueError``
    when the lengths differ or both are empty."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equally long sequences, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m, sd = mean_std(d)
    return m, sd, sum(x > 0 for x in d), len(d)


def fmt_mean_std(values: Iterable[float], scale: float = 100, digits: int = 2) -> str:
    """Format ``values`` as ``"mean ± std"`` after multiplying by ``scale``.

    With the defaults, accuracies in ``[0, 1]`` become percentages, e.g.
    ``fmt_mean_std([0.9227, 0.9235]) == "92.31 ± 0.06"``.
    """
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _cell(value) -> str:
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    else:
        text = str(value)
    # A pipe would end the cell; a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown_table(
    path: Optional[os.PathLike],
    headers: Sequence[str],
    rows: Iterable[Sequence],
    title: Optional[str] = None,
    preamble: Optional[str] = None,
) -> str:
    """Write a GitHub-flavoured markdown table and return its text.

    Args:
        path: file to write (parent directories are created); ``None`` only
            returns the text.
        headers: column titles.
        rows: one sequence of cells per row, each as long as ``headers``.
            Floats are written with 4 significant digits; other values with
            ``str``. Pipes are escaped.
        title: optional ``#`` heading placed above the table.
        preamble: optional paragraph placed between the heading and the table.
    """
    headers = [_cell(h) for h in headers]
    if not headers:
        raise ValueError("write_markdown_table needs at least one column")
    lines = []
    if title:
        lines += [f"# {title}", ""]
    if preamble:
        lines += [preamble.rstrip(), ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for i, row in enumerate(rows):
        cells = [_cell(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row {i} has {len(cells)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return text


def _row_cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_markdown_table(text: str, header: Callable[[List[str]], bool], what: str) -> Tuple[List[str], List[List[str]]]:
    """The header cells and the body rows' cells of the first markdown table in ``text`` whose
    header row satisfies ``header`` (what :func:`write_markdown_table` writes). ``what`` names the
    table in the ``ValueError`` raised when there is none."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and header(_row_cells(line)):
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                rows.append(_row_cells(body))
            return _row_cells(line), rows
    raise ValueError(f"no table with {what}")


def set_threads(n: int) -> None:
    """Limit torch to ``n`` intra-op threads (and inter-op threads where still allowed).

    ``torch.set_num_interop_threads`` may only be called once, before any
    parallel work has started; a later call is ignored.
    """
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Timer:
    """Context manager measuring wall-clock time with ``time.perf_counter``.

    >>> with Timer() as t:
    ...     pass
    >>> t.elapsed >= 0
    True

    ``elapsed`` holds the seconds so far while the block runs and the total
    after it ends.
    """

    def __init__(self) -> None:
        self._start: Optional[float] = None
        self._stop: Optional[float] = None

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self._stop = None
        return self

    def __exit__(self, *exc) -> None:
        self._stop = time.perf_counter()

    @property
    def elapsed(self) -> float:
        if self._start is None:
            return 0.0
        end = self._stop if self._stop is not None else time.perf_counter()
        return end - self._start


def save_bar_plot(
    path: os.PathLike,
    labels: Sequence[str],
    means: Sequence[float],
    stds: Optional[Sequence[float]],
    ylabel: str,
    title: str,
    zoom: bool = True,
) -> Path:
    """Save a bar chart with error bars (matplotlib, Agg backend) and return its path.

    With ``zoom=True`` the y axis spans the bars' range (plus a margin) rather
    than starting at zero, so that small differences stay visible; the axis
    labels then show where it starts. ``stds`` may be ``None`` for no error bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(labels) != len(means) or (stds is not None and len(stds) != len(means)):
        raise ValueError("labels, means and stds must have the same length")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # wide enough for the title, and slanted tick labels when they would collide
    longest = max((len(line) for label in labels for line in str(label).splitlines()), default=0)
    slant = len(labels) > 4 or longest > 14
    width = max(4.0, 0.9 * len(labels) + 1.5, 0.1 * len(title) + 0.6)
    fig, ax = plt.subplots(figsize=(width, 3.6 + (0.06 * longest if slant else 0.0)))
    try:
        x = np.arange(len(labels))
        ax.bar(x, means, yerr=stds, capsize=4, color="#4C72B0", edgecolor="black", linewidth=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20 if slant else 0, ha="right" if slant else "center")
        ax.set_ylabel(ylabel)
        fig.suptitle(title)
        if zoom and len(means):
            m = np.asarray(means, dtype=np.float64)
            e = np.asarray(stds, dtype=np.float64) if stds is not None else np.zeros_like(m)
            lo, hi = float((m - e).min()), float((m + e).max())
            pad = 0.15 * (hi - lo) if hi > lo else max(1.0, abs(hi) * 0.1)
            # Zoom in on the differences, but never cut below zero for positive data.
            ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def amp_autocast(amp: bool):
    """fp16 autocast on CUDA when ``amp``, else a no-op context."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()


def backward_and_step(loss, opt, scaler=None) -> None:
    """Zero the gradients, backpropagate ``loss`` and step ``opt`` (through a GradScaler when given)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
