"""Dreamer throughput per version and model size: env steps/s and gradient steps/s.

For each version and size preset it compiles the training program of ``world_models.dreamer`` (one
seed) and times, after compilation and the prefill:

* ``train loop``: whole updates (act in the envs, store, train at the configured ratio), giving env
  steps/s and gradient steps/s of real training;
* ``gradient steps``: gradient steps alone (world model + actor + critic) on replay batches;
* ``acting``: env steps with the agent's policy and replay writes, no training.

    python -m benchmarks.dreamer_sps --versions 1 2 3 --sizes xs s -- --preset cpu
    python -m benchmarks.dreamer_sps --sizes s m --updates 20 -- --preset cpu --env Craftax-Classic-Pixels-v1

Arguments after ``--`` are Dreamer flags (presets apply after the size preset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax

from benchmarks.common import machine_description, time_compiled
from utils.jax_setup import enable_compilation_cache


def measure(version: int, size: str, dreamer_args: list[str], updates: int, repeats: int) -> dict:
    from utils import envs
    from world_models import dreamer
    from world_models.common import replay as replay_lib

    cfg = dreamer.parse_dreamer_config(["--version", str(version), "--preset", size, *dreamer_args])
    prefill = max(cfg.batch_length, cfg.report_context + cfg.report_horizon)
    cfg = dataclasses.replace(cfg, prefill=prefill, eval_envs=0, progress=False)
    dreamer.validate(cfg)
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    program = dreamer.make_train(cfg, env)
    grad_steps = dreamer.grad_steps_per_update(cfg)
    env_steps_per_update = cfg.num_envs * cfg.collect_steps
    carry = dreamer.init_seeds(program, env, jax.random.PRNGKey(cfg.seed)[None])  # one seed, stacked
    jit = lambda f: jax.jit(f, compiler_options=dreamer.compiler_options(cfg, env))

    # Fill replay past the prefill so that every timed update trains.
    fill_updates = -(-prefill // cfg.collect_steps)
    fill = jit(lambda c: program.train_chunk(c, fill_updates))
    carry, _ = fill(carry)
    state = {"carry": carry}

    loop = jit(lambda c: program.train_chunk(c, updates))

    def run_loop():
        state["carry"], out = loop(state["carry"])
        return out

    loop_compile, loop_s = time_compiled(run_loop, repeats)

    def train_only(agent_state, replay, key):
        def step(agent_state, key):
            batch_key, step_key = jax.random.split(key)
            batch = replay_lib.sample(replay, batch_key, cfg.batch_size, cfg.batch_length)
            return program.agent.train_step(agent_state, batch, step_key)
        return jax.lax.scan(step, agent_state, jax.random.split(key, updates * grad_steps))

    train_fn = jit(train_only)
    carry = jax.tree.map(lambda x: x[0], state["carry"])
    _, train_s = time_compiled(lambda: train_fn(carry.agent, carry.replay, carry.key), repeats)

    act_fn = jit(lambda c: jax.lax.scan(lambda c, _: program.collect(c), c, None, length=updates))
    _, act_s = time_compiled(lambda: act_fn(carry), repeats)

    params = sum(x.size for x in jax.tree.leaves(carry.agent.params["wm"]))
    params += sum(x.size for k in ("actor", "critic") for x in jax.tree.leaves(carry.agent.params[k]))
    return {
        "version": version, "size": size, "env": cfg.env, "num_envs": cfg.num_envs,
        "batch": f"{cfg.batch_size}x{cfg.batch_length}", "train_ratio": cfg.train_ratio,
        "grad_steps_per_update": grad_steps, "params_millions": params / 1e6,
        "loop_env_steps_per_s": updates * env_steps_per_update / loop_s,
        "loop_grad_steps_per_s": updates * grad_steps / loop_s,
        "grad_steps_per_s": updates * grad_steps / train_s,
        "acting_env_steps_per_s": updates * env_steps_per_update / act_s,
        "loop_compile_s": loop_compile - loop_s,
        "fast_compile": dreamer.compiler_options(cfg, env) is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sizes", nargs="+", default=["xs", "s"])
    parser.add_argument("--updates", type=int, default=10, help="updates per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("dreamer_args", nargs="*", help="Dreamer flags, after --")
    args = parser.parse_args()
    enable_compilation_cache()
    rows = []
    for size in args.sizes:
        for version in args.versions:
            row = measure(version, size, args.dreamer_args, args.updates, args.repeats)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nmachine: {machine_description()}\n")
    print("| version | size | params (M) | train loop env steps/s | train loop grad steps/s | grad steps/s alone "
          "| acting env steps/s | compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| V{r['version']} | {r['size']} | {r['params_millions']:.1f} | {r['loop_env_steps_per_s']:,.0f} "
              f"| {r['loop_grad_steps_per_s']:.1f} | {r['grad_steps_per_s']:.1f} | {r['acting_env_steps_per_s']:,.0f} "
              f"| {r['loop_compile_s']:.0f} |")


if __name__ == "__main__":
    main()
