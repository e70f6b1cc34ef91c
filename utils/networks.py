"""Policy/value networks shared by the PPO family: an MLP for symbolic and a CNN for pixel observations.

The MLP follows the Craftax baselines (separate actor and critic stacks, tanh, orthogonal init with a
small actor head), which matters for PPO's early exploration.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.linen.initializers import constant, orthogonal


def _activation(name: str):
    return {"tanh": nn.tanh, "relu": nn.relu}[name]


class MLP(nn.Module):
    """Stack of ``depth`` dense layers of ``width`` units."""

    width: int
    depth: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.Dense(self.width, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(x)
            x = _activation(self.activation)(x)
        return x


class ConvTorso(nn.Module):
    """Three 5x5 conv + max-pool stages, as in the Craftax pixel baselines, then a dense embedding."""

    width: int
    channels: Sequence[int] = (32, 32, 32)

    @nn.compact
    def __call__(self, x):
        for features in self.channels:
            x = nn.Conv(features, kernel_size=(5, 5))(x)
            x = nn.relu(x)
            x = nn.max_pool(x, window_shape=(3, 3), strides=(3, 3), padding="SAME")
        x = x.reshape(x.shape[:-3] + (-1,))
        return nn.relu(nn.Dense(self.width, kernel_init=orthogonal(np.sqrt(2)))(x))


class ActorCritic(nn.Module):
    """Returns ``(logits, value)``: a CNN torso for pixel observations, separate MLPs otherwise.

    ``value_heads`` > 1 gives ``value`` a last axis of that size, one linear head per return stream
    on the shared critic trunk (RND learns extrinsic and intrinsic values this way).
    """

    num_actions: int
    pixels: bool = False
    width: int = 512
    depth: int = 3
    activation: str = "tanh"
    value_heads: int = 1

    @nn.compact
    def __call__(self, obs):
        if self.pixels:
            embedding = ConvTorso(self.width)(obs)
            actor = MLP(self.width, 1, "relu")(embedding)
            critic = MLP(self.width, 1, "relu")(embedding)
        else:
            actor = MLP(self.width, self.depth, self.activation)(obs)
            critic = MLP(self.width, self.depth, self.activation)(obs)
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01), bias_init=constant(0.0))(actor)
        value = nn.Dense(self.value_heads, kernel_init=orthogonal(1.0), bias_init=constant(0.0))(critic)
        return logits, jnp.squeeze(value, -1) if self.value_heads == 1 else value
