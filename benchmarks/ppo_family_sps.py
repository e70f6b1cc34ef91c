"""Training throughput of every PPO-family method relative to plain PPO, measured in one process.

Each method's compiled chunk (rollout, bonuses, GAE, epochs of minibatch updates) is built for the
same env and num_envs from the same presets; after compiling all of them, the timed calls go round
robin (PPO, RNN, RND, ICM, E3B, PPO, ...) so background load on a shared machine hits every method
alike. The figure to quote is each method's steps/s as a fraction of PPO's.

    python -m benchmarks.ppo_family_sps --env Craftax-Classic-Symbolic-v1 --preset cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax

from benchmarks.common import machine_description
from online_rl import ppo, ppo_rnn
from utils import envs
from utils.config import parse_config
from utils.jax_setup import enable_compilation_cache

METHODS = {  # name -> (module, config class, options)
    "ppo": (ppo, ppo.PPOConfig, {}),
    "ppo_rnn": (ppo_rnn, ppo_rnn.PPORNNConfig, {}),
    "ppo_rnd": (ppo, ppo.PPOConfig, {"bonus": "rnd"}),
    "ppo_icm": (ppo, ppo.PPOConfig, {"bonus": "icm"}),
    "ppo_e3b": (ppo, ppo.PPOConfig, {"bonus": "e3b"}),
}


def compiled_chunk(name: str, argv: list[str], updates: int):
    """``(run() -> result, cfg)`` for one method; ``run`` advances its own training state."""
    module, config_cls, options = METHODS[name]
    cfg = dataclasses.replace(parse_config(config_cls, module.AREA, module.ALGO, argv), **options)
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    algorithm = module.make_train(cfg, env, total_updates=10_000, save_rollout=False)
    step = jax.jit(lambda c: algorithm.train_chunk(c, updates))
    state = {"carry": jax.jit(algorithm.init)(jax.random.PRNGKey(cfg.seed))}

    def run():
        state["carry"], metrics, _ = step(state["carry"])
        return jax.block_until_ready(metrics)

    return run, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2, help="updates per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (round robin)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args, rest = parser.parse_known_args()
    enable_compilation_cache()
    names = args.methods.split(",")
    runs, compile_seconds, cfg = {}, {}, None
    for name in names:
        start = time.perf_counter()
        runs[name], cfg = compiled_chunk(name, rest, args.updates)
        runs[name]()  # compile and warm up
        compile_seconds[name] = time.perf_counter() - start
        print(f"compiled {name} in {compile_seconds[name]:.0f} s", flush=True)
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    steps = args.updates * cfg.num_envs * cfg.num_steps
    sps = {name: steps / sorted(t)[len(t) // 2] for name, t in times.items()}
    result = {
        "env": cfg.env, "num_envs": cfg.num_envs, "num_steps": cfg.num_steps, "preset": list(cfg.preset),
        "updates_per_call": args.updates, "repeats": args.repeats,
        "steps_per_second": {k: round(v) for k, v in sps.items()},
        "relative_to_ppo": {k: round(v / sps["ppo"], 3) for k, v in sps.items()} if "ppo" in sps else None,
        "compile_and_first_call_seconds": {k: round(v, 1) for k, v in compile_seconds.items()},
        "machine": machine_description(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
