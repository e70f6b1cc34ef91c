"""PPO on Craftax (MLP for symbolic, CNN for pixel observations), several seeds in one program.

Read top to bottom: the config, ``make_train`` (pure and jittable: one call runs a chunk of PPO
updates for one seed, vmapped over seeds), the evaluation program, and the host loop that runs the
compiled chunks and between them logs, shows progress, saves trajectories, evaluates and checkpoints.

    python -m online_rl.ppo --preset debug
    python -m online_rl.ppo --env Craftax-Symbolic-v1 --total-steps 1000000 --num-seeds 2
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from utils import envs
from utils.checkpoint import Checkpointer
from utils.config import RunConfig, parse_config, to_dict
from utils.errors import UserError, exit_on_user_error
from utils.networks import ActorCritic
from utils.returns import gae
from utils.training import EpisodeStats, HostLoop

AREA, ALGO = "online_rl", "ppo"


@dataclasses.dataclass
class PPOConfig(RunConfig):
    """PPO with GAE (defaults: the Craftax baselines, sized for a GPU; see --preset cpu / debug)."""

    num_envs: int = 1024
    """Parallel envs per seed."""
    num_steps: int = 64
    """Rollout length per update (steps per env)."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 8
    """Minibatches per pass."""
    lr: float = 2e-4
    """Adam learning rate (linearly annealed to 0 when --anneal-lr)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to zero over the run."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.8
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip (also clips the value update)."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    layer_width: int = 512
    """Units per hidden layer."""
    num_layers: int = 3
    """Hidden layers of the actor and of the critic MLP (symbolic observations)."""
    activation: str = "tanh"
    """Hidden activation of the MLPs: tanh or relu."""
    reset_ratio: int = 16
    """Optimistic resets: generate num_envs / reset_ratio fresh worlds per step."""
    updates_per_chunk: int = 10
    """PPO updates per compiled chunk; the host logs and checkpoints between chunks."""
    eval_every: int = 100
    """Evaluate every this many updates (and at the end); 0: only at the end."""
    eval_envs: int = 32
    """Evaluation episodes per seed (one per env)."""
    eval_max_steps: int = 10_000
    """Evaluation stops after this many steps even if some episodes are still running."""
    save_trajectories: str | None = None
    """Folder to save rollouts to, in the dataset format of DESIGN.md (off when unset)."""
    save_every: int = 1
    """With --save-trajectories, save the rollout of every this-many-th update."""


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


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    done: jax.Array
    log_prob: jax.Array
    value: jax.Array
    terminal_obs: jax.Array | None


def make_network(cfg: PPOConfig, env: envs.VecEnv) -> ActorCritic:
    return ActorCritic(
        num_actions=env.num_actions,
        pixels=env.is_pixels,
        width=cfg.layer_width,
        depth=cfg.num_layers,
        activation=cfg.activation,
    )


def num_updates_for(cfg: PPOConfig) -> int:
    """Enough updates to take at least ``total_steps`` env steps per seed."""
    return max(1, math.ceil(cfg.total_steps / (cfg.num_envs * cfg.num_steps)))


def chunk_length(cfg: PPOConfig) -> int:
    """Updates per compiled chunk: the largest that divides the run (so it takes exactly the asked
    updates with one compiled program) and, when saving, the save interval (a saved rollout must be
    a chunk's last update). Between chunks the host spends milliseconds, so short chunks cost little."""
    total = num_updates_for(cfg)
    multiple_of = math.gcd(total, cfg.save_every) if cfg.save_trajectories else total
    return max(d for d in range(1, min(cfg.updates_per_chunk, total) + 1) if multiple_of % d == 0)


def make_optimizer(cfg: PPOConfig, total_updates: int) -> optax.GradientTransformation:
    steps_per_update = cfg.update_epochs * cfg.num_minibatches
    if cfg.anneal_lr:
        lr = optax.linear_schedule(cfg.lr, 0.0, total_updates * steps_per_update)
    else:
        lr = cfg.lr
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=1e-5))


