"""HTTP service that turns Craftax observations, texts or frames into LLM hidden states.

    python -m servers.hidden_state_server --model Qwen/Qwen2.5-0.5B-Instruct --layer -1 --pooling last
    python -m servers.hidden_state_server --model runs/tiny_llm --preset debug      # CPU, seconds
    python -m servers.hidden_state_server --model runs/tiny_vlm --preset debug      # frames, CPU

One process loads the model once and serves many clients (PPO with live LLM features, evaluation,
tools), so a GPU is shared instead of every client loading its own copy. Observations go through
the same ``utils.text_obs.render_texts`` and prompt as offline labelling, so a server vector equals
a labelled dataset's vector for the same observation and spec.

Endpoints (docs/servers.md has examples; the live schema is at ``/openapi.json`` and ``/docs``):

* ``POST /v1/hidden_states``: ``{"texts": [...]}`` or ``{"env": ..., "observations": [[...]]}``
  -> ``{"vectors": [[...]], "model", "layer", "pooling", "dim", ...}``.
  With ``?format=f16`` (or ``Accept: application/octet-stream``) or ``?format=f32`` the vectors
  come back as raw little-endian floats with their shape in ``X-Shape``
  (``utils/hidden_state_client.py`` defines the format).
* ``POST /v1/image_hidden_states`` (a vision-language model's server): frames as raw uint8
  (``X-Shape``, ``X-Dtype: uint8``, ``X-Env``), one PNG (``image/png``, ``X-Env``) or JSON
  ``{"env": ..., "images": [<base64 PNG>, ...]}`` -> the same answers, ``modality`` ``image``
  (``servers/images.py``). A server computes one modality: the other endpoint answers 422.
* ``GET /health``: model, layer, pooling, dim and the limits; 503 once the model keeps failing.
* ``GET /v1/stats``: requests, model calls and batch sizes so far.

Concurrent requests are gathered into one model call (``servers/batching.py``): ``--max-batch``
caps the texts per call and per request, ``--max-wait-ms`` is how long a call waits for company.
Bad input (malformed JSON, wrong observation length, empty or oversized batches, both or neither
of texts/observations, unknown env, too long a prompt) gets a 4xx with one line saying what is
wrong, never a 500. Size limits apply before parsing and before tokenising, the queue is bounded
(429 with Retry-After), a request has a deadline (504) and is dropped when its client disconnects
(``servers/limits.py``). Listens on 127.0.0.1 unless ``--host`` says otherwise: there is no auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from servers.batching import BatcherStopped, DeadlineExceeded, MicroBatcher, QueueFull
from servers.images import read_frames
from servers.limits import MB, BodyLimit, Limits, check_texts, printable
from servers.schemas import (
    ErrorResponse,
    HealthResponse,
    HiddenStatesRequest,
    HiddenStatesResponse,
    ImageHiddenStatesRequest,
    StatsResponse,
)
from utils.config import parse_config
from utils.errors import UserError, exit_on_user_error
from utils.hidden_state_client import (
    BINARY_MEDIA_TYPE,
    DTYPE_HEADER,
    ENV_HEADER,
    IMAGE_HIDDEN_STATES_PATH,
    PNG_MEDIA_TYPE,
    SHAPE_HEADER,
    WIRE_FORMATS,
    encode_vectors,
)
from utils.llm import LLMBackend, LLMSpec, feature_identity, make_backend
from utils.llm.prompts import FRAME_ENV_NAMES
from utils.text_obs import TEXT_ENV_NAMES, obs_layout, render_texts

AREA, COMMAND = "servers", "hidden_state_server"
HIDDEN_STATES_PATH = "/v1/hidden_states"
_MAX_REPORTED_ERRORS = 10
_IDENTITY_HEADERS = {"backend": "X-Backend", "compute_dtype": "X-Compute-Dtype",
                     "model_revision": "X-Model-Revision", "modality": "X-Modality",
                     "image_processor": "X-Image-Processor"}

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerConfig(LLMSpec):
    """Serve LLM hidden states of Craftax observations or texts over HTTP."""

    preset: tuple[str, ...] = ()
    """Presets from configs/servers/hidden_state_server.yaml, applied left to right."""
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 exposes the server to the network (it has no authentication)."""
    port: int = 8000
    """TCP port (0: any free port, printed at start)."""
    max_batch: int = 64
    """Most texts per model call, and per request (larger requests get 413; the client splits them)."""
    max_wait_ms: float = 5.0
    """How long a model call waits for more requests to join it; 0 takes only what is already queued."""
    batch_size: int = 64
    """Prompts per forward pass inside one model call (transformers backend)."""
    threads: int | None = None
    """CPU threads for torch; default torch's choice. On a shared CPU, 1 is often fastest."""
    log_level: str = "info"
    """uvicorn log level: critical, error, warning, info, debug."""
    access_log: bool = False
    """Log one line per request."""
    max_body_mb: float = Limits.max_body_bytes / MB
    """Largest request body in MB (10^6 bytes), refused with 413 before it is parsed."""
    max_text_chars: int = Limits.max_text_chars
    """Longest text in characters, refused with 413 before it is tokenised."""
    max_image_mb: float = Limits.max_image_bytes / MB
    """Largest PNG frame in MB (10^6 bytes), refused with 413 before it is decoded."""
    max_image_pixels: int = Limits.max_image_pixels
    """Most pixels (height x width) of one frame, refused with 413 before it is decoded."""
    max_queue: int = Limits.max_queue
    """Most texts waiting for the model; more get 429 with Retry-After."""
    request_timeout_s: float = Limits.request_timeout_s
    """A request not computed within this many seconds gets 504 and is dropped."""
    unhealthy_after: int = Limits.unhealthy_after
    """Model calls failing in a row before /health answers 503."""

    def limits(self) -> Limits:
        """The limit flags as ``servers.limits.Limits``, checked (a UserError names a bad flag)."""
        return Limits(max_body_bytes=int(self.max_body_mb * MB), max_text_chars=self.max_text_chars,
                      max_image_bytes=int(self.max_image_mb * MB), max_image_pixels=self.max_image_pixels,
                      max_queue=self.max_queue, request_timeout_s=self.request_timeout_s,
                      unhealthy_after=self.unhealthy_after).check()

    def spec(self) -> LLMSpec:
        """The LLM fields; a local model folder becomes absolute, so /health names it unambiguously."""
        spec = LLMSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LLMSpec)})
        local = Path(spec.model).expanduser()
        return spec.replace(model=str(local.resolve())) if spec.model and local.exists() else spec

    def check(self) -> "ServerConfig":
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise UserError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be 0..65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        return self


