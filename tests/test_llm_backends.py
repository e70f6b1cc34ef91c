"""GPU engines (vLLM, SGLang) with stand-in engine objects on the CPU, and feature exactness.

The stand-ins record the arguments each engine gets and answer with states computed by plain
transformers, so these tests check what this code asks of the engines and how it post-processes
their answers. The real engines run under the ``gpu`` marker (``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import utils.llm as llm
import utils.llm.sglang_engine as sglang_engine
import utils.llm.vllm_engine as vllm_engine
from labelling.labels import check_output_labels, labels_block, same_labels
from utils.llm import LLMError, LLMSpec, make_backend

TEXTS = ["Health 7, food 5.", "Inventory: wood 3, sapling 1.", "x"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def token_states(tiny_llm_path):
    """ids -> tuple of [tokens, D] states per hidden_states index, from the full model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_path).eval()

    def states(ids: list[int]) -> tuple:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        return tuple(h[0].numpy() for h in out.hidden_states)

    return states


def _module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


# ----------------------------------------------------------------------------------------------
# vLLM
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OldPoolerConfig:
    """A vLLM release that still has ``normalize`` next to ``use_activation``."""

    pooling_type: str | None = None
    normalize: bool | None = None
    use_activation: bool | None = None


def fake_vllm(monkeypatch, token_states, *, unit_norm: bool = False, partial_load: bool = True):
    engines: list[dict] = []

    class FakeLLM:
        def __init__(self, **options):
            engines.append(options)
            if "hf_overrides" in options and not partial_load:  # like vLLM before #50898
                raise ValueError("There is no module or parameter named 'model.layers.1' in Qwen2ForCausalLM")
            self.options = options

        def embed(self, prompts, use_tqdm=False):
            config = self.options["pooler_config"]
            assert config.normalize is False and config.use_activation is False
            rows = []
            for prompt in prompts:
                states = token_states(prompt["prompt_token_ids"])[-1]
                row = states[-1] if config.pooling_type == "LAST" else states.mean(0)
                rows.append(row / np.linalg.norm(row) if unit_norm else row)
            return [types.SimpleNamespace(outputs=types.SimpleNamespace(embedding=r.tolist()))
                    for r in rows]

        def generate(self, prompts, sampling, use_tqdm=False):
            import torch

            folder = Path(self.options["kv_transfer_config"]["kv_connector_extra_config"]
                          ["shared_storage_path"])
            [layer] = self.options["speculative_config"]["draft_model_config"]["hf_config"][
                "eagle_aux_hidden_state_layer_ids"]
            results = []
            for i, prompt in enumerate(prompts):
                path = folder / f"req-{len(engines)}-{i}.pt"
                states = token_states(prompt["prompt_token_ids"])[layer]
                torch.save({"hidden_states": torch.tensor(states)[:, None]}, path)
                results.append(types.SimpleNamespace(kv_transfer_params={"hidden_states_path": str(path)}))
            return results

    import torch

    fake = _module(monkeypatch, "vllm", LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    _module(monkeypatch, "vllm.config", PoolerConfig=OldPoolerConfig)
    connector = types.SimpleNamespace(load_hidden_states=lambda path: torch.load(path))
    _module(monkeypatch, "vllm.distributed.kv_transfer.kv_connector.v1",
            example_hidden_states_connector=connector)
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: fake)
    return engines


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_vllm_last_layer_turns_off_every_normalisation_switch(tiny_llm_path, token_states,
                                                              monkeypatch, pooling):
    engines = fake_vllm(monkeypatch, token_states)
    spec = LLMSpec(model=tiny_llm_path, backend="vllm", pooling=pooling)
    backend = make_backend(spec, engine_options={"load_format": "dummy"})
    [options] = engines
    assert options["runner"] == "pooling" and options["load_format"] == "dummy"
    config = options["pooler_config"]
    assert (config.pooling_type, config.normalize, config.use_activation) == (pooling.upper(), False, False)
    assert "hf_overrides" not in options  # the last layer needs the whole model
    expected = make_backend(spec.replace(backend="transformers")).hidden_states(TEXTS)
    np.testing.assert_allclose(backend.hidden_states(TEXTS), expected, atol=1e-5)
    assert backend.identity == {**llm.identity(spec), "compute_dtype": "bfloat16"}


