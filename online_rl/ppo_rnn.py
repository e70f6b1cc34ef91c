"""PPO with a GRU core (PPO-RNN), the strongest Craftax baseline at 1M steps.

The GRU is scanned over time and its hidden state is zeroed at the first step of every episode.
Each update stores the hidden state every env had when the rollout began, so the minibatch replay
(minibatches are whole env sequences) recomputes exactly the log-probs the rollout acted with.

    python -m online_rl.ppo_rnn --preset debug
    python -m online_rl.ppo_rnn --preset cpu --env Craftax-Classic-Symbolic-v1 --total-steps 2000000
    python -m online_rl.ppo_rnn --preset cpu --init-from RUN --critic-warmup 10   # fine-tune a PPO-RNN run

``--init-from`` takes another PPO-RNN run only: an offline or feed-forward policy has no GRU to start
this one's (:mod:`online_rl.finetune`); ``--init-kl-coef`` is not available here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from online_rl import finetune
from online_rl.common import (
    Algorithm,
    Policy,
    ScaleOutConfig,
    Transition,
    categorical_log_prob_entropy,
    clipped_value_loss,
    hyper_of,
    make_optimizer,
    minibatch_epochs,
    ppo_policy_loss,
    run_main,
    run_sweep,
    run_training,
    scan_updates,
)
from utils import envs
from utils.errors import exit_on_user_error
from utils.networks import ActorCritic, make_torso
from utils.returns import gae
from utils.training import EpisodeStats

AREA, ALGO = "online_rl", "ppo_rnn"
HEADS = ("params", "ActorCritic_0")  # the ActorCritic on top of the GRU (online_rl.finetune)


@dataclasses.dataclass
class PPORNNConfig(ScaleOutConfig, finetune.FineTuneFields):
    """PPO-RNN (Craftax-baseline defaults; see --preset cpu / debug)."""

    hidden_size: int = 512
    """GRU hidden-state size."""
    num_layers: int = 2
    """Hidden layers of the actor and critic heads on top of the GRU."""


# ---------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------


class ResettingGRU(nn.Module):
    """A GRU cell scanned over time that starts from zeros wherever ``first`` is set."""

    hidden_size: int

    @nn.compact
    def __call__(self, hidden, inputs):
        x, first = inputs
        hidden = jnp.where(first[:, None], jnp.zeros_like(hidden), hidden)
        hidden, out = nn.GRUCell(self.hidden_size)(hidden, x)
        return hidden, out


class RecurrentActorCritic(nn.Module):
    """``(hidden, obs [T, N, ...], first [T, N]) -> (hidden, logits [T, N, A], value [T, N])``: the
    observation torso (CNN, or one relu layer for symbolic observations), the GRU core, then the
    shared actor-critic (separate MLP torsos, policy and value heads) on the GRU's output."""

    num_actions: int
    hidden_size: int
    width: int
    depth: int
    pixels: bool = False
    activation: str = "tanh"

    @nn.compact
    def __call__(self, hidden, obs, first):
        x = make_torso(self.pixels, self.width, 1, "relu")()(obs)
        gru = nn.scan(ResettingGRU, variable_broadcast="params", split_rngs={"params": False})(self.hidden_size)
        hidden, out = gru(hidden, (x, first))
        heads = ActorCritic(self.num_actions, torso=make_torso(False, self.width, self.depth, self.activation))
        logits, value = heads(out)
        return hidden, logits, value


def make_network(cfg: PPORNNConfig, env: envs.VecEnv) -> RecurrentActorCritic:
    return RecurrentActorCritic(num_actions=env.num_actions, hidden_size=cfg.hidden_size, width=cfg.layer_width,
                                depth=cfg.num_layers, pixels=env.is_pixels, activation=cfg.activation)


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
    first: jax.Array  # [N] the current obs starts an episode (the previous step ended one)
    hidden: jax.Array  # [N, H] GRU state before the current obs
    key: jax.Array
    update: jax.Array


def make_collect(cfg: PPORNNConfig, env: envs.VecEnv, network: RecurrentActorCritic, save_rollout: bool):
    """``collect(carry) -> (carry, (rollout [T, N], first [T, N], initial hidden [N, H], stats))``.

    ``first[t]`` marks steps that begin an episode (the hidden state is zeroed before them); with the
    hidden state every env had when the rollout began, it is all a replay needs."""

    def env_step(carry: TrainCarry, _):
        key, action_key, step_key = jax.random.split(carry.key, 3)
        hidden, logits, value = network.apply(carry.params, carry.hidden, carry.obs[None], carry.first[None])
        logits, value = logits[0], value[0]
        action = jax.random.categorical(action_key, logits)
        log_prob, _ = categorical_log_prob_entropy(logits, action)
        obs, env_state, reward, done, info = env.step(step_key, carry.env_state, action)
        transition = Transition(carry.obs, action, reward, done, log_prob, value,
                                info["terminal_obs"] if save_rollout else None)
        stats = EpisodeStats.from_step(done, info)
        return carry.replace(env_state=env_state, obs=obs, first=done, hidden=hidden, key=key), (transition, stats)

    def collect(carry: TrainCarry):
        init_hidden, first_at_start = carry.hidden, carry.first
        carry, (rollout, stats) = jax.lax.scan(env_step, carry, None, length=cfg.num_steps)
        first = jnp.concatenate([first_at_start[None], rollout.done[:-1]], 0)
        return carry, (rollout, first, init_hidden, stats)

    return collect


