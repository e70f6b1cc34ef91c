"""The data behind every generated figure: one compact JSON record per comparison in ``docs/data/``.

``runs/`` is not committed, so a figure that lives only in a run folder cannot be recomputed. A record
keeps what the report needs to rebuild its tables, intervals and plots without training: per seed, the
learning curve at fixed env-step points, the final and evaluation metrics and the training seconds to
each point; per training process, the wall and CPU seconds, the machine and the commit; per method,
its resolved config. ``benchmarks.compare`` writes one per suite; ``benchmarks.report`` reads them all.

Layout (``SCHEMA``)::

    {"schema", "name", "title", "description", "command", "suite", "budget", "seeds", "seed_role",
     "headline", "equal_compute", "references": [{"env", "label", "value", "source", optional "env_steps"}],
     "curve_steps": [K env steps], "time_target_seconds" (a wall-clock goal per process, or null),
     "early_steps" (optional: env steps where the report compares the methods along the curve),
     "envs": {env: {"methods": {method: {"module", "presets", "flags", "config",
                                         "processes": [{"seeds", "wall_seconds", "cpu_seconds", "machine",
                                                        "commit"}],
                                         "runs": [{"seed", "env_steps", "final": {metric: value},
                                                   "eval": {metric: value},
                                                   "curve": {"episode/return": [K], "achievement_rate": [K]},
                                                   "train_seconds": [K],
                                                   optional "diagnostics": {metric: [K]}}]}}}},
     optional "diagnostics": [metric names the suite asked for]}

Curve points are the episode-weighted means of the logged rows in each window ``(step[k-1], step[k]]``
(so a point summarises every episode of its window, not one noisy chunk), ``null`` where no episode
ended in it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from utils.errors import UserError
from utils.io import atomic_write_text, read_jsonl

SCHEMA = "craftax-baselines/record/1"
#: An aggregate names records and methods to pool across tasks (``{"schema", "name", "title",
#: "description", "records": [names], "methods": [names]}``); the report renders it, nothing writes it.
AGGREGATE_SCHEMA = "craftax-baselines/aggregate/1"
#: A measured table that is not a learning comparison (throughput, cost of a setting): ``{"schema",
#: "name", "title", "description", "command", "machine", "commit", "columns": [{"key", "label",
#: "digits"}], "rows": [{key: value or [repeats]}]}``. A list cell holds repeated measurements; the
#: report prints their median and range. Written by the benchmark scripts through :func:`write_table`.
TABLE_SCHEMA = "craftax-baselines/table/1"
#: Per-seed final scores of methods on several tasks, with no curves (offline RL: one evaluation per
#: trained seed): ``{"schema", "name", "title", "description", "command", "machine", "commit", "metric",
#: "baseline", "seed_role", "settings", "tasks": {task: {method: [per-seed values]}}}``. The report
#: compares every method with ``baseline`` within each task. Written by ``benchmarks.offline_table``.
SCORES_SCHEMA = "craftax-baselines/scores/1"
CURVE_POINTS = 20
#: The cap on all of docs/data (issue: comparisons that decide), checked by ``benchmarks.report --check``.
MAX_DATA_BYTES = 20 * 1024 * 1024
#: Metrics of the summary's ``final`` block kept per seed (the rest, e.g. losses, stay in the run folder).
FINAL_PREFIXES = ("episode/", "achievements/", "floors/")


def curve_steps(budget: int, points: int = CURVE_POINTS) -> list[int]:
    return [round(budget * (k + 1) / points) for k in range(points)]


def _values(row: dict, key: str, seeds: int) -> np.ndarray:
    value = row.get(key)
    if value is None:
        return np.full(seeds, np.nan)
    value = value if isinstance(value, list) else [value] * seeds
    return np.array([np.nan if v is None else float(v) for v in value], dtype=np.float64)


def achievement_rate_rows(rows: list[dict]) -> list[dict]:
    """Each row with ``achievement_rate``: the mean over the env's achievements of their success rate
    (%), per seed, the single number the tables call "achievement rate"."""
    keys = sorted({k for r in rows for k in r if k.startswith("achievements/")})
    if not keys:
        return rows
    out = []
    for row in rows:
        seeds = len(row.get("episode/count") or []) or 1
        table = np.array([_values(row, k, seeds) for k in keys])
        with np.errstate(invalid="ignore"):
            rate = table.mean(0)
        out.append({**row, "achievement_rate": [None if not np.isfinite(v) else float(v) for v in rate]})
    return out


def windows(rows: list[dict], steps: list[int], needs: str) -> list[list[dict]]:
    """The rows that log ``needs`` in each window ``(step[k-1], step[k]]`` of the curve points."""
    edges = [0, *steps]
    return [[r for r in rows if edges[k] < r["step"] <= edges[k + 1] and r.get(needs) is not None]
            for k in range(len(steps))]


def window_curve(rows: list[dict], key: str, steps: list[int], seeds: int) -> np.ndarray:
    """``[points, seeds]``: the episode-weighted mean of ``key`` over the rows of each window."""
    out = np.full((len(steps), seeds), np.nan)
    for k, window in enumerate(windows(rows, steps, "episode/count")):
        if not window:
            continue
        counts = np.array([_values(r, "episode/count", seeds) for r in window])
        values = np.array([_values(r, key, seeds) for r in window])
        weights = np.where(np.isfinite(values), np.nan_to_num(counts), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = (np.nan_to_num(values) * weights).sum(0) / weights.sum(0)
    return out


def mean_curve(rows: list[dict], key: str, steps: list[int], seeds: int) -> np.ndarray:
    """``[points, seeds]``: the plain mean of ``key`` over the rows of each window that log it (for
    diagnostics: one value per training chunk, not per episode)."""
    out = np.full((len(steps), seeds), np.nan)
    for k, window in enumerate(windows(rows, steps, key)):
        if window:
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a seed with no finite value in the window
                out[k] = np.nanmean(np.array([_values(r, key, seeds) for r in window]), 0)
    return out


def steady_sps(rows: list[dict], slots: int) -> float | None:
    """Env steps/s over all ``slots`` (seeds, or a sweep's points x seeds) between the first and last logged
    rows of the run's latest process: compilation is in the first row, and a resumed run restarts its wall
    clock. None before two such rows exist."""
    rows = [r for r in rows if "perf/wall_seconds" in r]
    restarts = [i for i in range(1, len(rows)) if rows[i]["perf/wall_seconds"] < rows[i - 1]["perf/wall_seconds"]]
    rows = rows[restarts[-1]:] if restarts else rows
    if len(rows) < 2:
        return None
    seconds = rows[-1]["perf/wall_seconds"] - rows[0]["perf/wall_seconds"]
    return slots * (rows[-1]["step"] - rows[0]["step"]) / seconds if seconds > 0 else None


def train_seconds(rows: list[dict], steps: list[int], seeds: int) -> list[float | None]:
    """Seconds of training up to each curve point, summed over the logged chunks (each chunk's env steps
    over its ``perf/sps``), so a resumed run counts only the time it trained, not the gaps between."""
    elapsed, total, previous = [], 0.0, 0
    for row in rows:
        delta = row["step"] - previous
        previous = row["step"]
        if row.get("perf/sps"):
            total += delta * seeds / row["perf/sps"]
        elapsed.append((row["step"], total))
    out: list[float | None] = []
    for step in steps:
        reached = [seconds for s, seconds in elapsed if s <= step]
        last = elapsed[-1][0] if elapsed else 0
        out.append(round(reached[-1], 1) if reached and step <= last else None)
    return out


def _clean(value: Any, digits: int = 4) -> Any:
    """JSON-safe and small: NaN becomes null, floats keep ``digits`` significant figures."""
    if isinstance(value, dict):
        return {k: _clean(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}")
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_entries(run_dir: Path, seeds: Iterable[int], steps: list[int],
                diagnostics: Iterable[str] = ()) -> list[dict]:
    """One entry per seed of a run folder (its seeds vmapped in one process); ``diagnostics`` names logged
    metrics (e.g. ``diag/reward_pred_first``) kept per seed as curves of window means."""
    seeds = list(seeds)
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if not summary_path.exists() or not metrics_path.exists():
        return []
    summary = json.loads(summary_path.read_text())
    rows = achievement_rate_rows(read_jsonl(metrics_path))
    n = len(seeds)
    curves = {key: window_curve(rows, key, steps, n) for key in ("episode/return", "achievement_rate")
              if any(key in r for r in rows)}
    diags = {key: mean_curve(rows, key, steps, n) for key in diagnostics if any(key in r for r in rows)}
    seconds = train_seconds(rows, steps, n)
    final = summary.get("final", {})
    evals = summary.get("eval", {})
    entries = []
    for i, seed in enumerate(seeds):
        per_seed = {k: v["per_seed"][i] for k, v in final.items()
                    if k.startswith(FINAL_PREFIXES) and isinstance(v, dict) and len(v.get("per_seed", [])) == n}
        rates = [v for k, v in per_seed.items() if k.startswith("achievements/")]
        if rates and all(v is not None for v in rates):
            per_seed["achievement_rate"] = float(np.mean(rates))
        entries.append({
            "seed": seed,
            "env_steps": summary.get("env_steps_per_seed"),
            "complete": bool(summary.get("complete")),
            "final": per_seed,
            "eval": {k: v[i] for k, v in evals.items() if isinstance(v, list) and len(v) == n
                     and k in ("eval/return", "eval/length")},
            "curve": {k: v[:, i].tolist() for k, v in curves.items()},
            "train_seconds": seconds,
            **({"diagnostics": {k: v[:, i].tolist() for k, v in diags.items()}} if diags else {}),
        })
    return _clean(entries)


def run_config(run_dir: Path) -> dict:
    """The run's resolved config without its presentation fields (which say where, not what)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    for key in ("run_dir", "run_name", "progress", "tensorboard", "wandb", "wandb_project", "checkpoint_every",
                "seed", "num_seeds"):
        config.pop(key, None)
    return _clean(config, 6)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def write(path: str | Path, record: dict) -> Path:
    """One record, indented so a re-collection diffs readably. Keys keep their order: methods stay in
    the suite's order, whose first method is the baseline every other one is compared against."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"schema": SCHEMA, **record}, indent=1) + "\n")
    return path


def _write_stamped(path: str | Path, schema: str, fields: dict) -> Path:
    """A data file stamped with this machine and commit: a figure on the page always says what measured
    it and on what."""
    from benchmarks.common import git_commit, host_description

    document = {"schema": schema, **fields, "machine": host_description(), "commit": git_commit()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_clean(document), indent=1) + "\n")
    return path


def write_table(path: str | Path, *, name: str, title: str, command: str, columns: list[dict], rows: list[dict],
                description: str = "") -> Path:
    """A :data:`TABLE_SCHEMA` file for ``benchmarks.report``."""
    known = {c["key"] for c in columns}
    for row in rows:
        unknown = set(row) - known
        if unknown:
            raise ValueError(f"row keys {sorted(unknown)} are not columns of table {name!r}")
    return _write_stamped(path, TABLE_SCHEMA, {"name": name, "title": title, "description": description,
                                                "command": command, "columns": columns, "rows": rows})


def write_scores(path: str | Path, *, name: str, title: str, command: str, metric: str, baseline: str,
                 tasks: dict[str, dict[str, list[float]]], description: str = "", seed_role: str = "report",
                 settings: dict | None = None, datasets: dict[str, dict] | None = None) -> Path:
    """A :data:`SCORES_SCHEMA` file for ``benchmarks.report``; ``datasets`` optionally describes each task's
    data (``benchmarks.offline_table.datasets_from``)."""
    return _write_stamped(path, SCORES_SCHEMA, {
        "name": name, "title": title, "description": description, "command": command, "metric": metric,
        "baseline": baseline, "seed_role": seed_role, "settings": settings or {}, "tasks": tasks,
        **({"datasets": datasets} if datasets else {})})


def read(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable JSON record: {error}") from None
    if record.get("schema") != SCHEMA:
        raise UserError(f"{path} has schema {record.get('schema')!r}, not {SCHEMA!r}: re-collect it with "
                        "python -m benchmarks.compare SUITE --collect")
    return record


def load_all(data_dir: str | Path, schema: str = SCHEMA) -> dict[str, dict]:
    """Every file of ``schema`` in ``data_dir`` by name (files of other schemas, e.g. raw benchmark
    output, are left alone)."""
    found = {}
    for path in sorted(Path(data_dir).glob("*.json")):
        try:
            head = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(head, dict) and head.get("schema") == schema:
            found[head["name"]] = head
    return found


def total_size(data_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(data_dir).rglob("*") if p.is_file())
