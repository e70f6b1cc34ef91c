"""PPO training throughput against raw env throughput, measured in one process as a ratio.

Runs the compiled PPO chunk (rollout + GAE + epochs of minibatch updates) and the random-action env
loop at the same env and num_envs, and prints both steps/s and PPO's share of the env's speed.

    python -m benchmarks.ppo_sps --env Craftax-Classic-Symbolic-v1 --preset cpu
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import machine_description, time_compiled
from benchmarks.env_throughput import measure_env_sps
from benchmarks.ppo_family_sps import compiled_chunk
from online_rl import ppo
from utils.jax_setup import enable_compilation_cache


def measure_ppo_sps(argv: list[str], updates: int, repeats: int) -> tuple[dict, ppo.PPOConfig]:
    """PPO's steps/s through the same compiled chunk the family benchmark times (so the two cannot
    drift apart when ``make_train`` changes), and the config it ran."""
    run, cfg = compiled_chunk("ppo", argv, updates)
    compile_s, run_s = time_compiled(run, repeats)
    return {
        "ppo_steps_per_second": updates * cfg.num_envs * cfg.num_steps / run_s,
        "ppo_compile_seconds": compile_s - run_s,
    }, cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2, help="PPO updates per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    args, rest = parser.parse_known_args(argv)
    enable_compilation_cache()
    ppo_result, cfg = measure_ppo_sps(rest, args.updates, args.repeats)
    result = {"env": cfg.env, "num_envs": cfg.num_envs, "preset": list(cfg.preset),
              "layer_width": cfg.layer_width, "num_layers": cfg.num_layers, **ppo_result}
    env_steps = args.updates * cfg.num_steps
    env = measure_env_sps(cfg.env, cfg.num_envs, env_steps, args.repeats, cfg.reset_ratio)
    result["env_steps_per_second"] = env["steps_per_second"]
    result["ppo_over_env"] = result["ppo_steps_per_second"] / env["steps_per_second"]
    result["machine"] = machine_description()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
