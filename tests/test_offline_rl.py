"""Offline RL (AWR, BC, IQL): the maths by hand, learning on datasets with known answers, the loader,
run folders and resume, clear errors, and evaluation in the game (with live LLM features)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offline_rl.awr import AWR, AWRConfig, awr_weights, explained_variance
from offline_rl.bc import BC, BCConfig
from offline_rl.checkpoint import load_checkpoint, policies_from_checkpoint
from offline_rl.data import BatchLoader, TransitionDataset, episode_table, feature_stats, open_dataset, top_episode_mask
from offline_rl.iql import IQL, IQLConfig, advantage_weights, expectile_loss
from offline_rl.trainer import train
from utils.config import apply_presets, load_presets
from utils.io import read_jsonl
from utils.trajectories import (
    MANIFEST_NAME,
    DatasetError,
    TrajectoryDataset,
    TrajectoryWriter,
    save_npz_atomic,
    write_manifest,
)

CLASSIC = "Craftax-Classic-Symbolic-v1"


# ----------------------------------------------------------------------------------------------
# Datasets with known answers
# ----------------------------------------------------------------------------------------------


def write_streams(directory: Path, obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
                  done: np.ndarray, *, steps_per_shard: int, num_actions: int, env_name: str = "Toy-v0",
                  last_value: float = 0.0) -> TrajectoryDataset:
    """Write per-stream sequences ``[N, L, ...]`` as consecutive shards of ``steps_per_shard`` steps."""
    streams, length = action.shape
    with TrajectoryWriter(directory, env_name=env_name, obs_shape=obs.shape[2:], obs_dtype=obs.dtype,
                          num_streams=streams, num_actions=num_actions) as writer:
        for update, start in enumerate(range(0, length, steps_per_shard)):
            part = slice(start, start + steps_per_shard)
            time_major = lambda x: np.swapaxes(x[:, part], 0, 1)
            writer.write_rollout(update=update, obs=time_major(obs), action=time_major(action),
                                 reward=time_major(reward), done=time_major(done),
                                 log_prob=np.zeros_like(time_major(reward)),
                                 value=np.zeros_like(time_major(reward)), terminal_obs=time_major(obs),
                                 last_value=np.full(streams, last_value, np.float32))
    return TrajectoryDataset(directory)


def scripted_dataset(directory: Path, rows: int = 4096, num_actions: int = 17, seed: int = 0):
    """A scripted policy: the action is the number written by the first four observation bits."""
    rng = np.random.default_rng(seed)
    streams = 8
    obs = rng.integers(0, 2, (streams, rows // streams, 24)).astype(np.float32)
    action = (obs[..., :4] @ np.array([8, 4, 2, 1], np.float32)).astype(np.int64) % num_actions
    reward = np.zeros(action.shape, np.float32)
    done = rng.random(action.shape) < 0.02
    return write_streams(directory, obs, action, reward, done, steps_per_shard=64, num_actions=num_actions)


def good_action(obs: np.ndarray) -> np.ndarray:
    return (obs[..., 0] > 0.5).astype(np.int64)


def two_action_dataset(directory: Path, rows: int = 4096, seed: int = 0):
    """One-step episodes, uniformly random actions; reward 1 only for the action the first bit names."""
    rng = np.random.default_rng(seed)
    streams = 8
    obs = rng.integers(0, 2, (streams, rows // streams, 8)).astype(np.float32)
    action = rng.integers(0, 2, obs.shape[:2])
    reward = (action == good_action(obs)).astype(np.float32)
    done = np.ones(action.shape, bool)
    return write_streams(directory, obs, action, reward, done, steps_per_shard=64, num_actions=2)


def add_labels(directory: Path, features_of, labels: dict | None = None) -> None:
    """Turn a dataset into a labelled one the way labelling does: hidden_state (float16) and text
    columns per shard, and a labels block in the manifest."""
    dataset = TrajectoryDataset(directory)
    hidden_size = None
    for i in range(dataset.num_shards):
        raw = dataset.load_shard_raw(i)
        obs = dataset.load_shard(i, ("obs",))["obs"]
        hidden, texts = features_of(obs)
        hidden_size = hidden.shape[1]
        save_npz_atomic(dataset.shard_path(i), {**raw, "hidden_state": hidden.astype(np.float16),
                                                "text_obs": np.asarray(texts, dtype=str)})
    manifest = dict(dataset.manifest)
    manifest["labels"] = {"model": "projection", "layer": -1, "pooling": "last", "template": "{text}",
                          "system_prompt": None, "template_hash": "none", "backend": "transformers",
                          **(labels or {}), "hidden_size": hidden_size, "dtype": "float16"}
    write_manifest(directory, manifest)


def projection_features(dim: int = 6, seed: int = 1):
    projection = np.random.default_rng(seed).normal(size=(24, dim)) * 3.0

    def features_of(obs):
        return obs @ projection + 5.0, [f"obs {row[:4]}" for row in obs]

    return features_of


def config(cls, tmp_path: Path, dataset: Path, name: str = "run", **overrides):
    algo = {AWRConfig: "awr", BCConfig: "bc", IQLConfig: "iql"}[cls]
    cfg = apply_presets(cls(), ["debug"], load_presets("offline_rl", algo), "debug")
    return dataclasses.replace(cfg, **{"dataset": str(dataset), "run_dir": str(tmp_path / name),
                                       "progress": False, "eval_episodes": 0, **overrides})


def greedy_actions(model, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(obs))
    return logits.argmax(-1).numpy()


# ----------------------------------------------------------------------------------------------
# Maths by hand
# ----------------------------------------------------------------------------------------------


def test_awr_weights_and_clipping_match_a_hand_computation():
    weights, clipped = awr_weights(torch.tensor([0.0, 1.0, 2.0, 5.0]), beta=1.0, max_weight=20.0, normalize=False)
    np.testing.assert_allclose(weights.numpy(), [1.0, 2.718282, 7.389056, 20.0], rtol=1e-6)
    assert clipped.tolist() == [False, False, False, True]  # e^5 = 148.4 > 20

    # [1, 3] normalises to [-1, 1]; over beta 0.5: e^-2 = 0.135335 and e^2 = 7.389 -> clipped to 5.
    weights, clipped = awr_weights(torch.tensor([1.0, 3.0]), beta=0.5, max_weight=5.0, normalize=True)
    np.testing.assert_allclose(weights.numpy(), [0.135335, 5.0], rtol=1e-5)
    assert clipped.tolist() == [False, True]

    weights, clipped = awr_weights(torch.tensor([0.0, 1e6]), beta=0.01, max_weight=20.0, normalize=False)
    assert torch.isfinite(weights).all() and weights.tolist() == [1.0, pytest.approx(20.0)]


def test_explained_variance_is_one_for_perfect_and_zero_for_the_mean():
    target = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert float(explained_variance(target, target)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(target, 3.0), target)) == pytest.approx(0.0)
    # Residuals [1, -1, 1, -1] (variance 1) against target variance 3.5.
    assert float(explained_variance(target + torch.tensor([-1.0, 1.0, -1.0, 1.0]), target)) == pytest.approx(1 - 1 / 3.5)


def boundary_dataset(tmp_path: Path) -> TrajectoryDataset:
    """Two streams, shards of 3 steps; stream 0's first episode runs across the shard boundary."""
    reward = np.array([[1, 0, 0, 0, 2, 0], [0, 1, 0, 0, 0, 1]], np.float32)
    done = np.array([[0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1]], bool)
    obs = np.arange(12, dtype=np.float32).reshape(2, 6, 1)
    return write_streams(tmp_path / "data", obs, np.zeros((2, 6), np.int64), reward, done,
                         steps_per_shard=3, num_actions=2, last_value=10.0)


