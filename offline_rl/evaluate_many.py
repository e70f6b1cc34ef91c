"""Evaluate many offline-RL runs and write one table (JSON and Markdown): the method-by-dataset comparison.

    python -m offline_rl.evaluate_many runs/offline_rl/*/Craftax-Classic-Symbolic-v1/* --episodes 64 --out table
    python -m offline_rl.evaluate_many RUN... --task-index 3 --task-count 8    # one task of an array
    python -m offline_rl.evaluate_many RUN... --collect --out table            # the table from their results

Each run is evaluated by ``offline_rl.evaluate`` (every trained seed, ``--episodes`` each; LLM
features live, in this process or through ``--server-url``) against the dataset it was trained on,
and its result is written into the run folder (``--eval-name``). A run whose result already holds
the same settings is not evaluated again, so an interrupted batch, or a Slurm array whose tasks
each took ``runs[task_index::task_count]``, is finished by re-running, and ``--collect`` only reads.

Scores come from ``utils.tiers.scores``: the fraction of the data policy's return, and, when the
dataset is a tier (``python -m benchmarks.offline_tiers``), the normalised score (0 = random,
100 = expert). Runs that differ only in their seed are grouped into one row; the row's seeds are
every trained seed of every run in it, and it gives the mean, the standard error over seeds and the
per-seed values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from offline_rl.checkpoint import find_checkpoint, load_checkpoint
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_json, atomic_write_text

AREA, NAME = "offline_rl", "evaluate_many"

# Config fields that do not change what a run computes, or that name its data (grouped separately).
_NOT_A_VARIANT = {
    "seed", "num_seeds", "run_dir", "run_name", "preset", "progress", "tensorboard", "wandb", "wandb_project",
    "checkpoint_every", "log_every", "dataset", "env", "eval_episodes", "eval_max_steps", "num_workers",
    "device", "torch_threads", "prefetch", "shards_in_memory",
}


@dataclasses.dataclass
class EvaluateManyConfig:
    """Evaluate many offline-RL run folders and write one table of returns and normalised scores."""

    run_dirs: tyro.conf.Positional[tuple[str, ...]] = ()
    """Run folders of offline_rl.bc / awr / iql (their newest checkpoints)."""
    preset: tuple[str, ...] = ()
    """Presets from configs/offline_rl/evaluate_many.yaml, applied left to right before other flags."""
    out: str | None = None
    """Table path without suffix (or ending .json / .md): writes both PATH.json and PATH.md."""
    episodes: int = 32
    """Episodes per trained seed."""
    max_steps: int = 10_000
    """Stop each evaluation after this many env steps (unfinished episodes are not counted)."""
    seed: int = 0
    """Seed of the env resets and of action sampling (the same for every run: common random numbers)."""
    greedy: bool = False
    """Take the most likely action instead of sampling."""
    eval_name: str = "eval.json"
    """File name of each run's result inside its folder."""
    force: bool = False
    """Evaluate again even where a run's result already has these settings."""
    collect: bool = False
    """Evaluate nothing: build the table from the runs' existing results (after an array's tasks)."""
    task_index: int = 0
    """This task's index in an array: it evaluates runs[task_index::task_count] and writes no table when
    task_count > 1."""
    task_count: int = 1
    """Tasks sharing the runs (a Slurm array's size)."""
    server_url: str | None = None
    """Hidden-state server for runs with LLM features (else the model is loaded in this process)."""
    llm_model: str | None = None
    """Load the LLM from this folder / hub id instead of the one named in the labels."""
    llm_batch_size: int = 64
    """Observations per LLM forward pass when computing live features."""
    device: str = "auto"
    """Torch device of the policies (and an in-process LLM)."""
    reset_ratio: int = 16
    """Optimistic resets of the env batch (see utils.envs)."""
    progress: bool = True
    """Show a progress bar per evaluation."""


