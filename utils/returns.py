"""Advantage and return estimators shared by every algorithm (PPO family now, Dreamer later).

Arrays are time-major ``[T, ...]``. ``done[t]`` means the episode ended with the transition at ``t``,
so nothing after it is bootstrapped into step ``t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards, values, dones, last_value, gamma: float, lam: float):
    """Generalised advantage estimation; returns ``(advantages, value_targets)``."""
    not_done = 1.0 - dones.astype(jnp.float32)
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
    deltas = rewards + gamma * next_values * not_done - values

    def backward(advantage, inputs):
        delta, keep = inputs
        advantage = delta + gamma * lam * keep * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(
        backward, jnp.zeros_like(last_value), (deltas, not_done), reverse=True
    )
    return advantages, advantages + values
