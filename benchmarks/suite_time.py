"""How long a new user waits for the README's test command: a fresh clone, a new venv, an empty cache.

The README promises a time for its test command on a fresh 2-core machine, and the compilation cache
decides most of it (half the suite's time is XLA compiling). This script measures exactly that case
and writes it as data, so the README's figure and docs/results.md's "Test suite" table come from a
record, not from memory:

1. ``git clone`` this checkout's committed HEAD into a new folder (uncommitted changes are not measured);
2. the README's test command, split at its ``&&`` into install (venv + ``pip install -e ".[test]"``) and
   tests, each timed, with ``CRAFTAX_JAX_CACHE`` pointing at a new empty folder;
3. with ``--slow``, CI's second command (the ``slow`` half) in the same clone, the cache now warm from
   the first half, as CI runs it.

    python -m benchmarks.suite_time                   # about 10-30 minutes on 2 cores
    python -m benchmarks.suite_time --slow            # and the slow half (another 30-60 minutes)
    python -m benchmarks.suite_time --keep /tmp/ci    # leave the clone for a look at its output

Nothing else should run meanwhile: the figure is for a quiet machine, and the table says what the load
average was at the start and the end. A failing step is recorded too (its failures column), and then
the clone and its output log stay for a look.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import records
from benchmarks.common import REPO_ROOT, cpu_description

README = REPO_ROOT / "README.md"
SLOW_COMMAND = '.venv/bin/python -m pytest -n 2 --dist loadfile -m "slow and not docs"'


def readme_test_command(readme: Path | None = None) -> str:
    """The README's install-and-test line: the first line that installs and runs pytest."""
    readme = readme or README
    for line in readme.read_text().splitlines():
        if "pip install" in line and "pytest" in line and not line.lstrip().startswith("#"):
            return line.strip()
    raise SystemExit(f"no install-and-test line (pip install ... && ... pytest) in {readme}")


def split_install_and_tests(command: str) -> tuple[str, str]:
    """``venv && pip install ... && pytest ...`` -> (everything before pytest, the pytest part)."""
    parts = [p.strip() for p in command.split("&&")]
    tests = [i for i, p in enumerate(parts) if "pytest" in p]
    if not tests or tests[0] == 0:
        raise SystemExit(f"cannot split {command!r} into install && tests")
    return " && ".join(parts[:tests[0]]), " && ".join(parts[tests[0]:])


def pytest_counts(output: str) -> dict[str, int]:
    """The final summary's counts: ``== 843 passed, 9 skipped in 407.1s ==`` -> {passed: 843, skipped: 9}."""
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not summary:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                     summary[-1])}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def timed(command: str, cwd: Path, env: dict, log: Path) -> tuple[float, int, str]:
    """(seconds, exit status, output) of one shell command, its output also appended to ``log``."""
    start = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    with log.open("a") as f:
        f.write(f"$ {command}\n{output}\n")
    return seconds, done.returncode, output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.suite_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", action="store_true", help="also time CI's slow half in the same clone")
    parser.add_argument("--keep", default=None, help="clone into this (new) folder and keep it; default: a "
                                                       "temporary folder, removed at the end")
    parser.add_argument("--table", default="docs/data/test_suite.json",
                        help="write the measured table here ('' for none); render with python -m benchmarks.report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = readme_test_command()
    install, tests = split_install_and_tests(command)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="suite_time_"))
    if args.keep and folder.exists():
        raise SystemExit(f"--keep {folder} exists; name a new folder")
    clone, cache, log = folder / "clone", folder / "empty_jax_cache", folder / "output.log"
    folder.mkdir(parents=True, exist_ok=True)
    cache.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["CRAFTAX_JAX_CACHE"] = str(cache)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    print(f"measuring {commit[:12]} in {clone} (log: {log})", flush=True)

    rows, load_start = [], load_average()
    steps = [("install", install), ("tests (README command)", tests)]
    if args.slow:
        steps.append(("slow half (CI's second command)", SLOW_COMMAND))
    failed = False
    for name, step in steps:
        seconds, status, output = timed(step, clone, env, log)
        counts = pytest_counts(output)
        print(f"{name}: {seconds / 60:.1f} min, exit {status}, {counts}", flush=True)
        rows.append({"step": name, "minutes": [round(seconds / 60, 2)], "exit": status,
                     "passed": counts.get("passed"), "skipped": counts.get("skipped"),
                     "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)})
        failed = failed or status != 0
        if status != 0 and name == "install":
            break
    total = sum(r["minutes"][0] for r in rows[:2])
    rows.insert(2, {"step": "README command in all", "minutes": [round(total, 2)], "exit": None})
    load_end = load_average()
    installed = rows[0]["exit"] == 0
    if args.table and installed:  # failures are data too: the table's last column counts them
        path = records.write_table(
            args.table, name=Path(args.table).stem, title="The README's test command on a fresh clone",
            command="python -m benchmarks.suite_time" + (" --slow" if args.slow else ""),
            description=(f"A fresh clone of commit {commit[:12]}, a new venv, `CRAFTAX_JAX_CACHE` at an empty "
                         f"folder: `{command}`, install and tests timed apart"
                         + (f"; then `{SLOW_COMMAND}` in the same clone (the cache warm from the first half)"
                            if args.slow else "") + f". {cpu_description()}; load average {load_start} at the "
                         f"start, {load_end} at the end."),
            columns=[{"key": "step", "label": "step"}, {"key": "minutes", "label": "minutes", "digits": 1},
                     {"key": "passed", "label": "passed", "digits": 0},
                     {"key": "skipped", "label": "skipped", "digits": 0},
                     {"key": "failed", "label": "failed or errors", "digits": 0}],
            rows=[{k: v for k, v in r.items() if k != "exit"} for r in rows])
        print(f"wrote {path}; render it with python -m benchmarks.report")
    if failed:
        print(f"a step failed; its output is in {log}", file=sys.stderr)
    if not args.keep and not failed:  # a failure's clone and log stay for a look
        shutil.rmtree(folder, ignore_errors=True)
    return {"commit": commit, "rows": rows, "failed": failed}


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["failed"] else 0)
