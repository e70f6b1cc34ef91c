"""A real Slurm cluster for tests: find (or start) it, submit sbatch scripts, wait for their jobs.

tests/test_slurm.py submits the scripts in scripts/sbatch/ to the Slurm of this machine, the
one-node cluster that .ci/slurm_up.sh sets up, and checks what the jobs did. Jobs are submitted from
a *site checkout*: a folder whose entries link to this repository except ``runs/``, which is its
own, so run folders and logs land in the test's temporary folder as they would in a user's checkout
(the scripts write run folders relative to the checkout they were submitted from).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLURM_UP = REPO / ".ci" / "slurm_up.sh"
#: sbatch options that turn a script's GPU request into a CPU job small enough for a 2-CPU node
#: (the recipe docs/scripts.md gives for clusters without GPUs).
CPU_JOB = ["--gres=none", "--cpus-per-task=1", "--mem=3G"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}

#: Reasons a pending job gives when it can never run on this cluster (too many CPUs, a failed dependency).
NEVER_STARTS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "DependencyNeverSatisfied",
                "InvalidAccount", "InvalidQOS"}


def _run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _controller_up() -> bool:
    try:
        return _run("scontrol", "ping", timeout=20).stdout.count("UP") > 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _idle_nodes() -> int:
    done = _run("sinfo", "-h", "-o", "%t %D")
    return sum(int(count) for state, count in (line.split() for line in done.stdout.splitlines())
               if state.startswith(("idle", "mix", "alloc")))


def cluster_unavailable() -> str | None:
    """Why no Slurm cluster can run the tests here (None: one is up). Starts the local one with
    .ci/slurm_up.sh when Slurm is installed and we are root, but never installs anything."""
    if not shutil.which("sbatch") or not shutil.which("slurmctld"):
        return "Slurm is not installed (sbatch, slurmctld); .ci/slurm_up.sh installs a one-node cluster"
    if not _controller_up():
        if os.geteuid() != 0:
            return "slurmctld is not running and starting it needs root (.ci/slurm_up.sh)"
        done = _run("bash", str(SLURM_UP), timeout=180)
        if done.returncode != 0:
            return f".ci/slurm_up.sh could not start the cluster: {(done.stderr or done.stdout).strip()[-300:]}"
    if _idle_nodes() == 0:
        return "the Slurm cluster has no node that is up (sinfo)"
    return None


def site_checkout(path: Path) -> Path:
    """A checkout at ``path`` as a site would have it: every entry links to this repository, except
    ``runs/`` (and logs, written beside the links)."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name not in {"runs", ".git", ".pytest_cache"} and not (path / entry.name).exists():
            (path / entry.name).symlink_to(entry)
    (path / "runs").mkdir(exist_ok=True)
    return path


def job_env(**extra: str) -> dict[str, str]:
    """This process's environment without Slurm's, the scripts' or the labelling variables (a test
    run inside a Slurm job must not pass its own job's values on), plus ``extra``. SBATCH_* stay:
    a site's SBATCH_PARTITION or SBATCH_ACCOUNT apply as they would to a user's submission."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "CRAFTAX_", "LABELLING_", "HIDDEN_STATE_"))}
    return {**clean, "CRAFTAX_PYTHON": sys.executable, **extra}


def submit(checkout: Path, script: str, args: list[str], options: list[str] = (), env: dict | None = None) -> str:
    """``sbatch [options] scripts/sbatch/SCRIPT args`` from the checkout; the job id."""
    done = subprocess.run(["sbatch", "--parsable", *options, f"scripts/sbatch/{script}", *args], cwd=checkout,
                          env=env or job_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"sbatch {script} refused: {done.stderr.strip()}"
    return done.stdout.strip().split(";")[0]


@dataclass
class Task:
    """One job (or array task) as ``scontrol show job`` reports it."""

    job_id: str
    array_task: str | None
    state: str
    exit_code: str
    fields: dict[str, str]


def tasks(job_id: str) -> list[Task]:
    """Every task of a job (one for a plain job, one per array task)."""
    done = _run("scontrol", "show", "job", "-o", job_id)
    if done.returncode != 0:
        raise AssertionError(f"scontrol show job {job_id}: {done.stderr.strip()}")
    found = []
    for line in done.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        found.append(Task(fields["JobId"], fields.get("ArrayTaskId"), fields["JobState"], fields["ExitCode"], fields))
    return found


def wait(job_id: str, timeout: float = 900, poll_s: float = 2) -> list[Task]:
    """Wait until every task of the job has ended; its tasks. Cancels the job on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        current = tasks(job_id)
        pending_array = any(t.array_task and not re.fullmatch(r"\d+", t.array_task) for t in current)
        if current and not pending_array and all(t.state in FINAL_STATES for t in current):
            return current
        stuck = [t for t in current if t.state == "PENDING" and t.fields.get("Reason") in NEVER_STARTS]
        if stuck:
            _run("scancel", job_id)
            raise AssertionError(f"job {job_id} can never start here: {stuck[0].fields['Reason']} "
                                 f"(it asks for {stuck[0].fields.get('TRES', '?')})")
        if time.monotonic() > deadline:
            _run("scancel", job_id)
            raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: "
                                 f"{[(t.array_task, t.state) for t in current]}")
        time.sleep(poll_s)


def log_of(task: Task) -> str:
    """The task's log (its StdOut file), or a note that it has none."""
    path = Path(task.fields.get("StdOut", ""))
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def assert_completed(found: list[Task], count: int = 1) -> None:
    """``count`` tasks, each COMPLETED with exit code 0:0 (their logs in the message otherwise)."""
    assert len(found) == count, f"expected {count} tasks, got {[(t.array_task, t.state) for t in found]}"
    for task in found:
        assert (task.state, task.exit_code) == ("COMPLETED", "0:0"), \
            f"job {task.job_id}: {task.state} exit {task.exit_code}\n{log_of(task)[-4000:]}"