def make_train(cfg: PPOConfig, env: envs.VecEnv, total_updates: int, save_rollout: bool):
    """Build ``init(key) -> TrainCarry`` and ``train_chunk(carry) -> (carry, metrics, rollout)``.

    Both are pure functions of one seed; the caller vmaps them over seeds and jits them.
    ``rollout`` is the last update's transitions (for trajectory saving) or None.
    """
    network = make_network(cfg, env)
    optimizer = make_optimizer(cfg, total_updates)
    batch_size = cfg.num_envs * cfg.num_steps
    if batch_size % cfg.num_minibatches:
        raise UserError(
            f"num_envs * num_steps ({batch_size}) must be divisible by num_minibatches ({cfg.num_minibatches})"
        )

    def init(key: jax.Array) -> TrainCarry:
        key, init_key, reset_key = jax.random.split(key, 3)
        obs, env_state = env.reset(reset_key)
        params = network.init(init_key, obs[:1])
        return TrainCarry(params, optimizer.init(params), env_state, obs, key, jnp.int32(0))

    def env_step(carry: TrainCarry, _):
        key, action_key, step_key = jax.random.split(carry.key, 3)
        logits, value = network.apply(carry.params, carry.obs)
        action = jax.random.categorical(action_key, logits)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
        obs, env_state, reward, done, info = env.step(step_key, carry.env_state, action)
        transition = Transition(
            carry.obs, action, reward, done, log_prob, value, info["terminal_obs"] if save_rollout else None
        )
        stats = EpisodeStats.from_step(done, info)
        return carry.replace(env_state=env_state, obs=obs, key=key), (transition, stats)

    def loss_fn(params, batch: Transition, advantages, targets):
        logits, value = network.apply(params, batch.obs)
        log_probs = jax.nn.log_softmax(logits)
        log_prob = jnp.take_along_axis(log_probs, batch.action[:, None], -1)[:, 0]

        value_clipped = batch.value + jnp.clip(value - batch.value, -cfg.clip_eps, cfg.clip_eps)
        value_loss = 0.5 * jnp.maximum((value - targets) ** 2, (value_clipped - targets) ** 2).mean()

        ratio = jnp.exp(log_prob - batch.log_prob)
        norm_adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        actor_loss = -jnp.minimum(
            ratio * norm_adv, jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * norm_adv
        ).mean()
        entropy = -(jnp.exp(log_probs) * log_probs).sum(-1).mean()
        total = actor_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        aux = {
            "loss/total": total,
            "loss/actor": actor_loss,
            "loss/value": value_loss,
            "loss/entropy": entropy,
            "loss/approx_kl": ((ratio - 1) - jnp.log(ratio)).mean(),
            "loss/clip_fraction": (jnp.abs(ratio - 1) > cfg.clip_eps).mean(),
        }
        return total, aux

    def learn(carry: TrainCarry, rollout: Transition, advantages, targets):
        flat = lambda x: x.reshape((batch_size,) + x.shape[2:])
        data = (
            jax.tree.map(flat, rollout._replace(terminal_obs=None)),
            flat(advantages),
            flat(targets),
        )

        def epoch(state, _):
            params, opt_state, key = state
            key, perm_key = jax.random.split(key)
            order = jax.random.permutation(perm_key, batch_size).reshape(cfg.num_minibatches, -1)

            def minibatch(state, idx):
                params, opt_state = state
                batch, adv, tgt = jax.tree.map(lambda x: x[idx], data)
                grads, aux = jax.grad(loss_fn, has_aux=True)(params, batch, adv, tgt)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), aux

            (params, opt_state), aux = jax.lax.scan(minibatch, (params, opt_state), order)
            return (params, opt_state, key), aux

        (params, opt_state, key), aux = jax.lax.scan(
            epoch, (carry.params, carry.opt_state, carry.key), None, length=cfg.update_epochs
        )
        return carry.replace(params=params, opt_state=opt_state, key=key), jax.tree.map(jnp.mean, aux)

    def update(carry: TrainCarry, _):
        carry, (rollout, stats) = jax.lax.scan(env_step, carry, None, length=cfg.num_steps)
        _, last_value = network.apply(carry.params, carry.obs)
        advantages, targets = gae(
            rollout.reward, rollout.value, rollout.done, last_value, cfg.gamma, cfg.gae_lambda
        )
        carry, losses = learn(carry, rollout, advantages, targets)
        carry = carry.replace(update=carry.update + 1)
        saved = (rollout, last_value) if save_rollout else None
        return carry, (stats.sum(), losses, saved)

    def train_chunk(carry: TrainCarry, length: int):
        carry, (stats, losses, saved) = jax.lax.scan(update, carry, None, length=length)
        last = jax.tree.map(lambda x: x[-1], saved) if save_rollout else None
        return carry, (stats, losses), last

    return network, init, train_chunk


