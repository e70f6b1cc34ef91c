"""Hidden-state server and client on the tiny random Qwen2: answers, batching, errors, schema, CLI."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from benchmarks.text_obs_speed import synthetic_observations
from servers.hidden_state_server import create_app, main, serve_in_background, validation_error_answer
from servers.limits import Limits
from servers.schemas import HealthResponse, HiddenStatesResponse
from utils import hidden_state_client as wire
from utils.errors import UserError
from utils.hidden_state_client import HiddenStateClient
from utils.llm import RESOLVED_FIELDS, LLMError, LLMSpec, make_backend, model_revision, observation_features
from utils.text_obs import TEXT_ENV_NAMES

CLASSIC = "Craftax-Classic-Symbolic-v1"
FULL = "Craftax-Symbolic-v1"
URL_PATH = "/v1/hidden_states"
TEXTS = [
    "Health 7, food 5, drink 9, energy 9.",
    "Inventory: wood 3, sapling 1, wood pickaxe 1. Facing: right (east); at (0,1): tree.",
    "x",
    "- stone at (1,0), (0,2), (1,1), (2,0), (0,3), (1,2), (2,1), (0,4), (2,-2), (2,2)",
]
ATOL = 1e-5  # a text alone and inside a padded batch agree to float32 rounding


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spec(tiny_llm_path) -> LLMSpec:
    return LLMSpec(model=tiny_llm_path, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def backend(spec):
    return make_backend(spec)


@pytest.fixture(scope="module")
def url(backend, spec):
    with serve_in_background(create_app(backend, spec, max_batch=8, max_wait_ms=5)) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    with HiddenStateClient(url, wire="f32") as c:  # exact, so comparisons can be tight
        yield c


class RecordingBackend:
    """Wraps a backend: records every model call's texts, can be slow, can fail on a marker;
    ``probe()``, when set, is called at each model call and its results kept in ``probed``; while
    ``gate`` is set and not open, a call waits for it (the model is busy until the test says)."""

    def __init__(self, inner, delay_s: float = 0.0, fail_marker: str | None = None,
                 failure: Exception | None = None):
        self.inner, self.delay_s, self.fail_marker, self.failure = inner, delay_s, fail_marker, failure
        self.spec, self.hidden_size, self.num_layers = inner.spec, inner.hidden_size, inner.num_layers
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()
        self.probe, self.probed = None, []
        self.gate: threading.Event | None = None

    def hidden_states(self, texts):
        self.calls.append(list(texts))
        self.threads.add(threading.current_thread().name)
        if self.probe is not None:
            self.probed.append(self.probe())
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        time.sleep(self.delay_s)
        if self.fail_marker is not None and any(self.fail_marker in t for t in texts):
            raise self.failure
        return self.inner.hidden_states(texts)


def post_json(url: str, body) -> httpx.Response:
    return httpx.post(url + URL_PATH, json=body, timeout=30)


def fire_concurrently(url: str, bodies: list) -> list[httpx.Response]:
    """Send every body at the same moment, one thread and connection each."""
    start = threading.Barrier(len(bodies))

    def send(body):
        with httpx.Client(timeout=30) as c:
            start.wait()
            return c.post(url + URL_PATH, json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------


def test_texts_match_the_in_process_backend(http, backend, spec):
    answer = http.post(URL_PATH, json={"texts": TEXTS})
    assert answer.status_code == 200, answer.text
    body = HiddenStatesResponse.model_validate(answer.json())
    assert (body.model, body.layer, body.pooling, body.dim, body.count) == (
        spec.model, -1, "last", backend.hidden_size, len(TEXTS))
    assert body.layer_index == backend.num_layers and body.template_hash == spec.template_hash()
    assert body.texts is None  # only on request
    np.testing.assert_allclose(np.array(body.vectors, np.float32), backend.hidden_states(TEXTS),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("env", TEXT_ENV_NAMES)
def test_observations_are_rendered_like_labelling(http, backend, env):
    obs = synthetic_observations(env, 3, seed=1)
    answer = http.post(URL_PATH, json={"env": env, "observations": obs.tolist(),
                                       "return_texts": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected, texts = observation_features(backend, obs, env, return_texts=True)
    assert body["texts"] == texts  # float32 survives JSON exactly, so the text is identical
    np.testing.assert_allclose(np.array(body["vectors"], np.float32), expected, atol=ATOL, rtol=0)


def test_health_describes_the_model_and_limits(http, backend, spec):
    health = HealthResponse.model_validate(http.get("/health").json())
    assert health.status == "ok" and health.dim == backend.hidden_size
    assert (health.model, health.layer, health.pooling, health.template) == (
        spec.model, spec.layer, spec.pooling, spec.template)
    assert (health.max_batch, health.max_wait_ms) == (8, 5.0)
    assert health.envs == list(TEXT_ENV_NAMES)


def test_other_layer_and_pooling_are_reported_and_used(tiny_llm_path):
    spec = LLMSpec(model=tiny_llm_path, layer=1, pooling="mean", device="cpu")
    backend = make_backend(spec)
    with serve_in_background(create_app(backend, spec)) as base:
        body = post_json(base, {"texts": TEXTS[:2]}).json()
    assert (body["layer"], body["layer_index"], body["pooling"]) == (1, 1, "mean")
    np.testing.assert_allclose(body["vectors"], backend.hidden_states(TEXTS[:2]), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Micro-batching
# ----------------------------------------------------------------------------------------------


def test_concurrent_requests_share_model_calls(backend, spec):
    # The first call sleeps, so requests arriving meanwhile must queue and be gathered.
    recording = RecordingBackend(backend, delay_s=0.2)
    texts = [f"Health {i}, food 5, drink 9, energy 9." for i in range(8)]
    with serve_in_background(create_app(recording, spec, max_batch=16, max_wait_ms=50)) as base:
        answers = fire_concurrently(base, [{"texts": [t]} for t in texts])
        stats = httpx.get(base + "/v1/stats").json()
    assert [a.status_code for a in answers] == [200] * 8
    assert len(recording.calls) < 8 and max(len(c) for c in recording.calls) > 1, recording.calls
    assert sorted(t for call in recording.calls for t in call) == sorted(texts)  # each text once
    assert len(recording.threads) == 1  # the model only ever runs in the one worker thread
    assert stats["requests"] == 8 and stats["texts"] == 8 and stats["batches"] == len(recording.calls)
    alone = backend.hidden_states(texts)
    for i, answer in enumerate(answers):  # each request gets its own row back, not a neighbour's
        np.testing.assert_allclose(answer.json()["vectors"][0], alone[i], atol=ATOL, rtol=0)


def test_a_batch_never_exceeds_max_batch_and_requests_are_not_split(backend, spec):
    recording = RecordingBackend(backend, delay_s=0.1)
    bodies = [{"texts": [f"row {i} {j}" for j in range(3)]} for i in range(6)]
    with serve_in_background(create_app(recording, spec, max_batch=7, max_wait_ms=50)) as base:
        answers = fire_concurrently(base, bodies)
    assert all(a.status_code == 200 for a in answers)
    assert max(len(c) for c in recording.calls) <= 7
    for call in recording.calls:  # whole requests only: texts of a request stay together
        assert len(call) % 3 == 0 and all(call[k][:5] == call[k + 2][:5] for k in range(0, len(call), 3))


def test_a_failing_request_does_not_fail_its_batch_neighbours(tiny_llm_path):
    spec = LLMSpec(model=tiny_llm_path, max_length=24, device="cpu")
    recording = RecordingBackend(make_backend(spec), delay_s=0.3)
    too_long = "stone " * 100
    bodies = [{"texts": ["x"]}, {"texts": [too_long]}, {"texts": ["Health 9."]}]
    with serve_in_background(create_app(recording, spec, max_batch=8, max_wait_ms=50)) as base:
        with ThreadPoolExecutor(1) as pool:  # keep the model busy, so the next three queue up
            first = pool.submit(post_json, base, {"texts": ["warm"]})
            while not recording.calls:
                time.sleep(0.005)
            answers = fire_concurrently(base, bodies)
            assert first.result().status_code == 200
    assert answers[1].status_code == 422 and "max_length" in answers[1].json()["detail"], answers[1].text
    assert answers[0].status_code == answers[2].status_code == 200
    assert any(too_long in call and len(call) > 1 for call in recording.calls), recording.calls
    np.testing.assert_allclose(answers[0].json()["vectors"], recording.inner.hidden_states(["x"]),
                               atol=ATOL, rtol=0)


def test_model_failure_is_a_500_with_the_reason_and_the_client_raises(backend, spec):
    failing = RecordingBackend(backend, fail_marker="boom", failure=RuntimeError("CUDA out of memory"))
    with serve_in_background(create_app(failing, spec)) as base:
        answer = post_json(base, {"texts": ["boom"]})
        assert answer.status_code == 500 and "CUDA out of memory" in answer.json()["detail"]
        assert post_json(base, {"texts": ["fine"]}).status_code == 200  # the worker survived
        with HiddenStateClient(base) as c, pytest.raises(LLMError, match="HTTP 500.*out of memory"):
            c.hidden_states(["boom"])


# ----------------------------------------------------------------------------------------------
# Bad input: 4xx with a clear message, never a 500
# ----------------------------------------------------------------------------------------------


def classic_obs(n: int = 1) -> list[list[float]]:
    return synthetic_observations(CLASSIC, n).tolist()


BAD_REQUESTS = [
    # (name, raw body, JSON value or a function making one, expected status, detail pattern)
    ("malformed json", b'{"texts": ["a"', 400, r"not valid JSON"),
    ("not json at all", b"\xff\xfe garbage", 400, r"not valid JSON"),
    ("empty body", b"", 422, r"body is missing"),
    ("json list", [1, 2], 422, r"dictionary or object"),
    ("neither field", {}, 422, r"exactly one of 'texts' or 'observations'"),
    ("both fields", {"texts": ["a"], "env": CLASSIC, "observations": [[0.0]]}, 422, r"not both"),
    ("empty texts", {"texts": []}, 422, r"texts: .*at least 1"),
    ("empty observations", {"env": CLASSIC, "observations": []}, 422, r"observations: .*at least 1"),
    ("oversized texts", {"texts": ["a"] * 9}, 413, r"9 texts .* max batch of 8; split"),
    ("oversized observations", {"env": CLASSIC, "observations": [[0.0]] * 9}, 413, r"9 observations"),
    ("texts not a list", {"texts": "abc"}, 422, r"texts: Input should be a valid list"),
    ("text not a string", {"texts": ["a", 3]}, 422, r"texts\.1: .*valid string"),
    ("typo in field", {"text": ["a"]}, 422, r"text: Extra inputs are not permitted"),
    ("observations without env", {"observations": [[0.0]]}, 422, r"need 'env'"),
    ("env with texts", {"texts": ["a"], "env": CLASSIC}, 422, r"'env' goes with 'observations'"),
    ("unknown env", {"env": "Pong-v5", "observations": [[0.0]]}, 422, r"no text renderer for env 'Pong-v5'"),
    ("pixel env", {"env": "Craftax-Classic-Pixels-v1", "observations": [[0.0]]}, 422,
     r"gives pixels; use Craftax-Classic-Symbolic-v1"),
    ("wrong obs length", {"env": CLASSIC, "observations": [[0.0] * 100]}, 422,
     r"observation 0 has 100 values, but Craftax-Classic-Symbolic-v1 observations have 1345"),
    ("full env, classic obs", lambda: {"env": FULL, "observations": classic_obs()}, 422,
     r"has 1345 values, but Craftax-Symbolic-v1 observations have 8268; is 'env' right"),
    ("ragged observations", lambda: {"env": CLASSIC, "observations": [classic_obs()[0], [0.0] * 1344]},
     422, r"observation 1 has 1344"),
    ("observation value not a number", {"env": CLASSIC, "observations": [["a"]]}, 422,
     r"observations\.0\.0: .*valid number"),
    # Python's json writes NaN, and the server's JSON parser accepts it: the renderer must refuse.
    ("NaN in observation", lambda: {"env": CLASSIC, "observations": [[math.nan] + classic_obs()[0][1:]]},
     422, r"NaN or infinite"),
    ("return_texts not bool", {"texts": ["a"], "return_texts": "maybe"}, 422, r"return_texts"),
    # json.dumps writes a lone surrogate as the escape \ud800, valid JSON that no tokeniser can encode
    ("lone surrogate in a text", {"texts": ["ok", "a\ud800"]}, 422,
     r"text 1 is not valid Unicode: lone surrogate '\\ud800' at character 1"),
    ("lone surrogate in a field name", {"texts": ["a"], "\udc00": 1}, 422, r"valid string|Extra inputs"),
    ("lone surrogate as env", {"env": "\ud800", "observations": [[0.0]]}, 422, r"env"),
    ("text over max chars", {"texts": ["a", "b" * 40_000]}, 413,
     r"text 1 has 40,000 characters, more than this server's limit of 32,768 \(--max-text-chars\)"),
    ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, 400, r"parsing the body"),
]


@pytest.mark.parametrize("name,body,status,pattern", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_with_a_clear_message(url, name, body, status, pattern):
    body = body() if callable(body) else body
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = httpx.post(url + URL_PATH, content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert re.search(pattern, detail), detail
    assert len(answer.content) < 4000  # inputs are not echoed back


def test_format_and_timeout_mistakes_are_4xx(http):
    answer = http.post(URL_PATH + "?format=f64", json={"texts": ["a"]})
    assert answer.status_code == 422 and "format" in answer.json()["detail"], answer.text
    answer = http.post(URL_PATH + "?format=f16", json={"texts": ["a"], "return_texts": True})
    assert answer.status_code == 422 and "return_texts needs the JSON answer" in answer.json()["detail"]
    for bad in ("soon", "-1", "0", "nan", "inf"):
        answer = http.post(URL_PATH, json={"texts": ["a"]}, headers={"X-Timeout-S": bad})
        assert answer.status_code == 400 and "X-Timeout-S must be a positive number" in answer.json()[
            "detail"], (bad, answer.text)


def test_unknown_routes_and_methods_are_4xx(http):
    assert http.get(URL_PATH).status_code == 405
    assert http.post("/v1/nothing", json={}).status_code == 404


def test_validation_messages_cap_the_number_of_reported_errors():
    errors = [{"type": "float_parsing", "loc": ("body", "observations", 0, i),
               "msg": "Input should be a valid number", "input": "x"} for i in range(500)]
    status, body = validation_error_answer(errors)
    assert status == 422 and "(and 497 more)" in body["detail"] and len(body["errors"]) == 10


def _random_value(rng: random.Random, depth: int = 0):
    """Any JSON value, biased towards near-misses of the schema's field types."""
    kinds = ["null", "bool", "int", "float", "str", "list", "dict", "obs", "texts"]
    kind = rng.choice(kinds if depth < 2 else kinds[:5])
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**40, rng.randint(-5, 5)])
    if kind == "float":
        return rng.choice([0.5, -1e30, 1e308, rng.random()])
    if kind == "str":
        return rng.choice(["", "a", CLASSIC, FULL, "Craftax-Pixels-v1", "\u00e9\u2603" * rng.randint(0, 3),
                           "\ud800", "a\udfff b"])
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        return {rng.choice(["texts", "env", "x", "\ud83d"]): _random_value(rng, depth + 1)}
    if kind == "obs":
        length = rng.choice([0, 1, 1345, 1346, 8268])
        return [[rng.choice([0.0, 1.0, 0.5])] * length for _ in range(rng.randint(0, 2))]
    return [rng.choice(["a", "Health 9.", "", "\ud800", "\ud83d\ude00"]) for _ in range(rng.randint(0, 10))]


