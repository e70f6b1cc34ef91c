"""Dreamer's building blocks (world_models/common): the maths against hand-computed values, the RSSM,
the replay, the world-model loss and the actor-critic gradients. End-to-end runs are in
test_dreamer_smoke.py."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from utils.errors import UserError
from utils.returns import lambda_returns
from world_models.common import dists
from world_models.common import replay as replay_lib
from world_models.common.config import AgentConfig, WorldModelConfig, pick
from world_models.common.dists import LatentSpec
from world_models.common.rssm import RSSM, features, init_params, initial_state, observe
from world_models.dreamer import grad_steps_per_update, make_config, parse_dreamer_config

# ---------------------------------------------------------------------------------------------------
# symlog and two-hot
# ---------------------------------------------------------------------------------------------------


def test_symlog_symexp_round_trip_without_nans_at_extremes():
    x = jnp.array([-1e8, -12345.6, -1.0, -1e-6, 0.0, 1e-6, 0.5, 1.0, 3.0, 12345.6, 1e8], jnp.float32)
    y = dists.symlog(x)
    assert np.all(np.isfinite(y)) and np.all(np.diff(np.asarray(y)) > 0), "finite and monotonic"
    np.testing.assert_allclose(dists.symexp(y), x, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dists.symlog(jnp.array([1.0, -1.0])), [np.log(2), -np.log(2)], rtol=1e-6)


def test_twohot_round_trips_and_is_a_valid_code():
    bins = dists.twohot_bins(255)
    x = jnp.array([-19.9, -3.3, -0.01, 0.0, 0.07, 1.0, 7.77, 19.99], jnp.float32)
    code = dists.twohot_encode(x, bins)
    np.testing.assert_allclose(code.sum(-1), 1.0, rtol=1e-6)
    assert int((code > 0).sum(-1).max()) <= 2 and float(code.min()) >= 0.0
    np.testing.assert_allclose(dists.twohot_decode(code, bins), x, atol=1e-5)
    # A value on a bin centre is one-hot on it.
    on_bin = dists.twohot_encode(bins[100:101], bins)
    assert float(on_bin[0, 100]) == pytest.approx(1.0)


def test_symlog_twohot_decodes_extreme_rewards_without_nans():
    bins = dists.twohot_bins(255)
    values = jnp.array([-1e8, -5.0, 0.0, 0.1, 1e8], jnp.float32)
    probs = dists.twohot_encode(dists.symlog(values), bins)
    decoded = dists.symexp(dists.twohot_decode(probs, bins))
    np.testing.assert_allclose(decoded, values, rtol=1e-4, atol=1e-5)
    # Beyond the last bin (symlog(1e10) = 23 > 20) the code saturates instead of overflowing.
    beyond = dists.twohot_encode(dists.symlog(jnp.array([1e10, -1e10])), bins)
    assert np.all(np.isfinite(beyond)) and float(beyond[0, -1]) == 1.0 and float(beyond[1, 0]) == 1.0
    loss = dists.symlog_twohot_loss(jnp.zeros((5, 255)), values, bins)
    np.testing.assert_allclose(loss, np.log(255), rtol=1e-5)  # uniform prediction: log K, never NaN


# ---------------------------------------------------------------------------------------------------
# lambda-returns
# ---------------------------------------------------------------------------------------------------


def loop_lambda_returns(rewards, discounts, next_values, lam):
    T, N = rewards.shape
    out = np.zeros((T, N))
    for n in range(N):
        following = next_values[-1, n]
        for t in reversed(range(T)):
            following = rewards[t, n] + discounts[t, n] * ((1 - lam) * next_values[t, n] + lam * following)
            out[t, n] = following
    return out


def test_lambda_returns_match_plain_loop():
    rng = np.random.default_rng(0)
    T, N = 15, 6
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    discounts = (0.99 * (rng.random((T, N)) > 0.1)).astype(np.float32)
    next_values = rng.normal(size=(T, N)).astype(np.float32)
    got = lambda_returns(rewards, discounts, next_values, 0.95)
    np.testing.assert_allclose(got, loop_lambda_returns(rewards, discounts, next_values, 0.95), rtol=1e-5, atol=1e-5)
    # lam = 0 is one-step TD; lam = 1 the discounted sum bootstrapped at the end.
    np.testing.assert_allclose(lambda_returns(rewards, discounts, next_values, 0.0),
                               rewards + discounts * next_values, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# KL regularisers
# ---------------------------------------------------------------------------------------------------

P_HALF = jnp.log(jnp.array([0.5, 0.5]))
Q_QUARTER = jnp.log(jnp.array([0.25, 0.75]))
KL_PQ = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)  # 0.14384


def test_categorical_and_gaussian_kl_match_hand_values():
    assert float(dists.categorical_kl(P_HALF, Q_QUARTER)) == pytest.approx(KL_PQ, rel=1e-5)
    # KL(N(0, 1) || N(1, 2^2)) = ln 2 + (1 + 1) / 8 - 1/2
    assert float(dists.gaussian_kl(0.0, 1.0, 1.0, 2.0)) == pytest.approx(np.log(2) + 0.25 - 0.5, rel=1e-5)
    spec = LatentSpec(discrete=True, stoch=3, classes=2)
    post, prior = jnp.stack([P_HALF] * 3), jnp.stack([Q_QUARTER] * 3)
    assert float(spec.kl(post, prior)) == pytest.approx(3 * KL_PQ, rel=1e-5), "summed over latents"


def test_v1_free_nats_clip_the_batch_mean():
    spec = LatentSpec(discrete=False, stoch=1)
    post = jnp.array([[[0.0, 1.0]], [[0.0, 1.0]]])  # two steps, one Gaussian latent
    prior = jnp.array([[[1.0, 2.0]], [[3.0, 1.0]]])  # KLs 0.4431 and 4.5
    loss, kl = dists.kl_free_nats(spec, post, prior, free_nats=3.0)
    np.testing.assert_allclose(kl, [np.log(2) + 0.25 - 0.5, 4.5], rtol=1e-5)
    assert float(loss) == pytest.approx(3.0), "mean 2.47 is below 3 free nats"
    loss, _ = dists.kl_free_nats(spec, post, prior, free_nats=1.0)
    assert float(loss) == pytest.approx((np.log(2) - 0.25 + 4.5) / 2, rel=1e-5)


def test_v2_kl_balancing_splits_the_gradient_not_the_value():
    spec = LatentSpec(discrete=True, stoch=1, classes=2)
    post, prior = P_HALF[None], Q_QUARTER[None]
    loss, kl = dists.kl_balanced(spec, post, prior, balance=0.8)
    assert float(loss) == pytest.approx(KL_PQ, rel=1e-5) and float(kl) == pytest.approx(KL_PQ, rel=1e-5)
    full_post, full_prior = jax.grad(lambda p, q: spec.kl(p, q).sum(), argnums=(0, 1))(post, prior)
    got_post, got_prior = jax.grad(lambda p, q: dists.kl_balanced(spec, p, q, 0.8)[0], argnums=(0, 1))(post, prior)
    np.testing.assert_allclose(got_prior, 0.8 * full_prior, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_post, 0.2 * full_post, rtol=1e-5, atol=1e-7)


def test_v3_free_bits_clip_after_summing_latents():
    spec = LatentSpec(discrete=True, stoch=4, classes=2)
    post, prior = jnp.stack([P_HALF] * 4)[None], jnp.stack([Q_QUARTER] * 4)[None]  # KL 4 x 0.1438 = 0.575
    loss, parts = dists.kl_free_bits(spec, post, prior, free_bits=1.0, dyn_scale=0.5, rep_scale=0.1)
    # Clipped per latent (0.1438 -> 1 each) it would be 4.0; summed first it is 0.575 -> 1.0.
    assert float(parts["dyn"]) == pytest.approx(1.0) and float(parts["rep"]) == pytest.approx(1.0)
    assert float(loss) == pytest.approx(0.5 + 0.1)
    assert float(parts["kl"][0]) == pytest.approx(4 * KL_PQ, rel=1e-5)
    grads = jax.grad(lambda p, q: dists.kl_free_bits(spec, p, q, 1.0, 0.5, 0.1)[0], argnums=(0, 1))(post, prior)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads), "under the free bits nothing is pushed"
    # Above the threshold: dyn trains the prior with weight 0.5, rep the posterior with 0.1.
    got_post, got_prior = jax.grad(lambda p, q: dists.kl_free_bits(spec, p, q, 0.1, 0.5, 0.1)[0],
                                   argnums=(0, 1))(post, prior)
    full_post, full_prior = jax.grad(lambda p, q: spec.kl(p, q).sum(), argnums=(0, 1))(post, prior)
    np.testing.assert_allclose(got_prior, 0.5 * full_prior, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_post, 0.1 * full_post, rtol=1e-5, atol=1e-7)


def test_unimix_and_straight_through_samples():
    logits = jnp.array([[30.0, 0.0, -30.0, 0.0]])
    mixed = jnp.exp(dists.unimix_logits(logits, 0.01))
    assert float(mixed.min()) >= 0.01 / 4 - 1e-7 and float(mixed.sum()) == pytest.approx(1.0, rel=1e-5)
    sample = dists.straight_through_onehot(jax.random.PRNGKey(0), logits)
    assert sorted(np.asarray(sample[0]).round(5).tolist()) == [0.0, 0.0, 0.0, 1.0]
    weights = jnp.arange(4.0)
    grad_st = jax.grad(lambda l: (dists.straight_through_onehot(jax.random.PRNGKey(0), l) * weights).sum())(logits)
    grad_probs = jax.grad(lambda l: (jax.nn.softmax(l) * weights).sum())(logits)
    np.testing.assert_allclose(grad_st, grad_probs, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# RSSM
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("discrete", [False, True], ids=["gaussian", "categorical"])
def test_rssm_shapes_and_is_first_resets(discrete):
    spec = LatentSpec(discrete=discrete, stoch=3, classes=4 if discrete else 1, unimix=0.01 if discrete else 0.0)
    rssm = RSSM(spec, deter=8, hidden=8)
    T, B, A, E = 7, 2, 5, 6
    params = init_params(rssm, jax.random.PRNGKey(0), A, E)
    embed = jax.random.normal(jax.random.PRNGKey(1), (T, B, E))
    prev_action = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(2), (T, B), 0, A), A)
    is_first = jnp.zeros((T, B), bool).at[0].set(True).at[4, 1].set(True)
    key = jax.random.PRNGKey(3)
    start = initial_state(spec, 8, (B,))
    last, post, prior = observe(rssm, params, embed, prev_action, is_first, start, key)
    assert post.deter.shape == (T, B, 8) and post.stoch.shape == (T, B, spec.sample_size)
    assert post.stats.shape == (T, B) + spec.stats_shape and prior.shape == post.stats.shape
    assert features(post).shape == (T, B, 8 + spec.sample_size) and last.deter.shape == (B, 8)

    # From step 4 on, sequence 1 must not depend on anything before its episode start.
    other_history = embed.at[:4, 1].set(embed[:4, 1] + 5.0)
    _, post_b, _ = observe(rssm, params, other_history, prev_action, is_first, start, key)
    np.testing.assert_allclose(post.deter[4:, 1], post_b.deter[4:, 1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(post.stoch[4:, 1], post_b.stoch[4:, 1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(post.deter[:, 0], post_b.deter[:, 0])  # sequence 0 was not changed
    np.testing.assert_allclose(post.stats[4:, 1], post_b.stats[4:, 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(post.stats[:4, 1], post_b.stats[:4, 1]), "before the reset the history matters"


# ---------------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------------


def synthetic_rows(num_streams, steps, seed=0):
    """Rows whose ``obs`` is (global step, episode id) per stream, episodes of random lengths."""
    rng = np.random.default_rng(seed)
    episode = np.zeros(num_streams, int)
    rows = []
    for t in range(steps):
        first = rng.random(num_streams) < 0.15 if t else np.ones(num_streams, bool)
        episode = episode + (first & (t > 0))
        obs = np.stack([np.full(num_streams, t), episode + 1000 * np.arange(num_streams)], -1).astype(np.float32)
        rows.append(dict(obs=obs, action=np.zeros(num_streams, np.int32), reward=np.zeros(num_streams, np.float32),
                         is_first=first, is_terminal=np.zeros(num_streams, bool)))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("steps", [30, 130], ids=["partly-filled", "wrapped-around"])
def test_replay_chunks_are_consecutive_and_flag_every_episode_start(steps):
    num_streams, capacity, length = 3, 50, 10
    rows = synthetic_rows(num_streams, steps)
    replay = replay_lib.empty({k: v[0] for k, v in rows.items()}, num_streams, capacity)
    for start in range(0, steps, 7):  # add in uneven blocks, as collection does
        replay = replay_lib.add(replay, {k: v[start:start + 7] for k, v in rows.items()})
    assert int(replay.count) == min(steps, capacity)
    chunk = jax.jit(lambda r, k: replay_lib.sample(r, k, 256, length))(replay, jax.random.PRNGKey(0))
    t, episode = np.asarray(chunk["obs"][..., 0]), np.asarray(chunk["obs"][..., 1])
    first = np.asarray(chunk["is_first"])
    assert t.shape == (length, 256)
    np.testing.assert_array_equal(np.diff(t, axis=0), 1, err_msg="a chunk crossed the ring's seam")
    assert t.min() >= steps - min(steps, capacity), "sampled a row that was overwritten"
    assert first[0].all(), "the first row of a chunk starts the RSSM afresh"
    changes = np.diff(episode, axis=0) != 0
    assert np.all(first[1:][changes]), "an episode start inside a chunk without is_first"
    assert np.all(changes[first[1:]]), "is_first where no episode starts"


def test_replay_add_writes_every_stream_at_the_ring_position():
    rows = synthetic_rows(2, 12)
    replay = replay_lib.empty({k: v[0] for k, v in rows.items()}, 2, 8)
    replay = replay_lib.add(replay, {k: v[:12] for k, v in rows.items()})
    assert int(replay.position) == 12 % 8 and int(replay.count) == 8
    np.testing.assert_array_equal(np.asarray(replay.data["obs"][0, :, 0]), [8, 9, 10, 11, 4, 5, 6, 7])
    latest = replay_lib.latest(replay, 3)
    np.testing.assert_array_equal(np.asarray(latest["obs"][:, 1, 0]), [9, 10, 11])


# ---------------------------------------------------------------------------------------------------
# World model and actor-critic
# ---------------------------------------------------------------------------------------------------


def tiny_config(version, **fields):
    return make_config(version, ["debug"], **fields)


def fixed_batch(obs_shape, T=8, B=4, num_actions=5, seed=0):
    """A learnable batch: observations are a fixed function of a random walk plus the action."""
    rng = np.random.default_rng(seed)
    action = rng.integers(0, num_actions, (T, B))
    position = np.cumsum(action - 2, 0) % 7
    size = int(np.prod(obs_shape))
    obs = np.stack([np.roll(np.eye(size)[0], int(p)) for p in position.reshape(-1)]).reshape((T, B) + tuple(obs_shape))
    reward = (position == 3).astype(np.float32)
    first = np.zeros((T, B), bool)
    first[0] = True
    terminal = np.zeros((T, B), bool)
    terminal[-1, 0] = True
    return dict(obs=jnp.asarray(obs, jnp.float32), action=jnp.asarray(action, jnp.int32), reward=jnp.asarray(reward),
                is_first=jnp.asarray(first), is_terminal=jnp.asarray(terminal))


@pytest.mark.parametrize("version,obs_shape", [(1, (12,)), (2, (12,)), (3, (12,)), (3, (16, 16, 3))],
                         ids=["v1", "v2", "v3", "v3-pixels"])
def test_world_model_loss_falls_on_a_fixed_batch(version, obs_shape):
    import optax

    from world_models.common.world_model import WorldModel

    cfg = tiny_config(version, cnn_stages=2)
    wm = WorldModel(pick(WorldModelConfig, cfg), obs_shape, 5)
    batch = fixed_batch(obs_shape)
    params = wm.init(jax.random.PRNGKey(0))
    opt = optax.adam(3e-3)

    @jax.jit
    def steps(params, opt_state):
        def step(state, key):
            params, opt_state = state
            (loss, (post, metrics)), grads = jax.value_and_grad(wm.loss, has_aux=True)(params, batch, key)
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), metrics
        return jax.lax.scan(step, (params, opt_state), jax.random.split(jax.random.PRNGKey(1), 60))

    _, metrics = steps(params, opt.init(params))
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    # (diag/reward_pred_neg is NaN by design: this batch has no negative reward)
    assert all(np.all(np.isfinite(v)) for k, v in metrics.items() if k.startswith("loss/"))
    assert metrics["loss/model"][-10:].mean() < metrics["loss/model"][:5].mean()
    # Without the KL term (V1's free nats keep it at a constant 3) the predictions improve a lot.
    predictions = metrics["loss/model"] - metrics["loss/kl_term"]
    assert predictions[-10:].mean() < 0.6 * predictions[:5].mean()


def test_actor_gradients_go_through_dynamics_only_in_v1():
    """With the entropy bonus off, V2/V3 learn only from log-probability times advantage, so an actor
    whose advantages are all zero gets no gradient; V1 still does, through the imagined dynamics."""
    from world_models.common.agent import Agent

    grads_by_version = {}
    for version in (1, 3):
        cfg = tiny_config(version, actor_entropy=0.0)
        agent = Agent(AgentConfig.from_fields(cfg), (12,), 5)
        state = jax.jit(agent.init)(jax.random.PRNGKey(0))
        start = agent.wm.initial_state((6,))
        start = start._replace(deter=jax.random.normal(jax.random.PRNGKey(1), start.deter.shape))

        def loss(actor_params):
            return agent.ac.actor_loss(actor_params, agent.wm, state.params["wm"], state.params["critic"],
                                       state.params["slow_critic"], state.retnorm, start, jnp.ones(6),
                                       jax.random.PRNGKey(2))[0]

        grads = jax.jit(jax.grad(loss))(state.params["actor"])
        grads_by_version[version] = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    # Freshly initialised V3 reward and critic heads predict 0 (zero-initialised two-hot heads), so
    # every advantage is 0 up to float rounding; V1's returns depend on the actions through the model.
    assert grads_by_version[3] < 1e-6
    assert grads_by_version[1] > 1e-3


def test_return_normaliser_tracks_percentiles_with_a_floor_of_one():
    from world_models.common.behavior import ReturnNorm

    returns = jnp.linspace(0.0, 100.0, 1001)
    norm = ReturnNorm.initial().update(returns, decay=0.0)
    assert float(norm.low) == pytest.approx(5.0, rel=1e-4) and float(norm.high) == pytest.approx(95.0, rel=1e-4)
    assert float(norm.scale()) == pytest.approx(90.0, rel=1e-4)
    small = ReturnNorm.initial().update(jnp.linspace(0.0, 0.1, 11), decay=0.0)
    assert float(small.scale()) == 1.0, "small returns are not blown up"
    ema = ReturnNorm(jnp.float32(0.0), jnp.float32(10.0)).update(returns, decay=0.99)
    assert float(ema.high) == pytest.approx(0.99 * 10 + 0.01 * 95, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def test_version_picks_its_paper_defaults_before_other_presets():
    v1 = parse_dreamer_config(["--version", "1"])
    v2 = parse_dreamer_config(["--version=2", "--preset", "xs"])
    v3 = parse_dreamer_config(["--preset", "debug", "--batch-length", "16"])
    assert (v1.version, v1.free_nats, v1.act, v1.norm, v1.batch_size) == (1, 3.0, "elu", False, 50)
    assert (v2.version, v2.kl_balance, v2.kl_scale, v2.deter, v2.units, v2.preset) == (2, 0.8, 0.1, 256, 256, ("xs",))
    assert (v3.version, v3.unimix, v3.dyn_scale, v3.rep_scale, v3.bins) == (3, 0.01, 0.5, 0.1, 255)
    assert v3.batch_length == 16 and v3.deter == 16, "flags after presets, presets after the version"
    with pytest.raises(UserError, match="--version must be one of 1, 2, 3"):
        parse_dreamer_config(["--version", "4"])


def test_train_ratio_must_give_whole_gradient_steps():
    cfg = tiny_config(3)
    assert grad_steps_per_update(cfg) == cfg.train_ratio * cfg.num_envs * cfg.collect_steps // 32
    with pytest.raises(UserError, match="e.g. --collect-steps 8"):
        grad_steps_per_update(dataclasses.replace(cfg, train_ratio=1.0, collect_steps=1))


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_dreamer_config(["--help"])
    out = capsys.readouterr().out
    for field in ("--version", "--train-ratio", "--free-nats", "--kl-balance", "--imag-horizon", "--num-seeds",
                  "--fast-compile", "--preset", "--latent", "--recon", "--reward-head", "--critic-head", "--kl",
                  "--actor-grad", "--return-norm", "--slow-critic", "--slow-critic-returns", "--symlog-inputs"):
        assert field in out


# ---------------------------------------------------------------------------------------------------
# Collection: terminal rows and episode starts
# ---------------------------------------------------------------------------------------------------


class CountingEnv:
    """A tiny Craftax-shaped env: obs ``[t, episode marker]``, reward ``t`` after each step, and the
    episode ends when ``t`` reaches 3 (so three transitions and four observations per episode)."""

    num_actions = 3
    default_params = None

    def observation_space(self, params):
        return jax.ShapeDtypeStruct((2,), jnp.float32)

    def reset(self, key, params):
        marker = jax.random.uniform(key, minval=1.0, maxval=2.0)
        state = (jnp.int32(0), marker)
        return jnp.stack([0.0, marker]), state

    def step(self, key, state, action, params):
        t, marker = state
        t = t + 1
        return jnp.stack([t.astype(jnp.float32), marker]), (t, marker), t.astype(jnp.float32), t >= 3, {}


def test_collection_shows_the_terminal_observation_then_the_first_of_the_next_episode():
    from utils.envs import VecEnv
    from world_models.dreamer import make_train

    env = VecEnv(CountingEnv(), name="Counting", num_envs=2, reset_ratio=1, achievement_names=("a",),
                 achievements_fn=lambda state: jnp.zeros(1))
    cfg = tiny_config(3, num_envs=2, collect_steps=16, train_ratio=1.0, prefill=100, replay_size=64,
                      symbolic_storage="float32")
    program = make_train(cfg, env)
    carry = jax.jit(program.init)(jax.random.PRNGKey(0))
    carry, stats = jax.jit(program.collect)(carry)
    data = jax.tree.map(np.asarray, carry.replay.data)
    t = data["obs"][:, :16, 0]
    np.testing.assert_array_equal(t, np.tile([0, 1, 2, 3], (2, 4)))
    np.testing.assert_array_equal(data["is_first"][:, :16], np.tile([True, False, False, False], (2, 4)))
    np.testing.assert_array_equal(data["is_terminal"][:, :16], np.tile([False, False, False, True], (2, 4)))
    np.testing.assert_array_equal(data["reward"][:, :16], np.tile([0.0, 1.0, 2.0, 3.0], (2, 4)))
    marker = data["obs"][:, :16, 1].reshape(2, 4, 4)
    assert np.all(marker == marker[:, :, :1]), "one episode's rows keep its marker, terminal row included"
    assert np.all(np.diff(marker[:, :, 0], axis=1) != 0), "a fresh episode follows each terminal row"
    # Four episodes per env ended (the steps discarded after terminal rows are not episodes).
    assert float(stats.count) == 8 and float(stats.return_sum) == 8 * 6 and float(stats.length_sum) == 8 * 3
    assert int(carry.env_steps) == 16 and int(carry.replay.count) == 16


def test_prefill_skips_training_for_every_seed_with_a_real_branch():
    """Seeds train together; whether an update trains must stay a ``cond`` (a branch) in the compiled
    chunk. Decided per seed under vmap it becomes a select that runs the gradient steps in the prefill."""
    from utils.envs import VecEnv
    from world_models.dreamer import init_seeds, make_train

    env = VecEnv(CountingEnv(), name="Counting", num_envs=2, reset_ratio=1, achievement_names=("a",),
                 achievements_fn=lambda state: jnp.zeros(1))
    cfg = tiny_config(3, num_envs=2, collect_steps=4, train_ratio=4.0, prefill=8, replay_size=64, batch_size=2,
                      batch_length=4, symbolic_storage="float32")
    program = make_train(cfg, env)
    carry = init_seeds(program, env, jax.random.split(jax.random.PRNGKey(0), 2))
    jaxpr = str(jax.make_jaxpr(lambda c: program.train_chunk(c, 1))(carry))
    assert " cond[" in jaxpr
    carry, (_, metrics) = jax.jit(lambda c: program.train_chunk(c, 3))(carry)
    grad_steps = np.asarray(metrics["perf/grad_steps"])
    assert grad_steps.shape == (2, 3)
    np.testing.assert_array_equal(grad_steps[:, 0], [0, 0])  # 4 env steps per env: still prefilling
    assert np.all(grad_steps[:, 2] > grad_steps[:, 1]) and np.all(grad_steps[:, 1] > 0)
    assert np.isnan(np.asarray(metrics["loss/model"])[:, 0]).all()


def test_openloop_errors_leave_out_steps_after_a_new_episode_starts(tmp_path):
    from world_models.common.report import write_report

    T, B, context = 6, 2, 2
    reward = np.zeros((T, B), np.float32)
    reward_pred = np.full((T, B), 1.0, np.float32)
    reward_pred[4:, 1] = 100.0  # sequence 1 starts a new episode at step 4: unpredictable from actions
    is_first = np.zeros((T, B), np.float32)
    is_first[0] = 1
    is_first[4, 1] = 1
    obs = np.zeros((T, B, 3), np.float32)
    result = dict(obs=obs, obs_pred=obs + 2.0, reward=reward, reward_pred=reward_pred, is_first=is_first)
    metrics = write_report(result, tmp_path, context, pixels=False)
    assert metrics["eval/openloop_reward_mae"] == pytest.approx(1.0)
    assert metrics["eval/openloop_obs_mse"] == pytest.approx(4.0)
    assert (tmp_path / "imagined_rewards.png").exists()


# ---------------------------------------------------------------------------------------------------
# Named settings: the presets v1..v3 set them, any mix runs, and the presets compute what the
# version switches did
# ---------------------------------------------------------------------------------------------------


def test_version_presets_set_the_named_settings_of_each_paper():
    names = ("latent", "symlog_inputs", "recon", "reward_head", "critic_head", "kl", "actor_grad", "return_norm",
             "slow_critic", "slow_critic_returns", "unimix", "slow_critic_reg", "actor_init_scale")
    got = {v: tuple(getattr(make_config(v), n) for n in names) for v in (1, 2, 3)}
    assert got[1] == ("gaussian", False, "gaussian", "gaussian", "gaussian", "free_nats", "dynamics", "none", "none",
                      False, 0.0, 0.0, 1.0)
    assert got[2] == ("categorical", False, "gaussian", "gaussian", "gaussian", "balanced", "reinforce", "none",
                      "copy", True, 0.0, 0.0, 1.0)
    assert got[3] == ("categorical", True, "symlog_mse", "symlog_twohot", "symlog_twohot", "free_bits", "reinforce",
                      "percentile", "ema", False, 0.01, 1.0, 0.01)
    assert parse_dreamer_config(["--version", "3", "--latent", "gaussian"]).latent == "gaussian", "flags win"
    assert make_config(3).version == 3 and make_config(2, ["debug"]).return_norm == "none"


#: Recorded with the version switches the named settings replaced (commit 6bd2d49), by the same calls as
#: below: three gradient steps of the debug-sized agent on ``fixed_batch((12,))`` with
#: ``target_update_every=2`` (so V2's copy happens): leaves and parameters per group, the sum of absolute
#: parameter values after the steps, and the last step's metrics. The refactored code gave them bit for
#: bit on the CPU, as it did the metrics of a 6-update debug chunk on Classic per version.
REFERENCE = {
    1: dict(
        params={'actor': (4, 421), 'critic': (4, 353), 'slow_critic': (4, 353), 'wm': (26, 4270)},
        param_abs_sum={'actor': 77.9278, 'critic': 63.90222, 'slow_critic': 63.90274, 'wm': 705.2472},
        metrics={'loss/model': 5.218651, 'loss/recon': 1.529876, 'loss/reward': 0.03181852, 'loss/cont': 0.656956, 'loss/kl': 0.2056107, 'loss/kl_term': 3.0, 'loss/actor': -0.03491272, 'loss/actor_entropy': 1.548436, 'loss/critic': 0.02624784, 'loss/imag_return': 0.06943034, 'loss/imag_value': 0.03196298}),
    2: dict(
        params={'actor': (5, 629), 'critic': (5, 561), 'slow_critic': (5, 561), 'wm': (34, 5470)},
        param_abs_sum={'actor': 108.3816, 'critic': 95.93116, 'slow_critic': 95.92767, 'wm': 984.7076},
        metrics={'loss/model': 6.042406, 'loss/recon': 4.770486, 'loss/reward': 0.5816106, 'loss/cont': 0.5711019, 'loss/kl': 1.192073, 'loss/kl_term': 0.1192073, 'loss/actor': -0.824761, 'loss/actor_entropy': 1.452291, 'loss/critic': 0.6763752, 'loss/imag_return': -1.010501, 'loss/imag_value': -0.1718753}),
    3: dict(
        params={'actor': (5, 629), 'critic': (5, 4879), 'slow_critic': (5, 4879), 'wm': (34, 9788)},
        param_abs_sum={'actor': 91.29549, 'critic': 93.44785, 'slow_critic': 93.09634, 'wm': 982.7736},
        metrics={'loss/model': 10.77703, 'loss/recon': 4.105506, 'loss/reward': 5.539311, 'loss/cont': 0.5264481, 'loss/kl': 0.6450465, 'loss/kl_term': 0.6057641, 'loss/actor': -0.0002430844, 'loss/actor_entropy': 1.609427, 'loss/critic': 6.072406, 'loss/imag_return': 2.124601e-05, 'loss/imag_value': -7.199124e-08, 'loss/return_scale': 1.0}),
}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_presets_reproduce_the_losses_of_the_version_switches(version):
    from world_models.common.agent import Agent

    agent = Agent(AgentConfig.from_fields(tiny_config(version, target_update_every=2)), (12,), 5)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    step, batch = jax.jit(agent.train_step), fixed_batch((12,))
    for i in range(3):
        state, metrics = step(state, batch, jax.random.PRNGKey(10 + i))
    reference = REFERENCE[version]
    groups = {k: (len(jax.tree.leaves(v)), sum(x.size for x in jax.tree.leaves(v))) for k, v in state.params.items()}
    assert groups == reference["params"]
    for group, total in reference["param_abs_sum"].items():
        got = float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(state.params[group])))
        assert got == pytest.approx(total, rel=1e-5), group
    for key, value in reference["metrics"].items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_common_modules_switch_on_named_settings_not_versions():
    from pathlib import Path

    import world_models.common

    for path in Path(world_models.common.__file__).parent.glob("*.py"):
        assert not re.search(r"\bversion\s*[=!<>]=|\.version\b", path.read_text()), path.name


@pytest.mark.parametrize("field,value,message", [
    ("latent", "gauss", "--latent must be one of gaussian, categorical, got 'gauss'"),
    ("actor_grad", "backprop", "--actor-grad must be one of dynamics, reinforce, mix"),
    ("actor_grad_mix", 1.5, "--actor-grad-mix must be in"),
    ("slow_critic", "none", "--slow-critic-returns and --slow-critic-reg need --slow-critic copy or ema"),
])
def test_named_settings_outside_their_choices_are_user_errors(field, value, message):
    from world_models.dreamer import validate

    with pytest.raises(UserError, match=re.escape(message)):
        validate(tiny_config(3, **{field: value}))


@pytest.mark.parametrize("version,settings", [
    (3, dict(latent="gaussian", reward_head="symexp_twohot", critic_head="symexp_twohot", replay_value_scale=0.3,
             imag_cont="mode", imag_starts=6, replay_context=True)),
    (2, dict(return_norm="percentile", actor_grad="mix", critic_head="symlog_twohot", slow_critic="ema",
             slow_critic_returns=False, slow_critic_reg=1.0, imag_starts=5, dyn_inputs="split")),
], ids=["v3-gaussian-latent-symexp-heads-replay-value-6-starts-replay-context",
        "v2-return-norm-mixed-gradient-two-hot-critic-5-starts-split-dynamics-inputs"])
def test_mixed_settings_train_a_chunk(version, settings):
    """Ablations are flags on top of a version's preset: the whole program compiles and trains."""
    from utils.envs import VecEnv
    from world_models.dreamer import init_seeds, make_train

    env = VecEnv(CountingEnv(), name="Counting", num_envs=2, reset_ratio=1, achievement_names=("a",),
                 achievements_fn=lambda state: jnp.zeros(1))
    cfg = tiny_config(version, num_envs=2, collect_steps=4, train_ratio=4.0, prefill=8, replay_size=64, batch_size=2,
                      batch_length=4, symbolic_storage="float32", **settings)
    program = make_train(cfg, env)
    carry = init_seeds(program, env, jax.random.PRNGKey(0)[None])
    carry, (_, metrics) = jax.jit(lambda c: program.train_chunk(c, 4))(carry)
    trained = np.asarray(metrics["perf/grad_steps"])[0] > 0
    assert trained[-1] and int(carry.agent.grad_steps[0]) > 0
    for key in ("loss/model", "loss/kl", "loss/actor", "loss/critic", "loss/imag_return"):
        assert np.all(np.isfinite(np.asarray(metrics[key])[0][trained])), key
    latent = carry.collector.policy_state[0]
    if settings.get("latent") == "gaussian":
        assert latent.stats.shape[-1] == 2 and latent.stoch.shape[-1] == cfg.stoch, "mean and std per dimension"
        assert program.agent.wm.reward_out.kind == program.agent.ac.critic_out.kind == "symexp_twohot"
        assert np.all(np.isfinite(np.asarray(metrics["loss/replay_value"])[0][trained]))
    if settings.get("return_norm") == "percentile":
        assert np.all(np.asarray(metrics["loss/return_scale"])[0][trained] >= 1.0)
        assert program.agent.ac.critic_out.size == cfg.bins and program.agent.wm.reward_out.size == 1
        assert program.agent.ac.critic_out.kind == "symlog_twohot" and "loss/replay_value" not in metrics
    if settings.get("replay_context"):
        written = np.asarray(carry.replay.data["stoch"])[0, :, :int(carry.replay.count[0])]
        assert written.dtype == np.float16 and np.any(written != 0), "Gaussian samples stored as they are"
    rssm_layers = set(carry.agent.params["wm"]["rssm"]["params"])
    if settings.get("dyn_inputs") == "split":
        assert {"deter_in", "stoch_in", "action_in"} <= rssm_layers and "img_in" not in rssm_layers


