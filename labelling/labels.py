"""Labelled datasets: a trajectory dataset's shards plus ``text_obs`` and ``hidden_state``.

The queue (``labelling.queue``) decides *when* a shard is labelled; this module decides *what*
a labelled shard and its manifest are, with no Redis in sight, so it can be tested and reused
directly (``label_shard`` is a plain function of a dataset, a backend and an output folder).

Format (docs/design.md, "Labelled datasets"):

* A separate output folder with the source's shard file names. Each labelled shard holds the
  source shard's arrays exactly as stored (observations stay encoded: read with
  ``load_shard_raw``, never decoded and re-encoded) plus ``text_obs`` (numpy unicode, one string
  per row: the canonical text of ``utils.text_obs``) and ``hidden_state`` (float16 [rows, D]).
* Its ``manifest.json`` is the source manifest listing only the shards labelled so far (so a
  partly labelled dataset still reads), plus a ``labels`` block -- ``LLMSpec.to_manifest()`` with
  ``hidden_size`` and the storage ``dtype`` "float16" -- and a ``source`` block naming the source
  folder and its shard count (``is_complete`` compares the two).
* The labels block is exact: once a worker has loaded the model it holds the *resolved* compute
  dtype (never ``auto``), the backend and the model revision (``utils.llm.identity``). Before
  that (enqueue time) they read ``auto`` / None and match anything; after it, a worker whose
  resolution differs -- bf16 on a GPU against fp32 on a CPU, another snapshot of the model --
  is refused instead of mixing its rows into the dataset.
* Shards are written atomically (temp then rename), so a file under a shard's name is complete;
  the manifest is rebuilt from the files present, so re-running a job rewrites the same bytes.

``utils.trajectories.TrajectoryDataset(out_dir)`` reads the result: extra per-row arrays pass
through its reader and batcher. ``labels_of(manifest)`` rebuilds the ``LLMSpec`` so a consumer
computes new hidden states exactly like the stored ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.llm import RESOLVED_FIELDS, LLMBackend, LLMError, LLMSpec, identity, is_resolved, observation_features
from utils.obs_codec import decode_array, encoded_keys, is_encoded
from utils.trajectories import (
    DatasetError,
    TrajectoryDataset,
    _totals,  # the one definition of a manifest's totals
    read_manifest,
    save_npz_atomic,
    write_manifest,
)

LABELS_KEY = "labels"
STORAGE_DTYPE = "float16"
LABEL_ARRAYS = ("text_obs", "hidden_state")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# Fields a block may not know yet: written before a worker loaded the model (hidden size None,
# compute dtype "auto", revision None), or by a version that did not record them (key absent).
_UNRESOLVED = ("hidden_size", *RESOLVED_FIELDS)


def labels_block(spec: LLMSpec, hidden_size: int | None,
                 resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``labels`` block. ``hidden_size`` is None until a worker has loaded the model.

    With a ``hidden_size`` (a worker that has loaded the model) the compute dtype, backend and
    model revision are resolved: from ``resolved`` (a backend's ``identity``) when given, else by
    ``utils.llm.identity`` in this process, which is where the worker's model runs."""
    block = {**spec.to_manifest(), "hidden_size": hidden_size, "dtype": STORAGE_DTYPE}
    if hidden_size is not None:
        block.update(resolved if resolved is not None else identity(spec))
    return block


def labels_of(manifest: dict[str, Any], **runtime: Any) -> LLMSpec:
    """The LLMSpec a labelled dataset was made with (``runtime``: batch_size, device, ...)."""
    block = manifest.get(LABELS_KEY)
    if not isinstance(block, dict):
        raise DatasetError("this dataset has no LLM labels; label it with python -m labelling.enqueue "
                           "and python -m labelling.worker")
    return LLMSpec.from_manifest(block, **runtime)


