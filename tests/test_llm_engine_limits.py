"""The LLM backends at real sizes, on the CPU with the stand-in engines of test_llm_backends.py.

What only shows at scale (issue 30): SGLang answering for computed tokens only once prompts share a
prefix (every Craftax text starts with the same header) and are sent more than once; a shard sent
to an engine in one call (per-token Python lists, vLLM's per-prompt files filling /dev/shm); vLLM
wasting an engine start on a truncated model it cannot load; and a worker that drops a backend
without stopping its engine processes."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from test_labelling import enqueue_cfg, redis_db  # noqa: F401  (redis_db: a fixture)
from test_llm_backends import OldServerArgs, fake_sglang, fake_vllm, token_states  # noqa: F401

import utils.llm as llm
import utils.llm.sglang_engine as sglang_engine
import utils.llm.vllm_engine as vllm_engine
from benchmarks.labelling_throughput import ConstantBackend, write_synthetic_dataset
from benchmarks.text_obs_speed import synthetic_observations
from labelling.enqueue import enqueue
from labelling.labels import label_arrays
from labelling.worker import BackendCache, WorkerBroken, WorkerConfig, run_worker
from utils.llm import LLMError, LLMSpec, make_backend
from utils.text_obs import render_texts

ENV = "Craftax-Classic-Symbolic-v1"


@pytest.fixture(scope="module")
def craftax_texts() -> list[str]:
    """The first four lines of canonical observation texts: 140-170 tokens each with the tiny
    tokenizer, the first 91 shared by all (the header). Whole texts (about 630 tokens) cost the
    stand-ins' reference model four times as much and test nothing more."""
    texts = render_texts(synthetic_observations(ENV, 12, seed=3), ENV)
    return ["\n".join(text.splitlines()[:4]) for text in texts]


@pytest.fixture(scope="module")
def states(token_states):  # noqa: F811  (the fixture imported above)
    """``token_states`` remembered per prompt: the tests send the same prompts many times."""
    seen: dict[tuple[int, ...], tuple] = {}

    def lookup(ids: list[int]) -> tuple:
        key = tuple(ids)
        if key not in seen:
            seen[key] = token_states(ids)
        return seen[key]

    return lookup


@pytest.fixture(scope="module")
def reference(tiny_llm_path, craftax_texts):
    """The transformers backend's states for ``craftax_texts``, by pooling."""
    return {pooling: make_backend(LLMSpec(model=tiny_llm_path, pooling=pooling)).hidden_states(craftax_texts)
            for pooling in ("last", "mean")}


# ----------------------------------------------------------------------------------------------
# SGLang: prompts that share a prefix
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server_args", ["current", "old"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_sglang_prompts_sharing_a_prefix_equal_transformers_call_after_call(
        tiny_llm_path, states, craftax_texts, reference, monkeypatch, pooling, server_args):
    """The stand-in keeps SGLang's radix cache and chunked prefill on unless told otherwise, so from
    the second prompt on it returns states only for the tokens after the shared header."""
    engines, calls = fake_sglang(monkeypatch, states,
                                 **({"server_args": OldServerArgs} if server_args == "old" else {}))
    backend = make_backend(LLMSpec(model=tiny_llm_path, backend="sglang", pooling=pooling))
    for batch in (slice(0, 4), slice(4, 8), slice(0, 12), slice(0, 12)):  # repeats: fully cached
        np.testing.assert_allclose(backend.hidden_states(craftax_texts[batch]), reference[pooling][batch],
                                   atol=1e-5)
    assert len(calls) == 4
    [options] = engines
    if pooling == "mean":  # needs every token: both caches off
        assert options["disable_radix_cache"] is True and options["chunked_prefill_size"] == -1
    else:  # the last token is always computed: the cache stays on (and was exercised above)
        assert "disable_radix_cache" not in options and "chunked_prefill_size" not in options
    if pooling == "last":
        assert {c["hidden"] for c in calls} == {"last" if server_args == "current" else True}