# ---------------------------------------------------------------------------------------------------
# Options of the current DreamerV3 code, the V2 Crafter preset and the world-model diagnostics
# ---------------------------------------------------------------------------------------------------


def test_symexp_twohot_head_reads_out_in_raw_space_and_is_zero_when_uniform():
    head = dists.ScalarHead.make("symexp_twohot", 255)
    bins = np.asarray(head.bins)
    np.testing.assert_array_equal(bins, -bins[::-1])  # exactly symmetric
    assert bins[127] == 0.0 and bins[-1] == pytest.approx(np.expm1(20.0), rel=1e-5) and head.out_scale == 0.0
    assert float(head.mean(jnp.zeros(255))) == 0.0, "a zero-initialised head predicts exactly 0"
    values = jnp.array([-300.0, -1.0, 0.0, 0.3, 1.0, 7.0, 12345.0])
    code = dists.twohot_encode(values, head.bins)
    np.testing.assert_allclose(head.mean(jnp.log(code + 1e-30)), values, rtol=1e-4, atol=1e-5)
    # The loss is the cross-entropy against that code: lowest for logits that put it exactly.
    exact, off = head.loss(jnp.log(code + 1e-30), values), head.loss(jnp.log(jnp.roll(code, 1, -1) + 1e-30), values)
    assert np.all(np.asarray(exact) < np.asarray(off))
    even = dists.symexp_bins(4)
    np.testing.assert_array_equal(np.asarray(even), -np.asarray(even)[::-1])


