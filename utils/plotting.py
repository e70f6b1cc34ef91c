"""Learning curves from ``metrics.jsonl``: mean over seeds with the min-max spread shaded."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.io import read_jsonl


def curve(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values [T, seeds]) for the rows that have ``key``; NaN where a seed had no value."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if value is None:
            continue
        value = value if isinstance(value, list) else [value]
        steps.append(row["step"])
        values.append([np.nan if v is None else v for v in value])
    width = max((len(v) for v in values), default=0)
    padded = np.full((len(values), width), np.nan)
    for i, v in enumerate(values):
        padded[i, : len(v)] = v
    return np.asarray(steps), padded


def short_steps(steps: float) -> str:
    """Tick label for an env-step count: '200k', '1.5M' (full numbers run into each other at 200k+)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(steps) >= scale:
            return f"{steps / scale:g}{suffix}"
    return f"{steps:g}"


def label_env_steps(ax) -> None:
    """The x axis of every learning curve: env steps per seed, with short tick labels."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xlabel("env steps (per seed)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: short_steps(value)))


def plot_learning_curve(metrics_path: str | Path, out_path: str | Path, key: str = "episode/return",
                        title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = curve(read_jsonl(metrics_path), key)
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(steps):
        with warnings.catch_warnings():  # rows where no seed finished an episode are NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=1)
            low, high = np.nanmin(values, axis=1), np.nanmax(values, axis=1)
        ax.plot(steps, mean, label=f"mean of {values.shape[1]} seed(s)")
        if values.shape[1] > 1:
            ax.fill_between(steps, low, high, alpha=0.25, label="min-max over seeds")
        ax.legend(loc="lower right")
    label_env_steps(ax)
    ax.set_ylabel(key)
    ax.set_title(title or str(Path(metrics_path).parent.name))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
