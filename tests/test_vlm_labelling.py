"""Pixel datasets labelled with a vision-language model through the queue, and offline RL on them.

The tiny random VLM (``utils/testing/tiny_vlm.py``) labels a small pixel dataset through a real
(embedded) Redis queue; the stored image features must equal ``utils.llm.frame_features`` of the same
frames, carry an identity that says ``modality: image``, sit beside other features under their own
names, and be refused where they cannot exist (a VLM on symbolic observations, a text LLM on pixels).
The slow test trains AWR on them and evaluates it in the game with the features computed live, in
process and through the hidden-state server.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_labelling import enqueue_cfg, redis_db, worker_cfg  # noqa: F401  (redis_db: a fixture)

from benchmarks.labelling_throughput import write_synthetic_dataset
from labelling.enqueue import enqueue
from labelling.enqueue import main as enqueue_main
from labelling.labels import is_complete, label_shard, labels_of
from labelling.status import output_progress
from labelling.worker import run_worker
from offline_rl.data import FEATURE_SLOT, open_dataset
from utils.llm import LLMError, LLMSpec, frame_features, make_backend
from utils.testing.tiny_vlm import build_tiny_vlm
from utils.trajectories import (
    DatasetError,
    TrajectoryDataset,
    TrajectoryWriter,
    check_feature_name,
    feature_blocks,
    read_manifest,
    save_npz_atomic,
    write_manifest,
)

ENV = "Craftax-Classic-Pixels-v1"
FRAME = (63, 63, 3)
STEPS, STREAMS, SHARDS = 8, 2, 2
ROWS = STEPS * STREAMS * SHARDS
DIM = 32  # the tiny VLM's hidden size


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many times faster than two on a shared 2-core CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory) -> str:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


def blocky_frames(count: int, seed: int) -> np.ndarray:
    """Frames like an env's pixel observations (floats k / 255): 9 x 9 tiles of 7 x 7 pixels."""
    tiles = np.random.default_rng(seed).integers(0, 256, (count, 9, 9, 3))
    return (tiles.repeat(7, axis=1).repeat(7, axis=2) / 255).astype(np.float32)


def write_pixel_dataset(directory: Path, shards: int = SHARDS) -> Path:
    """A Craftax-Classic pixel dataset as PPO writes one (float32 frames, the codec's encoding)."""
    rng = np.random.default_rng(0)
    with TrajectoryWriter(directory, env_name=ENV, obs_shape=FRAME, obs_dtype=np.float32,
                          num_streams=STREAMS, num_actions=17) as writer:
        for update in range(shards):
            obs = blocky_frames(STEPS * STREAMS, update).reshape(STEPS, STREAMS, *FRAME)
            writer.write_rollout(
                update=update, obs=obs, action=rng.integers(0, 17, (STEPS, STREAMS)),
                reward=rng.normal(size=(STEPS, STREAMS)).astype(np.float32),
                done=rng.random((STEPS, STREAMS)) < 0.2, log_prob=np.zeros((STEPS, STREAMS), np.float32),
                value=np.zeros((STEPS, STREAMS), np.float32), terminal_obs=obs,
                last_value=np.zeros(STREAMS, np.float32))
    return directory


@pytest.fixture
def queue(redis_db):  # noqa: F811  (the embedded Redis of tests/test_labelling.py, one per test)
    """(database file, client) of a fresh embedded Redis."""
    return redis_db


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> Path:
    return write_pixel_dataset(tmp_path_factory.mktemp("pixels") / "data")


@pytest.fixture(scope="module")
def symbolic(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("symbolic") / "data", SHARDS, STEPS, STREAMS)


def label(source: Path, out: Path, queue, model: str, **overrides) -> TrajectoryDataset:
    """Enqueue ``source`` and let one worker label it (``queue``: the fixture); the labelled dataset."""
    db, client = queue
    queued = enqueue(enqueue_cfg(source, out, db, model, **overrides), client)
    assert queued.queued == TrajectoryDataset(source).num_shards
    summary = run_worker(worker_cfg(db), client)
    assert summary.dead == 0 and summary.jobs == queued.queued
    return TrajectoryDataset(out)