def test_sglang_with_its_caches_on_mean_pooling_is_refused(tiny_llm_path, states, craftax_texts, monkeypatch):
    """What the test above would meet with the radix cache on: an error, never a mean over part."""
    fake_sglang(monkeypatch, states)
    backend = make_backend(LLMSpec(model=tiny_llm_path, backend="sglang", pooling="mean"),
                           engine_options={"disable_radix_cache": False})  # chunked prefill stays off
    with pytest.raises(LLMError, match="mean pooling needs all of them.*disable_radix_cache"):
        for _ in range(2):
            backend.hidden_states(craftax_texts[:4])
    with pytest.raises(LLMError, match="has no disable_radix_cache"):
        sglang_engine.sglang_engine_options(LLMSpec(model="m", pooling="mean"), ["enable_return_hidden_states"])


# ----------------------------------------------------------------------------------------------
# Chunks: bounded engine calls whatever the shard size
# ----------------------------------------------------------------------------------------------


def test_every_backend_bounds_the_prompts_per_engine_call(tiny_llm_path, states, craftax_texts, reference,
                                                         monkeypatch):
    texts = craftax_texts * 4  # 48 prompts, 6 chunks of 8
    expected = {pooling: np.tile(reference[pooling], (4, 1)) for pooling in reference}
    monkeypatch.setattr(llm, "ENGINE_CHUNK_ROWS", 8, raising=False)

    transformers = make_backend(LLMSpec(model=tiny_llm_path, pooling="mean", batch_size=4))
    sizes: list[int] = []
    encode = transformers.prompts.encode
    transformers.prompts.encode = lambda chunk, first=0: (sizes.append(len(chunk)), encode(chunk, first))[1]
    np.testing.assert_allclose(transformers.hidden_states(texts), expected["mean"], atol=1e-5)
    assert sizes == [8] * 6

    engines, calls = fake_sglang(monkeypatch, states)
    sglang = make_backend(LLMSpec(model=tiny_llm_path, backend="sglang", pooling="last"))
    np.testing.assert_allclose(sglang.hidden_states(texts), expected["last"], atol=1e-5)
    assert [c["prompts"] for c in calls] == [8] * 6
    assert sglang.generate(texts[:20], max_new_tokens=2) and [c["prompts"] for c in calls[6:]] == [8, 8, 4]

    fake_vllm(monkeypatch, states)
    vllm = make_backend(LLMSpec(model=tiny_llm_path, backend="vllm", pooling="mean"))
    embedded: list[int] = []
    embed = vllm._llm.embed
    vllm._llm.embed = lambda prompts, use_tqdm=False: (embedded.append(len(prompts)), embed(prompts))[1]
    np.testing.assert_allclose(vllm.hidden_states(texts), expected["mean"], atol=1e-5)
    assert embedded == [8] * 6


def test_labelling_a_shard_many_chunks_long_keeps_memory_flat(tiny_llm_path, monkeypatch):
    """SGLang's mean pooling returns every token's state as Python lists (32 bytes a float): a
    whole shard in one call grows with the shard; chunked, the peak stays that of one chunk.
    Whole texts here (about 630 tokens); the stand-in's states are cheap, not the model's."""
    monkeypatch.setattr(llm, "ENGINE_CHUNK_ROWS", 8, raising=False)
    hidden = 32
    monkeypatch.setattr(sglang_engine, "MAX_STATE_VALUES", 2000 * hidden, raising=False)  # ~3 prompts a call
    _, calls = fake_sglang(monkeypatch, lambda ids: (np.full((len(ids), hidden), ids[-1], np.float32),))
    backend = make_backend(LLMSpec(model=tiny_llm_path, backend="sglang", pooling="mean"))

    def peak(rows: int) -> int:
        raw = {"obs": synthetic_observations(ENV, rows, seed=rows)}
        calls.clear()
        tracemalloc.start()
        try:
            labelled = label_arrays(raw, ENV, backend)
            used = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert labelled["hidden_state"].shape == (rows, hidden)
        assert max(c["prompts"] for c in calls) <= 8 and max(c["tokens"] for c in calls) <= 2000
        assert sum(c["prompts"] for c in calls) == rows
        return used

    small, large = peak(16), peak(128)  # 2 and 16 chunks of 8 rows
    # The large shard's own arrays (texts, output) add ~1 MB; one call's lists are ~2 MB.
    assert large < small + (2 << 20), (small, large)


