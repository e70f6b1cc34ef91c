"""Device-resident sequence replay: one ring buffer per env stream, ``[num_envs, capacity, ...]``.

Every env stream writes one row per env step at the same position, so the buffer is a plain pytree
of arrays that lives in the training carry (checkpointed, vmapped over seeds, never copied to the
host). A row is what the agent saw before acting: the observation, the reward and terminal flag
that came with it, ``is_first`` when it starts an episode, and the action taken.

Sampling picks a stream and a start uniformly among the chunks of ``length`` consecutive rows that
lie in the written part of the ring and do not cross its seam (where the newest row meets the
oldest). A chunk may span episodes: the rows carry ``is_first`` and the RSSM resets there. The
first row of every chunk is marked ``is_first`` as well, because the memory before it is not in
the chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Replay(NamedTuple):
    data: dict  # name -> [num_envs, capacity, ...]
    position: jax.Array  # int32: next row to write (same for every stream)
    count: jax.Array  # int32: rows written per stream, at most capacity

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[1]

    @property
    def num_streams(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]


def empty(example_row: dict, num_streams: int, capacity: int) -> Replay:
    """A buffer for rows shaped and typed like ``example_row`` (leading axis: streams)."""
    data = {k: jnp.zeros((num_streams, capacity) + v.shape[1:], v.dtype) for k, v in example_row.items()}
    return Replay(data, jnp.int32(0), jnp.int32(0))


def add(replay: Replay, rows: dict) -> Replay:
    """Append ``rows`` (``[T, num_streams, ...]``, time-major) to every stream."""
    steps = jax.tree.leaves(rows)[0].shape[0]
    index = (replay.position + jnp.arange(steps)) % replay.capacity
    data = {k: replay.data[k].at[:, index].set(jnp.swapaxes(rows[k], 0, 1).astype(replay.data[k].dtype))
            for k in replay.data}
    return Replay(data, (replay.position + steps) % replay.capacity,
                  jnp.minimum(replay.count + steps, replay.capacity))


def can_sample(replay: Replay, length: int) -> jax.Array:
    return replay.count >= length


def sample(replay: Replay, key: jax.Array, batch: int, length: int) -> dict:
    """``batch`` chunks of ``length`` consecutive rows, time-major ``[length, batch, ...]``."""
    stream_key, start_key = jax.random.split(key)
    streams = jax.random.randint(stream_key, (batch,), 0, replay.num_streams)
    oldest = (replay.position - replay.count) % replay.capacity
    offsets = jax.random.randint(start_key, (batch,), 0, jnp.maximum(replay.count - length + 1, 1))
    rows = (oldest + offsets[:, None] + jnp.arange(length)) % replay.capacity  # [batch, length]
    chunk = {k: v[streams[:, None], rows] for k, v in replay.data.items()}
    chunk = {k: jnp.swapaxes(v, 0, 1) for k, v in chunk.items()}
    chunk["is_first"] = chunk["is_first"].at[0].set(True)
    return chunk


def latest(replay: Replay, length: int) -> dict:
    """The newest ``length`` rows of every stream, time-major ``[length, num_streams, ...]``."""
    rows = (replay.position - length + jnp.arange(length)) % replay.capacity
    chunk = {k: jnp.swapaxes(v[:, rows], 0, 1) for k, v in replay.data.items()}
    chunk["is_first"] = chunk["is_first"].at[0].set(True)
    return chunk
