"""Evaluation episodes for any compiled agent: one episode in each of ``num_envs`` fresh envs.

An agent plugs in through a :class:`Policy`: how to act given its parameters, an observation batch
and its own recurrent state (``()`` for memoryless agents), and how that state restarts where an
episode ended. The result holds, per env, whether its episode finished within ``max_steps`` and the
episode's return, length, achievements and env-specific metrics; ``HostLoop.eval_metrics`` turns it
into ``eval/...`` metrics.

Agents whose evaluation cannot be one compiled loop (PPO-LLM refreshes features on the host between
segments; offline policies act in PyTorch) keep the same bookkeeping through :class:`FirstEpisodes`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class FirstEpisodes:
    """Each env's first episode, recorded at its first ``done``; later episodes of that env are ignored.

    Evaluation runs one episode per env, but envs that finish early keep stepping (the batch steps
    together), so only the first episode of each may count. Works inside ``jit`` and on the host alike.
    """

    finished: jax.Array  # [n] bool
    ret: jax.Array
    length: jax.Array
    achievements: jax.Array  # [n, A]
    metrics: dict  # name -> [n]

    @classmethod
    def start(cls, num_envs: int, num_achievements: int, metric_names: Sequence[str]) -> "FirstEpisodes":
        zeros = jnp.zeros(num_envs)
        return cls(jnp.zeros(num_envs, bool), zeros, zeros, jnp.zeros((num_envs, num_achievements)),
                   {k: zeros for k in metric_names})

    def record(self, done: jax.Array, info: dict) -> "FirstEpisodes":
        first = done & ~self.finished
        keep = lambda new, old: jnp.where(first.reshape(first.shape + (1,) * (old.ndim - 1)), new, old)
        return FirstEpisodes(
            finished=self.finished | done, ret=keep(info["episode_return"], self.ret),
            length=keep(info["episode_length"], self.length),
            achievements=keep(info["achievements"], self.achievements),
            metrics={k: keep(info["episode_metrics"][k], v) for k, v in self.metrics.items()},
        )

    def result(self) -> dict:
        """The layout ``HostLoop.eval_metrics`` reads."""
        return {"finished": self.finished, "return": self.ret, "length": self.length,
                "achievements": self.achievements, "episode_metrics": self.metrics}


class Policy(NamedTuple):
    act: Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]  # (params, obs, state, key)
    initial_state: Callable[[int], Any]  # number of envs -> state
    on_done: Callable[[Any, jax.Array], Any]  # (state, done) -> state for the next step


def eval_metrics(result: dict, achievement_names: Sequence[str]) -> dict[str, np.ndarray]:
    """``eval/...`` metrics from a result of ``[seeds, envs]`` arrays (:meth:`FirstEpisodes.result`):
    per-seed means over the episodes that finished, NaN for a seed with none."""
    finished = np.asarray(result["finished"], dtype=np.float64)
    count = finished.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lambda x: np.where(count > 0, (np.asarray(x) * finished).sum(1) / count, np.nan)
        metrics = {
            "eval/return": mean(result["return"]),
            "eval/length": mean(result["length"]),
            "eval/finished_fraction": finished.mean(1),
        }
        for i, name in enumerate(achievement_names):
            metrics[f"eval/achievements/{name}"] = 100.0 * mean(np.asarray(result["achievements"])[..., i])
        for name, values in result.get("episode_metrics", {}).items():
            metrics[f"eval/{name}"] = mean(values)
    return metrics


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
                    episodes=FirstEpisodes.start(n, len(env.achievement_names), metric_names))

        def running(c):
            return (~c["episodes"].finished.all()) & (c["t"] < max_steps)

        def step(c):
            key, action_key, step_key = jax.random.split(c["key"], 3)
            action, policy_state = policy.act(params, c["obs"], c["policy"], action_key)
            obs, state, _, done, info = env.step(step_key, c["state"], action)
            return dict(key=key, obs=obs, state=state, policy=policy.on_done(policy_state, done), t=c["t"] + 1,
                        episodes=c["episodes"].record(done, info))

        return jax.lax.while_loop(running, step, init)["episodes"].result()

    return evaluate
