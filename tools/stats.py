"""What is in a dataset: episodes, returns, lengths, actions, achievements, hidden states.

    python -m tools.stats data/classic-ppo                     # trajectory dataset
    python -m tools.stats data/classic-ppo-labelled --json stats.json
    python -m tools.stats runs/play/session-1                  # a tools.play recording

Works on the three kinds of folder the project writes:

* a trajectory dataset (``manifest.json`` + shards): episodes come from
  ``offline_rl.data.episode_table`` (the grouping offline RL trains on); returns and lengths are
  over COMPLETE episodes only (first and last step both in the data), the others are counted as
  partial. The dataset format stores no achievements, so none are reported for it.
* a labelled dataset (the same plus ``text_obs`` and ``hidden_state``): also the hidden states'
  width, per-dimension mean and std (summarised over dimensions), row L2 norms, non-finite
  values, the text lengths and the labels block (model, layer, pooling).
* a play recording (``steps.jsonl``): episodes end at ``done``; the achievements are counted by
  name (in how many of the played episodes each was unlocked).

Standard deviations are population ones (numpy's default, ddof = 0). Shards are read one at a
time, so a dataset larger than memory works.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from utils.config import cli
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_json


@dataclasses.dataclass
class StatsConfig:
    """Print statistics of a trajectory dataset, a labelled dataset or a play recording."""

    path: tyro.conf.Positional[str]
    """A dataset folder (manifest.json) or a tools.play recording folder (steps.jsonl)."""
    json: str | None = None
    """Also write the statistics as JSON here."""


def summary(values: np.ndarray) -> dict[str, float | int | None]:
    """count, mean, std (population), min, max of a 1-D array; None values when it is empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"count": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def distribution(counts: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    total = max(int(np.sum(counts)), 1)
    return {name: {"count": int(c), "percent": 100.0 * float(c) / total} for name, c in zip(names, counts)}


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def dataset_stats(directory: str | Path) -> dict[str, Any]:
    from offline_rl.data import episode_table
    from tools.keymaps import action_names
    from utils.trajectories import TrajectoryDataset

    dataset = TrajectoryDataset(directory)
    manifest = dataset.manifest
    env_name = manifest["env_name"]
    num_actions = int(manifest["num_actions"])
    try:
        names = list(action_names(env_name))
    except UserError:
        names = [str(i) for i in range(num_actions)]
    row_keys = dataset.row_keys()
    labelled = "hidden_state" in row_keys

    table = episode_table(dataset)
    action_counts = np.zeros(num_actions, np.int64)
    reward_sum = 0.0
    hidden = _HiddenAccumulator() if labelled else None
    text_lengths: list[np.ndarray] = []
    for shard in dataset.iter_shards(["action", "reward"] + (["hidden_state", "text_obs"] if labelled else [])):
        action_counts += np.bincount(shard["action"].astype(np.int64), minlength=num_actions)[:num_actions]
        reward_sum += float(shard["reward"].astype(np.float64).sum())
        if hidden is not None:
            hidden.add(shard["hidden_state"])
            text_lengths.append(np.char.str_len(shard["text_obs"]))

    complete = table.complete
    stats: dict[str, Any] = {
        "kind": "labelled dataset" if labelled else "trajectory dataset",
        "path": str(directory),
        "env": env_name,
        "observation": {"shape": manifest["obs_shape"], "dtype": manifest["obs_dtype"],
                        "encoding": manifest["obs_encoding"]},
        "streams": dataset.num_streams,
        "shards": dataset.num_shards,
        "transitions": dataset.num_transitions,
        "reward_per_step": reward_sum / max(dataset.num_transitions, 1),
        "episodes": {"complete": int(complete.sum()), "partial": int((~complete).sum())},
        "return": summary(table.returns[complete]),
        "length": summary(table.lengths[complete]),
        "actions": distribution(action_counts, names),
        "achievements": None,  # not stored in the dataset format
    }
    if hidden is not None:
        stats["hidden_state"] = hidden.result()
        stats["text_obs_chars"] = summary(np.concatenate(text_lengths) if text_lengths else np.empty(0))
        labels = manifest.get("labels") or {}
        stats["labels"] = {k: labels.get(k) for k in ("model", "layer", "pooling", "hidden_size", "dtype")}
    return stats


class _HiddenAccumulator:
    """Per-dimension sums and row norms, one shard at a time, in float64."""

    def __init__(self):
        self.total = self.total_sq = None
        self.rows, self.non_finite = 0, 0
        self.norms: list[np.ndarray] = []
        self.dtype = None

    def add(self, states: np.ndarray) -> None:
        self.dtype = str(states.dtype)
        x = states.astype(np.float64)
        finite = np.isfinite(x)
        self.non_finite += int((~finite).sum())
        x = np.where(finite, x, 0.0)
        if self.total is None:
            self.total, self.total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        self.rows += len(x)
        self.norms.append(np.linalg.norm(x, axis=1))

    def result(self) -> dict[str, Any]:
        if not self.rows:
            return {"rows": 0}
        mean = self.total / self.rows
        std = np.sqrt(np.maximum(self.total_sq / self.rows - mean * mean, 0.0))
        return {
            "rows": self.rows, "dim": int(len(mean)), "dtype": self.dtype, "non_finite": self.non_finite,
            "mean_over_dims": summary(mean), "std_over_dims": summary(std),
            "row_norm": summary(np.concatenate(self.norms)),
        }


# ----------------------------------------------------------------------------------------------
# Play recordings
# ----------------------------------------------------------------------------------------------


def recording_stats(directory: str | Path) -> dict[str, Any]:
    from utils.io import read_jsonl

    directory = Path(directory)
    session = json.loads((directory / "session.json").read_text()) if (directory / "session.json").is_file() else {}
    try:
        steps = read_jsonl(directory / "steps.jsonl")
    except json.JSONDecodeError as exc:
        raise UserError(f"{directory / 'steps.jsonl'}: not JSON lines ({exc})") from None
    names = session.get("action_names") or sorted({s["action_name"] for s in steps})
    index = {name: i for i, name in enumerate(names)}
    action_counts = np.zeros(len(names), np.int64)
    returns, lengths, unlocked_by_episode = [], [], [set()]
    ret, length = 0.0, 0
    for step in steps:
        action_counts[index[step["action_name"]]] += 1
        ret, length = ret + float(step["reward"]), length + 1
        unlocked_by_episode[-1].update(step["achievements"])
        if step["done"]:
            returns.append(ret)
            lengths.append(length)
            ret, length = 0.0, 0
            unlocked_by_episode.append(set())
    if length == 0:  # the session ended right after an episode did
        unlocked_by_episode.pop()
    played = len(unlocked_by_episode)
    counts = {}
    for unlocked in unlocked_by_episode:
        for name in unlocked:
            counts[name] = counts.get(name, 0) + 1
    return {
        "kind": "play recording",
        "path": str(directory),
        "env": session.get("env"),
        "transitions": len(steps),
        "reasoned_steps": sum(1 for s in steps if s.get("reasoning")),
        "episodes": {"complete": len(returns), "partial": played - len(returns)},
        "return": summary(np.asarray(returns)),
        "length": summary(np.asarray(lengths)),
        "actions": distribution(action_counts, list(names)),
        "achievements": {name: {"episodes": c, "percent": 100.0 * c / max(played, 1)}
                         for name, c in sorted(counts.items())},
    }


def stats_for(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if (path / "manifest.json").is_file():
        return dataset_stats(path)
    if (path / "steps.jsonl").is_file():
        return recording_stats(path)
    what = ("is neither a dataset (manifest.json) nor a play recording (steps.jsonl)" if path.exists()
            else "does not exist")
    raise UserError(f"PATH {path}: {what}")


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def format_table(stats: dict[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    rows: list[tuple[str, str]] = [("kind", stats["kind"]), ("path", stats["path"]), ("env", str(stats["env"]))]
    for key in ("observation", "streams", "shards", "transitions", "reward_per_step", "reasoned_steps"):
        if key in stats:
            value = stats[key]
            text = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else fmt(value)
            rows.append((key, text))
    rows.append(("episodes", f"{stats['episodes']['complete']} complete, {stats['episodes']['partial']} partial"))
    for key in ("return", "length"):
        s = stats[key]
        rows.append((f"{key} (complete)", f"mean {fmt(s['mean'])}  std {fmt(s['std'])}  "
                                          f"min {fmt(s['min'])}  max {fmt(s['max'])}  n {s['count']}"))
    lines = [f"{k:<22} {v}" for k, v in rows]
    lines.append("actions")
    for name, d in sorted(stats["actions"].items(), key=lambda item: -item[1]["count"]):
        lines.append(f"  {name:<28} {d['count']:>10}  {d['percent']:6.2f}%")
    if stats["achievements"] is None:
        lines.append("achievements           not stored in trajectory datasets")
    else:
        lines.append("achievements (episodes that unlocked it)")
        for name, d in stats["achievements"].items():
            lines.append(f"  {name:<28} {d['episodes']:>10}  {d['percent']:6.2f}%")
    if "hidden_state" in stats:
        h = stats["hidden_state"]
        lines.append(f"hidden_state           {h.get('rows')} rows x {h.get('dim')} ({h.get('dtype')}), "
                     f"non-finite {h.get('non_finite')}")
        for key in ("mean_over_dims", "std_over_dims", "row_norm"):
            if key in h:
                s = h[key]
                lines.append(f"  {key:<20} mean {fmt(s['mean'])}  std {fmt(s['std'])}  "
                             f"min {fmt(s['min'])}  max {fmt(s['max'])}")
        lines.append(f"labels                 {stats['labels']}")
        lines.append(f"text_obs chars         mean {fmt(stats['text_obs_chars']['mean'])}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = cli(StatsConfig, argv)  # checks that --json can be written
    stats = stats_for(cfg.path)
    print(format_table(stats))
    if cfg.json:
        atomic_write_json(cfg.json, stats)
        print(f"json: {cfg.json}")
    return stats


if __name__ == "__main__":
    main()
