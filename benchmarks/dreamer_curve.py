"""A Dreamer run's learning curve next to the diagnostics that say why, as a markdown table.

    python -m benchmarks.dreamer_curve runs/world_models/dreamer_v3/Craftax-Classic-Symbolic-v1/xs-cpu-s0
    python -m benchmarks.dreamer_curve RUN_DIR --window 10000 --seed 1
    python -m benchmarks.dreamer_curve RUN_DIR --episode-metrics lines pieces     # Tetris

One row per window of env steps: the return over the episodes that ended in it (episode-weighted), the
actor's entropy, the reward head's mean prediction on replayed steps whose real reward was above 0.5,
0 and below 0 (``diag/reward_pred_*``), reconstruction loss against predicting the batch mean, and
the gradient steps so far; the last three at the window's last logged row. A reward head that predicts
the average reward on rewarded steps means the actor has nothing to learn from yet (a budget problem);
a reward head that is right while returns stay flat points at the actor or the imagination.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from utils.errors import UserError, exit_on_user_error
from utils.io import read_jsonl
from utils.training import weighted_final

COLUMNS = ("env steps", "return", "episodes", "actor entropy", "reward head: +", "0", "-", "recon / mean", "grad steps")


def seed_value(row: dict, key: str, seed: int) -> float | None:
    """The value of ``key`` for ``seed`` in a metrics row (one entry per seed), None if absent or NaN."""
    values = row.get(key)
    if isinstance(values, list):
        values = values[seed] if seed < len(values) else None
    if values is None or (isinstance(values, float) and math.isnan(values)):
        return None
    return float(values)


def curve_rows(rows: list[dict], window: int, seed: int = 0, episode_metrics: Sequence[str] = ()) -> list[dict]:
    """Per window of ``window`` env steps: the figures described in the module docstring, plus the
    episode-weighted mean of each ``episode/<name>`` in ``episode_metrics`` (Tetris: lines, pieces)."""
    windows: dict[int, list[dict]] = {}
    for row in rows:
        windows.setdefault((row["step"] - 1) // window, []).append(row)
    table = []
    for index, group in sorted(windows.items()):
        window_mean = weighted_final(group, fraction=1.0)  # the episode weighting of every run's summary
        count = window_mean["episodes"][seed] if window_mean else 0.0

        def episode_mean(name: str) -> float | None:
            per_seed = window_mean.get(f"episode/{name}", {}).get("per_seed") or [None] * (seed + 1)
            return per_seed[seed] if count else None

        last = group[-1]
        table.append({
            "start": index * window, "end": (index + 1) * window, "episodes": count,
            "return": episode_mean("return"), "episode": {name: episode_mean(name) for name in episode_metrics},
            **{key: seed_value(last, metric, seed) for key, metric in (
                ("entropy", "loss/actor_entropy"), ("reward_pos", "diag/reward_pred_pos"),
                ("reward_zero", "diag/reward_pred_zero"), ("reward_neg", "diag/reward_pred_neg"),
                ("recon", "loss/recon"), ("recon_baseline", "diag/recon_mean_baseline"),
                ("grad_steps", "perf/grad_steps"))},
        })
    return table


def markdown(table: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    extra = list(table[0]["episode"]) if table else []
    columns = COLUMNS[:3] + tuple(extra) + COLUMNS[3:]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in table:
        episode = "".join(f"{fmt(r['episode'][name], '.3g')} | " for name in extra)
        lines.append(
            f"| {r['start'] // 1000}-{r['end'] // 1000}k | {fmt(r['return'], '.2f')} | {r['episodes']:.0f} | {episode}"
            f"{fmt(r['entropy'], '.2f')} | {fmt(r['reward_pos'], '.3f')} | {fmt(r['reward_zero'], '.3f')} | "
            f"{fmt(r['reward_neg'], '.2f')} | {fmt(r['recon'], '.1f')} / {fmt(r['recon_baseline'], '.1f')} | "
            f"{fmt(r['grad_steps'], ',.0f')} |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a Dreamer run folder (holds metrics.jsonl)")
    parser.add_argument("--window", type=int, default=8000, help="env steps per row")
    parser.add_argument("--seed", type=int, default=0, help="which seed of a multi-seed run")
    parser.add_argument("--episode-metrics", nargs="*", default=[], metavar="NAME",
                        help="more episode-weighted columns, episode/<NAME> (Tetris: lines pieces)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} does not exist; pass a Dreamer run folder")
    if args.window <= 0:
        raise UserError(f"--window must be positive, got {args.window}")
    print(markdown(curve_rows(read_jsonl(metrics), args.window, args.seed, args.episode_metrics)))


if __name__ == "__main__":
    main()