def replay(network: RecurrentActorCritic, params, init_hidden, obs, first, action):
    """Log-probs, entropies and values [T, n] of ``action`` along time-major sequences, recomputed
    from the sequences' initial hidden state exactly as the rollout computed them step by step."""
    _, logits, value = network.apply(params, init_hidden, obs, first)
    log_prob, entropy = categorical_log_prob_entropy(logits, action)
    return log_prob, entropy, value


def make_train(cfg: PPORNNConfig, env: envs.VecEnv, total_updates: int, save_rollout: bool) -> Algorithm:
    """One seed's ``init`` and ``train_chunk`` (see :class:`online_rl.common.Algorithm`)."""
    network = make_network(cfg, env)
    labels = finetune.critic_labels(HEADS)
    optimizer = finetune.optimizer(cfg, lambda: make_optimizer(cfg, total_updates), labels)
    collect = make_collect(cfg, env, network, save_rollout)
    zeros_hidden = lambda n: jnp.zeros((n, cfg.hidden_size))

    def init(key: jax.Array) -> TrainCarry:
        key, init_key, reset_key = jax.random.split(key, 3)
        obs, env_state = env.reset(reset_key)
        first = jnp.ones(cfg.num_envs, bool)
        params = network.init(init_key, zeros_hidden(1), obs[None, :1], first[None, :1])
        return TrainCarry(params, optimizer.init(params), env_state, obs, first, zeros_hidden(cfg.num_envs),
                          key, jnp.int32(0))

    def loss_fn(params, batch, hp):
        """Replay whole sequences (env-major in the batch) from their stored initial hidden state."""
        transitions, first, init_hidden, advantages, targets = batch
        time_major = lambda x: jnp.swapaxes(x, 0, 1)
        transitions, first, advantages, targets = jax.tree.map(time_major, (transitions, first, advantages, targets))
        log_prob, entropy, value = replay(network, params, init_hidden, transitions.obs, first, transitions.action)
        actor_loss, diagnostics = ppo_policy_loss(log_prob, entropy, transitions.log_prob, advantages, hp["clip_eps"])
        value_loss = clipped_value_loss(value, transitions.value, targets, hp["clip_eps"])
        total = actor_loss + hp["vf_coef"] * value_loss - hp["ent_coef"] * diagnostics["loss/entropy"]
        return total, {"loss/total": total, "loss/actor": actor_loss, "loss/value": value_loss, **diagnostics}

    def update(carry: TrainCarry, hp: dict):
        carry, (rollout, first, init_hidden, stats) = collect(carry)
        _, _, last_value = network.apply(carry.params, carry.hidden, carry.obs[None], carry.first[None])
        last_value = last_value[0]
        advantages, targets = gae(rollout.reward, rollout.value, rollout.done, last_value, hp["gamma"],
                                  hp["gae_lambda"])
        env_major = lambda x: jnp.swapaxes(x, 0, 1)
        data = (jax.tree.map(env_major, rollout._replace(terminal_obs=None)), env_major(first), init_hidden,
                env_major(advantages), env_major(targets))
        update_optimizer = finetune.optimizer(cfg, lambda: make_optimizer(cfg, total_updates, hp), labels, carry.update)
        params, opt_state, key, losses = minibatch_epochs(lambda p, b: loss_fn(p, b, hp), update_optimizer,
                                                          carry.params, carry.opt_state, carry.key, data,
                                                          epochs=cfg.update_epochs, num_minibatches=cfg.num_minibatches)
        carry = carry.replace(params=params, opt_state=opt_state, key=key, update=carry.update + 1)
        saved = (rollout, last_value) if save_rollout else None
        return carry, (stats.sum(), losses, saved)

    def act(params, obs, hidden, key):
        hidden, logits, _ = network.apply(params, hidden, obs[None], jnp.zeros((1, obs.shape[0]), bool))
        return jax.random.categorical(key, logits[0]), hidden

    policy = Policy(act, zeros_hidden, lambda hidden, done: jnp.where(done[:, None], 0.0, hidden))
    params_like = lambda source: jax.eval_shape(init, jax.random.PRNGKey(0)).params  # same network (checked)
    transfer = finetune.Transfer(ALGO, ("layer_width", "num_layers", "activation", "hidden_size"), params_like,
                                 HEADS, offline=False, kl=False)
    return Algorithm(init, scan_updates(update, save_rollout, hyper_of(cfg)), policy,
                     finetune.starter(cfg, env, init, total_updates, transfer))


def train(cfg: PPORNNConfig, stop_after_updates: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary, final carry and run folder."""
    return run_training(cfg, AREA, ALGO, make_train, stop_after_updates)


def sweep(cfg: PPORNNConfig, stop_after_updates: int | None = None) -> dict:
    """Train every point of ``cfg.sweep`` x every seed (see :func:`online_rl.common.run_sweep`)."""
    return run_sweep(cfg, AREA, ALGO, make_train, stop_after_updates)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_main(PPORNNConfig, AREA, ALGO, train, argv, sweep)


if __name__ == "__main__":
    main()
