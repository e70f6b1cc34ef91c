"""Image features: the tiny random VLM, the transformers and vLLM (stand-in) backends, frames
through the server and the client, their limits and the text/image identity refusals."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import struct
import sys
import types
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

import servers.images as images
import utils.llm.vision_vllm as vision_vllm
import utils.llm.vllm_engine as vllm_engine
from servers.hidden_state_server import create_app, serve_in_background
from servers.limits import Limits
from utils.frames import FrameError, as_uint8_frames, decode_png, encode_png, png_dimensions
from utils.hidden_state_client import HiddenStateClient
from utils.hidden_state_client import main as client_main
from utils.llm import (
    LLMError,
    LLMSpec,
    check_identity,
    feature_identity,
    frame_features,
    make_backend,
    model_revision,
)
from utils.llm.prompts import FRAME_ENV_NAMES, FRAME_PROMPTS, frame_family, frame_prompt
from utils.testing.tiny_vlm import IMAGE_TOKENS, build_tiny_vlm
from utils.testing.tiny_vlm import main as tiny_vlm_main

CLASSIC, FULL, TETRIS = "Craftax-Classic-Pixels-v1", "Craftax-Pixels-v1", "Tetris-Direct-Standard-v0"
IMAGE_PATH, TEXT_PATH = "/v1/image_hidden_states", "/v1/hidden_states"
ATOL = 1e-5
POOLINGS = ("last", "mean", "image_mean")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory) -> str:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def backends(vlm_path) -> dict:
    return {p: make_backend(LLMSpec(model=vlm_path, pooling=p, device="cpu", batch_size=4)) for p in POOLINGS}


def random_frames(n: int, height: int = 63, width: int = 63, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_model(vlm_path):
    """(processor, model): the same checkpoint loaded plainly, for computing expectations by hand."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(vlm_path), AutoModelForImageTextToText.from_pretrained(vlm_path).eval()


def token_states(hf_model, prompt: str, frame: np.ndarray):
    """(token ids, tuple of [tokens, D] states per hidden_states index) of one prompt and frame."""
    import torch
    from PIL import Image

    processor, model = hf_model
    inputs = processor(text=[prompt], images=[[Image.fromarray(frame)]], return_tensors="pt")
    with torch.inference_mode():
        out = model.model(**inputs, output_hidden_states=True)
    return inputs["input_ids"][0].tolist(), tuple(h[0].numpy() for h in out.hidden_states)


# ----------------------------------------------------------------------------------------------
# The tiny VLM and the transformers backend
# ----------------------------------------------------------------------------------------------


def test_tiny_vlm_builds_offline_the_same_files_every_time(vlm_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = tiny_vlm_main([str(tmp_path / "again")])
    assert capsys.readouterr().out.strip() == again
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert (Path(again) / name).read_bytes() == (Path(vlm_path) / name).read_bytes(), name
    assert model_revision(again) == model_revision(vlm_path)
    with pytest.raises(SystemExit):
        tiny_vlm_main(["--help"])
    assert not (tmp_path / "--help").exists()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_features_are_deterministic_of_the_models_dim_and_batch_independent(backends, pooling):
    backend = backends[pooling]
    frames = random_frames(5)
    feats = frame_features(backend, frames, CLASSIC)
    assert feats.dtype == np.float32 and feats.shape == (5, backend.hidden_size) == (5, 32)
    assert np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, frame_features(backend, frames, CLASSIC))
    np.testing.assert_allclose(frame_features(backend, frames[2:3], CLASSIC), feats[2:3], atol=ATOL, rtol=0)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3, "different frames must give different features"
    # Env pixel observations (floats k / 255) are the same frames.
    np.testing.assert_array_equal(frame_features(backend, frames / np.float32(255), CLASSIC), feats)
    # Frames of several envs and sizes in one call: each batch holds one env and size.
    full = random_frames(2, 130, 110, seed=1)
    mixed = backend.image_hidden_states([frames[0], full[0], frames[1], full[1]], [CLASSIC, FULL, CLASSIC, FULL])
    np.testing.assert_allclose(mixed[[0, 2]], feats[:2], atol=ATOL, rtol=0)
    np.testing.assert_allclose(mixed[[1, 3]], frame_features(backend, full, FULL), atol=ATOL, rtol=0)
    assert backend.image_hidden_states(np.zeros((0, 63, 63, 3), np.uint8), CLASSIC).shape == (0, 32)


