"""The offline method-by-dataset table for docs/results.md, from ``offline_rl.evaluate_many``'s output.

    python -m offline_rl.evaluate_many runs/offline_tiers/classic/*/* --episodes 64 --out runs/offline_tiers/classic_table
    python -m benchmarks.offline_table runs/offline_tiers/classic_table.json --name offline_tiers_classic \\
        --title "Offline RL on the Craftax-Classic tiers" --baseline "bc top_fraction=1.0"
    python -m benchmarks.report

``evaluate_many`` evaluates the runs and groups seeds into rows (one per env, dataset and method); this
keeps each row's per-seed scores in a ``craftax-baselines/scores/1`` file in docs/data (``SCORES_SCHEMA``
of :mod:`benchmarks.records`) so that the report can give every cell an IQM with its stratified-bootstrap
interval and every method its difference to the baseline method on the same dataset, with the only
verdicts the page may print. The metric is the normalised score (0 = random, 100 = expert) where the
datasets are tiers, else the return.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks import records
from utils.errors import UserError, exit_on_user_error

DEFAULT_DATA = Path("docs/data")
#: The tiers in the order a reader expects them (others follow by name).
TIER_ORDER = ("random", "medium", "medium-replay", "medium-expert", "expert")


def task_name(row: dict) -> str:
    dataset = row.get("tier") or Path(row.get("dataset") or "?").name
    return f"{row['env']} / {dataset}"


def scores_from(document: dict, metric: str) -> dict[str, dict[str, list]]:
    """``{task: {method: [per-seed values]}}`` from an evaluate_many document; rows with no value of
    ``metric`` (a dataset that is not a tier has no normalised score) are an error, not a silent gap."""
    tasks: dict[str, dict[str, list]] = {}
    for row in document["table"]:
        values = row[metric]["values"]
        if not values or any(v is None for v in values):
            raise UserError(f"{task_name(row)}, {row['method']}: no {metric} for every seed; use --metric return "
                            "for datasets that are not tiers")
        method = row["method"] + (f" [{row['features']}]" if row.get("features") not in (None, "obs", "none") else "")
        tasks.setdefault(task_name(row), {})[method] = [float(v) for v in values]
    tier = lambda task: task.rsplit(" / ", 1)[-1]
    ordered = sorted(tasks, key=lambda t: (t.rsplit(" / ", 1)[0], TIER_ORDER.index(tier(t))
                                           if tier(t) in TIER_ORDER else len(TIER_ORDER), t))
    return {task: tasks[task] for task in ordered}


def datasets_from(document: dict) -> dict[str, dict]:
    """``{task: what the data is}`` from each tier dataset's manifest (its ``tier`` block): the collecting
    policies with their update and return, and the data, random and expert returns the scores are made
    of, so the table's reader sees what each normalised score is relative to. Datasets not on this
    machine, or not tiers, are left out."""
    from utils.tiers import describe, tier_of
    from utils.trajectories import DatasetError, read_manifest

    found: dict[str, dict] = {}
    for row in document["table"]:
        task = task_name(row)
        if task in found or not row.get("dataset"):
            continue
        try:
            block = tier_of(read_manifest(Path(row["dataset"])))
        except (OSError, DatasetError):
            continue
        if block is None:
            continue
        found[task] = describe(block)
    return found


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", help="the .json written by offline_rl.evaluate_many --out")
    parser.add_argument("--name", required=True, help="block and data file name (docs/data/NAME.json)")
    parser.add_argument("--title", required=True)
    parser.add_argument("--baseline", default="bc", help="method every other is compared to, per dataset; or "
                        "settings only (augment=none): each method against itself with those settings")
    parser.add_argument("--metric", default="normalized_score", choices=["normalized_score", "return"])
    parser.add_argument("--description", default="")
    parser.add_argument("--seed-role", default="report", choices=["report", "tuning"],
                        help="whether these seeds chose any setting of the methods")
    parser.add_argument("--out", default=str(DEFAULT_DATA))
    args = parser.parse_args(argv)
    try:
        document = json.loads(Path(args.table).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{args.table} is not a readable evaluate_many table: {error}") from None
    tasks = scores_from(document, args.metric)
    from benchmarks.report import baseline_of

    if not any(baseline_of(method, args.baseline) in methods for methods in tasks.values() for method in methods):
        raise UserError(f"--baseline {args.baseline!r} is not a method of {args.table}; methods: "
                        f"{sorted({m for methods in tasks.values() for m in methods})}")
    command = "python -m benchmarks.offline_table " + shlex.join(argv if argv is not None else sys.argv[1:])
    path = records.write_scores(Path(args.out) / f"{args.name}.json", name=args.name, title=args.title,
                                description=args.description, command=command, baseline=args.baseline,
                                metric={"normalized_score": "normalised score (0 = random, 100 = expert)",
                                        "return": "episode return"}[args.metric],
                                settings=document.get("settings", {}), seed_role=args.seed_role, tasks=tasks,
                                datasets={task: d for task, d in datasets_from(document).items() if task in tasks})
    print(f"wrote {path}; render it with python -m benchmarks.report")
    return path


if __name__ == "__main__":
    main()
