"""Evaluation episodes for any compiled agent: one episode in each of ``num_envs`` fresh envs.

An agent plugs in through a :class:`Policy`: how to act given its parameters, an observation batch
and its own recurrent state (``()`` for memoryless agents), and how that state restarts where an
episode ended. The result holds, per env, whether its episode finished within ``max_steps`` and the
episode's return, length, achievements and env-specific metrics; ``HostLoop.eval_metrics`` turns it
into ``eval/...`` metrics.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Policy(NamedTuple):
    act: Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]  # (params, obs, state, key)
    initial_state: Callable[[int], Any]  # number of envs -> state
    on_done: Callable[[Any, jax.Array], Any]  # (state, done) -> state for the next step


def make_evaluate(env_name: str, num_envs: int, policy: Policy, *, max_steps: int, reset_ratio: int):
    """``evaluate(params, key) -> result dict``, pure and jittable (vmap it over seeds)."""
    from utils import envs

    env = envs.make(env_name, num_envs, reset_ratio=reset_ratio)
    metric_names = env.episode_metric_names
    n = num_envs

    def evaluate(params, key):
        key, reset_key = jax.random.split(key)
        obs, state = env.reset(reset_key)
        init = dict(key=key, obs=obs, state=state, policy=policy.initial_state(n), t=jnp.int32(0),
                    finished=jnp.zeros(n, bool), ret=jnp.zeros(n), length=jnp.zeros(n),
                    achievements=jnp.zeros((n, len(env.achievement_names))),
                    metrics={k: jnp.zeros(n) for k in metric_names})

        def running(c):
            return (~c["finished"].all()) & (c["t"] < max_steps)

        def step(c):
            key, action_key, step_key = jax.random.split(c["key"], 3)
            action, policy_state = policy.act(params, c["obs"], c["policy"], action_key)
            obs, state, _, done, info = env.step(step_key, c["state"], action)
            first = done & ~c["finished"]
            keep = lambda new, old: jnp.where(first.reshape(first.shape + (1,) * (old.ndim - 1)), new, old)
            return dict(
                key=key, obs=obs, state=state, policy=policy.on_done(policy_state, done), t=c["t"] + 1,
                finished=c["finished"] | done, ret=keep(info["episode_return"], c["ret"]),
                length=keep(info["episode_length"], c["length"]),
                achievements=keep(info["achievements"], c["achievements"]),
                metrics={k: keep(info["episode_metrics"][k], v) for k, v in c["metrics"].items()},
            )

        c = jax.lax.while_loop(running, step, init)
        return {"finished": c["finished"], "return": c["ret"], "length": c["length"],
                "achievements": c["achievements"], "episode_metrics": c["metrics"]}

    return evaluate
