"""PPO end to end on the debug preset: outputs, pixels, resume equality, clear errors."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from online_rl.ppo import PPOConfig, train
from utils.config import apply_presets, load_presets
from utils.io import read_jsonl


def debug_config(tmp_path, name="run", **overrides) -> PPOConfig:
    cfg = apply_presets(PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    return dataclasses.replace(cfg, run_dir=str(tmp_path / name), progress=False, **overrides)


def test_debug_run_writes_metrics_curve_summary_and_checkpoint(tmp_path):
    cfg = debug_config(tmp_path, num_seeds=2)
    result = train(cfg)
    run = tmp_path / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [256, 512]
    assert len(rows[-1]["loss/total"]) == 2, "one value per seed"
    assert all(np.isfinite(v) for r in rows for v in r["loss/total"])
    assert "eval/return" in rows[-1] and "perf/sps" in rows[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["env_steps_per_seed"] == 512 and summary["num_seeds"] == 2
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert (run / "config.yaml").exists() and any((run / "checkpoints").iterdir())
    leaves = jax.tree.leaves(result["carry"].params)
    assert leaves[0].shape[0] == 2, "params are stacked over seeds"
    # The two seeds really are different runs.
    assert not np.array_equal(np.asarray(leaves[0][0]), np.asarray(leaves[0][1]))


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    uninterrupted = train(debug_config(tmp_path, "full"))
    killed_cfg = debug_config(tmp_path, "killed")
    partial = train(killed_cfg, stop_after_updates=2)
    assert not partial["summary"]["complete"]
    resumed = train(killed_cfg)
    assert resumed["summary"]["complete"]
    for a, b in zip(jax.tree.leaves(uninterrupted["carry"]), jax.tree.leaves(resumed["carry"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "killed" / "metrics.jsonl"))


def test_pixels_debug_run_uses_the_cnn(tmp_path):
    cfg = debug_config(tmp_path, env="Craftax-Classic-Pixels-v1", total_steps=256, eval_every=0)
    result = train(cfg)
    assert result["summary"]["complete"]
    names = set(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(result["carry"].params))
    assert any("Conv" in n for n in names)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "online_rl.ppo", *args], capture_output=True, text=True, timeout=300)


def test_cli_rejects_bad_env_and_mismatched_run_folder_with_one_line(tmp_path):
    bad = run_cli("--preset", "debug", "--env", "Craftax-Nope", "--run-dir", str(tmp_path / "a"))
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: unknown env 'Craftax-Nope'; valid names:")
    assert len(bad.stderr.strip().splitlines()) == 1

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.yaml").write_text("lr: 0.5\n")
    mismatch = run_cli("--preset", "debug", "--run-dir", str(tmp_path / "b"))
    assert mismatch.returncode == 2 and "different config" in mismatch.stderr


def test_saved_trajectories_match_training_and_survive_a_kill(tmp_path):
    from utils.trajectories import TrajectoryDataset

    def run(name, stop=None):
        cfg = debug_config(tmp_path, name, save_trajectories=str(tmp_path / f"{name}_data"), eval_every=0)
        return train(cfg, stop_after_updates=stop)

    run("full")
    full = TrajectoryDataset(tmp_path / "full_data")
    assert full.num_shards == 4 and full.num_transitions == 4 * 16 * 8
    data = full.read_all([*full.row_keys(), "terminal_obs", "terminal_rows"])
    rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert int(data["done"].sum()) == int(sum(r["episode/count"][0] for r in rows))
    assert data["obs"].shape[1:] == (1345,) and data["obs"].dtype == np.float32
    np.testing.assert_array_equal(np.sort(data["terminal_rows"]), np.flatnonzero(data["done"]))
    assert data["terminal_obs"].shape == (int(data["done"].sum()), 1345)

    run("killed", stop=2)
    run("killed")
    resumed = TrajectoryDataset(tmp_path / "killed_data").read_all(list(data))
    assert set(resumed) == set(data)
    for key in data:
        np.testing.assert_array_equal(resumed[key], data[key], err_msg=key)


def test_rerunning_a_finished_run_keeps_its_results(tmp_path):
    cfg = debug_config(tmp_path)
    first = train(cfg)
    again = train(cfg)
    assert again["summary"]["complete"] and again["summary"]["eval"] == first["summary"]["eval"] != {}
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [256, 512]
    for a, b in zip(jax.tree.leaves(first["carry"].params), jax.tree.leaves(again["carry"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ppo_trains_on_tetris_and_reports_lines(tmp_path):
    cfg = debug_config(tmp_path, env="Tetris-Placement-Standard-v0")
    summary = train(cfg)["summary"]
    assert summary["complete"]
    assert "eval/lines" in summary["eval"] and "episode/lines" in summary["final"]


# -- The composable network keeps plain PPO's parameters and initialisation --------------------------


def _reference_actor_critic():
    """The single-class ActorCritic that PPO used before torsos and heads became pieces (verbatim),
    so the test below can show the composed network initialises and computes exactly as it did."""
    import flax.linen as nn
    from flax.linen.initializers import constant, orthogonal

    from utils.networks import MLP, ConvTorso

    class ActorCritic(nn.Module):
        num_actions: int
        pixels: bool = False
        width: int = 512
        depth: int = 3
        activation: str = "tanh"

        @nn.compact
        def __call__(self, obs):
            if self.pixels:
                embedding = ConvTorso(self.width)(obs)
                actor = MLP(self.width, 1, "relu")(embedding)
                critic = MLP(self.width, 1, "relu")(embedding)
            else:
                actor = MLP(self.width, self.depth, self.activation)(obs)
                critic = MLP(self.width, self.depth, self.activation)(obs)
            logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01), bias_init=constant(0.0))(actor)
            value = nn.Dense(1, kernel_init=orthogonal(1.0), bias_init=constant(0.0))(critic)
            return logits, value[..., 0]

    return ActorCritic


@pytest.mark.parametrize("pixels", [False, True])
def test_composed_actor_critic_matches_the_previous_network_exactly(pixels):
    from utils.networks import actor_critic

    obs = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3) if pixels else (3, 40))
    old = _reference_actor_critic()(num_actions=7, pixels=pixels, width=32, depth=2)
    new = actor_critic(7, pixels, 32, 2, "tanh")
    key = jax.random.PRNGKey(1)
    old_params, new_params = old.init(key, obs[:1]), new.init(key, obs[:1])
    assert jax.tree_util.tree_structure(old_params) == jax.tree_util.tree_structure(new_params)
    for a, b in zip(jax.tree.leaves(old_params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(old.apply(old_params, obs), new.apply(new_params, obs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_actor_critic_gives_one_value_per_requested_stream():
    from utils.networks import actor_critic

    obs = jnp.ones((5, 12))
    net = actor_critic(4, False, 16, 1, "tanh", value_outputs=2)
    logits, value = net.apply(net.init(jax.random.PRNGKey(0), obs), obs)
    assert logits.shape == (5, 4) and value.shape == (5, 2)
    single = actor_critic(4, False, 16, 1, "tanh")
    assert single.apply(single.init(jax.random.PRNGKey(0), obs), obs)[1].shape == (5,)
