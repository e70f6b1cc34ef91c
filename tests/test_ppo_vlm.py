"""Pixel PPO with VLM features (``online_rl_llm.ppo_llm`` on a pixel env): frames cached by their bytes,
the refresh schedule counted at the backend, the same features in process and through the server,
a debug run with the tiny VLM, refusal to resume with other features, and the throughput benchmark."""

import dataclasses
import hashlib
import json

import jax
import numpy as np
import pytest
import yaml

from online_rl_llm.features import LiveFeatures, encoder_identity, feature_modality
from online_rl_llm.ppo_llm import PPOLLMConfig, Runner, main, make_train, train
from utils import envs
from utils.config import apply_presets, load_presets
from utils.errors import UserError
from utils.frames import as_uint8_frames
from utils.io import read_jsonl
from utils.llm import LLMSpec

ENV = "Craftax-Classic-Pixels-v1"


class FrameHashEncoder:
    """A deterministic stand-in VLM: a frame's vector comes from the hash of its bytes; it keeps every
    batch of frames it is asked for."""

    modality = "image"

    def __init__(self, dim: int = 8):
        self.hidden_size = dim
        self.spec = LLMSpec(model="frame-hash-encoder", modality="image")
        self.identity = {"backend": "stand-in", "compute_dtype": "float32", "model_revision": "r1",
                         "modality": "image", "image_processor": "StandIn:0"}
        self.calls: list[np.ndarray] = []

    def vectors(self, frames) -> np.ndarray:
        rows = [np.frombuffer(hashlib.sha256(f.tobytes()).digest()[: self.hidden_size], np.uint8) for f in frames]
        return np.asarray(rows, np.float32).reshape(len(frames), self.hidden_size) / 255.0

    def image_hidden_states(self, frames, env_name):
        assert env_name == ENV
        self.calls.append(np.array(frames))
        return self.vectors(frames)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixel_obs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Pixel observations as the env gives them (floats k / 255) without building the env."""
    return np.random.RandomState(seed).randint(0, 256, (*shape, 63, 63, 3)).astype(np.float32) / 255.0


def debug_config(tmp_path, name="run", **overrides) -> PPOLLMConfig:
    cfg = apply_presets(PPOLLMConfig(), ["debug", "pixel"], load_presets("online_rl_llm", "ppo_llm"), "debug")
    return dataclasses.replace(cfg, run_dir=str(tmp_path / name), progress=False, **overrides)


# ---------------------------------------------------------------------------------------------------
# The host side: frames, cache, modality
# ---------------------------------------------------------------------------------------------------


def test_frames_go_to_the_vlm_once_keyed_by_their_bytes():
    obs = pixel_obs((2, 4))  # [seeds, envs]
    obs[1, 3] = obs[0, 0]  # two envs showing the same frame cost one forward pass
    encoder = FrameHashEncoder()
    live = LiveFeatures(ENV, encoder, cache_size=100)
    assert live.modality == "image" and feature_modality(ENV) == "image"
    need = np.array([[True, False, True, False], [False, True, False, True]])
    out = live(obs, need)
    assert out.shape == (2, 4, 8) and not out[~need].any(), "rows without a refresh stay zero"
    assert len(encoder.calls) == 1 and len(encoder.calls[0]) == 3, "one batch, the repeated frame once"
    np.testing.assert_array_equal(encoder.calls[0], as_uint8_frames(obs[need][:3]))  # exact uint8 frames
    np.testing.assert_array_equal(out[need], encoder.vectors(as_uint8_frames(obs[need])))
    live(obs, need)
    assert len(encoder.calls) == 1, "every frame cached: no VLM call"
    stats = live.counters().cache
    assert (stats.lookups, stats.hits, stats.encoded) == (8, 5, 3)


def test_an_encoder_of_the_other_modality_is_refused_in_one_line():
    text_encoder = dataclasses.make_dataclass("TextEncoder", [("spec", LLMSpec), ("hidden_size", int)])
    with pytest.raises(UserError, match="pixel observations.*computes text features") as text_model:
        LiveFeatures(ENV, text_encoder(LLMSpec(model="text-model"), 8), 10)  # no modality: a text model
    with pytest.raises(UserError, match="text observations.*computes image features") as image_model:
        LiveFeatures("Craftax-Classic-Symbolic-v1", FrameHashEncoder(), 10)
    with pytest.raises(UserError, match="text rendering.*pixel env") as neither:
        feature_modality("Tetris-Direct-Standard-v0")
    for error in (text_model, image_model, neither):
        assert "\n" not in str(error.value)
    from online_rl_llm.features import PIXEL_ENV_NAMES

    assert PIXEL_ENV_NAMES == tuple(name for name in envs.ENV_NAMES if "-Pixels-" in name), "the registry's pixel envs"


def test_in_process_and_server_features_are_the_same(tiny_vlm_path):
    from servers.hidden_state_server import create_app, serve_in_background
    from utils.hidden_state_client import HiddenStateClient
    from utils.llm import make_backend

    spec = LLMSpec(model=tiny_vlm_path, pooling="image_mean", device="cpu", batch_size=4)
    backend = make_backend(spec)
    obs, need = pixel_obs((2, 3), seed=1), np.array([[True, True, False], [True, False, True]])
    local = LiveFeatures(ENV, backend, cache_size=100)
    with serve_in_background(create_app(backend, spec, max_batch=4, max_wait_ms=2.0)) as url:
        client = HiddenStateClient(url)
        remote = LiveFeatures(ENV, client, cache_size=100)
        np.testing.assert_allclose(remote(obs, need), local(obs, need), atol=1e-5)
        via_server, in_process = encoder_identity(client, url), encoder_identity(backend)
    assert via_server["modality"] == in_process["modality"] == "image"
    assert in_process["image_processor"] and in_process["pooling"] == "image_mean"
    assert {**via_server, "source": None, "url": None} == {**in_process, "source": None, "url": None}


# ---------------------------------------------------------------------------------------------------
# The refresh schedule, counted at the backend
# ---------------------------------------------------------------------------------------------------


def test_frames_are_refreshed_every_skip_n_steps_and_at_episode_starts(tmp_path):
    skip_n, steps, num_envs = 3, 9, 4
    cfg = dataclasses.replace(debug_config(tmp_path), num_envs=num_envs, num_steps=steps, skip_n=skip_n,
                              reset_ratio=1, layer_width=16, feature_width=8)
    env = envs.make(ENV, num_envs, reset_ratio=1)
    env.params = env.params.replace(max_timesteps=4)  # every episode ends after 4 steps
    encoder = FrameHashEncoder()
    live = LiveFeatures(ENV, encoder, cache_size=1000)
    algorithm = make_train(cfg, env, total_updates=1, dim=live.dim)
    carry = jax.tree.map(lambda x: x[None], jax.jit(algorithm.init)(jax.random.PRNGKey(0)))  # one seed

    carry, (rollout, _) = Runner(cfg, algorithm, live).collect(carry)
    done = np.asarray(rollout.done)[:, 0]  # [T, N]
    frames = as_uint8_frames(np.asarray(rollout.obs.obs)[:, 0].reshape(-1, 63, 63, 3)).reshape(steps, num_envs, 63, 63, 3)
    assert done.any(), "the short episodes must end inside the rollout for this test to mean anything"

    asked = []  # the frames each refresh point needs, including the one after the last step
    for t in range(steps + 1):
        need = np.ones(num_envs, bool) if t % skip_n == 0 else done[t - 1]
        if need.any():
            asked.append(frames[t][need] if t < steps else as_uint8_frames(np.asarray(carry.obs)[0])[need])
    assert live.counters().calls == len(asked)
    seen = set()  # the backend gets each refresh's frames not seen before, in one call
    expected_calls = []
    for batch in asked:
        new = [f for f in dict.fromkeys(f.tobytes() for f in batch) if f not in seen]
        seen.update(new)
        if new:
            expected_calls.append(new)
    assert [[f.tobytes() for f in call] for call in encoder.calls] == expected_calls
    np.testing.assert_array_equal(np.asarray(carry.features.raw)[0],
                                  encoder.vectors(as_uint8_frames(np.asarray(carry.obs)[0])))


# ---------------------------------------------------------------------------------------------------
# Runs: in process, through the server, resume refused with other features
# ---------------------------------------------------------------------------------------------------


def test_debug_pixel_run_in_process_and_through_the_server(tmp_path, tiny_vlm_path):
    from servers.hidden_state_server import create_app, serve_in_background
    from utils.llm import make_backend

    small = dict(num_envs=4, num_steps=8, total_steps=64, layer_width=16, feature_width=8, eval_envs=2,
                 eval_max_steps=8)
    local = train(debug_config(tmp_path, "local", llm_model=tiny_vlm_path, **small))
    run = tmp_path / "local"
    assert local["summary"]["complete"] and local["summary"]["env_steps_per_seed"] == 64
    assert (run / "config.yaml").exists() and any((run / "checkpoints").iterdir())
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[-1]["perf/llm_texts"] >= 4 and "eval/return" in rows[-1]
    identity = json.loads((run / "features.json").read_text())
    assert identity["modality"] == "image" and identity["pooling"] == "image_mean" and identity["dim"] == 32
    assert identity["image_processor"] and identity["source"] == "in-process"
    conv = [k for k in jax.tree_util.tree_flatten_with_path(local["carry"].params)[0] if "ConvTorso" in str(k[0])]
    assert conv, "the policy reads the frame through the shared CNN"
    rendered_frames_sent = render_counting_frames(tmp_path, run, steps=5)
    skip_n = yaml.safe_load((run / "config.yaml").read_text())["skip_n"]
    assert rendered_frames_sent == [1] * len(range(0, 5, skip_n)), "one frame per refresh, as in training"

    spec = LLMSpec(model=tiny_vlm_path, pooling="image_mean", batch_size=16, device="cpu")
    with serve_in_background(create_app(make_backend(spec), spec, max_batch=16, max_wait_ms=2.0)) as url:
        remote = train(debug_config(tmp_path, "remote", server_url=url, **small))
    assert remote["summary"]["features"]["source"] == "server"
    for a, b in zip(jax.tree.leaves(local["carry"].params), jax.tree.leaves(remote["carry"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def render_counting_frames(tmp_path, run, steps: int) -> list[int]:
    """Render ``steps`` steps of a pixel ``ppo_llm`` run to a GIF (tools.render, its VLM features live);
    the number of frames in each call to the VLM."""
    import imageio.v2 as imageio

    import utils.llm
    from tools.render import RenderConfig
    from tools.render import run as render

    sent, frame_features = [], utils.llm.frame_features

    def counting(encoder, frames, env_name):
        sent.append(len(frames))
        return frame_features(encoder, frames, env_name)

    utils.llm.frame_features = counting
    try:
        result = render(RenderConfig(out=str(tmp_path / "vlm.gif"), run=str(run), max_steps=steps, progress=False))
    finally:
        utils.llm.frame_features = frame_features
    assert result["episodes"][0]["length"] == steps
    assert len(imageio.mimread(tmp_path / "vlm.gif")) == result["frames"] == steps + 1
    return sent


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # the model's loading bars come first
    assert err and err[-1].startswith("error: ") and sum(line.startswith("error") for line in err) == 1, err
    return err[-1]


def test_resume_with_other_features_is_refused_in_one_line(tmp_path, tiny_vlm_path, tiny_llm_path, capsys):
    from utils.llm import make_backend

    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)  # a checkpoint exists: the folder would resume
    current = encoder_identity(make_backend(LLMSpec(model=tiny_vlm_path, pooling="image_mean", device="cpu")))
    args = lambda model: ["--preset", "debug", "pixel", "--llm-model", model, "--llm-device", "cpu",
                          "--run-dir", str(run), "--no-progress"]
    argv = args(tiny_vlm_path)

    (run / "features.json").write_text(json.dumps({**current, "image_processor": "OtherProcessor:0"}))
    err = refused(capsys, argv)
    assert "other LLM features" in err and "image_processor: 'OtherProcessor:0' ->" in err

    text_run = {k: v for k, v in current.items() if k not in ("modality", "image_processor")}
    (run / "features.json").write_text(json.dumps(text_run))  # recorded before modalities: text features
    assert "modality: 'text' -> 'image'" in refused(capsys, argv)
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists(), "refused before writing"

    assert "computes text features" in refused(capsys, args(tiny_llm_path))


# ---------------------------------------------------------------------------------------------------
# The throughput benchmark
# ---------------------------------------------------------------------------------------------------


def test_ppo_vlm_sps_writes_its_table_at_a_tiny_budget(tmp_path, capsys):
    from benchmarks import ppo_vlm_sps, records

    table_path = tmp_path / "ppo_vlm_sps.json"
    result = ppo_vlm_sps.main(["--num-envs", "4", "--num-steps", "4", "--num-minibatches", "1", "--skip-n", "4",
                               "--layer-width", "16", "--feature-width", "8", "--repeats", "2",
                               "--table", str(table_path)])
    assert result["env"] == ENV and result["llm"]["modality"] == "image"
    table = json.loads(table_path.read_text())
    assert table["schema"] == records.TABLE_SCHEMA and table["name"] == "ppo_vlm_sps"
    assert table["command"].startswith("python -m benchmarks.ppo_vlm_sps --num-envs 4")
    ppo, vlm = table["rows"]
    assert ppo["method"] == "ppo" and vlm["method"] == "ppo + VLM features skip_n=4"
    assert len(vlm["steps_per_second"]) == len(vlm["relative"]) == 2 and min(vlm["steps_per_second"]) > 0
    assert ppo["relative"] == [1.0, 1.0] and vlm["inputs_per_1k_steps"] > 0
