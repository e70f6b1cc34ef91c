"""Labelled datasets: a trajectory dataset's shards plus LLM (or VLM) features under named arrays.

The queue (``labelling.queue``) decides *when* a shard is labelled; this module decides *what*
a labelled shard and its manifest are, with no Redis in sight, so it can be tested and reused
directly (``label_shard`` is a plain function of a dataset, a backend and an output folder).

Format (docs/design.md, "Labelled datasets"):

* A separate output folder with the source's shard file names. Each labelled shard holds the
  source shard's arrays exactly as stored (observations stay encoded: read with
  ``load_shard_raw``, never decoded and re-encoded) plus one *feature*: float16 ``[rows, D]``
  under its name, ``hidden_state`` for text features by default (with ``text_obs``, numpy
  unicode, one canonical text of ``utils.text_obs`` per row) and ``image_hidden_state`` for image
  features (a vision-language model's states of the pixel frames; no text).
* Features sit side by side by labelling a labelled dataset again: its arrays (and earlier
  features) are copied as stored and the new feature is added under another name, so every
  output folder is still written by the jobs of one labelling, and each feature keeps its own
  identity.
* Its ``manifest.json`` is the source manifest listing only the shards labelled so far (so a
  partly labelled dataset still reads), plus a ``features`` block -- feature name ->
  ``LLMSpec.to_manifest()`` with ``hidden_size`` and the storage ``dtype`` "float16" (image
  features add ``modality: image`` and the ``image_processor``) -- holding the source's features
  and this folder's, and a ``source`` block naming the source folder, its shard count
  (``is_complete`` compares the two) and the ``feature`` this folder added. The block of a
  ``hidden_state`` feature is also written as ``labels``, the first format's one block.
* A feature's block is exact: once a worker has loaded the model it holds the *resolved* compute
  dtype (never ``auto``), the backend, the model revision and, for images, the image processor
  (``utils.llm.identity``). Before that (enqueue time) they read ``auto`` / None and match
  anything; after it, a worker whose resolution differs -- bf16 on a GPU against fp32 on a CPU,
  another snapshot of the model -- is refused instead of mixing its rows into the dataset.
* Shards are written atomically (temp then rename), so a file under a shard's name is complete;
  the manifest is rebuilt from the files present, so re-running a job rewrites the same bytes.

``utils.trajectories.TrajectoryDataset(out_dir)`` reads the result: extra per-row arrays pass
through its reader and batcher; ``utils.trajectories.feature_blocks`` lists the features.
``labels_of(manifest, feature=...)`` rebuilds the ``LLMSpec`` so a consumer computes new
hidden states exactly like the stored ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.llm import (
    IMAGE_FIELDS,
    RESOLVED_FIELDS,
    LLMBackend,
    LLMError,
    LLMSpec,
    frame_features,
    identity,
    is_resolved,
    observation_features,
    prompt_chunks,
)
from utils.obs_codec import decode_array, encoded_keys, is_encoded
from utils.trajectories import (
    FEATURES_KEY,
    LEGACY_LABELS_KEY,
    DatasetError,
    TrajectoryDataset,
    _totals,  # the one definition of a manifest's totals
    check_feature_name,
    default_feature_name,
    describe_features,
    feature_blocks,
    read_manifest,
    save_npz_atomic,
    write_manifest,
)

LABELS_KEY = LEGACY_LABELS_KEY
STORAGE_DTYPE = "float16"
TEXT_ARRAY = "text_obs"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# Fields a block may not know yet: written before a worker loaded the model (hidden size None,
# compute dtype "auto", revision None, no image processor), or by a version that did not record
# them (key absent).
_UNRESOLVED = ("hidden_size", *RESOLVED_FIELDS, "image_processor")


def labels_block(spec: LLMSpec, hidden_size: int | None,
                 resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """A feature's identity block. ``hidden_size`` is None until a worker has loaded the model.

    With a ``hidden_size`` (a worker that has loaded the model) the compute dtype, backend and
    model revision are resolved: from ``resolved`` (a backend's ``identity``, which for image
    features also holds the image processor) when given, else by ``utils.llm.identity`` in this
    process, which is where the worker's model runs."""
    block = {**spec.to_manifest(), "hidden_size": hidden_size, "dtype": STORAGE_DTYPE}
    if hidden_size is not None:
        resolved = resolved if resolved is not None else identity(spec)
        block.update({k: v for k, v in resolved.items() if k in (*RESOLVED_FIELDS, *IMAGE_FIELDS)})
    return block