def test_vllm_unit_norm_rows_fail_at_warm_up(tiny_llm_path, token_states, monkeypatch):
    fake_vllm(monkeypatch, token_states, unit_norm=True)
    with pytest.raises(LLMError, match="unit-norm"):
        make_backend(LLMSpec(model=tiny_llm_path, backend="vllm"))
    llm.check_not_unit_norm(np.full((2, 4), 3.0), "x")  # raw states pass
    assert vllm_engine.vllm_pooler_options("last", ["seq_pooling_type", "use_activation"]) == \
        {"seq_pooling_type": "LAST", "use_activation": False}


@pytest.mark.parametrize("layer", [1, 0])
def test_vllm_intermediate_layer_truncates_and_reads_files_from_shm(tiny_llm_path, token_states,
                                                                    monkeypatch, layer):
    engines = fake_vllm(monkeypatch, token_states)
    spec = LLMSpec(model=tiny_llm_path, backend="vllm", layer=layer, pooling="mean")
    backend = make_backend(spec, engine_options={"load_format": "dummy"})  # random weights truncate
    [options] = engines
    assert options["hf_overrides"] == {"num_hidden_layers": 1, "layer_types": ["full_attention"]}
    ids = options["speculative_config"]["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"]
    assert ids == [layer]
    folder = Path(options["kv_transfer_config"]["kv_connector_extra_config"]["shared_storage_path"])
    if llm.shm_dir():
        assert folder.parent == Path("/dev/shm")
    expected = make_backend(spec.replace(backend="transformers")).hidden_states(TEXTS)
    np.testing.assert_allclose(backend.hidden_states(TEXTS), expected, atol=1e-5)
    assert list(folder.iterdir()) == []  # every per-prompt file is deleted once read
    assert (backend.truncated, backend.loaded_layers) == (True, 1)


