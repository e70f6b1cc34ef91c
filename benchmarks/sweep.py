"""Rank a sweep's grid points by final return, with intervals over seeds: a table and a plot.

    python -m online_rl.ppo --preset cpu --num-seeds 3 --sweep lr=1e-4,3e-4,1e-3 ent_coef=0.003,0.01
    python -m benchmarks.sweep runs/online_rl/ppo/Craftax-Classic-Symbolic-v1/cpu-s0-sweep

The training command writes ``sweep.json`` and one run folder per compiled program (``utils/sweep.py``
describes the layout: each program's per-seed lists hold one entry per slot, point major). This reads
them and writes, into the sweep folder, ``sweep.md`` (points ranked by the IQM of their seeds' final
return, with its stratified-bootstrap 95% interval from :mod:`benchmarks.stats`, the mean and every
seed's value), ``sweep_results.json`` (the same as data) and ``sweep.png`` (the ranked intervals beside
the learning curves of the best points). The final return of a seed is its run summary's ``final``
figure: the episode-weighted mean of the last 10% of logged rows. It lives in ``benchmarks`` (not in
the training command) because the statistics do: training areas may not import ``benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks import records, stats
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_json, read_jsonl
from utils.sweep import INDEX_FILE

KEY = "episode/return"


def point_label(values: dict, fields: Sequence[str]) -> str:
    return " ".join(f"{k}={values[k]}" for k in fields if k in values) or "(config)"


def load(folder: Path, key: str = KEY) -> tuple[dict, list[dict]]:
    """The sweep index and, per grid point, its values, program and per-seed final ``key`` (None where a
    seed finished no episode or its program has not written a summary yet)."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise UserError(f"{folder} is not a sweep folder (no {INDEX_FILE}); pass the folder a --sweep run printed")
    index = json.loads(index_path.read_text())
    summaries = {}
    for program in index["programs"]:
        path = folder / program["folder"] / "summary.json"
        summaries[program["folder"]] = json.loads(path.read_text()) if path.is_file() else None
    points = []
    for point in index["points"]:
        summary = summaries[point["program"]]
        per_slot = ((summary or {}).get("final", {}).get(key) or {}).get("per_seed") or []
        finals = [per_slot[slot] if slot < len(per_slot) else None for slot in point["slots"]]
        points.append({**point, "final": finals, "complete": bool(summary and summary.get("complete"))})
    return index, points


def rank(points: list[dict], seed: int = 0) -> list[dict]:
    """Points with an IQM and interval over their seeds' final returns, best first; points where a seed
    has no final value yet go last, unranked (dropping the seed would change what the interval means)."""
    ranked, unranked = [], []
    for point in points:
        finals = point["final"]
        if finals and all(v is not None for v in finals):
            estimate = stats.interval(finals, "IQM", seed=seed)
            ranked.append({**point, "iqm": estimate.value, "low": estimate.low, "high": estimate.high,
                           "mean": float(np.mean(finals))})
        else:
            unranked.append({**point, "iqm": None, "low": None, "high": None, "mean": None})
    ranked.sort(key=lambda p: -p["iqm"])
    return ranked + unranked


