"""Client of the hidden-state server (``python -m servers.hidden_state_server``).

    client = HiddenStateClient("http://127.0.0.1:8000")
    client.info()                                   # {"model": ..., "layer": ..., "dim": ..., ...}
    feats = client.observation_hidden_states(obs, "Craftax-Classic-Symbolic-v1")   # float32 [N, D]
    feats = client.hidden_states(["Health 9, food 9, drink 9, energy 9."])
    feats = client.image_hidden_states(frames, "Craftax-Classic-Pixels-v1")        # a VLM's server

It has ``hidden_states(texts)``, ``hidden_size``, ``num_layers`` and ``spec`` like a local backend
(``utils.llm.LLMBackend``), so code that computes features can take either, e.g.
``utils.llm.observation_features(client, obs, env)``. Big batches are split into requests of the
server's ``max_batch``, ``concurrency`` of them in flight at once (the server gathers them, and
other clients' requests, into shared model calls).

Answers come as raw float32 by default (``wire="f32"``): formatting and parsing a JSON float list
cost more than the model on large batches, and float32 keeps a server vector equal to the
in-process one (PPO-LLM trains the same policy either way). ``wire="f16"`` halves the bytes again
and rounds like labelled datasets (which store float16); ``wire="json"`` is the readable fallback.
A server computes text or image features (its ``/health`` ``modality``); asking a server for the
other kind is an LLMError before anything is sent. Frames go as raw uint8 (``encoding="raw"``:
no encoding cost, and the server learns their size from the headers) or as PNG in JSON
(``encoding="png"``: smaller uploads); both lossless.

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

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from utils.frames import as_uint8_frames, encode_png
from utils.llm import IMAGE_FIELDS, RESOLVED_FIELDS, LLMError, LLMSpec

__all__ = ["HiddenStateClient", "BINARY_MEDIA_TYPE", "SHAPE_HEADER", "DTYPE_HEADER", "WIRE_FORMATS",
           "WireError", "encode_vectors", "decode_vectors", "PNG_MEDIA_TYPE", "ENV_HEADER", "FRAME_DTYPE",
           "FRAME_ENCODINGS", "encode_frames", "frame_shape", "decode_frames", "IMAGE_HIDDEN_STATES_PATH"]

HIDDEN_STATES_PATH = "/v1/hidden_states"
IMAGE_HIDDEN_STATES_PATH = "/v1/image_hidden_states"
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
                       thinking=bool(info.get("thinking", False)), modality=self.modality)

    @property
    def modality(self) -> str:
        """``text`` or ``image``: what the server computes features of (older servers: text)."""
        return self.info().get("modality", "text")

    @property
    def identity(self) -> dict[str, Any]:
        """What the server resolved where its model loaded (``utils.llm.RESOLVED_FIELDS``: backend,
        compute dtype, model revision), like a local backend's ``identity``; None for the fields
        an older server does not report (a recorded identity then refuses it)."""
        info = self.info()
        fields = RESOLVED_FIELDS + (IMAGE_FIELDS if self.modality == "image" else ())
        return {k: info.get(k) for k in fields}

    def _require(self, modality: str) -> None:
        """An LLMError, before anything is sent, when the server computes the other modality."""
        if self.modality == modality:
            return
        model = self.info().get("model")
        if modality == "text":
            raise LLMError(f"the hidden-state server at {self.url} computes image features (model {model}); "
                           "send it frames (image_hidden_states), or use a server with a text model for texts")
        raise LLMError(f"the hidden-state server at {self.url} computes text features (model {model}); frames "
                       "need a server with a vision-language model (python -m servers.hidden_state_server "
                       "--model runs/tiny_vlm, after python -m utils.testing.tiny_vlm runs/tiny_vlm)")

    # -- hidden states ---------------------------------------------------------------------------

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim] hidden states of ``texts`` (the server applies its template)."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        texts = list(texts)
        self._require("text")
        return self._batched(len(texts), lambda lo, hi: {"json": {"texts": texts[lo:hi]}})

    def observation_hidden_states(self, obs: np.ndarray, env_name: str) -> np.ndarray:
        """float32 [N, dim] hidden states of symbolic observations ``[N, obs_dim]`` of ``env_name``,
        rendered to the canonical text on the server (the same text labelling uses)."""
        obs = np.asarray(obs)
        if obs.ndim != 2:
            raise LLMError(f"observation_hidden_states expects a batch [N, obs_dim], got shape "
                           f"{obs.shape}; add a leading axis for one observation")
        rows = obs.astype(np.float32, copy=False)  # float32 -> JSON -> float32 is exact
        self._require("text")
        return self._batched(len(rows), lambda lo, hi: {"json": {"env": env_name,
                                                                 "observations": rows[lo:hi].tolist()}})

    def image_hidden_states(self, frames, env_name: str, encoding: str = "raw") -> np.ndarray:
        """float32 [N, dim] hidden states of frames ``[N, H, W, 3]`` of ``env_name`` (uint8, or env
        pixel observations in [0, 1]; ``utils.frames.as_uint8_frames``), from a server with a
        vision-language model. ``encoding``: ``raw`` uint8 bytes, or ``png`` (base64 in JSON)."""
        if encoding not in FRAME_ENCODINGS:
            raise LLMError(f"encoding must be one of {', '.join(FRAME_ENCODINGS)}, got {encoding!r}")
        frames = as_uint8_frames(np.asarray(frames))
        self._require("image")
        if encoding == "png":
            def request(lo: int, hi: int) -> dict:
                images = [base64.b64encode(encode_png(frame)).decode("ascii") for frame in frames[lo:hi]]
                return {"json": {"env": env_name, "images": images}}
        else:
            def request(lo: int, hi: int) -> dict:
                content, headers = encode_frames(frames[lo:hi], env_name)
                return {"content": content, "headers": headers}
        return self._batched(len(frames), request, IMAGE_HIDDEN_STATES_PATH)

    def _batched(self, count: int, payload: Callable[[int, int], dict],
                 path: str = HIDDEN_STATES_PATH) -> np.ndarray:
        """Requests of at most the server's max_batch items, ``concurrency`` in flight.
        ``payload(lo, hi)``: the httpx arguments (``json=``, or ``content=`` and ``headers=``)."""
        dim = self.hidden_size
        out = np.empty((count, dim), dtype=np.float32)
        step = int(self.info()["max_batch"])
        spans = [(lo, min(lo + step, count)) for lo in range(0, count, step)]

        def fetch(span: tuple[int, int]) -> None:
            lo, hi = span
            out[lo:hi] = self._vectors(self._post(path, **payload(lo, hi)), hi - lo, dim)

        if len(spans) <= 1 or self.concurrency == 1:
            for span in spans:
                fetch(span)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="hidden-states")
            for _ in self._pool.map(fetch, spans):  # re-raises the first request's error
                pass
        return out

    def _post(self, path: str, headers: Mapping[str, str] | None = None, **body: Any) -> Any:
        """One request's answer: the decoded binary array, or the JSON body."""
        params = {} if self.wire == "json" else {"format": self.wire}
        response = self._send("POST", path, params=params,
                              headers={**(headers or {}), "X-Timeout-S": f"{self.timeout:g}"}, **body)
        if self.wire == "json":
            return self._json(response, path)
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


