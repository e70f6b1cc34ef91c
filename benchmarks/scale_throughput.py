"""What scaling out costs or buys: PPO's steps/s against the device count, and a sweep in one program
against the same grid run as separate runs.

    python -m benchmarks.scale_throughput                       # both tables into docs/data
    python -m benchmarks.scale_throughput --devices 1 2 4 --total-steps 131072 --repeats 2

**Devices.** Each device count trains in a fresh process (XLA fixes the device list at start-up). On a
CPU the devices are simulated (``--xla_force_host_platform_device_count``, set to the largest count for
every process so only ``--devices`` differs): they share the machine's cores, so the table measures
what sharding the envs costs, not a speed-up. On a GPU machine the same command measures real scaling
(``--no-simulate`` uses the visible GPUs). The figure is steady-state env steps/s, from the
``perf/wall_seconds`` of the logged rows after the first (which includes compilation).

**Sweep.** The grid ``--sweep lr=... ent_coef=...`` (shape-free fields: one program whose slots are
points x seeds) against the same points as separate runs, one after the other, each process with an
empty compilation cache of its own so the separate runs pay what a researcher's would (the first
compiles; the later ones find the program in the shared persistent cache, since a single run is a sweep
of one point). The figure is wall seconds for the whole grid, including start-up and compilation.

Device counts and arms run interleaved across ``--repeats`` so background load hits them alike; the
tables (``benchmarks.records.write_table``) carry every repeat, and the report prints median and range.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import records
from utils.errors import UserError, exit_on_user_error

DEFAULT_DATA = Path("docs/data")
ENV = "Craftax-Classic-Symbolic-v1"


def ppo_command(args: argparse.Namespace, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "online_rl.ppo", "--preset", args.preset, "--env", args.env, "--no-progress",
            "--total-steps", str(args.total_steps), "--eval-every", "0", "--checkpoint-every", "1000",
            "--updates-per-chunk", str(args.updates_per_chunk), "--run-dir", str(run_dir), *extra]


def run(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one training process; its output is shown only when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"`{shlex.join(command)}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}")
    return time.perf_counter() - start


def steady_sps(run_dir: Path) -> float:
    """Env steps/s (all seeds) between the first and the last logged row: compilation excluded."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = (run_dir / "config.yaml").read_text()
    seeds = int(next(line.split(":")[1] for line in config.splitlines() if line.startswith("num_seeds:")))
    sps = records.steady_sps(rows, seeds)
    if sps is None:
        raise UserError(f"{run_dir}: fewer than 2 logged rows; raise --total-steps or lower --updates-per-chunk")
    return sps


def base_env(cache: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if cache is not None:
        env["CRAFTAX_JAX_CACHE"] = str(cache)
    return env


def measure_devices(args: argparse.Namespace, work: Path) -> list[dict]:
    env = base_env()
    if args.simulate:
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(args.devices)}".strip()
    samples: dict[int, list[float]] = {n: [] for n in args.devices}
    for repeat in range(args.repeats):
        for n in args.devices:
            run_dir = work / f"devices{n}-r{repeat}"
            run(ppo_command(args, run_dir, "--devices", str(n)), env)
            samples[n].append(steady_sps(run_dir))
            print(f"devices {n}, repeat {repeat}: {samples[n][-1]:,.0f} steps/s", flush=True)
    base = samples[args.devices[0]]
    return [{"devices": n, "sps": s, "relative": [a / b for a, b in zip(s, base)]} for n, s in samples.items()]


def grid_points(specs: list[str]) -> list[list[str]]:
    """``["lr=1e-4,3e-4", "ent_coef=0.01"]`` as the flags of each single run."""
    import itertools

    fields = [(spec.split("=", 1)[0], spec.split("=", 1)[1].split(",")) for spec in specs]
    return [[w for name, value in zip([f for f, _ in fields], values) for w in (f"--{name.replace('_', '-')}", value)]
            for values in itertools.product(*[v for _, v in fields])]


