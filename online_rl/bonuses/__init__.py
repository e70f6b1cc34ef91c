"""Exploration bonuses for PPO as plug-ins: ICM, E3B and RND behind one interface.

A bonus is an object with

- ``name``: the run's algo is ``ppo_<name>`` (``runs/online_rl/ppo_icm`` ...);
- ``value_outputs``: value outputs the actor-critic needs (every bonus here: 2, extrinsic and intrinsic);
- ``episodic``: whether the intrinsic return is cut at episode ends;
- ``init(key, obs) -> state``: its networks and statistics for one seed (``obs`` is the [N, ...] batch);
- ``rewards(state, batch) -> (raw bonus [T, N], state, logs)`` for a rollout (:class:`BonusBatch`);
- ``learn(state, key, batch, num_minibatches) -> (state, key, logs)``: train its networks on the rollout.

PPO treats every bonus alike (:mod:`online_rl.ppo`): the raw bonus is divided by a running standard
deviation of its discounted return (:class:`ReturnScale`, the normalisation of Burda et al.'s RND),
gets its own value output and GAE (discount ``int_gamma``), and the policy's advantage is
``ext_adv_coef * A_ext + int_adv_coef * A_int``. That makes the bonus's scale irrelevant: ICM's
forward error and E3B's elliptical bonus grow by an order of magnitude as their embedding sharpens
(docs/results.md), which added unscaled to the reward buried the extrinsic return.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from utils.errors import UserError
from utils.running_stats import RunningMeanStd

BONUSES = ("none", "icm", "e3b", "rnd")


class BonusBatch(NamedTuple):
    """A rollout as a bonus sees it, time-major [T, N, ...]: ``next_obs`` is the observation each
    transition really led to (the terminal one where the episode ended)."""

    obs: jax.Array
    action: jax.Array
    next_obs: jax.Array
    done: jax.Array


class Bonus(Protocol):
    name: str
    value_outputs: int
    episodic: bool

    def init(self, key: jax.Array, obs: jax.Array) -> Any: ...

    def rewards(self, state: Any, batch: BonusBatch) -> tuple[jax.Array, Any, dict]: ...

    def learn(self, state: Any, key: jax.Array, batch: BonusBatch, num_minibatches: int) -> tuple[Any, jax.Array, dict]: ...


@struct.dataclass
class ReturnScale:
    """Running std of each env's discounted intrinsic return (never cut at episode ends, as in RND),
    the unit the raw bonus is measured in."""

    stats: RunningMeanStd
    running: jax.Array  # [N] each env's discounted intrinsic return so far

    @classmethod
    def create(cls, num_envs: int) -> "ReturnScale":
        return cls(RunningMeanStd.create(), jnp.zeros(num_envs))

    def normalise(self, raw: jax.Array, gamma: float) -> tuple[jax.Array, "ReturnScale"]:
        """``(raw / std [T, N], updated scale)``; the rollout's returns are folded in first."""

        def discount(running, r):
            running = running * gamma + r
            return running, running

        running, returns = jax.lax.scan(discount, self.running, raw)
        scale = ReturnScale(self.stats.update(returns), running)
        return raw / scale.stats.std, scale


def flat(x: jax.Array) -> jax.Array:
    """[T, N, ...] -> [T*N, ...]: bonuses train on transitions, not sequences."""
    return x.reshape((-1,) + x.shape[2:])


def make_bonus(cfg, env) -> Bonus | None:
    """The bonus ``cfg.bonus`` names, sized by its ``cfg`` fields; None for plain PPO."""
    if cfg.bonus == "none":
        return None
    if cfg.bonus == "icm":
        from online_rl.bonuses.icm import make_icm_bonus
        return make_icm_bonus(cfg, env)
    if cfg.bonus == "e3b":
        from online_rl.bonuses.e3b import make_e3b_bonus
        return make_e3b_bonus(cfg, env)
    if cfg.bonus == "rnd":
        from online_rl.bonuses.rnd import make_rnd_bonus
        return make_rnd_bonus(cfg, env)
    raise UserError(f"--bonus must be one of {', '.join(BONUSES)}, got {cfg.bonus!r}")
