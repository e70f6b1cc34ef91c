"""Craftax's pixel-texture caches, built once per install and written atomically.

Craftax builds its textures on first use and writes the cache file in place. On a fresh install, two
processes that start together (pytest-xdist workers, the tasks of a Slurm array, a sweep's parts) race:
one reads the other's half-written file and dies with "EOFError: Compressed file ended before the
end-of-stream marker was reached". ``ensure_texture_cache`` builds a missing cache under a file lock into
a temporary file and renames it into place, so a reader sees either no file or a whole one. Every pixel
path of this repository calls it before Craftax looks for its cache.
"""

import bz2
import fcntl
import importlib
import os
import pickle
import tempfile

# The modules whose ``load_all_textures`` reads a cache: Craftax-Classic's and full Craftax's.
CLASSIC = "craftax.craftax_classic.constants"
FULL = "craftax.craftax.constants"


def constants_module_for(env_name: str) -> str:
    return CLASSIC if env_name.startswith("Craftax-Classic") else FULL


def ensure_texture_cache(module_name: str) -> bool:
    """Build the texture cache of one Craftax constants module if it is missing; True if it was built.

    Does nothing where the cache's folder is read-only: Craftax then builds its textures in memory
    on each start, as it would without this function.
    """
    constants = importlib.import_module(module_name)
    path = constants.TEXTURE_CACHE_FILE
    folder = os.path.dirname(path)
    if os.path.exists(path) or not os.access(folder, os.W_OK):
        return False
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.exists(path):  # another process built it while this one waited
            return False
        sizes = (constants.BLOCK_PIXEL_SIZE_AGENT, constants.BLOCK_PIXEL_SIZE_IMG, constants.BLOCK_PIXEL_SIZE_HUMAN)
        textures = {size: constants.load_all_textures_given_size(size) for size in sizes}
        write_atomically(path, textures)
    return True


def ensure_texture_caches() -> list[str]:
    """Both caches (before starting processes that may render either game); the modules built."""
    return [name for name in (CLASSIC, FULL) if ensure_texture_cache(name)]


def write_atomically(path: str, data) -> None:
    """Craftax's format (a bz2-compressed pickle), written beside ``path`` and renamed onto it."""
    descriptor, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".texture_cache.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as raw, bz2.BZ2File(raw, "wb") as compressed:
            pickle.dump(data, compressed)
        os.chmod(partial, 0o644)  # mkstemp's 0600 would hide a shared install's cache from other users
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
