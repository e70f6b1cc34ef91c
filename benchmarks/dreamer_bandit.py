"""How a Dreamer version learns the contextual bandit of ``utils/testing/bandit.py``, chunk by chunk:
return, actor entropy and the reward head's prediction on rewarded and unrewarded replayed steps.

    python -m benchmarks.dreamer_bandit --version 3 --chunks 25
    python -m benchmarks.dreamer_bandit --version 3 --chunks 10 --set model_lr=3e-4

Tells a learning-rate budget (the reward head stuck at the average reward) from a policy problem
(the reward head right, the policy at chance). docs/results.md has the V3 figures.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from utils.jax_setup import enable_compilation_cache
from utils.testing.bandit import TargetEnv

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


def parse_value(text: str):
    """A number if it reads as one (YAML takes ``1e-4`` for a string), else the YAML value."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--chunks", type=int, default=25, help="chunks of updates, one row each")
    parser.add_argument("--updates-per-chunk", type=int, default=100, help="updates per chunk (4 gradient steps each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Dreamer field on top of the version's settings (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes FIELD=VALUE, got {item!r}")
        overrides[field] = parse_value(value)
    enable_compilation_cache()
    _, carry, chunk = bandit_run(args.version, args.seed, args.updates_per_chunk, **overrides)
    start = time.perf_counter()
    print("| gradient steps | return | actor entropy | reward head, rewarded / unrewarded steps | recon | s |")
    print("|---|---|---|---|---|---|")
    for _ in range(args.chunks):
        carry, (stats, metrics) = chunk(carry)
        row = chunk_summary(stats, metrics)
        print(f"| {int(carry.agent.grad_steps[0]):,} | {row['return']:.2f} | {row['entropy']:.3f} | "
              f"{row['reward_pred_pos']:.2f} / {row['reward_pred_zero']:.2f} | {row['recon']:.3f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