def test_vllm_extraction_files_fit_the_free_space(tiny_llm_path, states, craftax_texts, monkeypatch):
    fake_vllm(monkeypatch, states)
    # layer 1 of 2: the extraction path, whose files are [tokens, 1, D] float32 here
    spec = LLMSpec(model=tiny_llm_path, backend="vllm", layer=1, pooling="last", dtype="float32")
    expected = make_backend(spec.replace(backend="transformers")).hidden_states(craftax_texts)
    backend = make_backend(spec, engine_options={"load_format": "dummy"})
    folder = Path(backend._extract_dir.name)
    per_prompt = 200 * (32 * 4 + 8) + vllm_engine.FILE_OVERHEAD_BYTES  # the longest texts: < 200 tokens
    free = 2 * 3 * per_prompt  # EXTRACT_SHARE 0.5: room for about 3 prompts' files a call
    monkeypatch.setattr(vllm_engine, "free_bytes", lambda path: free)
    written: list[tuple[int, int]] = []
    generate = backend._llm.generate

    def recording(prompts, sampling, use_tqdm=False):
        results = generate(prompts, sampling, use_tqdm)
        written.append((len(prompts), sum(f.stat().st_size for f in folder.iterdir())))
        return results

    backend._llm.generate = recording
    np.testing.assert_allclose(backend.hidden_states(craftax_texts), expected, atol=1e-5)
    assert sum(n for n, _ in written) == len(craftax_texts) and len(written) >= 4
    assert max(size for _, size in written) <= free * vllm_engine.EXTRACT_SHARE
    assert list(folder.iterdir()) == []

    monkeypatch.setattr(vllm_engine, "free_bytes", lambda path: per_prompt)  # half of one file
    with pytest.raises(LLMError, match="too little for vLLM's hidden-state file.*--shm-size"):
        backend.hidden_states(craftax_texts[:1])


def test_shm_dir_checks_the_free_space_not_only_writability(monkeypatch):
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    monkeypatch.setattr(llm, "free_bytes", lambda path: 64 << 20)  # Docker's default size
    assert llm.shm_dir(1 << 20) in ("/dev/shm", None)  # writable or not, 1 MiB fits
    assert llm.shm_dir(1 << 30) is None  # a chunk needing 1 GiB goes to the temp folder instead
    assert list(llm.prompt_chunks([5, 5, 5, 20, 1], max_rows=2, max_size=12)) == [
        slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 5)]


# ----------------------------------------------------------------------------------------------
# vLLM: truncate or not, decided before the engine starts
# ----------------------------------------------------------------------------------------------


def _safetensors(path: Path, names: list[str]) -> None:
    """A safetensors file whose header names these tensors (one float each)."""
    header = {name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i, name in enumerate(names)}
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(4 * len(names)))


