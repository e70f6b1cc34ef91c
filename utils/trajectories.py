"""Trajectory datasets: PPO writes rollouts as shards, labelling and offline RL read them back.

A dataset is a directory holding ``manifest.json`` and one ``shard_NNNNNN.npz`` per saved
rollout. Design choices, each fixing something the predecessor got wrong:

* Rows inside a shard are env-major (row = stream * T + step), so one stream's transitions are
  contiguous and returns can be computed per stream across shard boundaries instead of being
  truncated at every file edge.
* Every row carries the stream's global step ``t`` (= update * T + step), so a gap left by saving
  only every K-th rollout is visible; returns bootstrap from the stored critic value there.
* The true terminal observation (before the env reset) is kept for every ``done`` row.
* Observations go through the lossless codec in :mod:`utils.obs_codec`; a reader decodes each
  stored array once per shard, never once per row.
* Shards and the manifest are written to a temporary name and renamed, so a crash never leaves a
  half-written file under a real name, and a resumed run regenerates exactly what was lost.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from utils.errors import UserError
from utils.obs_codec import OBS_ENCODING, decode_array, encode_array, encoded_keys, is_encoded

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHARD_RE = re.compile(r"^shard_(\d{6})\.npz$")
_TMP_PREFIX = ".tmp-"

# Stored once per row (besides the encoded ``obs``).
ROW_FIELDS = ("action", "reward", "done", "log_prob", "value", "stream_id", "t", "episode_id")
# Stored once per shard, not per row: never batched, concatenated specially by ``read_all``.
SHARD_FIELDS = ("terminal_obs", "terminal_rows", "last_value", "update")
# Fields a manifest must agree on before a writer may append to it.
_RESUME_FIELDS = ("env_name", "obs_shape", "obs_dtype", "num_streams", "num_actions")


class DatasetError(UserError):  # a ValueError: entry points print its one line and exit
    """A dataset on disk is missing, corrupt or incompatible: one line naming the file and the fix."""


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.npz"


def action_dtype(num_actions: int) -> np.dtype:
    """Smallest unsigned type that holds every action index (uint8 for Craftax's 17 or 43)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_actions - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write under a temporary name in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a compressed npz atomically: readers and resumed runs never see half a shard.

    Public so a later stage (e.g. labelling, adding ``text_obs`` and ``hidden_state``) can save a
    shard it got from :meth:`TrajectoryDataset.load_shard_raw` without re-encoding observations.
    """
    _atomic_write(Path(path), lambda f: np.savez_compressed(f, **arrays))


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Atomically (re)write ``manifest.json``; non-JSON metadata values are stored as strings."""
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    _atomic_write(Path(directory) / MANIFEST_NAME, lambda f: f.write(text.encode()))


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Load and check a manifest; every problem becomes one DatasetError line."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(
            f"{path}: no manifest, so {Path(directory)} is not a trajectory dataset; "
            "point at a folder written by TrajectoryWriter")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc}); restore it or rewrite the dataset") from exc
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: manifest is not a JSON object; restore it or rewrite the dataset")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema_version {version!r} is not supported (this code reads {SCHEMA_VERSION}); "
            "use the matching version of craftax-baselines or rewrite the dataset")
    required = ("env_name", "obs_shape", "obs_dtype", "obs_encoding", "num_streams", "num_actions",
                "rollout_length", "shards", "totals")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise DatasetError(f"{path}: manifest lacks {', '.join(missing)}; restore it or rewrite the dataset")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not {"file", "update", "rows"} <= entry.keys():
            raise DatasetError(f"{path}: malformed shard entry {entry!r}; restore the manifest")
    return manifest


