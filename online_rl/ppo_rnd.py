"""PPO with Random Network Distillation (PPO-RND).

A predictor network learns to match a fixed random target network on the observations the agent
reaches; its error is high on observations it has rarely seen, which is the intrinsic reward. As in
Burda et al. (2018): the predictor's inputs are normalised by running statistics and clipped, the
intrinsic reward is divided by a running standard deviation of the intrinsic discounted return, the
intrinsic return is non-episodic by default (dying does not end curiosity), and the critic has
separate extrinsic and intrinsic value heads whose advantages are mixed with coefficients.

    python -m online_rl.ppo_rnd --preset debug
    python -m online_rl.ppo_rnd --preset cpu --env Craftax-Classic-Symbolic-v1 --total-steps 2000000
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
    Algorithm, PPOFamilyConfig, Transition, categorical_log_prob_entropy, clipped_value_loss, make_optimizer,
    memoryless_policy, minibatch_epochs, next_obs_for_bonus, ppo_policy_loss, run_main, run_training, scan_updates,
)
from utils import envs
from utils.errors import exit_on_user_error
from utils.networks import MLP, ActorCritic, ConvTorso
from utils.returns import gae
from utils.running_stats import RunningMeanStd
from utils.training import EpisodeStats

AREA, ALGO = "online_rl", "ppo_rnd"


@dataclasses.dataclass
class PPORNDConfig(PPOFamilyConfig):
    """PPO-RND (PPO defaults of the Craftax baselines; RND settings after Burda et al.)."""

    rnd_layer_width: int = 256
    """Units per hidden layer of the target and predictor networks."""
    rnd_output_size: int = 512
    """Size of the random target's output that the predictor regresses."""
    rnd_lr: float = 3e-4
    """Adam learning rate of the predictor."""
    rnd_reward_coef: float = 1.0
    """Scale of the normalised intrinsic reward."""
    ext_adv_coef: float = 1.0
    """Weight of the extrinsic advantage in the policy's advantage."""
    int_adv_coef: float = 0.1
    """Weight of the intrinsic advantage in the policy's advantage."""
    int_gamma: float = 0.99
    """Discount of the intrinsic return."""
    rnd_episodic: bool = False
    """Cut the intrinsic return at episode ends (Burda et al. found non-episodic works better)."""
    obs_clip: float = 5.0
    """Normalised predictor inputs are clipped to [-obs_clip, obs_clip]."""


# ---------------------------------------------------------------------------------------------------
# Networks and the RND state
# ---------------------------------------------------------------------------------------------------


class RNDNetwork(nn.Module):
    """Target and predictor share this shape; only their initialisation and training differ."""

    width: int
    output_size: int
    pixels: bool = False

    @nn.compact
    def __call__(self, obs):
        x = ConvTorso(self.width)(obs) if self.pixels else MLP(self.width, 2, "relu")(obs)
        return nn.Dense(self.output_size, kernel_init=orthogonal(1.0))(x)


@struct.dataclass
class RNDState:
    target_params: Any  # fixed at init
    predictor_params: Any
    predictor_opt_state: Any
    obs_stats: RunningMeanStd  # of the observations fed to both networks
    return_stats: RunningMeanStd  # of the running intrinsic discounted return
    return_filter: jax.Array  # [N] each env's running intrinsic discounted return


class RND(struct.PyTreeNode):
    """The RND pieces as pure functions of an :class:`RNDState`."""

    network: RNDNetwork = struct.field(pytree_node=False)
    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    obs_clip: float = struct.field(pytree_node=False)
    int_gamma: float = struct.field(pytree_node=False)

    def init(self, key: jax.Array, obs: jax.Array, num_envs: int) -> RNDState:
        target_key, predictor_key = jax.random.split(key)
        target = self.network.init(target_key, obs[:1])
        predictor = self.network.init(predictor_key, obs[:1])
        return RNDState(target, predictor, self.optimizer.init(predictor), RunningMeanStd.create(obs.shape[1:]),
                        RunningMeanStd.create(), jnp.zeros(num_envs))

    def prediction_error(self, state: RNDState, predictor_params, obs: jax.Array) -> jax.Array:
        """Per-observation squared error of the predictor against the target (the raw bonus)."""
        x = state.obs_stats.normalise(obs, self.obs_clip)
        target = jax.lax.stop_gradient(self.network.apply(state.target_params, x))
        return jnp.mean((self.network.apply(predictor_params, x) - target) ** 2, -1)

    def rewards(self, state: RNDState, next_obs: jax.Array) -> tuple[jax.Array, jax.Array, RNDState]:
        """``(normalised reward [T, N], raw error [T, N], state)`` for a rollout's next observations;
        the observation statistics are updated first so rare observations are scored in context."""
        state = state.replace(obs_stats=state.obs_stats.update(next_obs))
        raw = self.prediction_error(state, state.predictor_params, next_obs)

        def discount(running, r):
            running = running * self.int_gamma + r
            return running, running

        return_filter, running = jax.lax.scan(discount, state.return_filter, raw)
        state = state.replace(return_stats=state.return_stats.update(running), return_filter=return_filter)
        return raw / state.return_stats.std, raw, state

    def learn(self, state: RNDState, key: jax.Array, obs: jax.Array, num_minibatches: int):
        """One pass of minibatch regression of the predictor onto the target."""

        def loss_fn(params, batch):
            loss = self.prediction_error(state, params, batch).mean()
            return loss, {"loss/rnd": loss}

        params, opt_state, key, aux = minibatch_epochs(loss_fn, self.optimizer, state.predictor_params,
                                                       state.predictor_opt_state, key, obs, epochs=1,
                                                       num_minibatches=num_minibatches)
        return state.replace(predictor_params=params, predictor_opt_state=opt_state), key, aux