def _fuzzed_body(rng: random.Random, valid: list[dict]) -> dict:
    """A valid request with 0-2 random mutations: a field dropped, added or given another value."""
    body = json.loads(json.dumps(rng.choice(valid)))
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        field = rng.choice(["texts", "observations", "env", "return_texts", "extra"])
        action = rng.choice(["drop", "set", "set"])
        if action == "drop":
            body.pop(field, None)
        else:
            body[field] = _random_value(rng)
    return body


def test_fuzzed_requests_never_get_a_5xx(url):
    """Mutations of valid requests (fields dropped, added, given wrong-typed or near-miss values)
    and random bytes: only 200/4xx come back, every error has a one-line detail, every success
    matches the response model."""
    rng = random.Random(0)
    valid = [{"texts": ["Health 9.", "a"]}, {"texts": ["x"], "return_texts": True},
             {"env": CLASSIC, "observations": classic_obs(2)},
             {"env": FULL, "observations": synthetic_observations(FULL, 1).tolist()}]
    seen: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(150):
            body = _fuzzed_body(rng, valid)  # json.dumps escapes lone surrogates; httpx would refuse them
            answer = c.post(URL_PATH, content=json.dumps(body).encode(),
                            headers={"content-type": "application/json"})
            seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
            assert answer.status_code in (200, 400, 413, 422), (body, answer.text)
            if answer.status_code == 200:
                parsed = HiddenStatesResponse.model_validate(answer.json())
                assert np.array(parsed.vectors).shape == (parsed.count, parsed.dim)
            else:
                detail = answer.json()["detail"]
                assert isinstance(detail, str) and detail and "\n" not in detail
        for _ in range(20):
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
            answer = c.post(URL_PATH, content=junk, headers={"content-type": "application/json"})
            assert answer.status_code in (400, 422), answer.text
    assert seen.get(200, 0) > 10 and seen.get(422, 0) > 10, seen  # the fuzz reached both sides


