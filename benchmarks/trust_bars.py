"""The two promises counted over every setting of the README's trust table, from the committed runs.

    python -m benchmarks.trust_bars

reads the runs (``benchmarks/results/trust/<table>.jsonl`` and each table's ``--controls``) of the
settings listed in :data:`SETTINGS` (one entry per row group of the README's table) and writes
``benchmarks/results/trust/bars.md``: per setting, the mean paired differences refiner − upstream and
refiner − none in points, whether each promise holds (:func:`benchmarks.trust.promises`), and the
older per-seed statistic ``refiner_s − max(none_s, upstream_s)`` beside what the better control
itself scores under it. It trains nothing.

    python -m benchmarks.trust_bars --variant NAME

does the same for the tables ``trust/NAME_<table>``: the README's commands with other ``--set``
options (each table's first line names its command), counted against the default on the settings
they cover and paired with it run by run, into ``benchmarks/results/trust/bars_NAME.md``.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

from benchmarks.common import read_runs, results_dir
from benchmarks.trust import TOLERANCE, promises

HARMFUL = ("random", "pairflip", "identity", "clean")
FIVE = HARMFUL + ("mild",)
#: (README row, table, data sets, upstreams, patterns); on the binary tables (Spambase, cancer)
#: ``pairflip`` is the same run as ``random`` and is counted once
SETTINGS: List[Tuple[str, str, Sequence[str], Sequence[str], Sequence[str]]] = [
    ("images and Letter, one batch", "direction_signal_fmnist", ["fmnist"], HARMFUL, ["batch"]),
    ("images and Letter, one batch", "direction_signal_four_sets", ["digits", "letter"], HARMFUL, ["batch"]),
    ("images and Letter, separate", "direction_fmnist_separate_10seeds", ["fmnist"], HARMFUL, ["separate"]),
    ("images and Letter, separate", "direction_separate_10seeds_digits_letter", ["digits", "letter"], HARMFUL,
     ["separate"]),
    ("images and Letter, concat", "direction_concat_10seeds_fmnist", ["fmnist"], HARMFUL, ["concat"]),
    ("images and Letter, concat", "direction_concat_10seeds_digits_letter", ["digits", "letter"], HARMFUL,
     ["concat"]),
    ("Spambase, cancer (held out)", "direction_heldout_30seeds", ["spambase", "cancer"],
     ["random", "identity", "clean"], ["batch", "concat", "separate"]),
    ("Satellite", "direction_signal_satellite", ["satellite"], FIVE, ["batch", "concat"]),
    ("Satellite", "direction_satellite_separate", ["satellite"], FIVE, ["separate"]),
    ("Vehicle", "direction_signal_vehicle", ["vehicle"], FIVE, ["batch", "concat"]),
    ("Vehicle", "direction_vehicle_separate_30seeds", ["vehicle"], FIVE, ["separate"]),
    ("mild, one batch", "direction_signal_four_sets", ["digits", "letter", "spambase", "cancer"], ["mild"],
     ["batch"]),
    ("mild, separate and concat", "direction_mild_10seeds", ["digits", "letter"], ["mild"], ["separate", "concat"]),
    ("30 epochs", "direction_signal_30epochs_four_sets", ["digits", "letter", "spambase", "cancer"],
     ["random", "identity", "clean", "mild"], ["batch"]),
    ("30 epochs", "direction_signal_30epochs_four_sets", ["digits", "letter"], ["pairflip"], ["batch"]),
    ("SGD, one batch", "direction_sgd_30seeds_digits_letter", ["digits", "letter"], HARMFUL, ["batch"]),
    ("SGD, one batch", "direction_sgd_10seeds_fmnist", ["fmnist"], HARMFUL, ["batch"]),
    ("SGD, separate", "direction_sgd_separate_10seeds_digits_letter", ["digits", "letter"], HARMFUL, ["separate"]),
    ("SGD, mild", "direction_sgd_mild_10seeds", ["digits", "letter", "spambase", "cancer"], ["mild"],
     ["batch", "separate"]),
    ("DNA, Vowel (held out last)", "heldout_dna_vowel", ["dna", "vowel"], FIVE, ["batch", "concat", "separate"]),
    ("Musk, Pima (held out, run on the current default)", "heldout_musk_pima", ["musk", "pima"],
     ["random", "identity", "clean", "mild"], ["batch", "concat", "separate"]),
]
#: the prefix of the tables that hold the current default's runs, by pattern. The tables named in
#: :data:`SETTINGS` were run with per-sample weights beside the learned share (the default until
#: ``weighting="auto"``); with originals in the refiner's call the default now keeps every view at
#: weight 1 within the share, which is ``--set strength=0.0`` run for run: the ``s0_`` tables. Views
#: alone (``separate``) were trained at weight 1 under both.
CURRENT = {"batch": "s0_", "concat": "s0_", "separate": ""}
#: tables first run with the current default: their own runs are its runs in every pattern
RUN_ON_CURRENT = {"heldout_musk_pima"}


def current(table: str, pattern: str) -> str:
    """The table of the current default's runs of ``pattern`` for a table :data:`SETTINGS` names."""
    return table if table in RUN_ON_CURRENT else CURRENT[pattern] + table


