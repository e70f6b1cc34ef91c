"""A uniform random policy behind the training entry-point contract: the floor a comparison reads against.

"Above random" is a claim like any other, so it needs seeds and an interval rather than a number quoted
from somewhere else. This entry point takes the contract's flags (``--env --preset --run-dir --seed
--num-seeds --total-steps``) and writes the same run folder as a learner (``metrics.jsonl`` with
per-seed episode returns and achievements, ``summary.json``, the learning curve, checkpoints for
resume), so a suite lists it as a method like any other::

    random:
      module: online_rl.random_policy

Nothing is learned: every action is drawn uniformly, so its curve is flat up to noise, and it costs
only env steps (seconds for 200k on Classic).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from utils import envs
from utils.config import RunConfig
from utils.errors import exit_on_user_error
from utils.training import ChunkOutput, EpisodeStats, HostLoop, largest_chunk, seed_keys, updates_for

AREA, ALGO = "online_rl", "random_policy"


@dataclasses.dataclass
class RandomPolicyConfig(RunConfig):
    """Uniform random actions in batched envs, logged like a training run."""

    num_envs: int = 256
    """Parallel envs per seed."""
    num_steps: int = 64
    """Env steps per env in one logged update (PPO's rollout length at its cpu preset)."""
    reset_ratio: int = 16
    """Optimistic resets: generate num_envs / reset_ratio fresh worlds per step (as PPO)."""
    updates_per_chunk: int = 10
    """Updates per compiled chunk; the host logs and checkpoints between chunks."""

    #: Nothing depends on the run's length, so a finished run continues to a longer --total-steps.
    LENGTH_FIELDS: ClassVar[frozenset[str]] = frozenset({"total_steps"})


def make_chunk(env: envs.VecEnv, cfg: RandomPolicyConfig, length: int):
    """``length`` updates of ``num_steps`` random steps in every env, for one seed: ``(carry) -> (carry,
    episode stats [length])``."""

    def one_step(carry, _):
        state, key = carry  # no observation: the policy never looks (and checkpoints stay small)
        key, act_key, step_key = jax.random.split(key, 3)
        action = jax.random.randint(act_key, (cfg.num_envs,), 0, env.num_actions)
        _, state, _, done, info = env.step(step_key, state, action)
        return (state, key), EpisodeStats.from_step(done, info)

    def one_update(carry, _):
        carry, stats = jax.lax.scan(one_step, carry, None, cfg.num_steps)
        return carry, stats.sum()

    def chunk(carry):
        return jax.lax.scan(one_update, carry, None, length)

    return chunk


def train(cfg: RandomPolicyConfig, stop_after_updates: int | None = None) -> dict:
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    steps_per_update = cfg.num_envs * cfg.num_steps
    total_updates = updates_for(cfg.total_steps, steps_per_update)
    length = largest_chunk(total_updates, cfg.updates_per_chunk)  # exactly the budget, one program
    loop = HostLoop(cfg, AREA, ALGO, steps_per_update=steps_per_update, total_updates=total_updates,
                    achievement_names=env.achievement_names)

    def init(key):
        reset_key, key = jax.random.split(key)
        _, state = env.reset(reset_key)
        return state, key

    carry = loop.restore(jax.vmap(init)(seed_keys(cfg.seed, cfg.num_seeds)))
    run_chunk = jax.jit(jax.vmap(make_chunk(env, cfg, length)))

    def train_chunk(carry, _length: int) -> ChunkOutput:
        carry, stats = run_chunk(carry)
        return ChunkOutput(carry, jax.device_get(stats), {})

    return loop.run(carry, train_chunk, updates_per_chunk=length, stop_after_updates=stop_after_updates)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = parse_config(RandomPolicyConfig, AREA, ALGO, argv)
    result = train(cfg)
    print(f"run folder: {result['run_dir']}")
    return result


if __name__ == "__main__":
    main()