def resolve_feature(feature: str | None, modality: str) -> str:
    """``feature`` (checked), or the array name features of ``modality`` are stored under by default."""
    return check_feature_name(feature) if feature else default_feature_name(modality)


def labels_of(manifest: dict[str, Any], feature: str | None = None, **runtime: Any) -> LLMSpec:
    """The LLMSpec a labelled dataset's ``feature`` was made with (``runtime``: batch_size, device,
    ...). Without ``feature``: the dataset's only feature."""
    blocks = feature_blocks(manifest)
    if not blocks:
        raise DatasetError("this dataset has no LLM labels; label it with python -m labelling.enqueue "
                           "and python -m labelling.worker")
    if feature is None and len(blocks) > 1:
        raise DatasetError(f"this dataset has several features ({describe_features(blocks)}); name one")
    name = feature if feature is not None else next(iter(blocks))
    if name not in blocks:
        raise DatasetError(f"this dataset has no feature {name!r}; it has {describe_features(blocks)}")
    return LLMSpec.from_manifest(blocks[name], **runtime)


def same_labels(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two label blocks describe the same hidden states. Fields not resolved yet on one
    side (hidden size, ``auto`` dtype, unknown revision or image processor, or a backend, dtype or
    revision an older manifest does not record) match anything; every other field must be equal,
    a missing one included. (Consumers of a finished dataset compare with
    ``utils.llm.check_identity``, the same rule with the dataset's block as the reference.)"""
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
    image = (f"image features (processor {block.get('image_processor')}) of "
             if block.get("modality") == "image" else "")
    return (f"{image}model {block.get('model')} (revision {block.get('model_revision')}), layer "
            f"{block.get('layer')}, {block.get('pooling')} pooling, template hash "
            f"{block.get('template_hash')}, backend {block.get('backend')}, compute dtype "
            f"{block.get('compute_dtype')}")


# ----------------------------------------------------------------------------------------------
# Which datasets a modality can label
# ----------------------------------------------------------------------------------------------


def is_pixel_dataset(manifest: dict[str, Any]) -> bool:
    """Whether the dataset's observations are frames ``[H, W, 3]`` (a pixel env) rather than vectors."""
    return len(manifest["obs_shape"]) == 3


def check_modality(manifest: dict[str, Any], modality: str, where: str) -> None:
    """Refuse labels the observations cannot give: image features need frames (a pixel dataset),
    text features a text rendering (a symbolic dataset; ``utils.text_obs``). One line each."""
    env = manifest["env_name"]
    if modality == "image" and not is_pixel_dataset(manifest):
        raise DatasetError(
            f"{where} holds symbolic observations of {env}, but a vision-language model's image features "
            "need frames: label a pixel dataset (saved from a *-Pixels-v1 env), or label this one with a "
            "text LLM (or --modality text)")
    if modality != "image" and is_pixel_dataset(manifest):
        raise DatasetError(
            f"{where} holds pixel observations of {env}, which have no text rendering, so a text LLM cannot "
            "label it: label it with a vision-language model (e.g. python -m utils.testing.tiny_vlm "
            "runs/tiny_vlm, then --model runs/tiny_vlm)")


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def labelled_manifest(source_manifest: dict[str, Any], source_dir: str | os.PathLike,
                      out_dir: str | os.PathLike, labels: dict[str, Any],
                      feature: str | None = None) -> dict[str, Any]:
    """The output manifest for the labelled shards present in ``out_dir`` right now: the source's
    features (a labelled source's, carried with its arrays) plus ``labels`` under ``feature``."""
    out_dir, feature = Path(out_dir), resolve_feature(feature, labels.get("modality", "text"))
    shards = [dict(s) for s in source_manifest["shards"] if (out_dir / s["file"]).is_file()]
    features = {**feature_blocks(source_manifest), feature: labels}
    manifest = {k: v for k, v in source_manifest.items() if k != LABELS_KEY}
    manifest.update({"shards": shards, "totals": _totals(shards), FEATURES_KEY: features,
                     "source": {"dataset": str(Path(source_dir).resolve()),
                                "shards": len(source_manifest["shards"]), "feature": feature}})
    text_default = default_feature_name("text")
    if text_default in features:  # the first format's block, for its readers
        manifest[LABELS_KEY] = features[text_default]
    return manifest


def folder_feature(out_dir: str | os.PathLike) -> str | None:
    """The feature an output folder's labelling adds (its manifest's ``source.feature``; the first
    format's ``hidden_state`` when not recorded), or None for a folder without a manifest."""
    if not (Path(out_dir) / "manifest.json").is_file():
        return None
    source = read_manifest(out_dir).get("source") or {}
    return source.get("feature") or default_feature_name("text")


def existing_labels(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The block of the feature an output folder's labelling adds (features it carried from its
    source are not its labels), or None if it has none yet."""
    feature = folder_feature(out_dir)
    return None if feature is None else feature_blocks(read_manifest(out_dir)).get(feature)


def check_output_labels(out_dir: str | os.PathLike, labels: dict[str, Any],
                        feature: str | None = None) -> dict[str, Any]:
    """Refuse to mix labels: ``out_dir`` must be new or hold the same labels under the same
    ``feature``. Returns the block to write (keeping what the folder already resolved)."""
    current = existing_labels(out_dir)
    if current is None:
        return labels
    if not same_labels(current, labels):
        raise DatasetError(f"{out_dir} already holds labels from {_describe(current)}, not "
                           f"{_describe(labels)}; pass another --out or delete that folder")
    held, feature = folder_feature(out_dir), resolve_feature(feature, labels.get("modality", "text"))
    if held is not None and held != feature:
        raise DatasetError(f"{out_dir} holds these labels as the feature {held!r}, not {feature!r}; "
                           "pass the same --feature, or another --out")
    return merge_labels(current, labels)


def update_manifest(source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    labels: dict[str, Any], feature: str | None = None) -> dict[str, Any]:
    """Rewrite ``out_dir``'s manifest from the files present. Callers serialise concurrent calls
    (the queue holds a Redis lock), so the last writer has seen every finished shard."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    feature = resolve_feature(feature, labels.get("modality", "text"))
    labels = check_output_labels(out_dir, labels, feature)
    manifest = labelled_manifest(read_manifest(source_dir), source_dir, out_dir, labels, feature)
    write_manifest(out_dir, manifest)
    return manifest


def is_complete(manifest: dict[str, Any]) -> bool:
    """True when every shard of the source dataset is labelled."""
    source = manifest.get("source") or {}
    return source.get("shards") is not None and len(manifest["shards"]) == source["shards"]


def check_source_features(manifest: dict[str, Any], feature: str, where: str) -> None:
    """A labelled source gets another feature only when all of it is labelled (its features then
    cover every row of the output) and the new feature's name is free."""
    blocks = feature_blocks(manifest)
    if not blocks:
        return
    if not is_complete(manifest):
        raise DatasetError(f"{where} is only partly labelled ({len(manifest['shards'])} of "
                           f"{(manifest.get('source') or {}).get('shards')} shards); finish it "
                           "(python -m labelling.worker) before adding another feature")
    if feature in blocks:
        raise DatasetError(f"{where} already has a feature {feature!r} ({_describe(blocks[feature])}); "
                           "store the new one under another name: --feature NAME")


# ----------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    file: str
    rows: int
    seconds: float


def _decoded_obs(raw: dict[str, np.ndarray], where: str) -> np.ndarray:
    """The shard's observations, decoded once (a DatasetError if they cannot be)."""
    keys = list(raw)
    if is_encoded("obs", keys):
        try:
            return decode_array({k: raw[k] for k in encoded_keys("obs", keys)}, "obs")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DatasetError(f"{where}: observations do not decode ({type(exc).__name__}: {exc}); "
                               "delete the shard and regenerate it") from exc
    if "obs" in raw:
        return raw["obs"]
    raise DatasetError(f"{where}: shard holds no observations; delete it and regenerate it")


def _frame_states(backend: LLMBackend, obs: np.ndarray, env_name: str) -> np.ndarray:
    """Image features of a shard's frames, ``ENGINE_CHUNK_ROWS`` at a time: the uint8 copies and the
    processor's tensors exist for one chunk, never for the whole shard (as texts on the text path)."""
    states = np.empty((len(obs), backend.hidden_size), dtype=np.float32)
    for rows in prompt_chunks([0] * len(obs)):
        states[rows] = frame_features(backend, obs[rows], env_name)
    return states


def _modality(backend: LLMBackend) -> str:
    return getattr(backend, "modality", "text")  # stand-ins in tests may not say: text


def label_arrays(raw: dict[str, np.ndarray], env_name: str, backend: LLMBackend,
                 where: str = "shard", feature: str | None = None) -> dict[str, np.ndarray]:
    """Stored shard arrays -> the same arrays plus the backend's float16 features under ``feature``
    (default by the backend's modality), with ``text_obs`` for text features.

    ``where`` names the shard in error messages."""
    feature = resolve_feature(feature, _modality(backend))
    obs = _decoded_obs(raw, where)
    added: dict[str, np.ndarray] = {}
    if _modality(backend) == "image":
        states = _frame_states(backend, obs, env_name)
    else:
        states, texts = observation_features(backend, obs, env_name, return_texts=True)
        added[TEXT_ARRAY] = np.array(texts, dtype=str)
    if states.shape != (len(obs), backend.hidden_size):
        raise LLMError(f"backend returned hidden states of shape {states.shape} for {len(obs)} rows; "
                       f"expected ({len(obs)}, {backend.hidden_size})")
    too_big = np.abs(states) > _FLOAT16_MAX
    if too_big.any():
        raise LLMError(f"{int(too_big.any(axis=1).sum())} hidden states exceed float16's range "
                       f"({np.abs(states).max():.3g} > {_FLOAT16_MAX:.0f}); pick another layer")
    added[feature] = states.astype(np.float16)
    return {**{k: v for k, v in raw.items() if k not in added}, **added}


def label_shard(source: TrajectoryDataset, index: int, backend: LLMBackend,
                out_dir: str | os.PathLike, feature: str | None = None) -> ShardResult:
    """Label shard ``index`` of ``source`` into ``out_dir`` (atomically; the manifest is separate)
    under ``feature`` (default by the backend's modality)."""
    start = time.perf_counter()
    entry = source.shards[index]
    where = str(source.shard_path(index))
    check_modality(source.manifest, _modality(backend), str(source.directory))
    feature = resolve_feature(feature, _modality(backend))
    labelled = label_arrays(source.load_shard_raw(index), source.manifest["env_name"], backend, where, feature)
    rows = len(labelled[feature])
    if rows != int(entry["rows"]):
        raise DatasetError(f"{where}: {rows} observations but the manifest says "
                           f"{entry['rows']}; delete the shard and regenerate it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(out / entry["file"], labelled)
    return ShardResult(file=entry["file"], rows=rows, seconds=time.perf_counter() - start)