def test_identity_names_backend_revision_pooling_layer_and_modality(backends, vlm_path):
    backend = backends["image_mean"]
    identity = feature_identity(backend.spec, backend)
    assert {k: identity[k] for k in ("backend", "compute_dtype", "model_revision", "modality", "pooling",
                                      "layer", "layer_index", "dim")} == {
        "backend": "transformers", "compute_dtype": "float32", "model_revision": model_revision(vlm_path),
        "modality": "image", "pooling": "image_mean", "layer": -1, "layer_index": 2, "dim": 32}
    assert identity["image_processor"].startswith("Gemma3ImageProcessor")
    # The frame prompts are part of the template hash: image and text features never share one.
    assert identity["template_hash"] == backend.spec.template_hash() != backend.spec.replace(
        modality="text").template_hash()
    assert backend.spec.to_manifest()["modality"] == "image"
    assert LLMSpec.from_manifest(backend.spec.to_manifest()).template_hash() == identity["template_hash"]


def test_image_mean_averages_the_image_tokens_and_layers_index_hidden_states(backends, vlm_path, hf_model):
    frame = random_frames(1, seed=3)
    prompt = backends["last"].prompts.prompt(CLASSIC)
    ids, states = token_states(hf_model, prompt, frame[0])
    image = np.asarray(ids) == hf_model[1].config.image_token_index
    assert image.sum() == IMAGE_TOKENS
    last, mean, image_mean = (frame_features(backends[p], frame, CLASSIC)[0] for p in POOLINGS)
    np.testing.assert_allclose(image_mean, states[-1][image].mean(0), atol=ATOL, rtol=0)
    np.testing.assert_allclose(last, states[-1][-1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(mean, states[-1].mean(0), atol=ATOL, rtol=0)
    assert np.abs(last - image_mean).max() > 1e-3 and np.abs(mean - image_mean).max() > 1e-3
    for layer in (0, 1):  # the embeddings (image merged in), and layer 1 from a truncated model
        backend = make_backend(LLMSpec(model=vlm_path, layer=layer, pooling="image_mean", device="cpu"))
        assert backend.loaded_layers == 1
        np.testing.assert_allclose(frame_features(backend, frame, CLASSIC)[0], states[layer][image].mean(0),
                                   atol=ATOL, rtol=0)


def test_one_prompt_per_env_family(backends, vlm_path):
    from utils.envs import ENV_NAMES

    assert FRAME_ENV_NAMES == ENV_NAMES  # the static list the server publishes is the registry's
    assert {frame_family(e) for e in ENV_NAMES} == set(FRAME_PROMPTS) == {"craftax-classic", "craftax", "tetris"}
    builder = backends["last"].prompts
    prompts = {family: builder.prompt(env) for env, family in ((CLASSIC, "craftax-classic"), (FULL, "craftax"),
                                                               (TETRIS, "tetris"))}
    for family, prompt in prompts.items():
        words = FRAME_PROMPTS[family]
        assert words.system in prompt and words.question in prompt and prompt.count("<start_of_image>") == 1
        assert prompt.index("<start_of_image>") < prompt.index(words.question)  # the image, then the question
    assert len(set(prompts.values())) == 3
    assert frame_prompt("Craftax-Classic-Symbolic-v1") == frame_prompt(CLASSIC)  # family, not obs type
    custom = make_backend(LLMSpec(model=vlm_path, system_prompt="Be brief.", template="Q: {text}", device="cpu"))
    prompt = custom.prompts.prompt(TETRIS)
    assert "Be brief." in prompt and "Q: " + FRAME_PROMPTS["tetris"].question in prompt
    assert FRAME_PROMPTS["tetris"].system not in prompt
    with pytest.raises(LLMError, match="unknown env 'Pong-v5' for frames"):
        frame_features(backends["last"], random_frames(1), "Pong-v5")


def test_text_and_image_features_refuse_each_other(backends, vlm_path, tiny_llm_path):
    with pytest.raises(LLMError, match="computes image features .* send frames"):
        backends["last"].hidden_states(["Health 9."])
    with pytest.raises(LLMError, match="has no vision tower"):
        make_backend(LLMSpec(model=tiny_llm_path, modality="image"))
    with pytest.raises(LLMError, match="image_mean averages an image's tokens"):
        make_backend(LLMSpec(model=tiny_llm_path, pooling="image_mean"))
    with pytest.raises(LLMError, match="transformers or vllm backend, not sglang"):
        make_backend(LLMSpec(model=vlm_path, backend="sglang"))
    with pytest.raises(LLMError, match="unknown modality"):
        LLMSpec(model=vlm_path, modality="audio").validate()
    # A record made before modality existed is of text features: image features differ from it.
    with pytest.raises(LLMError, match="modality: 'text' -> 'image'"):
        check_identity({"model": "m"}, {"model": "m", "modality": "image"}, ["model", "modality"],
                       subject="the run", fix="start a new one")
    assert check_identity({"model": "m"}, {"model": "m", "modality": "text"}, ["modality"], subject="x", fix="y") == []


def test_frames_convert_exactly_and_pngs_are_checked_before_decoding():
    frames = random_frames(2)
    np.testing.assert_array_equal(as_uint8_frames(frames.astype(np.float32) / 255), frames)
    np.testing.assert_array_equal(decode_png(encode_png(frames[0])), frames[0])
    assert png_dimensions(encode_png(random_frames(1, 130, 110)[0])) == (110, 130)  # (width, height)
    for bad, message in [(frames[0], "batch"), (frames[..., :2], r"\[height, width, 3\]"),
                         (frames * 2.0, r"outside \[0, 1\]"), (frames.astype(np.int64) + 300, "dtype")]:
        with pytest.raises(FrameError, match=message):
            as_uint8_frames(bad)
    with pytest.raises(FrameError, match="not a PNG"):
        png_dimensions(b"GIF89a" + bytes(40))
    with pytest.raises(FrameError, match="does not decode"):
        decode_png(encode_png(frames[0])[:60])


# ----------------------------------------------------------------------------------------------
# vLLM, with a stand-in engine
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakePoolerConfig:
    """vLLM 0.32's PoolerConfig fields that this code sets."""

    task: str | None = None
    pooling_type: str | None = None
    seq_pooling_type: str | None = None
    tok_pooling_type: str | None = None
    use_activation: bool | None = None


def fake_vllm(monkeypatch, hf_model, *, unit_norm: bool = False) -> list[dict]:
    """A ``vllm`` module whose ``LLM`` records its options and answers multimodal requests with
    the plain transformers model's last-layer states."""
    import torch

    engines: list[dict] = []
    image_token = hf_model[1].config.image_token_index

    class FakeLLM:
        def __init__(self, **options):
            engines.append(options)
            self.options = options

        def _states(self, request):
            assert set(request) == {"prompt", "multi_modal_data"}
            image = request["multi_modal_data"]["image"]
            assert image.mode == "RGB" and request["prompt"].count("<start_of_image>") == 1
            ids, states = token_states(hf_model, request["prompt"], np.asarray(image))
            last = states[-1] / np.linalg.norm(states[-1], axis=1, keepdims=True) if unit_norm else states[-1]
            assert (np.asarray(ids) == image_token).sum() == IMAGE_TOKENS  # placeholders expanded
            return ids, last

        def embed(self, requests, use_tqdm=False):
            config = self.options["pooler_config"]
            assert config.use_activation is False and config.task is None
            rows = []
            for request in requests:
                _, states = self._states(request)
                rows.append(states[-1] if config.seq_pooling_type == "LAST" else states.mean(0))
            return [types.SimpleNamespace(outputs=types.SimpleNamespace(embedding=r.tolist())) for r in rows]

        def encode(self, requests, pooling_task=None, use_tqdm=False):
            config = self.options["pooler_config"]
            assert pooling_task == config.task == "token_embed" and config.tok_pooling_type == "ALL"
            assert config.use_activation is False
            results = []
            for request in requests:
                ids, states = self._states(request)
                results.append(types.SimpleNamespace(prompt_token_ids=ids,
                                                     outputs=types.SimpleNamespace(data=torch.tensor(states))))
            return results

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    config_module = types.ModuleType("vllm.config")
    config_module.PoolerConfig = FakePoolerConfig
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.config", config_module)
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: fake)
    return engines


@pytest.mark.parametrize("pooling", POOLINGS)
def test_vllm_builds_multimodal_requests_and_pools_like_transformers(backends, vlm_path, hf_model,
                                                                     monkeypatch, pooling):
    engines = fake_vllm(monkeypatch, hf_model)
    spec = LLMSpec(model=vlm_path, backend="vllm", pooling=pooling)
    backend = make_backend(spec, engine_options={"load_format": "dummy"})
    [options] = engines
    assert {k: options[k] for k in ("runner", "convert", "limit_mm_per_prompt", "max_model_len", "load_format")} \
        == {"runner": "pooling", "convert": "embed", "limit_mm_per_prompt": {"image": 1}, "max_model_len": 4096,
            "load_format": "dummy"}
    assert options["model"] == vlm_path and options["dtype"] == "bfloat16"
    frames = random_frames(3, seed=4)
    expected = frame_features(backends[pooling], frames, CLASSIC)
    np.testing.assert_allclose(frame_features(backend, frames, CLASSIC), expected, atol=ATOL, rtol=0)
    identity = feature_identity(backend.spec, backend)
    assert (identity["backend"], identity["modality"], identity["pooling"]) == ("vllm", "image", pooling)
    assert identity["image_processor"] == backends[pooling].identity["image_processor"]
    requests = vision_vllm.vllm_frame_requests(backend.prompts, frames[:1], [TETRIS])
    assert requests[0]["prompt"] == backends[pooling].prompts.prompt(TETRIS)
    np.testing.assert_array_equal(np.asarray(requests[0]["multi_modal_data"]["image"]), frames[0])
    with pytest.raises(LLMError, match="computes image features"):
        backend.hidden_states(["a"])
    backend.close()


def test_vllm_refuses_intermediate_layers_and_unit_norm_states(vlm_path, hf_model, monkeypatch):
    fake_vllm(monkeypatch, hf_model)
    with pytest.raises(LLMError, match="last layer only"):
        make_backend(LLMSpec(model=vlm_path, backend="vllm", layer=1))
    for pooling in ("last", "image_mean"):  # per token for image_mean: a mean of unit vectors is not one
        fake_vllm(monkeypatch, hf_model, unit_norm=True)
        with pytest.raises(LLMError, match="unit-norm"):
            make_backend(LLMSpec(model=vlm_path, backend="vllm", pooling=pooling))
    assert vision_vllm.vllm_frame_pooler_options("image_mean", ["pooling_type", "use_activation"]) == \
        {"pooling_type": "ALL", "use_activation": False}  # a release without tasks or split pooling types


# ----------------------------------------------------------------------------------------------
# The server and the client
# ----------------------------------------------------------------------------------------------

LIMITS = Limits(max_image_bytes=20_000, max_image_pixels=140 * 140)


@pytest.fixture(scope="module")
def vlm_url(backends):
    backend = backends["image_mean"]
    with serve_in_background(create_app(backend, backend.spec, max_batch=4, max_wait_ms=5, limits=LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def text_url(tiny_llm_path):
    spec = LLMSpec(model=tiny_llm_path, device="cpu")
    with serve_in_background(create_app(make_backend(spec), spec, max_batch=4)) as url:
        yield url


def png_json(frames, env=CLASSIC) -> dict:
    return {"env": env, "images": [base64.b64encode(encode_png(f)).decode() for f in frames]}


def raw_headers(shape, env=CLASSIC) -> dict:
    return {"content-type": "application/octet-stream", "X-Env": env, "X-Shape": ",".join(map(str, shape)),
            "X-Dtype": "uint8"}


def test_png_json_and_raw_frames_give_the_in_process_features(vlm_url, text_url, backends):
    frames = random_frames(3, seed=5)
    expected = frame_features(backends["image_mean"], frames, CLASSIC)
    raw = httpx.post(vlm_url + IMAGE_PATH, content=frames.tobytes(), headers=raw_headers(frames.shape))
    as_json = httpx.post(vlm_url + IMAGE_PATH, json=png_json(frames))
    one_png = httpx.post(vlm_url + IMAGE_PATH, content=encode_png(frames[1]),
                         headers={"content-type": "image/png", "X-Env": CLASSIC})
    for answer, rows in ((raw, frames), (as_json, frames), (one_png, frames[1:2])):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["count"] == len(rows) and body["modality"] == "image"
    np.testing.assert_allclose(raw.json()["vectors"], expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(as_json.json()["vectors"], expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(one_png.json()["vectors"], expected[1:2], atol=ATOL, rtol=0)
    # The same identity fields as a text answer, plus the image processor.
    text_answer = httpx.post(text_url + TEXT_PATH, json={"texts": ["a"]}).json()
    assert text_answer["modality"] == "text"
    assert set(raw.json()) == set(text_answer) | {"image_processor"}
    identity = feature_identity(backends["image_mean"].spec, backends["image_mean"])
    assert {k: raw.json()[k] for k in identity} == identity
    binary = httpx.post(vlm_url + IMAGE_PATH + "?format=f32", content=frames.tobytes(),
                        headers=raw_headers(frames.shape))
    assert (binary.headers["x-modality"], binary.headers["x-pooling"], binary.headers["x-image-processor"]) == (
        "image", "image_mean", identity["image_processor"])
    np.testing.assert_allclose(np.frombuffer(binary.content, "<f4").reshape(3, 32), expected, atol=ATOL, rtol=0)
    health = httpx.get(vlm_url + "/health").json()
    assert (health["modality"], health["envs"], health["max_image_pixels"]) == (
        "image", list(FRAME_ENV_NAMES), LIMITS.max_image_pixels)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR chunk claiming ``width`` x ``height``, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_size_limits_act_before_decoding(vlm_url, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("decoded an image the limits should have refused")

    monkeypatch.setattr(images, "decode_png", never)
    monkeypatch.setattr(images, "decode_frames", never)
    bomb = _png_claiming(50_000, 50_000)  # 33 bytes claiming 2.5 gigapixels
    answer = httpx.post(vlm_url + IMAGE_PATH, content=bomb, headers={"content-type": "image/png", "X-Env": CLASSIC})
    assert answer.status_code == 413 and "50000 x 50000 = 2,500,000,000 pixels" in answer.json()["detail"]
    assert "--max-image-pixels" in answer.json()["detail"]
    answer = httpx.post(vlm_url + IMAGE_PATH, json={"env": CLASSIC, "images": [base64.b64encode(bomb).decode()]})
    assert answer.status_code == 413, answer.text
    big = encode_png(random_frames(1, 100, 100)[0])  # noise compresses badly: about 30 kB
    assert len(big) > LIMITS.max_image_bytes
    answer = httpx.post(vlm_url + IMAGE_PATH, content=big, headers={"content-type": "image/png", "X-Env": CLASSIC})
    assert answer.status_code == 413 and "--max-image-mb" in answer.json()["detail"]
    monkeypatch.setattr(images.base64, "b64decode", never)  # a long base64 string: refused by its length
    answer = httpx.post(vlm_url + IMAGE_PATH, json={"env": CLASSIC, "images": ["A" * 40_000]})
    assert answer.status_code == 413, answer.text
    # Raw frames: the header's shape is checked before the body is looked at.
    answer = httpx.post(vlm_url + IMAGE_PATH, content=b"", headers=raw_headers((1, 200, 200, 3)))
    assert answer.status_code == 413 and "each frame is 200 x 200" in answer.json()["detail"]
    answer = httpx.post(vlm_url + IMAGE_PATH, content=b"", headers=raw_headers((5, 8, 8, 3)))
    assert answer.status_code == 413 and "5 frames in one request, more than this server's max batch of 4" in \
        answer.json()["detail"]


BAD_FRAMES = [
    # (name, body, headers, status, detail pattern)
    ("garbage as png", b"\x00garbage", {"content-type": "image/png", "X-Env": CLASSIC}, 422, r"image 0: it is not a PNG"),
    ("truncated png", encode_png(random_frames(1)[0])[:80], {"content-type": "image/png", "X-Env": CLASSIC}, 422,
     r"image 0: it does not decode as a PNG"),
    ("png without env", encode_png(random_frames(1)[0]), {"content-type": "image/png"}, 422, r"X-Env header"),
    ("unknown env", encode_png(random_frames(1)[0]), {"content-type": "image/png", "X-Env": "Pong-v5"}, 422,
     r"unknown env 'Pong-v5' for frames"),
    ("raw without dtype", bytes(192), {"content-type": "application/octet-stream", "X-Env": CLASSIC,
                                       "X-Shape": "1,8,8,3"}, 422, r"X-Dtype: uint8"),
    ("raw rgba", bytes(256), raw_headers((1, 8, 8, 4)), 422, r"N,height,width,3"),
    ("raw too short", bytes(191), raw_headers((1, 8, 8, 3)), 422, r"191 bytes does not hold uint8"),
    ("not base64", json.dumps({"env": CLASSIC, "images": ["!!"]}).encode(), {"content-type": "application/json"},
     422, r"image 0 is not valid base64"),
    ("base64 garbage", json.dumps({"env": CLASSIC, "images": ["AAAA"]}).encode(), {"content-type": "application/json"},
     422, r"image 0: it is not a PNG"),
    ("texts to the image endpoint", json.dumps({"texts": ["a"], "images": []}).encode(),
     {"content-type": "application/json"}, 422, r"texts and observations go to /v1/hidden_states"),
    ("json unknown env", json.dumps({"env": "Pong-v5", "images": ["AAAA"]}).encode(),
     {"content-type": "application/json"}, 422, r"unknown env 'Pong-v5' for frames"),
    ("json empty images", json.dumps({"env": CLASSIC, "images": []}).encode(), {"content-type": "application/json"},
     422, r"images: .*at least 1"),
    ("json not json", b"{", {"content-type": "application/json"}, 400, r"not valid JSON"),
    ("empty body", b"", {"content-type": "application/json"}, 422, r"body is missing"),
    ("other content type", b"abc", {"content-type": "text/plain"}, 415, r"not a frame format"),
]


@pytest.mark.parametrize("name,body,headers,status,pattern", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frames_get_a_4xx_with_one_line(vlm_url, name, body, headers, status, pattern):
    answer = httpx.post(vlm_url + IMAGE_PATH, content=body, headers=headers)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and re.search(pattern, detail), detail


def test_servers_refuse_the_other_modality(vlm_url, text_url, capsys):
    answer = httpx.post(vlm_url + TEXT_PATH, json={"texts": ["Health 9."]})
    assert answer.status_code == 422 and "computes image features" in answer.json()["detail"]
    assert IMAGE_PATH in answer.json()["detail"]
    answer = httpx.post(text_url + IMAGE_PATH, json=png_json(random_frames(1)))
    assert answer.status_code == 422 and "computes text features" in answer.json()["detail"]
    with HiddenStateClient(vlm_url) as client, pytest.raises(LLMError, match="computes image features"):
        client.hidden_states(["Health 9."])
    with HiddenStateClient(text_url) as client, pytest.raises(LLMError, match="computes text features"):
        client.image_hidden_states(random_frames(1), CLASSIC)
    with HiddenStateClient(text_url) as client:  # a text server's identity has no image fields
        assert client.modality == "text" and "modality" not in client.identity
    # The client's command line: texts to a text server; frames refused before any are built.
    assert client_main([text_url, "--texts", "Health 9.", "x"]).shape == (2, 32)
    with pytest.raises(SystemExit) as exit_info:
        client_main([text_url, "--env", "Craftax-Classic-Pixels-v1", "--frames", "2"])
    assert exit_info.value.code == 2 and "computes text features" in capsys.readouterr().err


def test_client_sends_frames_in_batches_raw_or_png(vlm_url, backends):
    frames = random_frames(6, seed=6)
    expected = frame_features(backends["image_mean"], frames, CLASSIC)
    with HiddenStateClient(vlm_url, wire="f32") as client:
        assert client.modality == "image" and client.identity == backends["image_mean"].identity
        assert client.spec.template_hash() == backends["image_mean"].spec.template_hash()
        np.testing.assert_allclose(client.image_hidden_states(frames, CLASSIC), expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(client.image_hidden_states(frames / np.float32(255), CLASSIC, encoding="png"),
                                   expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(frame_features(client, frames, CLASSIC), expected, atol=ATOL, rtol=0)
        assert client.image_hidden_states(np.zeros((0, 63, 63, 3), np.uint8), CLASSIC).shape == (0, 32)
        stats = httpx.get(vlm_url + "/v1/stats").json()
        assert max(int(size) for size in stats["batch_sizes"]) <= 4  # 6 frames went as 4 + 2
        with pytest.raises(LLMError, match="HTTP 413: each frame is 200 x 200"):
            client.image_hidden_states(random_frames(1, 200, 200), CLASSIC)
        with pytest.raises(LLMError, match="encoding must be"):
            client.image_hidden_states(frames, CLASSIC, encoding="jpeg")


def test_openapi_lists_the_frame_forms(vlm_url):
    schema = httpx.get(vlm_url + "/openapi.json").json()
    post = schema["paths"][IMAGE_PATH]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "image/png", "application/octet-stream"}
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImageHiddenStatesRequest")
    request = schema["components"]["schemas"]["ImageHiddenStatesRequest"]
    assert request["properties"]["env"]["enum"] == list(FRAME_ENV_NAMES) and request["additionalProperties"] is False
    assert {"X-Env", "X-Shape", "X-Dtype"} <= {p["name"] for p in post["parameters"]}
    for code in ("413", "415", "422"):
        assert post["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "image_mean" in schema["components"]["schemas"]["HiddenStatesResponse"]["properties"]["pooling"]["enum"]


def test_the_command_line_serves_the_tiny_vlm_and_the_client_cli_asks_it(vlm_path, backends, tmp_path, capsys):
    """``python -m servers.hidden_state_server --model DIR --preset debug`` on the CPU, then
    ``python -m utils.hidden_state_client URL --env ENV --png FILE``."""
    from tests.test_server import start_cli_server

    process, base = start_cli_server(vlm_path)
    try:
        frame = random_frames(1, seed=7)
        (tmp_path / "frame.png").write_bytes(encode_png(frame[0]))
        vectors = client_main([base, "--env", CLASSIC, "--png", str(tmp_path / "frame.png")])
        out = capsys.readouterr().out
        assert "image features, layer -1, pooling last, dim 32" in out and "0: [" in out
        np.testing.assert_allclose(vectors, frame_features(backends["last"], frame, CLASSIC), atol=ATOL, rtol=0)
        with pytest.raises(SystemExit) as exit_info:
            client_main([base, "--texts", "Health 9."])
        assert exit_info.value.code == 2 and "computes image features" in capsys.readouterr().err
    finally:
        process.terminate()
        rest = process.communicate(timeout=30)[0]
    assert "Traceback" not in rest, rest


# --------------------------------------------------------------------------------------------------
# On a GPU: vLLM's multimodal pooling against transformers (benchmarks/gpu_check.sh runs these)
# --------------------------------------------------------------------------------------------------


def _cuda_with(package: str) -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec(package) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_with("vllm"), reason="needs a CUDA GPU with vllm installed")
@pytest.mark.parametrize("pooling", ["last", "image_mean"])
def test_vllm_frames_match_transformers_on_gpu(tmp_path, monkeypatch, pooling):
    """The tiny VLM's gpu shape (head_dim 64, bf16), the same frames through both backends: vLLM's
    pooling runner (whole-prompt states) and transformers agree up to bf16 kernel rounding."""
    monkeypatch.setenv("VLLM_GPU_MEMORY_UTILIZATION", "0.15")
    path = build_tiny_vlm(tmp_path / "gpu_vlm", "gpu")
    spec = LLMSpec(model=path, pooling=pooling, dtype="bfloat16")
    frames = random_frames(6)
    expected = frame_features(make_backend(spec.replace(device="cuda")), frames, CLASSIC)
    got = frame_features(make_backend(spec.replace(backend="vllm")), frames, CLASSIC)
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.999, cosine
    np.testing.assert_allclose(got, expected, atol=0.03 * np.abs(expected).max(), rtol=0.03)