def _totals(shards: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {
        "transitions": int(sum(s["rows"] for s in shards)),
        "finished_episodes": int(sum(s["num_episodes_finished"] for s in shards)),
        "shards": len(shards),
    }


# ----------------------------------------------------------------------------------------------
# Labelled features (written by labelling, read by offline RL and the tools)
# ----------------------------------------------------------------------------------------------

FEATURES_KEY = "features"
"""Manifest block: feature array name -> the identity block of the hidden states stored under it."""
LEGACY_LABELS_KEY = "labels"
"""The first labelled format's one block, for the array ``hidden_state``; still written beside
``features`` (a copy of ``features["hidden_state"]``) so readers of that format keep working."""
DEFAULT_FEATURES = {"text": "hidden_state", "image": "image_hidden_state"}
"""Where a feature is stored unless labelling is told another name: by modality, so a dataset's
text and image features never collide."""
_FEATURE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED_NAMES = ("obs", "text_obs", *ROW_FIELDS, *SHARD_FIELDS)


def default_feature_name(modality: str) -> str:
    """The array a feature of ``modality`` (text, image) is stored under by default."""
    return DEFAULT_FEATURES["image" if modality == "image" else "text"]


def check_feature_name(name: str) -> str:
    """``name`` if it can name a feature array: lower-case snake case, not a stored field, no ``__``
    (the codec's separator for the parts of an encoded array)."""
    if not _FEATURE_NAME_RE.match(name or "") or "__" in name or name in _RESERVED_NAMES:
        raise UserError(f"feature name {name!r} cannot name an array in a shard: use lower-case letters, "
                        f"digits and single underscores, not one of {', '.join(_RESERVED_NAMES)}")
    return name


def feature_blocks(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every labelled feature of a dataset: array name -> identity block (model, layer, pooling,
    prompt, modality, ...). A dataset labelled before features had names has one, ``hidden_state``,
    described by its ``labels`` block."""
    blocks = manifest.get(FEATURES_KEY)
    if isinstance(blocks, dict):
        return {name: dict(block) for name, block in blocks.items() if isinstance(block, dict)}
    legacy = manifest.get(LEGACY_LABELS_KEY)
    return {DEFAULT_FEATURES["text"]: dict(legacy)} if isinstance(legacy, dict) else {}


def describe_features(blocks: Mapping[str, Mapping[str, Any]]) -> str:
    """``hidden_state (text, MODEL), image_hidden_state (image, MODEL)``: for error messages."""
    return ", ".join(f"{name} ({block.get('modality', 'text')}, {block.get('model')})"
                     for name, block in blocks.items()) or "none"


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


class TrajectoryWriter:
    """Append PPO rollouts to a dataset directory, one shard per call, optionally on a thread.

    Episode ids are globally unique: the writer keeps each stream's current id and a counter, and
    a stream's row after ``done`` starts a new id. Rollouts that were not saved (a gap in
    ``update``) start new ids on every stream too, because the writer cannot know whether an
    episode ended inside the gap; ``compute_returns`` bootstraps at the same places.
    """

    def __init__(self, directory: str | os.PathLike, *, env_name: str, obs_shape: Sequence[int],
                 obs_dtype: Any, num_streams: int, num_actions: int,
                 resume_after_update: int | None = None, metadata: Mapping[str, Any] | None = None,
                 max_pending: int = 2):
        """Open (or create) a dataset directory for appending.

        ``resume_after_update`` is the last update a resumed training run has in its checkpoint:
        later shards are deleted because that run will write them again. ``max_pending`` bounds
        how many rollouts ``write_rollout_async`` may hold in memory before the caller waits.
        """
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self.num_streams = int(num_streams)
        self.num_actions = int(num_actions)
        self._action_dtype = action_dtype(self.num_actions)
        self._max_pending = max_pending
        fresh = {
            "schema_version": SCHEMA_VERSION,
            "env_name": env_name,
            "obs_shape": list(self.obs_shape),
            "obs_dtype": self.obs_dtype.name,
            "obs_encoding": OBS_ENCODING,
            "num_streams": self.num_streams,
            "num_actions": self.num_actions,
            "rollout_length": None,
            "shards": [],
            "totals": _totals([]),
            "metadata": dict(metadata or {}),
        }
        manifest_path = self.directory / MANIFEST_NAME
        if manifest_path.exists():
            self.manifest = read_manifest(self.directory)
            self._check_compatible(fresh, manifest_path)
            if metadata is not None:
                self.manifest["metadata"] = dict(metadata)
            if resume_after_update is not None:
                self._drop_shards_after(resume_after_update)
        else:
            self._refuse_orphaned_shards(manifest_path)
            self.manifest = fresh
        self._remove_stray_files()
        self._restore_episode_state()
        write_manifest(self.directory, self.manifest)
        # Background writing: one thread so shards land in call order.
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    # -- public API ----------------------------------------------------------------------------

    def write_rollout(self, *, update: int, obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
                      done: np.ndarray, log_prob: np.ndarray, value: np.ndarray,
                      terminal_obs: np.ndarray, last_value: np.ndarray) -> None:
        """Write one time-major rollout ([T, N, ...] arrays, ``last_value`` [N]) as the next shard."""
        self._check_open()
        self.flush()
        self._write(update=update, obs=obs, action=action, reward=reward, done=done,
                    log_prob=log_prob, value=value, terminal_obs=terminal_obs, last_value=last_value)

    def write_rollout_async(self, **rollout: np.ndarray) -> None:
        """Queue a rollout for the background thread; blocks only when ``max_pending`` are queued.

        Writable arrays are copied because the caller may refill its buffers while the write waits;
        read-only ones (e.g. ``np.asarray`` of a JAX array) are safe to share and are not copied.
        """
        self._check_open()
        self._raise_background_error()
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self._max_pending)
            self._thread = threading.Thread(target=self._background_loop, name="trajectory-writer",
                                            daemon=True)
            self._thread.start()
        detached = {k: (v.copy() if isinstance(v, np.ndarray) and v.flags.writeable else v)
                    for k, v in rollout.items()}
        self._queue.put(detached)

    def flush(self) -> None:
        """Wait until every queued rollout is on disk; re-raise the first background error."""
        if self._queue is not None:
            self._queue.join()
        self._raise_background_error()

    def close(self) -> None:
        """Finish queued writes and stop the thread; re-raises any write error. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop_thread()
        self._raise_background_error()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the original exception; a secondary write error would only hide it
            self._closed = True
            self._stop_thread()

    # -- writing ------------------------------------------------------------------------------

    def _write(self, *, update: int, obs, action, reward, done, log_prob, value, terminal_obs,
               last_value) -> None:
        update = int(update)
        obs, terminal_obs = np.asarray(obs), np.asarray(terminal_obs)
        done = np.asarray(done).astype(bool)
        steps = self._validate_rollout(update, obs, terminal_obs, action, reward, done, log_prob,
                                       value, last_value)
        episode_ids, state_after = self._assign_episode_ids(update, done)
        arrays = self._shard_arrays(update, steps, obs, action, reward, done, log_prob, value,
                                    terminal_obs, last_value, episode_ids)
        index = len(self.manifest["shards"])
        save_npz_atomic(self.directory / shard_name(index), arrays)
        entry = {
            "file": shard_name(index),
            "update": update,
            "rows": steps * self.num_streams,
            "first_t": update * steps,
            "num_episodes_finished": int(done.sum()),
        }
        self.manifest["rollout_length"] = steps
        self.manifest["shards"].append(entry)
        self.manifest["totals"] = _totals(self.manifest["shards"])
        write_manifest(self.directory, self.manifest)
        self._episode_ids, self._starts_new, self._next_episode_id, self._last_update = state_after

    def _validate_rollout(self, update: int, obs: np.ndarray, terminal_obs: np.ndarray,
                          action, reward, done: np.ndarray, log_prob, value, last_value) -> int:
        """Catch caller mistakes before anything is written; returns the rollout length T."""
        n = self.num_streams
        if obs.ndim != 2 + len(self.obs_shape) or obs.shape[1] != n or obs.shape[2:] != self.obs_shape:
            raise ValueError(f"obs has shape {obs.shape}; expected [T, {n}, *{self.obs_shape}]")
        if obs.dtype != self.obs_dtype:
            raise ValueError(f"obs has dtype {obs.dtype}; this dataset stores {self.obs_dtype}")
        steps = obs.shape[0]
        expected_t = self.manifest["rollout_length"]
        if expected_t is not None and steps != expected_t:
            raise ValueError(f"rollout has {steps} steps; earlier shards have {expected_t}")
        if terminal_obs.shape != obs.shape:
            raise ValueError(f"terminal_obs has shape {terminal_obs.shape}; expected {obs.shape}")
        for name, arr in (("action", action), ("reward", reward), ("done", done),
                          ("log_prob", log_prob), ("value", value)):
            if np.shape(arr) != (steps, n):
                raise ValueError(f"{name} has shape {np.shape(arr)}; expected [{steps}, {n}]")
        if np.shape(last_value) != (n,):
            raise ValueError(f"last_value has shape {np.shape(last_value)}; expected [{n}]")
        action = np.asarray(action)
        if action.size and (action.min() < 0 or action.max() >= self.num_actions):
            raise ValueError(f"actions must lie in [0, {self.num_actions}); "
                             f"got {action.min()}..{action.max()}")
        if self._last_update is not None and update <= self._last_update:
            raise ValueError(
                f"update {update} is not after the last stored update {self._last_update} in "
                f"{self.directory}; to regenerate later rollouts pass resume_after_update, "
                "or write to a new directory")
        return steps

    def _shard_arrays(self, update: int, steps: int, obs, action, reward, done, log_prob, value,
                      terminal_obs, last_value, episode_ids) -> dict[str, np.ndarray]:
        n = self.num_streams

        def env_major(x: np.ndarray, dtype: Any = None) -> np.ndarray:
            x = np.asarray(x)
            flat = np.swapaxes(x, 0, 1).reshape(n * steps, *x.shape[2:])
            return np.ascontiguousarray(flat if dtype is None else flat.astype(dtype))

        done_rows = env_major(done)
        # Pick terminal observations straight from the time-major input: reordering all of it
        # first would copy a whole rollout of (possibly pixel) observations for a few rows.
        stream_idx, step_idx = np.nonzero(np.asarray(done).T)  # sorted by stream, then step
        terminal_rows = (stream_idx * steps + step_idx).astype(np.int64)
        arrays = {
            **encode_array(env_major(obs), "obs"),
            "action": env_major(action, self._action_dtype),
            "reward": env_major(reward, np.float32),
            "done": done_rows,
            "log_prob": env_major(log_prob, np.float32),
            "value": env_major(value, np.float32),
            "stream_id": np.repeat(np.arange(n, dtype=np.int32), steps),
            "t": np.tile(np.arange(steps, dtype=np.int64) + update * steps, n),
            "episode_id": env_major(episode_ids),
            **encode_array(np.asarray(terminal_obs)[step_idx, stream_idx], "terminal_obs"),
            "terminal_rows": terminal_rows,
            "last_value": np.asarray(last_value, dtype=np.float32),
            "update": np.array(update, dtype=np.int64),
        }
        return arrays

    # -- episode ids ----------------------------------------------------------------------------

    def _assign_episode_ids(self, update: int, done: np.ndarray) -> tuple[np.ndarray, tuple]:
        """Ids for a [T, N] rollout, in time order then stream order, plus the state after it.

        The state is only committed once the shard is on disk, so a failed write changes nothing.
        """
        current = self._episode_ids.copy()
        starts_new = self._starts_new.copy()
        next_id = self._next_episode_id
        if self._last_update is not None and update != self._last_update + 1:
            starts_new[:] = True  # unsaved rollouts in between: continuity unknown
        ids = np.empty(done.shape, dtype=np.int64)
        for step in range(done.shape[0]):
            count = int(starts_new.sum())
            current[starts_new] = np.arange(next_id, next_id + count)
            next_id += count
            ids[step] = current
            starts_new = done[step].copy()
        return ids, (current, starts_new, next_id, update)

    def _restore_episode_state(self) -> None:
        """Continue ids from the last stored shard, as if the writer had never stopped."""
        n = self.num_streams
        self._episode_ids = np.zeros(n, dtype=np.int64)
        self._starts_new = np.ones(n, dtype=bool)
        self._next_episode_id = 0
        self._last_update = None
        if not self.manifest["shards"]:
            return
        last = self.manifest["shards"][-1]
        arrays = _load_npz(self.directory / last["file"], ("episode_id", "done", "update"))
        steps = last["rows"] // n
        ids = arrays["episode_id"].reshape(n, steps)
        self._episode_ids = ids[:, -1].copy()
        self._starts_new = arrays["done"].reshape(n, steps)[:, -1].astype(bool)
        self._next_episode_id = int(ids.max()) + 1  # the newest id is always still current here
        self._last_update = int(arrays["update"])

    # -- resume ---------------------------------------------------------------------------------

    def _check_compatible(self, fresh: Mapping[str, Any], manifest_path: Path) -> None:
        for field in _RESUME_FIELDS:
            if self.manifest.get(field) != fresh[field]:
                raise DatasetError(
                    f"{manifest_path}: existing dataset has {field}={self.manifest.get(field)!r} but "
                    f"this run writes {field}={fresh[field]!r}; use a new dataset directory")

    def _drop_shards_after(self, update: int) -> None:
        """Forget shards a resumed training run is about to regenerate."""
        kept = [s for s in self.manifest["shards"] if s["update"] <= update]
        for entry in self.manifest["shards"]:
            if entry["update"] > update:
                (self.directory / entry["file"]).unlink(missing_ok=True)
        self.manifest["shards"] = kept
        self.manifest["totals"] = _totals(kept)

    def _refuse_orphaned_shards(self, manifest_path: Path) -> None:
        """Shards without a manifest are someone's data whose manifest was lost: never delete them."""
        if any(_SHARD_RE.match(p.name) for p in self.directory.iterdir()):
            raise DatasetError(
                f"{manifest_path}: missing, but {self.directory} holds shard files; restore the "
                "manifest or write to an empty directory")

    def _remove_stray_files(self) -> None:
        """Delete temp files and shard files the manifest does not list (left by a crash)."""
        listed = {s["file"] for s in self.manifest["shards"]}
        for path in self.directory.iterdir():
            stray_shard = _SHARD_RE.match(path.name) and path.name not in listed
            if stray_shard or path.name.startswith(_TMP_PREFIX):
                path.unlink(missing_ok=True)

    # -- background thread ----------------------------------------------------------------------

    def _background_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, later shards would leave a hole
                    self._write(**item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self._queue = None

    def _raise_background_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TrajectoryWriter for {self.directory} is closed")


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def _corrupt(path: Path, exc: BaseException) -> DatasetError:
    return DatasetError(f"{path}: corrupt shard ({type(exc).__name__}: {exc}); "
                        "delete it and regenerate it, or restore it from a copy")


def _logical_names(files: Sequence[str]) -> list[str]:
    """Stored names -> array names a reader sees (the parts ``obs__*`` become ``obs``)."""
    names: list[str] = []
    for name in files:
        prefix = name.split("__")[0]
        logical = prefix if "__" in name and is_encoded(prefix, files) else name
        if logical not in names:
            names.append(logical)
    return names


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetError(
            f"{path}: shard listed in the manifest is missing; restore it, or rewrite the dataset")


def _load_npz(path: Path, keys: Sequence[str] | None = None, *, decode: bool = True
              ) -> dict[str, np.ndarray]:
    """Read and decode one shard's arrays (only ``keys`` if given), each decompressed once.

    ``decode=False`` returns every array exactly as stored (observations still encoded)."""
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            if not decode:
                return {k: npz[k] for k in files}
            wanted = _logical_names(files) if keys is None else list(keys)
            missing = [k for k in wanted if k not in files and not is_encoded(k, files)]
            if missing:
                raise DatasetError(f"{path}: shard lacks {', '.join(missing)}; "
                                   "delete it and regenerate it, or restore it from a copy")
            arrays = {}
            for key in wanted:
                if is_encoded(key, files):
                    arrays[key] = decode_array({k: npz[k] for k in encoded_keys(key, files)}, key)
                else:
                    arrays[key] = npz[key]
            return arrays
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, zipfile.BadZipFile,
            zlib.error) as exc:
        raise _corrupt(path, exc) from exc


def _list_npz(path: Path) -> list[str]:
    """Stored array names of a shard, without reading any array."""
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, exc) from exc


