"""Every sbatch script, submitted to a real Slurm cluster with its debug preset.

tests/test_scripts.py checks the scripts without Slurm (syntax, #SBATCH lines, dry runs, stand-ins
for sbatch). Here each script in scripts/sbatch/ is submitted as docs/scripts.md documents it, with
the CPU recipe of that page (``--gres=none`` and a small CPU/memory request) to the cluster of this
machine (.ci/slurm_up.sh sets up a one-node one; skipped where there is none), and the test waits
for the job and checks its final state (``scontrol show job``), its log and its run folder. Those
tests are marked slow: debug presets and Craftax-Classic keep each job short, and the jobs share
this test session's JAX compilation cache (CRAFTAX_JAX_CACHE), so a second run compiles nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    CPU_JOB,
    assert_completed,
    cluster_unavailable,
    job_env,
    log_of,
    site_checkout,
    submit,
    tasks,
    wait,
)
from utils.jax_setup import default_cache_dir

ENV = "Craftax-Classic-Symbolic-v1"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A site checkout (tests/slurm_cluster.py) on a cluster that is up; skips where there is none."""
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    return site_checkout(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="module")
def env(checkout) -> dict[str, str]:
    """The jobs' environment: CPU JAX, this session's compilation cache, and a CRAFTAX_SETUP file
    (the scripts' hook for site setup) that gives the jobs this test's niceness, which slurmd's
    children would not inherit."""
    setup = checkout / "job_setup.sh"
    setup.write_text(f"renice -n {os.nice(0)} -p $$ >/dev/null\n")
    return job_env(JAX_PLATFORMS="cpu", CRAFTAX_JAX_CACHE=str(default_cache_dir()), CRAFTAX_SETUP=str(setup))


