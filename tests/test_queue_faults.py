"""Fault tests of the labelling queue and worker against a real (embedded) Redis.

Each fault of docs/labelling.md's failure table: a worker that fails every job (it must not burn
the jobs' attempts), worker-fatal errors, corrupt input, transient errors, killed holders, a lost
job, a deadline, and flags that make no sense. Workers run in threads with stand-in models (a
constant backend from the benchmarks, or ones that fail on purpose), so these take seconds; the
killed-process tests with the real tiny model are in test_labelling.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from test_labelling import enqueue_cfg, redis_db, run_main  # noqa: F401  (redis_db: a fixture)

from benchmarks.labelling_throughput import ConstantBackend, write_synthetic_dataset
from labelling.enqueue import enqueue
from labelling.labels import is_complete
from labelling.queue import GROUP, JobQueue, job_fields
from labelling.worker import STAGING, WorkerBroken, WorkerConfig, run_worker, worker_fatal
from utils.llm import LLMSpec
from utils.trajectories import DatasetError, TrajectoryDataset

SHARDS = 12  # as in the finding: one failing worker dead-lettered all 12 jobs in 0.6 s
ALL_SHARDS = [f"shard_{i:06d}.npz" for i in range(SHARDS)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("faults") / "data", SHARDS, 2, 2)


@pytest.fixture
def queued(source, tiny_llm_path, tmp_path, redis_db):  # noqa: F811
    """Every shard of ``source`` queued for ``tmp_path/out``: (db file, client, queue, out)."""
    db, client = redis_db
    out = tmp_path / "out"
    assert enqueue(enqueue_cfg(source, out, db, tiny_llm_path), client).queued == SHARDS
    return db, client, JobQueue(client), out


def cfg(db: str, name: str, **overrides) -> WorkerConfig:
    """A quick worker: short idle and backoff times, one log line per job."""
    defaults = dict(embedded_redis=db, name=name, claim_idle_s=1.0, poll_s=0.05, idle_exit_s=0.0,
                    progress=False, backoff_s=30.0)
    return WorkerConfig(**{**defaults, **overrides})


class FailingBackend(ConstantBackend):
    """A model that raises ``error()`` on each of its first ``times`` calls (forever: None)."""

    def __init__(self, spec, error=lambda: RuntimeError("flaky backend"), times: int | None = None):
        super().__init__(spec)
        self.error, self.times, self.calls = error, times, []

    def hidden_states(self, texts):
        self.calls.append(time.time())  # wall clock: compared with Redis stream ids
        if self.times is None or len(self.calls) <= self.times:
            raise self.error()
        return super().hidden_states(texts)


class SlowBackend(ConstantBackend):
    def __init__(self, spec, seconds: float):
        super().__init__(spec)
        self.seconds = seconds

    def hidden_states(self, texts):
        time.sleep(self.seconds)
        return super().hidden_states(texts)


def pending(queue: JobQueue) -> dict[str, dict]:
    """Pending jobs by shard (held or handed back), with holder, failures, reclaims, handed_back."""
    stats = queue.stats()
    return {job["shard"]: job for job in stats["in_flight_jobs"] + stats["retrying_jobs"]}


def done_by_shard(queue: JobQueue) -> dict[str, dict]:
    log = queue.done_log()
    assert len(log) == len({e["shard"] for e in log}), "a shard was completed twice"
    return {e["shard"]: e for e in log}


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def test_nonsense_worker_flags_stop_with_one_line_before_any_work(queued, capsys):
    db, _, queue, _ = queued
    for flag, value in [("--claim-idle-s", "-1"), ("--max-attempts", "0"), ("--threads", "0"),
                        ("--max-reclaims", "0"), ("--max-failures-in-a-row", "0"),
                        ("--backoff-s", "-1"), ("--job-deadline-s", "0"), ("--poll-s", "0")]:
        code, err = run_main("labelling.worker", ["--embedded-redis", db, flag, value], capsys)
        assert code == 2 and err.startswith(f"error: {flag} must") and err.count("\n") == 1, (flag, err)
    stats = queue.stats()
    assert (stats["waiting"], stats["in_flight"], stats["done"]) == (SHARDS, 0, 0)
    assert not queue.client.xinfo_consumers(queue.jobs, GROUP)  # no worker ever joined


# ----------------------------------------------------------------------------------------------
# A broken worker
# ----------------------------------------------------------------------------------------------


def test_a_worker_failing_every_job_fails_each_once_then_exits(queued):
    """The finding: an always-failing worker reclaimed the job it had just failed until every job
    was dead. Now it may not retake a job it failed (backoff), and it stops after 3 in a row."""
    db, client, queue, out = queued
    with pytest.raises(WorkerBroken, match="poison failed 3 jobs in a row .*flaky backend"):
        run_worker(cfg(db, "poison", max_attempts=3), client, load=FailingBackend)
    failed = pending(queue)
    assert len(failed) == 3 and queue.stats()["dead"] == 0
    assert all(j["failures"] == 1 and j["handed_back"] and j["reclaims"] == 0 for j in failed.values())

    summary = run_worker(cfg(db, "healthy", max_attempts=3), client, load=ConstantBackend)
    assert (summary.jobs, summary.dead) == (SHARDS, 0)
    done = done_by_shard(queue)
    assert sorted(done) == ALL_SHARDS and queue.stats()["dead"] == 0
    assert {s for s, e in done.items() if e["failures"] == "1"} == set(failed)
    assert is_complete(TrajectoryDataset(out).manifest)


def test_a_poison_worker_beside_healthy_ones_dead_letters_nothing(queued):
    db, client, queue, out = queued
    results: dict[str, object] = {}

    def work(name: str, load) -> None:
        try:
            results[name] = run_worker(cfg(db, name, max_attempts=2), client, load=load)
        except WorkerBroken as exc:
            results[name] = exc

    threads = [threading.Thread(target=work, args=("poison", FailingBackend))]
    threads += [threading.Thread(target=work, args=(f"healthy{i}", ConstantBackend)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    done = done_by_shard(queue)
    assert sorted(done) == ALL_SHARDS and queue.stats()["dead"] == 0
    assert all(e["worker"].startswith("healthy") for e in done.values())
    assert sum(results[f"healthy{i}"].jobs for i in range(2)) == SHARDS
    poison = results["poison"]
    assert isinstance(poison, WorkerBroken) or poison.jobs == 0  # it may find the queue empty first
    assert is_complete(TrajectoryDataset(out).manifest)


@pytest.mark.parametrize("error", [
    lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
    lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError,
])
def test_worker_fatal_errors_hand_the_job_back_uncharged_and_stop(queued, error):
    db, client, queue, _ = queued
    with pytest.raises(WorkerBroken, match="error of its own"):
        run_worker(cfg(db, "broken"), client, load=lambda spec: FailingBackend(spec, error))
    [job] = pending(queue).values()
    assert job["handed_back"] and (job["failures"], job["deliveries"]) == (0, 0)
    retry = queue.claim_stale("other", 60_000)  # anyone, at once, uncharged
    assert (retry.kind, retry.failures, retry.deliveries) == ("retry", 0, 1)


def test_worker_fatal_classifier():
    assert worker_fatal(RuntimeError("CUDA error: device-side assert triggered"))
    assert worker_fatal(RuntimeError("NCCL error: unhandled system error"))
    assert worker_fatal(torch.cuda.OutOfMemoryError("out of memory"))
    assert worker_fatal(MemoryError())
    assert not worker_fatal(RuntimeError("flaky backend"))
    assert not worker_fatal(ValueError("bad row"))
    assert not worker_fatal(DatasetError("/data/CUDA-runs/shard_000001.npz: corrupt shard"))


def test_a_model_that_does_not_load_exits_3_before_taking_a_job(queued, capsys, monkeypatch):
    db, _, queue, _ = queued

    def load(spec, **kwargs):
        raise OSError("CUDA driver initialization failed")

    monkeypatch.setattr("labelling.worker.make_backend", load)
    code, err = run_main("labelling.worker", ["--embedded-redis", db, "--idle-exit-s", "0"], capsys)
    assert code == 3 and err.startswith("error: cannot load ") and err.count("\n") == 1
    stats = queue.stats()
    assert (stats["waiting"], stats["in_flight"], stats["retrying"]) == (SHARDS, 0, 0)


def test_failing_in_a_row_exits_3_with_one_line(queued, capsys, monkeypatch):
    db, _, queue, _ = queued
    monkeypatch.setattr("labelling.worker.make_backend", lambda spec, **kw: FailingBackend(spec))
    code, err = run_main("labelling.worker", ["--embedded-redis", db, "--name", "w", "--no-progress",
                                              "--max-failures-in-a-row", "2", "--poll-s", "0.05"],
                         capsys)
    assert code == 3 and err.splitlines()[-1].startswith("error: w failed 2 jobs in a row")
    assert queue.stats()["retrying"] == 2 and queue.stats()["dead"] == 0


# ----------------------------------------------------------------------------------------------
# Job errors
# ----------------------------------------------------------------------------------------------


def test_a_transient_error_is_retried_by_the_same_worker_after_its_backoff(queued):
    db, client, queue, out = queued
    backend = None

    def load(spec):
        nonlocal backend
        backend = FailingBackend(spec, times=1)
        return backend

    summary = run_worker(cfg(db, "solo", backoff_s=0.5), client, load=load)
    assert (summary.jobs, summary.retried, summary.dead) == (SHARDS, 1, 0)
    [(done_id, retried)] = [(i, e) for i, e in client.xrange(queue.done) if e["failures"] != "0"]
    assert (retried["failures"], retried["worker"]) == ("1", "solo")
    assert int(done_id.split("-")[0]) / 1000 >= backend.calls[0] + 0.5  # not before its backoff
    assert is_complete(TrajectoryDataset(out).manifest)


def test_a_job_failing_on_every_worker_is_dead_lettered_after_max_attempts(queued):
    db, client, queue, _ = queued
    for name in ("a", "b", "c"):  # each fails once and stops; the next takes the failed job at once
        with pytest.raises(WorkerBroken):
            run_worker(cfg(db, name, max_attempts=3, max_failures_in_a_row=1), client,
                       load=FailingBackend)
    stats = queue.stats()
    assert stats["dead"] == 1 and stats["retrying"] == 0
    dead = stats["dead_letters"][0]
    assert (dead["failures"], dead["reclaims"], dead["worker"]) == ("3", "0", "c")
    assert dead["error"] == "RuntimeError: flaky backend"


# ----------------------------------------------------------------------------------------------
# Killed holders, lost jobs, deadlines
# ----------------------------------------------------------------------------------------------


def add_one_job(client, name: str, backoff_s: float = 0.4) -> JobQueue:
    queue = JobQueue(client, name, backoff_s=backoff_s, max_backoff_s=10)
    queue.add(job_fields("/src", "/out", "shard_000000.npz", 4, LLMSpec(model="m")))
    return queue


def test_takeovers_from_vanished_holders_back_off_and_charge_no_failure(redis_db):  # noqa: F811
    _, client = redis_db
    queue = add_one_job(client, "kills", backoff_s=0.6)
    job = queue.next_job("holder0", min_idle_ms=200, block_ms=10)
    for k in range(1, 4):  # each holder vanishes without a word; the next takes over
        extra = 0.0 if k == 1 else 0.6 * 2 ** (k - 2)  # backoff earned by the k-1 earlier takeovers
        time.sleep(0.25 + extra / 2)
        assert k == 1 or queue.claim_stale(f"holder{k}", 200) is None, f"takeover {k} came early"
        time.sleep(extra / 2 + 0.05)
        job = queue.claim_stale(f"holder{k}", 200)
        assert job is not None, f"takeover {k} did not happen"
        assert (job.kind, job.reclaims, job.failures, job.deliveries) == ("reclaim", k, 0, k + 1)
    assert queue.fail(job, "holder3", "boom", max_attempts=2) == "retry"  # failures still start at 0


def test_a_worker_dead_letters_a_job_only_after_max_reclaims(redis_db):  # noqa: F811
    db, client = redis_db
    queue = add_one_job(client, "cap")
    queue.next_job("h0", 0, 10)
    for k in range(1, 3):
        time.sleep(0.05 + (0.4 * 2 ** (k - 2) if k > 1 else 0))
        assert queue.claim_stale(f"h{k}", 0) is not None
    time.sleep(0.85)  # third takeover, by a worker allowing only 2
    summary = run_worker(cfg(db, "w", queue="cap", claim_idle_s=0.001, max_reclaims=2, backoff_s=0.4),
                         client, load=ConstantBackend)
    assert summary.dead == 1
    dead = queue.stats()["dead_letters"][0]
    assert (dead["reclaims"], dead["failures"]) == ("3", "0") and "taken over 3 times" in dead["error"]


def wait_until_held(queue: JobQueue, consumer: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in queue.stats()["in_flight_jobs"]:
            if job["worker"] == consumer:
                return job
        time.sleep(0.02)
    pytest.fail(f"{consumer} never took a job")


def test_a_worker_that_lost_its_job_discards_its_result(queued):
    db, client, queue, out = queued
    result = {}
    worker = threading.Thread(target=lambda: result.update(summary=run_worker(
        cfg(db, "slow", fault_pause_s=1.0, max_jobs=1, claim_idle_s=0.4), client, load=ConstantBackend)))
    worker.start()
    held = wait_until_held(queue, "slow")
    stolen = queue.claim_stale("thief", 0)  # as if the holder had looked dead
    assert stolen.msg_id == held["id"] and stolen.kind == "reclaim"
    # the old holder can no longer touch it: one script checks and acts
    assert not queue.heartbeat(stolen, "slow") and not queue.complete(stolen, "slow")
    assert queue.fail(stolen, "slow", "late", 3) == "lost" and not queue.release(stolen, "slow", charge=True)
    worker.join(timeout=60)
    summary = result["summary"]
    assert summary.lost == 1 and summary.jobs == 1  # then did another one
    assert not (out / stolen.shard).exists()  # nothing written
    assert not list((out / STAGING).glob("*/*"))  # nor left in its staging folder
    assert stolen.shard not in done_by_shard(queue) and queue.owner(stolen) == "thief"
    assert queue.complete(stolen, "thief", seconds="0", skipped=0)


def test_heartbeats_never_take_a_job_back_from_its_new_holder(redis_db):  # noqa: F811
    _, client = redis_db
    queue = add_one_job(client, "race")
    job = queue.next_job("old", 0, 10)
    stop, beats = threading.Event(), []

    def beat() -> None:
        while not stop.is_set():
            beats.append(queue.heartbeat(job, "old"))

    thread = threading.Thread(target=beat)
    thread.start()
    time.sleep(0.05)
    assert queue.claim_stale("new", 0) is not None
    time.sleep(0.1)
    stop.set()
    thread.join()
    assert beats[0] and not beats[-1] and queue.owner(job) == "new"


def test_a_job_past_its_deadline_is_failed_and_its_result_discarded(queued):
    db, client, queue, out = queued
    with pytest.raises(WorkerBroken, match="failed 1 jobs in a row"):
        run_worker(cfg(db, "slow", job_deadline_s=0.3, max_failures_in_a_row=1), client,
                   load=lambda spec: SlowBackend(spec, 1.0))
    [job] = pending(queue).values()
    assert (job["failures"], job["handed_back"]) == (1, True) and not (out / job["shard"]).exists()
    assert queue.client.hget(queue.state, f"{job['id']}:error").startswith("DeadlineExceeded: ")
    summary = run_worker(cfg(db, "fast"), client, load=ConstantBackend)
    assert summary.jobs == SHARDS and done_by_shard(queue)[job["shard"]]["failures"] == "1"
