"""Comparisons that decide: the statistics (benchmarks/stats.py), the data records (benchmarks/records.py)
and the page they regenerate (benchmarks/report.py), including the check that docs/results.md matches
docs/data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import records, report, stats

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half():
    assert stats.iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # cuts one from each end of five
    assert stats.iqm([1, 2, 3]) == pytest.approx(2.0)  # three runs: nothing to cut, the plain mean
    x = np.arange(8.0)  # eight runs: two cut from each end
    assert stats.iqm(x) == pytest.approx(np.mean(x[2:6]))
    with pytest.raises(ValueError, match="NaN"):
        stats.as_scores([1.0, float("nan")])


def test_interval_brackets_the_estimate_and_narrows_with_more_seeds():
    rng = np.random.default_rng(1)
    few = rng.normal(5.0, 1.0, 5)
    many = rng.normal(5.0, 1.0, 200)
    a, b = stats.interval(few, "mean", seed=0), stats.interval(many, "mean", seed=0)
    assert a.low <= a.value <= a.high and b.low <= b.value <= b.high
    assert b.high - b.low < (a.high - a.low) / 3
    assert b.low < 5.0 < b.high
    assert stats.interval(few, seed=3) == stats.interval(few, seed=3), "the same seed gives the same interval"


def test_stratified_bootstrap_keeps_each_task():
    """With two tasks of very different scale, every resample keeps both: the IQM interval of the
    pooled scores never collapses onto one task's values."""
    scores = np.stack([np.full(4, 1.0), np.full(4, 100.0)], axis=1)  # [runs, tasks]
    e = stats.interval(scores, "mean", seed=0)
    assert e.low == pytest.approx(50.5) and e.high == pytest.approx(50.5)


def test_difference_verdicts_need_an_interval_that_excludes_zero_and_three_seeds():
    low = np.array([1.0, 1.1, 0.9, 1.05, 0.95])
    high = low + 2.0
    assert stats.difference(high, low).verdict == "above"
    assert stats.difference(low, high).verdict == "below"
    assert stats.difference(low + 0.01, low).verdict == "level"
    assert stats.difference(high[:2], low[:2]).verdict == "too few seeds"
    d = stats.difference(high, low)
    assert d.estimate.low > 0 and d.estimate.value == pytest.approx(2.0)


def test_probability_of_improvement_counts_pairs_and_half_ties():
    a, b = np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.0])
    # pairs: a=3 beats 1,2 and ties 3 -> 2.5; a=4 and a=5 beat all three -> 6: (2.5 + 6) / 9
    assert stats.probability_of_improvement(a, b).value == pytest.approx(8.5 / 9)
    assert stats.probability_of_improvement(b, b).value == pytest.approx(0.5)
    e = stats.probability_of_improvement(a + 10, b)
    assert e.value == e.low == e.high == 1.0


def test_performance_profile_falls_with_the_threshold():
    scores = np.array([[10.0, 40.0], [20.0, 50.0], [30.0, 60.0]])
    fraction, low, high = stats.performance_profile(scores, [0, 25, 45, 100])
    np.testing.assert_allclose(fraction, [1.0, 4 / 6, 2 / 6, 0.0])
    assert np.all(np.diff(fraction) <= 0) and np.all(low <= fraction) and np.all(fraction <= high)


def test_curve_bands_skip_runs_without_a_value():
    values = np.array([[np.nan, np.nan], [1.0, np.nan], [1.0, 3.0]])
    mean, low, high = stats.curve_bands(values)
    assert np.isnan(mean[0]) and mean[1] == 1.0 and mean[2] == 2.0 and low[2] >= 1.0 and high[2] <= 3.0


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------


