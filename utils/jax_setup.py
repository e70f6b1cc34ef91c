"""Turn on JAX's persistent compilation cache before anything is compiled.

Compiling a Craftax training program takes tens of seconds on a CPU; caching the compiled
executables on disk makes every later run (and every test session) start almost at once.
"""

from __future__ import annotations

import os
from pathlib import Path

_CACHE_ENV = "CRAFTAX_JAX_CACHE"

#: XLA's concurrency-optimised CPU scheduler intermittently deadlocks (every worker idle, the result
#: never ready) on Craftax programs that step the env inside an extra loop or vmap level, e.g. PPO
#: with --num-seeds 2. Measured here with jaxlib 0.10.2: most runs hung with it on; none with it off.
_XLA_CPU_SAFE_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def set_safe_xla_flags() -> None:
    """Add the flags above to ``XLA_FLAGS``; must run before JAX creates its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in _XLA_CPU_SAFE_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


def default_cache_dir() -> Path:
    """``$CRAFTAX_JAX_CACHE`` if set, else ``~/.cache/craftax_baselines/jax``."""
    configured = os.environ.get(_CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "craftax_baselines" / "jax"


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point JAX's persistent cache at ``cache_dir`` and cache every program that takes >1 s.

    Also sets the CPU-safety XLA flags, since every entry point calls this before computing.
    """
    set_safe_xla_flags()
    import jax

    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