def test_replay_value_loss_regresses_real_lambda_returns_bootstrapped_from_imagination():
    from world_models.common.behavior import ActorCritic, ReplayTargets
    from world_models.common.config import ActorCriticConfig

    cfg = pick(ActorCriticConfig, tiny_config(1, gamma=0.9, lam=0.8, slow_critic="copy", replay_value_scale=0.3))
    ac = ActorCritic(cfg, 6, 3)
    _, critic = ac.init(jax.random.PRNGKey(0))
    T, B = 6, 2
    rng = np.random.default_rng(0)
    feat = jnp.asarray(rng.normal(size=(T, B, 6)), jnp.float32)
    reward = rng.normal(size=(T, B)).astype(np.float32)
    terminal = np.zeros((T, B), bool)
    terminal[3, 1] = True
    boot = rng.normal(size=(T, B)).astype(np.float32)
    loss = ac.replay_value_loss(critic, critic, ReplayTargets(feat, jnp.asarray(reward), jnp.asarray(terminal),
                                                              jnp.asarray(boot)))
    expected = loop_lambda_returns(reward[1:], 0.9 * (1 - terminal[1:]), boot[1:], 0.8)  # [T - 1, B]
    values = np.asarray(ac.value(critic, feat))[:-1]
    weight = 1.0 - terminal[:-1]
    assert float(loss) == pytest.approx(float((weight * 0.5 * (values - expected) ** 2).mean()), rel=1e-5)
    assert expected[2, 1] == pytest.approx(reward[3, 1]), "the step before a terminal row sees only its reward"


