"""Make a dataset of a contiguous range of another dataset's shards (e.g. only the trained policy's data).

A PPO run saved with ``--save-every 1`` holds the whole learning history; offline RL usually wants
the later, better part (and labelling it costs less). The new folder gets its own manifest listing
the chosen shards, renamed from ``shard_000000.npz`` on, and hard links to the original files (a
copy where links are impossible), so no shard is decoded or rewritten. Episode ids, stream steps
``t`` and stored critic values are unchanged, so returns are computed as in the full dataset,
bootstrapped where the subset starts and ends.

    python -m offline_rl.subset --source SRC --dest DST --last-shards 48
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from utils.errors import UserError, exit_on_user_error
from utils.trajectories import (
    MANIFEST_NAME,
    TrajectoryDataset,
    _totals,  # the one definition of a manifest's totals
    shard_name,
    write_manifest,
)


@dataclasses.dataclass
class SubsetConfig:
    """Write a dataset folder holding a contiguous range of another dataset's shards."""

    source: str
    """Dataset folder to take shards from."""
    dest: str
    """New dataset folder (must not hold a dataset yet)."""
    last_shards: int = 0
    """Keep the newest this-many shards (0: use --first-shard/--num-shards)."""
    first_shard: int = 0
    """First shard to keep (index into the source manifest's shard list)."""
    num_shards: int = 0
    """Shards to keep from --first-shard on (0: to the end)."""


def subset_dataset(source: str | Path, dest: str | Path, first: int, count: int | None = None) -> TrajectoryDataset:
    """Shards ``first .. first + count - 1`` of ``source`` as a new dataset in ``dest``."""
    data = TrajectoryDataset(source)
    stop = data.num_shards if count is None else first + count
    if not 0 <= first < stop <= data.num_shards:
        raise UserError(f"{source} has {data.num_shards} shards; cannot take shards {first}..{stop - 1}")
    dest = Path(dest)
    if (dest / MANIFEST_NAME).exists():
        raise UserError(f"{dest} already holds a dataset; pick a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    shards = []
    for new_index, i in enumerate(range(first, stop)):
        target = dest / shard_name(new_index)
        target.unlink(missing_ok=True)
        try:
            os.link(data.shard_path(i), target)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(data.shard_path(i), target)
        shards.append({**data.shards[i], "file": target.name})
    manifest = dict(data.manifest)
    manifest["shards"] = shards
    manifest["totals"] = _totals(shards)
    manifest["metadata"] = {**manifest.get("metadata", {}),
                            "subset_of": {"dataset": str(data.directory), "first_shard": first, "shards": len(shards)}}
    write_manifest(dest, manifest)
    return TrajectoryDataset(dest)


@exit_on_user_error
def main(argv: list[str] | None = None) -> TrajectoryDataset:
    import tyro

    cfg = tyro.cli(SubsetConfig, args=argv, description=SubsetConfig.__doc__)
    total = TrajectoryDataset(cfg.source).num_shards
    if cfg.last_shards:
        first, count = max(0, total - cfg.last_shards), None
    else:
        first, count = cfg.first_shard, cfg.num_shards or None
    subset = subset_dataset(cfg.source, cfg.dest, first, count)
    print(f"{subset.directory}: {subset.num_shards} shards, {subset.num_transitions} transitions")
    return subset


if __name__ == "__main__":
    main()