# ----------------------------------------------------------------------------------------------
# Labelling pixel datasets
# ----------------------------------------------------------------------------------------------


def test_a_pixel_dataset_is_labelled_through_the_queue_with_image_features(pixels, vlm_path, tmp_path, queue):
    labelled = label(pixels, tmp_path / "out", queue, vlm_path, pooling="image_mean")
    assert is_complete(labelled.manifest) and labelled.num_transitions == ROWS
    blocks = feature_blocks(labelled.manifest)
    assert list(blocks) == ["image_hidden_state"] and "labels" not in labelled.manifest
    block = blocks["image_hidden_state"]
    assert (block["modality"], block["pooling"], block["hidden_size"], block["dtype"]) == \
        ("image", "image_mean", DIM, "float16")
    assert block["image_processor"].startswith("Gemma3ImageProcessor")
    assert block["compute_dtype"] == "float32" and block["model_revision"].startswith("local:")
    assert labelled.manifest["source"]["feature"] == "image_hidden_state"

    source = TrajectoryDataset(pixels)
    shard, stored = dict(np.load(labelled.shard_path(1))), source.load_shard_raw(1)
    for key, value in stored.items():  # observations stay encoded, bit for bit; no texts for frames
        np.testing.assert_array_equal(shard[key], value)
    assert set(shard) - set(stored) == {"image_hidden_state"}
    features = shard["image_hidden_state"]
    assert features.shape == (STEPS * STREAMS, DIM) and features.dtype == np.float16

    # What frame_features gives for the same frames, with the spec the manifest describes.
    frames = source.load_shard(1, ("obs",))["obs"]
    backend = make_backend(labels_of(labelled.manifest, batch_size=8))
    np.testing.assert_array_equal(features, frame_features(backend, frames, ENV).astype(np.float16))
    other_batches = make_backend(labels_of(labelled.manifest, "image_hidden_state", batch_size=3))
    np.testing.assert_allclose(frame_features(other_batches, frames, ENV), features.astype(np.float32),
                               atol=2e-3, rtol=2e-3)

    [progress] = output_progress([str(tmp_path / "out")])
    assert (progress["feature"], progress["modality"], progress["complete"]) == ("image_hidden_state", "image", True)
    # --modality image says what auto found: the same labels, so the folder takes them
    db, client = queue
    explicit = enqueue(enqueue_cfg(pixels, tmp_path / "out", db, vlm_path, pooling="image_mean", modality="image"),
                       client)
    assert (explicit.queued, explicit.already_labelled) == (0, SHARDS)


