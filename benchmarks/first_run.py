"""What a first run costs on a new machine (cold compilation) against a later one (compilation cache).

Each entry point's ``--preset debug`` runs twice as a separate process with the same, initially empty,
compilation cache (``$CRAFTAX_JAX_CACHE``): the first process compiles every program, the second reads
them from the cache. Wall-clock seconds of the whole process (imports included), and the load average,
since the machine may be shared.

    python -m benchmarks.first_run                                  # PPO and Dreamer V3
    python -m benchmarks.first_run --modules online_rl.ppo --out docs/data/first_run.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import cpu_description

DEFAULT_MODULES = ("online_rl.ppo", "world_models.dreamer")


def timed_run(module: str, cache: Path, run_dir: Path) -> dict:
    """One ``python -m MODULE --preset debug`` process; seconds, exit code and the load average."""
    env = {**os.environ, "CRAFTAX_JAX_CACHE": str(cache)}
    command = [sys.executable, "-m", module, "--preset", "debug", "--run-dir", str(run_dir), "--no-progress"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return {"seconds": round(seconds, 1), "load_average_1m": os.getloadavg()[0]}


def measure(module: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "jax-cache"
        cold = timed_run(module, cache, Path(tmp) / "cold")
        warm = timed_run(module, cache, Path(tmp) / "warm")
    return {"module": module, "cold": cold, "warm": warm}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES), help="entry points to time")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    rows = [measure(module) for module in args.modules]
    print(f"machine: {cpu_description()}")
    print("| entry point (`--preset debug`) | first run, empty cache (s) | second run (s) | load (1 min) |")
    print("|---|---|---|---|")
    for row in rows:
        loads = f"{row['cold']['load_average_1m']:.1f} / {row['warm']['load_average_1m']:.1f}"
        print(f"| {row['module']} | {row['cold']['seconds']:.0f} | {row['warm']['seconds']:.0f} | {loads} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": cpu_description(), "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