def test_diagnostics_average_over_the_gradient_steps_whose_batch_had_such_steps():
    """A batch without a rewarded step has no reward-head mean on rewarded steps (NaN); the update's value
    is the mean over the batches that had some, while a NaN loss is not hidden."""
    from world_models.dreamer import grad_step_means

    means = grad_step_means({"diag/reward_pred_pos": jnp.array([jnp.nan, 0.2, jnp.nan, 0.4]),
                             "diag/reward_pred_neg": jnp.full(4, jnp.nan),
                             "loss/model": jnp.array([1.0, jnp.nan, 3.0, 4.0]),
                             "loss/kl": jnp.array([1.0, 2.0, 3.0, 6.0])})
    assert float(means["diag/reward_pred_pos"]) == pytest.approx(0.3)
    assert np.isnan(float(means["diag/reward_pred_neg"])), "no batch had such a step"
    assert np.isnan(float(means["loss/model"])) and float(means["loss/kl"]) == 3.0


def test_replay_value_bootstraps_from_the_critic_where_no_imagination_started():
    """With ``imag_starts`` only the picked replayed states have an imagined return; the rest bootstrap
    from the critic's value, so the replay-value loss works at any number of imagination starts."""
    from utils.envs import VecEnv
    from world_models.dreamer import init_seeds, make_train

    env = VecEnv(CountingEnv(), name="Counting", num_envs=2, reset_ratio=1, achievement_names=("a",),
                 achievements_fn=lambda state: jnp.zeros(1))
    cfg = tiny_config(3, num_envs=2, batch_size=2, batch_length=4, imag_starts=3, replay_value_scale=0.3)
    program = make_train(cfg, env)
    params = jax.tree.map(lambda x: x[0], init_seeds(program, env, jax.random.PRNGKey(0)[None]).agent.params)
    agent, T, B = program.agent, 4, 2
    leaves, tree = jax.tree.flatten(params["critic"])  # V3's output layer starts at zero: values would all be 0
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params["critic"] = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    post = agent.wm.initial_state((T, B))
    post = post._replace(deter=jax.random.normal(jax.random.PRNGKey(1), post.deter.shape))
    batch = {"reward": jnp.arange(T * B, dtype=jnp.float32).reshape(T, B), "is_terminal": jnp.zeros((T, B), bool)}
    picked, start_returns = jnp.array([6, 0, 3]), jnp.array([100.0, 200.0, 300.0])
    targets = agent._replay_targets(params, post, batch, start_returns, picked)
    boot = np.asarray(targets.boot).reshape(-1)
    np.testing.assert_array_equal(boot[[6, 0, 3]], [100.0, 200.0, 300.0])
    values = np.asarray(agent.ac.value(params["critic"], features(post))).reshape(-1)
    others = [i for i in range(T * B) if i not in (6, 0, 3)]
    np.testing.assert_allclose(boot[others], values[others], rtol=1e-6)
    assert len(set(np.round(values[others], 6))) > 1, "distinct states, distinct values"
    everything = agent._replay_targets(params, post, batch, jnp.arange(T * B, dtype=jnp.float32), None)
    np.testing.assert_array_equal(np.asarray(everything.boot), np.arange(T * B).reshape(T, B))


