"""Image augmentation (DrQ/RAD random shift): the shift by hand, JAX against PyTorch, PPO and offline RL.

The shift is checked on a hand-made frame, as a translation by at most ``pad`` pixels that differs
between the images of a batch, and as the identity at pad 0; the JAX version (``utils.augment``,
PPO) and the PyTorch one (``offline_rl.augment``) give the same images for the same offsets and draw
offsets alike, and the JAX shift of rows split over two devices equals one device's. PPO: the
minibatch hook leaves the update bit-identical when it changes nothing, a symbolic env is refused in
one line, and pixel runs with the shift train (``slow``: three pixel PPO programs compile). Offline:
BC and IQL train on a tiny pixel dataset with shifted batches, a killed run resumes to the same
weights, a symbolic dataset is refused.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from offline_rl import augment as torch_augment
from offline_rl.bc import BC, BCConfig
from offline_rl.iql import IQL, IQLConfig
from offline_rl.trainer import train as offline_train
from online_rl.common import minibatch_epochs
from utils import augment as jax_augment
from utils.config import apply_presets, load_presets
from utils.errors import UserError
from utils.trajectories import TrajectoryWriter

PIXELS = "Craftax-Classic-Pixels-v1"


def jax_shift(images: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
    return np.asarray(jax_augment.shift_images(jnp.asarray(images), jnp.asarray(offsets), pad))


def torch_shift(images: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
    return torch_augment.shift_images(torch.from_numpy(images), torch.from_numpy(offsets), pad).numpy()


SHIFTS = [jax_shift, torch_shift]


def unique_frames(count: int, size: int = 12, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Frames whose pixels are all different, so a shifted copy tells its translation apart."""
    values = np.random.default_rng(seed).permutation(count * size * size * channels).astype(np.float32)
    return values.reshape(count, size, size, channels)


def translation_of(shifted: np.ndarray, image: np.ndarray, pad: int) -> tuple[int, int] | None:
    """The ``(down, right)`` translation within ``pad`` pixels, edge-filled, that turns ``image`` into
    ``shifted``; None if there is none."""
    height, width = image.shape[:2]
    for down in range(-pad, pad + 1):
        for right in range(-pad, pad + 1):
            rows = np.clip(np.arange(height) - down, 0, height - 1)
            cols = np.clip(np.arange(width) - right, 0, width - 1)
            if np.array_equal(image[rows][:, cols], shifted):
                return down, right
    return None


# ----------------------------------------------------------------------------------------------
# The shift itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", SHIFTS, ids=["jax", "torch"])
def test_shift_pads_with_the_edge_and_crops_at_the_offset(shift):
    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # 0 1 2 / 3 4 5 / 6 7 8
    cases = {
        (1, 1): [[0, 1, 2], [3, 4, 5], [6, 7, 8]],  # the centre of the padded frame: unchanged
        (0, 0): [[0, 0, 1], [0, 0, 1], [3, 3, 4]],  # content one pixel down and right, edge repeated
        (2, 2): [[4, 5, 5], [7, 8, 8], [7, 8, 8]],  # one pixel up and left
        (0, 2): [[1, 2, 2], [1, 2, 2], [4, 5, 5]],  # down and left
    }
    for offset, expected in cases.items():
        out = shift(image, np.array([offset]), 1)
        np.testing.assert_array_equal(out[0, :, :, 0], np.array(expected, np.float32), err_msg=str(offset))
    padded_twice = shift(image, np.array([[0, 4]]), 2)  # two pixels down, two left: only edges remain
    np.testing.assert_array_equal(padded_twice[0, :, :, 0], [[2, 2, 2], [2, 2, 2], [2, 2, 2]])


def test_jax_and_torch_give_the_same_images_for_the_same_offsets():
    images = unique_frames(32, size=9)
    for pad in (0, 1, 4):
        offsets = np.random.default_rng(pad).integers(0, 2 * pad + 1, (32, 2))
        np.testing.assert_array_equal(jax_shift(images, offsets, pad), torch_shift(images, offsets, pad))


def random_shifts(kind: str, images: np.ndarray, pad: int, seed: int = 0) -> np.ndarray:
    if kind == "jax":
        return np.asarray(jax_augment.random_shift(jax.random.PRNGKey(seed), jnp.asarray(images), pad))
    return torch_augment.random_shift(torch.from_numpy(images), pad, np.random.default_rng(seed)).numpy()


