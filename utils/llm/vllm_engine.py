"""The vLLM backend (GPU only): hidden states and generation behind ``utils.llm``'s interface.

vLLM is imported only when this backend is built, and its API is asked at run time which switches
it has (they were renamed across releases), so one code path serves several vLLM versions:

* **Last layer** (the final-normed state, like transformers' last ``hidden_states`` entry): the
  pooling runner (``runner="pooling", convert="embed"``) with LAST or MEAN pooling and *every*
  normalisation switch the installed ``PoolerConfig`` / ``PoolingParams`` has set to False
  (``normalize`` in older releases, ``use_activation`` since). Embedding runners L2-normalise by
  default; a warm-up request checks that the rows are not unit-norm, so a new switch name cannot
  slip through unnoticed.
* **Layer k < num_layers** (the raw residual stream after decoder layer k): the model truncated to
  k decoder layers with ``hf_overrides`` (the later layers are never computed) plus vLLM's
  hidden-state extraction of layer id k, which is the pre-norm output of the last kept layer.
  vLLM writes one file per prompt; they go under /dev/shm when it exists and are deleted as soon
  as they are read. vLLM releases that cannot load a full checkpoint into a truncated model
  (weights of the dropped layers raise KeyError/ValueError; vllm-project/vllm#50898) get the whole
  model instead, with a one-line warning: the extracted layer is the same, only slower.
* **Generation**: a second, full-model engine started on first use.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.llm import (
    LLMError,
    LLMSpec,
    PromptBuilder,
    _check_finite,
    _resolve_dtype,
    check_not_unit_norm,
    engine_memory_fraction,
    identity,
    load_tokenizer,
    model_config,
    model_dims,
    param_names,
    pool_token_states,
    resolve_layer,
    shm_dir,
    truncation_overrides,
)

NORMALISATION_SWITCHES = ("normalize", "use_activation")
"""Every name vLLM has used for "post-process the pooled vector"; all are turned off."""
WARM_UP_TEXTS = ("warm-up", "a second, longer warm-up prompt")
MEMORY_ENV = "VLLM_GPU_MEMORY_UTILIZATION"


def require_vllm(cuda_available: bool | None = None):
    """Import vLLM for a GPU run, or say in one line why that cannot work here."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise LLMError("the vllm backend needs a CUDA GPU and none is visible here; "
                       "use --backend transformers (CPU or GPU) or run on a GPU node")
    try:
        import vllm
    except ImportError as exc:
        raise LLMError(f"the vllm backend needs the vllm package ({exc}); install it on the GPU "
                       "machine (pip install -e '.[llm,vllm]') or use --backend transformers") from exc
    return vllm


def vllm_pooling_switches(params: Sequence[str]) -> dict[str, bool]:
    """``{switch: False}`` for every normalisation switch among ``params`` (a config's fields)."""
    return {name: False for name in NORMALISATION_SWITCHES if name in params}


def vllm_pooler_options(pooling: str, config_params: Sequence[str]) -> dict[str, Any]:
    """PoolerConfig arguments for plain pooled hidden states: LAST or MEAN, nothing normalised.

    ``config_params``: the installed ``PoolerConfig``'s field names."""
    switches = vllm_pooling_switches(config_params)
    if not switches:
        raise LLMError("the installed vLLM's PoolerConfig has none of "
                       f"{', '.join(NORMALISATION_SWITCHES)}, so embeddings would be L2-normalised; "
                       "use --backend transformers or another vLLM version")
    kind = "seq_pooling_type" if "seq_pooling_type" in config_params else "pooling_type"
    return {kind: pooling.upper(), **switches}