def measure_sweep(args: argparse.Namespace, work: Path) -> list[dict]:
    points = grid_points(args.sweep)
    seeds = ["--num-seeds", str(args.num_seeds)]
    one, separate = [], []
    for repeat in range(args.repeats):
        cache = None if args.warm_cache else work / f"cache-sweep-r{repeat}"
        one.append(run(ppo_command(args, work / f"sweep-r{repeat}", *seeds, "--sweep", *args.sweep), base_env(cache)))
        cache = None if args.warm_cache else work / f"cache-separate-r{repeat}"
        separate.append(sum(run(ppo_command(args, work / f"single{i}-r{repeat}", *seeds, *flags), base_env(cache))
                            for i, flags in enumerate(points)))
        print(f"repeat {repeat}: one program {one[-1]:.0f} s, separate runs {separate[-1]:.0f} s", flush=True)
    label = f"{len(points)} points x {args.num_seeds} seeds ({' '.join(args.sweep)})"
    return [{"arm": f"one program (--sweep), {label}", "seconds": one, "relative": [a / b for a, b in zip(one, one)]},
            {"arm": f"{len(points)} separate runs, one after the other", "seconds": separate,
             "relative": [s / o for s, o in zip(separate, one)]}]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=ENV)
    parser.add_argument("--preset", default="cpu", help="PPO preset of every run (default: cpu)")
    parser.add_argument("--total-steps", type=int, default=131_072, help="env steps per seed of every run")
    parser.add_argument("--updates-per-chunk", type=int, default=2, help="logged rows come this often")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-simulate", dest="simulate", action="store_false",
                        help="use the real devices (GPUs) instead of simulated CPU devices")
    parser.add_argument("--sweep", nargs="+", default=["lr=1e-4,3e-4", "ent_coef=0.003,0.01"])
    parser.add_argument("--num-seeds", type=int, default=2, help="seeds per point in the sweep table")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["devices", "sweep"], help="measure one table only")
    parser.add_argument("--warm-cache", action="store_true",
                        help="sweep arms use the usual compilation cache (quick checks; the table then leaves "
                             "compilation out)")
    parser.add_argument("--out", default=str(DEFAULT_DATA), help="folder for the tables (default: docs/data)")
    args = parser.parse_args(argv)
    if args.devices[0] != 1 and args.simulate:
        raise UserError("--devices should start with 1: the other counts are reported relative to the first")
    command = "python -m benchmarks.scale_throughput " + shlex.join(argv if argv is not None else sys.argv[1:])
    written = {}
    with tempfile.TemporaryDirectory(prefix="scale_throughput-") as work:
        if args.only in (None, "devices"):
            rows = measure_devices(args, Path(work))
            kind = "simulated CPU devices" if args.simulate else "devices"
            written["devices"] = records.write_table(
                Path(args.out) / "scale_devices.json", name="scale_devices",
                title=f"PPO steps/s against {kind} ({args.env}, preset {args.preset})", command=command.strip(),
                description=(f"One seed, {args.total_steps:,} env steps per run; steady-state env steps/s (after the "
                             "first logged row). Simulated devices share the machine's cores: this measures the "
                             "cost of splitting the envs, not a speed-up." if args.simulate else
                             f"One seed, {args.total_steps:,} env steps per run; steady-state env steps/s."),
                columns=[{"key": "devices", "label": "devices", "digits": 0},
                         {"key": "sps", "label": "env steps/s", "digits": 0},
                         {"key": "relative", "label": "relative to 1 device", "digits": 2}],
                rows=rows)
        if args.only in (None, "sweep"):
            rows = measure_sweep(args, Path(work))
            written["sweep"] = records.write_table(
                Path(args.out) / "scale_sweep_cost.json", name="scale_sweep_cost",
                title=f"A sweep in one program against separate runs ({args.env}, preset {args.preset})",
                command=command.strip(),
                description=(f"Wall seconds for the whole grid at {args.total_steps:,} env steps per seed, start-up "
                             + ("included, programs from a warm compilation cache." if args.warm_cache else
                                "and compilation included, each arm with an empty compilation cache.")),
                columns=[{"key": "arm", "label": "how the grid runs"},
                         {"key": "seconds", "label": "wall seconds", "digits": 0},
                         {"key": "relative", "label": "relative to one program", "digits": 2}],
                rows=rows)
    for path in written.values():
        print(f"wrote {path}; render it with python -m benchmarks.report")
    return {k: str(v) for k, v in written.items()}


if __name__ == "__main__":
    main()