@pytest.mark.parametrize("kind", ["jax", "torch"])
def test_random_shift_moves_each_image_by_at_most_pad_and_differently(kind):
    images = unique_frames(64)
    shifted = random_shifts(kind, images, pad=4)
    moves = [translation_of(out, image, 4) for out, image in zip(shifted, images)]
    assert None not in moves, "every output is its image translated by at most 4 pixels"
    assert len(set(moves)) > 20, "images of one batch move independently"
    assert {m[0] for m in moves} >= {-4, 4} and {m[1] for m in moves} >= {-4, 4}, "the full range is drawn"
    np.testing.assert_array_equal(random_shifts(kind, images, pad=0), images)


def test_jax_and_torch_draw_offsets_alike():
    """Both draw each coordinate uniformly from 0 .. 2 pad: same range, every value, mean near pad."""
    pad, count = 4, 20_000
    drawn = {"jax": np.asarray(jax_augment.random_offsets(jax.random.PRNGKey(0), count, pad)),
             "torch": torch_augment.random_offsets(count, pad, torch_augment.batch_rng(0, 0)).numpy()}
    for kind, offsets in drawn.items():
        assert offsets.shape == (count, 2)
        counts = np.bincount(offsets.ravel(), minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1 and counts.min() > 0.8 * counts.mean(), kind
        assert abs(offsets.mean() - pad) < 0.05, kind


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------


def test_minibatch_hook_keeps_the_update_and_gets_a_key_per_minibatch():
    """An augmentation that changes nothing gives bit-identical parameters (same permutations: its keys
    do not come out of the carried key), and each minibatch of each epoch gets its own key."""
    data = jax.random.normal(jax.random.PRNGKey(1), (64, 5))
    params = jnp.ones(5)

    def loss_fn(p, batch):
        return (((batch @ p) - 1.0) ** 2).mean(), {}

    optimizer = optax.adam(0.1)
    seen = []

    def identity(key, batch):
        jax.debug.callback(lambda k: seen.append(np.asarray(k)), key)
        return batch

    def run(augment):
        return minibatch_epochs(loss_fn, optimizer, params, optimizer.init(params), jax.random.PRNGKey(2), data,
                                epochs=3, num_minibatches=4, augment=augment)

    plain, hooked = run(None), run(identity)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(hooked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(seen) == 12 and len({k.tobytes() for k in seen}) == 12


TWO_DEVICES = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from utils.augment import random_shift

    assert len(jax.devices()) == 2
    images = np.random.default_rng(0).random((8, 9, 9, 3), np.float32)
    key = jax.random.PRNGKey(3)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    shifted = jax.jit(random_shift, static_argnums=2)(key, rows, 2)
    assert shifted.sharding.spec == PartitionSpec("data"), shifted.sharding
    np.testing.assert_array_equal(np.asarray(shifted), np.asarray(random_shift(key, images, 2)))
    print("ok")
""")


def test_shift_of_rows_split_over_two_devices_equals_one_device():
    """Under --devices N the minibatch rows are split over the devices: the shift partitions with them."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def ppo_config(tmp_path: Path, name: str, **overrides):
    from online_rl.ppo import PPOConfig

    cfg = apply_presets(PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    return dataclasses.replace(cfg, run_dir=str(tmp_path / name), progress=False, **overrides)


def test_ppo_refuses_augmentation_of_a_symbolic_env_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "online_rl.ppo", "--preset", "debug", "--augment", "shift",
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "error: --augment shift needs pixel observations, but Craftax-Classic-Symbolic-v1 is symbolic; "
        "drop --augment or train on pixels (e.g. Craftax-Classic-Pixels-v1)"]
    assert not (tmp_path / "run").exists(), "refused before the run folder is written"


def test_ppo_pixels_shift_trains_and_pad_zero_is_the_plain_run(tmp_path):
    """On the pixel env: ``--augment shift --augment-pad 0`` (the hook in the program, shifting by
    nothing) ends with parameters bit-identical to the default run (``--augment none``); pad 4 trains
    on and ends elsewhere."""
    from online_rl.ppo import train

    base = dict(env=PIXELS, total_steps=256, eval_every=0)
    assert ppo_config(tmp_path, "default", **base) == ppo_config(tmp_path, "default", augment="none", **base)
    runs = {"default": train(ppo_config(tmp_path, "default", **base)),
            "pad0": train(ppo_config(tmp_path, "pad0", augment="shift", augment_pad=0, **base)),
            "pad4": train(ppo_config(tmp_path, "pad4", augment="shift", augment_pad=4, **base))}
    assert all(run["summary"]["complete"] for run in runs.values())
    params = {name: jax.tree.leaves(run["carry"].params) for name, run in runs.items()}
    for a, b in zip(params["default"], params["pad0"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(params["default"], params["pad4"]))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in params["pad4"])


# ----------------------------------------------------------------------------------------------
# Offline RL
# ----------------------------------------------------------------------------------------------

FRAME = (63, 63, 3)  # Craftax-Classic's pixel observations
STEPS, STREAMS, SHARDS = 8, 4, 2


def write_dataset(directory: Path, obs_shape: tuple[int, ...], env_name: str) -> Path:
    """A tiny dataset as PPO writes one: random observations, actions, rewards and episode ends."""
    rng = np.random.default_rng(0)
    with TrajectoryWriter(directory, env_name=env_name, obs_shape=obs_shape, obs_dtype=np.float32,
                          num_streams=STREAMS, num_actions=17) as writer:
        for update in range(SHARDS):
            obs = (rng.integers(0, 256, (STEPS, STREAMS, *obs_shape)) / 255).astype(np.float32)
            writer.write_rollout(
                update=update, obs=obs, action=rng.integers(0, 17, (STEPS, STREAMS)),
                reward=rng.normal(size=(STEPS, STREAMS)).astype(np.float32),
                done=rng.random((STEPS, STREAMS)) < 0.2, log_prob=np.zeros((STEPS, STREAMS), np.float32),
                value=np.zeros((STEPS, STREAMS), np.float32), terminal_obs=obs,
                last_value=np.zeros(STREAMS, np.float32))
    return directory


@pytest.fixture(scope="module")
def pixel_dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("pixels") / "data", FRAME, PIXELS)


def offline_config(cls, algo: str, tmp_path: Path, dataset: Path, name: str, **overrides):
    cfg = apply_presets(cls(), ["debug"], load_presets("offline_rl", algo), "debug")
    small = dict(eval_episodes=0, batch_size=8, total_steps=6, log_every=2, checkpoint_every=2)
    return dataclasses.replace(cfg, dataset=str(dataset), run_dir=str(tmp_path / name), progress=False,
                               **{**small, **overrides})


def weights(result: dict) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for model in result["models"] for p in model.state_dict().values()]


