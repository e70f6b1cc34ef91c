"""Client of the hidden-state server (``python -m servers.hidden_state_server``).

    client = HiddenStateClient("http://127.0.0.1:8000")
    client.info()                                   # {"model": ..., "layer": ..., "dim": ..., ...}
    feats = client.observation_hidden_states(obs, "Craftax-Classic-Symbolic-v1")   # float32 [N, D]
    feats = client.hidden_states(["Health 9, food 9, drink 9, energy 9."])

It has ``hidden_states(texts)``, ``hidden_size``, ``num_layers`` and ``spec`` like a local backend
(``utils.llm.LLMBackend``), so code that computes features can take either, e.g.
``utils.llm.observation_features(client, obs, env)``. Big batches are split into requests of the
server's ``max_batch``, ``concurrency`` of them in flight at once (the server gathers them, and
other clients' requests, into shared model calls).

Answers come as raw float32 by default (``wire="f32"``): formatting and parsing a JSON float list
cost more than the model on large batches, and float32 keeps a server vector equal to the
in-process one (PPO-LLM trains the same policy either way). ``wire="f16"`` halves the bytes again
and rounds like labelled datasets (which store float16); ``wire="json"`` is the readable fallback.
A request the server refuses for load (429 queue full, 503) is retried after its ``Retry-After``,
a few times. The client's ``timeout`` travels as ``X-Timeout-S``, so the server drops work the
client gave up on.

The binary wire format is defined here, below the client, and the server imports it from here
(``utils`` is the layer both sides may use, docs/design.md): the two sides cannot drift apart.

Every failure raises ``utils.llm.LLMError`` with the server's one-line reason: an unreachable
server, a 4xx for bad input, a 5xx, or an answer of the wrong shape. The predecessor turned a failed
request into zero vectors, which trained policies on garbage without a word; this never does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from utils.llm import RESOLVED_FIELDS, LLMError, LLMSpec

__all__ = ["HiddenStateClient", "BINARY_MEDIA_TYPE", "SHAPE_HEADER", "DTYPE_HEADER", "WIRE_FORMATS",
           "WireError", "encode_vectors", "decode_vectors"]

HIDDEN_STATES_PATH = "/v1/hidden_states"
HEALTH_PATH = "/health"
_START_HINT = "start one with: python -m servers.hidden_state_server --model MODEL"
_RETRY_STATUSES = (429, 503)  # the server is busy or restarting: worth waiting for
_MAX_RETRY_WAIT_S = 30.0


class HiddenStateClient:
    """Hidden states from a running server, over a few keep-alive HTTP connections."""

    def __init__(self, url: str, timeout: float = 60.0, wire: str = "f32", concurrency: int = 4,
                 retries: int = 3):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise LLMError(f"hidden-state server URL {url!r} must start with http:// or https://")
        if wire not in WIRE_FORMATS:
            raise LLMError(f"wire must be one of {', '.join(WIRE_FORMATS)}, got {wire!r}")
        if concurrency < 1 or retries < 0:
            raise LLMError(f"concurrency must be >= 1 and retries >= 0, got {concurrency}, {retries}")
        self.url = url.rstrip("/")
        self.wire, self.concurrency, self.retries, self.timeout = wire, concurrency, retries, timeout
        self._httpx = httpx
        self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                  limits=httpx.Limits(max_connections=max(concurrency, 10)))
        self._pool: ThreadPoolExecutor | None = None
        self._info: dict[str, Any] | None = None

    # -- what the server computes ----------------------------------------------------------------

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """The server's /health: model, layer, layer_index, pooling, dim, max_batch, ... (cached)."""
        if self._info is None or refresh:
            self._info = self._request("GET", HEALTH_PATH)
        return self._info

    @property
    def hidden_size(self) -> int:
        return int(self.info()["dim"])

    @property
    def num_layers(self) -> int:
        return int(self.info()["num_layers"])

    @property
    def spec(self) -> LLMSpec:
        """The server's model, layer, pooling and prompt as an LLMSpec (for manifests, checks)."""
        info = self.info()
        return LLMSpec(model=info["model"], layer=int(info["layer"]), pooling=info["pooling"],
                       template=info["template"], system_prompt=info.get("system_prompt"),
                       backend=info.get("backend", "transformers"),
                       dtype=info.get("compute_dtype") or "auto",
                       thinking=bool(info.get("thinking", False)))

    @property
    def identity(self) -> dict[str, Any]:
        """What the server resolved where its model loaded (``utils.llm.RESOLVED_FIELDS``: backend,
        compute dtype, model revision), like a local backend's ``identity``; None for the fields
        an older server does not report (a recorded identity then refuses it)."""
        info = self.info()
        return {k: info.get(k) for k in RESOLVED_FIELDS}

    # -- hidden states ---------------------------------------------------------------------------

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim] hidden states of ``texts`` (the server applies its template)."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        texts = list(texts)
        return self._batched(len(texts), lambda lo, hi: {"texts": texts[lo:hi]})

    def observation_hidden_states(self, obs: np.ndarray, env_name: str) -> np.ndarray:
        """float32 [N, dim] hidden states of symbolic observations ``[N, obs_dim]`` of ``env_name``,
        rendered to the canonical text on the server (the same text labelling uses)."""
        obs = np.asarray(obs)
        if obs.ndim != 2:
            raise LLMError(f"observation_hidden_states expects a batch [N, obs_dim], got shape "
                           f"{obs.shape}; add a leading axis for one observation")
        rows = obs.astype(np.float32, copy=False)  # float32 -> JSON -> float32 is exact
        return self._batched(len(rows), lambda lo, hi: {"env": env_name,
                                                        "observations": rows[lo:hi].tolist()})

    def _batched(self, count: int, payload: Callable[[int, int], dict]) -> np.ndarray:
        """Requests of at most the server's max_batch items, ``concurrency`` in flight."""
        dim = self.hidden_size
        out = np.empty((count, dim), dtype=np.float32)
        step = int(self.info()["max_batch"])
        spans = [(lo, min(lo + step, count)) for lo in range(0, count, step)]

        def fetch(span: tuple[int, int]) -> None:
            lo, hi = span
            out[lo:hi] = self._vectors(self._post(payload(lo, hi)), hi - lo, dim)

        if len(spans) <= 1 or self.concurrency == 1:
            for span in spans:
                fetch(span)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="hidden-states")
            for _ in self._pool.map(fetch, spans):  # re-raises the first request's error
                pass
        return out

    def _post(self, body: dict) -> Any:
        """One request's answer: the decoded binary array, or the JSON body."""
        params = {} if self.wire == "json" else {"format": self.wire}
        response = self._send("POST", HIDDEN_STATES_PATH, json=body, params=params,
                              headers={"X-Timeout-S": f"{self.timeout:g}"})
        if self.wire == "json":
            return self._json(response, HIDDEN_STATES_PATH)
        if response.headers.get("content-type") != BINARY_MEDIA_TYPE:
            raise LLMError(f"hidden-state server at {self.url} sent "
                           f"{response.headers.get('content-type')!r} instead of a binary answer; "
                           "an older server? use HiddenStateClient(..., wire='json')")
        try:
            return decode_vectors(response.content, response.headers)
        except WireError as error:
            raise LLMError(f"hidden-state server at {self.url}: {error}") from None

    def _vectors(self, answer: Any, rows: int, dim: int) -> np.ndarray:
        try:
            vectors = answer if isinstance(answer, np.ndarray) else np.asarray(answer["vectors"],
                                                                               dtype=np.float32)
        except (KeyError, TypeError, ValueError) as error:
            raise LLMError(f"hidden-state server at {self.url} sent an answer without proper "
                           f"'vectors' ({error})") from None
        if vectors.shape != (rows, dim):
            raise LLMError(f"hidden-state server at {self.url} sent vectors of shape "
                           f"{vectors.shape} for {rows} inputs of dim {dim}; did it restart with "
                           "another model? (client.info(refresh=True))")
        if not np.isfinite(vectors).all():
            raise LLMError(f"hidden-state server at {self.url} sent non-finite vectors")
        return vectors

    # -- HTTP ------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._json(self._send(method, path, **kwargs), path)

    def _send(self, method: str, path: str, **kwargs: Any):
        """The response to a request, retried after Retry-After while the server is busy (429,
        503); an LLMError for anything else that is not a success."""
        httpx = self._httpx
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException:
                raise LLMError(f"hidden-state server at {self.url} did not answer {path} within "
                               f"{self._http.timeout.read} s; raise the client's timeout or check "
                               "the server's load") from None
            except httpx.TransportError as error:
                raise LLMError(f"cannot reach the hidden-state server at {self.url} "
                               f"({type(error).__name__}: {error}); is it running? {_START_HINT}"
                               ) from None
            if response.status_code not in _RETRY_STATUSES or attempt == self.retries:
                break
            time.sleep(_retry_after_s(response))
        if response.status_code >= 400:
            raise LLMError(f"hidden-state server at {self.url} answered {path} with HTTP "
                           f"{response.status_code}: {_detail(response)}")
        return response

    def _json(self, response, path: str) -> dict[str, Any]:
        try:
            return response.json()
        except ValueError:
            raise LLMError(f"hidden-state server at {self.url} answered {path} with something that "
                           "is not JSON; is the URL right?") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._http.close()

    def __enter__(self) -> "HiddenStateClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_after_s(response) -> float:
    """The server's Retry-After in seconds (1 when absent or not a number), capped."""
    try:
        seconds = float(response.headers.get("retry-after", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), _MAX_RETRY_WAIT_S)


