"""Labelling worker: takes shard jobs from the queue, writes labelled shards, acknowledges them.

    python -m labelling.worker                                   # embedded Redis, this machine
    python -m labelling.worker --redis-url redis://HOST:6379/0   # cluster: run many of these

The worker loads the model of the first job once (before claiming anything, so a model that
cannot load here costs no job an attempt) and keeps it while jobs ask for the same labels. Per
job: label the shard (``labelling.labels.label_shard``: written atomically), rebuild the output
manifest under a Redis lock, and only then acknowledge. A heartbeat thread keeps the job claimed
while it runs; if the worker dies, another one takes the job over after ``--claim-idle-s``. A
shard already present in the output (its worker died between writing and acknowledging) is
acknowledged without relabelling. SIGTERM/Ctrl-C hands the current job back uncharged.

The worker exits once the queue has been empty (nothing waiting or in flight) for
``--idle-exit-s`` seconds, so one command labels a dataset and returns.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labelling.labels import check_output_labels, label_shard, labels_block, update_manifest
from labelling.queue import Job, JobQueue, QueueConfig, connect, default_worker_name, one_line
from utils.config import parse_config
from utils.errors import UserError, exit_on_user_error
from utils.llm import LLMBackend, LLMSpec, make_backend
from utils.trajectories import DatasetError, TrajectoryDataset

AREA, COMMAND = "labelling", "worker"


@dataclasses.dataclass
class WorkerConfig(QueueConfig):
    """A labelling worker: reads shard jobs, writes labelled shards, acknowledges them."""

    name: str | None = None
    """Consumer name in the queue's group; default <host>-<pid>."""
    batch_size: int | None = None
    """Prompts per forward pass; default: the batch size given at enqueue time."""
    device: str | None = None
    """Device for the transformers backend (cpu, cuda, cuda:N); default: the enqueued one."""
    threads: int | None = None
    """CPU threads for torch; default: torch's choice (one per core). On a CPU shared with other jobs, 1 can be many times faster (docs/results.md)."""
    claim_idle_s: float = 60.0
    """A job whose worker has been silent this long is taken over (heartbeats every quarter of it)."""
    max_attempts: int = 3
    """Deliveries before a job goes to the dead-letter stream with its last error."""
    poll_s: float = 1.0
    """How long one read waits for a new job before checking for stale ones again."""
    idle_exit_s: float | None = 10.0
    """Exit after the queue has been empty this long; None: keep serving forever."""
    max_jobs: int | None = None
    """Stop after this many jobs (benchmarks, tests)."""
    progress: bool = True
    """Show a progress bar (otherwise one line per job)."""
    fault_pause_s: float = 0.0
    """Testing aid: sleep this long after claiming each job, so fault tests can kill a worker holding one."""


@dataclasses.dataclass
class WorkerSummary:
    name: str
    jobs: int = 0
    rows: int = 0
    skipped: int = 0
    retried: int = 0
    dead: int = 0
    seconds: float = 0.0


class Shutdown(Exception):
    """SIGTERM arrived: hand the current job back and stop."""


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


class BackendCache:
    """Keeps the last loaded model; loads another only when a job asks for different labels."""

    def __init__(self, cfg: WorkerConfig, load: Callable[[LLMSpec], LLMBackend] = make_backend):
        self.runtime = {"batch_size": cfg.batch_size, "device": cfg.device}
        self._load = load
        self._key: str | None = None
        self.backend: LLMBackend | None = None

    def get(self, spec: LLMSpec) -> LLMBackend:
        key = json.dumps(dataclasses.asdict(spec), sort_keys=True)
        if key != self._key:
            self.backend = None  # free the old model before loading the next
            self.backend = self._load(spec)
            self._key = key
        return self.backend


class Heartbeat:
    """Background thread keeping a job claimed while it is processed."""

    def __init__(self, queue: JobQueue, job: Job, consumer: str, interval_s: float):
        self.queue, self.job, self.consumer, self.interval_s = queue, job, consumer, interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labelling-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.queue.heartbeat(self.job, self.consumer):
                    self.lost = True
                    return
            except Exception as exc:  # a Redis hiccup must not kill the job; the next beat retries
                print(f"warning: heartbeat for {self.job.shard} failed: {one_line(exc)}", file=sys.stderr)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def process_job(job: Job, backend: LLMBackend, queue: JobQueue) -> dict[str, Any]:
    """Label one shard (unless already present) and rebuild the output manifest."""
    spec = job.spec()
    labels = labels_block(spec, backend.hidden_size)
    out = Path(job.out)
    check_output_labels(out, labels)  # fail before spending compute on mismatched labels
    source = TrajectoryDataset(job.source)
    files = [s["file"] for s in source.shards]
    if job.shard not in files:
        raise DatasetError(f"{job.source}: the manifest no longer lists {job.shard}; re-enqueue the dataset")
    skipped = (out / job.shard).is_file()
    seconds = 0.0
    if not skipped:
        seconds = label_shard(source, files.index(job.shard), backend, out).seconds
    with queue.manifest_lock(job.out):
        update_manifest(job.source, out, labels)
    return {"seconds": f"{seconds:.3f}", "skipped": int(skipped)}


def _progress(cfg: WorkerConfig, name: str):
    from tqdm import tqdm

    return tqdm(desc=name, unit="shard", disable=not cfg.progress, dynamic_ncols=True)