def table(index: dict, ranked: list[dict]) -> str:
    fields = index["fields"]
    seeds = index["num_seeds"]
    head = ["rank", *fields, f"IQM final return [95% CI] ({seeds} seeds)", "mean", "per seed", "program"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, point in enumerate(ranked):
        finals = ", ".join("-" if v is None else f"{v:.2f}" for v in point["final"])
        figure = "-" if point["iqm"] is None else f"{point['iqm']:.2f} [{point['low']:.2f}, {point['high']:.2f}]"
        mean = "-" if point["mean"] is None else f"{point['mean']:.2f}"
        done = "" if point["complete"] else " (incomplete)"
        cells = [str(i + 1) if point["iqm"] is not None else "-", *[str(point["values"].get(f)) for f in fields],
                 figure, mean, finals, point["program"] + done]
        lines.append("| " + " | ".join(cells) + " |")
    caption = (f"Sweep of {index['algo']} on {index['env']}: {len(ranked)} points x {seeds} seeds (seeds "
               f"{index['seed']}..{index['seed'] + seeds - 1}), ranked by the IQM of the final return (episode-"
               "weighted mean of the last 10% of logged rows); intervals: stratified bootstrap, 95%.")
    return caption + "\n\n" + "\n".join(lines) + "\n"


def plot(folder: Path, index: dict, ranked: list[dict], out: Path, top: int = 5, key: str = KEY) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.plotting import curve, label_env_steps

    shown = [p for p in ranked if p["iqm"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.35 * len(shown) + 1.5)))
    labels = [point_label(p["values"], index["fields"]) for p in shown]
    y = np.arange(len(shown))[::-1]
    if shown:
        iqm = np.array([p["iqm"] for p in shown])
        err = np.array([[p["iqm"] - p["low"] for p in shown], [p["high"] - p["iqm"] for p in shown]])
        left.errorbar(iqm, y, xerr=err, fmt="o", capsize=3)
        left.set_yticks(y, labels, fontsize=8)
    left.set_xlabel(f"final {key} (IQM, 95% CI over {index['num_seeds']} seeds)")
    left.ticklabel_format(axis="x", useOffset=False)
    left.grid(alpha=0.3)
    for point in shown[:top]:
        steps, values = curve(read_jsonl(folder / point["program"] / "metrics.jsonl"), key)
        if len(steps):
            with warnings.catch_warnings():  # rows where no seed finished an episode are NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                right.plot(steps, np.nanmean(values[:, point["slots"]], axis=1), label=point_label(point["values"], index["fields"]))
    if shown:
        right.legend(fontsize=7, loc="lower right")
    label_env_steps(right)
    right.set_ylabel(f"{key} (mean over seeds)")
    right.set_title(f"best {min(top, len(shown))} points")
    right.grid(alpha=0.3)
    fig.suptitle(f"sweep: {index['algo']} on {index['env']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(folder: str | Path, top: int = 5, seed: int = 0) -> dict:
    """Write ``sweep.md``, ``sweep_results.json`` and ``sweep.png`` into ``folder``; returns the ranking."""
    folder = Path(folder)
    index, points = load(folder)
    ranked = rank(points, seed=seed)
    (folder / "sweep.md").write_text(table(index, ranked))
    atomic_write_json(folder / "sweep_results.json", {"index": index, "ranked": ranked})
    plot(folder, index, ranked, folder / "sweep.png", top=top)
    return {"index": index, "ranked": ranked}


def write_record(path: str | Path, folder: str | Path, index: dict, ranked: list[dict], command: str) -> Path:
    """The ranking as a ``records`` table for docs/data, so ``benchmarks.report`` renders it on the results
    page (a sweep folder lives under runs/, which is not committed)."""
    fields = index["fields"]
    seeds = index["num_seeds"]
    last = index["seed"] + seeds - 1
    columns = ([{"key": "rank", "label": "rank", "digits": 0}]
               + [{"key": f"field:{f}", "label": f} for f in fields]
               + [{"key": "iqm", "label": f"IQM final return ({seeds} seed{'s' if seeds > 1 else ''})"},
                  {"key": "low", "label": "95% CI low"}, {"key": "high", "label": "95% CI high"},
                  {"key": "mean", "label": "mean"}, {"key": "per_seed", "label": "per seed"},
                  {"key": "sps", "label": "env steps/s of its program (all slots)", "digits": 0}])
    rows = []
    for i, point in enumerate(ranked):
        per_seed = ", ".join("-" if v is None else f"{v:.2f}" for v in point["final"])
        rows.append({"rank": i + 1 if point["iqm"] is not None else None,
                     **{f"field:{f}": str(point["values"].get(f)) for f in fields},
                     "iqm": point["iqm"], "low": point["low"], "high": point["high"], "mean": point["mean"],
                     "per_seed": per_seed, "sps": program_sps(Path(folder) / point["program"])})
    name = Path(path).stem
    shared = shared_settings(Path(folder), index)
    description = (f"{index['algo']} on {index['env']}{shared}, {len(ranked)} grid points x {seeds} seed(s) (seeds "
                   f"{index['seed']}..{last}), ranked by the IQM of the final return (episode-weighted mean of "
                   "the last 10% of logged rows); intervals: stratified bootstrap, 95% (one seed gives none). "
                   "Steps/s are the whole program's (every slot of the grid), measured beside other work: they "
                   "rank programs of one sweep only roughly.")
    return records.write_table(path, name=name, title=f"Sweep of {index['algo']} on {index['env']} (`{name}`)", command=command, columns=columns,
                               rows=rows, description=description)


#: Settings a reader needs to place a sweep (shown when the grid does not vary them).
SHARED_FIELDS = ("preset", "total_steps", "num_envs", "num_steps", "layer_width", "lr", "ent_coef")


def shared_settings(folder: Path, index: dict) -> str:
    """The first program's values of :data:`SHARED_FIELDS` that the grid leaves fixed, as ``" (a=1, ...)"``."""
    import yaml

    path = folder / index["programs"][0]["folder"] / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    fixed = [f"{k}={config[k]}" for k in SHARED_FIELDS if k in config and k not in index["fields"]]
    return f" ({', '.join(fixed)})" if fixed else ""


def program_sps(run_dir: Path) -> float | None:
    """Env steps/s of all of a program's slots (compilation excluded), or None before two rows exist."""
    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    return records.steady_sps(rows, len(rows[-1].get("loss/total") or [0])) if rows else None


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="sweep folder (holds sweep.json), as printed by a --sweep run")
    parser.add_argument("--top", type=int, default=5, help="learning curves of this many best points")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (the report is deterministic given it)")
    parser.add_argument("--record", metavar="PATH",
                        help="also write the ranking as a table for docs/results.md (e.g. docs/data/NAME.json)")
    args = parser.parse_args(argv)
    result = report(args.folder, top=args.top, seed=args.seed)
    print((Path(args.folder) / "sweep.md").read_text())
    if args.record:
        command = "python -m benchmarks.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_record(args.record, args.folder, result["index"], result["ranked"], command)
        print(f"wrote {path}; render it with python -m benchmarks.report")
    return result


if __name__ == "__main__":
    main()
