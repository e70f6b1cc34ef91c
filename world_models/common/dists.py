"""The distributions Dreamer needs, as plain functions on arrays (no distribution objects).

* ``symlog``/``symexp`` squash targets of unknown scale (V3 observations, rewards and values).
* Two-hot encoding over fixed bins in symlog space: V3's reward and critic heads predict a
  categorical over 255 bins and read out the expectation, so one large return cannot blow up the
  gradient the way a squared error would. :class:`ScalarHead` reads and trains a reward or critic
  head of any kind: ``gaussian``, ``symlog_twohot`` (the V3 paper) or ``symexp_twohot`` (the
  current DreamerV3 code: bins at symexp-spaced points, two-hot and expectation in raw space).
* Latent distributions: a diagonal Gaussian (V1) or ``stoch`` independent categoricals of
  ``classes`` classes (V2, V3), sampled with straight-through gradients and optionally mixed with 1%
  uniform (V3) so no class ever has probability zero and the KL stays finite.
* The three KL regularisers: V1's free nats, V2's KL balancing and V3's free bits with separate
  dynamics and representation weights.

Latent statistics are one array per state: categorical logits ``[..., stoch, classes]`` or the
Gaussian's ``[..., stoch, 2]`` (mean, std), so states stay simple pytrees.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


# ---------------------------------------------------------------------------------------------------
# Squashing and two-hot
# ---------------------------------------------------------------------------------------------------


def symlog(x: jax.Array) -> jax.Array:
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x: jax.Array) -> jax.Array:
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def twohot_bins(num_bins: int, low: float = -20.0, high: float = 20.0) -> jax.Array:
    """Evenly spaced bin centres in symlog space; +-20 covers |x| up to ~4.8e8."""
    return jnp.linspace(low, high, num_bins)


def twohot_encode(x: jax.Array, bins: jax.Array) -> jax.Array:
    """``[...] -> [..., K]`` weights on the two bins around ``x`` that average back to ``x``;
    values outside the bins put all weight on the nearest end bin."""
    k = bins.shape[0]
    below = jnp.clip((bins <= x[..., None]).sum(-1) - 1, 0, k - 1)
    above = jnp.clip(k - (bins > x[..., None]).sum(-1), 0, k - 1)
    same = below == above
    to_below = jnp.where(same, 1.0, jnp.abs(bins[below] - x))
    to_above = jnp.where(same, 1.0, jnp.abs(bins[above] - x))
    total = to_below + to_above
    return (jax.nn.one_hot(below, k) * (to_above / total)[..., None]
            + jax.nn.one_hot(above, k) * (to_below / total)[..., None])


def twohot_decode(probs: jax.Array, bins: jax.Array) -> jax.Array:
    """Expected bin value (still in the bins' space)."""
    return (probs * bins).sum(-1)


def symlog_twohot_loss(logits: jax.Array, target: jax.Array, bins: jax.Array) -> jax.Array:
    """Cross-entropy of the head's bin logits against the two-hot code of ``symlog(target)``."""
    code = sg(twohot_encode(symlog(target), bins))
    return -(code * jax.nn.log_softmax(logits, -1)).sum(-1)


def symlog_twohot_mean(logits: jax.Array, bins: jax.Array) -> jax.Array:
    """The prediction of a two-hot head, back in the target's own scale."""
    return symexp(twohot_decode(jax.nn.softmax(logits, -1), bins))


def symexp_bins(num_bins: int, limit: float = 20.0) -> jax.Array:
    """The current DreamerV3 code's bins: ``symexp`` of evenly spaced points in ``[-limit, limit]``,
    built from one half and mirrored so that they are exactly symmetric around 0."""
    if num_bins % 2:
        half = symexp(jnp.linspace(-limit, 0.0, (num_bins - 1) // 2 + 1))
        return jnp.concatenate([half, -half[:-1][::-1]], 0)
    half = symexp(jnp.linspace(-limit, 0.0, num_bins // 2))
    return jnp.concatenate([half, -half[::-1]], 0)


def symmetric_expectation(probs: jax.Array, bins: jax.Array) -> jax.Array:
    """``(probs * bins).sum(-1)`` summed outwards from the middle bin, as the DreamerV3 code does, so
    uniform probabilities over symmetric bins give exactly 0 (a left-to-right sum of values up to
    4.8e8 leaves rounding error that a zero-initialised head would predict as a reward)."""
    n = bins.shape[0]
    m = n // 2
    if n % 2:
        centre = probs[..., m] * bins[m]
        return centre + ((probs[..., :m] * bins[:m])[..., ::-1] + probs[..., m + 1:] * bins[m + 1:]).sum(-1)
    return ((probs[..., :m] * bins[:m])[..., ::-1] + probs[..., m:] * bins[m:]).sum(-1)


class ScalarHead(NamedTuple):
    """How a reward or critic head's output is read out and trained (the settings ``reward_head``
    and ``critic_head``): ``gaussian`` (one unit, 1/2 squared error: V1, V2), ``symlog_twohot``
    (V3 paper: two-hot over bins evenly spaced in symlog space) or ``symexp_twohot`` (current DreamerV3
    code: two-hot of the raw target over symexp-spaced bins, expectation in raw space). Two-hot
    heads are zero-initialised so that the first predictions are 0."""

    kind: str
    bins: jax.Array | None  # bin values of the two-hot kinds (symlog or raw space)

    @classmethod
    def make(cls, kind: str, num_bins: int) -> "ScalarHead":
        bins = {"gaussian": None, "symlog_twohot": twohot_bins, "symexp_twohot": symexp_bins}[kind]
        return cls(kind, bins(num_bins) if bins else None)

    @property
    def size(self) -> int:
        return 1 if self.bins is None else self.bins.shape[0]

    @property
    def out_scale(self) -> float:
        return 1.0 if self.bins is None else 0.0

    def mean(self, out: jax.Array) -> jax.Array:
        if self.kind == "gaussian":
            return out[..., 0]
        if self.kind == "symlog_twohot":
            return symlog_twohot_mean(out, self.bins)
        return symmetric_expectation(jax.nn.softmax(out, -1), self.bins)

    def loss(self, out: jax.Array, target: jax.Array) -> jax.Array:
        if self.kind == "gaussian":
            return 0.5 * (out[..., 0] - target) ** 2
        if self.kind == "symlog_twohot":
            return symlog_twohot_loss(out, target, self.bins)
        return -(sg(twohot_encode(target, self.bins)) * jax.nn.log_softmax(out, -1)).sum(-1)


def bernoulli_nll(logits: jax.Array, target: jax.Array) -> jax.Array:
    """``-log p(target)`` for a Bernoulli with ``logits`` (continue flags)."""
    return -(target * jax.nn.log_sigmoid(logits) + (1.0 - target) * jax.nn.log_sigmoid(-logits))


# ---------------------------------------------------------------------------------------------------
# Categorical helpers shared by latents and the actor
# ---------------------------------------------------------------------------------------------------


def unimix_logits(logits: jax.Array, unimix: float) -> jax.Array:
    """Logits of ``(1 - unimix) * softmax(logits) + unimix / classes``."""
    if not unimix:
        return jax.nn.log_softmax(logits, -1)
    probs = jax.nn.softmax(logits, -1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return jnp.log(probs)


def categorical_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis."""
    p_log = jax.nn.log_softmax(p_logits, -1)
    q_log = jax.nn.log_softmax(q_logits, -1)
    return (jnp.exp(p_log) * (p_log - q_log)).sum(-1)


def categorical_entropy(logits: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(logits, -1)
    return -(jnp.exp(log_p) * log_p).sum(-1)


def straight_through_onehot(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A one-hot sample whose gradient is that of the probabilities (Bengio et al.'s estimator)."""
    sample = jax.nn.one_hot(jax.random.categorical(key, logits, -1), logits.shape[-1])
    probs = jax.nn.softmax(logits, -1)
    return sample + probs - sg(probs)


# ---------------------------------------------------------------------------------------------------
# Latent distributions
# ---------------------------------------------------------------------------------------------------


class LatentSpec(NamedTuple):
    """How the RSSM's stochastic state is distributed; a static description, never traced."""

    discrete: bool
    stoch: int
    classes: int = 1  # categorical only
    unimix: float = 0.0  # categorical only
    min_std: float = 0.1  # Gaussian only

    @property
    def stats_shape(self) -> tuple[int, int]:
        return (self.stoch, self.classes if self.discrete else 2)

    @property
    def sample_size(self) -> int:
        """Width of the flattened sample fed to the networks."""
        return self.stoch * self.classes if self.discrete else self.stoch

    def stats_from_raw(self, raw: jax.Array) -> jax.Array:
        """Network output ``[..., prod(stats_shape)]`` -> statistics ``[..., *stats_shape]``."""
        raw = raw.reshape(raw.shape[:-1] + self.stats_shape)
        if self.discrete:
            return unimix_logits(raw, self.unimix)
        mean, std = raw[..., 0], raw[..., 1]
        std = jax.nn.softplus(std) + self.min_std
        return jnp.stack([mean, std], -1)

    def sample(self, key: jax.Array, stats: jax.Array) -> jax.Array:
        """Reparameterised (Gaussian) or straight-through (categorical) sample, flattened."""
        if self.discrete:
            sample = straight_through_onehot(key, stats)
        else:
            mean, std = stats[..., 0], stats[..., 1]
            sample = mean + std * jax.random.normal(key, mean.shape)
        return sample.reshape(sample.shape[: stats.ndim - 2] + (self.sample_size,))

    def mode(self, stats: jax.Array) -> jax.Array:
        if self.discrete:
            sample = jax.nn.one_hot(jnp.argmax(stats, -1), self.classes)
        else:
            sample = stats[..., 0]
        return sample.reshape(sample.shape[: stats.ndim - 2] + (self.sample_size,))

    def kl(self, p: jax.Array, q: jax.Array) -> jax.Array:
        """KL(p || q) summed over the latent variables: ``[..., stoch, *] -> [...]``."""
        if self.discrete:
            return categorical_kl(p, q).sum(-1)
        return gaussian_kl(p[..., 0], p[..., 1], q[..., 0], q[..., 1]).sum(-1)

    def entropy(self, stats: jax.Array) -> jax.Array:
        if self.discrete:
            return categorical_entropy(stats).sum(-1)
        return (0.5 * jnp.log(2 * jnp.pi * jnp.e * stats[..., 1] ** 2)).sum(-1)


def gaussian_kl(mean_p, std_p, mean_q, std_q) -> jax.Array:
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)) per dimension."""
    return jnp.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5


# ---------------------------------------------------------------------------------------------------
# KL regularisers, the setting ``kl`` (each returns (loss, raw KL) with loss a scalar)
# ---------------------------------------------------------------------------------------------------


def kl_free_nats(spec: LatentSpec, post: jax.Array, prior: jax.Array, free_nats: float) -> tuple[jax.Array, jax.Array]:
    """V1: ``max(mean KL(post || prior), free_nats)``; below the threshold neither side is pushed."""
    kl = spec.kl(post, prior)
    return jnp.maximum(kl.mean(), free_nats), kl


def kl_balanced(spec: LatentSpec, post: jax.Array, prior: jax.Array, balance: float,
                free_nats: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """V2: ``balance * KL(sg(post) || prior) + (1 - balance) * KL(post || sg(prior))``.

    Both terms have the KL's value; the weights only split its gradient, moving the prior towards
    the posterior faster than the posterior towards the prior. Free nats apply to each mean term.
    """
    to_prior = spec.kl(sg(post), prior)
    to_post = spec.kl(post, sg(prior))
    loss = (balance * jnp.maximum(to_prior.mean(), free_nats)
            + (1.0 - balance) * jnp.maximum(to_post.mean(), free_nats))
    return loss, spec.kl(post, prior)


def kl_free_bits(spec: LatentSpec, post: jax.Array, prior: jax.Array, free_bits: float, dyn_scale: float,
                 rep_scale: float) -> tuple[jax.Array, dict]:
    """V3: dynamics loss ``max(free_bits, KL(sg(post) || prior))`` and representation loss
    ``max(free_bits, KL(post || sg(prior)))``, clipped per step after summing over the latents,
    weighted ``dyn_scale`` and ``rep_scale``. Returns the loss and its parts for logging."""
    dyn = jnp.maximum(spec.kl(sg(post), prior), free_bits)
    rep = jnp.maximum(spec.kl(post, sg(prior)), free_bits)
    loss = dyn_scale * dyn.mean() + rep_scale * rep.mean()
    return loss, {"dyn": dyn.mean(), "rep": rep.mean(), "kl": spec.kl(post, prior)}
