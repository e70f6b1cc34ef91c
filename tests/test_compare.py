"""benchmarks.compare: suites, runs at equal env steps, the results block, and the Slurm array job."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import compare, records, report
from tests.test_scripts import module_help, sbatch_directives
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SUITES = sorted(compare.SUITES_DIR.glob("*.yaml"))
BUDGET = 512  # two compiled chunks of the debug presets (2 updates x 8 envs x 16 steps each): some episodes end


# ---------------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_suite_names_real_modules_presets_and_flags(path, monkeypatch):
    monkeypatch.setenv("CRAFTAX_LLM_MODEL", "/models/llm")
    monkeypatch.setenv("OFFLINE_RUNS", "runs/offline_tiers/classic_runs")  # offline_to_online_classic
    suite = compare.load_suite(str(path))
    assert suite.budget > 0 and suite.envs and suite.methods
    for method in suite.methods:
        assert importlib.util.find_spec(method.module), f"{path.name}: module {method.module} does not exist"
        area, name = method.module.split(".")
        presets = yaml.safe_load((REPO / "configs" / area / f"{name}.yaml").read_text()) if method.presets else {}
        assert set(method.presets) <= set(presets), f"{path.name}: {method.name} names unknown presets"
        status, help_text = module_help(method.module)
        assert status == 0, help_text[-2000:]
        task = next(t for t in compare.suite_tasks(suite) if t.method == method)
        for flag in [w.split("=")[0] for w in task.argv("runs") if w.startswith("--")]:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                f"{path.name}: {method.name} passes {flag}, unknown to python -m {method.module}"


def write_suite(tmp_path: Path, text: str) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("envs: [E]\nbudget: 10\nmethods: {a: {module: m}}\nseed: 3\n", "unknown keys seed"),
    ("envs: [E]\nbudget: 0\nmethods: {a: {module: m}}\n", "'budget' must be a positive integer"),
    ("envs: [E]\nbudget: 10\nmethods: {a: {presets: [x]}}\n", "method a needs 'module'"),
    ("envs: [E]\nbudget: 10\nmethods: {a: {module: m, flag: [--x]}}\n", "method a: unknown keys flag"),
    ("budget: 10\nmethods: {a: {module: m}}\n", "'envs' must list at least one env"),
    ("envs: [E]\nbudget: 10\nmethods: {a: {module: m}}\nslurm: {partition: gpu}\n", "slurm: unknown keys partition"),
    ("envs: [E\n", "not valid YAML"),
    ("envs: [Craftax-Classic-Symbolic-v1]\nbudget: 10\nmethods: {a: {module: m}}\ntime_target_seconds: 0\n",
     "'time_target_seconds' must be a positive number"),
    ("envs: [Craftax-Classic-Symbolic-v1]\nbudget: 10\nmethods: {a: {module: m}}\nearly_steps: [0]\n",
     "'early_steps' must be a list of positive env-step counts"),
    ("envs: [Craftax-Classic-Symbolic-v1]\nbudget: 10\nmethods: {a: {module: m}}\nreferences:\n"
     "  - {env: Craftax-Classic-Symbolic-v1, label: x, value: 1.0, source: s, env_steps: -5}\n",
     "may give env_steps (a positive integer"),
    ("envs: [Craftax-Classic-Symbolic-v1]\nbudget: 10\nmethods: {a: {module: m}}\ndiagnostics: diag/x\n",
     "diagnostics must be a list of strings"),
    ("envs: [Craftax-Classic-Symbolic-v1]\nbudget: 10\nmethods: {a: {module: m, budget_factor: 0.5}}\n",
     "method a: 'budget_factor' must be a positive integer"),
])
def test_bad_suites_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        compare.load_suite(write_suite(tmp_path, text))


def test_unknown_suite_and_method_name_the_choices():
    with pytest.raises(UserError, match="available: .*classic_debug"):
        compare.load_suite("no_such_suite")
    with pytest.raises(UserError, match="not in suite classic_debug"):
        compare.load_suite("classic_debug", methods=["dreamer_v9"])


def test_tasks_split_seeds_and_expand_site_variables(tmp_path, monkeypatch):
    suite = compare.load_suite(write_suite(tmp_path, """
envs: [Craftax-Classic-Symbolic-v1]
seeds: 2
first_seed: 4
budget: 1000
flags: [--checkpoint-every, "5"]
methods:
  together: {module: online_rl.ppo, presets: [cpu], flags: [--icm]}
  apart: {module: online_rl_llm.ppo_llm, flags: [--llm-model, "${SITE_MODEL}"], seeds_together: false}
