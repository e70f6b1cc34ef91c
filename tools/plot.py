"""Learning curves of any set of run folders in one PNG: mean over seeds with a spread band.

    python -m tools.plot runs/online_rl/ppo/Craftax-Classic-Symbolic-v1/cpu-s0 \\
        runs/online_rl/ppo_rnd/Craftax-Classic-Symbolic-v1/cpu-s0 --out curves.png
    python -m tools.plot RUN_A RUN_B RUN_C --labels ppo ppo rnd   # A and B pooled as seeds of "ppo"
    python -m tools.plot RUN --metric achievements/collect_wood --x time --spread std

Every training entry point logs ``metrics.jsonl`` with a ``step`` and one value per seed
(``utils.logger``); this tool reads them with ``utils.plotting.curve``. Each label is one curve:
the seeds of all its run folders are pooled. Runs whose logged steps differ are put on the union
of their x values by linear interpolation inside each seed's own range (no extrapolation: outside
it a seed counts as missing). The band is the min-max over seeds (default) or mean +- one
(population) standard deviation. ``--x time`` uses ``perf/wall_seconds``, made cumulative across
resumes (a resumed run restarts its clock).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import tyro

from utils.config import cli
from utils.errors import UserError, exit_on_user_error
from utils.io import check_output_path, read_jsonl
from utils.plotting import curve, label_env_steps

WALL_KEY = "perf/wall_seconds"


@dataclasses.dataclass
class PlotConfig:
    """Plot learning curves (mean over seeds, spread band) of run folders into one PNG."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run folders (each with metrics.jsonl)."""
    out: str = "learning_curves.png"
    """PNG to write."""
    metric: str = "episode/return"
    """Logged metric to plot (e.g. eval/return, achievements/collect_wood, perf/sps)."""
    x: Literal["steps", "time"] = "steps"
    """x axis: env steps per seed, or wall-clock seconds."""
    spread: Literal["minmax", "std"] = "minmax"
    """Band: min-max over seeds, or mean +- one standard deviation."""
    labels: tuple[str, ...] = ()
    """One label per run folder; runs with the same label are pooled as seeds of one curve.
    Default: each run's folder path below runs/."""
    title: str | None = None
    """Figure title; default the metric."""


@dataclasses.dataclass
class Curve:
    label: str
    x: np.ndarray  # [T]
    values: np.ndarray  # [T, seeds], NaN where a seed has no value


def run_curve(run_dir: str | Path, metric: str, x: str = "steps") -> tuple[np.ndarray, np.ndarray]:
    """(x [T], values [T, seeds]) of one run folder's ``metric``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"RUNS {run_dir}: no metrics.jsonl; is it a run folder?")
    rows = read_jsonl(path)
    steps, values = curve(rows, metric)
    if not len(steps):
        known = sorted({k for row in rows for k in row if k != "step"})
        raise UserError(f"{path}: no values of {metric!r}; logged metrics: {', '.join(known)}")
    if x == "steps":
        return steps.astype(np.float64), values
    wall = cumulative_wall_seconds(rows, path)
    return np.asarray([w for w, row in zip(wall, rows) if row.get(metric) is not None]), values


def cumulative_wall_seconds(rows: Sequence[dict], path: Path) -> np.ndarray:
    """``perf/wall_seconds`` per row, continued across resumes (where the clock drops, it restarted)."""
    wall, offset, previous = [], 0.0, 0.0
    for row in rows:
        value = row.get(WALL_KEY)
        if value is None:
            raise UserError(f"{path}: a row at step {row.get('step')} lacks {WALL_KEY}; plot with --x steps")
        value = float(np.mean(value)) if isinstance(value, list) else float(value)
        if value < previous:
            offset += previous
        previous = value
        wall.append(offset + value)
    return np.asarray(wall)


def pool(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds of several runs side by side on one x grid: [T, total seeds]."""
    xs = [x for x, _ in curves]
    if all(len(x) == len(xs[0]) and np.array_equal(x, xs[0]) for x in xs):
        return xs[0], np.concatenate([v for _, v in curves], axis=1)
    grid = np.unique(np.concatenate(xs))
    columns = []
    for x, values in curves:
        for seed in values.T:
            ok = np.isfinite(seed)
            column = np.full(len(grid), np.nan)
            if ok.any():
                inside = (grid >= x[ok].min()) & (grid <= x[ok].max())
                column[inside] = np.interp(grid[inside], x[ok], seed[ok])
            columns.append(column)
    return grid, np.stack(columns, axis=1)


def band(values: np.ndarray, spread: str = "minmax") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) over seeds at each x, ignoring missing seeds."""
    with warnings.catch_warnings():  # an x where no seed has a value is NaN, and that is fine
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=1)
        if spread == "minmax":
            return mean, np.nanmin(values, axis=1), np.nanmax(values, axis=1)
        if spread == "std":
            std = np.nanstd(values, axis=1)
            return mean, mean - std, mean + std
    raise UserError(f"--spread {spread!r}: use minmax or std")


def default_label(run_dir: str) -> str:
    parts = Path(run_dir).resolve().parts
    return "/".join(parts[parts.index("runs") + 2:]) if "runs" in parts[:-1] else Path(run_dir).name


def load_curves(runs: Sequence[str], metric: str, x: str = "steps", labels: Sequence[str] = ()) -> list[Curve]:
    if not runs:
        raise UserError("RUNS: name at least one run folder")
    if labels and len(labels) != len(runs):
        raise UserError(f"--labels: {len(labels)} given for {len(runs)} run folders; give one per run")
    names = list(labels) if labels else [default_label(r) for r in runs]
    grouped: dict[str, list] = {}
    for name, run in zip(names, runs):
        grouped.setdefault(name, []).append(run_curve(run, metric, x))
    return [Curve(name, *pool(parts)) for name, parts in grouped.items()]


def plot_curves(curves: Sequence[Curve], out: str | Path, *, metric: str, x: str = "steps",
                spread: str = "minmax", title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        mean, low, high = band(c.values, spread)
        seeds = c.values.shape[1]
        line, = ax.plot(c.x, mean, label=f"{c.label} ({seeds} seed{'s' if seeds > 1 else ''})")
        if seeds > 1:
            ax.fill_between(c.x, low, high, alpha=0.2, color=line.get_color())
    band_name = "min-max" if spread == "minmax" else "+-1 std"
    if x == "steps":
        label_env_steps(ax)
    else:
        ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} (mean over seeds, band: {band_name})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    cfg = cli(PlotConfig, argv)
    check_output_path(cfg.out, "--out", "file")
    curves = load_curves(cfg.runs, cfg.metric, cfg.x, cfg.labels)
    out = plot_curves(curves, cfg.out, metric=cfg.metric, x=cfg.x, spread=cfg.spread, title=cfg.title)
    print(f"wrote {out} ({len(curves)} curve(s))")
    return out


if __name__ == "__main__":
    main()
