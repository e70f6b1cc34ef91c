"""Every bad command-line input a user can type stops with one ``error:`` line naming the flag, exit 2.

The table runs each case through the entry point's own ``main(argv)`` in this process (catching
``SystemExit``), so the whole matrix costs one interpreter start; a few cases also run as real
``python -m`` processes to check what a user sees, traceback-free, and that it is quick because the
checks come before any env is built or program compiled. The checks themselves live in one place
(``utils.config.check_config``, ``utils.io.check_output_path``, ``utils.run_dir``), so a case here
failing usually means a new field whose name the central rules do not recognise.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.envs import VecEnv
from utils.errors import UserError
from utils.io import check_output_path, output_path_problem, read_jsonl

REPO = Path(__file__).resolve().parent.parent

TRAINING = ["online_rl.ppo", "online_rl.ppo_rnn", "online_rl.ppo_rnd", "world_models.dreamer",
            "online_rl_llm.ppo_llm", "online_rl.random_policy"]
PPO_FAMILY = ["online_rl.ppo", "online_rl.ppo_rnn", "online_rl.ppo_rnd", "online_rl_llm.ppo_llm"]
OFFLINE = ["offline_rl.bc", "offline_rl.awr"]
RUN_FOLDERS = TRAINING + OFFLINE + ["online_rl_llm.llm_play"]

# (module, argv, the flag or argument the one line must name). Placeholders: {file} an existing
# file, {missing} a path that does not exist, {corrupt} a run folder whose config.yaml is not YAML,
# {dataset} a folder with a manifest, {suite} a suite YAML naming an unknown env, {unmakeable} a
# folder that cannot be created even by root (under /proc, whose permission bits say writable).
CASES: list[tuple[str, list[str], str]] = []
for _m in TRAINING:
    CASES += [
        (_m, ["--total-steps", "-5"], "--total-steps"),
        (_m, ["--total-steps", "0"], "--total-steps"),
        (_m, ["--total-steps", "abc"], "--total-steps"),
        (_m, ["--num-seeds", "0"], "--num-seeds"),
        (_m, ["--num-envs", "-1"], "--num-envs"),
        (_m, ["--env", "Nope-v1"], "--env"),
        (_m, ["--preset", "no_such_preset"], "--preset"),
        (_m, ["--checkpoint-every", "0"], "--checkpoint-every"),
    ]
for _m in PPO_FAMILY:
    CASES += [
        (_m, ["--save-trajectories", "{file}"], "--save-trajectories"),
        (_m, ["--save-trajectories", "{file}/data"], "--save-trajectories"),
        (_m, ["--num-minibatches", "0"], "--num-minibatches"),
        (_m, ["--lr", "0"], "--lr"),
        (_m, ["--gamma", "1.5"], "--gamma"),
    ]
for _m in RUN_FOLDERS:
    CASES += [
        (_m, ["--run-dir", "{file}/run"], "--run-dir"),
        (_m, ["--run-dir", "{file}"], "--run-dir"),
        (_m, ["--run-dir", "{corrupt}"], "--run-dir"),
        (_m, ["--run-dir", "{unmakeable}"], "--run-dir"),
        (_m, ["--no-such-flag"], "--no-such-flag"),
        (_m, ["--seed"], "--seed"),
    ]
for _m in OFFLINE:
    CASES += [
        (_m, ["--dataset", "{missing}"], "--dataset"),
        (_m, ["--dataset", "{file}"], "--dataset"),
        (_m, ["--dataset", "{dataset}", "--total-steps", "-5"], "--total-steps"),
        (_m, ["--dataset", "{dataset}", "--batch-size", "0"], "--batch-size"),
        (_m, ["--dataset", "{dataset}", "--env", "Nope-v1"], "--env"),
    ]
CASES += [
    ("world_models.dreamer", ["--batch-size", "0"], "--batch-size"),
    ("world_models.dreamer", ["--imag-horizon", "-1"], "--imag-horizon"),
    ("online_rl.ppo_rnn", ["--hidden-size", "0"], "--hidden-size"),
    ("online_rl.ppo_rnd", ["--rnd-output-size", "0"], "--rnd-output-size"),
    ("online_rl_llm.ppo_llm", ["--skip-n", "0"], "--skip-n"),
    ("online_rl_llm.ppo_llm", ["--llm-batch-size", "0"], "--llm-batch-size"),
    ("offline_rl.evaluate", ["--run-dir", "{missing}"], "--run-dir"),
    ("offline_rl.evaluate", ["--checkpoint", "{missing}"], "--checkpoint"),
    ("offline_rl.evaluate", ["--dataset", "{missing}"], "--dataset"),
    ("offline_rl.evaluate", ["--checkpoint", "{file}", "--out", "{file}/eval.json"], "--out"),
    ("offline_rl.evaluate", ["--checkpoint", "{file}", "--gif", "{file}/a.gif"], "--gif"),
    ("offline_rl.evaluate", ["--episodes", "0"], "--episodes"),
    ("offline_rl.evaluate", ["--max-steps", "-1"], "--max-steps"),
    ("offline_rl.evaluate", ["--bogus"], "--bogus"),
    ("labelling.enqueue", ["--dataset", "{missing}", "--model", "m"], "--dataset"),
    ("labelling.enqueue", ["--dataset", "{dataset}", "--model", "m", "--out", "{file}/labelled"], "--out"),
    ("labelling.enqueue", ["--dataset", "{dataset}", "--model", "m", "--out", "{file}"], "--out"),
    ("labelling.enqueue", ["--batch-size", "0"], "--batch-size"),
    ("labelling.enqueue", ["--max-length", "-3"], "--max-length"),
    ("labelling.enqueue", ["--embedded-redis", "{file}/redis.rdb"], "--embedded-redis"),
    ("labelling.enqueue", ["--bogus", "1"], "--bogus"),
    ("labelling.status", ["--window-s", "-1"], "--window-s"),
    ("labelling.status", ["--watch", "-2"], "--watch"),
    ("labelling.status", ["--watch", "0"], "--watch"),
    ("labelling.status", ["--embedded-redis", "{file}/redis.rdb"], "--embedded-redis"),
    ("labelling.status", ["--windw-s", "3"], "--windw-s"),
    ("labelling.status", ["--json", "yes"], "yes"),
    ("labelling.worker", ["--claim-idle-s", "-1"], "--claim-idle-s"),
    ("labelling.worker", ["--max-attempts", "0"], "--max-attempts"),
    ("labelling.worker", ["--threads", "0"], "--threads"),
    ("online_rl_llm.llm_play", ["--num-episodes", "0"], "--num-episodes"),
    ("online_rl_llm.llm_play", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("online_rl_llm.llm_play", ["--few-shot", "{missing}"], "--few-shot"),
    ("online_rl_llm.llm_play", ["--env", "Nope-v1"], "--env"),
    ("online_rl_llm.llm_play", ["--temperature", "nan"], "--temperature"),
    ("servers.hidden_state_server", ["--bogus"], "--bogus"),
    ("servers.hidden_state_server", ["--max-batch", "0"], "--max-batch"),
    ("servers.hidden_state_server", ["--port", "-1"], "--port"),
    ("servers.hidden_state_server", ["--batch-size", "0"], "--batch-size"),
    ("servers.hidden_state_server", ["--max-wait-ms", "-1"], "--max-wait-ms"),
    ("tools.render", ["--out", "{file}/a.gif", "--text", "{file}"], "--out"),
    ("tools.render", ["--out", "a.gif", "--run", "{missing}"], "--run"),
    ("tools.render", ["--out", "a.gif", "--dataset", "{missing}"], "--dataset"),
    ("tools.render", ["--out", "a.gif", "--fps", "0"], "--fps"),
    ("tools.render", ["--out", "a.gif", "--episodes", "0"], "--episodes"),
    ("tools.render", ["--text", "{file}"], "--out"),
    ("tools.render", ["--bogus", "1"], "--bogus"),
    ("tools.stats", ["{missing}"], "PATH"),
    ("tools.stats", ["{dataset}", "--json", "{file}/s.json"], "--json"),
    ("tools.stats", [], "PATH"),
    ("tools.stats", ["{dataset}", "--bogus"], "--bogus"),
    ("tools.plot", ["{missing}"], "RUNS"),
    ("tools.plot", ["{metrics_run}", "--out", "{file}/curves.png"], "--out"),
    ("tools.plot", ["{metrics_run}", "--x", "wall"], "--x"),
    ("tools.plot", ["{metrics_run}", "--bogus"], "--bogus"),
    ("tools.play", ["--env", "Nope-v1"], "--env"),
    ("tools.play", ["--record", "{file}"], "--record"),
    ("tools.play", ["--scale", "-1"], "--scale"),
    ("tools.play", ["--max-steps", "0"], "--max-steps"),
    ("tools.play", ["--bogus"], "--bogus"),
    ("benchmarks.compare", ["{suite}", "--list"], "envs"),
    ("benchmarks.compare", ["classic_debug", "--env", "Nope-v1", "--list"], "--env"),
    ("benchmarks.compare", ["classic_debug", "--budget", "-5", "--list"], "--budget"),
    ("benchmarks.compare", ["classic_debug", "--seeds", "0", "--list"], "--seeds"),
    ("benchmarks.compare", ["classic_debug", "--runs-root", "{file}/runs", "--list"], "--runs-root"),
    ("benchmarks.compare", ["classic_debug", "--bogus"], "--bogus"),
    ("benchmarks.compare", ["no_such_suite", "--list"], "suite"),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    """The paths the placeholders in CASES stand for."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "a_file").write_text("not a folder\n")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.yaml").write_text("env: [Craftax-Classic-Symbolic-v1\nseed: 0\n")
    (root / "dataset").mkdir()
    (root / "dataset" / "manifest.json").write_text("{}\n")
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text('{"step": 1, "episode/return": [1.0]}\n{"step": 2, "epis')
    (root / "suite.yaml").write_text("envs: [Nope-v1]\nbudget: 100\nmethods:\n  ppo: {module: online_rl.ppo}\n")
    return {"file": str(root / "a_file"), "missing": str(root / "missing"), "corrupt": str(root / "corrupt"),
            "dataset": str(root / "dataset"), "metrics_run": str(root / "run"), "suite": str(root / "suite.yaml"),
            "unmakeable": UNMAKEABLE}


