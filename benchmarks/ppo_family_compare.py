"""Learning comparison of the PPO family: the same env, budget, presets and seeds for every method.

Each method trains through its normal entry point (so its run folder under ``runs/`` holds the
metrics, curve and checkpoints, and an interrupted comparison resumes where it stopped); this script
collects every ``summary.json`` into one JSON file and prints the markdown tables of
docs/results.md: return (train episodes of the last 10% of the run, and the final evaluation), % of
the maximum return, floor statistics on full Craftax, achievement success rates.

    python -m benchmarks.ppo_family_compare --out docs/data/ppo_family_classic_2m.json -- \\
        --preset cpu --env Craftax-Classic-Symbolic-v1 --total-steps 2000000 --num-seeds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.common import machine_description
from benchmarks.ppo_family_sps import METHODS
from utils.config import parse_config
from utils.io import atomic_write_json
from utils.jax_setup import enable_compilation_cache

MAX_RETURN = {"Craftax-Symbolic-v1": 226.0, "Craftax-Pixels-v1": 226.0,
              "Craftax-Classic-Symbolic-v1": 22.0, "Craftax-Classic-Pixels-v1": 22.0}


def run_method(name: str, argv: list[str]) -> dict:
    module, config_cls, options = METHODS[name]
    cfg = dataclasses.replace(parse_config(config_cls, module.AREA, module.ALGO, argv), **options)
    result = module.train(cfg)
    return {"config": dataclasses.asdict(cfg), "run_dir": str(result["run_dir"]), "summary": result["summary"]}


def mean_and_seeds(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    seeds = ", ".join("n/a" if v is None else f"{v:.2f}" for v in entry["per_seed"])
    return f"{entry['mean']:.2f} ({seeds})"


def eval_mean(values: list | None) -> float | None:
    finite = [v for v in values or [] if v is not None]
    return sum(finite) / len(finite) if finite else None


def markdown(results: dict) -> str:
    env = results["env"]
    results = {**results, "methods": {n: results["methods"][n] for n in METHODS if n in results["methods"]}}
    best = MAX_RETURN.get(env)
    # Wall-clock steps/s is left out: methods run one after another on a shared machine, so their
    # speeds are not comparable here; benchmarks/ppo_family_sps.py measures them round robin.
    lines = ["| method | train return (per seed) | % of max | eval return |",
             "|---|---|---|---|"]
    for name, r in results["methods"].items():
        s = r["summary"]
        ret = s["final"].get("episode/return", {})
        pct = f"{100 * ret['mean'] / best:.2f}%" if best and ret.get("mean") is not None else "n/a"
        ev = eval_mean(s["eval"].get("eval/return"))
        lines.append(f"| {name} | {mean_and_seeds(ret)} | {pct} | {'n/a' if ev is None else f'{ev:.2f}'} |")
    floors = sorted({k for r in results["methods"].values() for k in r["summary"]["final"] if k.startswith("floors/")})
    if floors:
        lines += ["", "| method | " + " | ".join(k.removeprefix("floors/") for k in floors) + " |",
                  "|---|" + "---|" * len(floors)]
        for name, r in results["methods"].items():
            cells = [r["summary"]["final"].get(k, {}).get("mean") for k in floors]
            lines.append(f"| {name} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
    achievements = sorted({k for r in results["methods"].values() for k in r["summary"]["final"]
                           if k.startswith("achievements/")})
    if achievements:
        names = list(results["methods"])
        lines += ["", "| achievement (% of episodes) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key in achievements:
            cells = [results["methods"][n]["summary"]["final"].get(key, {}).get("mean") for n in names]
            if all(c is not None and c == 0 for c in cells):
                continue
            lines.append(f"| {key.removeprefix('achievements/')} | "
                         + " | ".join("n/a" if c is None else f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


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