def test_vllm_without_partial_loading_runs_all_layers(tiny_llm_path, token_states, monkeypatch, capsys):
    """vLLM 0.32 cannot load a full checkpoint into a truncated model: decided before the engine
    starts (the checkpoint holds both layers), so one full-model engine does the work."""
    engines = fake_vllm(monkeypatch, token_states, partial_load=False)
    spec = LLMSpec(model=tiny_llm_path, backend="vllm", layer=1, pooling="last")
    backend = make_backend(spec)
    [options] = engines
    assert "hf_overrides" not in options
    assert (backend.truncated, backend.loaded_layers) == (False, 2)
    assert "running all 2 layers" in backend.truncation_reason
    assert "running all 2 layers" in capsys.readouterr().err
    expected = make_backend(spec.replace(backend="transformers")).hidden_states(TEXTS)
    np.testing.assert_allclose(backend.hidden_states(TEXTS), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# SGLang
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeServerArgs:
    """The ServerArgs fields of SGLang 0.5.21 that this code reads."""

    model_path: str = ""
    enable_return_hidden_states: bool = False
    return_hidden_states_mode: str | None = None
    disable_radix_cache: bool = False
    chunked_prefill_size: int | None = None


@dataclasses.dataclass
class OldServerArgs:
    """A release whose requests cannot ask for the last row alone."""

    model_path: str = ""
    enable_return_hidden_states: bool = False
    disable_radix_cache: bool = False
    chunked_prefill_size: int | None = None


FAKE_PREFILL_CHUNK = 64
"""The stand-in's chunked_prefill_size when none is given (SGLang picks 2k-16k tokens by GPU)."""


def fake_sglang(monkeypatch, token_states, *, request_flag: bool = True, server_args=FakeServerArgs):
    """A stand-in ``sglang`` answering like 0.5.21: hidden states only for the tokens a forward pass
    computed. Its radix cache (on unless ``disable_radix_cache``) lasts across calls and reuses the
    longest prefix any earlier prompt shares, never the last token; chunked prefill (unless
    ``chunked_prefill_size=-1``) fills passes of FAKE_PREFILL_CHUNK tokens, and a prompt split
    across passes returns only its last piece's states. ``"last"`` requests get one [D] row."""
    engines: list[dict] = []
    calls: list[dict] = []

    class Engine:
        def __init__(self, **options):
            engines.append(options)
            self.options = options
            self.seen: list[list[int]] | None = None if options.get("disable_radix_cache") else []
            size = options.get("chunked_prefill_size")
            self.pass_tokens = None if size == -1 else size or FAKE_PREFILL_CHUNK
            self.shutdowns = 0

        def _cached(self, ids: list[int]) -> int:
            """Tokens of ``ids`` the radix cache holds (at most all but the last)."""
            if self.seen is None:
                return 0
            best = 0
            for seen in self.seen:
                n = 0
                while n < min(len(seen), len(ids) - 1) and seen[n] == ids[n]:
                    n += 1
                best = max(best, n)
            self.seen.append(list(ids))
            return best

        def _answer(self, input_ids, sampling_params, hidden):
            calls.append({"sampling_params": sampling_params, "hidden": hidden, "prompts": len(input_ids),
                          "tokens": sum(map(len, input_ids))})
            outputs, computed = [], 0
            for ids in input_ids:
                meta = {}
                start = self._cached(ids)
                if self.pass_tokens is not None:  # returned: the last pass's piece of the prompt
                    end = computed + len(ids) - start
                    last_pass = (end - 1) // self.pass_tokens * self.pass_tokens
                    start = max(start, len(ids) - (end - max(last_pass, computed)))
                    computed = end
                if hidden:
                    states = token_states(ids)[-1][start:]
                    prefill = states[-1].tolist() if hidden == "last" else states.tolist()
                    meta["hidden_states"] = [prefill, [0.0] * 32]
                outputs.append({"output_ids": ids[:2], "meta_info": meta})
            return outputs

        def shutdown(self):
            self.shutdowns += 1

        if request_flag:
            def generate(self, input_ids=None, sampling_params=None, return_hidden_states=False):
                return self._answer(input_ids, sampling_params, return_hidden_states)
        else:
            def generate(self, input_ids=None, sampling_params=None):
                return self._answer(input_ids, sampling_params,
                                    sampling_params.get("return_hidden_states", False))

    fake = _module(monkeypatch, "sglang", Engine=Engine)
    _module(monkeypatch, "sglang.srt.server_args", ServerArgs=server_args)
    monkeypatch.setattr(sglang_engine, "require_sglang", lambda: fake)
    return engines, calls


@pytest.mark.parametrize("request_flag", [True, False])
def test_sglang_hidden_states_and_generation(tiny_llm_path, token_states, monkeypatch, request_flag):
    engines, calls = fake_sglang(monkeypatch, token_states, request_flag=request_flag)
    monkeypatch.setenv("SGLANG_MEM_FRACTION_STATIC", "0.4")
    spec = LLMSpec(model=tiny_llm_path, backend="sglang", pooling="mean", max_length=512)
    backend = make_backend(spec)
    [options] = engines
    assert options["skip_tokenizer_init"] is True and options["enable_return_hidden_states"] is True
    assert options["context_length"] == 512 and options["mem_fraction_static"] == 0.4
    assert options["disable_radix_cache"] is True and options["chunked_prefill_size"] == -1  # mean
    for pooling in ("mean", "last"):
        backend.spec = spec.replace(pooling=pooling)
        expected = make_backend(spec.replace(backend="transformers", pooling=pooling)).hidden_states(TEXTS)
        np.testing.assert_allclose(backend.hidden_states(TEXTS), expected, atol=1e-5)
    # last pooling asks for the last row alone, where the request takes a mode
    assert calls[-1]["hidden"] == ("last" if request_flag else True)
    assert calls[-1]["sampling_params"]["max_new_tokens"] == 1
    ids = backend.prompts.encode(["Health 7"])[0]
    assert backend.generate(["Health 7"], max_new_tokens=3) == [backend.tokenizer.decode(ids[:2])]
    assert calls[-1]["hidden"] is False and calls[-1]["sampling_params"]["max_new_tokens"] == 3


def test_sglang_refuses_intermediate_layers_and_short_answers(tiny_llm_path, token_states, monkeypatch):
    fake_sglang(monkeypatch, token_states)
    with pytest.raises(LLMError, match="only the last layer"):
        make_backend(LLMSpec(model=tiny_llm_path, backend="sglang", layer=1))
    # generation only (LLM play) may name any layer
    assert make_backend(LLMSpec(model=tiny_llm_path, backend="sglang", layer=1), hidden_states=False)
    one_row = {"meta_info": {"hidden_states": [[1.0, 2.0]]}}
    np.testing.assert_array_equal(sglang_engine.sglang_prompt_states(one_row, 5, "last"), [1.0, 2.0])
    with pytest.raises(LLMError, match="mean pooling needs all of them"):
        sglang_engine.sglang_prompt_states(one_row, 5, "mean")
    with pytest.raises(LLMError, match="no hidden states"):
        sglang_engine.sglang_prompt_states({"meta_info": {}}, 5, "last")
    with pytest.raises(LLMError, match="none of"):
        sglang_engine.sglang_engine_options(LLMSpec(model="m"), ["model_path"])


def test_gpu_engines_without_gpu_or_package_are_clear_errors(monkeypatch):
    with pytest.raises(LLMError, match="sglang backend needs a CUDA GPU"):
        sglang_engine.require_sglang(cuda_available=False)
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(LLMError, match=r"needs the sglang package .*\[llm,sglang\]"):
        sglang_engine.require_sglang(cuda_available=True)
    with pytest.raises(LLMError, match="engine options"):
        make_backend(LLMSpec(model="m"), engine_options={"load_format": "dummy"})


# ----------------------------------------------------------------------------------------------
# transformers: truncation and float32 pooling
# ----------------------------------------------------------------------------------------------


def test_intermediate_layers_load_only_the_layers_they_need(tiny_llm_path, token_states):
    backend = make_backend(LLMSpec(model=tiny_llm_path, layer=1, pooling="last"))
    assert backend.loaded_layers == 1 and len(backend.model.base_model.layers) == 1
    ids = backend.prompts.encode(TEXTS)
    expected = np.stack([token_states(row)[1][-1] for row in ids])  # full model, layer 1
    np.testing.assert_allclose(backend.hidden_states(TEXTS), expected, atol=2e-5)
    with pytest.raises(LLMError, match="cannot generate"):
        backend.generate(["x"])
    assert make_backend(LLMSpec(model=tiny_llm_path)).loaded_layers == 2


def test_mean_pooling_sums_in_float32():
    import torch

    # bf16 tokens alternating 1 and 1 + 2**-7: their mean, 1 + 2**-8, lies between two bf16
    # values, so pooling in bf16 (the old code) rounds it away; float32 keeps it.
    states = torch.ones((1, 512, 2), dtype=torch.bfloat16)
    states[:, 1::2] = 1 + 2 ** -7
    mask = torch.ones((1, 512), dtype=torch.long)
    pooled = llm.pool_states(states, mask, "mean")
    assert pooled.dtype == torch.float32
    np.testing.assert_array_equal(pooled.numpy(), 1 + 2 ** -8)
    in_bf16 = states.sum(1) / mask.sum(1, keepdim=True)
    assert in_bf16.dtype == torch.bfloat16 and in_bf16[0, 0].item() != 1 + 2 ** -8
    assert llm.pool_states(states, mask, "last").dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Exactness: resolved dtype, backend and revision in manifests
# ----------------------------------------------------------------------------------------------


def test_identity_resolves_dtype_backend_and_revision(tiny_llm_path, tmp_path):
    spec = LLMSpec(model=tiny_llm_path)
    cpu = llm.identity(spec, cuda_available=False)
    assert cpu["compute_dtype"] == "float32" and cpu["backend"] == "transformers"
    assert llm.identity(spec, cuda_available=True)["compute_dtype"] == "bfloat16"
    assert llm.identity(spec.replace(backend="vllm"))["compute_dtype"] == "bfloat16"
    assert cpu["model_revision"].startswith("local:")
    copy = Path(shutil.copytree(tiny_llm_path, tmp_path / "copy"))
    assert llm.model_revision(str(copy)) == cpu["model_revision"]  # same bytes, same revision
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # other weights, same size
    weights.write_bytes(bytes(data))
    assert llm.model_revision(str(copy)) != cpu["model_revision"]
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    shutil.copytree(tiny_llm_path, snapshot)
    assert llm.model_revision(str(snapshot)) == "abc123"
    assert llm.model_revision("nobody/not-downloaded-model") is None


def test_labelled_datasets_refuse_to_mix_dtypes_or_revisions(tiny_llm_path, tmp_path, monkeypatch):
    import labelling.labels as labels

    spec = LLMSpec(model=tiny_llm_path)
    enqueued = labels_block(spec, None)
    assert enqueued["compute_dtype"] == "auto" and enqueued["model_revision"] is None
    cpu = labels_block(spec, 32, llm.identity(spec, cuda_available=False))
    gpu = labels_block(spec, 32, llm.identity(spec, cuda_available=True))
    assert cpu["compute_dtype"] == "float32" and gpu["compute_dtype"] == "bfloat16"
    assert same_labels(enqueued, cpu) and same_labels(enqueued, gpu)
    assert not same_labels(cpu, gpu)
    assert not same_labels(cpu, {**cpu, "model_revision": "local:other"})
    assert not same_labels(cpu, {**cpu, "backend": "vllm"})
    out = tmp_path / "labelled"  # a folder a CPU worker has labelled into
    monkeypatch.setattr(labels, "existing_labels", lambda folder: cpu if Path(folder) == out else None)
    assert check_output_labels(out, enqueued)["compute_dtype"] == "float32"  # keeps what is known
    with pytest.raises(Exception, match="compute dtype float32.*not.*compute dtype bfloat16"):
        check_output_labels(out, gpu)
    # a worker resolves in its own process when not handed a backend's identity
    assert labels_block(spec, 32)["compute_dtype"] in ("float32", "bfloat16")
    assert labels_block(spec, 32)["model_revision"] == cpu["model_revision"]


def test_feature_identity_holds_the_resolved_fields(tiny_llm_path):
    from online_rl_llm.features import check_same_identity, encoder_identity
    from utils.errors import UserError

    backend = make_backend(LLMSpec(model=tiny_llm_path, device="cpu"))
    current = encoder_identity(backend)
    assert current["compute_dtype"] == "float32" and current["backend"] == "transformers"
    assert current["model_revision"] == llm.model_revision(tiny_llm_path)
    check_same_identity(dict(current), current, "run")
    with pytest.raises(UserError, match="compute_dtype: 'bfloat16' -> 'float32'"):
        check_same_identity({**current, "compute_dtype": "bfloat16"}, current, "run")
    older = {k: v for k, v in current.items() if k not in ("backend", "compute_dtype", "model_revision")}
    check_same_identity(older, current, "run")  # run folders saved before these fields resume


def _labelled_dataset(tmp_path, backend, drop: tuple[str, ...] = ()):
    """Four labelled rows (the tiny model) whose labels block lacks ``drop``, as older labelling wrote."""
    from benchmarks.labelling_throughput import write_synthetic_dataset
    from labelling.labels import label_shard, update_manifest
    from utils.trajectories import TrajectoryDataset

    source = TrajectoryDataset(write_synthetic_dataset(tmp_path / "src", shards=1, steps=2, streams=2))
    label_shard(source, 0, backend, tmp_path / "out")
    block = labels_block(backend.spec, backend.hidden_size, backend.identity)
    update_manifest(tmp_path / "src", tmp_path / "out", {k: v for k, v in block.items() if k not in drop})
    return tmp_path / "out"


def test_live_features_differing_only_in_dtype_or_backend_are_refused(tiny_llm_path, tmp_path,
                                                                      monkeypatch, capsys):
    """The one identity rule (``utils.llm.check_identity``) at offline evaluation: the live
    features' LABEL_FIELDS (backend, resolved dtype and revision included) must equal the labels'."""
    from offline_rl.data import LABEL_FIELDS, open_dataset
    from offline_rl.evaluate import check_live_features, make_feature_fn
    from utils.errors import UserError

    assert set(llm.RESOLVED_FIELDS) <= set(LABEL_FIELDS)
    backend = make_backend(LLMSpec(model=tiny_llm_path, device="cpu"))  # fp32 transformers
    _, data = open_dataset(_labelled_dataset(tmp_path, backend), "hidden_state")
    labels = data.labels
    assert (labels["backend"], labels["compute_dtype"]) == ("transformers", "float32")
    assert "note:" not in capsys.readouterr().err
    payload = {"labels": labels, "network": {"feature_dim": backend.hidden_size},
               "env_name": data.env_name}
    make_feature_fn(payload)  # the same features: accepted
    # The engine the labels name, standing in as the same CPU model: only the backend differs.
    monkeypatch.setattr(llm, "make_backend", lambda spec, **_: backend)
    for field, value in [("backend", "vllm"), ("compute_dtype", "bfloat16")]:
        other = dict(payload, labels={**labels, field: value})
        with pytest.raises(UserError, match=rf"labelled dataset was made with other LLM features than "
                                            rf"these \({field}: '{value}' -> '[a-z0-9]+'\); evaluate "
                                            "with the labels' backend and compute dtype"):
            make_feature_fn(other)
    with pytest.raises(LLMError, match="model_revision: 'local:other'"):
        check_live_features({**labels, "model_revision": "local:other"}, backend.spec, backend)
    # --llm-model loads the model from another place: revision noted, backend and dtype still checked
    check_live_features({**labels, "model_revision": "local:other"}, backend.spec, backend, llm_model="copy")
    assert "--llm-model copy has revision" in capsys.readouterr().err
    with pytest.raises(LLMError, match="compute_dtype"):
        check_live_features({**labels, "compute_dtype": "float16"}, backend.spec, backend, llm_model="copy")


@pytest.mark.parametrize("older", [("compute_dtype", "model_revision"), ("backend", "compute_dtype", "model_revision")])
def test_labels_without_the_resolved_fields_still_load_with_a_note(tiny_llm_path, tmp_path, capsys, older):
    """Rule for datasets labelled before the identity recorded backend, dtype and revision: they
    train and evaluate, with a note naming what cannot be checked (also for ``auto``)."""
    from offline_rl.data import open_dataset
    from offline_rl.evaluate import make_feature_fn

    backend = make_backend(LLMSpec(model=tiny_llm_path, device="cpu"))
    _, data = open_dataset(_labelled_dataset(tmp_path, backend, drop=older), "hidden_state")
    err = capsys.readouterr().err
    assert "labelled before the features' " + ", ".join(older) + " were recorded" in err
    payload = {"labels": data.labels, "network": {"feature_dim": backend.hidden_size},
               "env_name": data.env_name}
    make_feature_fn(payload)
    assert f"does not record the features' {', '.join(older)}" in capsys.readouterr().err
    make_feature_fn(dict(payload, labels={**data.labels, "compute_dtype": "auto"}))  # enqueue-time value
    assert "compute_dtype" in capsys.readouterr().err
    # labelling into such a folder: unknown fields match, known ones must agree
    full = labels_block(backend.spec, backend.hidden_size, backend.identity)
    assert same_labels(data.labels, full) and not same_labels(data.labels, {**full, "layer": 1})


# ----------------------------------------------------------------------------------------------
# The README's GPU install lines resolve, as a GPU user's pip would resolve them
# ----------------------------------------------------------------------------------------------


# The environment's own pip settings (a local wheel folder, a CPU torch, a constraints file, other
# indexes) would answer instead of the package index a user has: resolve with none of them.
PIP_SETTINGS = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX",
                "PIP_REQUIREMENT", "PIP_REQUIRE_VIRTUALENV")
