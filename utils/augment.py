"""Image augmentation for pixel policies: the random shift of DrQ and RAD, and the flags that switch it on.

A random shift pads each frame by ``pad`` pixels, replicating its edge, and crops a random window of
the frame's size back out, independently per image: every image moves by up to ``pad`` pixels in
each direction. DrQ (Kostrikov, Yarats and Fergus 2020, "Image Augmentation Is All You Need", pad 4
on 84-pixel frames) applies it to the inputs of the losses; RAD (Laskin et al. 2020, "Reinforcement
Learning with Augmented Data") found translations and crops the most useful augmentation, also for
PPO. A policy that has seen its frames shifted cannot key its actions to exact pixel positions,
which is what a CNN overfits to when it sees few distinct frames.

This module holds what both sides share: the command-line fields (:class:`AugmentFields`, used by
``online_rl.ppo`` and the offline trainers), the pixel-only check, and the JAX shift that PPO applies
inside its compiled update. The PyTorch shift of the offline trainers is
``offline_rl.augment``; both read ``offsets`` the same way, and tests/test_augment.py checks that
the same offsets give the same images.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from utils.errors import UserError

NO_AUGMENT = "none"


@dataclasses.dataclass
class AugmentFields:
    """The augmentation flags of an entry point that trains on pixel observations (mixed into its config)."""

    augment: Literal["none", "shift"] = NO_AUGMENT
    """Image augmentation of the training batches, pixel observations only: none, or shift (DrQ/RAD: pad each
    frame by --augment-pad pixels with its edge, then crop a random window of the frame's size, per image)."""
    augment_pad: int = 4
    """With --augment shift: padding in pixels, so each frame moves by up to this many pixels each way."""


def check_augment(cfg: AugmentFields, pixels: bool, source: str) -> bool:
    """Whether ``cfg`` asks for augmentation; a one-line ``UserError`` when it does and ``source`` (an
    env or a dataset, named in the message) has symbolic observations, where shifting means nothing."""
    if cfg.augment == NO_AUGMENT:
        return False
    if not pixels:
        raise UserError(f"--augment {cfg.augment} needs pixel observations, but {source} is symbolic; "
                        "drop --augment or train on pixels (e.g. Craftax-Classic-Pixels-v1)")
    return True


def random_offsets(key: jax.Array, count: int, pad: int) -> jax.Array:
    """``[count, 2]`` int32 crop corners ``(row, col)``, each uniform in ``0 .. 2 * pad``."""
    return jax.random.randint(key, (count, 2), 0, 2 * pad + 1)


def shift_images(images: jax.Array, offsets: jax.Array, pad: int) -> jax.Array:
    """``images`` ``[N, H, W, C]`` padded by ``pad`` with edge replication, each cropped back to ``H x W``
    at its ``offsets[i] = (row, col)`` in the padded frame: ``(pad, pad)`` is the identity, ``(0, 0)``
    moves the content ``pad`` pixels down and right. DrQ's random shift (Kostrikov et al. 2020) with
    its offsets given."""
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    size = images.shape[1:]

    def crop(image, corner):  # a gather of N whole windows, not N * H * W pixels
        return jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), size)

    return jax.vmap(crop)(padded, offsets)


def random_shift(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """DrQ/RAD random shift (Kostrikov et al. 2020; Laskin et al. 2020): every image of ``images``
    ``[N, H, W, C]`` translated by its own random ``-pad .. pad`` pixels per axis, the edge pixels
    filling in; ``pad`` 0 is the identity."""
    return shift_images(images, random_offsets(key, images.shape[0], pad), pad)
