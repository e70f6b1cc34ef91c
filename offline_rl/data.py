"""Reading trajectory datasets for offline RL: checks, per-row targets, and a prefetching loader.

Everything here streams shard by shard through :class:`utils.trajectories.TrajectoryDataset`, so
a dataset larger than memory works: memory holds a few decoded shards plus a few bytes per row
(returns, masks). Decoding is the expensive part (about as costly as a training step on a CPU),
so it runs off the training thread: in DataLoader worker processes that each read their own
subset of shards, or, with ``num_workers=0``, in one background thread.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import queue
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import UserError
from utils.feature_norm import usable_std
from utils.llm import IMAGE_FIELDS, RESOLVED_FIELDS, is_resolved
from utils.trajectories import DatasetError, TrajectoryDataset, describe_features, feature_blocks

NO_FEATURES = "none"
"""``--features none``: the observation only. Any other value names a labelled feature of the
dataset (``utils.trajectories.feature_blocks``: ``hidden_state`` for text LLM labels,
``image_hidden_state`` for a vision-language model's, or a name given at labelling)."""
FEATURE_SLOT = "hidden_state"
"""What batches call the chosen feature, whatever its array's name, so the algorithms read one key."""

LABEL_FIELDS = ("model", "layer", "pooling", "template", "template_hash", "hidden_size", *RESOLVED_FIELDS,
                *IMAGE_FIELDS)
"""Fields of a feature's identity block that a policy using it depends on: the feature identity
that ``offline_rl.evaluate`` compares with the live features it computes
(``utils.llm.check_identity``). ``utils.llm.RESOLVED_FIELDS`` (backend, resolved compute dtype,
model revision) are missing, or ``auto`` / None, in datasets labelled before they were recorded:
such a dataset still trains, with a note, and evaluation cannot check them. ``IMAGE_FIELDS``
(modality, image processor) are absent from text labels, whose modality is then text."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a trainer needs to know about a dataset, read from its manifest."""

    directory: str
    env_name: str
    obs_shape: tuple[int, ...]
    num_actions: int
    obs_encoding: str
    schema_version: int
    num_transitions: int
    num_shards: int
    features: str  # "none" or the name of the feature array the policy reads
    feature_dim: int  # 0 without features
    labels: dict[str, Any] | None  # the feature's identity block when features are used

    @property
    def keys(self) -> tuple[str, ...]:
        """Per-row arrays a training batch needs (the feature under :data:`FEATURE_SLOT`)."""
        return ("obs", "action", FEATURE_SLOT) if self.feature_dim else ("obs", "action")

    @property
    def transition_keys(self) -> tuple[str, ...]:
        """What a one-step TD target adds (IQL): reward, done and the next row's inputs (see
        :class:`TransitionDataset`)."""
        nexts = ("next_obs", "next_" + FEATURE_SLOT) if self.feature_dim else ("next_obs",)
        return ("reward", "done", *nexts, "next_valid")

    @property
    def feature_array(self) -> str:
        """The stored array read as :data:`FEATURE_SLOT`."""
        return self.features if self.feature_dim else FEATURE_SLOT


def open_dataset(directory: str | Path, features: str = NO_FEATURES) -> tuple[TrajectoryDataset, DataSpec]:
    """Open a dataset and check it can feed a policy with ``features``; one DatasetError line if not.

    Missing manifests and unknown schema versions are reported by ``TrajectoryDataset`` itself;
    this adds the empty-dataset and the missing-labels cases. The dataset returned reads the
    chosen feature as :data:`FEATURE_SLOT` (:class:`TransitionDataset`).
    """
    if not features:
        raise UserError(f"--features must be {NO_FEATURES} or the name of a labelled feature, e.g. hidden_state")
    if not directory:
        raise UserError("no dataset given: pass --dataset DIR (a folder written by "
                        "python -m online_rl.ppo --save-trajectories DIR)")
    dataset = TransitionDataset(directory, features if features != NO_FEATURES else FEATURE_SLOT)
    manifest = dataset.manifest
    if dataset.num_transitions == 0:
        raise DatasetError(f"{dataset.directory}: the dataset has no transitions; "
                           "let the run that writes it save at least one rollout")
    labels, feature_dim = None, 0
    if features != NO_FEATURES:
        labels, feature_dim = _check_labels(dataset, features)
    spec = DataSpec(
        directory=str(dataset.directory),
        env_name=str(manifest["env_name"]),
        obs_shape=tuple(int(d) for d in manifest["obs_shape"]),
        num_actions=int(manifest["num_actions"]),
        obs_encoding=str(manifest["obs_encoding"]),
        schema_version=int(manifest["schema_version"]),
        num_transitions=dataset.num_transitions,
        num_shards=dataset.num_shards,
        features=features,
        feature_dim=feature_dim,
        labels=labels,
    )
    return dataset, spec


def _check_labels(dataset: TrajectoryDataset, feature: str) -> tuple[dict[str, Any], int]:
    """The identity block and hidden size of ``feature``, a labelled feature of the dataset that
    every shard holds."""
    fix = ("label it with python -m labelling.enqueue and python -m labelling.worker, "
           "or train with --features none")
    blocks = feature_blocks(dataset.manifest)
    if not blocks:
        raise DatasetError(f"{dataset.directory}: --features {feature} needs a labelled dataset, "
                           f"but manifest.json has no 'features' (or 'labels') block; {fix}")
    if feature not in blocks:
        raise DatasetError(f"{dataset.directory}: no feature {feature!r}; this dataset has "
                           f"{describe_features(blocks)}: pass one of them as --features")
    labels = blocks[feature]
    missing = [k for k in LABEL_FIELDS if k not in labels and k not in (*RESOLVED_FIELDS, *IMAGE_FIELDS)]
    if missing:
        raise DatasetError(f"{dataset.directory}: the manifest's labels block lacks "
                           f"{', '.join(missing)}; re-run the labelling, or train with --features none")
    unrecorded = [k for k in RESOLVED_FIELDS if not is_resolved(labels.get(k))]
    if unrecorded:
        print(f"note: {dataset.directory} was labelled before the features' {', '.join(unrecorded)} "
              "were recorded; a policy trained on it is evaluated without checking them",
              file=sys.stderr)
    for i in range(dataset.num_shards):
        path = dataset.shard_path(i)
        try:
            with np.load(path, allow_pickle=False) as npz:  # reads the zip index only
                has_feature = feature in npz.files
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetError(f"{path}: unreadable shard ({exc}); restore or regenerate it") from exc
        if not has_feature:
            raise DatasetError(f"{path}: --features {feature} needs a {feature} array in every "
                               f"shard, this one has none (labelling unfinished?); {fix}")
    return dict(labels), int(labels["hidden_size"])


# ----------------------------------------------------------------------------------------------
# Per-row quantities computed by streaming over the shards
# ----------------------------------------------------------------------------------------------


def feature_stats(dataset: TrajectoryDataset, feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the features (``hidden_state``, or what :func:`open_dataset`'s dataset reads
    under that name) over the whole training set, for z-normalisation.

    Sums in float64 shard by shard (float16 sums would overflow). Dimensions that never vary get
    std 1, so a value seen only at evaluation time is not blown up by a tiny divisor.
    """
    total = np.zeros(feature_dim)
    total_sq = np.zeros(feature_dim)
    count = 0
    for i in range(dataset.num_shards):
        hidden = dataset.load_shard(i, (FEATURE_SLOT,))[FEATURE_SLOT]
        if hidden.ndim != 2 or hidden.shape[1] != feature_dim:
            raise DatasetError(f"{dataset.shard_path(i)}: hidden_state has shape {hidden.shape}, but the "
                               f"manifest's labels say hidden_size {feature_dim}; re-run the labelling")
        x = hidden.astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std = usable_std(std)  # the rule online features use too (utils/feature_norm.py)
    return mean.astype(np.float32), std.astype(np.float32)


@dataclasses.dataclass
class EpisodeTable:
    """Per-episode outcomes of a dataset and, per row, which episode the row belongs to."""

    episode_of_row: np.ndarray  # [rows] index into the arrays below
    returns: np.ndarray  # [episodes] undiscounted sum of the rewards present in the data
    lengths: np.ndarray  # [episodes] rows present
    complete: np.ndarray  # [episodes] bool: both the first and the last step are in the data


def episode_table(dataset: TrajectoryDataset) -> EpisodeTable:
    """Group rows into episodes; an episode counts as complete only if it starts and ends in the data.

    Episode ids are new after every ``done`` and after every gap (an unsaved rollout), so an id's
    first row is a real start only if it is at t = 0 or right after a ``done`` of its stream; an
    episode cut by a gap or by the edges of the dataset has a partial return.
    """
    n = dataset.num_streams
    ids, rewards, starts, ends = [], [], [], []
    prev_done = np.zeros(n, dtype=bool)
    prev_t = np.full(n, -2, dtype=np.int64)
    for i in range(dataset.num_shards):
        shard = dataset.load_shard(i, ("episode_id", "reward", "done", "t"))
        steps = len(shard["t"]) // n
        t = shard["t"].reshape(n, steps)
        done = shard["done"].astype(bool).reshape(n, steps)
        before_done = np.concatenate([prev_done[:, None], done[:, :-1]], axis=1)
        before_t = np.concatenate([prev_t[:, None], t[:, :-1]], axis=1)
        starts.append(((t == 0) | (before_done & (before_t == t - 1))).reshape(-1))
        ends.append(shard["done"].astype(bool))
        ids.append(shard["episode_id"])
        rewards.append(shard["reward"].astype(np.float64))
        prev_done, prev_t = done[:, -1], t[:, -1]
    episode_ids, episode_of_row = np.unique(np.concatenate(ids), return_inverse=True)
    count = len(episode_ids)
    returns = np.bincount(episode_of_row, np.concatenate(rewards), minlength=count)
    lengths = np.bincount(episode_of_row, minlength=count)
    started = np.bincount(episode_of_row, np.concatenate(starts), minlength=count) > 0
    ended = np.bincount(episode_of_row, np.concatenate(ends), minlength=count) > 0
    return EpisodeTable(episode_of_row, returns, lengths, started & ended)


def top_episode_mask(table: EpisodeTable, fraction: float) -> np.ndarray:
    """Rows of the best ``fraction`` of the complete episodes by return (all rows when fraction = 1).

    Only complete episodes are ranked: a fragment's partial return says little about how good
    its episode was, so with ``fraction`` < 1 fragments are left out.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--top-fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.ones(len(table.episode_of_row), dtype=bool)
    candidates = np.flatnonzero(table.complete)
    if len(candidates) == 0:
        raise DatasetError("no episode both starts and ends inside the dataset, so none can be ranked "
                           "by return; save every rollout (--save-every 1) or use --top-fraction 1")
    keep_count = max(1, math.ceil(fraction * len(candidates)))
    order = candidates[np.lexsort((candidates, -table.returns[candidates]))]  # best first, ties by id
    kept = np.zeros(len(table.returns), dtype=bool)
    kept[order[:keep_count]] = True
    return kept[table.episode_of_row]


def critic_values(dataset: TrajectoryDataset, value_fn, batch_size: int, keys: Sequence[str]
                  ) -> np.ndarray:
    """``value_fn(batch) -> np.ndarray`` over every row in dataset order (for lambda-returns)."""
    values = np.empty(dataset.num_transitions, dtype=np.float32)
    for batch in dataset.iter_batches(batch_size, shuffle=False, keys=list(keys)):
        values[batch["row_index"]] = value_fn(to_tensors(batch))
    return values


# ----------------------------------------------------------------------------------------------
# Next observations
# ----------------------------------------------------------------------------------------------

_NEXT = {"next_obs": "obs", "next_" + FEATURE_SLOT: FEATURE_SLOT}


class TransitionDataset(TrajectoryDataset):
    """A dataset whose shards also offer ``next_obs`` (``next_hidden_state``) and ``next_valid`` per row,
    and that reads the array ``feature`` as ``hidden_state`` (:data:`FEATURE_SLOT`).

    Rows are env-major inside a shard, so a row's successor is the next row of the same stream: no
    new file format and no second decode. A stream's last row in a shard has its successor in the
    next shard (or in an unsaved rollout), which this shard-at-a-time reader cannot see: such a row
    gets ``next_valid`` False (and its own observation as a placeholder) unless it is ``done``, where
    the target ignores the next state. That drops one row in ``rollout_length`` from the TD loss
    only; every transition that is used is a true (s, a, r, s') of the data.
    """

    def __init__(self, directory: str | Path, feature: str = FEATURE_SLOT):
        super().__init__(directory)
        self.feature = feature

    def _load_slots(self, i: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Shard ``i``'s ``keys``, the feature array read under the slot's name."""
        shard = super().load_shard(i, [self.feature if k == FEATURE_SLOT else k for k in keys])
        if FEATURE_SLOT in keys and self.feature != FEATURE_SLOT:
            shard[FEATURE_SLOT] = shard.pop(self.feature)
        return shard

    def load_shard(self, i: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(keys) if keys is not None else None
        if wanted is None:
            return super().load_shard(i)
        if not any(k in _NEXT or k == "next_valid" for k in wanted):
            return self._load_slots(i, wanted)
        base = [k for k in wanted if k not in _NEXT and k != "next_valid"]
        sources = [_NEXT[k] for k in wanted if k in _NEXT]
        shard = self._load_slots(i, list(dict.fromkeys([*base, *sources, "done"])))
        rows = len(shard["done"])
        n = self.num_streams
        steps = rows // n
        if steps * n != rows:
            raise DatasetError(f"{self.shard_path(i)}: {rows} rows are not {n} streams of equal length; "
                               "rewrite this shard with TrajectoryWriter")
        last = np.zeros((n, steps), dtype=bool)
        last[:, -1] = True
        last = last.reshape(-1)
        successor = np.where(last, np.arange(rows), np.arange(rows) + 1)
        out = {k: shard[k] for k in base}
        for key in wanted:
            if key in _NEXT:
                out[key] = shard[_NEXT[key]][successor]
        if "next_valid" in wanted:
            out["next_valid"] = ~last | shard["done"].astype(bool)
        return out


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def to_tensors(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy batch -> tensors; actions become int64 (what cross-entropy and gather index with)."""
    out = {}
    for key, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = tensor.long() if key == "action" else tensor
    return out


class EpochBatches(torch.utils.data.IterableDataset):
    """One epoch of shuffled, fixed-size batches; in DataLoader worker k of W it reads shards k::W.

    Each shard is decoded once per epoch (``TrajectoryDataset.iter_batches`` mixes rows of
    ``shards_in_memory`` shards at a time). ``row_arrays`` (dataset-order arrays such as returns)
    are cut into the same batches; rows where ``row_mask`` is False are dropped and the rest
    re-batched, so every batch has exactly ``batch_size`` rows (an epoch's last partial batch per
    worker is dropped).
    """

    def __init__(self, directory: str, keys: Sequence[str], batch_size: int, seed: int, epoch: int,
                 row_arrays: Mapping[str, np.ndarray] | None = None, row_mask: np.ndarray | None = None,
                 shards_in_memory: int = 4, feature: str = FEATURE_SLOT):
        super().__init__()
        self.directory, self.keys, self.batch_size, self.feature = directory, list(keys), batch_size, feature
        self.seed, self.epoch, self.shards_in_memory = seed, epoch, shards_in_memory
        self.row_arrays = dict(row_arrays or {})
        if row_mask is not None:
            self.row_arrays["_keep"] = row_mask

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        dataset = TransitionDataset(self.directory, self.feature)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(dataset.num_shards)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, worker]).generate_state(1)[0])
        batches = dataset.iter_batches(self.batch_size, seed=seed, keys=self.keys,
                                       shards_in_memory=self.shards_in_memory,
                                       row_arrays=self.row_arrays, shards=order[worker::workers])
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        for batch in batches:
            keep = batch.pop("_keep", None)
            if keep is not None:
                batch = {k: v[keep] for k, v in batch.items()}
            if not pending and len(batch["row_index"]) == self.batch_size:
                yield to_tensors(batch)  # the common case: no copying
                continue
            pending.append(batch)
            pending_rows += len(batch["row_index"])
            while pending_rows >= self.batch_size:
                merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                yield to_tensors({k: v[:self.batch_size] for k, v in merged.items()})
                rest = {k: v[self.batch_size:] for k, v in merged.items()}
                pending_rows -= self.batch_size
                pending = [rest] if pending_rows else []


