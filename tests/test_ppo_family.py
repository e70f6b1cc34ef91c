"""PPO-RNN and the bonuses (RND, ICM, E3B): the mechanisms each one depends on, then debug runs of each."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from online_rl import ppo, ppo_rnd, ppo_rnn
from online_rl.bonuses import BonusBatch, ReturnScale, make_bonus
from online_rl.bonuses.e3b import e3b_initial, e3b_step
from online_rl.bonuses.icm import ICM, icm_losses
from utils import envs
from utils.config import apply_presets, load_presets
from utils.errors import UserError
from utils.io import read_jsonl
from utils.training import EpisodeStats, episode_metrics
from utils.trajectories import TrajectoryDataset


def debug_config(module, config_cls, tmp_path, name="run", **overrides):
    cfg = apply_presets(config_cls(), ["debug"], load_presets("online_rl", module.ALGO), "debug")
    return dataclasses.replace(cfg, run_dir=str(tmp_path / name), progress=False, **overrides)


# -- PPO-RNN ---------------------------------------------------------------------------------------


def small_rnn(num_actions=4):
    return ppo_rnn.RecurrentActorCritic(num_actions=num_actions, hidden_size=8, width=16, depth=1)


def test_gru_hidden_state_is_reset_exactly_where_an_episode_starts():
    net = small_rnn()
    T, N, D = 6, 2, 5
    obs_a = jax.random.normal(jax.random.PRNGKey(0), (T, N, D))
    # Same observations from the reset on, different before it and a different starting hidden state.
    obs_b = obs_a.at[:3].set(jax.random.normal(jax.random.PRNGKey(1), (3, N, D)))
    first = jnp.zeros((T, N), bool).at[3, 0].set(True)  # env 0 starts an episode at t=3, env 1 never
    params = net.init(jax.random.PRNGKey(2), jnp.zeros((N, 8)), obs_a, first)
    _, logits_a, _ = net.apply(params, jnp.zeros((N, 8)), obs_a, first)
    _, logits_b, _ = net.apply(params, jnp.ones((N, 8)), obs_b, first)
    np.testing.assert_allclose(logits_a[3:, 0], logits_b[3:, 0], atol=1e-6)  # forgot everything before t=3
    assert not np.allclose(logits_a[2, 0], logits_b[2, 0])  # ... but not one step earlier
    assert not np.allclose(logits_a[3:, 1], logits_b[3:, 1])  # the env without a reset keeps its memory


def test_rnn_minibatch_replay_reproduces_the_rollout_log_probs(tmp_path):
    # Tetris with random-ish early policies ends episodes within a few steps, so resets happen mid-rollout.
    cfg = debug_config(ppo_rnn, ppo_rnn.PPORNNConfig, tmp_path, env="Tetris-Placement-LinesOnly-v0", num_steps=32)
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    network = ppo_rnn.make_network(cfg, env)
    algorithm = ppo_rnn.make_train(cfg, env, total_updates=2, save_rollout=False)
    collect = jax.jit(ppo_rnn.make_collect(cfg, env, network, save_rollout=False))
    carry = jax.jit(algorithm.init)(jax.random.PRNGKey(0))
    carry, _ = collect(carry)  # start the checked rollout with non-zero hidden states
    carry, (rollout, first, init_hidden, _) = collect(carry)
    assert np.asarray(rollout.done).any() and np.abs(np.asarray(init_hidden)).sum() > 0
    np.testing.assert_array_equal(first[1:], rollout.done[:-1])

    replay = jax.jit(lambda h, obs, first, action: ppo_rnn.replay(network, carry.params, h, obs, first, action)[0])
    half = cfg.num_envs // 2
    for envs_slice in (slice(0, half), slice(half, None)):  # each minibatch is a subset of whole sequences
        log_prob = replay(init_hidden[envs_slice], rollout.obs[:, envs_slice], first[:, envs_slice],
                          rollout.action[:, envs_slice])
        np.testing.assert_allclose(log_prob, rollout.log_prob[:, envs_slice], atol=1e-5)
    without_resets = replay(init_hidden, rollout.obs, jnp.zeros_like(first), rollout.action)
    assert not np.allclose(without_resets, rollout.log_prob, atol=1e-5), "the check must depend on the resets"


# -- RND ---------------------------------------------------------------------------------------------


def test_rnd_reward_falls_on_repeatedly_seen_observations(tmp_path):
    cfg = debug_config(ppo, ppo.PPOConfig, tmp_path, bonus="rnd", rnd_layer_width=64, rnd_output_size=32, rnd_lr=1e-3)
    rnd = make_bonus(cfg, SimpleNamespace(is_pixels=False, num_actions=4))
    assert rnd.value_outputs == 2 and not rnd.episodic
    seen = jax.random.normal(jax.random.PRNGKey(0), (8, 64, 20))  # [T, N, D] observations visited again and again
    unseen = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 64, 20))
    batch = BonusBatch(seen, jnp.zeros((8, 64), jnp.int32), seen, jnp.zeros((8, 64), bool))
    state = rnd.init(jax.random.PRNGKey(2), seen[0])

    @jax.jit
    def visit(state, key):
        raw, state, _ = rnd.rewards(state, batch)
        state, key, _ = rnd.learn(state, key, batch, num_minibatches=4)
        return state, key, raw.mean()

    key, raws = jax.random.PRNGKey(3), []
    for _ in range(60):
        state, key, raw = visit(state, key)
        raws.append(float(raw))
    error = lambda obs: float(rnd.prediction_error(state, state.predictor_params, obs).mean())
    assert raws[-1] < 0.2 * raws[0]
    assert error(unseen) > 3 * error(seen)
    # The predictor's inputs are normalised by statistics of every observation scored so far.
    assert float(state.obs_stats.count) > 60 * 8 * 64 * 0.99


# -- Bonus scaling -------------------------------------------------------------------------------------


def test_normalised_bonus_does_not_depend_on_the_raw_bonus_scale():
    # ICM's and E3B's raw bonuses grow tenfold as their embeddings train; PPO only ever sees them in
    # units of the running std of their discounted return, so a scaled bonus is the same bonus.
    raw = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (16, 8))) + 0.1
    small, scale = ReturnScale.create(8).normalise(raw, 0.99)
    large, _ = ReturnScale.create(8).normalise(1000.0 * raw, 0.99)
    np.testing.assert_allclose(small, large, rtol=1e-4)
    assert float(scale.stats.count) > 16 * 8 * 0.99 and np.asarray(scale.running).shape == (8,)
    # The running return carries over from one rollout to the next (it is never cut at episode ends).
    _, after = scale.normalise(raw, 0.99)
    np.testing.assert_allclose(after.running, 0.99**16 * scale.running + scale.running, rtol=1e-5)


def test_unknown_bonus_is_a_user_error():
    with pytest.raises(UserError, match="--bonus must be one of none, icm, e3b, rnd"):
        make_bonus(SimpleNamespace(bonus="count"), None)


# -- ICM and E3B ---------------------------------------------------------------------------------------


def test_e3b_bonus_falls_for_repeated_embeddings_and_resets_at_episode_start():
    lam, z = 0.1, jnp.array([[1.0, 0.5, -0.5], [1.0, 0.5, -0.5]])
    cov = e3b_initial(2, 3, lam)
    done_at = 2  # env 1's episode ends at step 2, env 0's never
    bonuses = []
    for t in range(5):
        done = jnp.array([False, t == done_at])
        bonus, cov = e3b_step(cov, z, done, lam)
        bonuses.append(np.asarray(bonus))
    bonuses = np.array(bonuses)
    first_bonus = float(z[0] @ z[0]) / lam
    np.testing.assert_allclose(bonuses[0], first_bonus, rtol=1e-5)
    assert np.all(np.diff(bonuses[:, 0]) < 0), "seen again and again, the same embedding is less novel"
    np.testing.assert_allclose(bonuses[done_at + 1, 1], first_bonus, rtol=1e-5)  # new episode: novel again
    # Sherman-Morrison keeps the exact inverse of lambda I + sum z z^T.
    exact = np.linalg.inv(lam * np.eye(3) + 5 * np.outer(z[0], z[0]))
    np.testing.assert_allclose(cov[0], exact, rtol=1e-3, atol=1e-4)


def test_icm_forward_and_inverse_losses_fall_on_a_fixed_batch():
    num_actions, n = 5, 256
    key = jax.random.PRNGKey(0)
    obs = jax.random.normal(key, (n, 16))
    action = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, num_actions)
    # The next observation depends on the action, so both models have something to learn.
    next_obs = obs + jax.nn.one_hot(action, 16) * 2.0
    icm = ICM(num_actions, latent_size=8, width=64)
    params = icm.init(jax.random.PRNGKey(2), obs[:1], next_obs[:1], action[:1])
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def loss(params):
        forward, inverse, _ = icm_losses(icm, params, obs, next_obs, action)
        return forward + inverse, (forward, inverse)

    @jax.jit
    def step(params, opt_state):
        grads, aux = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, aux

    history = []
    for _ in range(150):
        params, opt_state, aux = step(params, opt_state)
        history.append([float(a) for a in aux])
    (forward0, inverse0), (forward1, inverse1) = history[0], history[-1]
    assert inverse1 < 0.5 * inverse0
    assert forward1 < 0.5 * forward0


# -- Floor progress ------------------------------------------------------------------------------------


def test_floor_metrics_report_each_floor_reached_and_the_deepest():
    from craftax.craftax.constants import Achievement

    achievements = jnp.zeros(len(Achievement), bool)
    achievements = achievements.at[Achievement.ENTER_DUNGEON.value].set(True)
    achievements = achievements.at[Achievement.ENTER_GNOMISH_MINES.value].set(True)
    metrics = envs.floor_metrics(SimpleNamespace(achievements=achievements))
    assert metrics["floors/reached_1_dungeon"] == 1 and metrics["floors/reached_2_gnomish_mines"] == 1
    assert metrics["floors/reached_3_sewers"] == 0 and metrics["floors/deepest"] == 2
    assert len([k for k in metrics if k.startswith("floors/reached_")]) == 8

    # Logged under their own group, as fractions of finished episodes.
    stats = EpisodeStats(count=np.array([4.0]), return_sum=np.array([0.0]), length_sum=np.array([0.0]),
                         achievement_sum=np.zeros((1, 0)),
                         metric_sums={"floors/reached_1_dungeon": np.array([1.0]), "floors/deepest": np.array([3.0])})
    logged = episode_metrics(stats, [])
    assert logged["floors/reached_1_dungeon"][0] == 0.25 and logged["floors/deepest"][0] == 0.75


def test_full_craftax_reports_floors_and_classic_does_not():
    full = envs.make("Craftax-Symbolic-v1", 2).episode_metric_names
    assert "floors/deepest" in full and "floors/reached_8_graveyard" in full
    assert envs.make("Craftax-Classic-Symbolic-v1", 2).episode_metric_names == ()


# -- Debug runs: every method trains, saves trajectories, is killed and resumes to the same state -------


METHODS = {
    "ppo_rnn": (ppo_rnn, ppo_rnn.PPORNNConfig, {}),
    "ppo_rnd": (ppo_rnd, ppo_rnd.PPORNDConfig, {}),
    "ppo_icm": (ppo, ppo.PPOConfig, {"bonus": "icm"}),
    "ppo_e3b": (ppo, ppo.PPOConfig, {"bonus": "e3b"}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_debug_run_saves_trajectories_and_resumes_to_the_same_state(tmp_path, method):
    module, config_cls, options = METHODS[method]

    def run(name, stop=None):
        cfg = debug_config(module, config_cls, tmp_path, name, num_seeds=2, eval_every=0,
                           save_trajectories=str(tmp_path / f"{name}_data"), **options)
        return module.train(cfg, stop_after_updates=stop)

    full = run("full")
    rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert full["summary"]["complete"] and [r["step"] for r in rows] == [128, 256, 384, 512]
    assert all(len(r["loss/total"]) == 2 and all(np.isfinite(r["loss/total"])) for r in rows), "per-seed losses"
    assert full["summary"]["algo"] == method  # ICM/E3B runs are filed apart from plain PPO
    extra = {"ppo_rnd": "explore/rnd_error", "ppo_icm": "explore/icm_reward", "ppo_e3b": "explore/e3b_bonus"}
    if method in extra:  # a bonus: its raw value, the normalised reward and the intrinsic value loss
        assert {extra[method], "explore/intrinsic_reward", "loss/value_int"} <= set(rows[-1])
    assert TrajectoryDataset(tmp_path / "full_data").num_transitions == 4 * 16 * 8 * 2

    run("killed", stop=2)
    resumed = run("killed")
    assert resumed["summary"]["complete"]
    for a, b in zip(jax.tree.leaves(full["carry"]), jax.tree.leaves(resumed["carry"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    full_data = TrajectoryDataset(tmp_path / "full_data").read_all(["action", "reward", "log_prob"])
    resumed_data = TrajectoryDataset(tmp_path / "killed_data").read_all(["action", "reward", "log_prob"])
    for key in full_data:
        np.testing.assert_array_equal(full_data[key], resumed_data[key])
