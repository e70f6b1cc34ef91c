"""PPO with live LLM features: the text cache, the refresh schedule, normalisation, and debug runs
through the in-process tiny model and through the hidden-state server (with a resume)."""

import dataclasses
import hashlib
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from online_rl_llm.features import FeatureCache, HeldFeatures, LiveFeatures
from online_rl_llm.ppo_llm import PPOLLMConfig, Runner, make_train, train
from utils import envs
from utils.config import apply_presets, load_presets
from utils.feature_norm import usable_std
from utils.io import read_jsonl
from utils.llm import LLMSpec
from utils.text_obs import render_texts

ENV = "Craftax-Classic-Symbolic-v1"


class HashEncoder:
    """A deterministic stand-in LLM: each text's vector comes from its hash; counts what it is asked."""

    def __init__(self, dim: int = 8):
        self.hidden_size = dim
        self.spec = LLMSpec(model="hash-encoder")
        self.calls: list[list[str]] = []

    def hidden_states(self, texts):
        self.calls.append(list(texts))
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[: self.hidden_size], np.uint8) for t in texts]
        return np.asarray(rows, np.float32).reshape(len(texts), self.hidden_size) / 255.0


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def debug_config(tmp_path, name="run", **overrides) -> PPOLLMConfig:
    cfg = apply_presets(PPOLLMConfig(), ["debug"], load_presets("online_rl_llm", "ppo_llm"), "debug")
    return dataclasses.replace(cfg, run_dir=str(tmp_path / name), progress=False, **overrides)


# ---------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------


def test_cache_sends_each_unseen_text_once_and_counts_hits():
    encoder = HashEncoder()
    cache = FeatureCache(encoder.hidden_states, encoder.hidden_size, max_entries=10)
    first = cache.lookup(["a", "b", "a"])
    assert encoder.calls == [["a", "b"]], "a repeated text within a call is encoded once"
    np.testing.assert_array_equal(first[0], first[2])
    again = cache.lookup(["b", "c", "a"])
    assert encoder.calls[-1] == ["c"], "only the unseen text goes to the LLM"
    np.testing.assert_array_equal(again[0], first[1])
    np.testing.assert_array_equal(again[2], first[0])
    cache.lookup(["a", "b"])
    assert len(encoder.calls) == 2, "all seen: no LLM call"
    stats = cache.stats
    assert (stats.lookups, stats.hits, stats.encoded, stats.encode_calls) == (8, 5, 3, 2)
    assert stats.hit_rate == pytest.approx(5 / 8)


def test_cache_drops_the_least_recently_used_text():
    encoder = HashEncoder()
    cache = FeatureCache(encoder.hidden_states, encoder.hidden_size, max_entries=2)
    cache.lookup(["a", "b"])
    cache.lookup(["a"])  # b is now the least recently used
    cache.lookup(["c"])
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    cache.lookup(["b"])
    assert encoder.calls[-1] == ["b"], "an evicted text is encoded again"


def test_cache_refuses_vectors_of_the_wrong_shape():
    from utils.llm import LLMError

    cache = FeatureCache(lambda texts: np.zeros((len(texts), 3), np.float32), dim=4, max_entries=4)
    with pytest.raises(LLMError, match="shape"):
        cache.lookup(["a"])


def test_live_features_render_only_the_rows_that_need_a_refresh():
    obs, _ = jax.jit(envs.make(ENV, 4, reset_ratio=1).reset)(jax.random.PRNGKey(0))
    obs = np.stack([np.asarray(obs), np.asarray(obs)[::-1]])  # [seeds 2, envs 4]
    encoder = HashEncoder()
    live = LiveFeatures(ENV, encoder, cache_size=100)
    need = np.array([[True, False, False, True], [False, False, True, False]])
    out = live(obs, need)
    assert out.shape == (2, 4, 8)
    np.testing.assert_array_equal(out[need], encoder.hidden_states(render_texts(obs[need], ENV)))
    assert not out[~need].any(), "rows without a refresh stay zero (the held value is kept)"
    assert live.counters().rows == 3
    live(obs, np.zeros((2, 4), bool))
    assert len(encoder.calls) == 2, "nothing needed: no render, no LLM call"