def test_awr_targets_carry_returns_across_shard_boundaries(tmp_path):
    """Monte Carlo targets by hand (gamma 0.5), delivered through the loader's worker processes."""
    dataset = boundary_dataset(tmp_path)
    cfg = config(AWRConfig, tmp_path, tmp_path / "data", gamma=0.5)
    algo = AWR(cfg)
    _, spec = open_dataset(cfg.dataset)
    algo.prepare(dataset, spec)
    arrays, mask = algo.epoch_rows(dataset, spec, [])
    loader = BatchLoader(spec, batch_size=2, seed=0, num_workers=2)
    got = {}
    for batch in loader.epoch(0, arrays, mask):
        got.update(zip(batch["row_index"].tolist(), batch["return"].tolist()))
    # Stream 0: 1 + 0.5^4 * 2 = 1.125, ...; its last row starts an episode cut by the end of the
    # data: 0 + 0.5 * last_value 10 = 5. Stream 1: episodes end at steps 1 and 5.
    # Dataset order: shard 0 = s0 t0..2, s1 t0..2; shard 1 = s0 t3..5, s1 t3..5.
    expected = [1.125, 0.25, 0.5, 0.5, 1.0, 0.125, 1.0, 2.0, 5.0, 0.25, 0.5, 1.0]
    assert len(got) == 12, "two workers with 2-row batches deliver every row once"
    np.testing.assert_allclose([got[i] for i in range(12)], expected, rtol=1e-6)