def accuracies(table: str) -> Dict[Tuple, Dict[int, float]]:
    """Accuracy by seed for each ``(data set, upstream, pattern, arm)`` of a table's runs and its
    controls, on the table's own seeds (``none`` is keyed with pattern and upstream ``None``: it trains
    no views)."""
    header = (results_dir("trust") / f"{table}.md").read_text().splitlines()[0]
    controls = re.search(r"--controls (\S+)", header)
    own = read_runs(f"trust/{table}")
    # as the table does: its own runs, then the controls' runs of the other arms (a later run wins)
    rows = own + ([r for r in read_runs(controls.group(1)) if r["arm"] != "refiner"] if controls else [])
    seeds = {r["seed"] for r in own}
    acc: Dict[Tuple, Dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r["seed"] in seeds:
            key = (r["dataset"], None, None, "none") if r["arm"] == "none" else (
                r["dataset"], r["upstream"], r["pattern"], r["arm"])
            acc[key][r["seed"]] = r["test_acc"]   # a later run of the same arm wins, as in the tables
    return acc


def count(variant: str = "", named: bool = False) -> Tuple[List[Dict], Dict[str, int]]:
    """Every setting's promises and the totals, from the current default's runs (:data:`CURRENT`);
    with ``variant``, of the tables ``<variant>_<table>`` (the same commands with other options;
    settings whose table was not run are left out), each also paired with the runs of the table
    :data:`SETTINGS` names (``vs_default``: mean paired difference in points; with originals in the
    call those are the per-sample weights', the default before). ``named``: count the tables
    :data:`SETTINGS` names instead of the current default's."""
    cells, cache = [], {}

    def runs(t: str):
        if t not in cache:
            cache[t] = accuracies(t)
        return cache[t]
    for row, table, datasets, upstreams, patterns in SETTINGS:
        if variant and not (results_dir("trust") / f"{variant}_{table}.md").exists():
            continue
        for d in datasets:
            for u in upstreams:
                if d in ("spambase", "cancer") and u == "pairflip":
                    continue
                for p in patterns:
                    name = f"{variant}_{table}" if variant else (table if named else current(table, p))
                    acc, default = runs(name), runs(table)
                    if variant and not acc.get((d, u, p, "refiner")):   # a variant run on some patterns only
                        continue
                    refiner, upstream = acc[(d, u, p, "refiner")], acc[(d, u, p, "upstream")]
                    none = acc[(d, None, None, "none")]
                    out = promises(refiner, upstream, none)
                    better = upstream if out["vs_none"] >= out["vs_upstream"] else none   # by the controls' means
                    out["better_control_vs_seed_max"] = promises(better, upstream, none)["vs_seed_max"]
                    if variant:
                        out["vs_default"] = promises(refiner, default[(d, u, p, "refiner")])["vs_upstream"]
                    out.update(row=row, table=name, dataset=d, upstream=u, pattern=p)
                    cells.append(out)
    totals = {"settings": len(cells), "first": sum(c["first"] for c in cells),
              "second": sum(c["second"] for c in cells),
              "second_seed_max": sum(c["first"] and c["vs_seed_max"] >= -TOLERANCE for c in cells),
              "better_control_seed_max": sum(c["better_control_vs_seed_max"] >= -TOLERANCE for c in cells)}
    if variant and cells:
        totals["vs_default"] = float(sum(c["vs_default"] * c["seeds"] for c in cells) / sum(c["seeds"] for c in cells))
    return cells, totals


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="", metavar="NAME",
                    help="count the tables trust/<NAME>_<table> instead (the same commands with other --set "
                         "options), paired with the default's; writes trust/bars_<NAME>.md")
    ap.add_argument("--out", default=None, help="results name under benchmarks/results/ (no extension; default "
                                                "trust/bars, or trust/bars_<variant>)")
    args = ap.parse_args(argv)
    cells, t = count(args.variant)
    if not cells:
        ap.error(f"no table of the variant {args.variant!r} under benchmarks/results/trust")
    cmd = "python -m benchmarks.trust_bars" + (f" --variant {args.variant}" if args.variant else "")
    lines = [f"<!-- {cmd} -->", ""]
    if args.variant:
        keys = {(c["row"], c["dataset"], c["upstream"], c["pattern"]) for c in cells}
        base = [c for c in count(named=True)[0] if (c["row"], c["dataset"], c["upstream"], c["pattern"]) in keys]
        lines += [
            f"The variant `{args.variant}` over {t['settings']} settings of the README's trust table, against the "
            f"tables the settings name (\"default\" below; with originals in the call, per-sample weights beside the "
            f"learned share, the default before `weighting=\"auto\"`) on the same settings and seeds (a promise "
            f"holds at ≥ −{TOLERANCE} point):", "",
            f"- first promise: {t['first']} of {t['settings']} (default {sum(c['first'] for c in base)})",
            f"- second promise: {t['second']} of {t['settings']} (default {sum(c['second'] for c in base)})",
            f"- variant − default, mean paired difference over all runs: {t['vs_default']:+.3f} points", "",
            "| README row | settings | variant − default (mean over runs) | lowest setting | highest setting |",
            "|---|---|---|---|---|"]
        for row in dict.fromkeys(c["row"] for c in cells):
            mine = [c for c in cells if c["row"] == row]
            mean = sum(c["vs_default"] * c["seeds"] for c in mine) / sum(c["seeds"] for c in mine)
            lo, hi = (f(mine, key=lambda c: c["vs_default"]) for f in (min, max))
            lines.append(f"| {row} | {len(mine)} | {mean:+.3f} | {lo['vs_default']:+.2f} ({lo['dataset']} {lo['upstream']} "
                         f"{lo['pattern']}) | {hi['vs_default']:+.2f} ({hi['dataset']} {hi['upstream']} {hi['pattern']}) |")
        lines.append("")
    else:
        lines += [
            f"The two promises over the {t['settings']} settings of the README's trust table (mean paired "
            f"differences in points over each table's seeds; a promise holds at ≥ −{TOLERANCE}):", "",
            f"- first, refiner − upstream: **{t['first']} of {t['settings']}**",
            f"- second, refiner − upstream and refiner − none both: **{t['second']} of {t['settings']}**",
            f"- the older per-seed statistic, mean of refiner − max(none, upstream) per seed: {t['second_seed_max']} "
            f"of {t['settings']}; the better control itself (the control with the higher mean) meets it in "
            f"{t['better_control_seed_max']} of {t['settings']}: the larger of two noisy accuracies per seed lies "
            "above both controls' means, so that statistic asks more than the better control delivers.", ""]
    extra = " | variant − default" if args.variant else ""
    lines += [
        "| README row | table | data set | upstream | pattern | seeds | refiner − upstream | refiner − none | first | "
        "second | per-seed max: refiner | per-seed max: better control" + extra + " |",
        "|" + "---|" * (13 if args.variant else 12),
    ]
    for c in cells:
        lines.append(f"| {c['row']} | [{c['table']}]({c['table']}.md) | {c['dataset']} | {c['upstream']} | "
                     f"{c['pattern']} | {c['seeds']} | {c['vs_upstream']:+.2f} | {c['vs_none']:+.2f} | "
                     f"{'yes' if c['first'] else '**no**'} | {'yes' if c['second'] else '**no**'} | "
                     f"{c['vs_seed_max']:+.2f} | {c['better_control_vs_seed_max']:+.2f}"
                     + (f" | {c['vs_default']:+.2f}" if args.variant else "") + " |")
    out = args.out or ("trust/bars_" + args.variant if args.variant else "trust/bars")
    path = results_dir() / f"{out}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(line for line in lines[2:] if line.startswith("- ")))


if __name__ == "__main__":
    main()