def write_run(folder: Path, rows: list[dict], summary: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text("env: X\nlr: 0.0003\nrun_dir: /somewhere\nseed: 4\n")
    return folder


ROWS = [  # two seeds; 100 env steps per seed per row, 50 env steps/s over both seeds
    {"step": 100, "episode/count": [1, 0], "episode/return": [1.0, None], "achievements/a": [100.0, None],
     "perf/sps": 50.0},
    {"step": 200, "episode/count": [3, 1], "episode/return": [3.0, 2.0], "achievements/a": [0.0, 50.0],
     "perf/sps": 50.0},
    {"step": 300, "episode/count": [1, 1], "episode/return": [5.0, 4.0], "achievements/a": [100.0, 100.0],
     "perf/sps": 100.0},
]


def test_window_curve_weights_episodes_and_leaves_empty_windows_null():
    curve = records.window_curve(ROWS, "episode/return", [150, 300, 450], 2)
    assert curve[0].tolist()[0] == 1.0 and np.isnan(curve[0, 1])
    assert curve[1].tolist() == pytest.approx([(3 * 3 + 5) / 4, (2 + 4) / 2])  # episode-weighted
    assert np.isnan(curve[2]).all()


def test_train_seconds_sum_the_chunks_and_stop_at_the_last_row():
    # each row: 100 steps x 2 seeds over its sps: 4 s, 4 s, 2 s
    assert records.train_seconds(ROWS, [100, 250, 300, 400], 2) == [4.0, 8.0, 10.0, None]


def test_steady_sps_skips_compilation_and_reads_only_the_latest_process():
    row = lambda step, seconds: {"step": step, "perf/wall_seconds": seconds}  # noqa: E731
    assert records.steady_sps([row(100, 50.0), row(300, 52.0)], slots=2) == 200.0  # the first row's compile left out
    resumed = [row(100, 50.0), row(300, 52.0), row(400, 40.0), row(600, 41.0)]  # the clock restarted at 400
    assert records.steady_sps(resumed, slots=1) == 200.0
    assert records.steady_sps([row(100, 5.0)], slots=1) is None and records.steady_sps([], slots=1) is None


def test_run_entries_split_a_vmapped_run_into_seeds(tmp_path):
    summary = {"complete": True, "env_steps_per_seed": 300,
               "final": {"episode/return": {"mean": 4.5, "per_seed": [5.0, 4.0]},
                         "achievements/a": {"mean": 100.0, "per_seed": [100.0, 100.0]},
                         "loss/total": {"mean": 1.0, "per_seed": [1.0, 1.0]}},
               "eval": {"eval/return": [6.0, None]}}
    run = write_run(tmp_path / "run", ROWS, summary)
    entries = records.run_entries(run, [10, 11], [150, 300])
    assert [e["seed"] for e in entries] == [10, 11]
    assert entries[1]["final"] == {"episode/return": 4.0, "achievements/a": 100.0, "achievement_rate": 100.0}
    assert entries[0]["eval"] == {"eval/return": 6.0} and entries[1]["eval"] == {"eval/return": None}
    assert entries[1]["curve"]["episode/return"] == [None, 3.0]
    assert entries[0]["train_seconds"] == [4.0, 10.0]
    assert records.run_config(run) == {"env": "X", "lr": 0.0003}, "where and which seed are not the config"
    assert records.run_entries(tmp_path / "missing", [0], [1]) == []


def test_diagnostics_are_kept_per_seed_as_window_means(tmp_path):
    rows = [{**row, "diag/first": [0.1 * i, None], "loss/x": 1.0} for i, row in enumerate(ROWS)]
    run = write_run(tmp_path / "run", rows, {"complete": True, "env_steps_per_seed": 300})
    entries = records.run_entries(run, [10, 11], [150, 300], diagnostics=["diag/first", "diag/never_logged"])
    assert entries[0]["diagnostics"] == {"diag/first": [0.0, pytest.approx(0.15)]}, "a plain mean per window"
    assert entries[1]["diagnostics"] == {"diag/first": [None, None]}
    assert "diagnostics" not in records.run_entries(run, [10, 11], [150, 300])[0], "only what the suite asks"


def test_diagnostics_table_lists_each_seed_at_the_asked_points():
    record = synthetic_record(seeds=3)
    for name, method in record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"].items():
        for i, run in enumerate(method["runs"]):
            run["diagnostics"] = {"diag/reward_pred_first": [0.1, 0.2, 0.3, 0.4 + 0.1 * i]}
    assert "Diagnostics" not in report.render_record(record, "toy.json")[0], "none asked, no table"
    record["diagnostics"] = ["diag/reward_pred_first", "diag/absent"]
    block, _ = report.render_record(record, "toy.json")
    table = block.split("Diagnostics")[1].split("\n\n")[1]
    assert "| metric | method | env steps 750-1,000 |" in table and "absent" not in table
    assert "| `diag/reward_pred_first` | better | 0.50 (0.40, 0.50, 0.60) |" in table
    assert "| same |" in table
    for run in record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"]["same"]["runs"]:
        del run["diagnostics"]  # a method that logs none (PPO has no reward head) gets no rows
    record["early_steps"] = [100, 1000]
    block, _ = report.render_record(record, "toy.json")
    assert "env steps 0-250 | env steps 750-1,000 |" in block and "| same |" not in block.split("Diagnostics")[1].split("\n\n")[1]


def test_records_refuse_other_schemas(tmp_path):
    path = records.write(tmp_path / "r.json", {"name": "r"})
    assert records.read(path)["schema"] == records.SCHEMA
    (tmp_path / "raw.json").write_text('{"env": "x"}')  # raw benchmark output: not a record
    assert list(records.load_all(tmp_path)) == ["r"]
    from utils.errors import UserError

    with pytest.raises(UserError, match="schema"):
        records.read(tmp_path / "raw.json")


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def synthetic_record(name: str = "toy", seeds: int = 5) -> dict:
    steps = records.curve_steps(1000, 4)

    def method(offset: float, cpu: float) -> dict:
        runs = []
        for i in range(seeds):
            final = offset + 0.1 * i
            runs.append({"seed": 100 + i, "env_steps": 1000, "complete": True,
                         "final": {"episode/return": final, "achievements/a": 10.0 * final,
                                   "achievement_rate": 10.0 * final},
                         "eval": {"eval/return": final}, "curve": {"episode/return": [0.5 * final, final, final,
                                                                                        final]},
                         "train_seconds": [cpu * k for k in (1, 2, 3, 4)]})
        return {"module": "m", "presets": [], "flags": [], "config": {},
                "processes": [{"seeds": list(range(100, 100 + seeds)), "wall_seconds": 10.0,
                               "cpu_seconds": cpu * seeds, "machine": "test box", "commit": "abc"}],
                "runs": runs}

    return {"schema": records.SCHEMA, "name": name, "title": f"Toy `{name}`", "description": "A toy.",
            "command": f"python -m benchmarks.compare {name}", "budget": 1000, "seeds": list(range(100, 100 + seeds)),
            "seed_role": "report", "headline": True, "equal_compute": True,
            "references": [{"env": "Craftax-Classic-Symbolic-v1", "label": "paper", "value": 9.0, "source": "a paper"}],
            "curve_steps": steps,
            "envs": {"Craftax-Classic-Symbolic-v1": {"methods": {
                "base": method(1.0, 10.0), "better": method(3.0, 100.0), "same": method(1.05, 10.0)}}}}


def test_block_says_above_only_when_the_interval_excludes_zero():
    block, figures = report.render_record(synthetic_record(), "toy.json")
    differences = block.split("| verdict |")[1].split("\n\n")[0]
    rows = {line.split("|")[1].strip(): line for line in differences.splitlines() if line.startswith("| ")}
    assert rows["better"].rstrip().endswith("| above |") and rows["same"].rstrip().endswith("| level |")
    main_rows = [line for line in block.splitlines() if line.startswith("| reference: paper")]
    assert "reporting seeds" in block and "100-104" in block and "Not yet a headline" not in block
    assert main_rows and "a paper" in block
    assert "| better | 400 | n/a | 0 of 5 |" in block, "at the quickest method's time 'better' has no point yet"
    assert "Equal training time" in block  # 'better' costs 10x the time: at equal time it has fewer points
    assert list(figures) == ["figures/report_toy_Craftax-Classic-Symbolic-v1.png"]


def test_an_envs_own_episode_values_get_their_table_with_intervals():
    """Tetris logs lines a game: comparable across rewards where the return is not, so it gets a table; the
    Craftax record, with only the common values, gets none."""
    record = synthetic_record()
    assert "The env's own episode values" not in report.render_record(record, "toy.json")[0]
    for name, method in record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"].items():
        for i, run in enumerate(method["runs"]):
            run["final"]["episode/lines"] = {"base": 1.0, "better": 3.0, "same": 1.0}[name] + 0.1 * i
    block = report.render_record(record, "toy.json")[0]
    table = block.split("The env's own episode values")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert table.splitlines()[0] == "| method | lines |"
    assert rows["base"].count("[") == 1 and rows["better"].rstrip().endswith("above |")
    assert rows["same"].rstrip().endswith("level |")


def test_two_seeds_make_no_claim_and_a_headline_needs_five():
    block, _ = report.render_record(synthetic_record(seeds=2), "toy.json")
    assert "no claim (fewer than 3 seeds)" in block and "above" not in block.split("verdict |")[1]
    assert "Not yet a headline table: 2 seeds, 5 needed." in block


def test_a_time_target_reports_wall_time_per_process_and_the_return_within_it():
    record = synthetic_record()
    assert "Against the goal" not in report.render_record(record, "toy.json")[0], "no goal, no table"
    record["time_target_seconds"] = 60.0
    record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"]["better"]["processes"][0]["wall_seconds"] = 90.0
    block, _ = report.render_record(record, "toy.json")
    table = block.split("Against the goal of 1.0 min")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    # 'base' takes 10 s per curve point, so it has its final point within 60 s; 'better' takes 100 s per
    # point and has none, and its one process (90 s) missed the goal.
    assert "| 5 | 0.2 (0.2-0.2) | 1 of 1 |" in rows["base"] and rows["base"].rstrip().endswith("| 5 of 5 |")
    assert "| 5 | 1.5 (1.5-1.5) | 0 of 1 | n/a | 0 of 5 |" in rows["better"]


def test_early_steps_compare_the_methods_in_the_curve_window_that_holds_them():
    record = synthetic_record()
    assert "Along the learning curve" not in report.render_record(record, "toy.json")[0], "none asked, no table"
    better = record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"]["better"]
    for run in better["runs"]:  # a head start that is gone by the end: far above 'base' early, level late
        run["curve"]["episode/return"] = [9.0, 5.0, 3.0, run["final"]["episode/return"] - 2.0]
    record["early_steps"] = [100, 1000, 999]  # 999 and 1000 fall in the same (last) window
    block, _ = report.render_record(record, "toy.json")
    table = block.split("Along the learning curve")[1].split("\n\n")[1]
    assert "| method | env steps 0-250 | env steps 750-1,000 |" in table
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in table.splitlines() if line.startswith("| ")}
    assert "above" in rows["better"][0] and "level" in rows["better"][1]
    assert "<br>" not in rows["base"][0], "the first method is the baseline, with no difference to itself"
    assert report.window_index([250, 500, 750, 1000], 250) == 0 and report.window_index([250, 500], 10**6) == 1
    for method in record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"].values():
        for run in method["runs"]:
            run["curve"]["episode/return"][0] = None  # logged once per chunk: nothing in the first window
    block, _ = report.render_record(record, "toy.json")
    assert "| method | env steps 250-500 | env steps 750-1,000 |" in block, "the next window with a row"