def _same_settings(summary: dict[str, Any], cfg: EvaluateManyConfig) -> bool:
    return (summary.get("episodes_per_seed") == cfg.episodes and summary.get("seed") == cfg.seed
            and summary.get("greedy") == cfg.greedy and summary.get("max_steps") == cfg.max_steps)


def evaluate_run(run_dir: Path, cfg: EvaluateManyConfig) -> dict[str, Any]:
    """The run's result with ``cfg``'s settings: read back when already there, else evaluated now."""
    from offline_rl.evaluate import EvalConfig, run

    path = run_dir / cfg.eval_name
    if path.is_file() and not cfg.force:
        saved = json.loads(path.read_text())
        if _same_settings(saved.get("summary", {}), cfg):
            return saved
    if cfg.collect:
        raise UserError(f"{path}: no result with these settings (episodes {cfg.episodes}, seed {cfg.seed}, "
                        f"max steps {cfg.max_steps}); run without --collect first")
    payload = load_checkpoint(find_checkpoint(run_dir))
    dataset = (payload.get("dataset") or {}).get("directory")
    if dataset and not (Path(dataset) / "manifest.json").is_file():
        print(f"note: {run_dir}: its dataset {dataset} is not here; no scores against it")
        dataset = None
    return run(EvalConfig(run_dir=str(run_dir), dataset=dataset, seed=cfg.seed, episodes=cfg.episodes,
                          max_steps=cfg.max_steps, greedy=cfg.greedy, out=str(path), llm_model=cfg.llm_model,
                          llm_batch_size=cfg.llm_batch_size, device=cfg.device, reset_ratio=cfg.reset_ratio,
                          progress=cfg.progress, server_url=cfg.server_url))


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def run_row(run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """One run's facts and per-seed numbers, from its checkpoint and its evaluation."""
    payload = load_checkpoint(find_checkpoint(run_dir))
    summary = result["summary"]
    tier = summary.get("tier") or {}
    dataset = (payload.get("dataset") or {}).get("directory") or ""
    return {
        "run_dir": str(run_dir), "algo": payload.get("algo"), "env": payload["env_name"],
        "dataset": dataset, "tier": tier.get("name"), "features": payload.get("features"),
        "updates": payload["position"]["step"], "config": payload.get("config", {}),
        "return_per_seed": summary.get("return_per_seed", []),
        "normalized_score_per_seed": summary.get("normalized_score_per_seed", []),
        "fraction_of_data_per_seed": summary.get("fraction_of_data_per_seed", []),
        "data_return": (summary.get("data_policy") or {}).get("return"),
        "episodes_per_seed": summary.get("episodes_per_seed"),
    }


def _variant_fields(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per algorithm, the config fields whose values differ between its runs (what names a variant)."""
    fields: dict[str, list[str]] = {}
    for algo in {r["algo"] for r in rows}:
        configs = [r["config"] for r in rows if r["algo"] == algo]
        keys = sorted({k for c in configs for k in c} - _NOT_A_VARIANT)
        fields[algo] = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    return fields


def stats(values: list[float | None]) -> dict[str, Any]:
    """Mean, standard error over seeds (sample std / sqrt(n); None for one seed) and the values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "sem": None, "n": 0, "values": list(values)}
    sem = float(np.std(finite, ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else None
    return {"mean": float(np.mean(finite)), "sem": sem, "n": len(finite), "values": list(values)}


def group_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in seed (and presentation) become one row with all their seeds."""
    variants = _variant_fields(rows)
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        variant = {k: row["config"].get(k) for k in variants[row["algo"]]}
        method = row["algo"] + "".join(f" {k}={v}" for k, v in variant.items())
        key = (row["env"], row["tier"] or row["dataset"], method, row["features"])
        group = groups.setdefault(key, {"env": row["env"], "dataset": row["dataset"], "tier": row["tier"],
                                        "method": method, "features": row["features"], "runs": [],
                                        "return": [], "normalized_score": [], "fraction_of_data": []})
        group["runs"].append(row["run_dir"])
        group["return"] += row["return_per_seed"]
        group["normalized_score"] += row["normalized_score_per_seed"] or [None] * len(row["return_per_seed"])
        group["fraction_of_data"] += row["fraction_of_data_per_seed"] or [None] * len(row["return_per_seed"])
    table = []
    for group in groups.values():
        for key in ("return", "normalized_score", "fraction_of_data"):
            group[key] = stats(group[key])
        table.append(group)
    order = {name: i for i, name in enumerate(("random", "medium", "medium-replay", "medium-expert", "expert"))}
    return sorted(table, key=lambda g: (g["env"], order.get(g["tier"], 99), g["dataset"], g["method"]))


def _cell(s: dict[str, Any], digits: int) -> str:
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['sem']:.{digits}f}" if s["sem"] is not None else "") + f" ({s['n']})"


def markdown(table: list[dict[str, Any]], cfg: EvaluateManyConfig) -> str:
    lines = [f"Offline RL: {cfg.episodes} episodes per seed, {'greedy' if cfg.greedy else 'sampled'} actions, "
             f"seed {cfg.seed}. Cells: mean ± standard error over seeds (seeds).", "",
             "| env | dataset | method | features | normalised score | fraction of data policy | return |",
             "|---|---|---|---|---|---|---|"]
    for g in table:
        dataset = g["tier"] or Path(g["dataset"]).name
        lines.append(f"| {g['env']} | {dataset} | {g['method']} | {g['features']} | "
                     f"{_cell(g['normalized_score'], 1)} | {_cell(g['fraction_of_data'], 2)} | "
                     f"{_cell(g['return'], 2)} |")
    return "\n".join(lines) + "\n"


def table_paths(out: str) -> tuple[Path, Path]:
    base = Path(out)
    if base.suffix in (".json", ".md"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".md")


def evaluate_many(cfg: EvaluateManyConfig) -> dict[str, Any]:
    if not cfg.run_dirs:
        raise UserError("no runs given: pass run folders, e.g. runs/offline_rl/*/Craftax-Classic-Symbolic-v1/*")
    if not 0 <= cfg.task_index < cfg.task_count:
        raise UserError(f"--task-index {cfg.task_index} must lie in [0, --task-count {cfg.task_count})")
    runs = sorted(dict.fromkeys(Path(r) for r in cfg.run_dirs))
    for run_dir in runs:
        find_checkpoint(run_dir)  # every folder is a trained run, checked before hours of evaluation
    mine = runs[cfg.task_index::cfg.task_count]
    results = {}
    for i, run_dir in enumerate(mine):
        if cfg.progress:
            print(f"[{i + 1}/{len(mine)}] {run_dir}", flush=True)
        results[run_dir] = evaluate_run(run_dir, cfg)
    if cfg.task_count > 1:
        return {"evaluated": [str(r) for r in mine], "table": None}
    rows = [run_row(run_dir, results[run_dir]) for run_dir in runs]
    table = group_rows(rows)
    document = {"settings": {"episodes": cfg.episodes, "seed": cfg.seed, "greedy": cfg.greedy,
                             "max_steps": cfg.max_steps}, "table": table,
                "runs": [{k: v for k, v in r.items() if k != "config"} for r in rows]}
    if cfg.out:
        json_path, md_path = table_paths(cfg.out)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, document)
        atomic_write_text(md_path, markdown(table, cfg))
        document["paths"] = [str(json_path), str(md_path)]
    return document


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = parse_config(EvaluateManyConfig, AREA, NAME, argv)
    document = evaluate_many(cfg)
    if document["table"] is None:
        print(f"evaluated {len(document['evaluated'])} run(s); build the table with --collect")
    else:
        print(markdown(document["table"], cfg), end="")
        if document.get("paths"):
            print("table: " + ", ".join(document["paths"]))
    return document


if __name__ == "__main__":
    main()
