"""``augplug demo``: refinement against a harmful upstream augmentation, on bundled data.

One file per part: :mod:`.study` (the controlled study: view banks, corrupted view labels, one
training run per arm, its metrics; the benchmarks run the same study on other data),
:mod:`.digits` (the demo's data), :mod:`.report` (its table and plot) and :mod:`.cli` (the
command line, ``python -m augplug demo``).
"""
from .cli import ARMS, main, run_demo
from .digits import load_digits_study

__all__ = ["ARMS", "load_digits_study", "run_demo", "main"]