# ----------------------------------------------------------------------------------------------
# OpenAPI schema
# ----------------------------------------------------------------------------------------------


def test_openapi_schema_lists_the_typed_models(http):
    schema = http.get("/openapi.json").json()
    models = schema["components"]["schemas"]
    for name in ("HiddenStatesRequest", "HiddenStatesResponse", "HealthResponse", "StatsResponse",
                 "ErrorResponse"):
        assert name in models
    request = models["HiddenStatesRequest"]
    assert {"texts", "observations", "env", "return_texts"} <= set(request["properties"])
    assert request["additionalProperties"] is False
    env_choices = [s for s in request["properties"]["env"]["anyOf"] if "enum" in s][0]["enum"]
    assert env_choices == list(TEXT_ENV_NAMES)
    assert {"vectors", "model", "layer", "pooling", "dim"} <= set(models["HiddenStatesResponse"]["required"])
    post = schema["paths"][URL_PATH]["post"]
    ref = lambda code: post["responses"][code]["content"]["application/json"]["schema"]["$ref"]  # noqa: E731
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/HiddenStatesRequest")
    assert ref("200").endswith("/HiddenStatesResponse")
    for code in ("400", "413", "422", "500"):  # our error shape, not FastAPI's default one
        assert ref(code).endswith("/ErrorResponse")
    assert "HTTPValidationError" not in models
    assert schema["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]["$ref"].endswith("/HealthResponse")


_JSON_TYPES = {"array": list, "null": type(None), "string": str}


def _branch_matches(branch: dict, body: dict) -> bool:
    """JSON Schema's ``required`` and ``properties``/``type``, the only keywords the branches use
    (asserted), so no schema validator needs installing."""
    assert set(branch) <= {"title", "required", "properties"}
    return all(key in body for key in branch["required"]) and all(
        isinstance(body[key], _JSON_TYPES[rule["type"]]) for key, rule in branch["properties"].items() if key in body)


def test_openapi_request_schema_says_exactly_one_of_texts_or_observations(http):
    """A schema that allowed both let generated clients and schema fuzzers send bodies the server
    refuses; now the schema's oneOf and the server agree on each body, and the refusals stay one line."""
    request = http.get("/openapi.json").json()["components"]["schemas"]["HiddenStatesRequest"]
    branches = request["oneOf"]
    assert [sorted(b["required"]) for b in branches] == [["texts"], ["env", "observations"]]
    obs = classic_obs(1)
    bodies = [
        ({"texts": ["a"]}, 200), ({"env": CLASSIC, "observations": obs}, 200),
        ({"texts": ["a"], "observations": None, "env": None}, 200),
        ({"texts": None, "env": CLASSIC, "observations": obs, "return_texts": True}, 200),
        ({"texts": ["a"], "env": CLASSIC, "observations": obs}, 422),  # both
        ({"texts": ["a"], "observations": obs}, 422),  # both, without env
        ({}, 422), ({"return_texts": True}, 422), ({"texts": None, "observations": None}, 422),  # neither
        ({"observations": obs}, 422), ({"texts": ["a"], "env": CLASSIC}, 422),
    ]
    for body, status in bodies:
        matched = sum(_branch_matches(branch, body) for branch in branches)
        assert (matched == 1) == (status == 200), (body, matched)
        answer = http.post(URL_PATH, json=body)
        assert answer.status_code == status, (body, answer.text)
        if status == 422:
            detail = answer.json()["detail"]
            assert isinstance(detail, str) and detail and "\n" not in detail, detail


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------


def test_client_round_trip(client, backend, spec):
    info = client.info()
    assert (info["model"], info["layer"], info["pooling"], info["dim"]) == (
        spec.model, spec.layer, spec.pooling, backend.hidden_size)
    assert client.hidden_size == backend.hidden_size and client.num_layers == backend.num_layers
    assert client.spec.template_hash() == spec.template_hash()
    states = client.hidden_states(TEXTS)
    assert states.dtype == np.float32 and states.shape == (len(TEXTS), backend.hidden_size)
    np.testing.assert_allclose(states, backend.hidden_states(TEXTS), atol=ATOL, rtol=0)
    assert client.hidden_states([]).shape == (0, backend.hidden_size)


def test_server_reports_the_resolved_feature_identity(http, url, client, backend, spec):
    """/health, JSON and binary answers carry what the backend resolved (backend, compute dtype,
    model revision), so a run recorded in process and one through the server compare equal, and
    one recorded in bf16 refuses fp32 server features."""
    from online_rl_llm.features import check_same_identity, encoder_identity

    health = http.get("/health").json()
    assert {k: health[k] for k in RESOLVED_FIELDS} == backend.identity
    assert health["compute_dtype"] == "float32" and health["model_revision"] == model_revision(spec.model)
    assert health["thinking"] is False
    answer = http.post(URL_PATH, json={"texts": TEXTS[:1]}).json()
    assert {k: answer[k] for k in RESOLVED_FIELDS} == backend.identity
    binary = http.post(URL_PATH + "?format=f32", json={"texts": TEXTS[:1]})
    assert (binary.headers["x-backend"], binary.headers["x-compute-dtype"], binary.headers["x-model-revision"]) \
        == (backend.identity["backend"], "float32", backend.identity["model_revision"])
    assert client.identity == backend.identity
    via_server, in_process = encoder_identity(client, url), encoder_identity(backend)
    assert {**via_server, "source": None, "url": None} == {**in_process, "source": None, "url": None}
    check_same_identity(in_process, via_server, "run folder")  # a run may move to the server
    with pytest.raises(UserError, match="compute_dtype: 'bfloat16' -> 'float32'"):
        check_same_identity({**in_process, "compute_dtype": "bfloat16"}, via_server, "run folder")
    with pytest.raises(UserError, match="backend: 'vllm' -> 'transformers'"):
        check_same_identity({**in_process, "backend": "vllm"}, via_server, "run folder")
    thinking = spec.replace(thinking=True)  # in the template hash: the client must rebuild it
    with serve_in_background(create_app(backend, thinking)) as base, HiddenStateClient(base) as c:
        assert c.spec.thinking and c.spec.template_hash() == thinking.template_hash() != spec.template_hash()


def test_client_observations_and_backend_protocol(client, backend):
    obs = synthetic_observations(CLASSIC, 5, seed=2)
    expected = observation_features(backend, obs, CLASSIC)
    np.testing.assert_allclose(client.observation_hidden_states(obs, CLASSIC), expected, atol=ATOL, rtol=0)
    # The client stands in for a backend wherever features are computed from texts.
    np.testing.assert_allclose(observation_features(client, obs, CLASSIC), expected, atol=ATOL, rtol=0)


def test_client_splits_big_batches_to_the_servers_max_batch(backend, spec):
    recording = RecordingBackend(backend)
    texts = [f"text number {i}" for i in range(10)]
    obs = synthetic_observations(CLASSIC, 9, seed=3)
    with serve_in_background(create_app(recording, spec, max_batch=4, max_wait_ms=0)) as base:
        with HiddenStateClient(base, wire="f32") as c:
            states = c.hidden_states(texts)
            assert httpx.get(base + "/v1/stats").json()["requests"] == 3  # 4 + 4 + 2
            obs_states = c.observation_hidden_states(obs, CLASSIC)
    assert sorted(len(call) for call in recording.calls[:3]) == [2, 4, 4]  # sent concurrently
    assert sorted(len(call) for call in recording.calls[3:]) == [1, 4, 4]
    np.testing.assert_allclose(states, backend.hidden_states(texts), atol=ATOL, rtol=0)
    np.testing.assert_allclose(obs_states, observation_features(backend, obs, CLASSIC), atol=ATOL, rtol=0)


def test_client_raises_on_rejected_input(client):
    with pytest.raises(LLMError, match=r"HTTP 422: observation 0 has 100 values.*1345"):
        client.observation_hidden_states(np.zeros((2, 100), np.float32), CLASSIC)
    with pytest.raises(LLMError, match="batch"):
        client.observation_hidden_states(np.zeros(1345, np.float32), CLASSIC)
    with pytest.raises(TypeError):
        client.hidden_states("one string")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_raises_when_the_server_is_down(backend, spec):
    with pytest.raises(LLMError, match=r"cannot reach the hidden-state server at http://127\.0\.0\.1"):
        HiddenStateClient(f"http://127.0.0.1:{_free_port()}", timeout=5).hidden_states(["a"])
    with serve_in_background(create_app(backend, spec)) as base:
        c = HiddenStateClient(base, timeout=5)
        assert c.hidden_states(["a"]).shape == (1, backend.hidden_size)
    # The server stopped while the client held a keep-alive connection: an error, never zeros.
    with pytest.raises(LLMError, match="cannot reach"):
        c.hidden_states(["a"])
    with pytest.raises(LLMError, match="http://"):
        HiddenStateClient("localhost:8000")


def test_client_reports_a_wrong_server(backend, spec):
    with serve_in_background(create_app(backend, spec)) as base:
        with pytest.raises(LLMError, match="HTTP 404"):
            HiddenStateClient(base + "/not-here").hidden_states(["a"])


def test_benchmark_load_generator_counts_what_the_server_answers(backend, spec):
    import asyncio

    from benchmarks.server_throughput import StandInBackend, load, payloads

    obs = synthetic_observations(CLASSIC, 6, seed=4)
    texts = [f"text {i}" for i in range(6)]
    recording = RecordingBackend(backend)
    with serve_in_background(create_app(recording, spec, max_batch=8, max_wait_ms=0)) as base:
        row = asyncio.run(load(base, payloads("texts", texts, obs, 2), concurrency=3, seconds=0.3))
        stats = httpx.get(base + "/v1/stats").json()
        f16_row = asyncio.run(load(base, payloads("texts", texts, obs, 3), concurrency=2, seconds=0.3,
                                   fmt="f16"))
        obs_row = asyncio.run(load(base, payloads("observations", texts, obs, 3), concurrency=2,
                                   seconds=0.3))
    assert row["requests"] == stats["requests"] and row["texts"] == 2 * row["requests"] > 0
    assert row["p50_ms"] <= row["p95_ms"]
    assert obs_row["texts"] == 3 * obs_row["requests"] > 0
    assert f16_row["format"] == "f16" and f16_row["texts"] == 3 * f16_row["requests"] > 0
    assert StandInBackend(896).hidden_states(["a", "b"]).shape == (2, 896)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--layer", "--pooling", "--host", "--port", "--max-batch",
                 "--max-wait-ms", "--device", "--preset", "--max-body-mb", "--max-text-chars",
                 "--max-queue", "--request-timeout-s", "--unhealthy-after"):
        assert flag in text
    assert "127.0.0.1" in text


