"""PPO on Craftax (MLP for symbolic, CNN for pixel observations), optionally with ICM or E3B bonuses.

Read top to bottom: the config, the exploration networks (ICM) and the E3B bonus, ``make_train``
(pure and jittable: one call runs a chunk of PPO updates for one seed, vmapped over seeds by the
host loop in :mod:`online_rl.common`), and ``main``.

    python -m online_rl.ppo --preset debug
    python -m online_rl.ppo --env Craftax-Symbolic-v1 --total-steps 1000000 --num-seeds 2
    python -m online_rl.ppo --preset cpu --icm        # curiosity: ICM forward-model error
    python -m online_rl.ppo --preset cpu --e3b        # elliptical episodic bonus on ICM embeddings

Runs with ``--icm``/``--e3b`` are filed under ``runs/online_rl/ppo_icm`` / ``ppo_e3b`` so they
never share a run folder with plain PPO.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.linen.initializers import orthogonal

from online_rl.common import (
    Algorithm, PPOFamilyConfig, Transition, categorical_log_prob_entropy, clipped_value_loss, make_optimizer, memoryless_policy,
    minibatch_epochs, next_obs_for_bonus, ppo_policy_loss, run_main, run_training, scan_updates,
)
from utils import envs
from utils.errors import exit_on_user_error
from utils.networks import MLP, ActorCritic, ConvTorso
from utils.returns import gae
from utils.training import EpisodeStats

AREA, ALGO = "online_rl", "ppo"


@dataclasses.dataclass
class PPOConfig(PPOFamilyConfig):
    """PPO with GAE, plus the optional ICM and E3B exploration bonuses (Craftax-baseline defaults)."""

    icm: bool = False
    """Add ICM's curiosity reward: the forward model's error in predicting the next embedding."""
    e3b: bool = False
    """Add E3B's elliptical episodic bonus over embeddings trained by ICM's inverse model."""
    icm_reward_coef: float = 1.0
    """Weight of the ICM reward (with --icm)."""
    e3b_reward_coef: float = 1.0
    """Weight of the E3B bonus (with --e3b)."""
    e3b_lambda: float = 0.1
    """E3B ridge: each episode's inverse covariance starts at I / lambda."""
    icm_latent_size: int = 32
    """Size of the ICM embedding (E3B's feature size)."""
    icm_layer_width: int = 256
    """Units per hidden layer of the ICM encoder, forward and inverse models."""
    icm_lr: float = 3e-4
    """Adam learning rate of the ICM networks."""
    icm_forward_coef: float = 1.0
    """Weight of the forward-model loss (trains the forward model only)."""
    icm_inverse_coef: float = 1.0
    """Weight of the inverse-model loss (trains the inverse model and the encoder)."""


def algo_name(cfg: PPOConfig) -> str:
    return ALGO + ("_icm" if cfg.icm else "") + ("_e3b" if cfg.e3b else "")


# ---------------------------------------------------------------------------------------------------
# Exploration: ICM networks and the E3B bonus
# ---------------------------------------------------------------------------------------------------


class ICM(nn.Module):
    """Intrinsic Curiosity Module: an encoder, a forward model f(z, a) -> z' and an inverse model
    g(z, z') -> a. The encoder learns only from the inverse loss, so it keeps what the agent controls
    and cannot collapse to make the forward model's job trivial."""

    num_actions: int
    latent_size: int
    width: int
    pixels: bool = False

    def setup(self):
        torso = ConvTorso(self.width) if self.pixels else MLP(self.width, 2, "relu")
        self.encoder = nn.Sequential([torso, nn.Dense(self.latent_size, kernel_init=orthogonal(1.0))])
        self.forward_model = nn.Sequential([MLP(self.width, 2, "relu"), nn.Dense(self.latent_size)])
        self.inverse_model = nn.Sequential([MLP(self.width, 2, "relu"), nn.Dense(self.num_actions)])

    def encode(self, obs):
        return self.encoder(obs)

    def predict_next(self, z, action):
        return self.forward_model(jnp.concatenate([z, jax.nn.one_hot(action, self.num_actions)], -1))

    def __call__(self, obs, next_obs, action):
        """``(predicted next embedding, inverse-model logits, next embedding)``."""
        z, z_next = self.encode(obs), self.encode(next_obs)
        predicted = self.predict_next(jax.lax.stop_gradient(z), action)
        return predicted, self.inverse_model(jnp.concatenate([z, z_next], -1)), z_next