"""), budget=300)
    tasks = compare.suite_tasks(suite)
    assert [(t.method.name, t.seeds) for t in tasks] == [("together", (4, 5)), ("apart", (4,)), ("apart", (5,))]
    assert tasks[0].argv("R") == ["--env", "Craftax-Classic-Symbolic-v1", "--preset", "cpu", "--run-dir",
                                  "R/suite/Craftax-Classic-Symbolic-v1/together/seeds4-5", "--seed", "4",
                                  "--num-seeds", "2", "--total-steps", "300", "--checkpoint-every", "5", "--icm"]
    monkeypatch.delenv("SITE_MODEL", raising=False)
    with pytest.raises(UserError, match="needs the environment variable SITE_MODEL"):
        tasks[2].argv("R")
    monkeypatch.setenv("SITE_MODEL", "/m/qwen")
    assert tasks[2].argv("R")[-2:] == ["--llm-model", "/m/qwen"] and "--seed" in tasks[2].argv("R")
    assert tasks[2].run_dir("R") == Path("R/suite/Craftax-Classic-Symbolic-v1/apart/seed5")
    long = dataclasses.replace(tasks[0], method=dataclasses.replace(tasks[0].method, budget_factor=20))
    assert long.argv("R")[long.argv("R").index("--total-steps") + 1] == str(20 * suite.budget)


def test_cpu_seconds_of_a_killed_segment_mark_the_total_incomplete(tmp_path, monkeypatch):
    """A process killed before writing its task record (a session's end, a preempted job) costs CPU that
    no record holds: the table must print no CPU figure rather than the surviving segments' share."""
    suite = compare.load_suite(write_suite(tmp_path, """
envs: [Craftax-Classic-Symbolic-v1]
seeds: 1
budget: 1000
methods:
  ppo: {module: online_rl.ppo, presets: [debug]}
"""))
    task = compare.suite_tasks(suite)[0]
    run_dir = task.run_dir(tmp_path / "runs")

    def log_rows(count):
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as handle:
            handle.writelines('{"step": 1}\n' for _ in range(count))

    monkeypatch.setattr(compare, "_run_subprocess", lambda command: log_rows(2) or 0)
    compare.run_task(task, tmp_path / "runs")
    record = compare._read_json(run_dir / compare.TASK_RECORD)
    assert record["metric_rows"] == 2 and record["cpu_seconds_incomplete"] is False
    compare.run_task(task, tmp_path / "runs")  # a resume after a finished segment: still whole
    assert compare._read_json(run_dir / compare.TASK_RECORD)["cpu_seconds_incomplete"] is False
    log_rows(3)  # a segment that was killed: rows, but no record
    compare.run_task(task, tmp_path / "runs")
    record = compare._read_json(run_dir / compare.TASK_RECORD)
    assert record["metric_rows"] == 9 and record["cpu_seconds_incomplete"] is True
    monkeypatch.setattr(records, "run_entries", lambda *args: [{"seed": 0}])
    monkeypatch.setattr(records, "run_config", lambda *args: {})
    assert compare.method_record([task], tmp_path / "runs", [1000])["processes"][0]["cpu_seconds"] is None


# ---------------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------------


def test_results_block_is_appended_once_then_replaced_in_place():
    text = "# Results\n\nintro\n"
    once = report.replace_block(text, "s", "table v1\n")
    assert once.startswith(text) and once.count("<!-- report:s:begin -->") == 1 and "table v1" in once
    after = once + "\n## Later section\n"
    twice = report.replace_block(after, "s", "table v2\n")
    assert "table v1" not in twice and "table v2" in twice and twice.endswith("## Later section\n")
    assert report.replace_block(twice, "s", "table v2\n") == twice
    assert report.replace_block(twice, "other", "x").count("<!-- report:s:end -->") == 1
    with pytest.raises(UserError, match="without"):
        report.replace_block("<!-- report:s:begin -->\nno end\n", "s", "x")


# ---------------------------------------------------------------------------------------------------
# The classic_debug suite end to end
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_runs(tmp_path_factory):
    """classic_debug at a tiny budget: ppo through its `python -m` entry point, then the whole suite
    (ppo already done, ppo_rnn in this process), then the table into a results file that already has
    another section."""
    root = tmp_path_factory.mktemp("compare")
    runs, results = root / "runs", root / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\n## Before\n\ntext\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.run([sys.executable, "-m", "benchmarks.compare", "classic_debug", "--budget", str(BUDGET),
                            "--methods", "ppo", "--runs-root", str(runs), "--no-collect"],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    status = compare.main(["classic_debug", "--budget", str(BUDGET), "--runs-root", str(runs),
                           "--results-md", str(results), "--in-process"])
    assert status == 0
    return runs, results, first.stdout