def test_features_need_a_text_env_or_frames_for_a_vlm():
    from utils.errors import UserError

    with pytest.raises(UserError, match="text rendering"):
        LiveFeatures("Tetris-Direct-Standard-v0", HashEncoder(), 10)
    with pytest.raises(UserError, match="pixel observations.*vision-language model"):
        LiveFeatures("Craftax-Classic-Pixels-v1", HashEncoder(), 10)  # a text model for frames (tests/test_ppo_vlm.py)


# ---------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------


def test_running_normalisation_is_the_offline_rule_on_every_step_seen():
    rng = np.random.default_rng(0)
    steps = [rng.normal(3.0, 2.0, size=(5, 4)).astype(np.float32) for _ in range(6)]
    for x in steps:
        x[:, 2] = 7.0  # a dimension that never varies
    held = HeldFeatures.create(5, 4)
    for x in steps:
        held = held.replace(raw=jnp.asarray(x)).observe()
    seen = np.concatenate(steps).astype(np.float64)
    mean, std = seen.mean(0), seen.std(0)
    expected = (steps[-1] - mean) / usable_std(std)  # offline_rl.data.feature_stats' rule
    np.testing.assert_allclose(np.asarray(held.normalised()), expected, atol=2e-4)
    assert np.all(np.asarray(held.normalised())[:, 2] == pytest.approx(0.0, abs=1e-3)), \
        "a constant dimension is divided by 1, not blown up"
    assert usable_std(np.array([0.0, 1e-7, 0.5]))[:2].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------------
# The refresh schedule inside training
# ---------------------------------------------------------------------------------------------------


class RecordingFeatures(LiveFeatures):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = []

    def __call__(self, obs, need):
        self.requests.append((np.array(obs), np.array(need)))
        return super().__call__(obs, need)


def test_features_refresh_every_skip_n_steps_and_at_episode_starts(tmp_path):
    skip_n, steps, num_envs = 3, 9, 4
    cfg = dataclasses.replace(debug_config(tmp_path), num_envs=num_envs, num_steps=steps, skip_n=skip_n,
                              reset_ratio=1)
    env = envs.make(ENV, num_envs, reset_ratio=1)
    env.params = env.params.replace(max_timesteps=4)  # every episode ends after 4 steps
    live = RecordingFeatures(ENV, HashEncoder(), cache_size=1000)
    algorithm = make_train(cfg, env, total_updates=1, dim=live.dim)
    runner = Runner(cfg, algorithm, live)
    carry = jax.tree.map(lambda x: x[None], jax.jit(algorithm.init)(jax.random.PRNGKey(0)))  # one seed

    carry, (rollout, _) = runner.collect(carry)
    done = np.asarray(rollout.done)[:, 0]  # [T, N]
    obs = np.asarray(rollout.obs.obs)[:, 0]
    assert done.any(), "the short episodes must end inside the rollout for this test to mean anything"

    expected = []  # (step, need) for every refresh point, including the one after the last step
    for t in range(steps + 1):
        need = np.ones(num_envs, bool) if t % skip_n == 0 else done[t - 1]
        if need.any():
            expected.append((t, need))
    assert len(live.requests) == len(expected)
    for (seen_obs, seen_need), (t, need) in zip(live.requests, expected):
        np.testing.assert_array_equal(seen_need[0], need, err_msg=f"step {t}")
        if t < steps:
            np.testing.assert_array_equal(seen_obs[0], obs[t], err_msg=f"observation at step {t}")
    # The run ended on a multiple of skip_n, so every env now holds its current observation's feature.
    current = live.encoder.hidden_states(render_texts(np.asarray(carry.obs)[0], ENV))
    np.testing.assert_array_equal(np.asarray(carry.features.raw)[0], current)
    assert not np.asarray(carry.features.stale).any()