UNMAKEABLE = "/proc/craftax-baselines/run"


def _skip_without_proc(argv: list[str]) -> None:
    if any("{unmakeable}" in arg for arg in argv) and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system to stand for a folder that cannot be created")


def _no_env(*args, **kwargs):
    raise RuntimeError("a bad input got past validation: an env was being built")


def assert_one_error_line(code, err: str, names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert names in lines[0], err


@pytest.mark.parametrize("module,argv,names", CASES, ids=[f"{m}:{' '.join(a)}" for m, a, _ in CASES])
def test_bad_input_is_one_error_line(module, argv, names, bad, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # should a check regress, nothing is written into the repository
    monkeypatch.setattr(VecEnv, "__init__", _no_env)  # ... and no training starts in this process
    _skip_without_proc(argv)
    main = importlib.import_module(module).main
    capsys.readouterr()  # import-time noise is not part of the answer
    with pytest.raises(SystemExit) as stop:
        main([arg.format(**bad) for arg in argv])
    assert_one_error_line(stop.value.code, capsys.readouterr().err, names)
    assert not (tmp_path / "runs").exists(), "a bad input must be refused before a run folder is made"


@pytest.mark.parametrize("module,argv,names", [
    ("online_rl.ppo", ["--total-steps", "-5"], "--total-steps"),
    ("world_models.dreamer", ["--run-dir", "{file}/run"], "--run-dir"),
    ("tools.plot", ["{metrics_run}", "--out", "{file}/curves.png"], "--out"),
    ("labelling.status", ["--foo"], "--foo"),
    ("online_rl.ppo", ["--run-dir", "{unmakeable}", "--preset", "debug"], "--run-dir"),  # once a traceback
])
def test_bad_input_in_a_real_process(module, argv, names, bad, tmp_path):
    _skip_without_proc(argv)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *[a.format(**bad) for a in argv]], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert_one_error_line(done.returncode, done.stderr, names)
    # Validation comes before any compilation: the time is the interpreter and its imports.
    assert time.perf_counter() - start < 60


def test_default_run_folder_under_a_file(tmp_path, monkeypatch, capsys):
    from online_rl.ppo import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(VecEnv, "__init__", _no_env)
    (tmp_path / "runs").write_text("a file where the run folders would go\n")
    with pytest.raises(SystemExit) as stop:
        main(["--preset", "debug"])
    assert_one_error_line(stop.value.code, capsys.readouterr().err, "--run-dir")


def test_unknown_flag_names_the_closest_field(capsys):
    from labelling.status import main

    with pytest.raises(SystemExit):
        main(["--windw-s", "3"])
    assert capsys.readouterr().err.strip() == "error: unknown flag --windw-s (did you mean --window-s?); see --help"


def test_help_still_exits_0(capsys):
    from tools.plot import main

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "--metric" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# The helpers behind the table
# ---------------------------------------------------------------------------------------------------


def test_output_path_problems(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert output_path_problem(tmp_path / "new" / "deeper", "dir") is None
    assert output_path_problem(tmp_path, "dir") is None
    assert "is a file, not a folder" in output_path_problem(a_file, "dir")
    assert "is a folder, not a file" in output_path_problem(tmp_path, "file")
    assert "is a file, so" in output_path_problem(a_file / "x" / "y.png", "file")
    with pytest.raises(UserError, match="^--out: .* pass a different --out$"):
        check_output_path(a_file / "x.png", "--out")
    check_output_path(None, "--out")  # an unset optional output is fine
    assert sorted(tmp_path.iterdir()) == [a_file], "the write check leaves nothing behind"
    if Path("/proc/self").is_dir():  # writable by its permission bits, yet nothing can be made there
        assert "cannot be created: nothing can be created in /proc" in output_path_problem(UNMAKEABLE, "dir")
        assert "/proc cannot be written" in output_path_problem("/proc", "dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_path_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "not writable" in output_path_problem(locked / "run", "dir")
    finally:
        locked.chmod(0o700)


def test_read_jsonl_drops_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "x": [1.0]}, {"step": 2, "x": [2.0]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "x": [3.')
    assert read_jsonl(path) == rows
    path.write_text(json.dumps(rows[0]) + "\n{broken\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(UserError, match="line 2: not JSON"):
        read_jsonl(path)


def test_resume_after_a_kill_mid_line_keeps_the_whole_rows(tmp_path):
    from utils.logger import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    logger = MetricsLogger(tmp_path, resume_step=2)
    logger.log(3, {"a": 3})
    logger.close()
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_plot_reads_a_run_killed_mid_line(bad, tmp_path):
    from tools.plot import main

    out = main([bad["metrics_run"], "--out", str(tmp_path / "curves.png")])
    assert out.is_file() and out.stat().st_size > 0