def test_cli_user_errors_exit_2_with_one_line(tmp_path, tiny_llm_path, capsys):
    for argv, message in [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", tiny_llm_path, "--max-batch", "0"], "--max-batch must be"),  # at least 1 / positive
        (["--model", tiny_llm_path, "--layer", "7"], "layer 7 is out of range"),
        (["--model", tiny_llm_path, "--max-queue", "0"], "--max-queue must be"),
        (["--model", tiny_llm_path, "--request-timeout-s", "0"], "--request-timeout-s must be more than 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--port", "0"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit):
            main(["--model", tiny_llm_path, "--port", str(taken.getsockname()[1])])
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def start_cli_server(model_path: str) -> tuple[subprocess.Popen, str]:
    """``python -m servers.hidden_state_server --model PATH --preset debug`` on a free port, as a user
    starts it: the process and the URL it said it serves on."""
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "servers.hidden_state_server", "--model", model_path,
         "--preset", "debug", "--port", "0", "--log-level", "warning"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(root)})
    base = next((m.group(1) for line in process.stdout if (m := re.search(r"serving on (http://\S+)", line))), None)
    if base is None:
        process.kill()
        pytest.fail(f"the server never said where it listens: {process.communicate(timeout=30)[0][-2000:]}")
    return process, base


def test_one_command_starts_a_working_server(tiny_llm_path, backend):
    """`python -m servers.hidden_state_server --model PATH` serves; SIGTERM stops it cleanly."""
    process, base = start_cli_server(tiny_llm_path)
    try:
        health = httpx.get(base + "/health", timeout=30).json()
        assert health["max_batch"] == 16  # the debug preset
        body = post_json(base, {"texts": TEXTS}).json()
        np.testing.assert_allclose(body["vectors"], backend.hidden_states(TEXTS), atol=ATOL, rtol=0)
    finally:
        process.terminate()
        rest = process.communicate(timeout=30)[0]
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says why it stopped.
    assert process.returncode in (0, -signal.SIGTERM), rest
    assert "Traceback" not in rest, rest