def test_vllm_truncation_is_decided_from_the_checkpoint(tiny_llm_path, tmp_path, monkeypatch):
    plan = vllm_engine.vllm_truncation_plan
    # the tiny model's checkpoint holds both layers: vLLM 0.32 cannot load it into one layer
    truncate, reason = plan(tiny_llm_path, 1, 2, vllm_version="0.32.0")
    assert not truncate and "vllm-project/vllm#50898" in reason and "running all 2 layers" in reason
    assert plan(tiny_llm_path, 1, 2, engine_options={"load_format": "dummy"})[0]
    assert plan(tiny_llm_path, 2, 2, engine_options={"load_format": "dummy"}) == (
        False, "the last layer needs the whole model")
    assert vllm_engine.checkpoint_layers(tiny_llm_path) == {0, 1}

    cut = tmp_path / "cut"  # a checkpoint that holds only the kept layers loads truncated
    cut.mkdir()
    _safetensors(cut / "model.safetensors", ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"])
    assert plan(str(cut), 1, 36) == (True, "the checkpoint holds only the first 1 layers")

    sharded = tmp_path / "sharded"  # an index names every weight: no shard is opened
    sharded.mkdir()
    weight_map = {f"model.layers.{i}.mlp.up_proj.weight": "model-00001-of-00002.safetensors" for i in range(36)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert vllm_engine.checkpoint_layers(str(sharded)) == set(range(36))
    assert not plan(str(sharded), 18, 36, vllm_version="0.32.0")[0]

    pickled = tmp_path / "bin"  # .bin weights: unknown, so the whole model (never a failed start)
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    assert vllm_engine.checkpoint_layers(str(pickled)) is None and not plan(str(pickled), 1, 2)[0]

    monkeypatch.setattr(vllm_engine, "PARTIAL_LOADING_SINCE", (0, 33))  # a release with #50898
    assert plan(tiny_llm_path, 1, 2, vllm_version="0.33.1")[0]
    assert not plan(tiny_llm_path, 1, 2, vllm_version="0.32.0")[0]


# ----------------------------------------------------------------------------------------------
# Shutting backends down
# ----------------------------------------------------------------------------------------------


def test_backends_close_their_engines(tiny_llm_path, states, monkeypatch):
    transformers = make_backend(LLMSpec(model=tiny_llm_path))
    transformers.close()
    transformers.close()  # idempotent
    with pytest.raises(LLMError, match="was closed"):
        transformers.hidden_states(["x"])

    fake_sglang(monkeypatch, states)
    sglang = make_backend(LLMSpec(model=tiny_llm_path, backend="sglang"))
    engine = sglang._engine
    sglang.close()
    sglang.close()
    assert engine.shutdowns == 1
    with pytest.raises(LLMError, match="was closed"):
        sglang.hidden_states(["x"])

    fake_vllm(monkeypatch, states)
    vllm = make_backend(LLMSpec(model=tiny_llm_path, backend="vllm", layer=1),
                        engine_options={"load_format": "dummy"})
    stopped: list[str] = []
    core = type("Core", (), {"shutdown": lambda self: stopped.append("core")})()
    vllm._llm.llm_engine = type("Engine", (), {"engine_core": core})()
    folder = Path(vllm._extract_dir.name)
    vllm.close()
    vllm.close()
    assert stopped == ["core"] and not folder.exists()
    with pytest.raises(LLMError, match="was closed"):
        vllm.hidden_states(["x"])


class RecordingBackend(ConstantBackend):
    """A stand-in model that logs its loading and closing."""

    log: list[str] = []

    def __init__(self, spec):
        super().__init__(spec)
        self.name = f"{spec.pooling}-{sum(e.startswith('load') for e in self.log)}"
        self.log.append(f"load {self.name}")

    def close(self):
        self.log.append(f"close {self.name}")


def test_the_worker_closes_each_backend_on_a_model_switch_and_on_exit(tiny_llm_path, tmp_path, redis_db):  # noqa: F811
    db, client = redis_db
    source = write_synthetic_dataset(tmp_path / "data", 2, 2, 2)
    enqueue(enqueue_cfg(source, tmp_path / "last", db, tiny_llm_path), client)
    enqueue(enqueue_cfg(source, tmp_path / "mean", db, tiny_llm_path, pooling="mean"), client)
    RecordingBackend.log = []
    cfg = WorkerConfig(embedded_redis=db, name="w", claim_idle_s=1.0, poll_s=0.05, idle_exit_s=0.0,
                       progress=False)
    summary = run_worker(cfg, client, load=RecordingBackend)
    assert summary.jobs == 4
    assert RecordingBackend.log == ["load last-0", "close last-0", "load mean-1", "close mean-1"]

    class Broken(RecordingBackend):
        def hidden_states(self, texts):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    enqueue(enqueue_cfg(source, tmp_path / "again", db, tiny_llm_path), client)
    Broken.log = []
    with pytest.raises(WorkerBroken):
        run_worker(cfg, client, load=Broken)
    assert Broken.log == ["load last-0", "close last-0"]


def test_a_failed_load_after_a_switch_leaves_no_stale_backend(tiny_llm_path):
    loaded: list = []

    def load(spec):
        if spec.pooling == "mean":
            raise RuntimeError("out of memory")
        loaded.append(RecordingBackend(spec))
        return loaded[-1]

    RecordingBackend.log = []
    cache = BackendCache(WorkerConfig(), load)
    spec = LLMSpec(model=tiny_llm_path)
    assert cache.get(spec) is loaded[0]
    with pytest.raises(WorkerBroken):
        cache.get(spec.replace(pooling="mean"))
    assert cache.get(spec) is loaded[1]  # loaded again, not the closed one
    cache.close()
    assert RecordingBackend.log == ["load last-0", "close last-0", "load last-1", "close last-1"]
