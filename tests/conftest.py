"""Test-session setup: CPU JAX with the persistent compilation cache on."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from utils.jax_setup import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