def test_suite_runs_every_method_and_writes_the_table(debug_runs, capsys):
    runs, results, first_output = debug_runs
    assert "[1/1] ppo on Craftax-Classic-Symbolic-v1 (seed0): starting" in first_output
    text = results.read_text()
    assert text.startswith("# Results\n\n## Before\n\ntext\n\n<!-- report:classic_debug:begin -->\n")
    begin, end = text.index("<!-- report:classic_debug:begin -->"), text.index("<!-- report:classic_debug:end -->")
    block = text[begin:end]
    assert text.endswith("<!-- report:classic_debug:end -->\n"), "a missing block is appended"
    assert f"python -m benchmarks.compare classic_debug --budget {BUDGET}" in block
    main_table = block.split("| method | seeds |")[1].split("\n\n")[0]
    rows = {line.split("|")[1].strip(): line for line in main_table.splitlines() if re.match(r"\| ppo", line)}
    assert set(rows) == {"ppo", "ppo_rnn"}
    for name, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[8] == f"{BUDGET:,}", f"{name} trained {cells[8]} env steps, not the budget"
        assert re.fullmatch(r"-?\d+\.\d\d \(one seed\)", cells[2]), f"{name}: no return: {row}"
        assert float(cells[9].replace(",", "")) > 0, f"{name}: no CPU seconds: {row}"
    figure = results.parent / "figures" / "report_classic_debug_Craftax-Classic-Symbolic-v1.png"
    assert figure.stat().st_size > 10_000 and "(figures/report_classic_debug_Craftax-Classic-Symbolic-v1.png)" in block
    record = records.read(results.parent / "data" / "classic_debug.json")
    runs_of = record["envs"]["Craftax-Classic-Symbolic-v1"]["methods"]["ppo"]["runs"]
    assert [r["seed"] for r in runs_of] == [0] and len(runs_of[0]["curve"]["episode/return"]) == records.CURVE_POINTS
    assert report.check(results, results.parent / "data") == [], "the block is what the record alone generates"
    for method in ("ppo", "ppo_rnn"):
        run_dir = runs / "classic_debug" / "Craftax-Classic-Symbolic-v1" / method / "seed0"
        assert (run_dir / "summary.json").exists() and (run_dir / "metrics.jsonl").exists()
        assert (run_dir / compare.TASK_RECORD).exists()


def test_rerun_skips_finished_runs_and_rewrites_the_block_identically(debug_runs, capsys):
    runs, results, _ = debug_runs
    with open(results, "a") as f:  # a section after the block must stay where it is
        f.write("\n## After\n\nmore text\n")
    before = results.read_text()
    assert compare.main(["classic_debug", "--budget", str(BUDGET), "--runs-root", str(runs),
                         "--results-md", str(results)]) == 0
    output = capsys.readouterr().out
    assert output.count("done, skipped") == 2 and "starting" not in output
    assert results.read_text() == before
    compare.main(["classic_debug", "--budget", str(BUDGET), "--runs-root", str(runs), "--list"])
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 2 and all(" done " in line for line in listing)


def test_rerunning_one_method_keeps_every_row_of_the_block(debug_runs, capsys):
    runs, results, _ = debug_runs
    before = results.read_text()
    assert compare.main(["classic_debug", "--budget", str(BUDGET), "--methods", "ppo_rnn", "--runs-root", str(runs),
                         "--results-md", str(results)]) == 0
    assert "done, skipped" in capsys.readouterr().out
    assert results.read_text() == before, "the block must still list ppo and ppo_rnn, under the suite's command"


def test_collecting_on_a_machine_without_the_runs_keeps_the_committed_seeds(debug_runs, tmp_path, capsys):
    """Run folders die with their machine; the committed record must not: a collection from a runs root
    holding nothing (or only some seeds) rewrites the same record and the same block."""
    runs, results, _ = debug_runs
    data = results.parent / "data" / "classic_debug.json"
    record_before, page_before = data.read_text(), results.read_text()
    assert compare.main(["classic_debug", "--budget", str(BUDGET), "--runs-root", str(tmp_path / "empty"),
                         "--results-md", str(results), "--collect"]) == 0
    assert data.read_text() == record_before and results.read_text() == page_before
    partial = tmp_path / "partial"  # ppo's folder only: ppo_rnn comes from the record
    shutil.copytree(runs / "classic_debug" / "Craftax-Classic-Symbolic-v1" / "ppo",
                    partial / "classic_debug" / "Craftax-Classic-Symbolic-v1" / "ppo")
    assert compare.main(["classic_debug", "--budget", str(BUDGET), "--runs-root", str(partial),
                         "--results-md", str(results), "--collect"]) == 0
    assert data.read_text() == record_before and results.read_text() == page_before


