"""The SGLang backend (GPU only): hidden states and generation behind ``utils.llm``'s interface.

One offline ``sglang.Engine`` serves both. Prompts go in as token ids from ``utils.llm``'s
``PromptBuilder`` (``skip_tokenizer_init``), so SGLang sees exactly the tokens the transformers
backend sees, and generated ids are decoded with the same tokenizer.

Hidden states come from ``return_hidden_states``: SGLang returns the states that feed the LM head,
i.e. the last layer *after* the final norm (transformers' last ``hidden_states`` entry), for
every prompt token. It has no way to return an intermediate layer's residual stream (a truncated
model would still apply the final norm), so those layers are refused with a pointer to vLLM or
transformers rather than computed differently.

Which arguments the installed release takes is read at run time: the engine flag is
``enable_return_hidden_states`` (it has been a plain ``return_hidden_states`` server argument),
the request flag is a ``generate`` argument (it used to live in the sampling parameters).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils.llm import (
    LLMError,
    LLMSpec,
    PromptBuilder,
    _check_finite,
    _resolve_dtype,
    engine_memory_fraction,
    identity,
    load_tokenizer,
    model_dims,
    param_names,
    pool_token_states,
    resolve_layer,
)

ENGINE_FLAGS = ("enable_return_hidden_states", "return_hidden_states")
MEMORY_ENV = "SGLANG_MEM_FRACTION_STATIC"


def require_sglang(cuda_available: bool | None = None):
    """Import SGLang for a GPU run, or say in one line why that cannot work here."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise LLMError("the sglang backend needs a CUDA GPU and none is visible here; "
                       "use --backend transformers (CPU or GPU) or run on a GPU node")
    try:
        import sglang
    except ImportError as exc:
        raise LLMError(f"the sglang backend needs the sglang package ({exc}); install it on the GPU "
                       "machine (pip install -e '.[llm,sglang]') or use --backend transformers") from exc
    return sglang


def sglang_engine_options(spec: LLMSpec, server_params: Sequence[str]) -> dict[str, Any]:
    """Keyword arguments for ``sglang.Engine`` (``server_params``: the installed ServerArgs' fields)."""
    flag = next((f for f in ENGINE_FLAGS if f in server_params), None)
    if flag is None:
        raise LLMError("the installed SGLang's ServerArgs has none of "
                       f"{', '.join(ENGINE_FLAGS)}: it cannot return hidden states; "
                       "use --backend vllm or transformers")
    options = {"model_path": os.path.expanduser(spec.model), "dtype": _resolve_dtype(spec, "cuda"),
               "context_length": spec.max_length, "random_seed": 0, "skip_tokenizer_init": True,
               flag: True}
    fraction = engine_memory_fraction(MEMORY_ENV)
    if fraction:
        options["mem_fraction_static"] = fraction
    return options


def sglang_prompt_states(output: dict[str, Any], n_tokens: int, pooling: str, i: int = 0) -> np.ndarray:
    """One ``generate`` output -> the pooled prompt state (float32 [D]).

    ``meta_info["hidden_states"]`` holds the prefill's states first ([prompt tokens, D]) and then
    one [D] per generated token; only the prefill's are the prompt's. A single prefill row is the
    last prompt token's, enough for last pooling; mean pooling needs every token."""
    states = (output.get("meta_info") or {}).get("hidden_states")
    if not states:
        raise LLMError(f"SGLang returned no hidden states for prompt {i}; is the engine started "
                       "with return_hidden_states?")
    prefill = np.asarray(states[0], dtype=np.float32)
    if prefill.ndim == 1:
        prefill = prefill[None]
    rows = len(prefill)
    if rows != n_tokens and not (pooling == "last" and rows == 1):
        raise LLMError(f"SGLang returned states for {rows} tokens of prompt {i}, which has "
                       f"{n_tokens}; {pooling} pooling needs all of them")
    return pool_token_states(prefill, pooling)


class SGLangBackend:
    """SGLang on a GPU: last-layer hidden states and generation from one engine."""

    def __init__(self, spec: LLMSpec, *, hidden_states: bool = True,
                 engine_options: dict[str, Any] | None = None):
        self.spec = spec.validate()
        self._sglang = require_sglang()
        self.num_layers, self.hidden_size = model_dims(spec.model)
        self.layer_index = resolve_layer(spec.layer, self.num_layers, spec.model)
        if hidden_states and self.layer_index != self.num_layers:
            raise LLMError(f"the sglang backend returns only the last layer's (normed) state, not "
                           f"layer {spec.layer}; use layer -1, --backend vllm or --backend transformers")
        self.tokenizer = load_tokenizer(spec.model)
        self.prompts = PromptBuilder(spec, self.tokenizer)
        self.identity = identity(spec)
        from sglang.srt.server_args import ServerArgs

        options = {**sglang_engine_options(spec, param_names(ServerArgs)), **(engine_options or {})}
        self._engine = self._sglang.Engine(**options)
        self._request_flag = "return_hidden_states" in param_names(self._engine.generate)

    def _run(self, ids: list[list[int]], sampling: dict[str, Any], hidden: bool) -> list[dict]:
        extra: dict[str, Any] = {}
        if hidden and self._request_flag:
            extra["return_hidden_states"] = True
        elif hidden:  # older releases read the switch from the sampling parameters
            sampling = {**sampling, "return_hidden_states": True}
        outputs = self._engine.generate(input_ids=ids, sampling_params=sampling, **extra)
        return outputs if isinstance(outputs, list) else [outputs]

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        if self.layer_index != self.num_layers:
            raise LLMError(f"the sglang backend returns only the last layer, not layer {self.spec.layer}")
        ids = self.prompts.encode(texts)
        out = np.empty((len(ids), self.hidden_size), dtype=np.float32)
        if not ids:
            return out
        outputs = self._run(ids, {"max_new_tokens": 1, "temperature": 0.0}, hidden=True)
        for i, output in enumerate(outputs):
            row = sglang_prompt_states(output, len(ids[i]), self.spec.pooling, i)
            if row.shape != (self.hidden_size,):
                raise LLMError(f"SGLang returned a vector of shape {row.shape} for prompt {i}; "
                               f"expected ({self.hidden_size},)")
            out[i] = row
        return _check_finite(out, f"SGLang model {self.spec.model}")

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        ids = self.prompts.encode(prompts)
        if not ids:
            return []
        outputs = self._run(ids, {"max_new_tokens": max_new_tokens, "temperature": float(temperature)},
                            hidden=False)
        return [self.tokenizer.decode(o.get("output_ids") or [], skip_special_tokens=True)
                for o in outputs]

    def close(self) -> None:
        """Stop SGLang's scheduler processes (they outlive the object otherwise)."""
        self._engine.shutdown()
