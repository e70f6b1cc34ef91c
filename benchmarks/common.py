"""Shared bits of the benchmark scripts: machine description and timing of compiled loops."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import jax

REPO_ROOT = Path(__file__).resolve().parent.parent


def machine_description() -> str:
    """One line naming the CPU/GPU the figures were measured on."""
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return f"{cpu_description()}; JAX {jax.__version__} on {devices}"


def cpu_description() -> str:
    """Core count and CPU model, without starting a JAX backend (which would claim GPU memory that a
    child training process needs)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu})"


def time_compiled(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(compile-and-first-run seconds, median seconds of ``repeats`` later runs)."""
    start = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    times.sort()
    return first, times[len(times) // 2]


def host_description() -> str:
    """CPU, GPUs (from nvidia-smi, so no JAX backend starts in this process) and the JAX version."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [cpu_description()]
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.split("\n")
            gpus = [n.strip() for n in names if n.strip()]
            if gpus:
                parts.append(f"{len(gpus)} x {gpus[0]}")
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        parts.append(f"JAX {version('jax')}")
    except PackageNotFoundError:
        pass
    return "; ".join(parts)


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes), so a figure names the code."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