def test_mode_continuation_ends_imagined_episodes_outright():
    """With ``--imag-cont mode`` nothing after a likely end is weighted, so a large reward on ending is
    counted once, not again at every later imagined step (docs/results.md, Tetris)."""
    from world_models.common.behavior import continuation

    prob = jnp.array([0.9, 0.6, 0.3, 0.8])
    np.testing.assert_array_equal(continuation(prob, "mode"), [1.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(continuation(prob, "prob"), prob)
    # An imagined state the model thinks over (continue 0.45) and that pays 10 on ending, imagined on
    # past its end: each later step pays the ending reward again, weighted by the continuation so far.
    ending = jnp.full(6, 0.45)
    collected = {readout: float((np.cumprod(np.concatenate([[1.0], continuation(ending, readout)[:-1]])) * 10.0).sum())
                 for readout in ("prob", "mode")}
    assert collected["mode"] == pytest.approx(10.0) and collected["prob"] > 18.0
    assert make_config(3, ["tetris_placement"]).imag_cont == "mode" and make_config(3).imag_cont == "prob"


def test_v2_crafter_preset_has_the_crafter_settings():
    cfg = make_config(2, ["v2_crafter"], num_envs=16)
    assert (cfg.kl_scale, cfg.model_lr, cfg.actor_lr, cfg.critic_lr, cfg.actor_entropy) == (1.0, 1e-4, 1e-4, 1e-4, 3e-3)
    assert (cfg.kl, cfg.actor_grad, cfg.slow_critic, cfg.deter) == ("balanced", "reinforce", "copy", 1024)
    assert grad_steps_per_update(cfg) == 16, "160 replayed steps per env step: 16 x 5 x 160 / (16 x 50)"


def test_craftax_cpu_preset_speeds_up_imagination_and_the_world_model_and_keeps_the_actor_exploring():
    base, cfg = make_config(3, ["xs", "cpu"]), make_config(3, ["xs", "cpu", "craftax_cpu"])
    assert (cfg.imag_starts, cfg.model_lr) == (64, 1e-3) and cfg.imag_starts < cfg.batch_size * cfg.batch_length
    assert (base.actor_entropy, cfg.actor_entropy) == (3e-4, 3e-3), "DreamerV2's Crafter entropy bonus"
    assert (cfg.actor_lr, cfg.critic_lr, cfg.train_ratio) == (base.actor_lr, base.critic_lr, base.train_ratio) == (3e-5, 3e-5, 32)
    assert grad_steps_per_update(cfg) == 4, "train ratio 32: 16 envs x 4 steps x 32 / (16 x 32)"


def test_tetris_placement_preset_gives_the_world_model_the_craftax_cpu_rate():
    """Both CPU presets are paced by how soon the reward head learns a rare reward (line clears,
    achievements), so both give the world model 10x V3's rate (docs/results.md, Tetris)."""
    base = make_config(3, ["xs", "cpu"])
    tetris = make_config(3, ["xs", "cpu", "tetris_placement"])
    craftax = make_config(3, ["xs", "cpu", "craftax_cpu"])
    assert tetris.model_lr == craftax.model_lr == 10 * base.model_lr
    assert (tetris.actor_lr, tetris.critic_lr, tetris.imag_starts) == (1e-4, 1e-4, 64)
    assert tetris.checkpoint_every < base.checkpoint_every, "a run of a session's length loses minutes when cut"


def test_world_model_diagnostics_on_a_fixed_batch():
    from world_models.common.world_model import WorldModel

    cfg = tiny_config(3)
    wm = WorldModel(pick(WorldModelConfig, cfg), (12,), 5)
    batch = fixed_batch((12,))
    batch["reward"] = batch["reward"].at[1, 0].set(-1.0)
    params = wm.init(jax.random.PRNGKey(0))
    params["reward"] = jax.tree.map(lambda x: x + 0.05, params["reward"])  # not the zero-initialised output
    _, (post, metrics) = jax.jit(wm.loss)(params, batch, jax.random.PRNGKey(1))
    pred = np.asarray(wm.reward(params, features(post)))
    reward = np.asarray(batch["reward"])
    for name, mask in (("pos", reward > 0.5), ("zero", reward == 0), ("neg", reward < 0)):
        assert mask.any()
        assert float(metrics[f"diag/reward_pred_{name}"]) == pytest.approx(pred[mask].mean(), rel=1e-4, abs=1e-6)
    target = np.asarray(dists.symlog(batch["obs"])).reshape(8, 4, 12)
    baseline = ((target - target.mean((0, 1))) ** 2).sum(-1).mean()
    assert float(metrics["diag/recon_mean_baseline"]) == pytest.approx(baseline, rel=1e-5)
    top = np.asarray(post.stats).argmax(-1).reshape(-1, cfg.stoch)  # [steps, latents]
    used = np.mean([len(set(top[:, i])) for i in range(cfg.stoch)])
    assert float(metrics["diag/post_used_classes"]) == pytest.approx(used) and 1 <= used <= cfg.classes
    assert "diag/reward_pred_first" not in metrics, "a batch without achievement events has no such split"

    # Rows with achievement events: first unlocks (paid) and repeats (the same deed again, not paid).
    unlock = np.full((8, 4), -1, np.int8)
    first = np.zeros((8, 4), bool)
    unlock[2, 1], first[2, 1] = 3, True
    unlock[5, 1] = 3  # wood collected again in the same episode
    unlock[4, 2], unlock[6, 3], first[6, 3] = 0, 7, True
    batch.update(unlock=jnp.asarray(unlock), unlock_first=jnp.asarray(first))
    _, (_, metrics) = jax.jit(wm.loss)(params, batch, jax.random.PRNGKey(1))
    assert float(metrics["diag/reward_pred_first"]) == pytest.approx(pred[first].mean(), rel=1e-4, abs=1e-6)
    repeat = (unlock >= 0) & ~first
    assert repeat.sum() == 2 and float(metrics["diag/reward_pred_repeat"]) == pytest.approx(pred[repeat].mean(),
                                                                                              rel=1e-4, abs=1e-6)
    assert float(metrics["diag/reward_pred_pos"]) == pytest.approx(pred[reward > 0.5].mean(), rel=1e-4, abs=1e-6)


def test_actor_diagnostics_set_advantages_against_the_return_scale_and_entropy():
    """``diag/adv_norm_abs_mean`` is what the actor's REINFORCE term sees; next to ``actor_entropy`` times
    ``diag/actor_entropy`` it says whether the entropy bonus drowns the advantages."""
    from world_models.common.behavior import ActorCritic, ReturnNorm
    from world_models.common.config import ActorCriticConfig

    rng = np.random.default_rng(0)
    H, N = 5, 7
    returns = rng.normal(0.0, 3.0, (H, N)).astype(np.float32)
    values = rng.normal(0.0, 1.0, (H + 1, N)).astype(np.float32)
    weight = rng.uniform(0.2, 1.0, (H, N)).astype(np.float32)
    entropy = rng.uniform(1.0, 2.8, (H, N)).astype(np.float32)
    retnorm = ReturnNorm(jnp.float32(-2.0), jnp.float32(2.5))
    advantage = np.abs(returns - values[:-1])
    for norm, scale in (("percentile", 4.5), ("none", 1.0)):
        ac = ActorCritic(pick(ActorCriticConfig, tiny_config(3, return_norm=norm)), 6, 3)
        metrics = ac.diagnostics(jnp.asarray(returns), jnp.asarray(values), jnp.asarray(weight), jnp.asarray(entropy),
                                 retnorm)
        assert float(metrics["diag/return_scale"]) == pytest.approx(scale)
        low, high = np.percentile(returns, [5, 95])
        assert float(metrics["diag/return_range"]) == pytest.approx(high - low, rel=1e-5)
        adv = (weight * advantage).sum() / weight.sum()
        assert float(metrics["diag/adv_abs_mean"]) == pytest.approx(adv, rel=1e-5)
        assert float(metrics["diag/adv_norm_abs_mean"]) == pytest.approx(adv / scale, rel=1e-5)
        mean_entropy = (weight * entropy).sum() / weight.sum()
        assert float(metrics["diag/actor_entropy"]) == pytest.approx(mean_entropy, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Replay context: stored latents start the replayed chunks and are refreshed by training
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
def test_packed_latents_round_trip(discrete):
    from world_models.common.rssm import pack, unpack

    spec = LatentSpec(discrete=discrete, stoch=3, classes=4 if discrete else 1)
    rssm = RSSM(spec, deter=8, hidden=8)
    embed = jax.random.normal(jax.random.PRNGKey(1), (6, 2, 5))
    post = observe(rssm, init_params(rssm, jax.random.PRNGKey(0), 2, 5), embed, jnp.zeros((6, 2, 2)),
                   jnp.zeros((6, 2), bool).at[0].set(True), initial_state(spec, 8, (2,)), jax.random.PRNGKey(2))[1]
    packed = pack(spec, post)
    assert packed["deter"].dtype == jnp.float16 and packed["stoch"].dtype == (jnp.uint8 if discrete else jnp.float16)
    back = unpack(spec, packed)
    np.testing.assert_allclose(back.deter, post.deter, atol=1e-3)
    np.testing.assert_allclose(back.stoch, post.stoch, atol=1e-6 if discrete else 2e-3 * np.abs(post.stoch).max())
    assert back.stats.shape == post.stats.shape


def context_replay(agent, num_streams=3, steps=20, seed=0):
    """A replay of one long episode per stream whose stored latents are a sentinel (-0.5 everywhere, not
    a state any observed row has), so a written row shows."""
    batch = fixed_batch((12,), T=steps, B=num_streams, seed=seed)
    batch["is_terminal"] = jnp.zeros_like(batch["is_terminal"])
    example = {k: v[0] for k, v in batch.items()}
    latent = agent.wm.initial_state((num_streams,))
    fields = agent.replay_fields((latent._replace(deter=latent.deter - 0.5), None))
    replay = replay_lib.empty({**example, **fields}, num_streams, steps)
    rows = {**batch, **{k: jnp.broadcast_to(v, (steps,) + v.shape) for k, v in fields.items()}}
    return replay_lib.add(replay, rows)


def test_replay_context_starts_from_the_latent_the_previous_pass_wrote_and_refreshes_exactly_the_replayed_rows():
    from world_models.common.agent import Agent
    from world_models.common.rssm import pack, unpack

    agent = Agent(AgentConfig.from_fields(tiny_config(3, replay_context=True)), (12,), 5)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    replay = context_replay(agent)
    B, L = 4, 6
    step = jax.jit(lambda state, replay, key: agent.replay_step(state, replay, key, B, L))

    # Pass 1 writes this step's posteriors into exactly the rows it replayed (not the context rows).
    key = jax.random.PRNGKey(5)
    batch_key, step_key = jax.random.split(key)
    context, batch, index = replay_lib.sample_with_context(replay, batch_key, B, L)
    _, _, post = jax.jit(agent.train_step_posterior)(state, batch, step_key, agent.context_start(context))
    expected = jax.tree.map(np.asarray, pack(agent.wm.spec, post))  # [L, B, ...]
    state1, replay1, _ = step(state, replay, key)
    streams, rows = np.asarray(index.streams), np.asarray(index.rows)
    covered = np.zeros((replay.num_streams, replay.capacity), bool)
    covered[streams[:, None], rows] = True
    changed = np.any(np.asarray(replay1.data["deter"]) != np.asarray(replay.data["deter"]), -1)
    np.testing.assert_array_equal(changed, covered)
    for name in ("deter", "stoch"):
        stored = np.asarray(replay1.data[name])
        for s_, r_ in zip(*np.nonzero(covered)):  # where chunks overlap, one of them wrote the row
            writers = [(t, b) for b in range(B) for t in range(L) if streams[b] == s_ and rows[b, t] == r_]
            # (two compiled programs may round the last float16 bit of deter differently)
            assert any(np.allclose(stored[s_, r_].astype(np.float32), expected[name][t, b].astype(np.float32),
                                   rtol=0, atol=1e-3) for t, b in writers), (name, s_, r_)
    for name in ("obs", "reward", "action", "is_first"):
        np.testing.assert_array_equal(np.asarray(replay1.data[name]), np.asarray(replay.data[name]))

    # Pass 2: a chunk whose context row pass 1 wrote starts from exactly that latent, not from zeros.
    for seed in range(100):
        context, batch, index = replay_lib.sample_with_context(replay1, jax.random.PRNGKey(100 + seed), B, L)
        context_rows = np.asarray(index.rows[:, 0]) - 1
        hit = [b for b in range(B) if covered[int(index.streams[b]), context_rows[b]]]
        if hit:
            break
    b = hit[0]
    latent, prev_action = agent.context_start(context)
    at = (index.streams[b], context_rows[b])
    written = unpack(agent.wm.spec, {k: replay1.data[k][at] for k in ("deter", "stoch")})
    np.testing.assert_array_equal(np.asarray(latent.deter[b]), np.asarray(written.deter))
    np.testing.assert_array_equal(np.asarray(latent.stoch[b]), np.asarray(written.stoch))
    np.testing.assert_array_equal(np.asarray(prev_action[b]),
                                  np.eye(5)[int(replay1.data["action"][index.streams[b], context_rows[b]])])
    assert not bool(batch["is_first"][0, b]), "inside an episode the chunk keeps its true flags"
    wm_params, key = state1.params["wm"], jax.random.PRNGKey(7)
    _, (from_context, _) = agent.wm.loss(wm_params, batch, key, (latent, prev_action))
    _, (from_zeros, _) = agent.wm.loss(wm_params, batch, key)
    assert not np.allclose(np.asarray(from_context.deter[0, b]), np.asarray(from_zeros.deter[0, b]), atol=1e-3)
    # ... and a chunk from zeros is what `sample` gives: its first row marked as an episode start.
    zero_start = dict(batch, is_first=batch["is_first"].at[0].set(True))
    _, (reset, _) = agent.wm.loss(wm_params, zero_start, key, (latent, prev_action))
    np.testing.assert_allclose(np.asarray(reset.deter), np.asarray(from_zeros.deter), atol=1e-6)


def test_dreamer_curve_table_weights_returns_by_episodes_and_reads_each_seed(tmp_path, capsys):
    from benchmarks.dreamer_curve import curve_rows, main

    rows = [
        {"step": 1000, "episode/return": [1.0, 5.0], "episode/count": [1.0, 1.0], "diag/reward_pred_pos": [0.1, 0.2]},
        {"step": 2000, "episode/return": [4.0, 5.0], "episode/count": [3.0, 1.0], "diag/reward_pred_pos": [0.3, 0.4],
         "loss/actor_entropy": [2.0, 1.0], "perf/grad_steps": [10.0, 10.0]},
        {"step": 3000, "episode/count": [0.0, 0.0], "diag/reward_pred_pos": [float("nan"), 0.5]},
    ]
    first, second = curve_rows(rows, window=2000)
    assert (first["start"], first["end"], first["episodes"]) == (0, 2000, 4.0)
    assert first["return"] == pytest.approx((1.0 + 3 * 4.0) / 4) and first["reward_pos"] == pytest.approx(0.3)
    assert second["return"] is None and second["reward_pos"] is None, "no episode ended; NaN is no value"
    assert curve_rows(rows, window=2000, seed=1)[1]["reward_pos"] == pytest.approx(0.5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main([str(run), "--window", "2000"])
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| 0-2k | 3.25 | 4 | 2.00 | 0.300 |") and table[3].startswith("| 2-4k | - | 0 |")
    rows[1]["episode/lines"] = [2.0, 0.0]
    rows[0]["episode/lines"] = [0.0, 0.0]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main([str(run), "--window", "2000", "--episode-metrics", "lines"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| env steps | return | episodes | lines | actor entropy |")
    assert table[2].startswith("| 0-2k | 3.25 | 4 | 1.5 | 2.00 |"), "episode-weighted: (0 + 3 * 2) / 4"
    with pytest.raises(SystemExit) as missing:
        main([str(tmp_path / "nowhere")])
    assert missing.value.code == 2
