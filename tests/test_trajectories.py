"""Trajectory datasets: codec bit-exactness, returns across shards, episode ids, resume, faults."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from utils.obs_codec import decode_array, encode_array
from utils.trajectories import (
    MANIFEST_NAME,
    DatasetError,
    TrajectoryDataset,
    TrajectoryWriter,
    save_npz_atomic,
)

OBS_SHAPE = (3, 4)
NUM_ACTIONS = 17


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def fake_rollout(rng: np.random.Generator, steps: int, streams: int, done_p: float = 0.15,
                 obs_shape: tuple = OBS_SHAPE) -> dict[str, np.ndarray]:
    """Symbolic-like observations (0/1 plus fractional columns) and random everything else."""

    def obs() -> np.ndarray:
        x = rng.integers(0, 2, (steps, streams, *obs_shape)).astype(np.float32)
        x[..., 0, 0] = rng.integers(0, 10, (steps, streams)) / 10.0
        x[..., 1, 1] = rng.random((steps, streams), dtype=np.float32)
        return x

    return {
        "obs": obs(),
        "action": rng.integers(0, NUM_ACTIONS, (steps, streams)),
        "reward": rng.normal(size=(steps, streams)).astype(np.float32),
        "done": rng.random((steps, streams)) < done_p,
        "log_prob": rng.normal(size=(steps, streams)).astype(np.float32),
        "value": rng.normal(size=(steps, streams)).astype(np.float32),
        "terminal_obs": obs(),
        "last_value": rng.normal(size=streams).astype(np.float32),
    }


def make_writer(directory: Path, streams: int, **kwargs) -> TrajectoryWriter:
    return TrajectoryWriter(directory, env_name="Fake-v0", obs_shape=OBS_SHAPE, obs_dtype=np.float32,
                            num_streams=streams, num_actions=NUM_ACTIONS, **kwargs)


def write_dataset(directory: Path, rollouts: dict[int, dict], streams: int, **kwargs) -> None:
    with make_writer(directory, streams, **kwargs) as writer:
        for update, rollout in rollouts.items():
            writer.write_rollout(update=update, **rollout)


def random_rollouts(updates, steps: int = 5, streams: int = 3, seed: int = 0, **kwargs) -> dict[int, dict]:
    rng = np.random.default_rng(seed)
    return {u: fake_rollout(rng, steps, streams, **kwargs) for u in updates}


def env_major(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def reference_returns(rollouts: dict[int, dict], gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Plain Python loop over each stream's unsharded sequence, split where updates skip."""
    updates = sorted(rollouts)
    steps, streams = rollouts[updates[0]]["reward"].shape
    result = {u: np.zeros((streams, steps)) for u in updates}
    boot = {u: np.zeros((streams, steps), dtype=bool) for u in updates}
    for s in range(streams):
        g, g_boot, next_update = None, True, None
        for u in reversed(updates):
            if next_update != u + 1:  # the data stops after this rollout: bootstrap
                g, g_boot = float(rollouts[u]["last_value"][s]), True
            for step in reversed(range(steps)):
                r = float(rollouts[u]["reward"][step, s])
                d = float(rollouts[u]["done"][step, s])
                g = r + gamma * (1.0 - d) * g
                g_boot = g_boot and not d
                result[u][s, step], boot[u][s, step] = g, g_boot
            next_update = u
    return (np.concatenate([result[u].reshape(-1) for u in updates]),
            np.concatenate([boot[u].reshape(-1) for u in updates]))


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_same_dataset(a: Path, b: Path) -> None:
    da, db = TrajectoryDataset(a), TrajectoryDataset(b)
    assert da.manifest == db.manifest
    assert shard_files(a) == shard_files(b)
    for i in range(da.num_shards):
        ra, rb = da.load_shard_raw(i), db.load_shard_raw(i)
        assert ra.keys() == rb.keys()
        for key in ra:
            np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Observation codec on real Craftax observations
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def craftax_obs() -> dict[str, np.ndarray]:
    """Classic symbolic and pixel observations [steps, envs, ...] of random play, plus night frames.

    One compile of reset/step (symbolic) and one of the pixel renderer, applied to the same states:
    the pixel env computes its observation with exactly this ``get_obs``.
    """
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from craftax.craftax_env import make_craftax_env_from_name

    symbolic = make_craftax_env_from_name("Craftax-Classic-Symbolic-v1", auto_reset=False)
    pixels = make_craftax_env_from_name("Craftax-Classic-Pixels-v1", auto_reset=False)
    params = symbolic.default_params
    envs, steps = 4, 12
    reset = jax.jit(jax.vmap(symbolic.reset, in_axes=(0, None)))
    step = jax.jit(jax.vmap(symbolic.step, in_axes=(0, 0, 0, None)))
    render = jax.jit(jax.vmap(pixels.get_obs))
    key = jax.random.PRNGKey(0)
    obs, state = reset(jax.random.split(key, envs), params)
    sym, pix, night = [], [], []
    for t in range(steps):
        sym.append(np.asarray(obs))
        pix.append(np.asarray(render(state)))
        if t % 4 == 0:  # light levels under 0.5 switch on the random night static
            dark = state.replace(light_level=jnp.full((envs,), 0.1 + 0.1 * (t // 4)))
            night.append(np.asarray(render(dark)))
        key, k_act, k_step = jax.random.split(key, 3)
        action = jax.random.randint(k_act, (envs,), 0, symbolic.action_space(params).n)
        obs, state, _, _, _ = step(jax.random.split(k_step, envs), state, action, params)
    return {"symbolic": np.stack(sym), "pixels": np.stack(pix), "night": np.stack(night)}


def encoded_bytes(x: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **encode_array(x, "obs"))
    return buffer.tell()


@pytest.mark.parametrize("kind", ["symbolic", "pixels", "night"])
def test_codec_is_bit_exact_on_real_craftax(craftax_obs, kind):
    frames = craftax_obs[kind]
    rows = frames.reshape(-1, *frames.shape[2:])
    decoded = decode_array(encode_array(rows, "obs"), "obs")
    assert decoded.dtype == rows.dtype and decoded.shape == rows.shape
    np.testing.assert_array_equal(decoded.view(np.uint32), rows.view(np.uint32))


def test_codec_round_trips_awkward_values():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (40, 9)).astype(np.float32)
    x[3, 2], x[5, 4], x[7, 6] = -0.0, np.nan, np.inf  # -0.0 must not collapse to the 0 column
    x[:, 8] = rng.normal(size=40)
    noisy = rng.normal(size=(30, 70000 // 30 + 1)).astype(np.float32)  # > 65,536 distinct values
    for array in (x, noisy, x.astype(np.float16), (x > 0).astype(np.uint8), x > 0, x[:0]):
        decoded = decode_array(encode_array(array, "a"), "a")
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        assert decoded.tobytes() == array.tobytes()


def test_symbolic_and_pixel_encodings_are_compact(craftax_obs):
    symbolic = craftax_obs["symbolic"].reshape(-1, craftax_obs["symbolic"].shape[-1])
    pixels = craftax_obs["pixels"].reshape(-1, *craftax_obs["pixels"].shape[2:])
    # Measured ~50 B/obs (vs 5,380) here, where file overhead dominates 48 rows; ~12-17 B/obs in
    # full-size shards. Pixels by day: ~1.4 kB vs 47.6 kB.
    assert encoded_bytes(symbolic) < symbolic.nbytes / 40
    assert encoded_bytes(pixels) < pixels.nbytes / 8


def test_writer_round_trips_real_observations(tmp_path, craftax_obs):
    obs = craftax_obs["symbolic"]
    steps, envs = obs.shape[:2]
    rng = np.random.default_rng(1)
    rollout = fake_rollout(rng, steps, envs, obs_shape=OBS_SHAPE)
    rollout["obs"], rollout["terminal_obs"] = obs, obs[::-1].copy()
    with TrajectoryWriter(tmp_path, env_name="Craftax-Classic-Symbolic-v1", obs_shape=obs.shape[2:],
                          obs_dtype=np.float32, num_streams=envs, num_actions=NUM_ACTIONS) as writer:
        writer.write_rollout(update=0, **rollout)
    shard = TrajectoryDataset(tmp_path).load_shard(0)
    assert shard["obs"].tobytes() == env_major(obs).tobytes()
    done_rows = np.flatnonzero(env_major(rollout["done"]))
    assert shard["terminal_obs"].tobytes() == env_major(rollout["terminal_obs"])[done_rows].tobytes()


# ----------------------------------------------------------------------------------------------
# Writer and reader on small fake data
# ----------------------------------------------------------------------------------------------


def test_round_trip_all_fields(tmp_path):
    rollouts = random_rollouts(range(3), steps=6, streams=4)
    write_dataset(tmp_path, rollouts, streams=4, metadata={"lr": 3e-4, "run_dir": tmp_path})
    data = TrajectoryDataset(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data.manifest == manifest
    assert manifest["schema_version"] == 1 and manifest["rollout_length"] == 6
    assert manifest["obs_shape"] == list(OBS_SHAPE) and manifest["obs_dtype"] == "float32"
    assert manifest["metadata"] == {"lr": 3e-4, "run_dir": str(tmp_path)}
    finished = sum(int(r["done"].sum()) for r in rollouts.values())
    assert manifest["totals"] == {"transitions": 72, "finished_episodes": finished, "shards": 3}
    assert [s["file"] for s in manifest["shards"]] == [f"shard_{i:06d}.npz" for i in range(3)]
    assert [s["first_t"] for s in manifest["shards"]] == [0, 6, 12]
    assert data.num_shards == 3 and data.num_transitions == 72

    for i, (update, rollout) in enumerate(rollouts.items()):
        shard = data.load_shard(i)
        assert shard["action"].dtype == np.uint8
        for key in ("obs", "action", "reward", "done", "log_prob", "value"):
            np.testing.assert_array_equal(shard[key], env_major(rollout[key]), err_msg=key)
        np.testing.assert_array_equal(shard["stream_id"], np.repeat(np.arange(4), 6))
        np.testing.assert_array_equal(shard["t"], np.tile(np.arange(6) + update * 6, 4))
        done_rows = np.flatnonzero(env_major(rollout["done"]))
        np.testing.assert_array_equal(shard["terminal_rows"], done_rows)
        np.testing.assert_array_equal(shard["terminal_obs"], env_major(rollout["terminal_obs"])[done_rows])
        np.testing.assert_array_equal(shard["last_value"], rollout["last_value"])
        assert int(shard["update"]) == update

    everything = data.read_all()
    np.testing.assert_array_equal(everything["reward"],
                                  np.concatenate([env_major(r["reward"]) for r in rollouts.values()]))
    terminal = data.read_all(["terminal_obs", "terminal_rows", "last_value"])
    np.testing.assert_array_equal(terminal["terminal_rows"], np.flatnonzero(everything["done"]))
    np.testing.assert_array_equal(terminal["terminal_obs"], np.concatenate(
        [env_major(r["terminal_obs"])[env_major(r["done"])] for r in rollouts.values()]))
    assert terminal["last_value"].shape == (3, 4)


def test_rollouts_without_any_done(tmp_path):
    rollouts = random_rollouts(range(2), done_p=0.0)
    write_dataset(tmp_path, rollouts, streams=3)
    shard = TrajectoryDataset(tmp_path).load_shard(1)
    assert shard["terminal_obs"].shape == (0, *OBS_SHAPE) and shard["terminal_rows"].shape == (0,)
    assert len(np.unique(shard["episode_id"])) == 3


def test_returns_across_shards_match_unsharded_loop(tmp_path):
    rollouts = random_rollouts(range(5), steps=4, streams=3, done_p=0.2)
    write_dataset(tmp_path, rollouts, streams=3)
    returns, bootstrapped = TrajectoryDataset(tmp_path).compute_returns(0.9, return_bootstrapped=True)
    expected, expected_boot = reference_returns(rollouts, 0.9)
    np.testing.assert_allclose(returns, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bootstrapped, expected_boot)


def test_returns_bootstrap_at_gaps_and_end(tmp_path):
    rollouts = random_rollouts([0, 1, 4, 5, 7], steps=3, streams=2, done_p=0.2, seed=3)
    write_dataset(tmp_path, rollouts, streams=2)
    returns, bootstrapped = TrajectoryDataset(tmp_path).compute_returns(0.8, return_bootstrapped=True)
    expected, expected_boot = reference_returns(rollouts, 0.8)
    np.testing.assert_allclose(returns, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bootstrapped, expected_boot)


def test_returns_by_hand(tmp_path):
    """One stream, two shards, gamma 0.5: an episode spanning the edge, then a bootstrapped tail."""
    def rollout(rewards, dones, last_value):
        r = fake_rollout(np.random.default_rng(0), 2, 1)
        r["reward"] = np.array(rewards, np.float32)[:, None]
        r["done"] = np.array(dones)[:, None]
        r["last_value"] = np.array([last_value], np.float32)
        return r

    write_dataset(tmp_path, {0: rollout([1, 2], [0, 0], 100.0), 1: rollout([4, 8], [1, 0], 16.0)},
                  streams=1)
    returns, boot = TrajectoryDataset(tmp_path).compute_returns(0.5, return_bootstrapped=True)
    # 1 + .5*(2 + .5*4) = 3 (not cut at the shard edge; shard 0's last_value unused); 2 + .5*4 = 4;
    # 4 (done); 8 + .5*16 = 16 (bootstrapped from shard 1's last_value).
    np.testing.assert_array_equal(returns, [3.0, 4.0, 4.0, 16.0])
    np.testing.assert_array_equal(boot, [False, False, False, True])


def test_episode_ids_unique_continuous_and_new_after_done(tmp_path):
    rollouts = random_rollouts([0, 1, 2, 4], steps=5, streams=3, done_p=0.25, seed=5)
    write_dataset(tmp_path, rollouts, streams=3)
    data = TrajectoryDataset(tmp_path).read_all(["stream_id", "t", "done", "episode_id"])
    owner: dict[int, int] = {}
    for s in range(3):
        rows = data["stream_id"] == s
        ids, done, t = data["episode_id"][rows], data["done"][rows], data["t"][rows]
        for k in range(1, len(ids)):
            starts_new = done[k - 1] or t[k] != t[k - 1] + 1  # after done, or after a gap
            assert (ids[k] != ids[k - 1]) == starts_new, (s, k)
        for episode in np.unique(ids):
            assert owner.setdefault(int(episode), s) == s  # no id is shared between streams
            positions = np.flatnonzero(ids == episode)
            assert np.all(np.diff(positions) == 1)  # one contiguous run per id
    assert sorted(owner) == list(range(len(owner)))  # ids are 0..K-1
    assert [owner[i] for i in range(3)] == [0, 1, 2]


def test_resume_equals_uninterrupted(tmp_path):
    rollouts = random_rollouts(range(5), steps=4, streams=3, done_p=0.3, seed=7)
    write_dataset(tmp_path / "straight", rollouts, streams=3)

    crashed = tmp_path / "crashed"
    write_dataset(crashed, rollouts, streams=3)  # ran to update 4, but the checkpoint says 2
    (crashed / "shard_000005.npz").write_bytes(b"half-written")  # debris a crash may leave
    (crashed / ".tmp-123-manifest.json").write_text("{")
    with make_writer(crashed, 3, resume_after_update=2) as writer:
        assert TrajectoryDataset(crashed).manifest["totals"]["shards"] == 3
        assert not (crashed / "shard_000004.npz").exists()
        for update in (3, 4):
            writer.write_rollout(update=update, **rollouts[update])
    assert_same_dataset(tmp_path / "straight", crashed)


def test_resume_without_truncation_continues_and_rejects_old_updates(tmp_path):
    rollouts = random_rollouts(range(4), seed=8)
    write_dataset(tmp_path / "straight", rollouts, streams=3)
    write_dataset(tmp_path / "pieces", {u: rollouts[u] for u in (0, 1)}, streams=3)
    with make_writer(tmp_path / "pieces", 3) as writer:
        with pytest.raises(ValueError, match="resume_after_update"):
            writer.write_rollout(update=1, **rollouts[1])
        for update in (2, 3):
            writer.write_rollout(update=update, **rollouts[update])
    assert_same_dataset(tmp_path / "straight", tmp_path / "pieces")


def test_async_writes_equal_sync_writes(tmp_path):
    rollouts = random_rollouts([0, 1, 2, 5, 6], seed=9)
    write_dataset(tmp_path / "sync", rollouts, streams=3)
    with make_writer(tmp_path / "async", 3, max_pending=1) as writer:
        for update, rollout in rollouts.items():
            writer.write_rollout_async(update=update, **rollout)
            rollout["obs"][...] = 0  # a caller refilling its buffers must not change queued data
            rollout["reward"][...] = 0
    assert_same_dataset(tmp_path / "sync", tmp_path / "async")


def test_async_write_error_is_reraised_on_close(tmp_path):
    rollout = random_rollouts([0])[0]
    writer = make_writer(tmp_path, 3)
    writer.write_rollout_async(update=0, **{**rollout, "reward": rollout["reward"][:2]})
    with pytest.raises(ValueError, match="reward has shape"):
        writer.close()


def test_iter_batches_covers_every_row_once(tmp_path):
    rollouts = random_rollouts(range(6), steps=5, streams=3, seed=10)
    write_dataset(tmp_path, rollouts, streams=3)
    data = TrajectoryDataset(tmp_path)
    everything = data.read_all()
    returns = data.compute_returns(0.99)
    seen, unsorted = [], 0
    for batch in data.iter_batches(7, seed=1, shards_in_memory=2, row_arrays={"return": returns}):
        unsorted += bool(np.any(np.diff(batch["row_index"]) < 0))
        assert len(batch["row_index"]) <= 7
        idx = batch["row_index"]
        np.testing.assert_array_equal(batch["obs"], everything["obs"][idx])
        np.testing.assert_array_equal(batch["episode_id"], everything["episode_id"][idx])
        np.testing.assert_array_equal(batch["return"], returns[idx])
        seen.append(idx)
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(seen), np.arange(data.num_transitions))
    assert unsorted > len(seen) // 7 // 2  # rows are mixed inside batches, not just shards reordered
    ordered = np.concatenate([b["row_index"] for b in data.iter_batches(8, shuffle=False, keys=["reward"])])
    np.testing.assert_array_equal(ordered, np.arange(data.num_transitions))


def test_later_stage_arrays_pass_through(tmp_path):
    write_dataset(tmp_path, random_rollouts(range(2)), streams=3)
    data = TrajectoryDataset(tmp_path)
    for i in range(data.num_shards):
        raw = data.load_shard_raw(i)
        rows = len(raw["reward"])
        raw["text_obs"] = np.array([f"row {k}" for k in range(rows)])
        raw["hidden_state"] = np.full((rows, 4), i, dtype=np.float16)
        save_npz_atomic(data.shard_path(i), raw)
    shard = data.load_shard(1)
    assert shard["text_obs"][2] == "row 2" and shard["hidden_state"].dtype == np.float16
    assert shard["obs"].shape == (15, *OBS_SHAPE)
    assert {"text_obs", "hidden_state"} <= set(data.row_keys())
    batch = next(data.iter_batches(30, keys=["hidden_state", "text_obs"]))
    assert batch["hidden_state"].shape == (30, 4)


# ----------------------------------------------------------------------------------------------
# Faults: one clear DatasetError naming the file
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    write_dataset(tmp_path, random_rollouts(range(3)), streams=3)
    return tmp_path


def test_missing_manifest(tmp_path):
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match=MANIFEST_NAME):
        TrajectoryDataset(tmp_path)


def test_unknown_schema_version(small_dataset):
    path = small_dataset / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=f"{MANIFEST_NAME}.*schema_version 99"):
        TrajectoryDataset(small_dataset)


def test_missing_shard(small_dataset):
    (small_dataset / "shard_000001.npz").unlink()
    data = TrajectoryDataset(small_dataset)
    with pytest.raises(DatasetError, match="shard_000001.npz.*missing"):
        data.read_all()
    with pytest.raises(DatasetError, match="shard_000001.npz"):
        data.compute_returns(0.9)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_shard(small_dataset, damage):
    path = small_dataset / "shard_000002.npz"
    blob = path.read_bytes()
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = b"\x00garbage" * 100
    else:  # flip bytes in the middle of the compressed data
        middle = len(blob) // 3
        blob = blob[:middle] + bytes(b ^ 0xFF for b in blob[middle:middle + 64]) + blob[middle + 64:]
    path.write_bytes(blob)
    with pytest.raises(DatasetError, match="shard_000002.npz.*corrupt"):
        TrajectoryDataset(small_dataset).load_shard(2)


def test_shard_with_wrong_row_count(small_dataset):
    data = TrajectoryDataset(small_dataset)
    raw = data.load_shard_raw(0)
    raw["reward"] = raw["reward"][:-1]
    save_npz_atomic(data.shard_path(0), raw)
    with pytest.raises(DatasetError, match="shard_000000.npz: reward has 14 rows"):
        data.load_shard(0)


def test_resume_with_mismatching_dataset(small_dataset):
    with pytest.raises(DatasetError, match=f"{MANIFEST_NAME}.*num_streams"):
        make_writer(small_dataset, 4, resume_after_update=1)
    with pytest.raises(DatasetError, match="env_name"):
        TrajectoryWriter(small_dataset, env_name="Other-v0", obs_shape=OBS_SHAPE, obs_dtype=np.float32,
                         num_streams=3, num_actions=NUM_ACTIONS)


def test_writer_refuses_to_delete_shards_without_manifest(small_dataset):
    (small_dataset / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetError, match="holds shard files"):
        make_writer(small_dataset, 3)
    assert (small_dataset / "shard_000000.npz").exists()
