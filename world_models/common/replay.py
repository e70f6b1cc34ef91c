"""Device-resident sequence replay: one ring buffer per env stream, ``[num_envs, capacity, ...]``.

Every env stream writes one row per env step at the same position, so the buffer is a plain pytree
of arrays that lives in the training carry (checkpointed, vmapped over seeds, never copied to the
host). A row is what the agent saw before acting: the observation, the reward and terminal flag
that came with it, ``is_first`` when it starts an episode, and the action taken; with replay
context also the posterior latent the agent held after seeing it (see :func:`sample_with_context`).

Sampling picks a stream and a start uniformly among the chunks of ``length`` consecutive rows that
lie in the written part of the ring and do not cross its seam (where the newest row meets the
oldest). A chunk may span episodes: the rows carry ``is_first`` and the RSSM resets there. The
first row of a chunk from :func:`sample` is marked ``is_first`` as well, because the memory before it
is not in the chunk; :func:`sample_with_context` instead hands over the stored latent of the row
before the chunk, so memory is zeroed only where an episode starts.
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


class Index(NamedTuple):
    """Where a sampled chunk lives: ``streams [batch]`` and ring rows ``[batch, length]``."""

    streams: jax.Array
    rows: jax.Array


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


def sample_index(replay: Replay, key: jax.Array, batch: int, length: int) -> Index:
    """``batch`` uniformly drawn chunks of ``length`` consecutive written rows that do not cross the seam."""
    stream_key, start_key = jax.random.split(key)
    streams = jax.random.randint(stream_key, (batch,), 0, replay.num_streams)
    oldest = (replay.position - replay.count) % replay.capacity
    offsets = jax.random.randint(start_key, (batch,), 0, jnp.maximum(replay.count - length + 1, 1))
    return Index(streams, (oldest + offsets[:, None] + jnp.arange(length)) % replay.capacity)


def gather(replay: Replay, index: Index) -> dict:
    """The rows at ``index``, time-major ``[length, batch, ...]``, flags as stored."""
    return {k: jnp.swapaxes(v[index.streams[:, None], index.rows], 0, 1) for k, v in replay.data.items()}


def sample(replay: Replay, key: jax.Array, batch: int, length: int) -> dict:
    """``batch`` chunks of ``length`` consecutive rows, time-major ``[length, batch, ...]``, each
    starting an RSSM afresh (first row ``is_first``)."""
    chunk = gather(replay, sample_index(replay, key, batch, length))
    chunk["is_first"] = chunk["is_first"].at[0].set(True)
    return chunk


def sample_with_context(replay: Replay, key: jax.Array, batch: int, length: int) -> tuple[dict, dict, Index]:
    """DreamerV3's replay context (its ``replay_context: 1``): ``length + 1`` consecutive rows, of
    which the first is only context. Returns ``(context [batch, ...], chunk [length, batch, ...],
    index of the chunk's rows)``: the RSSM starts the chunk from the latent stored with the context
    row (and its action as the previous action), so the chunk keeps its true ``is_first`` flags and
    memory is zeroed only at episode starts; the index says where to write the chunk's refreshed
    latents (:func:`write`)."""
    index = sample_index(replay, key, batch, length + 1)
    rows = gather(replay, index)
    context = {k: v[0] for k, v in rows.items()}
    chunk = {k: v[1:] for k, v in rows.items()}
    return context, chunk, Index(index.streams, index.rows[:, 1:])


def write(replay: Replay, index: Index, values: dict) -> Replay:
    """Overwrite the fields in ``values`` (time-major ``[length, batch, ...]``) at the rows of ``index``:
    how training refreshes the latents stored with the rows it replayed. Where two chunks of a batch
    share a row, one of them (either) wins."""
    data = dict(replay.data)
    for k, v in values.items():
        data[k] = data[k].at[index.streams[:, None], index.rows].set(jnp.swapaxes(v, 0, 1).astype(data[k].dtype))
    return replay._replace(data=data)


def latest(replay: Replay, length: int) -> dict:
    """The newest ``length`` rows of every stream, time-major ``[length, num_streams, ...]``."""
    rows = (replay.position - length + jnp.arange(length)) % replay.capacity
    chunk = {k: jnp.swapaxes(v[:, rows], 0, 1) for k, v in replay.data.items()}
    chunk["is_first"] = chunk["is_first"].at[0].set(True)
    return chunk
