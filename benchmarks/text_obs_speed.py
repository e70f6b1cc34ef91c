"""Observations/s of the text renderer (``utils.text_obs.render_texts``) on a batch.

Labelling turns millions of saved observations into text and online LLM features render every
env step, so the renderer must keep up with the envs: this prints how many observations per
second one CPU process turns into text, for Classic and full Craftax.

    python -m benchmarks.text_obs_speed                      # real observations from resets
    python -m benchmarks.text_obs_speed --source synthetic   # no JAX: random worst-case tiles

``real`` observations come from ``num`` vmapped env resets (compiling full Craftax's reset takes
about a minute on a 2-core CPU; the persistent cache makes later runs quick). ``synthetic`` ones
are random but well-formed: every tile gets a random block (most of them listed, unlike real
views full of grass), so they are a pessimistic bound.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from utils.text_obs import TEXT_ENV_NAMES, obs_layout, render_texts


def synthetic_observations(env_name: str, num: int, seed: int = 0) -> np.ndarray:
    """Random well-formed observations: one block (and item) per tile, some mobs, random tail."""
    layout = obs_layout(env_name)
    rng = np.random.default_rng(seed)
    tiles = layout.view_rows * layout.view_cols
    grid = np.zeros((num, tiles, layout.channels), dtype=np.float32)
    idx = np.arange(num)[:, None], np.arange(tiles)[None, :]
    blocks = layout.channel_slice("blocks")
    # Block ids from 2 on: craftax never shows "invalid", and out-of-bounds only as map-edge bands.
    grid[(*idx, blocks.start + rng.integers(2, blocks.stop - blocks.start, (num, tiles)))] = 1
    if layout.item_names:
        items = layout.channel_slice("items")
        item = np.where(rng.random((num, tiles)) < 0.1,
                        rng.integers(1, items.stop - items.start, (num, tiles)), 0)
        grid[(*idx, items.start + item)] = 1
    mobs = layout.channel_slice("mobs")
    num_mobs = mobs.stop - mobs.start
    grid[:, :, mobs] = rng.random((num, tiles, num_mobs)) < 0.2 / num_mobs  # ~0.2 mobs a tile
    if layout.has_light_channel:
        lit = rng.random((num, tiles)) < 0.8
        grid[:, :, layout.channel_slice("light")] = lit[:, :, None]
        grid[~lit] = 0  # craftax zeroes unlit tiles, lit flag included
    tail = rng.integers(0, 10, (num, layout.obs_dim - layout.map_size)).astype(np.float32) / 10
    return np.concatenate([grid.reshape(num, -1), tail], axis=1)


def real_observations(env_name: str, num: int, seed: int = 0) -> np.ndarray:
    """Observations of ``num`` freshly generated worlds (vmapped, jitted reset)."""
    import jax
    from craftax.craftax_env import make_craftax_env_from_name

    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    env = make_craftax_env_from_name(env_name, auto_reset=False)
    keys = jax.random.split(jax.random.PRNGKey(seed), num)
    obs, _ = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, env.default_params)
    return np.asarray(obs)


def measure(obs: np.ndarray, env_name: str, repeats: int) -> dict:
    """Median seconds over ``repeats`` renders of the whole batch, and the text sizes."""
    texts = render_texts(obs, env_name)  # warm-up (builds the per-layout tables)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        render_texts(obs, env_name)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    lengths = [len(t) for t in texts]
    return {
        "env": env_name, "num": len(obs), "seconds": round(seconds, 4),
        "obs_per_s": round(len(obs) / seconds), "mean_chars": round(float(np.mean(lengths))),
        "max_chars": max(lengths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", choices=TEXT_ENV_NAMES, action="append",
                        help="env(s) to measure (default: both)")
    parser.add_argument("--num", type=int, default=1024, help="observations per batch")
    parser.add_argument("--source", choices=("real", "synthetic"), default="real")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for env_name in args.env or TEXT_ENV_NAMES:
        make = real_observations if args.source == "real" else synthetic_observations
        obs = make(env_name, args.num)
        print(json.dumps({"source": args.source, **measure(obs, env_name, args.repeats)}))


if __name__ == "__main__":
    main()
