"""Raw env throughput: random actions through ``utils.envs.make`` (optimistic resets), steps/s.

It also reports what the random policy achieves (mean return and achievement rates over the
episodes that finished), the baseline that trained agents are compared with in docs/results.md.

The PPO benchmark (``benchmarks/ppo_sps.py``) measures training at the same env and num_envs, so the
two figures can be compared as a ratio.

    python -m benchmarks.env_throughput --env Craftax-Classic-Symbolic-v1 --num-envs 256
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.common import machine_description, time_compiled
from utils import envs
from utils.jax_setup import enable_compilation_cache
from utils.training import EpisodeStats, episode_metrics


def measure_env_sps(env_name: str, num_envs: int, num_steps: int, repeats: int = 3, reset_ratio: int = 16):
    """Steps/s of ``num_steps`` random-action steps of ``num_envs`` envs, compiled as one scan."""
    env = envs.make(env_name, num_envs, reset_ratio=reset_ratio)

    @jax.jit
    def rollout(key):
        key, reset_key = jax.random.split(key)
        obs, state = env.reset(reset_key)

        def body(carry, _):
            key, state = carry
            key, action_key, step_key = jax.random.split(key, 3)
            action = jax.random.randint(action_key, (num_envs,), 0, env.num_actions)
            _, state, _, done, info = env.step(step_key, state, action)
            return (key, state), EpisodeStats.from_step(done, info)

        _, stats = jax.lax.scan(body, (key, state), None, length=num_steps)
        return stats.sum()

    compile_s, run_s = time_compiled(lambda: rollout(jax.random.PRNGKey(0)), repeats)
    stats = jax.tree.map(lambda x: jnp.asarray(x)[None], rollout(jax.random.PRNGKey(1)))
    random_policy = {k: float(v[0]) for k, v in episode_metrics(stats, env.achievement_names).items()}
    return {
        "env": env_name,
        "num_envs": num_envs,
        "steps_per_second": num_envs * num_steps / run_s,
        "compile_seconds": compile_s - run_s,
        "random_policy": random_policy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Craftax-Classic-Symbolic-v1")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--num-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reset-ratio", type=int, default=16)
    args = parser.parse_args()
    enable_compilation_cache()
    result = measure_env_sps(args.env, args.num_envs, args.num_steps, args.repeats, args.reset_ratio)
    result["machine"] = machine_description()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
