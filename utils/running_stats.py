"""Running mean and variance, updated batch by batch inside compiled code.

RND needs them twice (its predictor's inputs, and the scale of its intrinsic returns), and any agent
that normalises observations online can reuse them. The merge is Chan et al.'s parallel formula, so
a batch of any size is folded in exactly, in float32, without keeping the history.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RunningMeanStd:
    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape=()) -> "RunningMeanStd":
        # A tiny prior count keeps the first update well defined and is forgotten after one batch.
        return cls(jnp.zeros(shape), jnp.ones(shape), jnp.float32(1e-4))

    def update(self, batch: jax.Array) -> "RunningMeanStd":
        """Fold in ``batch`` (leading axes are samples, trailing axes match ``mean``)."""
        axes = tuple(range(batch.ndim - self.mean.ndim))
        batch_mean, batch_var = batch.mean(axes), batch.var(axes)
        batch_count = jnp.float32(batch.size // max(1, self.mean.size))
        delta = batch_mean - self.mean
        total = self.count + batch_count
        mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        return RunningMeanStd(mean, m2 / total, total)

    @property
    def std(self) -> jax.Array:
        return jnp.sqrt(self.var + 1e-8)

    def normalise(self, x: jax.Array, clip: float | None = None) -> jax.Array:
        z = (x - self.mean) / self.std
        return z if clip is None else jnp.clip(z, -clip, clip)