class TrajectoryDataset:
    """Read a dataset written by :class:`TrajectoryWriter` (or a labelled copy of one)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])
        rows = [int(s["rows"]) for s in self.shards]
        self._offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_transitions(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_streams(self) -> int:
        return int(self.manifest["num_streams"])

    def shard_path(self, i: int) -> Path:
        return self.directory / self.shards[i]["file"]

    def row_offset(self, i: int) -> int:
        """Index in dataset order of shard ``i``'s first row."""
        return int(self._offsets[i])

    # -- loading --------------------------------------------------------------------------------

    def load_shard_raw(self, i: int) -> dict[str, np.ndarray]:
        """The arrays exactly as stored (observations still encoded), e.g. to add columns and
        save with :func:`save_npz_atomic` without paying to re-encode observations."""
        return _load_npz(self.shard_path(i), decode=False)

    def load_shard(self, i: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Decoded arrays of shard ``i``: per-row fields, ``obs`` [rows, *obs_shape], the per-shard
        ``terminal_obs``/``terminal_rows``/``last_value``/``update``, and any extra arrays."""
        path = self.shard_path(i)
        arrays = _load_npz(path, keys)
        self._validate_shard(path, self.shards[i], arrays, full=keys is None)
        return arrays

    def iter_shards(self, keys: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.num_shards):
            yield self.load_shard(i, keys)

    def row_keys(self) -> list[str]:
        """Names of the per-row arrays (stored fields, ``obs`` and any extras a later stage added)."""
        if not self.num_shards:
            return ["obs", *ROW_FIELDS]
        return [k for k in _logical_names(_list_npz(self.shard_path(0))) if k not in SHARD_FIELDS]

    def read_all(self, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Whole dataset in memory, dataset order. Per-row keys are concatenated;
        ``terminal_rows`` become dataset row indices; ``last_value``/``update`` are stacked per shard."""
        keys = list(keys) if keys is not None else self.row_keys()
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for i, shard in enumerate(self.iter_shards(keys)):
            for k in keys:
                value = shard[k] + self.row_offset(i) if k == "terminal_rows" else shard[k]
                parts[k].append(value)
        stacked = {"last_value", "update"}
        return {k: (np.stack(v) if k in stacked else np.concatenate(v)) if v else np.empty(0)
                for k, v in parts.items()}

    # -- returns --------------------------------------------------------------------------------

    def compute_returns(self, gamma: float, *, return_bootstrapped: bool = False,
                        values: np.ndarray | None = None, lam: float = 1.0
                        ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Discounted return per row in dataset order, G_t = r_t + gamma (1 - done_t) G_{t+1}.

        With a critic's ``values`` (V(s) per row, dataset order) and ``lam`` < 1 these are
        TD(lambda) returns, G_t = r_t + gamma (1 - done_t) ((1 - lam) V_{t+1} + lam G_{t+1}),
        chained across shards the same way; ``lam`` = 1 is the Monte Carlo return above.

        Computed per stream across shard boundaries, so an episode spanning shards gets its full
        return. Where a stream's data stops (a gap because a rollout was not saved, or the end of
        the dataset) G_{t+1} is the critic's ``last_value`` stored with that shard. The optional
        mask marks rows whose return contains such a bootstrap value, i.e. rows of an episode
        that does not finish inside the contiguous data. Shards are visited in reverse carrying
        only per-stream state, so memory holds one shard of rewards at a time.
        """
        n = self.num_streams
        if lam != 1.0 and (values is None or len(values) != self.num_transitions):
            raise ValueError(f"lambda-returns (lam={lam}) need one value per row ({self.num_transitions})")
        returns = np.empty(self.num_transitions, dtype=np.float32)
        bootstrapped = np.empty(self.num_transitions, dtype=bool)
        carry_return = np.zeros(n, dtype=np.float64)
        carry_value = np.zeros(n, dtype=np.float64)  # V of each stream's first row in the next shard
        carry_boot = np.ones(n, dtype=bool)
        carry_first_t: np.ndarray | None = None  # t of each stream's first row in the next shard
        for i in reversed(range(self.num_shards)):
            shard = self.load_shard(i, ("reward", "done", "t", "stream_id", "last_value"))
            reward, done, t = self._per_stream(i, shard)
            start, stop = self.row_offset(i), self.row_offset(i + 1)
            value = (None if lam == 1.0
                     else np.asarray(values[start:stop], dtype=np.float64).reshape(reward.shape))
            follows = (np.zeros(n, dtype=bool) if carry_first_t is None
                       else carry_first_t == t[:, -1] + 1)
            g = np.where(follows, carry_return, shard["last_value"].astype(np.float64))
            next_value = np.where(follows, carry_value, g)
            boot = np.where(follows, carry_boot, True)
            out_g = np.empty(reward.shape, dtype=np.float64)
            out_boot = np.empty(reward.shape, dtype=bool)
            for step in reversed(range(reward.shape[1])):
                not_done = ~done[:, step]
                if value is not None:
                    g = (1.0 - lam) * next_value + lam * g
                    next_value = value[:, step]
                g = reward[:, step] + gamma * not_done * g
                boot = boot & not_done
                out_g[:, step], out_boot[:, step] = g, boot
            returns[start:stop] = out_g.reshape(-1)
            bootstrapped[start:stop] = out_boot.reshape(-1)
            carry_return, carry_boot, carry_first_t = g, boot, t[:, 0]
            carry_value = next_value
        return (returns, bootstrapped) if return_bootstrapped else returns

    def _per_stream(self, i: int, shard: Mapping[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[N, T] views of an env-major shard, after checking it really has that layout."""
        n = self.num_streams
        steps = len(shard["t"]) // n
        layout_ok = len(shard["t"]) == n * steps and steps > 0
        if layout_ok:
            t = shard["t"].reshape(n, steps)
            layout_ok = (np.all(shard["stream_id"].reshape(n, steps) == np.arange(n)[:, None])
                         and np.all(np.diff(t, axis=1) == 1))
        if not layout_ok:
            raise DatasetError(f"{self.shard_path(i)}: rows are not env-major with consecutive t; "
                               "rewrite this shard with TrajectoryWriter")
        reward = shard["reward"].astype(np.float64).reshape(n, steps)
        return reward, shard["done"].astype(bool).reshape(n, steps), t

    # -- batches --------------------------------------------------------------------------------

    def iter_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                     keys: Sequence[str] | None = None, shards_in_memory: int = 4,
                     drop_last: bool = False, row_arrays: Mapping[str, np.ndarray] | None = None,
                     shards: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of minibatches, every row exactly once (the last batch may be short).

        ``shards`` limits the epoch to those shard indices (e.g. one data-loader worker's share).

        Shuffling mixes rows of ``shards_in_memory`` randomly chosen shards at a time, so
        datasets larger than memory work. ``row_arrays`` are extra dataset-order arrays (e.g. the
        output of ``compute_returns``) cut into the same batches; every batch also carries
        ``row_index``, the dataset-order index of each row.
        """
        keys = list(keys) if keys is not None else self.row_keys()
        per_shard = [k for k in keys if k in SHARD_FIELDS]
        if per_shard:
            raise ValueError(f"{per_shard} are stored per shard, not per row, so cannot be batched")
        row_arrays = dict(row_arrays or {})
        for name, arr in row_arrays.items():
            if len(arr) != self.num_transitions:
                raise ValueError(f"row_arrays[{name!r}] has {len(arr)} rows; "
                                 f"the dataset has {self.num_transitions}")
        rng = np.random.default_rng(seed)
        ids = np.arange(self.num_shards) if shards is None else np.asarray(shards, dtype=np.int64)
        order = rng.permutation(ids) if shuffle else ids
        leftover: dict[str, np.ndarray] | None = None
        for group_start in range(0, len(order), max(1, shards_in_memory)):
            group = order[group_start:group_start + max(1, shards_in_memory)]
            pool = self._load_rows(group, keys, row_arrays)
            if leftover is not None:
                pool = {k: np.concatenate([leftover[k], pool[k]]) for k in pool}
            size = len(pool["row_index"])
            perm = rng.permutation(size) if shuffle else np.arange(size)
            full = size - size % batch_size
            for start in range(0, full, batch_size):
                idx = perm[start:start + batch_size]
                yield {k: v[idx] for k, v in pool.items()}
            leftover = {k: v[perm[full:]] for k, v in pool.items()}
        if leftover is not None and len(leftover["row_index"]) and not drop_last:
            yield leftover

    def _load_rows(self, shard_ids: Sequence[int], keys: Sequence[str],
                   row_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in [*keys, *row_arrays, "row_index"]}
        for i in shard_ids:
            shard = self.load_shard(int(i), keys)
            start, stop = self.row_offset(int(i)), self.row_offset(int(i) + 1)
            for k in keys:
                parts[k].append(shard[k])
            for k, arr in row_arrays.items():
                parts[k].append(np.asarray(arr[start:stop]))
            parts["row_index"].append(np.arange(start, stop, dtype=np.int64))
        return {k: np.concatenate(v) for k, v in parts.items()}

    # -- decoding and validation ----------------------------------------------------------------

    def _validate_shard(self, path: Path, entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                        full: bool) -> None:
        """Fail loudly on a shard that does not match its manifest entry (e.g. a wrong file copied in)."""
        rows = int(entry["rows"])
        if full:
            missing = [k for k in ("obs", *ROW_FIELDS, *SHARD_FIELDS) if k not in arrays]
            if missing:
                raise DatasetError(f"{path}: shard lacks {', '.join(missing)}; "
                                   "delete it and regenerate it, or restore it from a copy")
        for name, arr in arrays.items():
            if name in SHARD_FIELDS:
                continue
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise DatasetError(f"{path}: {name} has {arr.shape[0] if arr.ndim else 0} rows but the "
                                   f"manifest says {rows}; delete the shard and regenerate it")
        obs_shape = tuple(self.manifest["obs_shape"])
        if "obs" in arrays and arrays["obs"].shape[1:] != obs_shape:
            raise DatasetError(f"{path}: obs has shape {arrays['obs'].shape[1:]}, manifest says {obs_shape}")
        if "terminal_obs" in arrays and "terminal_rows" in arrays:
            tr = arrays["terminal_rows"]
            if len(tr) != len(arrays["terminal_obs"]) or (len(tr) and (tr.min() < 0 or tr.max() >= rows)):
                raise DatasetError(f"{path}: terminal_rows do not match terminal_obs; "
                                   "delete the shard and regenerate it")
        if "last_value" in arrays and arrays["last_value"].shape != (self.num_streams,):
            raise DatasetError(f"{path}: last_value has shape {arrays['last_value'].shape}, "
                               f"expected [{self.num_streams}]")