def test_references_with_env_steps_are_drawn_on_the_curve(tmp_path):
    record = synthetic_record()
    _, plain = report.render_record(record, "toy.json")
    record["references"][0]["env_steps"] = 500
    block, marked = report.render_record(record, "toy.json")
    assert "| reference: paper |" in block, "the table row stays"
    (rel, (function, args, digest)), = marked.items()
    assert digest != plain[rel][2], "the marks are part of the figure's data, so a changed reference redraws it"
    assert function.keywords["references"] == [record["references"][0]]
    function(*args, tmp_path / "f.png", digest)
    assert report.figure_hash(tmp_path / "f.png") == digest


def test_a_method_with_more_env_steps_meets_the_others_only_at_equal_compute(tmp_path):
    record = synthetic_record(seeds=3)
    methods = record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"]
    long_runs = [{"seed": 100 + i, "env_steps": 8000, "complete": True, "final": {"episode/return": 50.0},
                  "eval": {}, "curve": {"episode/return": [5.0 + i, 6.0 + i, 9.0 + i, 50.0]},
                  "train_seconds": [150.0, 300.0, 390.0, 800.0]} for i in range(3)]
    methods["cheap_long"] = {"module": "m", "presets": [], "flags": [], "config": {}, "budget": 8000,
                             "curve_steps": records.curve_steps(8000, 4), "processes": [], "runs": long_runs}
    block, figures = report.render_record(record, "toy.json")
    main = block.split("| method | seeds |")[1].split("\n\n")[0]
    assert "cheap_long" not in main, "never at equal env steps"
    assert "cheap_long" not in block.split("Each method against")[1].split("\n\n")[1]
    table = block.split("Equal compute:")[1].split("\n\n")[1]
    # 'better' is the slowest at the budget (400 s); cheap_long is read at its last point within 400 s
    assert "after 400 s" in block.split("Equal compute:")[1].split("\n")[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"method", "better", "cheap_long"}
    assert "| 8,000 |" in rows["cheap_long"] and "10.00" in rows["cheap_long"] and "above" in rows["cheap_long"]
    floor = {**methods["same"], "module": "online_rl.random_policy",
             "runs": [{**run, "train_seconds": [0.1, 0.2, 0.3, 0.4]} for run in methods["same"]["runs"]]}
    methods["random"] = floor  # seconds to run: it must set neither the equal-time nor the equal-compute budget
    timed, _ = report.render_record(record, "toy.json")
    assert "after 40 s of training" in timed.split("Equal training time:")[1].split("\n")[0]
    assert "after 400 s" in timed.split("Equal compute:")[1].split("\n")[0]
    methods["cheap_long"]["runs"] = []
    assert "| cheap_long | 8,000 | not run yet |" in report.render_record(record, "toy.json")[0]
    plot, args, _ = next(iter(figures.values()))
    plot(*args, path=tmp_path / "f.png", digest="d")
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_equal_time_reads_each_run_at_the_quickest_methods_budget():
    run = {"curve": {"episode/return": [1.0, 2.0, None, 4.0]}, "train_seconds": [10, 20, 30, 40]}
    assert report.value_at_seconds(run, 35) == 2.0 and report.value_at_seconds(run, 5) is None


