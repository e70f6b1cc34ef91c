"""Micro-batching: concurrent requests share one model call instead of queueing one by one.

A model forward pass on a batch of 32 prompts costs far less than 32 passes of one, so the server
gathers what arrives within a short window into one call. Every request goes onto a queue; one
worker thread (the only code that touches the model) takes the oldest request, keeps taking
requests for up to ``max_wait_ms`` or until ``max_batch`` texts are gathered, runs the model once
on all of them, and hands each request its own rows. Requests that arrive while the model runs
wait in the queue and form the next batch, so under load batches fill up without any waiting.

A request never shares a failure it did not cause: when a batched call raises (a prompt longer
than ``max_length``, say), each request of the batch is retried alone, so only the culprit gets
the error. A request is never split across batches and never larger than ``max_batch`` (the
server rejects larger ones before they get here).

The queue is bounded: past ``max_queue`` waiting texts, ``submit`` raises ``QueueFull`` (the server
answers 429 with a Retry-After) rather than letting the queue, and every request's wait, grow
without end. A request whose awaiting coroutine is cancelled (its client disconnected, or its
deadline passed) is dropped: it leaves the queue count at once and the worker skips it, so the
model never computes answers nobody will read. Model calls that fail in a row are counted, so
``/health`` can say the model is broken instead of "ok".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from utils.errors import UserError

log = logging.getLogger(__name__)

Compute = Callable[[Sequence[str]], np.ndarray]


class BatcherStopped(RuntimeError):
    """The batcher was closed before this request was computed (server shutting down)."""


class QueueFull(RuntimeError):
    """More texts are waiting than ``max_queue``; ``retry_after_s`` estimates when there is room."""

    def __init__(self, queued: int, max_queue: int, retry_after_s: int):
        super().__init__(f"{queued} texts are already waiting for the model (limit {max_queue}); "
                         f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """The request was not computed within its deadline; it was dropped, not computed later."""


@dataclasses.dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float = float("inf")  # time.monotonic() after which nobody waits for it
    queued: bool = True  # still counted in the batcher's queued texts


@dataclasses.dataclass
class BatchStats:
    """What the batcher has done so far. ``batches`` counts model calls (a failed batch retried
    request by request counts each call); ``batch_sizes`` maps texts-per-call to a count."""

    requests: int = 0
    texts: int = 0
    batches: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    model_seconds: float = 0.0
    queued: int = 0
    """Texts waiting for the model now."""
    rejected: int = 0
    """Requests refused because the queue was full."""
    dropped: int = 0
    """Requests given up before being computed: client gone, or deadline passed."""
    failed_in_a_row: int = 0
    """Model calls that raised (on valid input) since the last one that worked."""
    last_error: str | None = None
    """The most recent model failure, one line."""

    @property
    def mean_batch(self) -> float:
        return self.texts / self.batches if self.batches else 0.0


_STOP = object()


def _deliver(request: _Request, result: np.ndarray | None, error: BaseException | None) -> None:
    """Resolve a request's future from the worker thread (a disconnected client's is skipped)."""

    def resolve() -> None:
        if request.future.done():  # cancelled: the client went away while it waited
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)

    try:
        request.loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the request's event loop is closed: nobody is waiting any more
        pass


class MicroBatcher:
    """Runs ``compute`` (texts -> float32 [N, D]) in one worker thread on gathered requests."""

    def __init__(self, compute: Compute, *, max_batch: int, max_wait_ms: float,
                 max_queue: int = 1024, name: str = "hidden-state-model"):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch}, {max_queue}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.compute = compute
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.name = name
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats = BatchStats()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent; ``submit`` calls it too)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail what is still queued, stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------

    async def submit(self, texts: Sequence[str], timeout_s: float | None = None) -> np.ndarray:
        """Hidden states of ``texts`` (float32 [len(texts), D]), computed in some gathered batch.

        Raises ``QueueFull`` at once when ``max_queue`` texts are already waiting, and
        ``DeadlineExceeded`` after ``timeout_s``. Cancelling the awaiting task drops the request."""
        if not texts:
            raise ValueError("submit needs at least one text")
        if len(texts) > self.max_batch:
            raise ValueError(f"{len(texts)} texts exceed max_batch {self.max_batch}")
        self.start()
        loop = asyncio.get_running_loop()
        request = _Request(list(texts), loop.create_future(), loop)
        with self._lock:
            s = self._stats
            if s.queued + len(texts) > self.max_queue:
                s.rejected += 1
                raise QueueFull(s.queued, self.max_queue, self._retry_after(s))
            s.requests += 1
            s.queued += len(texts)
        if timeout_s is not None:
            request.deadline = time.monotonic() + timeout_s
        self._queue.put(request)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as error:
            request.future.cancel()  # the worker skips a cancelled request
            with self._lock:
                self._stats.dropped += 1
            self._dequeued(request)
            if isinstance(error, asyncio.TimeoutError):
                raise DeadlineExceeded(f"not computed within {timeout_s:g} s") from None
            raise

    @staticmethod
    def _retry_after(s: BatchStats) -> int:
        """Seconds until the queue has drained at the model's mean rate so far (at least 1)."""
        per_text = s.model_seconds / s.texts if s.texts else 0.0
        return max(1, int(s.queued * per_text + 0.999))

    def _dequeued(self, request: _Request) -> None:
        with self._lock:
            if request.queued:
                request.queued = False
                self._stats.queued -= len(request.texts)

    def stats(self) -> BatchStats:
        with self._lock:
            return dataclasses.replace(self._stats, batch_sizes=dict(self._stats.batch_sizes))

    # -- worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        carry: _Request | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP:
                break
            batch, size, stop = [first], len(first.texts), False
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                try:  # after the deadline, still take what is already waiting
                    remaining = deadline - time.monotonic()
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if size + len(item.texts) > self.max_batch:
                    carry = item  # first of the next batch: requests are never split
                    break
                batch.append(item)
                size += len(item.texts)
            self._process(batch)
            if stop:
                break
        self._fail_queued(carry)

    def _fail_queued(self, carry: _Request | None) -> None:
        leftovers = [carry] if carry is not None else []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftovers.append(item)
        for request in leftovers:
            self._dequeued(request)
            _deliver(request, None, BatcherStopped("the server is shutting down; retry later"))

    def _process(self, batch: list[_Request]) -> None:
        for request in batch:
            self._dequeued(request)
        now = time.monotonic()  # skip requests whose client left or whose deadline passed
        live = [r for r in batch if not r.future.done() and r.deadline > now]
        if not live:
            return
        texts = [t for r in live for t in r.texts]
        start = time.perf_counter()
        try:
            states = self._checked(self.compute(texts), len(texts))
        except Exception as error:  # noqa: BLE001 - delivered to the requests, never swallowed
            self._record(len(texts), time.perf_counter() - start, error)
            if len(live) == 1:
                _deliver(live[0], None, error)
                return
            log.info("batch of %d requests failed (%s); retrying them one by one", len(live), error)
            for request in live:
                self._process([request])
            return
        self._record(len(texts), time.perf_counter() - start)
        offset = 0
        for request in live:
            rows = states[offset:offset + len(request.texts)]
            offset += len(request.texts)
            _deliver(request, rows, None)

    @staticmethod
    def _checked(states: np.ndarray, rows: int) -> np.ndarray:
        states = np.asarray(states, dtype=np.float32)
        if states.ndim != 2 or states.shape[0] != rows:
            raise RuntimeError(f"the model returned shape {states.shape} for {rows} texts")
        return states

    def _record(self, size: int, seconds: float, error: BaseException | None = None) -> None:
        with self._lock:
            s = self._stats
            s.texts += size
            s.batches += 1
            s.batch_sizes[size] = s.batch_sizes.get(size, 0) + 1
            s.model_seconds += seconds
            if error is None:
                s.failed_in_a_row = 0
            elif not isinstance(error, UserError):  # a too-long prompt is the request's fault
                s.failed_in_a_row += 1
                reason = (str(error).strip().splitlines() or [""])[0]
                s.last_error = f"{type(error).__name__}: {reason}"


__all__ = ["MicroBatcher", "BatchStats", "BatcherStopped", "QueueFull", "DeadlineExceeded"]