# ----------------------------------------------------------------------------------------------
# Errors: one clear line per problem, 4xx for anything the request caused
# ----------------------------------------------------------------------------------------------


def _location(loc: Sequence[Any]) -> str:
    parts = [printable(str(p)) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def _message(error: dict[str, Any]) -> str:
    msg = printable(str(error.get("msg", "invalid")).removeprefix("Value error, "))
    loc, value = tuple(error.get("loc", ())), error.get("input")
    if error.get("type") == "literal_error" and loc[-1:] == ("env",) and isinstance(value, str):
        try:  # the renderer's own message says e.g. which symbolic env goes with a pixel one
            obs_layout(value)
        except UserError as problem:
            return printable(str(problem))
    return msg


def _line(error: dict[str, Any]) -> str:
    where = _location(error.get("loc", ()))
    return _message(error) if where == "body" else f"{where}: {_message(error)}"


def validation_error_answer(errors: Sequence[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(status, ErrorResponse body) for FastAPI's validation errors: 400 for a body that is not
    JSON, 422 otherwise. Inputs are never echoed back (an observation batch is megabytes)."""
    errors = list(errors)
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            return 400, {"detail": f"request body is not valid JSON ({reason or 'decode error'}, "
                                   f"at position {error['loc'][-1]}); send a JSON object"}
        if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
            return 422, {"detail": "request body is missing; send a JSON object with 'texts' or "
                                   "'observations' and 'env'"}
    shown = [_line(e) for e in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    items = [{"loc": [p if isinstance(p, int) else printable(str(p)) for p in e.get("loc", ())],
              "msg": _message(e), "type": str(e.get("type", ""))}
             for e in errors[:_MAX_REPORTED_ERRORS]]
    return 422, {"detail": "invalid request: " + "; ".join(shown) + more, "errors": items}


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    status, body = validation_error_answer(exc.errors())
    return JSONResponse(status_code=status, content=body)


async def _on_user_error(_: Request, exc: UserError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": printable(str(exc))})


_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "Body is not valid JSON."),
    (413, "Body over --max-body-mb, a text over --max-text-chars, a frame over --max-image-mb or "
          "--max-image-pixels, or more items than the max batch: split or shorten the request."),
    (422, "Invalid request: wrong fields, observation length, env, invalid Unicode, a frame that "
          "does not decode, a prompt too long, or features of the other modality than the server's."),
    (429, "Too many texts waiting for the model; retry after the Retry-After header's seconds."),
    (500, "The model failed on valid input (a server problem)."),
    (503, "The server is shutting down."),
    (504, "Not computed within the request's deadline (--request-timeout-s or X-Timeout-S)."),
)}
_FRAME_ERRORS = {**_ERRORS, 415: {"model": ErrorResponse, "description": (
    "A Content-Type that is not application/json, image/png or application/octet-stream.")}}
_BINARY_ANSWER = {"description": "With ?format=f16|f32 or Accept: application/octet-stream: the "
                                 "vectors as raw little-endian floats, row-major; X-Shape is "
                                 "'count,dim' and X-Dtype 'float16' or 'float32'.",
                  "content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}
TIMEOUT_HEADER = "X-Timeout-S"
CLIENT_GONE = 499  # nginx's "client closed request": logged, never read by anyone


def answer_format(query: str | None, accept: str) -> str:
    """json, f16 or f32: the query parameter wins, else ``Accept: application/octet-stream`` is f16."""
    if query is not None:
        return query
    return "f16" if BINARY_MEDIA_TYPE in accept and "application/json" not in accept else "json"


def request_timeout(header: str | None, server_s: float) -> float:
    """The server's deadline, shortened by a client's ``X-Timeout-S`` (the client gives up then)."""
    if header is None:
        return server_s
    try:
        seconds = float(header)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise HTTPException(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got "
                                 f"{printable(header[:40])!r}")
    return min(seconds, server_s)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read by then, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its request was dropped."""


async def compute_answer(batcher: MicroBatcher, items: list, request: Request, timeout_s: float):
    """The batcher's float32 rows for ``items``, or the Response to send instead (the client left);
    every other outcome is an HTTPException with the status of the error table (docs/servers.md)."""
    try:
        return await compute_or_drop(batcher, items, request, timeout_s)
    except UserError as error:  # e.g. a prompt longer than max_length: the request's fault
        raise HTTPException(422, str(error)) from None
    except QueueFull as error:
        raise HTTPException(429, f"{error}; the server is at capacity",
                            headers={"Retry-After": str(error.retry_after_s)}) from None
    except DeadlineExceeded:
        raise HTTPException(504, f"not computed within {timeout_s:g} s (the server's "
                                 f"--request-timeout-s or the client's {TIMEOUT_HEADER}); "
                                 "the server is overloaded, retry later") from None
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    except BatcherStopped as error:
        raise HTTPException(503, str(error)) from None
    except Exception as error:  # noqa: BLE001 - a model failure on valid input: say which
        log.exception("model call failed")
        reason = (str(error).strip().splitlines() or [""])[0]
        raise HTTPException(500, f"the model failed on this request "
                                 f"({type(error).__name__}: {printable(reason)})") from None


def wrong_modality(identity: dict[str, Any]) -> HTTPException:
    """422 for a request of the modality this server does not compute (one line, with the fix)."""
    if identity["modality"] == "image":
        return HTTPException(422, f"this server's model {identity['model']} computes image features "
                                  f"(modality image): POST frames to {IMAGE_HIDDEN_STATES_PATH} "
                                  "(HiddenStateClient.image_hidden_states), or start a server with a text model")
    return HTTPException(422, f"this server's model {identity['model']} computes text features (modality "
                              f"text): POST texts or observations to {HIDDEN_STATES_PATH}, or start a server "
                              "with a vision-language model for frames")


def model_compute(backend: LLMBackend, modality: str):
    """What the batcher's worker thread calls on gathered items: texts, or (env, frame) pairs."""
    if modality == "text":
        return backend.hidden_states

    def frames(items: list[tuple[str, np.ndarray]]) -> np.ndarray:
        return backend.image_hidden_states([frame for _, frame in items], [env for env, _ in items])

    return frames


async def compute_or_drop(batcher: MicroBatcher, texts: list[str], request: Request,
                          timeout_s: float) -> np.ndarray:
    """The batcher's answer, or ``ClientGone`` (and the request dropped from the batcher) as soon
    as the client disconnects: the model never computes answers nobody will read."""
    work = asyncio.ensure_future(batcher.submit(texts, timeout_s))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise ClientGone
    return work.result()


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


def observation_texts(observations: list[list[float]], env: str) -> list[str]:
    """Canonical texts of a request's observations; a UserError names the first bad row."""
    expected = obs_layout(env).obs_dim
    for i, row in enumerate(observations):
        if len(row) != expected:
            raise UserError(f"observation {i} has {len(row)} values, but {env} observations have "
                            f"{expected}; is 'env' right?")
    return render_texts(np.asarray(observations, dtype=np.float32), env)


def create_app(backend: LLMBackend, spec: LLMSpec, *, max_batch: int = 64,
               max_wait_ms: float = 5.0, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app serving ``backend``'s hidden states (``spec`` names what they are).

    The model is only ever called from the batcher's one worker thread, so a backend need not be
    thread-safe. The worker starts with the first request and stops when the app shuts down.
    ``limits`` bound body size, text length, queue, deadline and the failures /health tolerates."""
    if max_batch < 1 or max_wait_ms < 0:
        raise UserError(f"max_batch must be >= 1 and max_wait_ms >= 0 (got {max_batch}, {max_wait_ms})")
    limits.check()
    # The feature identity clients compare (online_rl_llm.features.IDENTITY_FIELDS): the spec's
    # fields, what the backend resolved where the model loaded, and the modality.
    identity = feature_identity(spec, backend)
    modality = identity["modality"]
    batcher = MicroBatcher(model_compute(backend, modality), max_batch=max_batch,
                           max_wait_ms=max_wait_ms, max_queue=limits.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)

    app = FastAPI(
        title="Craftax hidden-state server",
        version="1",
        summary="LLM hidden states of Craftax observations (rendered to canonical text), texts or frames.",
        description=("Send texts, or symbolic observations with their env (rendered to the canonical "
                     "text of utils/text_obs.py), or, to a vision-language model's server, frames; get "
                     "one hidden-state vector per item, plus the model, layer, pooling and modality that "
                     "produced it. Concurrent requests share model calls. Errors are 4xx/5xx with a "
                     "one-line 'detail'."),
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.identity = identity
    app.state.limits = limits
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(UserError, _on_user_error)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    binary_headers = {"X-Layer-Index": str(identity["layer_index"]), "X-Pooling": spec.pooling,
                      "X-Template-Hash": identity["template_hash"],
                      **{header: str(identity[k]) for k, header in _IDENTITY_HEADERS.items()
                         if identity[k] is not None}}

    def vectors_answer(states: np.ndarray, fmt: str, texts: list[str] | None = None):
        """The vectors as JSON (with the identity) or as raw floats (identity in headers)."""
        if fmt != "json":
            content, headers = encode_vectors(states, fmt)
            return Response(content, media_type=BINARY_MEDIA_TYPE, headers={**headers, **binary_headers})
        return HiddenStatesResponse(**identity, count=len(states), vectors=states.tolist(), texts=texts)

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse, "description": "The model keeps failing."}},
             summary="Model, layer, pooling, dim, limits; 503 when the model keeps failing")
    async def health():
        s = batcher.stats()
        failing = s.failed_in_a_row >= limits.unhealthy_after
        answer = HealthResponse(
            **identity, num_layers=int(backend.num_layers), template=spec.template,
            system_prompt=spec.system_prompt, max_batch=max_batch, max_wait_ms=max_wait_ms,
            envs=list(TEXT_ENV_NAMES if modality == "text" else FRAME_ENV_NAMES),
            status="failing" if failing else "ok",
            detail=(f"the last {s.failed_in_a_row} model calls failed; last error: "
                    f"{printable(s.last_error or '')}") if failing else None,
            max_body_bytes=limits.max_body_bytes, max_text_chars=limits.max_text_chars,
            max_image_bytes=limits.max_image_bytes, max_image_pixels=limits.max_image_pixels,
            max_queue=limits.max_queue, queued=s.queued, request_timeout_s=limits.request_timeout_s)
        if failing:
            return JSONResponse(status_code=503, content=answer.model_dump())
        return answer

    @app.get("/v1/stats", response_model=StatsResponse, summary="Requests and model calls so far")
    async def stats() -> StatsResponse:
        s = batcher.stats()
        return StatsResponse(requests=s.requests, texts=s.texts, batches=s.batches,
                             mean_batch=round(s.mean_batch, 3), batch_sizes=s.batch_sizes,
                             model_seconds=round(s.model_seconds, 4), queued=s.queued,
                             rejected=s.rejected, dropped=s.dropped,
                             failed_in_a_row=s.failed_in_a_row, last_error=s.last_error)

    @app.post(HIDDEN_STATES_PATH, response_model=HiddenStatesResponse,
              responses={200: _BINARY_ANSWER, **_ERRORS}, response_model_exclude_none=True,
              summary="Hidden states of texts or of symbolic observations")
    async def hidden_states(
        body: HiddenStatesRequest, request: Request,
        fmt: Optional[Literal[WIRE_FORMATS]] = Query(  # type: ignore[valid-type]
            None, alias="format", description="json (default), f16 or f32 (raw little-endian "
            "floats, shape in X-Shape); Accept: application/octet-stream also means f16."),
    ):
        if modality != "text":
            raise wrong_modality(identity)
        fmt = answer_format(fmt, request.headers.get("accept", ""))
        if fmt != "json" and body.return_texts:
            raise HTTPException(422, "return_texts needs the JSON answer (format=json): a binary "
                                     "answer carries only the vectors")
        count = body.count()
        if count > max_batch:
            what = "texts" if body.texts is not None else "observations"
            raise HTTPException(413, f"{count} {what} in one request, more than this server's "
                                     f"max batch of {max_batch}; split the request "
                                     "(utils.hidden_state_client.HiddenStateClient does)")
        timeout_s = request_timeout(request.headers.get(TIMEOUT_HEADER), limits.request_timeout_s)
        if body.texts is not None:
            check_texts(body.texts, limits.max_text_chars)
            texts = body.texts
        else:
            texts = await run_in_threadpool(observation_texts, body.observations, body.env)
        states = await compute_answer(batcher, texts, request, timeout_s)
        if isinstance(states, Response):
            return states
        return vectors_answer(states, fmt, texts if body.return_texts else None)

    @app.post(IMAGE_HIDDEN_STATES_PATH, response_model=HiddenStatesResponse,
              responses={200: _BINARY_ANSWER, **_FRAME_ERRORS}, response_model_exclude_none=True,
              openapi_extra={"requestBody": _FRAMES_BODY},
              summary="Hidden states of frames (a vision-language model's server)")
    async def image_hidden_states(
        request: Request,
        fmt: Optional[Literal[WIRE_FORMATS]] = Query(  # type: ignore[valid-type]
            None, alias="format", description="json (default), f16 or f32, as for /v1/hidden_states."),
        # Declared for the schema only: read_frames reads the headers with the body they describe.
        env_header: Optional[str] = Header(None, alias=ENV_HEADER, description="Binary bodies: the frames' env."),
        shape_header: Optional[str] = Header(None, alias=SHAPE_HEADER,
                                             description="Raw frames: N,height,width,3 (row-major uint8)."),
        dtype_header: Optional[str] = Header(None, alias=DTYPE_HEADER, description="Raw frames: uint8."),
    ):
        if modality != "image":
            raise wrong_modality(identity)
        fmt = answer_format(fmt, request.headers.get("accept", ""))
        timeout_s = request_timeout(request.headers.get(TIMEOUT_HEADER), limits.request_timeout_s)
        body = await request.body()
        env, frames = await run_in_threadpool(read_frames, request.headers.get("content-type"), body,
                                              request.headers, limits, max_batch)
        states = await compute_answer(batcher, [(env, frame) for frame in frames], request, timeout_s)
        if isinstance(states, Response):
            return states
        return vectors_answer(states, fmt)

    add_schema(app, ImageHiddenStatesRequest)
    return app


_BINARY_STRING = {"schema": {"type": "string", "format": "binary"}}
_FRAMES_BODY = {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ImageHiddenStatesRequest"}},
    PNG_MEDIA_TYPE: _BINARY_STRING,
    BINARY_MEDIA_TYPE: _BINARY_STRING,
}}
"""The image endpoint reads its body itself (JSON, one PNG, or raw frames), so the schema of its
three forms is declared here; the JSON form's model is added to the components by add_schema."""


def add_schema(app: FastAPI, model) -> None:
    """List ``model`` in ``/openapi.json``'s components (a body the endpoint parses itself)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schema["components"]["schemas"].setdefault(
            model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}"))
        return schema

    app.openapi = openapi


# ----------------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a UserError saying why not (port taken, bad host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"cannot resolve --host {host!r} ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port "
                        "or stop what is using it") from None
    return sock


def base_url(sock: socket.socket) -> str:
    """http://host:port of a bound socket; a wildcard address becomes the loopback one."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app: FastAPI, log_level: str, access_log: bool):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(app: FastAPI, sock: socket.socket, *, log_level: str = "info",
          access_log: bool = False) -> None:
    """Serve ``app`` on a socket from ``bind_socket`` in this thread until SIGINT/SIGTERM."""
    sock.listen(2048)  # connections from now on wait in the backlog until uvicorn accepts them
    _uvicorn_server(app, log_level, access_log).run(sockets=[sock])


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
                        log_level: str = "warning", startup_timeout_s: float = 30.0
                        ) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread (port 0: a free one) and yield its base URL.

    For tests and for training code that wants a private server; on exit the server shuts down
    and the model worker stops."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(app, log_level, access_log=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="hidden-state-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the hidden-state server stopped during start-up (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hidden-state server did not start in {startup_timeout_s} s")
            time.sleep(0.01)
        yield base_url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=startup_timeout_s)
        sock.close()


def warm_up(backend: LLMBackend) -> None:
    """One small call, so the first client does not pay lazy initialisation."""
    if getattr(backend, "modality", "text") == "image":
        backend.image_hidden_states(np.zeros((1, 16, 16, 3), np.uint8), FRAME_ENV_NAMES[0])
    else:
        backend.hidden_states(["warm-up"])


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ServerConfig, AREA, COMMAND, argv).check()
    spec = cfg.spec().validate()
    limits = cfg.limits()  # a bad limit flag fails before a minutes-long model load
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind_socket(cfg.host, cfg.port)  # fail on a taken port before a minutes-long load
    if cfg.threads is not None and spec.backend == "transformers":
        import torch

        torch.set_num_threads(cfg.threads)
    print(f"loading {spec.model} ({spec.backend}, layer {spec.layer}, pooling {spec.pooling}, "
          f"modality {spec.modality}) ...", flush=True)
    start = time.perf_counter()
    try:
        backend = make_backend(spec)
        warm_up(backend)
    except BaseException:
        sock.close()
        raise
    app = create_app(backend, spec, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                     limits=limits)
    identity = app.state.identity
    print(f"model ready in {time.perf_counter() - start:.1f} s: {identity['modality']} features, "
          f"dim {identity['dim']}, layer index "
          f"{identity['layer_index']} of {backend.num_layers}, {identity['compute_dtype']}, revision "
          f"{identity['model_revision']}; max batch {cfg.max_batch}, max wait {cfg.max_wait_ms:g} ms",
          flush=True)
    url = base_url(sock)
    sock.listen(2048)  # a client that reads the line below can connect at once
    path = HIDDEN_STATES_PATH if identity["modality"] == "text" else IMAGE_HIDDEN_STATES_PATH
    print(f"serving on {url}  (POST {url}{path}, GET {url}/health, docs {url}/docs)", flush=True)
    serve(app, sock, log_level=cfg.log_level, access_log=cfg.access_log)


if __name__ == "__main__":
    main()
