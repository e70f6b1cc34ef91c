"""Shared bits of the benchmark scripts: machine description and timing of compiled loops."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import jax


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
