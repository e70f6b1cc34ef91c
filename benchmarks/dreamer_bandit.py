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

import yaml

from utils.jax_setup import enable_compilation_cache


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
    from utils.testing.bandit import bandit_run, chunk_summary

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
