"""LLM backends on a tiny random Qwen2 model: shapes, layers, pooling, padding, prompts, errors."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.llm import (
    LLMError,
    LLMSpec,
    PromptBuilder,
    check_spec,
    load_tokenizer,
    make_backend,
    observation_features,
    pool_token_states,
    require_vllm,
    resolve_layer,
    vllm_engine_options,
    vllm_pooler_options,
)

TEXTS = [
    "Health 7, food 5, drink 9, energy 9.",
    "Inventory: wood 3, sapling 1, wood pickaxe 1. Facing: right (east); at (0,1): tree.",
    "x",
    "- stone at (1,0), (0,2), (1,1), (2,0), (0,3), (1,2), (2,1), (0,4), (2,-2), (2,2)",
]


@pytest.fixture(scope="module")
def backend(tiny_llm_path):
    return make_backend(LLMSpec(model=tiny_llm_path, batch_size=3))


@pytest.fixture(scope="module")
def reference(tiny_llm_path):
    """Plain transformers, one unpadded prompt at a time: what the backend must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_path)

    def states(text: str) -> tuple:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
        return tuple(h[0].numpy() for h in out.hidden_states)  # each [tokens, D]

    return states


def file_digests(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


# ----------------------------------------------------------------------------------------------
# The tiny model
# ----------------------------------------------------------------------------------------------


def test_tiny_model_loads_like_a_real_one_and_builds_deterministically(tiny_llm_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.testing.tiny_llm import NUM_LAYERS, build_tiny_llm

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_path)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == NUM_LAYERS
    assert tokenizer.decode(tokenizer("Health 7, at (-1,0): tree.")["input_ids"]) == \
        "Health 7, at (-1,0): tree."
    assert file_digests(build_tiny_llm(tmp_path / "again")) == file_digests(tiny_llm_path)


def test_tiny_model_command_line_has_help_and_a_folder_argument(tmp_path, monkeypatch, capsys):
    """``--help`` once wrote a model into a folder named ``--help``: flags are parsed, never taken for DIR."""
    from utils.testing.tiny_llm import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["--no-such-flag"])
    assert stop.value.code == 2
    assert list(tmp_path.iterdir()) == [], "neither --help nor a bad flag writes a model"
    path = main(["shapes/qwen3", "--preset", "qwen3-4b", "--no-weights"])
    assert capsys.readouterr().out.strip() == path == "shapes/qwen3"
    written = {f.name for f in (tmp_path / "shapes" / "qwen3").iterdir()}
    assert "config.json" in written and "tokenizer.json" in written
    assert not any(name.endswith(".safetensors") for name in written), "--no-weights writes no weights"


# ----------------------------------------------------------------------------------------------
# Hidden states
# ----------------------------------------------------------------------------------------------


def test_hidden_states_shape_dtype_and_empty_input(backend):
    states = backend.hidden_states(TEXTS)
    assert states.shape == (len(TEXTS), backend.hidden_size) and states.dtype == np.float32
    assert np.isfinite(states).all() and np.abs(states).sum() > 0
    assert len(np.unique(states.round(5), axis=0)) == len(TEXTS)  # different texts, different rows
    assert backend.hidden_states([]).shape == (0, backend.hidden_size)


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -3])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_layers_and_pooling_match_plain_transformers(tiny_llm_path, reference, layer, pooling):
    """Batched and left-padded (batch 3 over 4 prompts of different lengths) equals one unpadded
    prompt at a time through plain transformers, for every layer index and both poolings."""
    backend = make_backend(LLMSpec(model=tiny_llm_path, layer=layer, pooling=pooling, batch_size=3))
    got = backend.hidden_states(TEXTS)
    index = layer % 3  # 3 hidden states: embeddings and 2 layers
    expected = np.stack([pool_token_states(reference(t)[index], pooling) for t in TEXTS])
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_layer_indexing_means_embeddings_and_normed_last_layer(tiny_llm_path, backend):
    embeddings = make_backend(LLMSpec(model=tiny_llm_path, layer=0))
    last_id = backend.tokenizer("x")["input_ids"][-1]
    table = backend.model.get_input_embeddings().weight.detach()
    np.testing.assert_allclose(embeddings.hidden_states(["x"])[0], table[last_id].numpy(), atol=1e-6)
    # layer -1 is after the final RMS norm (weights 1 at init): unit RMS, unlike the raw
    # residual stream of layer 1 (small random weights keep it far below 1)
    def rms(x):
        return np.sqrt((x ** 2).mean(1))

    np.testing.assert_allclose(rms(backend.hidden_states(TEXTS)), 1.0, atol=5e-3)
    middle = make_backend(LLMSpec(model=tiny_llm_path, layer=1))
    assert (rms(middle.hidden_states(TEXTS)) < 0.5).all()