# ----------------------------------------------------------------------------------------------
# Abuse: oversized bodies and texts, a full queue, deadlines, clients that leave, a broken model
# ----------------------------------------------------------------------------------------------

FAST_S = 1.0  # a refusal must come within a second, not after parsing or tokenising the input
MB = 1_000_000


def raw_post(base: str, chunks, *, length: int | None = None) -> tuple[int, dict, bytes, float]:
    """POST ``chunks`` on a raw socket, with ``Content-Length: length`` or (None) chunked, sent
    from a thread while the answer is read: (status, headers, body, seconds to the answer). A
    server that refuses a body early closes the connection; the sender then just stops."""
    parts = urlsplit(base)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    start = time.perf_counter()
    sock.sendall(f"POST {URL_PATH} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: "
                 f"application/json\r\n{framing}\r\n\r\n".encode())

    def pump():
        try:
            for chunk in chunks:
                sock.sendall(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if length is None:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    data = b""
    try:
        while True:
            head, _, rest = data.partition(b"\r\n\r\n")
            found = re.search(rb"(?im)^content-length:\s*(\d+)", head) if _ else None
            if found and len(rest) >= int(found.group(1)):
                break
            more = sock.recv(65536)
            if not more:
                break
            data += more
    finally:
        seconds = time.perf_counter() - start
        sock.close()
        sender.join(10)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, rest, seconds


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1)) / 1024