def test_without_slurm_the_tests_skip_saying_why(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "Slurm is not installed" in cluster_unavailable()


def summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    assert path.is_file(), f"{run_dir} has no summary.json: {sorted(p.name for p in run_dir.glob('*'))}"
    return json.loads(path.read_text())


def only_run(checkout: Path, pattern: str) -> Path:
    """The one run folder under the checkout's runs/ matching ``pattern``."""
    found = sorted(checkout.glob(f"runs/{pattern}"))
    assert len(found) == 1, f"expected one run folder runs/{pattern}, found {found}"
    return found[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ppo_family_array_trains_one_seed_per_task(checkout, env):
    job = submit(checkout, "ppo_family.sbatch", ["ppo", "--preset", "debug"], ["--array=0-1", *CPU_JOB], env)
    found = wait(job)
    assert_completed(found, count=2)
    for task in found:
        seed = int(task.array_task)
        run_dir = checkout / f"runs/online_rl/ppo/{ENV}/debug-s{seed}"
        assert Path(task.fields["StdOut"]).name == f"ppo-family-{job}_{seed}.out", "log named %x-%A_%a.out"
        assert f"run folder: {run_dir.relative_to(checkout)}" in log_of(task)
        result = summary(run_dir)
        assert result["complete"] and result["env_steps_per_seed"] == 512


@pytest.mark.slow
def test_sweep_array_splits_one_sweep_over_its_tasks(checkout, env):
    folder = checkout / "runs" / "sweep_array"
    job = submit(checkout, "sweep_array.sbatch", ["ppo", "--preset", "debug", "--eval-every", "0", "--run-dir",
                                                  str(folder), "--sweep", "lr=1e-4,1e-3"], ["--array=0-1", *CPU_JOB], env)
    assert_completed(wait(job), count=2)
    index = json.loads((folder / "sweep.json").read_text())
    assert [p["folder"] for p in index["programs"]] == ["program_000", "program_001"], "one program per task"
    for program in index["programs"]:
        assert summary(folder / program["folder"])["complete"]


@pytest.mark.slow
def test_dreamer_trains(checkout, env):
    job = submit(checkout, "dreamer.sbatch", ["--version", "3", "--preset", "debug"], CPU_JOB, env)
    assert_completed(wait(job))
    result = summary(only_run(checkout, f"world_models/*/{ENV}/debug-s0"))
    assert result["complete"] and result["env_steps_per_seed"] == 256


@pytest.mark.slow
def test_ppo_llm_trains_with_the_tiny_llm(checkout, env, tiny_llm_path):
    job = submit(checkout, "ppo_llm.sbatch", ["--preset", "debug", "--llm-model", tiny_llm_path], CPU_JOB, env)
    assert_completed(wait(job))
    result = summary(only_run(checkout, f"online_rl_llm/ppo_llm/{ENV}/debug-s0"))
    assert result["complete"] and result["env_steps_per_seed"] == 512


@pytest.mark.slow
def test_llm_play_plays_its_episodes(checkout, env, tiny_llm_path):
    job = submit(checkout, "llm_play.sbatch", ["--model", tiny_llm_path, "--preset", "debug"], CPU_JOB, env)
    (task,) = wait(job)
    assert_completed([task])
    run_dir = only_run(checkout, f"online_rl_llm/llm_play/{ENV}/*-debug-s0")  # <model>-<presets>-s<seed>
    assert "2 episodes:" in log_of(task)
    assert len((run_dir / "episodes.jsonl").read_text().splitlines()) == 2, "one line per episode (debug: 2)"


@pytest.mark.slow
def test_offline_train_then_evaluate_after_it(checkout, env, tmp_path):
    """AWR on a small dataset, and its evaluation submitted at once with --dependency=afterok."""
    from benchmarks.labelling_throughput import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", shards=2, steps=16, streams=4)
    train = submit(checkout, "offline_train.sbatch", ["awr", "--dataset", str(data), "--preset", "debug"],
                   CPU_JOB, env)
    run_dir = checkout / f"runs/offline_rl/awr/{ENV}/debug-s0"
    evaluate = submit(checkout, "offline_evaluate.sbatch", ["--run-dir", str(run_dir), "--preset", "debug"],
                      [*CPU_JOB, f"--dependency=afterok:{train}"], env)
    assert_completed(wait(train))
    assert sorted(run_dir.glob("checkpoints/*")) or sorted(run_dir.glob("*.pt")), f"no checkpoint in {run_dir}"
    (task,) = wait(evaluate)
    assert_completed([task])
    assert "metrics" in json.loads((run_dir / "eval.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["text", "image"])
def test_hidden_state_server_answers_until_cancelled(checkout, env, tiny_llm_path, tiny_vlm_path, tmp_path, modality):
    """The same script serves a text model or a vision-language one (the model decides)."""
    model = tiny_llm_path if modality == "text" else tiny_vlm_path
    port, url_file = free_port(), tmp_path / "server_url"
    job = submit(checkout, "hidden_state_server.sbatch", ["--model", model, "--preset", "debug"], CPU_JOB,
                 {**env, "HIDDEN_STATE_PORT": str(port), "HIDDEN_STATE_URL_FILE": str(url_file)})
    try:
        deadline, health = time.monotonic() + 600, None
        while health is None and time.monotonic() < deadline:
            (task,) = tasks(job)
            assert task.state in {"PENDING", "CONFIGURING", "RUNNING"}, f"server ended: {task.state}\n{log_of(task)}"
            if url_file.is_file():
                try:
                    with urllib.request.urlopen(f"{url_file.read_text().strip()}/health", timeout=5) as answer:
                        health = json.loads(answer.read())
                except OSError:
                    pass
            time.sleep(2)
        assert health is not None, f"no answer from the server within 600 s:\n{log_of(tasks(job)[0])}"
        assert health.get("modality") == modality, health
    finally:
        subprocess.run(["scancel", job], check=False)
    (task,) = wait(job, timeout=120)
    assert task.state == "CANCELLED", task.state
    assert re.match(rf"hidden-state server: http://\S+:{port} ", log_of(task)), log_of(task)[:500]


@pytest.mark.slow
def test_compare_runs_a_suite_and_writes_its_table(checkout, env, tmp_path):
    results = tmp_path / "results.md"
    job = submit(checkout, "compare.sbatch", ["classic_debug", "--results-md", str(results)], CPU_JOB, env)
    assert_completed(wait(job))
    table = results.read_text()
    assert "<!-- report:classic_debug:begin -->" in table and "<!-- report:classic_debug:end -->" in table
    assert (tmp_path / "data" / "classic_debug.json").exists(), "the suite's record goes beside the page"
    assert "ppo_rnn" in table
    assert sorted(checkout.glob("runs/compare/classic_debug/*/ppo*/**/summary.json")), "no finished runs"


@pytest.mark.slow
def test_labelling_coordinator_runs_a_whole_round(checkout, env, tiny_llm_path, tmp_path):
    """Redis, enqueue, an array of 2 workers (each waiting for work until cancelled), the drain, the
    cancel, and the shards labelled."""
    from benchmarks.labelling_throughput import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", shards=2, steps=4, streams=4)
    out = tmp_path / "labelled"
    job_env_ = {**env, "LABELLING_REDIS_PORT": str(free_port()), "LABELLING_POLL_S": "2",
                "LABELLING_WORKERS": "2", "LABELLING_WORKER_SBATCH": " ".join(CPU_JOB),
                "LABELLING_ARGS": "--preset debug --idle-exit-s 600", "LABELLING_QUEUE": f"slurm-test-{time.time_ns()}"}
    job = submit(checkout, "labelling_coordinator.sbatch",
                 ["--dataset", str(data), "--out", str(out), "--model", tiny_llm_path, "--preset", "debug"],
                 CPU_JOB, job_env_)
    (coordinator,) = wait(job)
    assert_completed([coordinator])
    log = log_of(coordinator)
    assert "2 done, 0 failed" in log, log[-3000:]
    assert sorted(p.name for p in out.glob("shard_*.npz")) == ["shard_000000.npz", "shard_000001.npz"]
    worker_job = re.search(r"submitted worker array (\d+) \(2 workers\)", log).group(1)
    workers = wait(worker_job, timeout=60)
    assert len(workers) == 2
    assert {w.state for w in workers} == {"CANCELLED"}, \
        "the workers wait for more work (--idle-exit-s 600) until the coordinator cancels them"
    redis_dir = checkout / f"runs/labelling/redis-{job}"
    assert (redis_dir / "url").stat().st_mode & 0o077 == 0, "the URL with its password is private"
    password = (redis_dir / "url").read_text().split(":")[2].split("@")[0]
    assert password not in log, "the password never reaches the log"