def icm_losses(icm: ICM, params, obs, next_obs, action) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(forward loss, inverse loss, per-transition forward error)``; the error is ICM's reward."""
    predicted, inverse_logits, z_next = icm.apply(params, obs, next_obs, action)
    error = 0.5 * jnp.mean((predicted - jax.lax.stop_gradient(z_next)) ** 2, -1)
    inverse = optax.softmax_cross_entropy_with_integer_labels(inverse_logits, action.astype(jnp.int32))
    return error.mean(), inverse.mean(), error


def e3b_initial(num_envs: int, size: int, lam: float) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(size) / lam, (num_envs, size, size))


def e3b_step(inverse_cov: jax.Array, z: jax.Array, done: jax.Array, lam: float) -> tuple[jax.Array, jax.Array]:
    """E3B for one step of every env: bonus ``z^T C^-1 z`` of the current embedding, then the
    Sherman-Morrison update of ``C^-1`` with it; envs whose episode just ended restart at I / lambda,
    so the bonus measures novelty within the episode only."""
    u = jnp.einsum("nij,nj->ni", inverse_cov, z)
    bonus = jnp.einsum("ni,ni->n", z, u)
    updated = inverse_cov - jnp.einsum("ni,nj->nij", u, u) / (1.0 + bonus)[:, None, None]
    fresh = jnp.eye(z.shape[-1]) / lam
    return bonus, jnp.where(done[:, None, None], fresh, updated)


@struct.dataclass
class ExploreState:
    icm_params: Any
    icm_opt_state: Any
    inverse_cov: Any  # E3B's [num_envs, D, D], or None without --e3b


# ---------------------------------------------------------------------------------------------------
# The compiled program
# ---------------------------------------------------------------------------------------------------


@struct.dataclass
class TrainCarry:
    """Everything a seed needs to continue training; it is exactly what a checkpoint holds."""

    params: Any
    opt_state: Any
    env_state: envs.VecEnvState
    obs: jax.Array
    key: jax.Array
    update: jax.Array  # completed updates
    explore: Any  # ExploreState with --icm/--e3b, else None


def make_network(cfg: PPOConfig, env: envs.VecEnv) -> ActorCritic:
    return ActorCritic(num_actions=env.num_actions, pixels=env.is_pixels, width=cfg.layer_width,
                       depth=cfg.num_layers, activation=cfg.activation)


def make_icm(cfg: PPOConfig, env: envs.VecEnv) -> ICM:
    return ICM(env.num_actions, cfg.icm_latent_size, cfg.icm_layer_width, pixels=env.is_pixels)