# ----------------------------------------------------------------------------------------------
# Frames on the wire (the client encodes, the server decodes)
# ----------------------------------------------------------------------------------------------
# The vectors' binary format run backwards: a request body of raw uint8 frames, row-major
# [N, height, width, 3], with X-Shape and X-Dtype saying so, and the env in X-Env. Nothing to
# encode or decode, and the server knows a frame's size from the headers before it touches the
# body. Or PNG: one file as an image/png body, or several base64-encoded in a JSON body
# {"env": ..., "images": [...]} (servers/schemas.py), for clients that have files or want the
# smaller upload. Both are lossless, so a frame's features do not depend on how it travelled.

PNG_MEDIA_TYPE = "image/png"
ENV_HEADER = "X-Env"
FRAME_DTYPE = "uint8"
FRAME_ENCODINGS = ("raw", "png")


def encode_frames(frames: np.ndarray, env_name: str) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of uint8 frames [N, H, W, 3] as a raw binary request."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    return frames.tobytes(), {"Content-Type": BINARY_MEDIA_TYPE, ENV_HEADER: env_name,
                              SHAPE_HEADER: ",".join(str(n) for n in frames.shape), DTYPE_HEADER: FRAME_DTYPE}


def frame_shape(headers: Mapping[str, str]) -> tuple[int, int, int, int]:
    """``(N, H, W, 3)`` from a raw frames request's headers, read before its body; a WireError for
    a missing or malformed X-Shape, a dtype other than uint8, or frames that are not RGB."""
    raw_shape, dtype = headers.get(SHAPE_HEADER), headers.get(DTYPE_HEADER)
    if dtype != FRAME_DTYPE:
        raise WireError(f"raw frames need {DTYPE_HEADER}: {FRAME_DTYPE} (got {dtype!r}); send uint8 RGB")
    try:
        shape = tuple(int(n) for n in (raw_shape or "").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise WireError(f"raw frames need {SHAPE_HEADER}: N,height,width,3 with every size at least 1 "
                        f"(got {raw_shape!r})")
    return shape  # type: ignore[return-value]


def decode_frames(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 frames of ``shape`` (from :func:`frame_shape`) from a raw body; a WireError when the
    body's length does not match."""
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise WireError(f"raw frames body of {len(body):,} bytes does not hold uint8 of shape {shape} "
                        f"({expected:,} bytes); truncated?")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Command line: ask a running server, print what it computed
# ----------------------------------------------------------------------------------------------

PIXEL_ENVS = ("Craftax-Classic-Pixels-v1", "Craftax-Pixels-v1")


def env_frames(env_name: str, count: int, seed: int = 0) -> np.ndarray:
    """uint8 frames [count, H, W, 3]: the first observation of ``count`` fresh worlds of a pixel env."""
    if env_name not in PIXEL_ENVS:
        raise LLMError(f"--frames takes the observations of a pixel env ({', '.join(PIXEL_ENVS)}); "
                       "for other envs pass PNG files with --png")
    import jax

    from utils.envs import make

    obs, _ = make(env_name, count, reset_ratio=1).reset(jax.random.PRNGKey(seed))
    return as_uint8_frames(np.asarray(obs))


def png_frames(paths: Sequence[str]) -> np.ndarray:
    """uint8 frames [N, H, W, 3] of PNG files of one size."""
    from pathlib import Path

    from utils.frames import decode_png

    frames: list[np.ndarray] = []
    for path in paths:
        try:
            frames.append(decode_png(Path(path).read_bytes()))
        except OSError as error:
            raise LLMError(f"cannot read {path} ({error.strerror})") from None
    if len({frame.shape for frame in frames}) > 1:
        raise LLMError("the PNG files differ in size; send frames of one size per call")
    return np.stack(frames)


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    """``python -m utils.hidden_state_client URL (--texts T ... | --env ENV (--frames N | --png FILE ...))``."""
    import argparse

    from utils.errors import exit_on_user_error

    parser = argparse.ArgumentParser(
        prog="python -m utils.hidden_state_client",
        description="Ask a running hidden-state server for the features of texts or frames; prints its "
                    "feature identity and the start of each vector.")
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--texts", nargs="+", default=[], metavar="TEXT", help="texts (a text model's server)")
    parser.add_argument("--env", help="the frames' env, e.g. Craftax-Classic-Pixels-v1 (a VLM's server)")
    parser.add_argument("--frames", type=int, default=0,
                        help="send the first frame of this many fresh worlds of --env (a pixel env)")
    parser.add_argument("--png", action="append", default=[], help="a PNG file to send (repeatable)")
    parser.add_argument("--encoding", choices=FRAME_ENCODINGS, default="raw", help="how frames travel")
    args = parser.parse_args(argv)

    @exit_on_user_error
    def run() -> np.ndarray:
        if bool(args.texts) == bool(args.frames or args.png) or ((args.frames or args.png) and not args.env):
            raise LLMError("give --texts, or --env with --frames N or --png FILE")
        with HiddenStateClient(args.url) as client:
            info = client.info()
            print(f"{info['model']}: {client.modality} features, layer {info['layer']}, pooling {info['pooling']}, "
                  f"dim {info['dim']}, {info.get('backend')} {info.get('compute_dtype')}, "
                  f"revision {info.get('model_revision')}")
            if args.texts:
                vectors = client.hidden_states(args.texts)
            else:
                client._require("image")  # before building frames (JAX compiles for a while)
                frames = env_frames(args.env, args.frames) if args.frames else png_frames(args.png)
                vectors = client.image_hidden_states(frames, args.env, encoding=args.encoding)
        for i, row in enumerate(vectors):
            print(f"{i}: [{', '.join(f'{v:.4f}' for v in row[:4])}, ...] norm {np.linalg.norm(row):.3f}")
        return vectors

    return run()


if __name__ == "__main__":
    main()
