"""Encoders, decoders and prediction heads of the world model and the actor-critic.

Sizes and styles come from the config so one set of modules serves every version: V1 uses plain
ELU layers, V2 ELU with LayerNorm, V3 SiLU with LayerNorm. Pixel observations go through a
stride-2 CNN (any height and width: the decoder upsamples past the frame and crops); symbolic ones
through an MLP, with symlog on the input if ``symlog_inputs`` (V3).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn

from world_models.common.dists import symlog

ACTIVATIONS = {"silu": nn.silu, "elu": nn.elu, "relu": nn.relu}


def small_init(scale: float):
    """Fan-in truncated normal scaled by ``scale`` (0 gives zeros): small output layers keep the
    first predictions near neutral (V3 zero-initialises its reward and critic heads)."""
    if scale == 0.0:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(scale**2, "fan_in", "truncated_normal")


class DenseStack(nn.Module):
    """``layers`` x (dense, optional LayerNorm, activation)."""

    units: int
    layers: int
    act: str = "silu"
    norm: bool = True

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = nn.Dense(self.units, use_bias=not self.norm)(x)
            if self.norm:
                x = nn.LayerNorm(epsilon=1e-3)(x)
            x = ACTIVATIONS[self.act](x)
        return x


class Head(nn.Module):
    """A dense stack and a linear output of ``size`` units (logits, bins or a scalar)."""

    size: int
    units: int
    layers: int
    act: str = "silu"
    norm: bool = True
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        x = DenseStack(self.units, self.layers, self.act, self.norm)(x)
        return nn.Dense(self.size, kernel_init=small_init(self.out_scale))(x)


class MLPEncoder(nn.Module):
    units: int
    layers: int
    act: str = "silu"
    norm: bool = True
    symlog_inputs: bool = False

    @nn.compact
    def __call__(self, obs):
        x = symlog(obs) if self.symlog_inputs else obs
        return DenseStack(self.units, self.layers, self.act, self.norm)(x)


class MLPDecoder(nn.Module):
    obs_size: int
    units: int
    layers: int
    act: str = "silu"
    norm: bool = True

    @nn.compact
    def __call__(self, feat):
        x = DenseStack(self.units, self.layers, self.act, self.norm)(feat)
        return nn.Dense(self.obs_size)(x)


def cnn_channels(depth: int, stages: int) -> tuple[int, ...]:
    return tuple(depth * 2**i for i in range(stages))


class CNNEncoder(nn.Module):
    """Stride-2 4x4 convolutions doubling the channels (``depth``, 2x, 4x, ...), then flatten.
    Inputs are in [0, 1] and centred here."""

    depth: int
    stages: int = 4
    act: str = "silu"
    norm: bool = True

    @nn.compact
    def __call__(self, obs):
        x = obs - 0.5
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:])
        for channels in cnn_channels(self.depth, self.stages):
            x = nn.Conv(channels, (4, 4), strides=(2, 2), padding="SAME", use_bias=not self.norm)(x)
            if self.norm:
                x = nn.LayerNorm(epsilon=1e-3)(x)
            x = ACTIVATIONS[self.act](x)
        return x.reshape(lead + (-1,))


class CNNDecoder(nn.Module):
    """Mirror of :class:`CNNEncoder`: dense to the smallest feature map, stride-2 transposed
    convolutions back up, crop to the frame. Predicts pixels in [0, 1] (unbounded output, MSE loss)."""

    obs_shape: Sequence[int]
    depth: int
    stages: int = 4
    act: str = "silu"
    norm: bool = True

    @nn.compact
    def __call__(self, feat):
        height, width, colours = self.obs_shape
        factor = 2**self.stages
        h0, w0 = math.ceil(height / factor), math.ceil(width / factor)
        channels = cnn_channels(self.depth, self.stages)
        lead = feat.shape[:-1]
        x = nn.Dense(h0 * w0 * channels[-1])(feat.reshape((-1, feat.shape[-1])))
        x = x.reshape((-1, h0, w0, channels[-1]))
        for out_channels in reversed(channels[:-1]):
            x = nn.ConvTranspose(out_channels, (4, 4), strides=(2, 2), padding="SAME", use_bias=not self.norm)(x)
            if self.norm:
                x = nn.LayerNorm(epsilon=1e-3)(x)
            x = ACTIVATIONS[self.act](x)
        x = nn.ConvTranspose(colours, (4, 4), strides=(2, 2), padding="SAME")(x)
        x = x[:, :height, :width] + 0.5
        return x.reshape(lead + (height, width, colours))


def is_pixels(obs_shape: Sequence[int]) -> bool:
    return len(obs_shape) == 3