def make_train(cfg: PPOConfig, env: envs.VecEnv, total_updates: int, save_rollout: bool) -> Algorithm:
    """One seed's ``init`` and ``train_chunk``; ``train_chunk`` returns the last rollout when saving."""
    network = make_network(cfg, env)
    optimizer = make_optimizer(cfg, total_updates)
    explore = cfg.icm or cfg.e3b
    icm = make_icm(cfg, env)
    icm_optimizer = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.icm_lr, eps=1e-5))

    def init(key: jax.Array) -> TrainCarry:
        key, init_key, reset_key, icm_key = jax.random.split(key, 4)
        obs, env_state = env.reset(reset_key)
        params = network.init(init_key, obs[:1])
        explore_state = None
        if explore:
            icm_params = icm.init(icm_key, obs[:1], obs[:1], jnp.zeros(1, jnp.int32))
            cov = e3b_initial(cfg.num_envs, cfg.icm_latent_size, cfg.e3b_lambda) if cfg.e3b else None
            explore_state = ExploreState(icm_params, icm_optimizer.init(icm_params), cov)
        return TrainCarry(params, optimizer.init(params), env_state, obs, key, jnp.int32(0), explore_state)

    def env_step(carry: TrainCarry, _):
        key, action_key, step_key = jax.random.split(carry.key, 3)
        logits, value = network.apply(carry.params, carry.obs)
        action = jax.random.categorical(action_key, logits)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
        obs, env_state, reward, done, info = env.step(step_key, carry.env_state, action)
        transition = Transition(carry.obs, action, reward, done, log_prob, value,
                                info["terminal_obs"] if save_rollout else None)
        next_obs = next_obs_for_bonus(obs, done, info) if explore else None
        stats = EpisodeStats.from_step(done, info)
        return carry.replace(env_state=env_state, obs=obs, key=key), (transition, next_obs, stats)

    def intrinsic_rewards(state: ExploreState, rollout: Transition, next_obs):
        """Bonus per transition [T, N] and E3B's covariance after the rollout."""
        bonus, logs = jnp.zeros_like(rollout.reward), {}
        if cfg.icm:
            _, _, error = icm_losses(icm, state.icm_params, rollout.obs, next_obs, rollout.action)
            bonus = bonus + cfg.icm_reward_coef * error
            logs["explore/icm_reward"] = error.mean()
        cov = state.inverse_cov
        if cfg.e3b:
            z = jax.lax.stop_gradient(icm.apply(state.icm_params, rollout.obs, method=ICM.encode))

            def step(cov, inputs):
                bonus, cov = e3b_step(cov, *inputs, cfg.e3b_lambda)
                return cov, bonus

            cov, e3b = jax.lax.scan(step, cov, (z, rollout.done))
            bonus = bonus + cfg.e3b_reward_coef * e3b
            logs["explore/e3b_bonus"] = e3b.mean()
        return bonus, cov, logs

    def learn_icm(state: ExploreState, key, rollout: Transition, next_obs):
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        data = (flat(rollout.obs), flat(next_obs), flat(rollout.action))

        def loss_fn(params, batch):
            forward, inverse, _ = icm_losses(icm, params, *batch)
            total = cfg.icm_forward_coef * forward + cfg.icm_inverse_coef * inverse
            return total, {"loss/icm_forward": forward, "loss/icm_inverse": inverse}

        params, opt_state, key, aux = minibatch_epochs(loss_fn, icm_optimizer, state.icm_params,
                                                       state.icm_opt_state, key, data, epochs=1,
                                                       num_minibatches=cfg.num_minibatches)
        return state.replace(icm_params=params, icm_opt_state=opt_state), key, aux

    def loss_fn(params, batch):
        transitions, advantages, targets = batch
        logits, value = network.apply(params, transitions.obs)
        log_prob, entropy = categorical_log_prob_entropy(logits, transitions.action)
        actor_loss, diagnostics = ppo_policy_loss(log_prob, entropy, transitions.log_prob, advantages, cfg.clip_eps)
        value_loss = clipped_value_loss(value, transitions.value, targets, cfg.clip_eps)
        total = actor_loss + cfg.vf_coef * value_loss - cfg.ent_coef * diagnostics["loss/entropy"]
        return total, {"loss/total": total, "loss/actor": actor_loss, "loss/value": value_loss, **diagnostics}

    def update(carry: TrainCarry, _):
        carry, (rollout, next_obs, stats) = jax.lax.scan(env_step, carry, None, length=cfg.num_steps)
        _, last_value = network.apply(carry.params, carry.obs)
        reward, logs = rollout.reward, {}
        if explore:
            bonus, cov, logs = intrinsic_rewards(carry.explore, rollout, next_obs)
            reward = reward + bonus
            carry = carry.replace(explore=carry.explore.replace(inverse_cov=cov))
        advantages, targets = gae(reward, rollout.value, rollout.done, last_value, cfg.gamma, cfg.gae_lambda)

        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        data = jax.tree.map(flat, (rollout._replace(terminal_obs=None), advantages, targets))
        params, opt_state, key, losses = minibatch_epochs(loss_fn, optimizer, carry.params, carry.opt_state,
                                                          carry.key, data, epochs=cfg.update_epochs,
                                                          num_minibatches=cfg.num_minibatches)
        carry = carry.replace(params=params, opt_state=opt_state, key=key, update=carry.update + 1)
        if explore:
            explore_state, key, icm_logs = learn_icm(carry.explore, carry.key, rollout, next_obs)
            carry = carry.replace(explore=explore_state, key=key)
            logs.update(icm_logs)
        saved = (rollout, last_value) if save_rollout else None
        return carry, (stats.sum(), {**losses, **logs}, saved)

    policy = memoryless_policy(lambda params, obs: network.apply(params, obs)[0])
    return Algorithm(init, scan_updates(update, save_rollout), policy)


def train(cfg: PPOConfig, stop_after_updates: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary, final carry and run folder.

    ``stop_after_updates`` ends the loop early as if the process had been killed there (for tests).
    """
    return run_training(cfg, AREA, algo_name(cfg), make_train, stop_after_updates)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_main(PPOConfig, AREA, ALGO, train, argv)


if __name__ == "__main__":
    main()