def test_page_regenerates_from_data_and_a_hand_edit_is_caught(tmp_path):
    docs = tmp_path / "docs"
    records.write(docs / "data" / "toy.json", synthetic_record())
    page = docs / "results.md"
    page.write_text("# Results\n\nHand-written text stays.\n")
    assert report.main(["--results-md", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Results\n\nHand-written text stays.\n\n<!-- report:toy:begin -->")
    figure = docs / "figures" / "report_toy_Craftax-Classic-Symbolic-v1.png"
    assert figure.stat().st_size > 10_000 and report.figure_hash(figure)
    assert report.check(page, docs / "data") == []
    assert report.main(["--results-md", str(page), "--check"]) == 0
    page.write_text(text.replace("| base | 5 |", "| base | 6 |"))  # a hand edit of a generated table
    problems = report.check(page, docs / "data")
    assert len(problems) == 1 and "| base | 6 |" in problems[0]
    assert report.main(["--results-md", str(page), "--check"]) == 1
    page.write_text(text)
    record = synthetic_record()
    record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"]["base"]["runs"][0]["curve"]["episode/return"][0] = 0.0
    records.write(docs / "data" / "toy.json", record)  # a curve changed: the table is the same, the figure not
    assert report.check(page, docs / "data") == [f"figure {figure.relative_to(docs)} is missing or was drawn "
                                                 "from other data"]


def test_the_committed_page_is_what_its_data_generates(tmp_path):
    """docs/results.md and its figures as ``python -m benchmarks.report`` regenerates them from docs/data:
    regenerated into a temporary folder, and compared."""
    assert report.main(["--results-md", str(REPO / "docs" / "results.md"), "--out", str(tmp_path)]) == 0
    regenerated = (tmp_path / "results.md").read_text()
    assert regenerated == (REPO / "docs" / "results.md").read_text(), "run: python -m benchmarks.report"
    assert report.check(REPO / "docs" / "results.md", REPO / "docs" / "data") == []
    assert records.total_size(REPO / "docs" / "data") < records.MAX_DATA_BYTES


def test_aggregate_pools_tasks_on_a_normalised_score_and_draws_profiles(tmp_path):
    docs = tmp_path / "docs"
    classic = synthetic_record("classic")
    full = synthetic_record("full")
    full["envs"] = {"Craftax-Symbolic-v1": full["envs"].pop("Craftax-Classic-Symbolic-v1")}
    records.write(docs / "data" / "classic.json", classic)
    records.write(docs / "data" / "full.json", full)
    aggregate = {"schema": records.AGGREGATE_SCHEMA, "name": "family", "title": "Across Classic and full",
                 "description": "Pooled.", "records": ["classic", "full", "later"], "methods": ["base", "better"]}
    (docs / "data" / "family.json").write_text(json.dumps(aggregate))
    page = docs / "results.md"
    page.write_text("# Results\n")
    assert report.main(["--results-md", str(page)]) == 0
    block = page.read_text().split("<!-- report:family:begin -->")[1]
    assert "classic: Craftax-Classic-Symbolic-v1; full: Craftax-Symbolic-v1; 5 seeds per task" in block
    assert "not measured yet: `later`" in block
    better = next(line for line in block.splitlines() if line.startswith("| better |"))
    assert better.rstrip().endswith("| above |")
    # the base method's IQM over both tasks: final returns 1.0-1.4 as % of 22 and of 226
    expected = stats.iqm(np.concatenate([100 * np.arange(1.0, 1.45, 0.1) / 22, 100 * np.arange(1.0, 1.45, 0.1) / 226]))
    assert f"| base | {expected:.2f} [" in block
    assert report.figure_hash(docs / "figures" / "report_family_profile.png")
    assert report.check(page, docs / "data") == []


def test_measured_tables_render_with_their_machine_command_and_repeats(tmp_path):
    docs = tmp_path / "docs"
    path = records.write_table(docs / "data" / "speed.json", name="speed", title="Speed", command="python -m x --y 1",
                               columns=[{"key": "devices", "label": "devices", "digits": 0},
                                        {"key": "sps", "label": "env steps/s", "digits": 0}],
                               rows=[{"devices": 1, "sps": [1000.0, 1200.0, 900.0]}, {"devices": 2, "sps": 1500.0}])
    table = json.loads(path.read_text())
    assert table["schema"] == records.TABLE_SCHEMA and table["machine"] and "commit" in table
    with pytest.raises(ValueError, match="not columns"):
        records.write_table(docs / "data" / "bad.json", name="bad", title="Bad", command="c",
                            columns=[{"key": "a", "label": "a"}], rows=[{"b": 1}])
    page = docs / "results.md"
    page.write_text("# Results\n")
    assert report.main(["--results-md", str(page)]) == 0
    text = page.read_text()
    assert "| devices | env steps/s |" in text and "| 1 | 1,000 (900-1,200) |" in text and "| 2 | 1,500 |" in text
    assert "by `python -m x --y 1`; data: `docs/data/speed.json`" in text and "median (min-max) of 3" in text
    assert report.check(page, docs / "data") == []


def evaluate_many_document(bc, iql, tier="medium-replay"):
    """What offline_rl.evaluate_many --out writes, for two methods on one tier."""
    row = lambda method, values: {"env": "Craftax-Classic-Symbolic-v1", "dataset": f"/data/tiers/{tier}",
                                  "tier": tier, "method": method, "features": "obs",
                                  "normalized_score": {"values": values}, "return": {"values": values}}
    return {"settings": {"episodes": 64}, "table": [row("iql", iql), row("bc", bc)]}


def test_offline_scores_table_compares_each_method_with_the_baseline_per_dataset(tmp_path):
    from benchmarks import offline_table

    table = tmp_path / "table.json"
    table.write_text(json.dumps(evaluate_many_document([10.0, 12.0, 11.0], [40.0, 42.0, 45.0])))
    data = tmp_path / "docs" / "data"
    path = offline_table.main([str(table), "--name", "offline_toy", "--title", "Toy tiers", "--out", str(data)])
    document = json.loads(path.read_text())
    assert document["schema"] == records.SCORES_SCHEMA
    assert document["tasks"] == {"Craftax-Classic-Symbolic-v1 / medium-replay": {"iql": [40.0, 42.0, 45.0],
                                                                              "bc": [10.0, 12.0, 11.0]}}
    page = tmp_path / "docs" / "results.md"
    page.write_text("# Results\n")
    assert report.main(["--results-md", str(page)]) == 0
    text = page.read_text()
    assert "| Craftax-Classic-Symbolic-v1 / medium-replay | iql | 3 |" in text and "| above |" in text
    assert "(baseline)" in text and "`python -m benchmarks.offline_table" in text
    # Two seeds a side: no claim, however far apart.
    table.write_text(json.dumps(evaluate_many_document([10.0, 12.0], [40.0, 42.0])))
    offline_table.main([str(table), "--name", "offline_toy", "--title", "Toy tiers", "--out", str(data)])
    assert report.main(["--results-md", str(page)]) == 0
    assert "no claim (fewer than 3 seeds)" in page.read_text() and "| above |" not in page.read_text()
    with pytest.raises(SystemExit):
        offline_table.main([str(table), "--name", "x", "--title", "x", "--baseline", "awr", "--out", str(data)])


def test_offline_table_describes_each_tier_from_its_manifest(tmp_path, monkeypatch):
    """The scores are relative to the tiers' random and expert returns: the page shows them, read from
    the dataset's tier block; a dataset not on this machine is left out, not invented."""
    from benchmarks import offline_table
    from utils import trajectories
    from utils.tiers import tier_block

    block = tier_block("medium-replay", data_return=4.5, random_return=1.25, expert_return=10.5, policies=[
        {"name": "ppo-training", "update": "0..111", "return": 4.5, "episodes": 6000, "rows": 917_504}])
    manifests = {"/data/tiers/medium-replay": {"metadata": {"tier": block}}}

    def fake_read_manifest(directory):
        if str(directory) not in manifests:
            raise trajectories.DatasetError(f"{directory}: no manifest")
        return manifests[str(directory)]

    monkeypatch.setattr(trajectories, "read_manifest", fake_read_manifest)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(evaluate_many_document([10.0, 12.0, 11.0], [40.0, 42.0, 45.0])))
    data = tmp_path / "docs" / "data"
    document = json.loads(offline_table.main([str(table), "--name", "t", "--title", "T", "--out", str(data)]).read_text())
    task = "Craftax-Classic-Symbolic-v1 / medium-replay"
    assert document["datasets"][task]["rows"] == 917_504 and document["datasets"][task]["expert_return"] == 10.5
    text = report.render_scores(document, "t.json")
    assert f"| {task} | 917,504 | ppo-training, update 0..111: 4.50 | 4.50 | 1.25 | 10.50 |" in text
    manifests.clear()
    document = json.loads(offline_table.main([str(table), "--name", "t", "--title", "T", "--out", str(data)]).read_text())
    assert "datasets" not in document and "The data" not in report.render_scores(document, "t.json")


def test_a_settings_only_baseline_compares_each_algorithm_with_itself_off_and_on():
    """``--baseline augment=none``: BC with the shift against BC without it, AWR against AWR; never across."""
    assert report.baseline_of("awr augment=shift", "augment=none") == "awr augment=none"
    assert report.baseline_of("bc augment=none [hidden_state]", "augment=none") == "bc augment=none [hidden_state]"
    assert report.baseline_of("awr augment=shift", "bc") == "bc"
    document = {"title": "Shift", "baseline": "augment=none", "metric": "normalised score", "command": "c",
                "tasks": {"Craftax-Classic-Pixels-v1 / expert": {
                    "bc augment=none": [50.0, 52.0, 51.0], "bc augment=shift": [70.0, 72.0, 71.0],
                    "awr augment=none": [30.0, 31.0, 29.0], "awr augment=shift": [30.5, 29.5, 30.0]}}}
    rows = {line.split(" | ")[1]: line for line in report.render_scores(document, "t.json").splitlines()
            if line.startswith("| Craftax")}
    assert rows["bc augment=none"].endswith("| (baseline) |  |  |") and rows["awr augment=none"].endswith("|  |  |")
    assert "| 20.00 [" in rows["bc augment=shift"] and rows["bc augment=shift"].endswith("| above |")
    assert rows["awr augment=shift"].endswith("| level |"), "AWR is compared with AWR, not with BC"