# ---------------------------------------------------------------------------------------------------
# Debug runs: in-process model, server, resume
# ---------------------------------------------------------------------------------------------------


def check_run_outputs(run, summary):
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [256, 512]
    for row in rows:
        assert row["perf/sps"] > 0
        assert 0 < row["perf/llm_time_share"] <= row["perf/feature_time_share"] < 1
        assert 0 <= row["perf/feature_cache_hit_rate"] <= 1
        assert row["perf/llm_texts"] >= 1 and all(np.isfinite(row["loss/total"]))
        assert len(row["loss/total"]) == len(row["episode/count"]) == 2, "one value per seed"
    assert "eval/return" in rows[-1], "the debug preset evaluates at the end"
    assert summary["complete"] and summary["env_steps_per_seed"] == 512
    assert (run / "config.yaml").exists() and any((run / "checkpoints").iterdir())
    assert json.loads((run / "features.json").read_text())["dim"] == 32


def test_debug_runs_in_process_and_through_the_server_and_resume(tmp_path, tiny_llm_path):
    from servers.hidden_state_server import create_app, serve_in_background
    from utils.llm import make_backend

    local = train(debug_config(tmp_path, "local", llm_model=tiny_llm_path, num_seeds=2))
    check_run_outputs(tmp_path / "local", local["summary"])
    assert local["summary"]["features"]["source"] == "in-process"
    # 64 steps per env: all 8 envs of both seeds at each of the 17 multiples of skip_n 4 (0..64),
    # plus episode starts in between and the evaluation's refreshes.
    assert local["summary"]["features"]["texts_looked_up"] >= 2 * 8 * 17
    seeds = jax.tree.leaves(local["carry"].params)[0]
    assert not np.array_equal(np.asarray(seeds[0]), np.asarray(seeds[1])), "the two seeds are different runs"

    spec = LLMSpec(model=tiny_llm_path, batch_size=16, device="cpu")
    app = create_app(make_backend(spec), spec, max_batch=32, max_wait_ms=2.0)
    with serve_in_background(app) as url:
        remote_cfg = debug_config(tmp_path, "remote", server_url=url, num_seeds=2)
        killed = train(remote_cfg, stop_after_updates=2)
        assert not killed["summary"]["complete"]
        resumed = train(remote_cfg)
    check_run_outputs(tmp_path / "remote", resumed["summary"])
    assert resumed["summary"]["features"]["source"] == "server"
    assert resumed["summary"]["features"]["url"] == url
    # Same model, same texts: the server's run (killed and resumed, cache lost) trains the same policy.
    for a, b in zip(jax.tree.leaves(local["carry"].params), jax.tree.leaves(resumed["carry"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    episodes = lambda run: [{k: v for k, v in r.items() if k.startswith("episode/")}
                            for r in read_jsonl(tmp_path / run / "metrics.jsonl")]
    assert episodes("local") == episodes("remote")

    from utils.errors import UserError

    metrics_before = (tmp_path / "remote" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="other LLM features"):
        train(remote_cfg, encoder=HashEncoder(32))  # same config, another model behind the URL
    assert (tmp_path / "remote" / "metrics.jsonl").read_text() == metrics_before, "refused before touching the run"


def test_cli_needs_an_llm_and_a_text_env(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "online_rl_llm.ppo_llm", "--preset", "debug",
                                        "--run-dir", str(tmp_path / "cli"), *args],
                                       capture_output=True, text=True, timeout=300)
    no_llm = run()
    assert no_llm.returncode == 2 and len(no_llm.stderr.strip().splitlines()) == 1
    assert "--llm-model" in no_llm.stderr and "--server-url" in no_llm.stderr
    tetris = run("--env", "Tetris-Direct-Standard-v0", "--llm-model", "unused")
    assert tetris.returncode == 2 and "text rendering" in tetris.stderr
    assert not (tmp_path / "cli").exists(), "no run folder for a run that could not start"
