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


def lambda_returns(rewards, discounts, next_values, lam: float):
    """TD(lambda) returns ``G_t = r_t + d_t * ((1 - lam) * v_{t+1} + lam * G_{t+1})``, time-major.

    ``rewards[t]`` and ``discounts[t]`` (gamma times the continue flag) belong to the transition out of
    step ``t``; ``next_values[t]`` is the value of the state it leads to, and the last one also
    bootstraps the tail (``G_T = v_T``). Dreamer's imagined rollouts call it with the predicted
    rewards, continues and critic values of states ``1..H`` to get returns for states ``0..H-1``.
    """

    def backward(next_return, inputs):
        reward, discount, next_value = inputs
        ret = reward + discount * ((1.0 - lam) * next_value + lam * next_return)
        return ret, ret

    _, returns = jax.lax.scan(backward, next_values[-1], (rewards, discounts, next_values), reverse=True)
    return returns
