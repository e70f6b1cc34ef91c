"""Craftax's texture caches are built once and atomically (utils/textures.py).

CI failed on a fresh clone when two pytest-xdist workers built Classic's cache at once and one read the
other's half-written file. These tests use a stand-in constants module (slow texture building, cache in a
temporary folder) so the race is reproduced without touching the installed cache.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from utils.textures import ensure_texture_cache

FAKE_CONSTANTS = """
import os, time
import numpy as np
TEXTURE_CACHE_FILE = os.path.join(os.path.dirname(__file__), "assets", "texture_cache.pbz2")
BLOCK_PIXEL_SIZE_AGENT, BLOCK_PIXEL_SIZE_IMG, BLOCK_PIXEL_SIZE_HUMAN = 7, 16, 64
BUILDS = os.path.join(os.path.dirname(__file__), "builds.log")

def load_all_textures_given_size(size):
    with open(BUILDS, "a") as log:
        log.write(f"{size}\\n")
    time.sleep(0.3)  # long enough for a second process to arrive mid-build
    return {"full_map_block_textures": np.full((4, size, size, 3), size, dtype=np.float32)}
"""


@pytest.fixture
def fake_constants(tmp_path, monkeypatch):
    package = tmp_path / "fake_craftax_constants.py"
    package.write_text(FAKE_CONSTANTS)
    (tmp_path / "assets").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_craftax_constants", None)
    yield tmp_path
    sys.modules.pop("fake_craftax_constants", None)


def load_cache(folder):
    from craftax.environment_base.util import load_compressed_pickle

    return load_compressed_pickle(str(folder / "assets" / "texture_cache.pbz2"))


def test_a_missing_cache_is_built_in_craftax_format_and_then_left_alone(fake_constants):
    assert ensure_texture_cache("fake_craftax_constants") is True
    textures = load_cache(fake_constants)
    assert sorted(textures) == [7, 16, 64]
    assert textures[16]["full_map_block_textures"].shape == (4, 16, 16, 3)
    assert ensure_texture_cache("fake_craftax_constants") is False  # present: not rebuilt
    assert (fake_constants / "builds.log").read_text().split() == ["7", "16", "64"]
    assert not [p for p in os.listdir(fake_constants / "assets") if p.endswith(".partial")]
    assert os.stat(fake_constants / "assets" / "texture_cache.pbz2").st_mode & 0o777 == 0o644


def test_processes_starting_together_build_once_and_never_see_a_partial_file(fake_constants):
    """Each process ensures the cache, then loads it the way Craftax does: none may fail."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(fake_constants)!r}, {os.getcwd()!r}]
        from utils.textures import ensure_texture_cache
        from craftax.environment_base.util import load_compressed_pickle
        import fake_craftax_constants as c
        ensure_texture_cache("fake_craftax_constants")
        assert sorted(load_compressed_pickle(c.TEXTURE_CACHE_FILE)) == [7, 16, 64]
        """
    )
    processes = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, errors
    assert (fake_constants / "builds.log").read_text().split() == ["7", "16", "64"]  # one build in all


def test_a_failed_build_leaves_no_cache_and_no_partial_file(fake_constants, monkeypatch):
    import fake_craftax_constants

    def broken(size):
        raise RuntimeError("texture file unreadable")

    monkeypatch.setattr(fake_craftax_constants, "load_all_textures_given_size", broken)
    with pytest.raises(RuntimeError, match="unreadable"):
        ensure_texture_cache("fake_craftax_constants")
    assert [p for p in os.listdir(fake_constants / "assets") if not p.endswith(".lock")] == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_install_is_left_to_craftax(fake_constants):
    os.chmod(fake_constants / "assets", 0o555)
    try:
        assert ensure_texture_cache("fake_craftax_constants") is False
    finally:
        os.chmod(fake_constants / "assets", 0o755)
    assert not (fake_constants / "builds.log").exists()


def test_the_installed_caches_are_whole():
    """The caches this session's conftest ensured load and hold every size Craftax asks for."""
    import importlib

    from craftax.environment_base.util import load_compressed_pickle

    from utils.textures import CLASSIC, FULL

    for name in (CLASSIC, FULL):
        constants = importlib.import_module(name)
        textures = load_compressed_pickle(constants.TEXTURE_CACHE_FILE)
        sizes = {constants.BLOCK_PIXEL_SIZE_AGENT, constants.BLOCK_PIXEL_SIZE_IMG, constants.BLOCK_PIXEL_SIZE_HUMAN}
        assert sizes <= set(textures)