def vllm_engine_options(spec: LLMSpec, layer_index: int, num_layers: int, *,
                        pooler_params: Sequence[str] = (), extract_dir: str | None = None,
                        truncation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` that compute ``spec``'s hidden states.

    ``truncation``: :func:`utils.llm.truncation_overrides` of the model's config for an
    intermediate layer (it cuts per-layer lists too); defaults to the layer count alone."""
    common = {"model": os.path.expanduser(spec.model), "dtype": _resolve_dtype(spec, "cuda"),
              "max_model_len": spec.max_length, "seed": 0}
    if layer_index == num_layers:
        # convert="embed" turns a *ForCausalLM checkpoint into a pooling model (no LM head).
        return {**common, "runner": "pooling", "convert": "embed",
                "pooler_config": vllm_pooler_options(spec.pooling, pooler_params)}
    if extract_dir is None:
        raise ValueError("intermediate layers need extract_dir")
    keep = max(layer_index, 1)  # the embeddings (id 0) still need one layer to run
    return {
        **common,
        "hf_overrides": truncation or {"num_hidden_layers": keep},
        "enable_chunked_prefill": False,  # the extraction path requires whole prompts per step
        "speculative_config": {
            "method": "extract_hidden_states", "num_speculative_tokens": 1,
            # ids count like transformers' hidden_states: k is the output of layer k, pre-norm
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [layer_index]}},
        },
        "kv_transfer_config": {
            "kv_connector": "ExampleHiddenStatesConnector", "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": extract_dir},
        },
    }


class VLLMBackend:
    """vLLM on a GPU: pooling runner for the last layer, truncation + extraction for others.

    ``generate`` starts a second (generation) engine the first time it is called; give each
    engine its share of GPU memory with the ``VLLM_GPU_MEMORY_UTILIZATION`` environment variable
    when one process needs both. ``engine_options`` are added to every engine's arguments."""

    def __init__(self, spec: LLMSpec, *, hidden_states: bool = True,
                 engine_options: dict[str, Any] | None = None):
        self.spec = spec.validate()
        self._vllm = require_vllm()
        self.num_layers, self.hidden_size = model_dims(spec.model)
        self.layer_index = resolve_layer(spec.layer, self.num_layers, spec.model)
        self.tokenizer = load_tokenizer(spec.model)
        self.prompts = PromptBuilder(spec, self.tokenizer)
        self.identity = identity(spec)
        self.engine_options = dict(engine_options or {})
        self._extract_dir: tempfile.TemporaryDirectory | None = None
        self._generator = None
        self._llm = None
        # hidden_states=False (generation only, e.g. LLM play): no hidden-state engine holding
        # GPU memory the generation engine needs; started on first use if asked for after all.
        if hidden_states:
            self._start_hidden_state_engine()

    def _engine(self, options: dict[str, Any]):
        options = {**options, **self.engine_options}
        fraction = engine_memory_fraction(MEMORY_ENV)
        if fraction:
            options["gpu_memory_utilization"] = fraction
        return self._vllm.LLM(**options)

    def _start_hidden_state_engine(self) -> None:
        options = self._hidden_state_options()
        self.truncated = "hf_overrides" in options
        try:
            self._llm = self._engine(options)
        except Exception as exc:  # noqa: BLE001 -- any load failure; the retry raises its own
            if not self.truncated:
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"warning: vLLM could not load the first {options['hf_overrides']['num_hidden_layers']} "
                  f"layers alone ({reason}); running all {self.num_layers} layers instead (same "
                  "values, slower)", file=sys.stderr)
            self.truncated = False
            self._llm = self._engine({k: v for k, v in options.items() if k != "hf_overrides"})
        if self.layer_index == self.num_layers:
            check_not_unit_norm(self.hidden_states(list(WARM_UP_TEXTS)), "vLLM")

    def _hidden_state_options(self) -> dict[str, Any]:
        if self.layer_index == self.num_layers:
            from vllm.config import PoolerConfig

            options = vllm_engine_options(self.spec, self.layer_index, self.num_layers,
                                          pooler_params=param_names(PoolerConfig))
            options["pooler_config"] = PoolerConfig(**options["pooler_config"])
            return options
        try:
            from vllm.distributed.kv_transfer.kv_connector.v1 import example_hidden_states_connector
        except ImportError as exc:
            raise LLMError(
                f"layer {self.spec.layer} is an intermediate layer, and the installed vLLM "
                f"{getattr(self._vllm, '__version__', '?')} cannot extract those (no "
                "example_hidden_states_connector); upgrade vLLM, use the last layer (-1), or use "
                "--backend transformers") from exc
        self._load_extracted = example_hidden_states_connector.load_hidden_states
        self._extract_dir = tempfile.TemporaryDirectory(prefix="vllm-hidden-states-", dir=shm_dir())
        truncation = truncation_overrides(model_config(self.spec.model), max(self.layer_index, 1))
        return vllm_engine_options(self.spec, self.layer_index, self.num_layers,
                                   extract_dir=self._extract_dir.name, truncation=truncation)

    def _token_prompts(self, texts: Sequence[str]) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": row} for row in self.prompts.encode(texts)]

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        prompts = self._token_prompts(texts)
        out = np.empty((len(prompts), self.hidden_size), dtype=np.float32)
        if not prompts:
            return out
        if self._llm is None:
            self._start_hidden_state_engine()
        if self.layer_index == self.num_layers:
            # No per-request PoolingParams: left unset they take the engine's PoolerConfig, whose
            # switches are all off; setting them per request fails validation on some versions.
            results = self._llm.embed(prompts, use_tqdm=False)
            for i, result in enumerate(results):
                out[i] = self._checked_row(np.asarray(result.outputs.embedding, np.float32), i)
        else:
            sampling = self._vllm.SamplingParams(max_tokens=1)
            results = self._llm.generate(prompts, sampling, use_tqdm=False)
            for i, result in enumerate(results):
                states = self._extracted_states(result, i, len(prompts[i]["prompt_token_ids"]))
                out[i] = self._checked_row(pool_token_states(states, self.spec.pooling), i)
        return _check_finite(out, f"vLLM model {self.spec.model}")

    def _extracted_states(self, result, i: int, n_tokens: int) -> np.ndarray:
        """[tokens, D] states of prompt ``i`` from vLLM's file, which is deleted once read."""
        path = (getattr(result, "kv_transfer_params", None) or {}).get("hidden_states_path")
        if not path:
            raise LLMError(f"vLLM returned no hidden states for prompt {i}")
        try:
            saved = self._load_extracted(path)
        finally:
            for leftover in (path, path + ".lock"):
                Path(leftover).unlink(missing_ok=True)
        tensor = saved["hidden_states"]
        tensor = tensor.float().cpu().numpy() if hasattr(tensor, "float") else np.asarray(tensor)
        states = tensor[:, 0] if tensor.ndim == 3 else tensor  # [tokens, layer ids, D]
        if len(states) != n_tokens:
            raise LLMError(f"vLLM returned states for {len(states)} tokens of prompt {i}, "
                           f"which has {n_tokens}")
        return states

    def _checked_row(self, row: np.ndarray, i: int) -> np.ndarray:
        if row.shape != (self.hidden_size,):
            raise LLMError(f"vLLM returned a vector of shape {row.shape} for prompt {i}; "
                           f"expected ({self.hidden_size},)")
        return row

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        if self._generator is None:
            options = {"model": os.path.expanduser(self.spec.model),
                       "dtype": _resolve_dtype(self.spec, "cuda"),
                       "max_model_len": self.spec.max_length, "seed": 0}
            self._generator = self._engine(options)
        sampling = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
        results = self._generator.generate(self._token_prompts(prompts), sampling, use_tqdm=False)
        return [r.outputs[0].text for r in results]