def make_evaluate(cfg: PPOConfig, network: ActorCritic):
    """``evaluate(params, key)``: one episode in each of ``eval_envs`` fresh envs, sampled actions."""
    env = envs.make(cfg.env, cfg.eval_envs, reset_ratio=cfg.reset_ratio)
    metric_names = env.episode_metric_names

    def evaluate(params, key):
        key, reset_key = jax.random.split(key)
        obs, state = env.reset(reset_key)
        n = cfg.eval_envs
        init = (
            key, obs, state, jnp.int32(0), jnp.zeros(n, bool), jnp.zeros(n), jnp.zeros(n),
            jnp.zeros((n, len(env.achievement_names))), {k: jnp.zeros(n) for k in metric_names},
        )

        def running(c):
            return (~c[4].all()) & (c[3] < cfg.eval_max_steps)

        def step(c):
            key, obs, state, t, finished, returns, lengths, achievements, metrics = c
            key, action_key, step_key = jax.random.split(key, 3)
            logits, _ = network.apply(params, obs)
            action = jax.random.categorical(action_key, logits)
            obs, state, _, done, info = env.step(step_key, state, action)
            first = done & ~finished
            returns = jnp.where(first, info["episode_return"], returns)
            lengths = jnp.where(first, info["episode_length"], lengths)
            achievements = jnp.where(first[:, None], info["achievements"], achievements)
            metrics = {k: jnp.where(first, info["episode_metrics"][k], v) for k, v in metrics.items()}
            return key, obs, state, t + 1, finished | done, returns, lengths, achievements, metrics

        _, _, _, _, finished, returns, lengths, achievements, metrics = jax.lax.while_loop(running, step, init)
        return {"finished": finished, "return": returns, "length": lengths, "achievements": achievements,
                "episode_metrics": metrics}

    return env, evaluate


# ---------------------------------------------------------------------------------------------------
# The host loop
# ---------------------------------------------------------------------------------------------------


def seed_keys(cfg: PPOConfig) -> jax.Array:
    return jnp.stack([jax.random.PRNGKey(cfg.seed + i) for i in range(cfg.num_seeds)])


def train(cfg: PPOConfig, stop_after_updates: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary and final carry.

    ``stop_after_updates`` ends the loop early as if the process had been killed there (for tests).
    """
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    length = chunk_length(cfg)
    num_chunks = math.ceil(num_updates_for(cfg) / length)
    total_updates = num_chunks * length
    save_rollout = bool(cfg.save_trajectories)
    network, init, train_chunk = make_train(cfg, env, total_updates, save_rollout)

    loop = HostLoop(cfg, AREA, ALGO, steps_per_update=cfg.num_envs * cfg.num_steps,
                    total_updates=total_updates, achievement_names=env.achievement_names)
    carry = jax.jit(jax.vmap(init))(seed_keys(cfg))
    carry = loop.restore(carry)
    writer = loop.open_trajectory_writer(env, cfg.save_trajectories, num_streams=cfg.num_seeds * cfg.num_envs)

    run_chunk = jax.jit(jax.vmap(lambda c: train_chunk(c, length)))
    _, evaluate = make_evaluate(cfg, network)
    run_eval = jax.jit(jax.vmap(evaluate))
    eval_key = jax.random.PRNGKey(cfg.seed + 10_000)

    def maybe_evaluate(update: int, final: bool) -> dict:
        if not final and not (cfg.eval_every and update % cfg.eval_every == 0):
            return {}
        keys = jax.random.split(jax.random.fold_in(eval_key, update), cfg.num_seeds)
        return loop.eval_metrics(jax.device_get(run_eval(carry.params, keys)))

    update = loop.start_update
    while update < total_updates:
        if stop_after_updates is not None and update >= stop_after_updates:
            break
        start = time.perf_counter()
        carry, (stats, losses), rollout = run_chunk(carry)
        stats, losses = jax.device_get((stats, losses))
        update += length
        if writer is not None and update % cfg.save_every == 0:
            writer.write_rollout_async(**rollout_for_writer(rollout, update - 1))
        evals = maybe_evaluate(update, final=update >= total_updates)
        loop.after_chunk(update, stats, losses, evals, seconds=time.perf_counter() - start)
        loop.maybe_checkpoint(update, carry, final=update >= total_updates)

    if writer is not None:
        writer.close()
    summary = loop.finish(update, carry, final=update >= total_updates)
    return {"summary": summary, "carry": carry, "run_dir": loop.run_dir}


def rollout_for_writer(rollout, update: int) -> dict:
    """Turn the vmapped last rollout ([seeds, T, envs, ...]) into time-major [T, seeds*envs, ...]."""
    transitions, last_value = jax.device_get(rollout)

    def streams(x):
        x = np.asarray(x)
        x = np.swapaxes(x, 0, 1)  # [T, S, N, ...]
        return x.reshape((x.shape[0], -1) + x.shape[3:])

    return {
        "update": update,
        "obs": streams(transitions.obs),
        "action": streams(transitions.action),
        "reward": streams(transitions.reward),
        "done": streams(transitions.done),
        "log_prob": streams(transitions.log_prob),
        "value": streams(transitions.value),
        "terminal_obs": streams(transitions.terminal_obs),
        "last_value": np.asarray(last_value).reshape(-1),
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = parse_config(PPOConfig, AREA, ALGO, argv)
    result = train(cfg)
    print(f"run folder: {result['run_dir']}")
    return result


if __name__ == "__main__":
    main()
