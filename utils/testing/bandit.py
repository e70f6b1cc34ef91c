"""A contextual bandit that Dreamer can only solve through its world model (a test and a benchmark).

Every step shows a target action; choosing it pays 1 at the next step. The world model has to carry the
previous observation and the action to predict that reward, and the actor learns from imagined rewards
only, so solving it exercises the whole loop: collection, replay, world model, imagination, actor.
``tests/test_dreamer_smoke.py`` asserts each version solves it; ``benchmarks/dreamer_bandit.py`` prints
how the reward head and the policy get there.
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


#: A small model on 8 envs: 4 gradient steps of 8 x 16 replayed steps per update of 16 env steps.
BANDIT_FIELDS = dict(num_envs=8, collect_steps=2, train_ratio=32.0, prefill=32, replay_size=4096, batch_size=8,
                     batch_length=16, deter=64, hidden=64, units=64, stoch=8, classes=8, layers=1, imag_horizon=8,
                     symbolic_storage="float32")


def bandit_run(version: int, seed: int = 0, updates_per_chunk: int = 100, **overrides):
    """``(program, carry, chunk)``: Dreamer ``version`` (its paper's settings, ``overrides`` on top) on the
    bandit, one seed; ``chunk(carry)`` runs ``updates_per_chunk`` updates, compiled."""
    from utils.envs import VecEnv
    from world_models.dreamer import init_seeds, make_config, make_train

    env = VecEnv(TargetEnv(), name="Target", num_envs=BANDIT_FIELDS["num_envs"], reset_ratio=1,
                 achievement_names=("a",), achievements_fn=lambda state: jnp.zeros(1))
    cfg = make_config(version, ["debug"], **{**BANDIT_FIELDS, **overrides})
    program = make_train(cfg, env)
    carry = init_seeds(program, env, jax.random.PRNGKey(seed)[None])
    return program, carry, jax.jit(lambda c: program.train_chunk(c, updates_per_chunk))


def chunk_summary(stats, metrics) -> dict[str, float]:
    """Return over the chunk's episodes, actor entropy and the reward head's mean prediction on rewarded
    and unrewarded replayed steps."""
    mean = lambda key: float(np.nanmean(np.asarray(metrics[key])))
    return {"return": float(np.asarray(stats.return_sum).sum() / max(1, np.asarray(stats.count).sum())),
            "entropy": mean("loss/actor_entropy"), "reward_pred_pos": mean("diag/reward_pred_pos"),
            "reward_pred_zero": mean("diag/reward_pred_zero"), "recon": mean("loss/recon")}