def test_lambda_returns_interpolate_between_td_and_monte_carlo_across_shards(tmp_path):
    dataset = boundary_dataset(tmp_path)
    values = np.linspace(-1, 1, 12).astype(np.float32)
    gamma = 0.5
    mc = dataset.compute_returns(gamma)
    np.testing.assert_allclose(dataset.compute_returns(gamma, values=values, lam=1.0), mc)
    # lambda = 0: one-step TD targets r + gamma (1 - done) V(next row of the stream), the next row
    # of the last step of shard 0 being the first row of shard 1; after the data: last_value 10.
    reward = np.array([1, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 1], np.float32)
    done = np.array([0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1], bool)
    next_row = {0: 1, 1: 2, 2: 6, 3: 4, 4: 5, 5: 9, 6: 7, 7: 8, 8: None, 9: 10, 10: 11, 11: None}
    td = [reward[i] + gamma * (1 - done[i]) * (10.0 if next_row[i] is None else values[next_row[i]])
          for i in range(12)]
    np.testing.assert_allclose(dataset.compute_returns(gamma, values=values, lam=0.0), td, rtol=1e-6)
    # lambda = 0.5 by the recursion G = r + gamma (1 - d) ((1 - lam) V' + lam G'), row by row.
    lam, expected = 0.5, np.zeros(12)
    for i in [8, 7, 6, 2, 1, 0, 11, 10, 9, 5, 4, 3]:  # each stream backwards, across its shards
        nxt = next_row[i]
        bootstrap = 10.0 if nxt is None else (1 - lam) * values[nxt] + lam * expected[nxt]
        expected[i] = reward[i] + gamma * (1 - done[i]) * bootstrap
    np.testing.assert_allclose(dataset.compute_returns(gamma, values=values, lam=lam), expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Data: loader, episodes, statistics, errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_full_shuffled_batches_of_kept_rows_once_per_epoch(tmp_path, workers):
    dataset = scripted_dataset(tmp_path / "data", rows=1024)
    _, spec = open_dataset(tmp_path / "data")
    mask = np.random.default_rng(0).random(dataset.num_transitions) < 0.6
    loader = BatchLoader(spec, batch_size=50, seed=3, num_workers=workers, shards_in_memory=2)

    def epoch_rows(epoch):
        batches = list(loader.epoch(epoch, {"flag": np.arange(dataset.num_transitions)}, mask))
        assert all(len(b["row_index"]) == 50 for b in batches)
        assert all(torch.equal(b["flag"], b["row_index"]) for b in batches), "row arrays stay aligned"
        assert all(b["action"].dtype == torch.int64 and b["obs"].shape[1:] == (24,) for b in batches)
        return np.concatenate([b["row_index"].numpy() for b in batches])

    first = epoch_rows(0)
    assert len(np.unique(first)) == len(first) and mask[first].all()
    assert mask.sum() - len(first) < 50 * max(1, workers), "at most one partial batch per worker dropped"
    assert not np.array_equal(first, np.sort(first)), "shuffled"
    np.testing.assert_array_equal(first, epoch_rows(0))  # deterministic: resume depends on it
    assert not np.array_equal(first, epoch_rows(1))
    np.testing.assert_array_equal(first[50:], np.concatenate(
        [b["row_index"].numpy() for b in loader.epoch(0, {"flag": np.arange(dataset.num_transitions)}, mask, skip=1)]))


def test_episode_table_ranks_only_complete_episodes(tmp_path):
    # Stream 0: an episode of return 3 (t0-2), one of return 5 (t3-4), then a fragment (t5).
    # Stream 1: one episode of return 1 over both shards (t0-3), then a fragment of return 9 (t4-5).
    reward = np.array([[1, 1, 1, 0, 5, 4], [0, 0, 1, 0, 9, 0]], np.float32)
    done = np.array([[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]], bool)
    obs = np.zeros((2, 6, 1), np.float32)
    dataset = write_streams(tmp_path / "data", obs, np.zeros((2, 6), np.int64), reward, done,
                            steps_per_shard=3, num_actions=2)
    table = episode_table(dataset)
    by_return = {float(r): bool(c) for r, c in zip(table.returns, table.complete)}
    assert by_return == {3.0: True, 5.0: True, 4.0: False, 1.0: True, 9.0: False}
    # Best third of the 3 complete episodes = the return-5 episode: stream 0, t3-4 (rows 6, 7).
    np.testing.assert_array_equal(np.flatnonzero(top_episode_mask(table, 0.3)), [6, 7])
    np.testing.assert_array_equal(np.flatnonzero(top_episode_mask(table, 0.6)), [0, 1, 2, 6, 7])
    assert top_episode_mask(table, 1.0).all()


def test_feature_stats_are_the_training_set_mean_and_std(tmp_path):
    dataset = scripted_dataset(tmp_path / "data", rows=512)
    add_labels(tmp_path / "data", projection_features())
    hidden = np.concatenate([s["hidden_state"] for s in dataset.iter_shards(("hidden_state",))]).astype(np.float64)
    mean, std = feature_stats(dataset, hidden.shape[1])
    np.testing.assert_allclose(mean, hidden.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, hidden.std(0), rtol=1e-4)


def test_unusable_datasets_get_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no manifest"):
        open_dataset(tmp_path / "nothing")
    scripted_dataset(tmp_path / "data", rows=1024)
    with pytest.raises(DatasetError, match="labels"):
        open_dataset(tmp_path / "data", "hidden_state")
    add_labels(tmp_path / "data", projection_features())
    _, spec = open_dataset(tmp_path / "data", "hidden_state")
    assert spec.feature_dim == 6 and spec.keys == ("obs", "action", "hidden_state")
    dataset = TrajectoryDataset(tmp_path / "data")
    save_npz_atomic(dataset.shard_path(1), {k: v for k, v in dataset.load_shard_raw(1).items()
                                            if k != "hidden_state"})
    with pytest.raises(DatasetError, match="shard_000001.npz.*hidden_state"):
        open_dataset(tmp_path / "data", "hidden_state")
    manifest = json.loads((tmp_path / "data" / MANIFEST_NAME).read_text())
    (tmp_path / "data" / MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(DatasetError, match="schema_version 99"):
        open_dataset(tmp_path / "data")


def test_cli_reports_a_user_error_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "offline_rl.bc", "--dataset", str(tmp_path / "missing"),
                             "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no manifest" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cli_without_run_dir_names_the_folder_after_the_datasets_env(tmp_path, monkeypatch):
    """The env comes from the dataset, so the default run folder is only known once it is read
    (a Slurm job that passes no --run-dir failed here once)."""
    from offline_rl.trainer import run_cli

    scripted_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    result = run_cli(BCConfig, BC, "bc", ["--preset", "debug", "--dataset", str(tmp_path / "data"),
                                          "--eval-episodes", "0"])
    assert Path(result["run_dir"]) == Path("runs/offline_rl/bc/Toy-v0/debug-s0")
    assert (tmp_path / result["run_dir"] / "summary.json").is_file()


def test_subset_keeps_a_contiguous_range_of_shards_with_the_same_returns(tmp_path):
    from offline_rl.subset import main as subset_main
    from offline_rl.subset import subset_dataset

    full = boundary_dataset(tmp_path)
    subset = subset_main(["--source", str(tmp_path / "data"), "--dest", str(tmp_path / "last"), "--last-shards", "1"])
    assert subset.num_shards == 1 and subset.manifest["totals"]["transitions"] == 6
    assert subset.shards[0]["file"] == "shard_000000.npz" and subset.shards[0]["update"] == 1
    np.testing.assert_array_equal(subset.load_shard(0)["obs"], full.load_shard(1)["obs"])
    np.testing.assert_allclose(subset.compute_returns(0.5), full.compute_returns(0.5)[6:])
    with pytest.raises(ValueError, match="already holds a dataset"):
        subset_dataset(tmp_path / "data", tmp_path / "last", 1)
    with pytest.raises(ValueError, match="has 2 shards"):
        subset_dataset(tmp_path / "data", tmp_path / "other", 1, 5)


# ----------------------------------------------------------------------------------------------
# Learning: known answers
# ----------------------------------------------------------------------------------------------


def test_bc_recovers_a_scripted_policy(tmp_path):
    scripted_dataset(tmp_path / "data")
    cfg = config(BCConfig, tmp_path, tmp_path / "data", total_steps=400, batch_size=128,
                 layer_width=64, lr=3e-3, log_every=100, checkpoint_every=400)
    result = train(cfg, BC(cfg))
    obs = np.random.default_rng(7).integers(0, 2, (2000, 24)).astype(np.float32)
    accuracy = (greedy_actions(result["models"][0], obs) == (obs[:, :4] @ [8, 4, 2, 1]).astype(int) % 17).mean()
    assert accuracy > 0.9, f"accuracy {accuracy:.2f}; chance is 1/17"
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [100, 200, 300, 400]
    assert rows[-1]["loss/accuracy"][0] > 0.9 and rows[-1]["loss/actor"][0] < rows[0]["loss/actor"][0]


def test_awr_prefers_high_return_actions_where_bc_cannot(tmp_path):
    two_action_dataset(tmp_path / "data")
    common = dict(total_steps=400, batch_size=128, layer_width=32, log_every=100, checkpoint_every=400)
    awr = train(c := config(AWRConfig, tmp_path, tmp_path / "data", "awr", beta=0.5, actor_lr=3e-3,
                            critic_lr=3e-3, **common), AWR(c))
    bc = train(c := config(BCConfig, tmp_path, tmp_path / "data", "bc", lr=3e-3, **common), BC(c))
    obs = np.random.default_rng(7).integers(0, 2, (2000, 8)).astype(np.float32)
    awr_right = (greedy_actions(awr["models"][0], obs) == good_action(obs)).mean()
    bc_right = (greedy_actions(bc["models"][0], obs) == good_action(obs)).mean()
    assert awr_right > 0.95, f"AWR picks the rewarded action {awr_right:.0%} of the time"
    assert 0.3 < bc_right < 0.7, "the data's actions are uniform: cloning them cannot know better"
    with torch.no_grad():
        _, value = awr["models"][0](torch.from_numpy(obs))
    assert np.abs(value.numpy() - 0.5).mean() < 0.1, "V(s) = E[reward] = 0.5 under the uniform data policy"
    rows = read_jsonl(tmp_path / "awr" / "metrics.jsonl")
    assert 0.0 <= rows[-1]["loss/weight_clipped_fraction"][0] < 1.0 and rows[-1]["loss/weight_mean"][0] > 0


def test_awr_with_td_lambda_targets_learns_for_every_seed(tmp_path):
    """Per-seed critics give per-seed targets (``return/<i>``), recomputed at every epoch."""
    two_action_dataset(tmp_path / "data", rows=2048)
    cfg = config(AWRConfig, tmp_path, tmp_path / "data", returns="lambda", gae_lambda=0.5, num_seeds=2,
                 total_steps=300, batch_size=128, beta=0.5, actor_lr=3e-3, critic_lr=3e-3, log_every=100)
    result = train(cfg, AWR(cfg))
    obs = np.random.default_rng(7).integers(0, 2, (2000, 8)).astype(np.float32)
    for model in result["models"]:
        assert (greedy_actions(model, obs) == good_action(obs)).mean() > 0.95
    assert result["summary"]["epochs"] > 2, "targets were recomputed over several epochs"


def test_filtered_bc_clones_only_the_best_episodes(tmp_path):
    """Episodes whose return is high always take action 1; the rest take action 0."""
    rng = np.random.default_rng(0)
    streams, length = 4, 256
    done = np.zeros((streams, length), bool)
    done[:, 7::8] = True  # 8-step episodes
    good = rng.random((streams, length // 8)) < 0.3
    action = np.repeat(good, 8, axis=1).astype(np.int64)
    reward = np.where(done, action * 10.0, 0.0).astype(np.float32)
    obs = rng.integers(0, 2, (streams, length, 8)).astype(np.float32)
    write_streams(tmp_path / "data", obs, action, reward, done, steps_per_shard=32, num_actions=2)
    cfg = config(BCConfig, tmp_path, tmp_path / "data", top_fraction=0.2, total_steps=150, batch_size=64, lr=3e-3)
    result = train(cfg, BC(cfg))
    summary = result["summary"]
    assert summary["kept_min_return"] == 10.0 and summary["kept_episodes"] == math.ceil(0.2 * 128)
    assert (greedy_actions(result["models"][0], obs.reshape(-1, 8)) == 1).mean() > 0.95


# ----------------------------------------------------------------------------------------------
# Run folder, checkpoints, resume
# ----------------------------------------------------------------------------------------------


def test_checkpoint_is_self_describing_and_a_killed_run_resumes_exactly(tmp_path):
    scripted_dataset(tmp_path / "data", rows=1024)
    add_labels(tmp_path / "data", projection_features())
    # killed at 25, between checkpoints 20 and 30: the resumed run redoes 5 updates from checkpoint 20
    kwargs = dict(features="hidden_state", num_seeds=2, total_steps=40, log_every=5, checkpoint_every=10)
    full = train(cfg := config(AWRConfig, tmp_path, tmp_path / "data", "full", **kwargs), AWR(cfg))
    killed_cfg = config(AWRConfig, tmp_path, tmp_path / "data", "killed", **kwargs)
    partial = train(killed_cfg, AWR(killed_cfg), stop_after_updates=25)
    assert not partial["summary"]["complete"] and partial["summary"]["updates"] == 25
    resumed = train(killed_cfg, AWR(killed_cfg))
    assert resumed["summary"]["complete"]
    for a, b in zip(full["models"], resumed["models"]):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "killed" / "metrics.jsonl"))
    assert len(read_jsonl(tmp_path / "full" / "metrics.jsonl")[-1]["loss/actor"]) == 2, "one value per seed"

    payload = load_checkpoint(tmp_path / "killed")
    assert Path(payload["path"]).name == "step_000000040.pt"
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step_*.pt"))) == 2, "keeps the newest two"
    assert payload["env_name"] == "Toy-v0" and payload["num_actions"] == 17 and payload["obs_encoding"]
    assert payload["network"]["feature_dim"] == 6 and payload["labels"]["hidden_size"] == 6
    assert payload["config"]["beta"] == 1.0 and payload["config"]["features"] == "hidden_state"
    mean, std = feature_stats(TrajectoryDataset(tmp_path / "data"), 6)
    policies = policies_from_checkpoint(payload)
    torch.testing.assert_close(policies[0].feature_norm.mean, torch.from_numpy(mean))
    torch.testing.assert_close(policies[1].feature_norm.std, torch.from_numpy(std))
    obs = torch.rand(5, 24)
    feats = torch.randn(5, 6) + 5
    for policy, model in zip(policies, resumed["models"]):
        torch.testing.assert_close(policy(obs, feats)[0], model.eval()(obs, feats)[0])
    for name in ("config.yaml", "summary.json", "learning_curve.png"):
        assert (tmp_path / "killed" / name).exists(), name


def test_a_run_folder_refuses_a_different_config(tmp_path):
    scripted_dataset(tmp_path / "data", rows=512)
    train(cfg := config(BCConfig, tmp_path, tmp_path / "data"), BC(cfg))
    with pytest.raises(ValueError, match="lr: 0.0003 -> 0.1"):
        train(cfg := config(BCConfig, tmp_path, tmp_path / "data", lr=0.1), BC(cfg))


# ----------------------------------------------------------------------------------------------
# Evaluation in the game
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classic_rollout():
    """Real Craftax-Classic observations, actions, rewards and dones of random play: [4 streams, 32 steps]."""
    import jax

    from utils import envs

    env = envs.make(CLASSIC, 4, reset_ratio=4)
    obs, state = jax.jit(env.reset)(jax.random.PRNGKey(0))
    step = jax.jit(env.step)
    rng = np.random.default_rng(0)
    out = {"obs": [], "action": [], "reward": [], "done": []}
    for t in range(32):
        action = rng.integers(0, env.num_actions, 4)
        out["obs"].append(np.asarray(obs))
        obs, state, reward, done, _ = step(jax.random.PRNGKey(t + 1), state, jax.numpy.asarray(action))
        out["action"].append(action)
        out["reward"].append(np.asarray(reward))
        out["done"].append(np.asarray(done))
    return {k: np.swapaxes(np.stack(v), 0, 1) for k, v in out.items()}


def classic_dataset(directory: Path, rollout: dict) -> TrajectoryDataset:
    return write_streams(directory, rollout["obs"], rollout["action"], rollout["reward"], rollout["done"],
                         steps_per_shard=16, num_actions=17, env_name=CLASSIC)


def test_evaluate_runs_a_checkpoint_in_the_game_and_writes_eval_json_and_gif(tmp_path, classic_rollout):
    from offline_rl.evaluate import main as evaluate_main

    classic_dataset(tmp_path / "data", classic_rollout)
    train(cfg := config(BCConfig, tmp_path, tmp_path / "data", num_seeds=2), BC(cfg))
    result = evaluate_main(["--run-dir", str(tmp_path / "run"), "--preset", "debug", "--no-progress",
                            "--dataset", str(tmp_path / "data"), "--gif", str(tmp_path / "episode.gif")])
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["summary"]["episodes_per_seed"] == 2 and saved["summary"]["steps_run"] <= 50
    assert len(saved["metrics"]["eval/return"]) == 2, "one value per trained seed"
    assert len(saved["metrics"]["eval/achievements/collect_wood"]) == 2
    assert saved["summary"]["data_policy"]["dataset"] == str(tmp_path / "data")
    assert result["summary"]["checkpoint"].endswith("step_000000020.pt")
    import imageio.v2 as imageio

    frames = imageio.mimread(tmp_path / "episode.gif")
    assert len(frames) >= 2 and frames[0].shape[-1] in (3, 4) and frames[0].shape[0] > 100


def test_training_ends_with_one_evaluation_in_the_game_that_a_rerun_keeps(tmp_path, classic_rollout):
    classic_dataset(tmp_path / "data", classic_rollout)
    kwargs = dict(num_seeds=2, eval_episodes=2, eval_max_steps=30)
    first = train(cfg := config(BCConfig, tmp_path, tmp_path / "data", **kwargs), BC(cfg))
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert first["summary"]["eval"] == saved["summary"] and saved["summary"]["episodes_per_seed"] == 2
    last = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["step"] == cfg.total_steps and len(last["eval/return"]) == 2, "eval rides on the final row"
    assert "env_steps_per_seed" not in first["summary"] and first["summary"]["transitions_per_seed"] > 0
    (tmp_path / "run" / "eval.json").write_text(json.dumps({**saved, "summary": {**saved["summary"], "mark": 1}}))
    again = train(cfg, BC(cfg))
    assert again["summary"]["eval"]["mark"] == 1, "a finished run is not evaluated again"
    assert again["summary"]["final"] == first["summary"]["final"]


def test_policy_with_llm_features_is_evaluated_with_live_features_from_the_labelling_path(
        tmp_path, classic_rollout, tiny_llm_path):
    """Label real observations with labelling's own code and the tiny LLM, train with --features
    hidden_state from the command line, then check that evaluation computes, for the same
    observations, the features labelling stored, and plays with them."""
    from labelling.labels import label_shard, labels_block, update_manifest
    from offline_rl.bc import main as bc_main
    from offline_rl.evaluate import evaluate_payload, make_feature_fn
    from utils import llm

    source = classic_dataset(tmp_path / "data", classic_rollout)
    spec = llm.LLMSpec(model=tiny_llm_path, layer=-1, pooling="mean", template="Observation:\n{text}")
    backend = llm.make_backend(spec)
    for i in range(source.num_shards):
        label_shard(source, i, backend, tmp_path / "labelled")
    update_manifest(tmp_path / "data", tmp_path / "labelled", labels_block(spec, backend.hidden_size))
    bc_main(["--dataset", str(tmp_path / "labelled"), "--features", "hidden_state", "--preset", "debug",
             "--run-dir", str(tmp_path / "run"), "--eval-episodes", "0", "--no-progress"])

    payload = load_checkpoint(tmp_path / "run")
    assert payload["features"] == "hidden_state" and payload["labels"]["model"] == tiny_llm_path
    live = make_feature_fn(payload)
    shard = TrajectoryDataset(tmp_path / "labelled").load_shard(1, ("obs", "hidden_state"))
    np.testing.assert_allclose(live(shard["obs"][:8]), shard["hidden_state"][:8].astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    result = evaluate_payload(payload, episodes=4, max_steps=10, seed=0, progress=False)
    assert result["summary"]["steps_run"] == 10 and result["summary"]["features"] == "hidden_state"
    wrong_size = dict(payload, network={**payload["network"], "feature_dim": 5})
    with pytest.raises(ValueError, match="hidden states of size 32.*size 5"):
        make_feature_fn(wrong_size)

    # The same features through the hidden-state server (--server-url), and one evaluation with them.
    from offline_rl.evaluate import main as evaluate_main
    from servers.hidden_state_server import create_app, serve_in_background

    with serve_in_background(create_app(backend, spec, max_batch=32, max_wait_ms=2.0)) as url:
        remote = make_feature_fn(payload, server_url=url)
        np.testing.assert_allclose(remote(shard["obs"][:8]), live(shard["obs"][:8]), rtol=1e-5, atol=1e-5)
        evaluated = evaluate_main(["--run-dir", str(tmp_path / "run"), "--server-url", url, "--episodes", "2",
                                   "--max-steps", "5", "--no-progress", "--out", str(tmp_path / "remote.json")])
        assert evaluated["summary"]["steps_run"] == 5
    with pytest.raises(ValueError, match="either --llm-model .* or --server-url"):
        make_feature_fn(payload, llm_model=tiny_llm_path, server_url="http://127.0.0.1:9")
    other = llm.LLMSpec(model=tiny_llm_path, layer=-1, pooling="last", template="Observation:\n{text}")
    with serve_in_background(create_app(backend, other, max_batch=32, max_wait_ms=2.0)) as url:
        with pytest.raises(ValueError, match="pooling"):
            make_feature_fn(payload, server_url=url)


# ----------------------------------------------------------------------------------------------
# IQL
# ----------------------------------------------------------------------------------------------


def test_expectile_loss_matches_a_plain_loop_and_its_minimiser_is_the_expectile():
    diff = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0])
    for tau in (0.5, 0.7, 0.9):
        plain = sum((tau if d >= 0 else 1 - tau) * d * d for d in diff.tolist()) / len(diff)
        assert math.isclose(float(expectile_loss(diff, tau)), plain, rel_tol=1e-6)
    torch.testing.assert_close(expectile_loss(diff, 0.5), 0.5 * diff.pow(2).mean())
    # Minimising over a constant v gives the tau-expectile: tau E[(x - v)+] = (1 - tau) E[(v - x)+].
    x = torch.tensor([0.0, 1.0, 1.0, 4.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([v], lr=0.05)
    for _ in range(3000):
        optimiser.zero_grad()
        expectile_loss(x - v, 0.9).backward()
        optimiser.step()
    v = v.detach()
    above, below = (x - v).clamp_min(0).mean(), (v - x).clamp_min(0).mean()
    assert math.isclose(float(0.9 * above), float(0.1 * below), rel_tol=1e-3)
    assert float(x.mean()) < float(v) < float(x.max())


def test_iql_weights_cap_the_exponent_before_exp():
    weights, clipped = advantage_weights(torch.tensor([0.0, 0.5, 1e6]), beta=2.0, max_weight=100.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, math.e, 100.0]))
    assert clipped.tolist() == [False, False, True]


def test_transition_dataset_pairs_each_row_with_the_next_row_of_its_stream(tmp_path):
    streams, length = 3, 12
    t = np.arange(length, dtype=np.float32)
    obs = np.stack([np.stack([t + 100 * s, np.full(length, s, np.float32)], -1) for s in range(streams)])
    done = np.zeros((streams, length), bool)
    done[1, 3] = done[2, 7] = True  # done at a shard's last step (7): its successor does not matter
    write_streams(tmp_path / "data", obs, np.zeros((streams, length), np.int64), np.zeros((streams, length),
                  np.float32), done, steps_per_shard=4, num_actions=2)
    data = TransitionDataset(tmp_path / "data")
    shard = data.load_shard(1, ("obs", "next_obs", "next_valid", "done"))
    now, nxt = shard["obs"][:, 0].reshape(streams, 4), shard["next_obs"][:, 0].reshape(streams, 4)
    np.testing.assert_array_equal(nxt[:, :3], now[:, 1:])
    valid = shard["next_valid"].reshape(streams, 4)
    assert valid[:, :3].all() and valid[:, 3].tolist() == [False, False, True]
    assert "next_obs" not in data.load_shard(1, ("obs",))


def test_iql_prefers_high_return_actions_where_bc_cannot(tmp_path):
    two_action_dataset(tmp_path / "data")
    cfg = config(IQLConfig, tmp_path, tmp_path / "data", "iql", total_steps=400, batch_size=128, layer_width=32,
                 log_every=100, checkpoint_every=400, actor_lr=3e-3, value_lr=3e-3, q_lr=3e-3, beta=10.0)
    result = train(cfg, IQL(cfg))
    obs = np.random.default_rng(7).integers(0, 2, (2000, 8)).astype(np.float32)
    right = (greedy_actions(result["models"][0], obs) == good_action(obs)).mean()
    assert right > 0.95, f"IQL picks the rewarded action {right:.0%} of the time"
    with torch.no_grad():
        q = result["models"][0].q_values(torch.from_numpy(obs))[0].numpy()
    assert np.abs(q[np.arange(2000), good_action(obs)] - 1.0).mean() < 0.15, "Q(s, good) = 1 (one-step episodes)"
    last = read_jsonl(tmp_path / "iql" / "metrics.jsonl")[-1]
    assert all(np.isfinite(last[k][0]) for k in ("loss/actor", "loss/value", "loss/q"))


def test_iql_propagates_value_through_next_observations(tmp_path):
    """A chain 0 -> 1 -> ... -> 7 with reward 1 only at the end: V must discount back along next_obs."""
    streams, length, chain = 4, 256, 8
    position = np.tile(np.arange(length) % chain, (streams, 1))
    obs = np.eye(chain, dtype=np.float32)[position]
    done = position == chain - 1
    reward = done.astype(np.float32)
    write_streams(tmp_path / "data", obs, np.zeros((streams, length), np.int64), reward, done,
                  steps_per_shard=32, num_actions=2)
    cfg = config(IQLConfig, tmp_path, tmp_path / "data", total_steps=1500, batch_size=128, layer_width=32,
                 log_every=500, checkpoint_every=1500, value_lr=3e-3, q_lr=3e-3, gamma=0.9, target_tau=0.05)
    model = train(cfg, IQL(cfg))["models"][0]
    with torch.no_grad():
        value = model.value_only(torch.eye(chain)).numpy()
    np.testing.assert_allclose(value, 0.9 ** np.arange(chain - 1, -1, -1), atol=0.1)


def test_iql_checkpoint_holds_the_target_networks_and_a_killed_run_resumes_exactly(tmp_path):
    scripted_dataset(tmp_path / "data", rows=1024)
    add_labels(tmp_path / "data", projection_features())
    kwargs = dict(features="hidden_state", num_seeds=2, total_steps=40, log_every=5, checkpoint_every=10)
    full = train(cfg := config(IQLConfig, tmp_path, tmp_path / "data", "full", **kwargs), IQL(cfg))
    killed_cfg = config(IQLConfig, tmp_path, tmp_path / "data", "killed", **kwargs)
    train(killed_cfg, IQL(killed_cfg), stop_after_updates=25)
    resumed = train(killed_cfg, IQL(killed_cfg))
    assert resumed["summary"]["complete"]
    for a, b in zip(full["models"], resumed["models"]):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    strip = lambda run: [{k: v for k, v in r.items() if not k.startswith("perf/")}
                         for r in read_jsonl(tmp_path / run / "metrics.jsonl")]
    assert strip("full") == strip("killed")
    payload = load_checkpoint(tmp_path / "killed")
    assert payload["algo"] == "iql" and payload["network"]["q_heads"] == 2
    assert any(k.startswith("q_target.") for k in payload["models"][0])
    policy = policies_from_checkpoint(payload)[0]
    obs, feats = torch.rand(5, 24), torch.randn(5, 6) + 5
    torch.testing.assert_close(policy(obs, feats)[0], resumed["models"][0].eval()(obs, feats)[0])


def test_iql_entry_point_trains_checkpoints_and_evaluates_in_the_game(tmp_path, classic_rollout):
    from offline_rl.iql import main as iql_main

    classic_dataset(tmp_path / "data", classic_rollout)
    iql_main(["--preset", "debug", "--dataset", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"),
              "--no-progress", "--num-seeds", "2"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and summary["algo"] == "iql" and summary["eval"]["episodes_per_seed"] == 2
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(np.isfinite(rows[-2][k]).all() for k in ("loss/actor", "loss/value", "loss/q"))
    assert 0.8 < rows[-2]["loss/next_valid_fraction"][0] <= 1.0, "one row in 16 per stream lacks its successor"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_000000010.pt", "step_000000020.pt"]