def test_text_and_image_features_sit_side_by_side_each_with_its_identity(pixels, vlm_path, tmp_path, queue):
    """Labelling a labelled dataset adds a feature under another name and keeps the earlier ones as
    stored; the offline loader reads each by name with its own identity."""
    first = label(pixels, tmp_path / "a", queue, vlm_path, pooling="image_mean")
    both = label(tmp_path / "a", tmp_path / "b", queue, vlm_path, pooling="last", feature="image_last")
    blocks = feature_blocks(both.manifest)
    assert list(blocks) == ["image_hidden_state", "image_last"]
    assert blocks["image_hidden_state"] == feature_blocks(first.manifest)["image_hidden_state"]
    assert blocks["image_last"]["pooling"] == "last" and blocks["image_last"]["modality"] == "image"
    for i in range(SHARDS):
        np.testing.assert_array_equal(both.load_shard(i, ("image_hidden_state",))["image_hidden_state"],
                                      first.load_shard(i, ("image_hidden_state",))["image_hidden_state"])
    assert labels_of(both.manifest, "image_last").pooling == "last"
    with pytest.raises(DatasetError, match="several features"):
        labels_of(both.manifest)

    # A text feature beside them: what a dataset with both a text rendering and frames of each row
    # would hold (no env gives both today). The text block is a real text LLM's identity.
    text = {**both.manifest["features"]["image_last"], "model": "some/text-llm", "pooling": "mean",
            "template_hash": LLMSpec(model="some/text-llm").template_hash()}
    del text["modality"], text["image_processor"]
    for i in range(SHARDS):
        arrays = both.load_shard_raw(i)
        save_npz_atomic(both.shard_path(i), {**arrays, "hidden_state": np.ones((STEPS * STREAMS, DIM), np.float16)})
    manifest = read_manifest(tmp_path / "b")
    write_manifest(tmp_path / "b", {**manifest, "features": {"hidden_state": text, **manifest["features"]}})

    for name, modality in (("hidden_state", "text"), ("image_hidden_state", "image"), ("image_last", "image")):
        dataset, spec = open_dataset(tmp_path / "b", name)
        assert spec.labels.get("modality", "text") == modality and spec.feature_dim == DIM
        slot = dataset.load_shard(0, (FEATURE_SLOT, "next_" + FEATURE_SLOT, "next_valid"))
        stored = dataset.load_shard_raw(0)[name]
        np.testing.assert_array_equal(slot[FEATURE_SLOT], stored)  # each feature under the slot's name
        np.testing.assert_array_equal(slot["next_" + FEATURE_SLOT][:STEPS - 1], stored[1:STEPS])
    with pytest.raises(DatasetError, match="no feature 'image_mean'.*hidden_state \\(text.*image_last \\(image"):
        open_dataset(tmp_path / "b", "image_mean")


def test_vlm_on_symbolic_and_text_llm_on_pixels_are_refused_in_one_line(
        pixels, symbolic, vlm_path, tiny_llm_path, tmp_path, queue, capsys):
    db, client = queue
    with pytest.raises(DatasetError, match="symbolic observations of Craftax-Classic-Symbolic-v1.*need frames"):
        enqueue(enqueue_cfg(symbolic, tmp_path / "x", db, vlm_path), client)
    with pytest.raises(DatasetError, match="pixel observations of Craftax-Classic-Pixels-v1.*no text rendering"):
        enqueue(enqueue_cfg(pixels, tmp_path / "y", db, tiny_llm_path), client)
    with pytest.raises(LLMError, match="no vision tower"):
        enqueue(enqueue_cfg(pixels, tmp_path / "z", db, tiny_llm_path, modality="image"), client)
    assert not any((tmp_path / name).exists() for name in "xyz"), "refused before anything is written"
    with pytest.raises(SystemExit) as stop:  # the command line: one error line, exit status 2
        enqueue_main(["--dataset", str(symbolic), "--out", str(tmp_path / "x"), "--model", vlm_path,
                      "--embedded-redis", db])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "need frames" in err[0]
    # A worker given such a job by hand refuses it as final (dead letter), before any model call.
    with pytest.raises(DatasetError, match="need frames"):
        label_shard(TrajectoryDataset(symbolic), 0, make_backend(LLMSpec(model=vlm_path)), tmp_path / "w")


def test_feature_names_and_adding_to_a_partly_labelled_dataset(pixels, vlm_path, tmp_path, queue):
    for bad in ("obs", "text_obs", "reward", "Hidden", "a__b", "", "1x"):
        with pytest.raises(ValueError, match="cannot name an array"):
            check_feature_name(bad)
    db, client = queue
    label(pixels, tmp_path / "a", queue, vlm_path)
    with pytest.raises(DatasetError, match="already has a feature 'image_hidden_state'.*--feature NAME"):
        enqueue(enqueue_cfg(tmp_path / "a", tmp_path / "b", db, vlm_path, pooling="last"), client)
    with pytest.raises(DatasetError, match="as the feature 'image_hidden_state', not 'other'"):
        enqueue(enqueue_cfg(pixels, tmp_path / "a", db, vlm_path, feature="other"), client)
    enqueue(enqueue_cfg(pixels, tmp_path / "half", db, vlm_path), client)
    run_worker(worker_cfg(db, max_jobs=1), client)
    with pytest.raises(DatasetError, match="only partly labelled \\(1 of 2 shards\\)"):
        enqueue(enqueue_cfg(tmp_path / "half", tmp_path / "c", db, vlm_path, feature="more"), client)
    run_worker(worker_cfg(db), client)  # leave the queue empty


