"""Batched environments with optimistic resets and episode statistics.

Why optimistic resets: under ``vmap``, Craftax's ``auto_reset=True`` generates a fresh world for every
env at every step and then throws almost all of them away (about 40x slower on these CPUs). Instead we
generate a small pool of ``num_envs // reset_ratio`` fresh worlds per step and hand them out to the envs
that just finished. If more envs finish in one step than the pool holds, some of them start from the
same world (the "optimistic" part); with the default ratio this is rare and harmless.

The wrapper also keeps the running return and length of every env and reports, at the step where an
episode ends, its return, length, achievements and the true terminal observation (the one reached
before the reset replaced it), which trajectory saving needs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class VecEnvState:
    """What a batch of envs carries between steps."""

    env_state: Any
    episode_return: jax.Array  # [N] float32, running return of the current episode
    episode_length: jax.Array  # [N] int32, steps taken in the current episode


class VecEnv:
    """``num_envs`` copies of one base env (Craftax-style, no auto reset), stepped together.

    ``step`` returns ``(obs, state, reward, done, info)`` where ``info`` holds, per env:
    ``episode_return``, ``episode_length`` (of the episode that ended at this step; meaningful where
    ``done``), ``achievements`` ([N, A] 0/1 floats at episode end), ``episode_metrics`` (a dict of
    env-specific per-episode values such as lines cleared) and ``terminal_obs``.
    """

    def __init__(
        self,
        base_env: Any,
        *,
        name: str,
        num_envs: int,
        reset_ratio: int,
        achievement_names: tuple[str, ...],
        achievements_fn: Callable[[Any], jax.Array],
        episode_metrics_fn: Callable[[Any], dict[str, jax.Array]] | None = None,
        params: Any = None,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        if reset_ratio < 1:
            raise ValueError(f"reset_ratio must be at least 1, got {reset_ratio}")
        self.base_env = base_env
        self.name = name
        self.num_envs = num_envs
        self.reset_ratio = reset_ratio
        self.num_resets = max(1, num_envs // reset_ratio)
        self.params = base_env.default_params if params is None else params
        self.achievement_names = tuple(achievement_names)
        self._achievements_fn = achievements_fn
        self._episode_metrics_fn = episode_metrics_fn or (lambda state: {})
        self._has_episode_metrics = episode_metrics_fn is not None
        self._reset_one = lambda key: base_env.reset(key, self.params)
        self._step_one = lambda key, state, action: base_env.step(key, state, action, self.params)

    # -- static description -------------------------------------------------------------------
    @property
    def num_actions(self) -> int:
        return int(self.base_env.num_actions)

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return tuple(self.base_env.observation_space(self.params).shape)

    @property
    def obs_dtype(self):
        return jnp.dtype(self.base_env.observation_space(self.params).dtype)

    @property
    def episode_metric_names(self) -> tuple[str, ...]:
        """Names of the env-specific per-episode values in ``info["episode_metrics"]`` (Tetris: lines).

        Found by tracing (no compute) one reset; envs without such metrics skip even that.
        """
        if not self._has_episode_metrics:
            return ()
        shapes = jax.eval_shape(lambda key: self._episode_metrics_fn(self._reset_one(key)[1]), jax.random.PRNGKey(0))
        return tuple(shapes)

    @property
    def is_pixels(self) -> bool:
        """Image observations ([H, W, C]) get a CNN torso; flat vectors get an MLP."""
        return len(self.obs_shape) == 3

    # -- dynamics -------------------------------------------------------------------------------
    def reset(self, key: jax.Array) -> tuple[jax.Array, VecEnvState]:
        obs, env_state = jax.vmap(self._reset_one)(jax.random.split(key, self.num_envs))
        zeros = jnp.zeros(self.num_envs)
        state = VecEnvState(env_state, zeros.astype(jnp.float32), zeros.astype(jnp.int32))
        # Craftax's reset leaves some leaves weakly typed (``player_direction``) where ``step``
        # returns them strongly typed; a jitted function fed first the reset state, then a stepped
        # one, would be traced and compiled twice. Strong types here fix it for every caller.
        return strong_types(obs), strong_types(state)

    def step(self, key: jax.Array, state: VecEnvState, action: jax.Array):
        step_key, reset_key = jax.random.split(key)
        obs_after, env_after, reward, done, _ = jax.vmap(self._step_one)(
            jax.random.split(step_key, self.num_envs), state.env_state, action
        )
        reward = reward.astype(jnp.float32)
        done = done.astype(bool)

        episode_return = state.episode_return + reward
        episode_length = state.episode_length + 1
        info = {
            "episode_return": episode_return,
            "episode_length": episode_length,
            "achievements": jax.vmap(self._achievements_fn)(env_after).astype(jnp.float32),
            "episode_metrics": jax.vmap(self._episode_metrics_fn)(env_after),
            "terminal_obs": obs_after,
        }

        obs, env_state = self._reset_finished(reset_key, done, obs_after, env_after)
        keep = 1 - done.astype(jnp.int32)
        new_state = VecEnvState(
            env_state,
            episode_return * keep.astype(jnp.float32),
            episode_length * keep,
        )
        return obs, new_state, reward, done, info

    def _reset_finished(self, key, done, obs_after, env_after):
        """Swap a freshly generated world into every env that just finished.

        The k-th finished env (in index order) takes pool world ``k mod pool_size``: deterministic,
        and spreads the pool evenly when many envs finish together.
        """
        pool_obs, pool_state = jax.vmap(self._reset_one)(jax.random.split(key, self.num_resets))
        slot = (jnp.cumsum(done) - 1) % self.num_resets

        def pick(pool_leaf, stepped_leaf):
            fresh = pool_leaf[slot]
            mask = done.reshape((-1,) + (1,) * (stepped_leaf.ndim - 1))
            return jnp.where(mask, fresh, stepped_leaf)

        obs = pick(pool_obs, obs_after)
        env_state = jax.tree.map(pick, pool_state, env_after)
        return obs, env_state


def strong_types(tree):
    """``tree`` with every weakly typed leaf made strongly typed (same dtype, same values)."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)
