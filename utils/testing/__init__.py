"""Test fixtures that ship with the package, so benchmarks and docs can build them too (no hub access)."""
