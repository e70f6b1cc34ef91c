"""Policy/value network pieces shared by the PPO family: torsos, heads and the actor-critic that joins them.

Torsos map an observation to features: an MLP for symbolic and a CNN for pixel observations, chosen in
one place (:func:`make_torso`). Heads map features to outputs: a categorical policy head (small
orthogonal init, so the first policy is near uniform, which matters for PPO's early exploration) and a
value head with one output per return stream. :class:`ActorCritic` joins them: an optional shared torso,
then separate actor and critic torsos, then the heads (the Craftax baselines keep actor and critic
apart; a shared MLP lets the value loss swamp the policy). Algorithms build theirs from these pieces:
PPO-RNN puts a GRU core in front, PPO-LLM passes a torso that also reads a feature vector
(:class:`FeatureTorso`, :func:`feature_actor_critic`), bonuses with their own intrinsic value ask for
two value outputs.

Torsos are passed as factories (``functools.partial`` of a module class), called inside the
actor-critic so that each call is a fresh module named by flax's counters (``MLP_0``, ``MLP_1``,
``Dense_0``...): the parameter tree, and so the initialisation from a given key, is the one the
single-class network of earlier versions had, and old checkpoints still load.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.linen.initializers import constant, orthogonal

from utils.conv import conv_function

TorsoFactory = Callable[[], nn.Module]
"""Builds one torso module (called once per branch that needs its own)."""


def _activation(name: str):
    return {"tanh": nn.tanh, "relu": nn.relu}[name]


class MLP(nn.Module):
    """Stack of ``depth`` dense layers of ``width`` units."""

    width: int
    depth: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.Dense(self.width, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0))(x)
            x = _activation(self.activation)(x)
        return x


class ConvTorso(nn.Module):
    """Three 5x5 conv + max-pool stages, as in the Craftax pixel baselines, then a dense embedding.

    ``conv``: ``"auto"`` takes :mod:`utils.conv`'s loop-friendly gradients on the CPU backend and JAX's
    own elsewhere; ``"lax"`` and ``"loop_friendly"`` force one (``benchmarks/conv_grad_loop.py``
    compares them). The parameters are the same either way.
    """

    width: int
    channels: Sequence[int] = (32, 32, 32)
    conv: str = "auto"

    @nn.compact
    def __call__(self, x):
        for features in self.channels:
            x = nn.Conv(features, kernel_size=(5, 5), conv_general_dilated=conv_function(self.conv))(x)
            x = nn.relu(x)
            x = nn.max_pool(x, window_shape=(3, 3), strides=(3, 3), padding="SAME")
        x = x.reshape(x.shape[:-3] + (-1,))
        return nn.relu(nn.Dense(self.width, kernel_init=orthogonal(np.sqrt(2)))(x))


def make_torso(pixels: bool, width: int, depth: int = 2, activation: str = "relu") -> TorsoFactory:
    """The observation torso: a CNN (``width``-unit embedding) for pixel observations, else an MLP of
    ``depth`` layers. Every network that reads raw observations picks its torso here."""
    if pixels:
        return functools.partial(ConvTorso, width)
    return functools.partial(MLP, width, depth, activation)


def policy_head(num_actions: int) -> nn.Dense:
    """Categorical policy logits; orthogonal(0.01) keeps the initial policy close to uniform."""
    return nn.Dense(num_actions, kernel_init=orthogonal(0.01), bias_init=constant(0.0))


def value_head(outputs: int = 1) -> nn.Dense:
    """One value per return stream (e.g. extrinsic and intrinsic)."""
    return nn.Dense(outputs, kernel_init=orthogonal(1.0), bias_init=constant(0.0))


class ActorCritic(nn.Module):
    """``(*inputs) -> (logits, value)``: ``shared`` torso (if any) on the inputs, then one ``torso``
    each for actor and critic, then the policy and value heads.

    ``value`` has a last axis of ``value_outputs`` when that is above 1, one value per return stream;
    with one output it is squeezed away. ``torso`` may take several inputs (PPO-LLM's observation and
    feature); ``shared`` maps the inputs to the single feature array the torsos then read.
    """

    num_actions: int
    torso: TorsoFactory
    shared: TorsoFactory | None = None
    value_outputs: int = 1

    @nn.compact
    def __call__(self, *inputs):
        if self.shared is not None:
            inputs = (self.shared()(*inputs),)
        actor = self.torso()(*inputs)
        critic = self.torso()(*inputs)
        logits = policy_head(self.num_actions)(actor)
        value = value_head(self.value_outputs)(critic)
        return logits, jnp.squeeze(value, -1) if self.value_outputs == 1 else value


def actor_critic(num_actions: int, pixels: bool, width: int, depth: int, activation: str,
                 value_outputs: int = 1) -> ActorCritic:
    """The feed-forward Craftax-baseline actor-critic: separate ``depth``-layer MLPs for symbolic
    observations; for pixels one CNN shared by both (running it twice would double the cost of the
    largest part) with one relu layer each on top."""
    torso = make_torso(pixels, width, depth, activation)
    if pixels:
        return ActorCritic(num_actions, torso=make_torso(False, width, 1, "relu"), shared=torso,
                           value_outputs=value_outputs)
    return ActorCritic(num_actions, torso=torso, value_outputs=value_outputs)


class FeatureTorso(nn.Module):
    """``(obs, feature) -> MLP(concat(obs_torso(obs), projected feature))``: an observation joined
    with a side feature vector (PPO-LLM's z-normalised LLM hidden state ``z``).

    The feature goes through one dense layer of ``feature_width`` units first (0: concatenated as
    it is), so a wide hidden state (896 for a 0.5B model) does not swamp the observation. Without
    ``obs_torso`` the observation is concatenated as it is (symbolic observations); with one (the
    pixel CNN) its embedding is. ``depth`` 0 stops at the concatenation, for a torso shared by actor
    and critic that each put their own layer on top (:func:`feature_actor_critic`)."""

    width: int
    depth: int
    activation: str
    feature_width: int
    obs_torso: TorsoFactory | None = None

    @nn.compact
    def __call__(self, obs, feature):
        if self.feature_width:
            feature = MLP(self.feature_width, 1, self.activation)(feature)
        if self.obs_torso is not None:
            obs = self.obs_torso()(obs)
        return MLP(self.width, self.depth, self.activation)(jnp.concatenate([obs, feature], -1))


def feature_actor_critic(num_actions: int, pixels: bool, width: int, depth: int, activation: str,
                         feature_width: int) -> ActorCritic:
    """``(obs, feature) -> (logits, value)``, :func:`actor_critic` with a feature input: for symbolic
    observations a :class:`FeatureTorso` each for actor and critic; for pixels (the image-plus-``z``
    actor-critic) one CNN embedding joined with the projected feature, shared by both (the CNN is
    the costly part), with one relu layer each on top, as :func:`actor_critic` has for pixels."""
    if pixels:
        shared = functools.partial(FeatureTorso, width, 0, activation, feature_width,
                                   obs_torso=make_torso(True, width))
        return ActorCritic(num_actions, torso=make_torso(False, width, 1, "relu"), shared=shared)
    return ActorCritic(num_actions, torso=functools.partial(FeatureTorso, width, depth, activation, feature_width))