def _detail(response) -> str:
    """The server's one-line reason, or the start of whatever else answered."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return str(body)[:200]


# ----------------------------------------------------------------------------------------------
# Binary wire format (the server encodes, the client decodes)
# ----------------------------------------------------------------------------------------------
# A JSON answer spells every float in decimal: for 256 vectors of dim 896 that is about four
# megabytes of text that the server formats and the client parses. The binary answer is the
# array's bytes, little-endian, row-major, with the shape and dtype in headers. Vectors whose
# values do not fit float16 (|x| > 65504, which some models' middle layers reach) are sent as
# float32 even when f16 was asked for, and X-Dtype says so: a client never gets inf from an overflow.

BINARY_MEDIA_TYPE = "application/octet-stream"
SHAPE_HEADER = "X-Shape"
DTYPE_HEADER = "X-Dtype"
WIRE_FORMATS = ("json", "f16", "f32")
"""Values of the ``format`` query parameter; ``Accept: application/octet-stream`` means f16."""

_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_F16_MAX = float(np.finfo(np.float16).max)


class WireError(ValueError):
    """A binary answer that does not match its headers (truncated, wrong shape or dtype)."""


def encode_vectors(states: np.ndarray, fmt: str) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of float32 ``states`` [N, D] in format ``f16`` or ``f32``."""
    states = np.asarray(states, dtype=np.float32)
    dtype = "float16" if fmt == "f16" and _fits_float16(states) else "float32"
    body = np.ascontiguousarray(states, dtype=_DTYPES[dtype]).tobytes()
    return body, {SHAPE_HEADER: ",".join(str(n) for n in states.shape), DTYPE_HEADER: dtype}


def decode_vectors(body: bytes, headers: Mapping[str, str]) -> np.ndarray:
    """float32 [N, D] from a binary answer; a WireError if body and headers disagree."""
    try:
        shape = tuple(int(n) for n in headers[SHAPE_HEADER].split(","))
        dtype = _DTYPES[headers[DTYPE_HEADER]]
    except (KeyError, ValueError) as error:
        raise WireError(f"binary answer without a proper {SHAPE_HEADER}/{DTYPE_HEADER} header "
                        f"({type(error).__name__}: {error})") from None
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(shape) != 2 or len(body) != expected:
        raise WireError(f"binary answer of {len(body)} bytes does not hold {dtype} of shape {shape} "
                        f"({expected} bytes); truncated?")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(np.float32)


def _fits_float16(states: np.ndarray) -> bool:
    return states.size == 0 or float(np.abs(states).max()) <= _F16_MAX