def _entry(seeds, config=None, presets=("cpu",)):
    return {"module": "online_rl.ppo", "presets": list(presets), "flags": [], "config": config or {"lr": 1},
            "processes": [{"seeds": [s], "wall_seconds": 1.0} for s in seeds],
            "runs": [{"seed": s, "final": {}} for s in seeds]}


def test_merging_keeps_old_seeds_in_order_and_refuses_another_config():
    merged = compare.merge_previous(_entry([101]), _entry([100, 102, 107]), [100, 101, 102])
    assert [r["seed"] for r in merged["runs"]] == [100, 101, 102], "seed 107 is not in the suite"
    assert [p["seeds"] for p in merged["processes"]] == [[100], [101], [102]]
    fresh = _entry([100])
    assert compare.merge_previous(fresh, _entry([100, 101]), [100, 101])["runs"][0] is fresh["runs"][0], \
        "a seed trained here replaces its committed entry"
    assert compare.merge_previous(_entry([101]), _entry([100], presets=("debug",)), [100, 101])["runs"] == \
        [{"seed": 101, "final": {}}], "another method's seeds are not this method's"
    with pytest.raises(UserError, match="keys differ: lr"):
        compare.merge_previous(_entry([101]), _entry([100], config={"lr": 2}), [100, 101])
    assert compare.merge_previous({**_entry([]), "config": {}}, _entry([100]), [100])["config"] == {"lr": 1}
    added = compare.merge_previous(_entry([101], config={"lr": 1, "new_field": 0}), _entry([100]), [100, 101])
    assert [r["seed"] for r in added["runs"]] == [100, 101], "a field added to the code since is no other setup"


def test_a_changed_budget_is_a_new_run_not_done(debug_runs, capsys):
    runs, _, _ = debug_runs
    compare.main(["classic_debug", "--budget", str(2 * BUDGET), "--runs-root", str(runs), "--list"])
    assert all(" partial " in line for line in capsys.readouterr().out.splitlines())


# ---------------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------------


def test_slurm_dry_run_prints_a_valid_array_job(debug_runs, capsys, tmp_path):
    runs, _, _ = debug_runs
    assert compare.main(["classic_debug", "--budget", str(BUDGET), "--runs-root", str(runs), "--slurm",
                         "--dry-run", "--partition", "gpu-p", "--account", "proj1",
                         "--sbatch-option=--constraint=a100", "--max-parallel", "1"]) == 0
    script = capsys.readouterr().out
    directives = dict(sbatch_directives(script))
    assert directives["array"] == "0-1%1" and directives["partition"] == "gpu-p" and directives["account"] == "proj1"
    assert directives["time"] == "00:30:00" and directives["constraint"] == "a100"
    assert "gres" not in directives, "classic_debug asks for no GPU"
    assert directives["output"].startswith(str(runs.resolve() / "classic_debug" / "slurm"))
    path = tmp_path / "array.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # Array task 1 for real: the run is finished, so the task finds it done and exits cleanly.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CRAFTAX_"))}
    done = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**clean, "SLURM_ARRAY_TASK_ID": "1", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1/1] ppo_rnn on Craftax-Classic-Symbolic-v1 (seed0): done, skipped" in done.stdout


def test_slurm_submits_the_array_then_a_collect_job_after_it(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$FAKE_SBATCH_LOG"\necho $((4000 + $(wc -l < "$FAKE_SBATCH_LOG")))\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(tmp_path / "sbatch.log"))
    results = tmp_path / "elsewhere" / "results.md"
    assert compare.main(["classic_debug", "--runs-root", str(tmp_path / "runs"), "--slurm",
                         "--results-md", str(results)]) == 0
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    folder = tmp_path / "runs" / "classic_debug" / "slurm"
    assert calls == [f"--parsable {folder / 'array.sbatch'}",
                     f"--parsable --dependency=afterany:4001 {folder / 'collect.sbatch'}"]
    assert "submitted array job 4001 (2 tasks) and collect job 4002" in capsys.readouterr().out
    collect = (folder / "collect.sbatch").read_text()
    assert "--array" not in collect and "benchmarks.compare" in collect and "--collect" in collect
    assert f"--results-md {results}" in collect  # the table goes where the submitter asked
    sbatch_directives(collect)


def test_task_index_out_of_range_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as stop:
        compare.main(["classic_debug", "--task", "7"])
    assert stop.value.code == 2 and "tasks 0-1" in capsys.readouterr().err
