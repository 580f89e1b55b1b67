import math
import time

import pytest

from benchmarks.common import (
    Timer,
    fmt_mean_std,
    mean_std,
    paired_difference,
    parse_sets,
    results_dir,
    save_bar_plot,
    seed_everything,
    set_threads,
    share_options,
    write_markdown_table,
)


def test_mean_std_sample_std():
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5)
    assert s == pytest.approx(math.sqrt(5 / 3))  # ddof=1
    assert mean_std([0.7]) == (0.7, 0.0)
    assert mean_std(iter([2, 2])) == (2.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_fmt_mean_std():
    assert fmt_mean_std([0.9227, 0.9235]) == "92.31 ± 0.06"
    assert fmt_mean_std([0.5]) == "50.00 ± 0.00"
    assert fmt_mean_std([1.0, 3.0], scale=1, digits=1) == "2.0 ± 1.4"


def test_write_markdown_table(tmp_path):
    path = tmp_path / "sub" / "table.md"
    text = write_markdown_table(
        path,
        ["method", "acc", "note"],
        [["baseline", 0.91234, "a|b"], ["ours", "92.31 ± 0.40", 3]],
        title="Results",
        preamble="Three seeds.",
    )
    assert path.read_text(encoding="utf-8") == text
    lines = text.splitlines()
    assert lines[0] == "# Results"
    assert lines[2] == "Three seeds."
    assert lines[4] == "| method | acc | note |"
    assert lines[5] == "|---|---|---|"
    assert lines[6] == "| baseline | 0.9123 | a\\|b |"
    assert lines[7] == "| ours | 92.31 ± 0.40 | 3 |"
    assert text.endswith("\n")


def test_write_markdown_table_no_file_and_errors():
    text = write_markdown_table(None, ["a"], [[1]])
    assert text == "| a |\n|---|\n| 1 |\n"
    with pytest.raises(ValueError, match="row 0"):
        write_markdown_table(None, ["a", "b"], [[1]])


def test_results_dir_exists():
    path = results_dir()
    assert path.is_dir() and path.name == "results"
    study = results_dir("overhead")
    assert study.is_dir() and study.parent == path and study.name == "overhead"


def test_timer_and_seeding():
    import numpy as np
    import torch

    set_threads(1)
    assert torch.get_num_threads() == 1
    with Timer() as t:
        time.sleep(0.01)
    assert t.elapsed >= 0.009
    seed_everything(3)
    a = (np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (np.random.rand(), torch.rand(1).item()) == a


def test_save_bar_plot(tmp_path):
    out = save_bar_plot(tmp_path / "p.png", ["a", "b"], [91.0, 92.5], [0.3, 0.2], "accuracy (%)", "test")
    assert out.is_file() and out.stat().st_size > 0
    out = save_bar_plot(tmp_path / "q.png", ["a"], [1.0], None, "y", "t", zoom=False)
    assert out.is_file()
    with pytest.raises(ValueError):
        save_bar_plot(tmp_path / "r.png", ["a"], [1.0, 2.0], None, "y", "t")


def test_paired_difference_pairs_by_position():
    m, sd, wins, n = paired_difference([3.0, 1.0, 2.0], [1.0, 2.0, 0.0])  # differences 2, -1, 2
    assert n == 3 and wins == 2
    assert m == pytest.approx(1.0) and sd == pytest.approx(3 ** 0.5)
    assert paired_difference([1.0], [1.0]) == (0.0, 0.0, 0, 1)


def test_paired_difference_rejects_unpaired_or_empty():
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one value"):
        paired_difference([], [])


def test_share_options_build_an_adaptive_share_and_pass_the_rest_through():
    from augplug.share import AdaptiveShare

    out = share_options({"share_signal": "refined", "share_lr": 0.02, "beta": 1.0})
    assert out["beta"] == 1.0 and set(out) == {"beta", "aug_weight"}
    share = out["aug_weight"]
    assert isinstance(share, AdaptiveShare) and share.signal == "refined" and share.lr == 0.02
    assert share_options({"aug_weight": 1.0, "tau": 0.5}) == {"aug_weight": 1.0, "tau": 0.5}
    from augplug.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="signal"):
        share_options({"share_signal": "weighted"})


def test_parse_sets_parses_values_and_builds_an_evidence_share():
    sets = parse_sets(["beta=1", "tau=0.5", "gumbel=false", "share_evidence=none", "normalize=center", "x=a=b"])
    assert sets == {"beta": 1, "tau": 0.5, "gumbel": False, "share_evidence": None, "normalize": "center", "x": "a=b"}
    assert share_options(parse_sets(["share_evidence=3"]))["aug_weight"].evidence == 3.0


def test_paired_differences(tmp_path, monkeypatch):
    import json

    from benchmarks import paired

    def write(name, accs):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for seed, acc in enumerate(accs):
                f.write(json.dumps({"dataset": "digits", "upstream": "random", "pattern": "batch", "arm": "refiner",
                                    "seed": seed, "test_acc": acc, "auc_weight": 0.6}) + "\n")
            f.write(json.dumps({"dataset": "digits", "upstream": "random", "pattern": "batch", "arm": "none",
                                "seed": 0, "test_acc": 0.1}) + "\n")

    write("a", [0.90, 0.80, 0.70])
    write("b", [0.91, 0.80, 0.69])
    import benchmarks.common as common
    monkeypatch.setattr(paired, "results_dir", lambda: tmp_path)
    monkeypatch.setattr(common, "results_dir", lambda study=None: tmp_path)   # read_runs
    text = paired.table("a", "b")
    assert "+0.00 ± 1.00 (1 / 1 / 1)" in text and "All 3 paired runs" in text and "0.600 / 0.600" in text


def test_replot_reads_the_mean_and_std_of_each_row(tmp_path, monkeypatch):
    """benchmarks.replot draws one bar per (setting, arm) row from the table's mean ± std column."""
    from benchmarks import replot

    table = ("# Quality\n\nnoise: pairflip; options\n\n"
             "| setting | arm | test acc % (mean ± std) | per seed |\n|---|---|---|---|\n"
             "| orig+aug | none | 89.55 ± 0.10 | 89.6 / 89.5 |\n| orig+aug | saflex | 89.62 ± 0.05 | 89.6 / 89.7 |\n\n"
             "Paired by seed: ...\n")
    assert replot.read_rows(table) == [("orig+aug\nnone", 89.55, 0.10), ("orig+aug\nsaflex", 89.62, 0.05)]
    arms_only = "| arm | test acc % (mean ± std) | per seed |\n|---|---|---|\n| saflex-share | 87.27 ± 0.49 | 87.3 |\n"
    assert replot.read_rows(arms_only) == [("saflex-share", 87.27, 0.49)]
    (tmp_path / "quality").mkdir()
    (tmp_path / "quality" / "x.md").write_text(table, encoding="utf-8")
    drawn = {}
    monkeypatch.setattr(replot, "results_dir", lambda study=None: tmp_path)
    monkeypatch.setattr(replot, "save_bar_plot", lambda path, *args: drawn.setdefault("call", (path, args)))
    replot.replot("quality/x")
    path, (labels, means, stds, ylabel, title) = drawn["call"]
    assert path == tmp_path / "quality" / "x.png" and labels == ["orig+aug\nnone", "orig+aug\nsaflex"]
    assert means == [89.55, 89.62] and stds == [0.10, 0.05] and "pairflip" in title
    with pytest.raises(ValueError, match="arm"):
        replot.read_rows("no table here")


def test_share_walk_spread_matches_a_random_walk():
    """benchmarks.share_walk: with a fixed step the spread of the summed normalized steps is about
    step * sqrt(T); the RMS started at the first square inflates the default step's early walk."""
    import math

    from benchmarks.share_walk import spread

    fixed = spread(100, lambda t: 0.05, True, walks=300)
    assert 0.8 * 0.05 * math.sqrt(100) < fixed < 1.25 * 0.05 * math.sqrt(100)
    default = lambda t: 0.2 / math.sqrt(t)  # noqa: E731
    assert spread(64, default, False, walks=300) > 1.4 * spread(64, default, True, walks=300)


def test_paired_tables_matches_rows_by_seed(tmp_path, monkeypatch):
    """benchmarks.paired_tables: per-seed columns read against the table's seeds, tables pooled with
    '+', a per-seed maximum over ',' references, and a demo's 'Per seed' line."""
    from benchmarks import paired_tables

    def table(name, seeds, rows):
        lines = [f"seeds {seeds}; x", "", "| setting | arm | test acc % (mean ± std) | per seed |", "|---|---|---|---|"]
        lines += [f"| s | {arm} | 0 ± 0 | {' / '.join(map(str, vals))} |" for arm, vals in rows]
        (tmp_path / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    table("a", [0, 1], [("none", [1.0, 2.0]), ("up", [1.5, 1.0])])
    table("b", [2], [("none", [3.0]), ("up", [2.0])])
    table("c", [0, 1, 2], [("ref", [1.5, 2.5, 3.0])])
    (tmp_path / "demo.md").write_text("Per seed (3 to 4): none 98.4 / 98.2; upstream+SAflex 98.6 / 98.2.\n")
    monkeypatch.setattr(paired_tables, "results_dir", lambda study=None: tmp_path)
    assert paired_tables.side("a+b:s:none") == {0: 1.0, 1: 2.0, 2: 3.0}
    assert paired_tables.side("a+b:s:none,a+b:s:up") == {0: 1.5, 1: 2.0, 2: 3.0}
    assert "+0.33 ± 0.29 points (better 2, equal 1, worse 0)" in paired_tables.compare("a+b:s:none", "c:s:ref")
    assert "+0.10 ± 0.14 points (better 1, equal 1, worse 0)" in paired_tables.compare("demo:none", "demo:upstream+SAflex")
    with pytest.raises(ValueError, match="no row"):
        paired_tables.side("a:s:missing")


def test_read_markdown_table_reads_what_write_markdown_table_writes():
    from benchmarks.common import read_markdown_table, write_markdown_table

    text = "intro\n\n" + write_markdown_table(None, ["arm", "acc"], [["none", "1.0"], ["up", "2.0"]]) + "\nafter\n"
    header, rows = read_markdown_table(text, lambda cells: "acc" in cells, "an 'acc' column")
    assert header == ["arm", "acc"] and rows == [["none", "1.0"], ["up", "2.0"]]
    with pytest.raises(ValueError, match="a 'loss' column"):
        read_markdown_table(text, lambda cells: "loss" in cells, "a 'loss' column")
