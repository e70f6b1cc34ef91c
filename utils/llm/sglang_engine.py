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

SGLang returns states only for the tokens a forward pass *computed*
(``scheduler_components/batch_result_processor.py`` in 0.5.21). Two defaults leave tokens out:

* the radix (prefix) cache: a prompt sharing a prefix with an earlier one (every Craftax text
  starts with the same header) reuses the prefix's KV cache, and its states cover only the rest;
* chunked prefill: a prompt split across forward passes returns only its last piece's states.

The prompt's *last* token is always computed (SGLang leaves at least one token to run, for the
logits), so ``last`` pooling is exact with both on and asks for ``return_hidden_states="last"``
where the release has it (one [D] row per prompt instead of [tokens, D] lists). ``mean`` pooling
needs every token: its engine starts with ``disable_radix_cache=True`` and chunked prefill off
(``chunked_prefill_size=-1``), and a row count that differs from the prompt's token count is an
error, never a mean over part of the prompt.

Memory: ``hidden_states`` sends at most :data:`utils.llm.ENGINE_CHUNK_ROWS` prompts per
``generate`` call, and when whole token lists come back, at most :data:`MAX_STATE_VALUES` floats'
worth of tokens (SGLang hands them over as nested Python lists, about 32 bytes a float).
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
    prompt_chunks,
    resolve_layer,
)

ENGINE_FLAGS = ("enable_return_hidden_states", "return_hidden_states")
LAST_MODE_FIELD = "return_hidden_states_mode"
"""ServerArgs field of the releases whose requests may ask for ``return_hidden_states="last"``."""
MEMORY_ENV = "SGLANG_MEM_FRACTION_STATIC"
MAX_STATE_VALUES = 1 << 25
"""Most per-token state values one ``generate`` call may return (32M floats, about 1 GiB as the
Python lists SGLang returns); bounds the prompts per call when whole token lists come back."""


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