@pytest.fixture(scope="module")
def cli_server(tiny_llm_path):
    """The real command line in its own process, default limits: (url, pid) for RSS readings."""
    process, base = start_cli_server(tiny_llm_path)
    try:
        yield base, process.pid
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_huge_bodies_and_texts_are_refused_fast_and_memory_comes_back(cli_server):
    """Before the limits a 10 MB text took 36 s (tokenised in full) and +480 MB, and a 50 MB body
    cost +3 GB that was never returned. Now each is a 413 within a second, and RSS stays near
    its baseline."""
    base, pid = cli_server
    assert post_json(base, {"texts": TEXTS}).status_code == 200  # warm: first-request allocations
    baseline = rss_mb(pid)
    fifty = [b" " * MB] * 50
    status, headers, body, seconds = raw_post(base, fifty, length=50 * MB)  # declared: refused unread
    assert status == 413 and seconds < FAST_S, (status, body, seconds)
    assert b"over this server's limit of 32,000,000 bytes (--max-body-mb)" in body
    assert headers["connection"] == "close"
    status, _, body, seconds = raw_post(base, fifty)  # chunked: counted while it arrives
    assert status == 413 and b"sent chunked" in body and seconds < FAST_S, (status, body, seconds)
    ten_mb_text = json.dumps({"texts": ["x" * (10 * MB)]}).encode()
    for _ in range(2):
        status, _, body, seconds = raw_post(base, [ten_mb_text], length=len(ten_mb_text))
        assert status == 413 and b"10,000,000 characters" in body and seconds < FAST_S, (body, seconds)
    grown = rss_mb(pid) - baseline
    print(f"server RSS: baseline {baseline:.0f} MB, after the abuse {baseline + grown:.0f} MB")
    assert grown < 100, f"RSS grew by {grown:.0f} MB over a baseline of {baseline:.0f} MB"
    assert post_json(base, {"texts": TEXTS}).status_code == 200  # still serving
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_surrogate_and_malformed_input_are_refused_within_a_second(cli_server):
    base, _ = cli_server
    for raw, status in [(b'{"texts": ["\\ud800"]}', 422), (b'{"texts": [', 400), (b'{"texts": []}', 422),
                        (b'{"texts": 5}', 422), (json.dumps({"texts": ["a"] * 17}).encode(), 413)]:
        start = time.perf_counter()
        answer = httpx.post(base + URL_PATH, content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == status and time.perf_counter() - start < FAST_S, (raw[:40], answer.text)


def test_a_small_body_limit_applies_to_declared_and_chunked_bodies(backend, spec):
    with serve_in_background(create_app(backend, spec, limits=Limits(max_body_bytes=1000))) as base:
        small = json.dumps({"texts": ["a" * 900]}).encode()
        assert raw_post(base, [small], length=len(small))[0] == 200
        assert raw_post(base, [small[:500], small[500:]])[0] == 200  # chunked, under the limit
        big = json.dumps({"texts": ["a" * 1000]}).encode()
        assert raw_post(base, [big], length=len(big))[0] == 413
        assert raw_post(base, [big[:600], big[600:]])[0] == 413
    with pytest.raises(UserError, match="--max-queue must be at least 1"):
        create_app(backend, spec, limits=Limits(max_queue=0))


def _busy(recording: RecordingBackend, base: str, pool: ThreadPoolExecutor, text: str = "warm"):
    """Start a request and return its future once the model is computing it."""
    calls = len(recording.calls)
    future = pool.submit(post_json, base, {"texts": [text]})
    while len(recording.calls) == calls:
        time.sleep(0.005)
    return future


def test_a_full_queue_answers_429_with_retry_after(backend, spec):
    recording = RecordingBackend(backend)
    recording.gate = threading.Event()  # the model stays busy until the 429 has been seen
    app = create_app(recording, spec, max_batch=1, max_wait_ms=0, limits=Limits(max_queue=2))
    with serve_in_background(app) as base, ThreadPoolExecutor(4) as pool:
        first = _busy(recording, base, pool)  # computing: no longer queued
        queued = [pool.submit(post_json, base, {"texts": [f"q{i}"]}) for i in range(2)]
        while app.state.batcher.stats().queued < 2:
            time.sleep(0.005)
        start = time.perf_counter()
        refused = post_json(base, {"texts": ["one too many"]})
        assert refused.status_code == 429 and time.perf_counter() - start < FAST_S, refused.text
        assert "2 texts are already waiting for the model (limit 2)" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) >= 1
        recording.gate.set()
        assert [f.result().status_code for f in [first, *queued]] == [200] * 3
        stats = httpx.get(base + "/v1/stats").json()
    assert stats["rejected"] == 1 and stats["queued"] == 0
    assert ["one too many"] not in recording.calls