def test_bc_trains_on_shifted_pixel_batches_and_resumes_exactly(tmp_path, pixel_dataset):
    plain_cfg = offline_config(BCConfig, "bc", tmp_path, pixel_dataset, "plain")
    plain = offline_train(plain_cfg, BC(plain_cfg))
    # A loader worker process: the loader seeds its workers from torch's global generator when an epoch
    # starts, which a resumed run does at another point; the shifts must not depend on it.
    cfg = offline_config(BCConfig, "bc", tmp_path, pixel_dataset, "full", augment="shift", augment_pad=4,
                         num_workers=1)
    full = offline_train(cfg, BC(cfg))
    assert full["summary"]["complete"]
    assert any(not np.array_equal(a, b) for a, b in zip(weights(plain), weights(full))), "the shift changed training"
    killed = dataclasses.replace(cfg, run_dir=str(tmp_path / "killed"))
    assert not offline_train(killed, BC(killed), stop_after_updates=2)["summary"]["complete"]
    resumed = offline_train(killed, BC(killed))
    for a, b in zip(weights(full), weights(resumed)):
        np.testing.assert_array_equal(a, b)


def test_iql_shifts_observations_and_next_observations(tmp_path, pixel_dataset, monkeypatch):
    shifted = []
    original = torch_augment.random_shift
    monkeypatch.setattr(torch_augment, "random_shift",
                        lambda images, pad, rng: shifted.append(images.shape) or original(images, pad, rng))
    cfg = offline_config(IQLConfig, "iql", tmp_path, pixel_dataset, "iql", augment="shift", total_steps=2)
    assert offline_train(cfg, IQL(cfg))["summary"]["complete"]
    assert shifted == [(8, *FRAME)] * 4, "obs and next_obs of each of the two batches"


def test_offline_refuses_augmentation_of_a_symbolic_dataset(tmp_path):
    dataset = write_dataset(tmp_path / "symbolic", (24,), "Craftax-Classic-Symbolic-v1")
    cfg = offline_config(BCConfig, "bc", tmp_path, dataset, "run", augment="shift")
    with pytest.raises(UserError, match=r"^--augment shift needs pixel observations, but the dataset .*symbolic "
                                        r"\(Craftax-Classic-Symbolic-v1\) is symbolic"):
        offline_train(cfg, BC(cfg))
    assert not (tmp_path / "run").exists()
