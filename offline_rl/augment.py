"""The random shift of DrQ and RAD in PyTorch, for the offline trainers' batches of pixel observations.

``--augment shift --augment-pad P`` (fields: ``utils.augment.AugmentFields``) moves every frame of a
training batch by its own random ``-P .. P`` pixels per axis, the edge pixels filling in: DrQ's
random shift (Kostrikov, Yarats and Fergus 2020), RAD's translate/crop family (Laskin et al. 2020).
The JAX version PPO uses is ``utils.augment.shift_images``; both read ``offsets`` the same way and
give the same images for the same offsets (tests/test_augment.py).

The offsets of a batch are a pure function of the run's seed and the update's number
(:func:`batch_rng`), not draws from torch's global generator: a resumed run shifts every batch as an
uninterrupted one did, and nothing else's random numbers move (the data loader's workers take their
seeds from the global generator when an epoch starts, which a resumed run does at another point).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from offline_rl.data import DataSpec
from utils.augment import AugmentFields, check_augment

#: Batch keys holding observations: IQL's next observations are shifted too, each frame on its own.
OBS_KEYS = ("obs", "next_obs")

Batch = dict[str, torch.Tensor]

#: Mixed into every batch's seed so the shifts' random stream is not the one of any other use of the run's seed.
_STREAM = 0x5D1F7


def batch_rng(seed: int, update: int) -> np.random.Generator:
    """The random numbers of update ``update``'s shifts in a run seeded ``seed``."""
    return np.random.default_rng([_STREAM, seed, update])


def random_offsets(count: int, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """``[count, 2]`` crop corners ``(row, col)``, each uniform in ``0 .. 2 * pad``."""
    return torch.from_numpy(rng.integers(0, 2 * pad + 1, (count, 2)))


def shift_images(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """``images`` ``[N, H, W, C]`` as if padded by ``pad`` with edge replication and cropped back to
    ``H x W`` at ``offsets[i] = (row, col)`` of the padded frame (``(pad, pad)``: the identity). Built
    by indexing with clamped coordinates, which is that pad-and-crop without the padded copy."""
    count, height, width = images.shape[:3]
    offsets = offsets.to(images.device)
    rows = (torch.arange(height, device=images.device) + offsets[:, :1] - pad).clamp(0, height - 1)
    cols = (torch.arange(width, device=images.device) + offsets[:, 1:] - pad).clamp(0, width - 1)
    batch = torch.arange(count, device=images.device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def random_shift(images: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """DrQ/RAD random shift (Kostrikov et al. 2020; Laskin et al. 2020): every image of ``images``
    ``[N, H, W, C]`` translated by its own random ``-pad .. pad`` pixels per axis; ``pad`` 0 is the identity."""
    return shift_images(images, random_offsets(images.shape[0], pad, rng), pad)


def batch_augmentation(cfg: AugmentFields, spec: DataSpec, seed: int) -> Callable[[Batch, int], Batch] | None:
    """``augment(batch, update) -> batch`` shifting the observations of update ``update``'s training batch
    with ``--augment shift``, else None; one ``UserError`` line when the dataset holds symbolic observations."""
    pixels = len(spec.obs_shape) == 3  # [H, W, C] frames, as offline_rl.networks.NetworkSpec.pixels reads them
    if not check_augment(cfg, pixels, f"the dataset {spec.directory} ({spec.env_name})"):
        return None

    def augment(batch: Batch, update: int) -> Batch:
        rng = batch_rng(seed, update)
        return {key: random_shift(value, cfg.augment_pad, rng) if key in OBS_KEYS else value
                for key, value in batch.items()}

    return augment