def test_client_retries_after_429(backend, spec):
    recording = RecordingBackend(backend)
    recording.gate = threading.Event()  # opened once the server has refused the client once
    app = create_app(recording, spec, max_batch=1, max_wait_ms=0, limits=Limits(max_queue=1))

    def open_after_a_refusal():
        while app.state.batcher.stats().rejected < 1 and not recording.gate.wait(0.01):
            pass
        recording.gate.set()

    with serve_in_background(app) as base, ThreadPoolExecutor(3) as pool:
        first = _busy(recording, base, pool)
        second = pool.submit(post_json, base, {"texts": ["queued"]})
        while app.state.batcher.stats().queued < 1:
            time.sleep(0.005)
        pool.submit(open_after_a_refusal)
        with HiddenStateClient(base, wire="f32", retries=3) as c:  # 429 first, then room
            states = c.hidden_states(["patient"])
        assert first.result().status_code == second.result().status_code == 200
        assert httpx.get(base + "/v1/stats").json()["rejected"] >= 1
    np.testing.assert_allclose(states, backend.hidden_states(["patient"]), atol=ATOL, rtol=0)


def test_a_request_past_its_deadline_gets_504_and_is_never_computed(backend, spec):
    recording = RecordingBackend(backend)
    recording.gate = threading.Event()
    app = create_app(recording, spec, max_batch=1, max_wait_ms=0, limits=Limits(request_timeout_s=30))
    with serve_in_background(app) as base, ThreadPoolExecutor(1) as pool:
        first = _busy(recording, base, pool)
        start = time.perf_counter()
        late = httpx.post(base + URL_PATH, json={"texts": ["late"]}, headers={"X-Timeout-S": "0.2"},
                          timeout=30)
        assert late.status_code == 504 and time.perf_counter() - start < FAST_S, late.text
        assert "not computed within 0.2 s" in late.json()["detail"]
        recording.gate.set()
        assert first.result().status_code == 200
        time.sleep(0.2)  # the worker has moved on past where "late" would have been
        stats = httpx.get(base + "/v1/stats").json()
    assert ["late"] not in recording.calls and stats["dropped"] == 1 and stats["queued"] == 0


