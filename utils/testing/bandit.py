"""A contextual bandit that Dreamer can only solve through its world model (a test and a benchmark).

Every step shows a target action; choosing it pays 1 at the next step. The world model has to carry the
previous observation and the action to predict that reward, and the actor learns from imagined rewards
only, so solving it exercises the whole loop: collection, replay, world model, imagination, actor.
``tests/test_dreamer_smoke.py`` asserts each version solves it; ``benchmarks/dreamer_bandit.py`` (which
also builds the Dreamer run on it: utils may not import an algorithm area) prints how the reward head
and the policy get there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class TargetEnv:
    """Every step shows a target action (one-hot, plus the time); choosing it pays 1. Episodes last 8
    steps, so the best return is 8 and a uniform policy's 8/3."""

    num_actions = 3
    length = 8
    default_params = None

    def observation_space(self, params):
        return jax.ShapeDtypeStruct((self.num_actions + 1,), np.float32)

    def _obs(self, target, t):
        return jnp.concatenate([jax.nn.one_hot(target, self.num_actions), jnp.stack([t / self.length])])

    def reset(self, key, params):
        target = jax.random.randint(key, (), 0, self.num_actions)
        return self._obs(target, 0.0), (jnp.int32(0), target)

    def step(self, key, state, action, params):
        t, target = state
        reward = (action == target).astype(np.float32)
        t = t + 1
        new_target = jax.random.randint(key, (), 0, self.num_actions)
        return self._obs(new_target, t.astype(np.float32)), (t, new_target), reward, t >= self.length, {}