def same_labels(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two label blocks describe the same hidden states. Fields not resolved yet on one
    side (hidden size, ``auto`` dtype, unknown revision, or a backend, dtype or revision an older
    manifest does not record) match anything; every other field must be equal, a missing one
    included. (Consumers of a finished dataset compare with ``utils.llm.check_identity``, the same
    rule with the dataset's block as the reference.)"""
    for key in set(a) | set(b):
        if key in _UNRESOLVED:
            if is_resolved(a.get(key)) and is_resolved(b.get(key)) and a[key] != b[key]:
                return False
        elif a.get(key) != b.get(key):
            return False
    return True


def merge_labels(current: dict[str, Any], labels: dict[str, Any]) -> dict[str, Any]:
    """``labels`` with the fields it does not know yet taken from ``current`` (same labels)."""
    known = {k: current[k] for k in _UNRESOLVED if is_resolved(current.get(k)) and not is_resolved(labels.get(k))}
    return {**labels, **known}


def _describe(block: dict[str, Any]) -> str:
    return (f"model {block.get('model')} (revision {block.get('model_revision')}), layer "
            f"{block.get('layer')}, {block.get('pooling')} pooling, template hash "
            f"{block.get('template_hash')}, backend {block.get('backend')}, compute dtype "
            f"{block.get('compute_dtype')}")


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def labelled_manifest(source_manifest: dict[str, Any], source_dir: str | os.PathLike,
                      out_dir: str | os.PathLike, labels: dict[str, Any]) -> dict[str, Any]:
    """The output manifest for the labelled shards present in ``out_dir`` right now."""
    out_dir = Path(out_dir)
    shards = [dict(s) for s in source_manifest["shards"] if (out_dir / s["file"]).is_file()]
    return {**source_manifest, "shards": shards, "totals": _totals(shards),
            LABELS_KEY: labels,
            "source": {"dataset": str(Path(source_dir).resolve()),
                       "shards": len(source_manifest["shards"])}}


def existing_labels(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The labels block of an output folder's manifest, or None if it has none yet."""
    if not (Path(out_dir) / "manifest.json").is_file():
        return None
    block = read_manifest(out_dir).get(LABELS_KEY)
    return block if isinstance(block, dict) else None


def check_output_labels(out_dir: str | os.PathLike, labels: dict[str, Any]) -> dict[str, Any]:
    """Refuse to mix labels: ``out_dir`` must be new or hold the same labels. Returns the block to
    write (keeping what the folder already resolved)."""
    current = existing_labels(out_dir)
    if current is None:
        return labels
    if not same_labels(current, labels):
        raise DatasetError(f"{out_dir} already holds labels from {_describe(current)}, not "
                           f"{_describe(labels)}; pass another --out or delete that folder")
    return merge_labels(current, labels)


def update_manifest(source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    labels: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``out_dir``'s manifest from the files present. Callers serialise concurrent calls
    (the queue holds a Redis lock), so the last writer has seen every finished shard."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    labels = check_output_labels(out_dir, labels)
    manifest = labelled_manifest(read_manifest(source_dir), source_dir, out_dir, labels)
    write_manifest(out_dir, manifest)
    return manifest


def is_complete(manifest: dict[str, Any]) -> bool:
    """True when every shard of the source dataset is labelled."""
    source = manifest.get("source") or {}
    return source.get("shards") is not None and len(manifest["shards"]) == source["shards"]


# ----------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    file: str
    rows: int
    seconds: float


def label_arrays(raw: dict[str, np.ndarray], env_name: str, backend: LLMBackend,
                 where: str = "shard") -> dict[str, np.ndarray]:
    """Stored shard arrays -> the same arrays plus ``text_obs`` and float16 ``hidden_state``.

    ``where`` names the shard in error messages."""
    keys = list(raw)
    if is_encoded("obs", keys):
        try:
            obs = decode_array({k: raw[k] for k in encoded_keys("obs", keys)}, "obs")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DatasetError(f"{where}: observations do not decode ({type(exc).__name__}: {exc}); "
                               "delete the shard and regenerate it") from exc
    elif "obs" in raw:
        obs = raw["obs"]
    else:
        raise DatasetError(f"{where}: shard holds no observations; delete it and regenerate it")
    states, texts = observation_features(backend, obs, env_name, return_texts=True)
    if states.shape != (len(obs), backend.hidden_size):
        raise LLMError(f"backend returned hidden states of shape {states.shape} for {len(obs)} rows; "
                       f"expected ({len(obs)}, {backend.hidden_size})")
    too_big = np.abs(states) > _FLOAT16_MAX
    if too_big.any():
        raise LLMError(f"{int(too_big.any(axis=1).sum())} hidden states exceed float16's range "
                       f"({np.abs(states).max():.3g} > {_FLOAT16_MAX:.0f}); pick another layer")
    labelled = {k: v for k, v in raw.items() if k not in LABEL_ARRAYS}
    labelled["text_obs"] = np.array(texts, dtype=str)
    labelled["hidden_state"] = states.astype(np.float16)
    return labelled


def label_shard(source: TrajectoryDataset, index: int, backend: LLMBackend,
                out_dir: str | os.PathLike) -> ShardResult:
    """Label shard ``index`` of ``source`` into ``out_dir`` (atomically; the manifest is separate)."""
    start = time.perf_counter()
    entry = source.shards[index]
    raw = source.load_shard_raw(index)
    labelled = label_arrays(raw, source.manifest["env_name"], backend, str(source.shard_path(index)))
    rows = len(labelled["hidden_state"])
    if rows != int(entry["rows"]):
        raise DatasetError(f"{source.shard_path(index)}: {rows} observations but the manifest says "
                           f"{entry['rows']}; delete the shard and regenerate it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(out / entry["file"], labelled)
    return ShardResult(file=entry["file"], rows=rows, seconds=time.perf_counter() - start)