def test_requests_of_disconnected_clients_are_dropped(backend, spec):
    recording = RecordingBackend(backend)
    recording.gate = threading.Event()
    app = create_app(recording, spec, max_batch=1, max_wait_ms=0)
    with serve_in_background(app) as base, ThreadPoolExecutor(1) as pool:
        first = _busy(recording, base, pool)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(base + URL_PATH, json={"texts": ["abandoned"]}, timeout=0.2)
        deadline = time.monotonic() + 5
        while app.state.batcher.stats().dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.batcher.stats().dropped == 1 and app.state.batcher.stats().queued == 0
        recording.gate.set()
        assert first.result().status_code == 200
        assert post_json(base, {"texts": ["after"]}).status_code == 200
    assert ["abandoned"] not in recording.calls and ["after"] in recording.calls


def test_health_turns_503_while_the_model_keeps_failing(backend, spec):
    failing = RecordingBackend(backend, fail_marker="boom", failure=RuntimeError("CUDA out of memory"))
    app = create_app(failing, spec, limits=Limits(unhealthy_after=2))
    with serve_in_background(app) as base:
        assert httpx.get(base + "/health").status_code == 200
        assert post_json(base, {"texts": ["boom 1"]}).status_code == 500
        assert httpx.get(base + "/health").status_code == 200  # one failure is not yet a pattern
        assert post_json(base, {"texts": ["boom 2"]}).status_code == 500
        health = httpx.get(base + "/health")
        assert health.status_code == 503, health.text
        body = HealthResponse.model_validate(health.json())
        assert body.status == "failing" and "last 2 model calls failed" in body.detail
        assert "RuntimeError: CUDA out of memory" in body.detail
        with pytest.raises(LLMError, match="HTTP 503: the last 2 model calls failed"):
            HiddenStateClient(base, retries=0).info()
        assert post_json(base, {"texts": ["fine"]}).status_code == 200  # it recovered
        assert httpx.get(base + "/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------------------------
# Binary answers
# ----------------------------------------------------------------------------------------------


def test_binary_answers_equal_the_json_one(http):
    as_json = np.array(http.post(URL_PATH, json={"texts": TEXTS}).json()["vectors"], np.float32)
    f32 = http.post(URL_PATH + "?format=f32", json={"texts": TEXTS})
    assert f32.headers["content-type"] == wire.BINARY_MEDIA_TYPE
    assert f32.headers["x-shape"] == f"{len(TEXTS)},{as_json.shape[1]}" and f32.headers["x-dtype"] == "float32"
    np.testing.assert_array_equal(wire.decode_vectors(f32.content, f32.headers), as_json)
    for f16 in (http.post(URL_PATH + "?format=f16", json={"texts": TEXTS}),
                http.post(URL_PATH, json={"texts": TEXTS}, headers={"accept": wire.BINARY_MEDIA_TYPE})):
        assert f16.headers["x-dtype"] == "float16" and len(f16.content) == as_json.size * 2
        np.testing.assert_array_equal(wire.decode_vectors(f16.content, f16.headers),
                                      as_json.astype(np.float16).astype(np.float32))


def test_wire_format_falls_back_to_float32_and_checks_lengths():
    states = np.array([[1.0, -2.5], [70000.0, 0.0]], np.float32)  # 70000 overflows float16
    body, headers = wire.encode_vectors(states, "f16")
    assert headers == {wire.SHAPE_HEADER: "2,2", wire.DTYPE_HEADER: "float32"}
    np.testing.assert_array_equal(wire.decode_vectors(body, headers), states)
    body, headers = wire.encode_vectors(states[:1], "f16")
    assert headers[wire.DTYPE_HEADER] == "float16" and len(body) == 4
    with pytest.raises(wire.WireError, match="truncated"):
        wire.decode_vectors(body[:-1], headers)
    with pytest.raises(wire.WireError, match="X-Shape"):
        wire.decode_vectors(body, {})


def test_client_wire_formats_agree_and_batches_go_concurrently(backend, spec):
    recording = RecordingBackend(backend, delay_s=0.1)
    texts = [f"text number {i}" for i in range(12)]
    app = create_app(recording, spec, max_batch=4, max_wait_ms=0)
    recording.probe = lambda: app.state.batcher.stats().queued  # texts waiting at each model call
    with serve_in_background(app) as base:
        answers = {}
        for fmt in ("json", "f32", "f16"):
            with HiddenStateClient(base, wire=fmt, concurrency=1) as c:
                answers[fmt] = c.hidden_states(texts)
        assert max(recording.probed) == 0  # one request at a time: nothing ever waits
        recording.probed.clear()
        with HiddenStateClient(base, wire="f16", concurrency=3) as c:
            concurrent = c.hidden_states(texts)
    assert max(recording.probed) > 0  # requests waited for the model: they were in flight together
    np.testing.assert_array_equal(answers["f32"], answers["json"])
    np.testing.assert_array_equal(answers["f16"], answers["json"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(concurrent, answers["f16"])
    with pytest.raises(LLMError, match="wire must be one of"):
        HiddenStateClient(base, wire="f64")