def make_rnd(cfg: PPORNDConfig, env: envs.VecEnv) -> RND:
    network = RNDNetwork(cfg.rnd_layer_width, cfg.rnd_output_size, pixels=env.is_pixels)
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.rnd_lr, eps=1e-5))
    return RND(network, optimizer, cfg.obs_clip, cfg.int_gamma)


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
    update: jax.Array
    rnd: RNDState


def make_train(cfg: PPORNDConfig, env: envs.VecEnv, total_updates: int, save_rollout: bool) -> Algorithm:
    """One seed's ``init`` and ``train_chunk`` (see :class:`online_rl.common.Algorithm`)."""
    network = ActorCritic(num_actions=env.num_actions, pixels=env.is_pixels, width=cfg.layer_width,
                          depth=cfg.num_layers, activation=cfg.activation, value_heads=2)  # [extrinsic, intrinsic]
    optimizer = make_optimizer(cfg, total_updates)
    rnd = make_rnd(cfg, env)

    def init(key: jax.Array) -> TrainCarry:
        key, init_key, reset_key, rnd_key = jax.random.split(key, 4)
        obs, env_state = env.reset(reset_key)
        params = network.init(init_key, obs[:1])
        return TrainCarry(params, optimizer.init(params), env_state, obs, key, jnp.int32(0),
                          rnd.init(rnd_key, obs, cfg.num_envs))

    def env_step(carry: TrainCarry, _):
        key, action_key, step_key = jax.random.split(carry.key, 3)
        logits, values = network.apply(carry.params, carry.obs)
        action = jax.random.categorical(action_key, logits)
        log_prob, _ = categorical_log_prob_entropy(logits, action)
        obs, env_state, reward, done, info = env.step(step_key, carry.env_state, action)
        transition = Transition(carry.obs, action, reward, done, log_prob, values[:, 0],
                                info["terminal_obs"] if save_rollout else None)
        stats = EpisodeStats.from_step(done, info)
        carry = carry.replace(env_state=env_state, obs=obs, key=key)
        return carry, (transition, values[:, 1], next_obs_for_bonus(obs, done, info), stats)

    def loss_fn(params, batch):
        transitions, value_int, advantages, targets_ext, targets_int = batch
        logits, values = network.apply(params, transitions.obs)
        log_prob, entropy = categorical_log_prob_entropy(logits, transitions.action)
        actor_loss, diagnostics = ppo_policy_loss(log_prob, entropy, transitions.log_prob, advantages, cfg.clip_eps)
        value_ext = clipped_value_loss(values[:, 0], transitions.value, targets_ext, cfg.clip_eps)
        value_int_loss = clipped_value_loss(values[:, 1], value_int, targets_int, cfg.clip_eps)
        total = actor_loss + cfg.vf_coef * (value_ext + value_int_loss) - cfg.ent_coef * diagnostics["loss/entropy"]
        return total, {"loss/total": total, "loss/actor": actor_loss, "loss/value": value_ext,
                       "loss/value_int": value_int_loss, **diagnostics}

    def update(carry: TrainCarry, _):
        carry, (rollout, value_int, next_obs, stats) = jax.lax.scan(env_step, carry, None, length=cfg.num_steps)
        _, last_values = network.apply(carry.params, carry.obs)
        reward_int, raw, rnd_state = rnd.rewards(carry.rnd, next_obs)
        reward_int = cfg.rnd_reward_coef * reward_int
        adv_ext, targets_ext = gae(rollout.reward, rollout.value, rollout.done, last_values[:, 0], cfg.gamma,
                                   cfg.gae_lambda)
        int_done = rollout.done if cfg.rnd_episodic else jnp.zeros_like(rollout.done)
        adv_int, targets_int = gae(reward_int, value_int, int_done, last_values[:, 1], cfg.int_gamma, cfg.gae_lambda)
        advantages = cfg.ext_adv_coef * adv_ext + cfg.int_adv_coef * adv_int

        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        data = jax.tree.map(flat, (rollout._replace(terminal_obs=None), value_int, advantages, targets_ext, targets_int))
        params, opt_state, key, losses = minibatch_epochs(loss_fn, optimizer, carry.params, carry.opt_state,
                                                          carry.key, data, epochs=cfg.update_epochs,
                                                          num_minibatches=cfg.num_minibatches)
        rnd_state, key, rnd_logs = rnd.learn(rnd_state, key, flat(next_obs), cfg.num_minibatches)
        carry = carry.replace(params=params, opt_state=opt_state, key=key, update=carry.update + 1, rnd=rnd_state)
        logs = {**losses, **rnd_logs, "explore/rnd_error": raw.mean(), "explore/rnd_reward": reward_int.mean()}
        saved = (rollout, last_values[:, 0]) if save_rollout else None
        return carry, (stats.sum(), logs, saved)

    policy = memoryless_policy(lambda params, obs: network.apply(params, obs)[0])
    return Algorithm(init, scan_updates(update, save_rollout), policy)


def train(cfg: PPORNDConfig, stop_after_updates: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary, final carry and run folder."""
    return run_training(cfg, AREA, ALGO, make_train, stop_after_updates)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_main(PPORNDConfig, AREA, ALGO, train, argv)


if __name__ == "__main__":
    main()
