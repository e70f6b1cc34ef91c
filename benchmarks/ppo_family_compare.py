"""Learning comparison of the PPO family: the same env, budget, presets and seeds for every method.

Each method trains through its normal entry point (so its run folder under ``runs/`` holds the
metrics, curve and checkpoints, and an interrupted comparison resumes where it stopped); this script
collects every ``summary.json`` into one JSON file and prints the markdown tables of
docs/results.md (benchmarks.compare's tables: return over the last 10% of the run and at the final
evaluation, % of the maximum return, achievement rates, floor statistics on full Craftax).
``python -m benchmarks.compare classic_2m`` runs the same comparison from a suite file, locally or on
Slurm; this script keeps the in-process variant that takes arbitrary trainer flags.

    python -m benchmarks.ppo_family_compare --out docs/data/ppo_family_classic_2m.json -- \\
        --preset cpu --env Craftax-Classic-Symbolic-v1 --total-steps 2000000 --num-seeds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.common import machine_description
from benchmarks.compare import markdown_tables
from benchmarks.ppo_family_sps import METHODS
from utils.config import parse_config
from utils.io import atomic_write_json
from utils.jax_setup import enable_compilation_cache


def run_method(name: str, argv: list[str]) -> dict:
    module, config_cls, options = METHODS[name]
    cfg = dataclasses.replace(parse_config(config_cls, module.AREA, module.ALGO, argv), **options)
    result = module.train(cfg)
    return {"config": dataclasses.asdict(cfg), "run_dir": str(result["run_dir"]), "summary": result["summary"]}


def markdown(results: dict) -> str:
    """The tables of benchmarks.compare, in METHODS order. Wall-clock steps/s is left out: methods run one
    after another on a shared machine, so their speeds are not comparable here; benchmarks/ppo_family_sps.py
    measures them round robin."""
    summaries = {n: results["methods"][n]["summary"] for n in METHODS if n in results["methods"]}
    return markdown_tables(summaries, results["env"], with_speed=False)


def render(path: str) -> None:
    """Print the tables of a finished (or partial) comparison file."""
    print(markdown(json.loads(Path(path).read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file collecting every method's summary")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--render-only", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags given to every method")
    args = parser.parse_args()
    if args.render_only:
        return render(args.out)
    argv = [a for a in args.train_args if a != "--"]
    enable_compilation_cache()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"methods": {}}
    results.update({"train_args": argv, "machine": machine_description()})
    for name in args.methods.split(","):
        print(f"== {name}", flush=True)
        entry = run_method(name, argv)
        results["env"] = entry["summary"]["env"]
        results["methods"][name] = entry
        atomic_write_json(out, results)  # each finished method is kept even if a later one is interrupted
    print(markdown(results))


if __name__ == "__main__":
    main()