def test_batch_size_does_not_change_results(tiny_llm_path, backend):
    one_by_one = make_backend(LLMSpec(model=tiny_llm_path, batch_size=1))
    np.testing.assert_allclose(one_by_one.hidden_states(TEXTS), backend.hidden_states(TEXTS), atol=2e-5)


def test_layer_out_of_range_and_bad_fields_are_clear_errors(tiny_llm_path):
    assert resolve_layer(-3, 2) == 0 and resolve_layer(2, 2) == 2 and resolve_layer(-1, 2) == 2
    for layer in (3, -4):
        with pytest.raises(LLMError, match=r"layer .* out of range .* 2 layers: use 0\.\.2"):
            make_backend(LLMSpec(model=tiny_llm_path, layer=layer))
        with pytest.raises(LLMError, match="out of range"):
            check_spec(LLMSpec(model=tiny_llm_path, layer=layer))
    assert check_spec(LLMSpec(model=tiny_llm_path)) == (2, 32)
    with pytest.raises(LLMError, match="pooling"):
        make_backend(LLMSpec(model=tiny_llm_path, pooling="max"))
    with pytest.raises(LLMError, match="placeholder"):
        make_backend(LLMSpec(model=tiny_llm_path, template="no text here"))
    with pytest.raises(LLMError, match="no model"):
        make_backend(LLMSpec())


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LLMError, match="does not exist"):
        make_backend(LLMSpec(model=str(tmp_path / "no-such-model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMError, match="cannot load the config"):
        make_backend(LLMSpec(model=str(tmp_path / "empty")))


def test_overlong_prompt_is_an_error_not_a_truncation(tiny_llm_path):
    backend = make_backend(LLMSpec(model=tiny_llm_path, max_length=8))
    assert backend.hidden_states(["x"]).shape == (1, 32)
    with pytest.raises(LLMError, match="more than max_length 8"):
        backend.hidden_states(["x", TEXTS[1]])


def test_non_finite_states_raise_instead_of_returning_a_row(tiny_llm_path):
    """The predecessor turned failed requests into zero vectors; a broken model must raise."""
    broken = make_backend(LLMSpec(model=tiny_llm_path))
    broken.model.base_model.norm.weight.data[3] = float("nan")
    with pytest.raises(LLMError, match="non-finite hidden states for 4 of 4"):
        broken.hidden_states(TEXTS)


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def test_template_and_system_prompt_through_the_chat_template(tiny_llm_path, backend):
    spec = LLMSpec(model=tiny_llm_path, template="Observation:\n{text}\nAct.", system_prompt="Play well.")
    chat = make_backend(spec)
    prompt = chat.prompts.prompt("Health 7")
    assert prompt.startswith("<|im_start|>system\nPlay well.<|im_end|>\n<|im_start|>user\n")
    assert "Observation:\nHealth 7\nAct.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert not np.allclose(chat.hidden_states(TEXTS), backend.hidden_states(TEXTS))
    # braces in the template or the text need no escaping: a plain replace, not str.format
    braces = PromptBuilder(LLMSpec(model="m", template="{{json}} {text}"), chat.tokenizer)
    assert braces.prompt("{a}") == "{{json}} {a}"


def test_system_prompt_is_prepended_without_a_chat_template(tiny_llm_path):
    tokenizer = load_tokenizer(tiny_llm_path)
    tokenizer.chat_template = None
    builder = PromptBuilder(LLMSpec(model=tiny_llm_path, system_prompt="Be brief."), tokenizer)
    assert builder.prompt("Health 7") == "Be brief.\n\nHealth 7"


def test_template_hash_and_manifest_round_trip(tiny_llm_path):
    spec = LLMSpec(model=tiny_llm_path, layer=1, pooling="mean", template="A {text}", system_prompt="S")
    same = LLMSpec(model="other", layer=0, template="A {text}", system_prompt="S", batch_size=2)
    assert spec.template_hash() == same.template_hash()  # the model/layer are not prompt shape
    assert spec.template_hash() != spec.replace(template="B {text}").template_hash()
    assert spec.template_hash() != spec.replace(system_prompt=None).template_hash()
    block = spec.to_manifest()
    assert LLMSpec.from_manifest(block, batch_size=5) == spec.replace(batch_size=5)
    with pytest.raises(LLMError, match="template_hash"):
        LLMSpec.from_manifest({**block, "template": "C {text}"})


def test_observation_features_use_the_canonical_text(backend):
    from benchmarks.text_obs_speed import synthetic_observations
    from utils.text_obs import render_texts

    env = "Craftax-Classic-Symbolic-v1"
    obs = synthetic_observations(env, 3)
    states, texts = observation_features(backend, obs, env, return_texts=True)
    assert texts == render_texts(obs, env)
    np.testing.assert_array_equal(states, backend.hidden_states(texts))
    np.testing.assert_array_equal(observation_features(backend, obs, env), states)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def test_greedy_generation_is_batch_independent(backend):
    batched = backend.generate(TEXTS, max_new_tokens=6)
    assert len(batched) == len(TEXTS) and all(isinstance(t, str) and t for t in batched)
    assert batched == [backend.generate([t], max_new_tokens=6)[0] for t in TEXTS]
    sampled = backend.generate(TEXTS[:2], max_new_tokens=6, temperature=1.0)
    assert len(sampled) == 2


# ----------------------------------------------------------------------------------------------
# vLLM: CPU-side logic here, the real engine under the gpu marker
# ----------------------------------------------------------------------------------------------


def test_vllm_without_gpu_or_package_is_a_clear_error(tiny_llm_path, monkeypatch):
    with pytest.raises(LLMError, match="needs a CUDA GPU"):
        require_vllm(cuda_available=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail like a missing package
    with pytest.raises(LLMError, match="needs the vllm package"):
        require_vllm(cuda_available=True)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(LLMError, match="needs a CUDA GPU"):
            make_backend(LLMSpec(model=tiny_llm_path, backend="vllm"))


def test_vllm_options_for_last_and_intermediate_layers():
    spec = LLMSpec(model="m", pooling="mean", max_length=512)
    last = vllm_engine_options(spec, 2, 2, pooler_params=["pooling_type", "use_activation"])
    assert last["runner"] == "pooling" and last["convert"] == "embed"
    assert last["pooler_config"] == {"pooling_type": "MEAN", "use_activation": False}
    assert last["max_model_len"] == 512 and last["dtype"] == "bfloat16"
    assert vllm_pooler_options("last", ["pooling_type", "normalize"]) == \
        {"pooling_type": "LAST", "normalize": False}
    with pytest.raises(LLMError, match="normalised"):
        vllm_pooler_options("last", ["pooling_type"])
    middle = vllm_engine_options(spec, 1, 2, extract_dir="/tmp/x")
    draft = middle["speculative_config"]["draft_model_config"]["hf_config"]
    assert draft["eagle_aux_hidden_state_layer_ids"] == [1]
    assert middle["kv_transfer_config"]["kv_connector_extra_config"]["shared_storage_path"] == "/tmp/x"
    assert "runner" not in middle and middle["enable_chunked_prefill"] is False
    assert middle["hf_overrides"] == {"num_hidden_layers": 1}  # layer 1 of 2: one layer computed
    states = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(pool_token_states(states, "last"), [4, 5])
    np.testing.assert_array_equal(pool_token_states(states, "mean"), [2, 3])


# The real engines on a GPU: tests/test_llm_backends.py (gpu marker, realistically shaped model).
