"""Test-session setup: CPU JAX with the persistent compilation cache on."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from utils.jax_setup import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory) -> str:
    """A tiny random Qwen2 model and tokenizer on disk (utils/testing/tiny_llm.py), built once a session."""
    from utils.testing.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))
