"""Env steps per second of the JAX Tetris env: N vmapped boards, uniformly random actions.

Finished boards are reset in place every step (a Tetris reset is only two permutations, so unlike
Craftax this costs next to nothing under vmap). Compile time is reported separately.

    python -m benchmarks.tetris_throughput --num-envs 1024 --steps 1000
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from utils.envs.tetris import TetrisEnv


def make_rollout(env: TetrisEnv, num_envs: int, num_steps: int):
    """A jitted function running ``num_steps`` batched steps; returns final state and episode count."""
    params = env.default_params
    v_reset = jax.vmap(env.reset, in_axes=(0, None))
    v_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def body(carry, key):
        state, episodes = carry
        k_act, k_step, k_reset = jax.random.split(key, 3)
        actions = jax.random.randint(k_act, (num_envs,), 0, env.num_actions)
        _, state, _, done, _ = v_step(jax.random.split(k_step, num_envs), state, actions, params)
        _, fresh = v_reset(jax.random.split(k_reset, num_envs), params)
        state = jax.tree.map(lambda f, s: jnp.where(_bcast(done, s), f, s), fresh, state)
        return (state, episodes + done.sum()), None

    @jax.jit
    def rollout(key):
        k0, k1 = jax.random.split(key)
        _, state = v_reset(jax.random.split(k0, num_envs), params)
        (state, episodes), _ = jax.lax.scan(body, (state, 0), jax.random.split(k1, num_steps))
        return state, episodes

    return rollout


def _bcast(done: jax.Array, leaf: jax.Array) -> jax.Array:
    return done.reshape(done.shape + (1,) * (leaf.ndim - 1))


def measure(action_mode: str, num_envs: int, num_steps: int, repeats: int) -> None:
    rollout = make_rollout(TetrisEnv(action_mode), num_envs, num_steps)
    t0 = time.perf_counter()
    jax.block_until_ready(rollout(jax.random.PRNGKey(0)))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        _, episodes = jax.block_until_ready(rollout(jax.random.PRNGKey(i + 1)))
        best = min(best, time.perf_counter() - t0)
    sps = num_envs * num_steps / best
    print(
        f"{action_mode:>9}: {sps:12,.0f} steps/s  ({num_envs} envs x {num_steps} steps, best of "
        f"{repeats}; {int(episodes)} episodes ended; first call incl. compile {compile_s:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--num-envs", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000, help="batched steps per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--action-mode", choices=("direct", "placement", "both"), default="both")
    args = parser.parse_args()
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))")
    modes = ("direct", "placement") if args.action_mode == "both" else (args.action_mode,)
    for mode in modes:
        measure(mode, args.num_envs, args.steps, args.repeats)


if __name__ == "__main__":
    main()