# ----------------------------------------------------------------------------------------------
# Offline RL on image features (slow: tests/conftest.py's SLOW_TESTS)
# ----------------------------------------------------------------------------------------------


def test_awr_on_image_features_evaluates_with_live_features_in_process_and_through_the_server(
        pixels, vlm_path, tiny_llm_path, tmp_path, queue):
    """AWR (TD(lambda) targets: its critic reads the features too) on the labelled pixel dataset,
    then evaluation in the game: the live image features equal the stored ones, in process and
    from a hidden-state server of the same VLM; a text model's server is refused."""
    from offline_rl.awr import main as awr_main
    from offline_rl.checkpoint import load_checkpoint
    from offline_rl.evaluate import evaluate_payload, make_feature_fn
    from offline_rl.evaluate import main as evaluate_main
    from servers.hidden_state_server import create_app, serve_in_background

    labelled = label(pixels, tmp_path / "labelled", queue, vlm_path, pooling="image_mean")
    with pytest.raises(SystemExit) as stop:  # a text feature this dataset does not have
        awr_main(["--dataset", str(tmp_path / "labelled"), "--features", "hidden_state", "--preset", "debug",
                  "--run-dir", str(tmp_path / "wrong")])
    assert stop.value.code == 2
    awr_main(["--dataset", str(tmp_path / "labelled"), "--features", "image_hidden_state", "--preset", "debug",
              "--returns", "lambda", "--run-dir", str(tmp_path / "run"), "--eval-episodes", "0", "--no-progress"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[-1]["loss/actor"]).all() and np.isfinite(metrics[-1]["loss/critic"]).all()

    payload = load_checkpoint(tmp_path / "run")
    assert payload["features"] == "image_hidden_state" and payload["labels"]["modality"] == "image"
    live = make_feature_fn(payload, batch_size=8)
    shard = labelled.load_shard(0, ("obs", "image_hidden_state"))
    stored = shard["image_hidden_state"].astype(np.float32)
    np.testing.assert_allclose(live(shard["obs"]), stored, atol=2e-3, rtol=2e-3)
    result = evaluate_payload(payload, episodes=2, max_steps=4, seed=0, progress=False, llm_batch_size=8)
    assert result["summary"]["steps_run"] == 4 and result["summary"]["features"] == "image_hidden_state"

    vlm = make_backend(LLMSpec(model=vlm_path, pooling="image_mean", device="cpu", batch_size=8))
    with serve_in_background(create_app(vlm, vlm.spec, max_batch=16, max_wait_ms=2.0)) as url:
        remote = make_feature_fn(payload, server_url=url)
        np.testing.assert_allclose(remote(shard["obs"]), live(shard["obs"]), atol=1e-5, rtol=1e-5)
        evaluated = evaluate_main(["--run-dir", str(tmp_path / "run"), "--server-url", url, "--episodes", "2",
                                   "--max-steps", "4", "--no-progress", "--out", str(tmp_path / "remote.json")])
        assert evaluated["summary"]["steps_run"] == 4
    text = make_backend(LLMSpec(model=tiny_llm_path, device="cpu"))
    with serve_in_background(create_app(text, text.spec, max_batch=16)) as url:
        with pytest.raises(LLMError, match="modality: 'image' -> 'text'"):
            make_feature_fn(payload, server_url=url)
