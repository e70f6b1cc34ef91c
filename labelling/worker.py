"""Labelling worker: takes shard jobs from the queue, writes labelled shards, acknowledges them.

    python -m labelling.worker                                   # embedded Redis, this machine
    python -m labelling.worker --redis-url redis://HOST:6379/0   # cluster: run many of these

The worker loads the model of the first job once (before claiming anything, so a model that
cannot load here costs no job an attempt) and keeps it while jobs ask for the same labels. It
closes a backend before loading the next model and on every way out (``close()``: the GPU
engines' processes would otherwise keep the GPU memory the next model needs). Per
job: label the shard into the worker's own staging folder, and only while it still holds the job
move it into the output (atomic rename), rebuild the output manifest under a Redis lock and
acknowledge. A heartbeat thread keeps the job claimed while it runs; if the worker dies, another
one takes the job over after ``--claim-idle-s``. A worker that lost its job (taken over, or past
``--job-deadline-s``) discards its result: no write, no acknowledgement. A shard already present
in the output (its worker died between writing and acknowledging) is acknowledged without
relabelling.

What a failure does depends on whose fault it is (docs/labelling.md has the table):

* the worker's (CUDA errors, out of memory, a model that does not load: ``worker_fatal``): the
  job goes back uncharged and the worker exits with status 3;
* the job's, for good (a corrupt shard, a malformed job): dead-lettered at once;
* anything else: charged to the job and handed back; other workers may retry it at once, this one
  only after ``--backoff-s`` (doubling). After ``--max-failures-in-a-row`` failed jobs in a row
  the worker concludes it is the problem and exits with status 3.

SIGTERM/Ctrl-C hands the current job back uncharged. The worker exits once the queue has been
empty (nothing waiting or in flight) for ``--idle-exit-s`` seconds, so one command labels a
dataset and returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labelling.labels import check_output_labels, label_shard, labels_block, resolve_feature, update_manifest
from labelling.queue import Job, JobQueue, QueueConfig, connect, default_worker_name, one_line
from utils.config import parse_config
from utils.errors import UserError, exit_on_user_error
from utils.llm import LLMBackend, LLMSpec, close_backend, make_backend
from utils.trajectories import DatasetError, TrajectoryDataset

AREA, COMMAND = "labelling", "worker"
EXIT_WORKER_BROKEN = 3
STAGING = ".labelling-staging"  # per-worker folder inside an output, for shards not yet committed


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
    """Failures of a job (errors, deadlines) before it goes to the dead-letter stream with its last error."""
    max_reclaims: int = 10
    """Takeovers of a job from silent (killed) workers before it is dead-lettered; counted apart from failures."""
    backoff_s: float = 10.0
    """After failing a job a worker waits this long (doubling per failure) before taking it again; others may at once. Also the extra wait (doubling) before each further takeover of a job whose holders keep vanishing."""
    max_backoff_s: float = 600.0
    """Upper bound of those waits."""
    max_failures_in_a_row: int = 3
    """Exit (status 3) after this many jobs failed in a row on this worker: it is probably the problem."""
    job_deadline_s: float | None = None
    """A job still running after this many seconds is failed and handed back (its result discarded); None: no deadline."""
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

    def validate(self) -> "WorkerConfig":
        """Refuse settings that would make the worker misbehave, before it touches the queue."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name in ("claim_idle_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("max_attempts", "max_reclaims", "max_failures_in_a_row"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("threads", "batch_size", "max_jobs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be at least 1 (or unset), got {getattr(self, name)}")
        for name in ("backoff_s", "fault_pause_s", "idle_exit_s"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        if self.max_backoff_s < self.backoff_s:
            raise UserError(f"--max-backoff-s ({self.max_backoff_s}) must be at least --backoff-s "
                            f"({self.backoff_s})")
        if self.job_deadline_s is not None and not self.job_deadline_s > 0:
            raise UserError(f"--job-deadline-s must be positive (or unset), got {self.job_deadline_s}")
        return self


@dataclasses.dataclass
class WorkerSummary:
    name: str
    jobs: int = 0
    rows: int = 0
    skipped: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    seconds: float = 0.0


class Shutdown(Exception):
    """SIGTERM arrived: hand the current job back and stop."""


class WorkerBroken(Exception):
    """This worker cannot do the work (its GPU, memory or model, or a run of failed jobs); the job it
    held went back uncharged. Entry point: one line, exit status 3."""


# ----------------------------------------------------------------------------------------------
# Whose fault is an error
# ----------------------------------------------------------------------------------------------

# Messages of errors that say the device or process is broken, whatever job it runs.
_FATAL_MESSAGE = re.compile(r"CUDA|cuDNN|CUBLAS|NCCL|device-side assert|illegal memory access|"
                            r"out of memory|engine (core )?(is )?dead", re.IGNORECASE)
_FATAL_TYPES = {"OutOfMemoryError", "AcceleratorError", "EngineDeadError", "MemoryError"}


def worker_fatal(exc: BaseException) -> bool:
    """True for errors of this worker, not of its job: CUDA errors, out of memory, a dead engine.

    Such a worker would fail every job it takes, so it hands the job back uncharged and exits. Job
    errors (``DatasetError``: a corrupt or missing shard) never count, even if a path in their
    message happened to match."""
    if isinstance(exc, DatasetError):
        return False
    if {cls.__name__ for cls in type(exc).__mro__} & _FATAL_TYPES:
        return True
    return bool(_FATAL_MESSAGE.search(str(exc)))


def job_error_is_final(exc: BaseException) -> bool:
    """Errors that retrying cannot fix (the shard or job itself is bad): dead-letter at once."""
    return isinstance(exc, DatasetError)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


class BackendCache:
    """Keeps the last loaded model; loads another only when a job asks for different labels.

    Owns what ``load`` returns: the old backend is closed (not just dropped) before the next one
    loads, and :meth:`close` closes the last one. Dropping an SGLang or vLLM backend leaves its
    engine processes holding the GPU memory, so the next model would not fit."""

    def __init__(self, cfg: WorkerConfig, load: Callable[[LLMSpec], LLMBackend] = make_backend):
        self.runtime = {"batch_size": cfg.batch_size, "device": cfg.device}
        self._load = load
        self._key: str | None = None
        self.backend: LLMBackend | None = None

    def close(self) -> None:
        """Close the loaded backend, if any (idempotent)."""
        backend, self.backend, self._key = self.backend, None, None
        if backend is not None:
            close_backend(backend)

    def get(self, spec: LLMSpec) -> LLMBackend:
        """The backend for ``spec``. A model that does not load is this worker's problem: a
        ``UserError`` (no GPU, no vllm) passes through, anything else becomes ``WorkerBroken``."""
        key = json.dumps(dataclasses.asdict(spec), sort_keys=True)
        if key != self._key:
            self.close()  # free the old model (and stop its engine) before loading the next
            try:
                self.backend = self._load(spec)
            except UserError:
                raise
            except Exception as exc:
                raise WorkerBroken(f"cannot load {spec.model} with the {spec.backend} backend "
                                   f"here ({one_line(exc)})") from exc
            self._key = key
        return self.backend


class Heartbeat:
    """Background thread keeping a job claimed while it is processed.

    ``lost`` turns True once the job is no longer this worker's: taken over (a heartbeat found
    another holder) or, with ``deadline_s``, failed by ``on_deadline`` when the deadline passed.
    The main thread cannot be interrupted inside the model, so it finishes and then discards."""

    def __init__(self, queue: JobQueue, job: Job, consumer: str, interval_s: float,
                 deadline_s: float | None = None, on_deadline: Callable[[], str] | None = None):
        self.queue, self.job, self.consumer, self.interval_s = queue, job, consumer, interval_s
        self.deadline_s, self.on_deadline = deadline_s, on_deadline
        self.lost = False
        self.expired: str | None = None  # outcome of the deadline's failure: retry, dead or lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labelling-heartbeat", daemon=True)

    def _run(self) -> None:
        end = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        while True:
            wait = self.interval_s if end is None else min(self.interval_s, max(0.0, end - time.monotonic()))
            if self._stop.wait(wait):
                return
            try:
                if end is not None and time.monotonic() >= end:
                    self.lost = True
                    self.expired = self.on_deadline() if self.on_deadline else "lost"
                    return
                if not self.queue.heartbeat(self.job, self.consumer):
                    self.lost = True
                    return
            except Exception as exc:  # a Redis hiccup must not kill the job; the next beat retries
                print(f"warning: heartbeat for {self.job.shard} failed: {one_line(exc)}", file=sys.stderr)
                if self.lost:  # the deadline fired but could not be recorded: stop beating, so
                    return     # the job goes stale and another worker takes it over

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _staging_dir(out: Path, consumer: str) -> Path:
    return out / STAGING / re.sub(r"[^A-Za-z0-9_.-]", "_", consumer)


def process_job(job: Job, backend: LLMBackend, queue: JobQueue, consumer: str = "",
                still_held: Callable[[], bool] = lambda: True) -> dict[str, Any] | None:
    """Label one shard (unless already present) and rebuild the output manifest.

    The shard is labelled into this worker's staging folder and moved into the output only if
    ``still_held()``; otherwise it is deleted and None returned (the job was lost meanwhile)."""
    spec = job.spec()
    labels = labels_block(spec, backend.hidden_size, getattr(backend, "identity", None))
    feature = resolve_feature(job.feature, labels.get("modality", "text"))
    out = Path(job.out)
    check_output_labels(out, labels, feature)  # fail before spending compute on mismatched labels
    source = TrajectoryDataset(job.source)
    files = [s["file"] for s in source.shards]
    if job.shard not in files:
        raise DatasetError(f"{job.source}: the manifest no longer lists {job.shard}; re-enqueue the dataset")
    target = out / job.shard
    skipped = target.is_file()
    seconds = 0.0
    if not skipped:
        staging = _staging_dir(out, consumer)
        staged = staging / job.shard
        try:
            seconds = label_shard(source, files.index(job.shard), backend, staging, feature).seconds
            if not still_held():
                return None
            os.replace(staged, target)  # atomic; another holder could only write the same shard
        finally:
            staged.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                staging.rmdir()
    elif not still_held():
        return None
    with queue.manifest_lock(job.out):
        update_manifest(job.source, out, labels, feature)
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
               load: Callable[[LLMSpec], LLMBackend] | None = None) -> WorkerSummary:
    """Serve jobs until the queue stays empty (or ``max_jobs``); returns what this worker did.

    ``load`` builds a backend from a job's spec (default ``make_backend``; benchmarks and tests
    pass stand-ins); the worker owns what it returns and closes it on a model switch and on the
    way out, whatever the way. Raises ``WorkerBroken`` when this worker should stop (see the
    module docstring)."""
    cfg.validate()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    client = client if client is not None else connect(cfg)
    queue = JobQueue(client, cfg.queue, backoff_s=cfg.backoff_s, max_backoff_s=cfg.max_backoff_s)
    name = cfg.name or default_worker_name()
    summary = WorkerSummary(name)
    backends = BackendCache(cfg, load or make_backend)
    try:
        _serve(cfg, queue, name, summary, backends)
    finally:
        backends.close()  # on every way out: done, WorkerBroken, SIGTERM, Ctrl-C
    return summary


def _serve(cfg: WorkerConfig, queue: JobQueue, name: str, summary: WorkerSummary,
           backends: BackendCache) -> None:
    """:func:`run_worker`'s loop; fills ``summary``."""
    claim_idle_ms = int(cfg.claim_idle_s * 1000)
    first = _wait_for_first_job(queue, cfg)
    if first is None:
        return
    try:
        first_spec = first.spec(**backends.runtime)
    except (KeyError, TypeError, ValueError):
        first_spec = None  # a malformed job: dead-lettered when its turn comes
    if first_spec is not None:
        backends.get(first_spec)  # load once, before holding any job
    start = time.perf_counter()  # the summary's rate is the labelling rate, without the load
    idle_since: float | None = None
    failed_in_a_row = 0
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
            failed, error = _handle(job, queue, backends, cfg, name, summary, bar)
            if failed:
                failed_in_a_row += 1
            elif error is None:  # done; a job lost to another worker neither counts nor resets
                failed_in_a_row = 0
            if failed_in_a_row >= cfg.max_failures_in_a_row:
                raise WorkerBroken(
                    f"{name} failed {failed_in_a_row} jobs in a row (last: {error}); stopping so that "
                    "healthy workers take them (they may retry them at once). Check this machine "
                    "(GPU, memory, files) and: python -m labelling.status")
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        queue.leave(name)


def _handle(job: Job, queue: JobQueue, backends: BackendCache, cfg: WorkerConfig, name: str,
            summary: WorkerSummary, bar) -> tuple[bool, str | None]:
    """One delivered job: dead-letter, label, or record the failure.

    Returns (whether the job failed here, the error); (False, None) means it went well."""
    where = f"{job.shard} of {job.source}"
    if job.kind == "reclaim" and job.reclaims > cfg.max_reclaims:  # its holders kept vanishing
        error = queue.last_error(job) or (f"taken over {job.reclaims} times from workers that went "
                                          "silent holding it (out of memory? killed? preempted?)")
        if queue.dead_letter(job, name, error):
            summary.dead += 1
            _log(bar, f"dead letter: {where}: {error}")
        return False, "not this worker's failure"
    try:
        spec = job.spec(**backends.runtime)
    except (KeyError, TypeError, ValueError) as exc:  # a malformed job: retrying cannot help
        error = f"malformed job ({one_line(exc)}); enqueue the dataset again with this version"
        queue.dead_letter(job, name, error)
        summary.dead += 1
        _log(bar, f"dead letter: {job.fields}: {error}")
        return True, error
    try:
        backend = backends.get(spec)
    except (UserError, WorkerBroken):  # this worker cannot run the model: give the job back uncharged
        queue.release(job, name, charge=False)
        raise

    def on_deadline() -> str:
        outcome = queue.fail(job, name, f"DeadlineExceeded: still running after --job-deadline-s "
                                        f"{cfg.job_deadline_s:g} s", cfg.max_attempts)
        _log(bar, f"deadline: {where} ran past {cfg.job_deadline_s:g} s; handed back ({outcome}), "
                  "its result will be discarded")
        return outcome

    beat = Heartbeat(queue, job, name, cfg.claim_idle_s / 4, cfg.job_deadline_s, on_deadline)
    try:
        with beat:
            if cfg.fault_pause_s:
                time.sleep(cfg.fault_pause_s)
            info = process_job(job, backend, queue, name,
                               still_held=lambda: not beat.lost and queue.owns(job, name))
    except (Shutdown, KeyboardInterrupt):
        queue.release(job, name, charge=False)
        raise
    except Exception as exc:
        error = one_line(exc)
        if beat.expired is None and worker_fatal(exc):
            queue.release(job, name, charge=False)
            raise WorkerBroken(f"{name} hit an error of its own, not of the job ({error}); "
                               f"{job.shard} was handed back uncharged. Check this machine's GPU "
                               "and memory") from exc
        if beat.expired is not None:  # the deadline already charged this attempt
            return _expired(beat, job, summary)
        final = job_error_is_final(exc)
        outcome = queue.fail(job, name, error, 1 if final else cfg.max_attempts)
        _count_failure(outcome, summary)
        verb = {"dead": "dead letter", "retry": "will retry", "lost": "lost meanwhile"}[outcome]
        _log(bar, f"{verb} (failure {job.failures + 1}"
                  f"{'' if final else f'/{cfg.max_attempts}'}): {where}: {error}")
        return True, error
    if beat.expired is not None:
        return _expired(beat, job, summary)
    if info is None or not queue.complete(job, name, **info):
        summary.lost += 1
        _log(bar, f"note: {where} was taken over by another worker meanwhile; " + (
            "this worker's result was discarded" if info is None else
            "it lost the job just after writing the shard, which its new holder will find present"))
        return False, "lost"
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
    return False, None


def _count_failure(outcome: str, summary: WorkerSummary) -> None:
    summary.dead += outcome == "dead"
    summary.retried += outcome == "retry"
    summary.lost += outcome == "lost"


def _expired(beat: Heartbeat, job: Job, summary: WorkerSummary) -> tuple[bool, str]:
    """The job ran past its deadline: the heartbeat thread already failed it; discard the result."""
    _count_failure(beat.expired, summary)
    return True, f"{job.shard} ran past its deadline"


def _raise_shutdown(signum, frame) -> None:
    raise Shutdown(f"signal {signum}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(WorkerConfig, AREA, COMMAND, argv).validate()
    signal.signal(signal.SIGTERM, _raise_shutdown)
    try:
        summary = run_worker(cfg)
    except (Shutdown, KeyboardInterrupt) as stop:
        print(f"worker stopped ({'SIGTERM' if isinstance(stop, Shutdown) else 'Ctrl-C'}); "
              "a job it held was handed back", file=sys.stderr)
        raise SystemExit(143 if isinstance(stop, Shutdown) else 130) from None
    except WorkerBroken as broken:
        print(f"error: {broken}", file=sys.stderr)
        raise SystemExit(EXIT_WORKER_BROKEN) from None
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    print(f"{summary.name}: labelled {summary.jobs} shards ({summary.rows:,} rows, {rate:,.0f} rows/s "
          f"over {summary.seconds:.1f} s), {summary.skipped} already present, {summary.retried} "
          f"handed back for a retry, {summary.dead} dead-lettered, {summary.lost} lost to other workers")
    if summary.dead:
        print("see the errors with: python -m labelling.status", file=sys.stderr)


if __name__ == "__main__":
    main()