# What each engine's environment must get: the engine's pin, and the transformers it allows (the two
# differ, which is why the README installs them into separate environments).
ENGINE_PINS = {"vllm": ("0.32.0", lambda v: tuple(map(int, v.split(".")[:2])) < (5, 20)),
               "sglang": ("0.5.21", lambda v: v == "5.12.1")}


def readme_gpu_install_lines() -> list[str]:
    """The ``pip install ...`` commands of README.md's "GPU machines" paragraph, exactly as written."""
    import re

    text = (REPO / "README.md").read_text()
    start = text.index("**GPU machines**")
    paragraph = text[start:text.find("\n\n", start)]
    return re.findall(r"`(pip install [^`]+)`", paragraph)


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PIP_SETTINGS}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf (global, user or site) either
    return env


def _reachable(args: list[str]) -> bool:
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", *args],
                                capture_output=True, text=True, timeout=120, env=_pip_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "Available versions" in result.stdout


def _url_reachable(url: str) -> bool:
    """``pip index`` would answer from PyPI alone (which has a cuda-tile placeholder): ask the URL."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status == 200
    except OSError:
        return False


def _engine_of(line: str) -> str:
    return next(engine for engine in ENGINE_PINS if engine in line)


def test_readme_gives_one_gpu_install_line_per_engine():
    """One environment per engine (vLLM and SGLang pin different transformers), each with JAX on CUDA;
    SGLang's with NVIDIA's index for its cuda-tile wheel. The resolution test below runs these."""
    lines = readme_gpu_install_lines()
    assert sorted(map(_engine_of, lines)) == ["sglang", "vllm"], lines
    for line in lines:
        assert '-e ".[cuda,llm,' in line, line
        assert ("--extra-index-url https://pypi.nvidia.com" in line) == (_engine_of(line) == "sglang"), line


@pytest.mark.slow
@pytest.mark.parametrize("line", readme_gpu_install_lines(), ids=_engine_of)
def test_readme_gpu_install_line_resolves(line, tmp_path):
    """``pip install --dry-run`` of the README's line as written, against the package index alone (the
    machine's pip settings removed): minutes, and it needs the index (and NVIDIA's for SGLang's
    cuda-tile, a placeholder on PyPI); skipped with the reason where unreachable. Checks what the
    README says: torch 2.13.0 is a CUDA 13 build, beside JAX's CUDA 12 plugin, and each engine gets
    its own transformers."""
    import shlex

    words = shlex.split(line)
    assert words[:2] == ["pip", "install"], line
    if not _reachable(["vllm"]):
        pytest.skip("pip cannot reach the package index (PyPI) from here")
    for i, word in enumerate(words):
        index = words[i + 1].rstrip("/") if word in ("--extra-index-url", "--index-url") else None
        if index and not _url_reachable(f"{index}/cuda-tile/"):
            pytest.skip(f"pip cannot reach {words[i + 1]} (needed by: {line}) from here")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), *words[2:]],
        cwd=REPO, capture_output=True, text=True, timeout=1800, env=_pip_env())
    assert result.returncode == 0, result.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}
    assert chosen["torch"] == "2.13.0" and chosen["jax"] == "0.10.2" and "jax-cuda12-plugin" in chosen
    torch_needs = next(item for item in installs if item["metadata"]["name"].lower() == "torch")
    torch_needs = torch_needs["metadata"].get("requires_dist", [])
    assert any("cu13" in need or "==13." in need for need in torch_needs), torch_needs  # CUDA 13: driver >= 580
    engine = _engine_of(line)
    version, transformers_ok = ENGINE_PINS[engine]
    assert chosen[engine] == version and transformers_ok(chosen["transformers"]), chosen.get("transformers")


# ----------------------------------------------------------------------------------------------
# The real engines (gpu marker): a small model shaped like a real one (head_dim 64, bf16)
# ----------------------------------------------------------------------------------------------


def _gpu_with(package: str) -> bool:
    import importlib.util

    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and importlib.util.find_spec(package) is not None


@pytest.fixture(scope="module")
def gpu_llm_path(tmp_path_factory):
    from utils.testing.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("gpu_llm"), "gpu")


def assert_same_states(got: np.ndarray, expected: np.ndarray) -> None:
    """bf16 engines agree with bf16 transformers up to kernel rounding: same direction, and
    elementwise within a few percent of the largest entry."""
    assert got.shape == expected.shape
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.999, cosine
    np.testing.assert_allclose(got, expected, atol=0.03 * np.abs(expected).max(), rtol=0.03)


def test_gpu_preset_is_shaped_for_real_kernels(gpu_llm_path):
    """What the gpu tests rely on: head_dim 64 and bf16 weights (tiny's head_dim 8 in fp32 is
    rejected by vLLM's attention kernels)."""
    config = llm.model_config(gpu_llm_path)
    assert config.hidden_size // config.num_attention_heads == 64
    assert str(config.dtype).endswith("bfloat16")
    assert llm.model_dims(gpu_llm_path) == (4, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_with("vllm"), reason="needs a CUDA GPU with vllm installed")
@pytest.mark.parametrize("layer,pooling", [(-1, "last"), (-1, "mean"), (2, "mean"), (1, "last")])
def test_vllm_matches_transformers_on_gpu(gpu_llm_path, monkeypatch, layer, pooling):
    monkeypatch.setenv("VLLM_GPU_MEMORY_UTILIZATION", "0.15")
    spec = LLMSpec(model=gpu_llm_path, layer=layer, pooling=pooling, dtype="bfloat16", max_length=2048)
    expected = make_backend(spec.replace(device="cuda")).hidden_states(TEXTS)
    got = make_backend(spec.replace(backend="vllm")).hidden_states(TEXTS)
    assert_same_states(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_with("sglang"), reason="needs a CUDA GPU with sglang installed")
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_sglang_matches_transformers_on_gpu(gpu_llm_path, monkeypatch, pooling):
    monkeypatch.setenv("SGLANG_MEM_FRACTION_STATIC", "0.3")
    spec = LLMSpec(model=gpu_llm_path, pooling=pooling, dtype="bfloat16", max_length=2048)
    expected = make_backend(spec.replace(device="cuda")).hidden_states(TEXTS)
    backend = make_backend(spec.replace(backend="sglang"))
    try:
        assert_same_states(backend.hidden_states(TEXTS), expected)
        replies = backend.generate(TEXTS, max_new_tokens=4)
        assert len(replies) == len(TEXTS) and all(isinstance(r, str) for r in replies)
    finally:
        backend.close()
