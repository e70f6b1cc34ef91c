"""The recurrent state-space model (RSSM) shared by Dreamer V1, V2 and V3.

A state is a deterministic GRU state ``deter`` and a stochastic sample ``stoch`` (Gaussian in V1,
``stoch`` categoricals of ``classes`` classes in V2 and V3, see :class:`LatentSpec`). One step of
the *prior* (imagination) runs the GRU on the previous sample and action and predicts the next
latent from ``deter`` alone; the *posterior* (observation) also sees the encoded observation.

``is_first`` resets the state and the previous action to zeros before a step, so sequences that
span an episode start never carry memory across it. :func:`observe` and :func:`imagine_actions`
are ``lax.scan``s over time-major inputs; imagination under a policy lives in ``behavior.py``.
:func:`pack` and :func:`unpack` turn a state into the compact form replay keeps with each row and back.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from world_models.common.dists import LatentSpec
from world_models.common.networks import DenseStack, Head


class RSSMState(NamedTuple):
    deter: jax.Array  # [..., deter]
    stoch: jax.Array  # [..., spec.sample_size] the sample
    stats: jax.Array  # [..., *spec.stats_shape] the distribution it was drawn from


def features(state: RSSMState) -> jax.Array:
    """What every head and the actor read: ``concat(deter, stoch)``."""
    return jnp.concatenate([state.deter, state.stoch], -1)


class GRU(nn.Module):
    """GRU with one fused dense layer and optional LayerNorm (V2/V3); the update gate is biased
    towards keeping the old state (``sigmoid(u - 1)``), which helps long memories early on."""

    size: int
    norm: bool = True

    @nn.compact
    def __call__(self, hidden, x):
        parts = nn.Dense(3 * self.size, use_bias=not self.norm)(jnp.concatenate([x, hidden], -1))
        if self.norm:
            parts = nn.LayerNorm(epsilon=1e-3)(parts)
        reset, cand, update = jnp.split(parts, 3, -1)
        reset = jax.nn.sigmoid(reset)
        cand = jnp.tanh(reset * cand)
        update = jax.nn.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * hidden


class RSSM(nn.Module):
    """``dyn_inputs`` says how the previous sample and action enter the GRU: ``joint`` (the papers)
    through one dense layer over ``concat(stoch, action)``, where a 17-wide action is outnumbered by a
    1,024-wide sample; ``split`` (current DreamerV3 code) through a normalised layer each for the
    previous ``deter``, sample and action, so the action's embedding is as wide as the sample's (its
    block-diagonal GRU and extra hidden layer are left out: the GRU here stays one dense layer)."""

    spec: LatentSpec
    deter: int
    hidden: int
    act: str = "silu"
    norm: bool = True
    dyn_inputs: str = "joint"

    def setup(self):
        stats_size = self.spec.stats_shape[0] * self.spec.stats_shape[1]
        if self.dyn_inputs == "split":
            self.deter_in, self.stoch_in, self.action_in = (
                DenseStack(self.hidden, 1, self.act, self.norm) for _ in range(3))
        else:
            self.img_in = DenseStack(self.hidden, 1, self.act, self.norm)
        self.gru = GRU(self.deter, self.norm)
        self.prior_net = Head(stats_size, self.hidden, 1, self.act, self.norm)
        self.post_net = Head(stats_size, self.hidden, 1, self.act, self.norm)

    def img_core(self, deter, stoch, action):
        """``(deter, prior stats)`` of the next step from the previous state and action."""
        if self.dyn_inputs == "split":
            x = jnp.concatenate([self.deter_in(deter), self.stoch_in(stoch), self.action_in(action)], -1)
        else:
            x = self.img_in(jnp.concatenate([stoch, action], -1))
        deter = self.gru(deter, x)
        return deter, self.spec.stats_from_raw(self.prior_net(deter))

    def post_stats(self, deter, embed):
        return self.spec.stats_from_raw(self.post_net(jnp.concatenate([deter, embed], -1)))

    def __call__(self, deter, stoch, action, embed):
        """Touches every layer (for ``init``)."""
        deter, prior = self.img_core(deter, stoch, action)
        return self.post_stats(deter, embed), prior


def initial_state(spec: LatentSpec, deter_size: int, batch_shape: tuple[int, ...]) -> RSSMState:
    stats = jnp.zeros(batch_shape + spec.stats_shape)
    if not spec.discrete:
        stats = stats.at[..., 1].set(1.0)
    return RSSMState(jnp.zeros(batch_shape + (deter_size,)), jnp.zeros(batch_shape + (spec.sample_size,)), stats)


#: Row fields that hold a stored latent in replay (``--replay-context``).
LATENT_FIELDS = ("deter", "stoch")


def pack(spec: LatentSpec, state: RSSMState) -> dict:
    """A latent as replay stores it, a few hundred bytes a row: ``deter`` as float16 (a GRU state, in
    [-1, 1], where float16 resolves 5e-4) and a categorical sample as its class indices (uint8 up to 256 classes; a
    Gaussian sample as float16). Its distribution is left out: a step from it reads only the sample."""
    state = jax.lax.stop_gradient(state)
    if spec.discrete:
        classes = state.stoch.reshape(state.stoch.shape[:-1] + (spec.stoch, spec.classes))
        stoch = jnp.argmax(classes, -1).astype(jnp.uint8 if spec.classes <= 256 else jnp.int32)
    else:
        stoch = state.stoch.astype(jnp.float16)
    return {"deter": state.deter.astype(jnp.float16), "stoch": stoch}


def unpack(spec: LatentSpec, packed: dict) -> RSSMState:
    """The state :func:`pack` stored, as a start for :func:`observe` (its ``stats`` are the initial ones)."""
    deter = packed["deter"].astype(jnp.float32)
    if spec.discrete:
        stoch = jax.nn.one_hot(packed["stoch"], spec.classes).reshape(deter.shape[:-1] + (spec.sample_size,))
    else:
        stoch = packed["stoch"].astype(jnp.float32)
    stats = initial_state(spec, deter.shape[-1], deter.shape[:-1]).stats
    return RSSMState(deter, stoch, stats)


def init_params(rssm: RSSM, key: jax.Array, num_actions: int, embed_size: int):
    state = initial_state(rssm.spec, rssm.deter, (1,))
    return rssm.init(key, state.deter, state.stoch, jnp.zeros((1, num_actions)), jnp.zeros((1, embed_size)))


def img_step(rssm: RSSM, params, state: RSSMState, action: jax.Array, key: jax.Array) -> RSSMState:
    """One prior step: the next state sampled from the dynamics alone."""
    deter, stats = rssm.apply(params, state.deter, state.stoch, action, method=RSSM.img_core)
    return RSSMState(deter, rssm.spec.sample(key, stats), stats)


def obs_step(rssm: RSSM, params, state: RSSMState, prev_action: jax.Array, embed: jax.Array,
             is_first: jax.Array, key: jax.Array) -> tuple[RSSMState, jax.Array]:
    """One posterior step; returns the posterior state and the prior statistics of the same step."""
    keep = 1.0 - is_first.astype(jnp.float32)[..., None]
    deter, prior = rssm.apply(params, state.deter * keep, state.stoch * keep, prev_action * keep,
                              method=RSSM.img_core)
    post = rssm.apply(params, deter, embed, method=RSSM.post_stats)
    return RSSMState(deter, rssm.spec.sample(key, post), post), prior


def observe(rssm: RSSM, params, embed: jax.Array, prev_action: jax.Array, is_first: jax.Array,
            state: RSSMState, key: jax.Array) -> tuple[RSSMState, RSSMState, jax.Array]:
    """Posterior rollout over ``[T, B]`` inputs; ``prev_action[t]`` is the action taken before
    ``embed[t]`` was observed. Returns ``(last state, posterior states [T, B], prior stats [T, B])``;
    step ``t`` uses ``fold_in(key, t)``, so a suffix of a sequence can be replayed exactly."""
    steps = jnp.arange(embed.shape[0])

    def step(state, inputs):
        t, embed, prev_action, is_first = inputs
        post, prior = obs_step(rssm, params, state, prev_action, embed, is_first, jax.random.fold_in(key, t))
        return post, (post, prior)

    last, (posts, priors) = jax.lax.scan(step, state, (steps, embed, prev_action, is_first))
    return last, posts, priors


def imagine_actions(rssm: RSSM, params, state: RSSMState, actions: jax.Array, key: jax.Array) -> RSSMState:
    """Open-loop prior rollout driven by given actions ``[T, B, A]``: states ``[T, B]``."""
    keys = jax.random.split(key, actions.shape[0])

    def step(state, inputs):
        action, key = inputs
        state = img_step(rssm, params, state, action, key)
        return state, state

    _, states = jax.lax.scan(step, state, (actions, keys))
    return states