def _log(bar, message: str) -> None:
    bar.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _wait_for_first_job(queue: JobQueue, cfg: WorkerConfig) -> Job | None:
    """Block until a job is in the stream (to load its model before claiming); None: time to exit."""
    idle_since = time.monotonic()
    while True:
        job = queue.peek()
        if job is not None:
            return job
        if cfg.idle_exit_s is not None and time.monotonic() - idle_since >= cfg.idle_exit_s:
            return None
        time.sleep(min(cfg.poll_s, 0.5))


def run_worker(cfg: WorkerConfig, client=None,
               load: Callable[[LLMSpec], LLMBackend] = make_backend) -> WorkerSummary:
    """Serve jobs until the queue stays empty (or ``max_jobs``); returns what this worker did.

    ``load`` builds a backend from a job's spec (benchmarks pass a stand-in to time the queue)."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    client = client if client is not None else connect(cfg)
    queue = JobQueue(client, cfg.queue)
    name = cfg.name or default_worker_name()
    summary = WorkerSummary(name)
    backends = BackendCache(cfg, load)
    claim_idle_ms = int(cfg.claim_idle_s * 1000)
    first = _wait_for_first_job(queue, cfg)
    if first is None:
        return summary
    try:
        first_spec = first.spec(**backends.runtime)
    except (KeyError, TypeError, ValueError):
        first_spec = None  # a malformed job: dead-lettered when its turn comes
    if first_spec is not None:
        backends.get(first_spec)  # load once, before holding any job
    start = time.perf_counter()  # the summary's rate is the labelling rate, without the load
    idle_since: float | None = None
    bar = _progress(cfg, name)
    try:
        while cfg.max_jobs is None or summary.jobs + summary.dead < cfg.max_jobs:
            job = queue.next_job(name, claim_idle_ms, int(cfg.poll_s * 1000))
            if job is None:
                if queue.remaining():
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if cfg.idle_exit_s is not None and time.monotonic() - idle_since >= cfg.idle_exit_s:
                    break
                continue
            idle_since = None
            _handle(job, queue, backends, cfg, name, summary, bar)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        queue.leave(name)
    return summary


def _handle(job: Job, queue: JobQueue, backends: BackendCache, cfg: WorkerConfig, name: str,
            summary: WorkerSummary, bar) -> None:
    """One delivered job: dead-letter, label, or record the failure."""
    if job.deliveries > cfg.max_attempts:  # its workers kept dying
        error = queue.last_error(job) or (f"delivered {job.deliveries} times without finishing: "
                                          "the workers holding it died (out of memory? killed?)")
        queue.dead_letter(job, name, error)
        summary.dead += 1
        _log(bar, f"dead letter: {job.shard} of {job.source}: {error}")
        return
    try:
        spec = job.spec(**backends.runtime)
    except (KeyError, TypeError, ValueError) as exc:  # a malformed job: retrying cannot help
        error = f"malformed job ({one_line(exc)}); enqueue the dataset again with this version"
        queue.dead_letter(job, name, error)
        summary.dead += 1
        _log(bar, f"dead letter: {job.fields}: {error}")
        return
    try:
        backend = backends.get(spec)
    except UserError:  # this worker cannot run the model: give the job back uncharged, stop
        queue.release(job, name, charge=False)
        raise
    try:
        with Heartbeat(queue, job, name, cfg.claim_idle_s / 4) as beat:
            if cfg.fault_pause_s:
                time.sleep(cfg.fault_pause_s)
            info = process_job(job, backend, queue)
        if beat.lost:
            _log(bar, f"note: {job.shard} was taken over by another worker meanwhile; "
                      "its output is identical, so only one acknowledgement counts")
    except (Shutdown, KeyboardInterrupt):
        queue.release(job, name, charge=False)
        raise
    except Exception as exc:  # any failure is recorded against the job, never silently dropped
        error = one_line(exc)
        outcome = queue.fail(job, name, error, cfg.max_attempts)
        summary.dead += outcome == "dead"
        summary.retried += outcome == "retry"
        _log(bar, f"{'dead letter' if outcome == 'dead' else 'will retry'} "
                  f"(attempt {job.deliveries}/{cfg.max_attempts}): {job.shard} of {job.source}: {error}")
        return
    queue.complete(job, name, **info)
    summary.jobs += 1
    summary.rows += job.rows
    summary.skipped += int(info["skipped"])
    rate = job.rows / max(1e-9, float(info["seconds"]))
    remaining = queue.remaining()
    bar.update(1)
    bar.set_postfix(rows_per_s=f"{rate:,.0f}", remaining=remaining)
    if bar.disable:
        _log(bar, f"{name}: {job.shard} -> {job.out}: {job.rows} rows"
                  + (" (already present)" if int(info["skipped"]) else f", {rate:,.0f} rows/s")
                  + f"; {remaining} jobs left")


def _raise_shutdown(signum, frame) -> None:
    raise Shutdown(f"signal {signum}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(WorkerConfig, AREA, COMMAND, argv)
    signal.signal(signal.SIGTERM, _raise_shutdown)
    try:
        summary = run_worker(cfg)
    except (Shutdown, KeyboardInterrupt) as stop:
        print(f"worker stopped ({'SIGTERM' if isinstance(stop, Shutdown) else 'Ctrl-C'}); "
              "a job it held was handed back", file=sys.stderr)
        raise SystemExit(143 if isinstance(stop, Shutdown) else 130) from None
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    print(f"{summary.name}: labelled {summary.jobs} shards ({summary.rows:,} rows, {rate:,.0f} rows/s "
          f"over {summary.seconds:.1f} s), {summary.skipped} already present, {summary.retried} "
          f"retried, {summary.dead} dead-lettered")
    if summary.dead:
        print("see the errors with: python -m labelling.status", file=sys.stderr)


if __name__ == "__main__":
    main()
