"""Benchmarks that the README and docs quote as commands: each one runs at a debug size, so a change to
the code it measures cannot break it unseen."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ppo_sps

REPO = Path(__file__).resolve().parent.parent


def test_ppo_sps_runs_the_readme_command_at_debug_size(capsys):
    """``python -m benchmarks.ppo_sps --preset cpu`` (README, common commands) at the debug preset: it
    once crashed after ``make_train`` began returning an ``Algorithm``."""
    ppo_sps.main(["--preset", "debug", "--updates", "1", "--repeats", "1"])
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == ["debug"] and result["num_envs"] == 8
    assert result["ppo_steps_per_second"] > 0 and result["env_steps_per_second"] > 0
    assert result["ppo_over_env"] == result["ppo_steps_per_second"] / result["env_steps_per_second"]


def run_benchmark(module: str, *args: str, timeout: int = 900) -> str:
    """A benchmark as a user runs it (``python -m``), at a small budget; its stdout."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
    assert done.returncode == 0, f"python -m {module} {' '.join(args)}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def printed_json(output: str) -> dict:
    """The indented JSON object a benchmark prints (between a line ``{`` and a line ``}``; progress lines
    before it and a markdown table after it are not part of it)."""
    lines = output.splitlines()
    start = lines.index("{")
    return json.loads("\n".join(lines[start:lines.index("}", start) + 1]))


def test_env_throughput_at_a_small_budget():
    result = printed_json(run_benchmark("benchmarks.env_throughput", "--num-envs", "8", "--num-steps", "16",
                                     "--repeats", "1"))
    assert result["steps_per_second"] > 0 and result["num_envs"] == 8


def test_tetris_throughput_at_a_small_budget():
    output = run_benchmark("benchmarks.tetris_throughput", "--num-envs", "8", "--steps", "16", "--repeats", "1")
    rates = dict(re.findall(r"^\s*(direct|placement): +([\d,]+) steps/s", output, re.MULTILINE))
    assert set(rates) == {"direct", "placement"} and all(int(v.replace(",", "")) > 0 for v in rates.values())


@pytest.mark.slow
def test_ppo_family_sps_at_debug_size():
    result = printed_json(run_benchmark("benchmarks.ppo_family_sps", "--methods", "ppo,ppo_rnd", "--updates", "1",
                                     "--repeats", "1", "--preset", "debug"))
    assert set(result["steps_per_second"]) == {"ppo", "ppo_rnd"} and result["relative_to_ppo"]["ppo"] == 1.0


@pytest.mark.slow
def test_dreamer_sps_at_debug_size():
    output = run_benchmark("benchmarks.dreamer_sps", "--versions", "3", "--sizes", "xs", "--updates", "2",
                           "--repeats", "1", "--", "--preset", "debug")
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert rows and rows[0]["version"] == 3 and rows[0]["loop_env_steps_per_s"] > 0
    assert "| V3 | xs |" in output


@pytest.mark.slow
def test_ppo_llm_sps_with_the_tiny_model():
    output = run_benchmark("benchmarks.ppo_llm_sps", "--num-envs", "4", "--num-steps", "4", "--num-minibatches", "1",
                           "--skip-n", "4", "--updates", "1", "--repeats", "1")
    rows = printed_json(output)["rows"]
    assert len(rows) >= 2 and all(row["steps_per_second"] > 0 for row in rows), rows


def test_offline_loader_on_a_small_dataset(tmp_path):
    from tests.test_offline_rl import scripted_dataset

    scripted_dataset(tmp_path / "data", rows=2048)
    output = run_benchmark("benchmarks.offline_loader", "--dataset", str(tmp_path / "data"), "--workers", "0",
                           "--batch-size", "64", "--batches", "8", "--train-updates", "4")
    result = printed_json(output)
    assert result["transitions"] == 2048 and result["loader"][0]["transitions_per_second"] > 0
    assert result["train_bc_transitions_per_second"] > 0 and result["train_awr_transitions_per_second"] > 0


@pytest.mark.slow
def test_scale_throughput_writes_both_tables_at_debug_size(tmp_path):
    from benchmarks import scale_throughput

    written = scale_throughput.main(["--preset", "debug", "--total-steps", "512", "--devices", "1", "2",
                                     "--repeats", "1", "--sweep", "lr=1e-4,3e-4", "--num-seeds", "1",
                                     "--warm-cache", "--out", str(tmp_path)])
    devices = json.loads(open(written["devices"]).read())
    assert [r["devices"] for r in devices["rows"]] == [1, 2] and all(r["sps"][0] > 0 for r in devices["rows"])
    assert devices["rows"][0]["relative"] == [1.0]
    sweep = json.loads(open(written["sweep"]).read())
    assert len(sweep["rows"]) == 2 and all(r["seconds"][0] > 0 for r in sweep["rows"])
    assert "2 points x 1 seeds" in sweep["rows"][0]["arm"]