class _Prefetcher:
    """Run an iterator in a background thread, ``size`` items ahead; exceptions are re-raised."""

    _END = object()

    def __init__(self, iterator: Iterator, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True,
                                        name="offline-rl-loader")
        self._thread.start()

    def _run(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _worker_context():
    """A ``forkserver`` context whose server has imported this module (and so numpy and torch)
    once: each epoch's workers then start in milliseconds instead of re-importing torch, and
    never inherit the JAX or torch threads of the training process (forking those can deadlock)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload([__name__])
    return _CONTEXT


_CONTEXT = None


class BatchLoader:
    """Training batches epoch after epoch, decoded off the training thread.

    ``num_workers`` > 0 uses that many DataLoader worker processes (started from a clean
    ``forkserver`` process, since forking a process that already runs JAX or torch threads can
    deadlock); 0 uses one background thread, which overlaps decoding with training as far as numpy
    and zlib release the GIL. ``prefetch`` batches are kept ready per worker.
    """

    def __init__(self, spec: DataSpec, *, batch_size: int, seed: int, num_workers: int = 1,
                 shards_in_memory: int = 4, prefetch: int = 4, pin_memory: bool = False,
                 transitions: bool = False):
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        self.spec = spec
        self.keys = spec.keys + (spec.transition_keys if transitions else ())
        self.batch_size, self.seed = batch_size, seed
        self.num_workers = max(0, min(num_workers, spec.num_shards))  # more would sit idle
        self.shards_in_memory, self.prefetch, self.pin_memory = shards_in_memory, prefetch, pin_memory
        self._active: _Prefetcher | None = None

    def epoch(self, epoch: int, row_arrays: Mapping[str, np.ndarray] | None = None,
              row_mask: np.ndarray | None = None, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of epoch ``epoch`` (deterministic given seed, epoch and worker count), after
        dropping the first ``skip`` (a resumed run continues mid-epoch with the same batches)."""
        self.close()
        source = EpochBatches(self.spec.directory, self.keys, self.batch_size, self.seed, epoch,
                              row_arrays, row_mask, self.shards_in_memory, self.spec.feature_array)
        if self.num_workers:
            loader = torch.utils.data.DataLoader(
                source, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch,
                multiprocessing_context=_worker_context(), pin_memory=self.pin_memory)
            iterator = iter(loader)
        else:
            iterator = self._active = _Prefetcher(iter(source), self.prefetch)
        for _ in range(skip):
            if next(iterator, None) is None:
                break
        return iterator

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
