"""Data parallelism over devices with jax.sharding: one global program, its batch split over a mesh.

A training carry keeps its logical (global) shape whatever the device count; only its *placement*
changes: the env axis of env states and observations is split over the mesh's ``data`` axis, and
everything else (parameters, optimiser state, RNG keys) is replicated. ``jax.jit`` then partitions the
same program over the devices (GSPMD): each device steps its share of the envs and computes its share
of every minibatch's loss, and the compiler inserts the all-reduces that a global mean (the loss, the
advantage normalisation, a bonus's running statistics) needs. Because the program is the global one,
a run on N devices computes what the 1-device run computes, up to the order of float sums, and a
checkpoint (global arrays) restores onto any device count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from utils.errors import UserError

AXIS = "data"


def make_mesh(devices: int, flag: str = "--devices") -> Mesh:
    """A 1-D mesh over the first ``devices`` local devices (0: all of them); in a multi-process run
    (``utils.distributed``) over every process's devices, which ``devices`` must then be 0 or count."""
    if jax.process_count() > 1:
        everything = jax.devices()
        if devices not in (0, len(everything)):
            raise UserError(f"{flag} {devices}: a run of {jax.process_count()} processes uses all their "
                            f"{len(everything)} devices; pass 0 (the default)")
        return Mesh(np.array(everything), (AXIS,))
    available = jax.local_devices()
    count = len(available) if devices == 0 else devices
    if count < 1 or count > len(available):
        raise UserError(f"{flag} {devices}: this process sees {len(available)} {available[0].platform} device(s); "
                        f"pass at most {len(available)} (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                        "simulates N devices)")
    return Mesh(np.array(available[:count]), (AXIS,))


def check_divisible(size: int, mesh: Mesh, what: str, flag: str) -> None:
    if size % mesh.size:
        raise UserError(f"{flag} {size}: {what} must split evenly over {mesh.size} devices; pass a multiple of {mesh.size}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_axis(mesh: Mesh, axis: int) -> NamedSharding:
    """Split array axis ``axis`` over the mesh; the other axes are whole on every device."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), AXIS))


def place(tree: Any, mesh: Mesh, split: Sequence[str] = (), axis: int = 1, size: int | None = None) -> Any:
    """Put a carry (a flax struct dataclass) on ``mesh``: the leaves of the fields named in ``split``
    whose axis ``axis`` has ``size`` entries are split along it, everything else is replicated."""

    def sharding(leaf, shard: bool):
        if shard and leaf.ndim > axis and (size is None or leaf.shape[axis] == size):
            return split_axis(mesh, axis)
        return replicated(mesh)

    def put(subtree, shard: bool):
        return jax.tree.map(lambda leaf: to_global(leaf, sharding(leaf, shard)), subtree)

    names = [f.name for f in dataclasses.fields(tree)]
    return tree.replace(**{name: put(getattr(tree, name), name in split) for name in names})


def to_global(value: Any, sharding: NamedSharding) -> jax.Array:
    """An array every process holds in full (the same in each), placed with ``sharding``: each process
    supplies the pieces its own devices keep, which works on one process or several."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda leaf: to_global(leaf, replicated(mesh)), tree)


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf.sharding, tree)