def sglang_engine_options(spec: LLMSpec, server_params: Sequence[str], *,
                          hidden_states: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``sglang.Engine`` (``server_params``: the installed ServerArgs' fields).

    With ``hidden_states`` and ``mean`` pooling the radix cache and chunked prefill are off, so the
    engine computes (and returns) every prompt token's state (see the module docstring)."""
    flag = next((f for f in ENGINE_FLAGS if f in server_params), None)
    if flag is None:
        raise LLMError("the installed SGLang's ServerArgs has none of "
                       f"{', '.join(ENGINE_FLAGS)}: it cannot return hidden states; "
                       "use --backend vllm or transformers")
    options = {"model_path": os.path.expanduser(spec.model), "dtype": _resolve_dtype(spec, "cuda"),
               "context_length": spec.max_length, "random_seed": 0, "skip_tokenizer_init": True,
               flag: True}
    if hidden_states and spec.pooling != "last":  # last pooling is exact with both on
        for field in ("disable_radix_cache", "chunked_prefill_size"):
            if field not in server_params:
                raise LLMError(f"the installed SGLang's ServerArgs has no {field}, so {spec.pooling} "
                               "pooling would see only the tokens it did not take from its caches; use "
                               "last pooling, --backend vllm or --backend transformers")
        options.update(disable_radix_cache=True, chunked_prefill_size=-1)
    fraction = engine_memory_fraction(MEMORY_ENV)
    if fraction:
        options["mem_fraction_static"] = fraction
    return options


def sglang_prompt_states(output: dict[str, Any], n_tokens: int, pooling: str, i: int = 0) -> np.ndarray:
    """One ``generate`` output -> the pooled prompt state (float32 [D]).

    ``meta_info["hidden_states"]`` holds the prefill's states first ([computed tokens, D], or one
    [D] row with ``return_hidden_states="last"``) and then one [D] per generated token; only the
    prefill's are the prompt's. Its last row is always the prompt's last token, which is all last
    pooling needs (cached prefixes and chunked prefill drop only earlier rows); mean pooling needs
    a row for every token."""
    states = (output.get("meta_info") or {}).get("hidden_states")
    if not states:
        raise LLMError(f"SGLang returned no hidden states for prompt {i}; is the engine started "
                       "with return_hidden_states?")
    prefill = np.asarray(states[0], dtype=np.float32)
    if prefill.ndim == 1:
        prefill = prefill[None]
    rows = len(prefill)
    if pooling == "last":
        return pool_token_states(prefill[-1:], pooling)
    if rows != n_tokens:
        raise LLMError(f"SGLang returned states for {rows} tokens of prompt {i}, which has "
                       f"{n_tokens}; {pooling} pooling needs all of them (the engine must run with "
                       "disable_radix_cache=True and chunked_prefill_size=-1, as this backend starts it)")
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

        server_params = param_names(ServerArgs)
        self.engine_options = {**sglang_engine_options(spec, server_params, hidden_states=hidden_states),
                               **(engine_options or {})}
        # "last" requests: one row per prompt, exact whatever the caches hold (module docstring).
        self._last_mode = LAST_MODE_FIELD in server_params
        self._engine = self._sglang.Engine(**self.engine_options)
        self._request_flag = "return_hidden_states" in param_names(self._engine.generate)

    def _run(self, ids: list[list[int]], sampling: dict[str, Any], hidden: bool | str) -> list[dict]:
        if self._engine is None:
            raise LLMError(f"this sglang backend of {self.spec.model} was closed; make a new one")
        extra: dict[str, Any] = {}
        if hidden and self._request_flag:
            extra["return_hidden_states"] = hidden
        elif hidden:  # older releases read the switch from the sampling parameters
            sampling = {**sampling, "return_hidden_states": True}
        outputs = self._engine.generate(input_ids=ids, sampling_params=sampling, **extra)
        return outputs if isinstance(outputs, list) else [outputs]

    def _hidden_request(self) -> bool | str:
        """What each request asks for: the last row alone where that is exact and supported."""
        return "last" if self.spec.pooling == "last" and self._last_mode and self._request_flag else True

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        if self.layer_index != self.num_layers:
            raise LLMError(f"the sglang backend returns only the last layer, not layer {self.spec.layer}")
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        request = self._hidden_request()
        # Whole token lists come back unless one row is asked for: bound the tokens per call too.
        max_tokens = None if request == "last" else max(1, MAX_STATE_VALUES // self.hidden_size)
        out = np.empty((len(texts), self.hidden_size), dtype=np.float32)
        for rows in prompt_chunks([0] * len(texts)):
            ids = self.prompts.encode(texts[rows], first=rows.start)
            for part in prompt_chunks([len(row) for row in ids], max_size=max_tokens):
                outputs = self._run(ids[part], {"max_new_tokens": 1, "temperature": 0.0}, hidden=request)
                if len(outputs) != part.stop - part.start:
                    raise LLMError(f"SGLang answered {len(outputs)} of {part.stop - part.start} prompts")
                for j, output in enumerate(outputs, start=part.start):
                    i = rows.start + j
                    row = sglang_prompt_states(output, len(ids[j]), self.spec.pooling, i)
                    if row.shape != (self.hidden_size,):
                        raise LLMError(f"SGLang returned a vector of shape {row.shape} for prompt {i}; "
                                       f"expected ({self.hidden_size},)")
                    out[i] = row
        return _check_finite(out, f"SGLang model {self.spec.model}")

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError("pass a sequence of prompts, not a single string")
        texts: list[str] = []
        sampling = {"max_new_tokens": max_new_tokens, "temperature": float(temperature)}
        for rows in prompt_chunks([0] * len(prompts)):
            outputs = self._run(self.prompts.encode(prompts[rows], first=rows.start), sampling, hidden=False)
            texts += [self.tokenizer.decode(o.get("output_ids") or [], skip_special_tokens=True)
                      for o in outputs]
        return texts

    def close(self) -> None:
        """Stop SGLang's scheduler and detokenizer processes now: they outlive a dropped object
        and keep the GPU memory the next model needs. Idempotent."""
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.shutdown()
