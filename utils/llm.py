"""LLM hidden states and generation behind one interface, so every area computes the same features.

Offline labelling, offline-RL evaluation, live LLM features, the server and LLM play all go
``observation -> utils.text_obs.render_texts -> LLMSpec's prompt -> backend.hidden_states``
(:func:`observation_features`), so a hidden state means the same thing wherever it was computed.
The predecessor built offline and online prompts differently and turned failed requests into zero
vectors; here the prompt is built in one place and every failure raises.

    spec = LLMSpec(model="Qwen/Qwen2.5-0.5B-Instruct", layer=-1, pooling="last")
    backend = make_backend(spec)                       # loads the model once
    feats = observation_features(backend, obs, "Craftax-Classic-Symbolic-v1")   # float32 [N, D]

Definitions every backend follows:

* **layer** indexes the ``hidden_states`` tuple of a transformers forward pass: 0 is the token
  embeddings, ``k`` the residual stream after decoder layer ``k``, and ``num_layers`` (= -1) the
  last layer's output *after* the model's final norm (transformers puts the normed state last).
  Negative values count from the end, so -1 is the last layer and -(num_layers + 1) the embeddings.
* **pooling** ``last``: the state of the prompt's last token; ``mean``: the mean over all prompt
  tokens (template and chat markup included, padding excluded).
* **prompt**: ``template`` with ``{text}`` replaced by the text (a plain replace, so other braces
  need no escaping). With a ``system_prompt``, a tokenizer that has a chat template renders
  ``[system, user]`` messages with ``add_generation_prompt=True`` (the last token is then the
  start of the assistant's turn); a tokenizer without one gets ``system_prompt + "\\n\\n" +
  prompt``. Without a system prompt the prompt is tokenized as is, with the tokenizer's own
  special tokens. Both backends tokenize with the same Hugging Face tokenizer, so they see
  identical token ids.
* Prompts longer than ``max_length`` tokens are an error, never silently truncated: truncation
  would change what the hidden state describes.

The transformers backend runs on CPU or GPU, batches prompts sorted by length with left padding
and explicit position ids (so a padded row equals the same prompt alone). The vLLM backend (GPU
only, imported lazily) uses the pooling runner for the last layer and vLLM's hidden-state
extraction for intermediate layers when the installed vLLM has it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from utils.errors import UserError

__all__ = [
    "LLMError", "LLMSpec", "LLMBackend", "TransformersBackend", "VLLMBackend", "make_backend",
    "observation_features", "model_dims", "resolve_layer", "check_spec", "load_tokenizer",
    "PromptBuilder",
]

POOLINGS = ("last", "mean")
BACKENDS = ("transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Bump when the rules that turn a text into a prompt change: old labels then get a new hash.
PROMPT_FORMAT_VERSION = 1
_SYSTEM_SEPARATOR = "\n\n"


class LLMError(UserError):
    """A model, layer, device or request problem the user can fix; one line saying how."""


@dataclasses.dataclass
class LLMSpec:
    """Which model, layer, pooling and prompt turn a text into a hidden state, and how to run it."""

    model: str = ""
    """Local folder (config.json, weights, tokenizer) or Hugging Face hub id."""
    layer: int = -1
    """Index into transformers' hidden_states: 0 = embeddings, k = after decoder layer k, -1 = last (after the final norm)."""
    pooling: str = "last"
    """Pool token states into one vector: 'last' (last prompt token) or 'mean' (all prompt tokens)."""
    template: str = "{text}"
    """Prompt template; '{text}' is replaced by the observation text."""
    system_prompt: str | None = None
    """Optional system prompt, applied through the tokenizer's chat template (prepended when it has none)."""
    backend: str = "transformers"
    """'transformers' (CPU or GPU) or 'vllm' (GPU only)."""
    batch_size: int = 16
    """Prompts per forward pass (transformers; vLLM schedules its own batches)."""
    max_length: int = 4096
    """Longest prompt in tokens; a longer one is an error, never truncated."""
    dtype: str = "auto"
    """Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N' (transformers backend)."""

    # -- validation ------------------------------------------------------------------------------

    def validate(self) -> "LLMSpec":
        """Check every field without loading anything; returns self for chaining."""
        if not self.model:
            raise LLMError("no model given: pass --model with a local model folder or a hub id")
        if self.pooling not in POOLINGS:
            raise LLMError(f"unknown pooling {self.pooling!r}; use one of {', '.join(POOLINGS)}")
        if self.backend not in BACKENDS:
            raise LLMError(f"unknown LLM backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise LLMError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if "{text}" not in self.template:
            raise LLMError(f"template {self.template!r} has no '{{text}}' placeholder for the observation")
        if self.batch_size < 1 or self.max_length < 1:
            raise LLMError("batch_size and max_length must be positive")
        return self

    # -- identity --------------------------------------------------------------------------------

    def template_hash(self) -> str:
        """Stable short hash of everything that shapes the prompt besides the model's own tokenizer:
        the template, the system prompt and the prompt-building rules' version."""
        payload = json.dumps({"template": self.template, "system_prompt": self.system_prompt,
                              "prompt_format": PROMPT_FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_manifest(self) -> dict[str, Any]:
        """The fields that decide what a hidden state is (not batch size or device), for manifests.

        ``compute_dtype`` is this spec's ``dtype``; the name leaves ``dtype`` free for the storage
        dtype that a labelled dataset's manifest records next to these fields."""
        return {"model": self.model, "layer": self.layer, "pooling": self.pooling,
                "template": self.template, "system_prompt": self.system_prompt,
                "template_hash": self.template_hash(), "backend": self.backend,
                "compute_dtype": self.dtype}

    @classmethod
    def from_manifest(cls, block: dict[str, Any], **runtime: Any) -> "LLMSpec":
        """Rebuild the spec a manifest block describes; ``runtime`` sets batch_size, device etc.

        Raises LLMError when the stored template hash disagrees with the stored template (a
        hand-edited manifest, or labels made with other prompt rules): features would not match."""
        missing = [k for k in ("model", "layer", "pooling", "template") if k not in block]
        if missing:
            raise LLMError(f"label block lacks {', '.join(missing)}; it was not written by labelling")
        spec = cls(model=block["model"], layer=int(block["layer"]), pooling=block["pooling"],
                   template=block["template"], system_prompt=block.get("system_prompt"),
                   backend=block.get("backend", "transformers"),
                   dtype=block.get("compute_dtype", "auto"), **runtime)
        stored = block.get("template_hash")
        if stored is not None and stored != spec.template_hash():
            raise LLMError(f"label block's template_hash {stored} does not match its template "
                           f"({spec.template_hash()}): the labels were made with other prompt rules; "
                           "relabel the dataset with this version")
        return spec.validate()

    def replace(self, **changes: Any) -> "LLMSpec":
        return dataclasses.replace(self, **changes)


class LLMBackend(Protocol):
    """What every backend offers (see the module docstring for the exact definitions)."""

    spec: LLMSpec
    hidden_size: int
    num_layers: int

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), hidden_size]; raises LLMError instead of returning a bad row."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        """Continuations of each prompt (built like hidden-state prompts); greedy at temperature 0."""


# ----------------------------------------------------------------------------------------------
# Model metadata and prompts (shared by both backends)
# ----------------------------------------------------------------------------------------------


def _check_model_location(model: str) -> None:
    """Fail fast on a local path that does not exist, instead of a confusing hub lookup."""
    if Path(model).expanduser().exists():
        return
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise LLMError(f"model folder {model} does not exist; pass a folder holding config.json, "
                       "the weights and the tokenizer, or a hub id like Qwen/Qwen2.5-0.5B-Instruct")


def _load_failure(model: str, what: str, exc: BaseException) -> LLMError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LLMError(f"cannot load the {what} of model {model!r} ({first_line}); pass a local model "
                    "folder, or a hub id that can be downloaded from here")


def model_dims(model: str) -> tuple[int, int]:
    """(number of decoder layers, hidden size) from the model's config, without loading weights."""
    from transformers import AutoConfig

    _check_model_location(model)
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(model))
    except (OSError, ValueError, KeyError) as exc:
        raise _load_failure(model, "config", exc) from exc
    text_config = config.get_text_config()
    return int(text_config.num_hidden_layers), int(text_config.hidden_size)


def resolve_layer(layer: int, num_layers: int, model: str = "the model") -> int:
    """Map ``layer`` (negative counts from the end) to an index 0..num_layers, or raise."""
    index = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= index <= num_layers:
        raise LLMError(f"layer {layer} is out of range for {model}, which has {num_layers} layers: "
                       f"use 0..{num_layers} (0 = embeddings, {num_layers} = last) or "
                       f"-{num_layers + 1}..-1")
    return index


def load_tokenizer(model: str):
    """The model's Hugging Face tokenizer, set up for batched left padding."""
    from transformers import AutoTokenizer

    _check_model_location(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(model))
    except (OSError, ValueError, KeyError) as exc:
        raise _load_failure(model, "tokenizer", exc) from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LLMError(f"tokenizer of {model!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PromptBuilder:
    """Texts -> prompt strings -> token ids, the same way for every backend."""

    def __init__(self, spec: LLMSpec, tokenizer):
        self.spec = spec
        self.tokenizer = tokenizer
        self.uses_chat_template = (spec.system_prompt is not None
                                   and bool(getattr(tokenizer, "chat_template", None)))

    def prompt(self, text: str) -> str:
        """The exact string handed to the tokenizer for ``text``."""
        user = self.spec.template.replace("{text}", text)
        if self.spec.system_prompt is None:
            return user
        if self.uses_chat_template:
            messages = [{"role": "system", "content": self.spec.system_prompt},
                        {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        return self.spec.system_prompt + _SYSTEM_SEPARATOR + user

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text; raises when one is longer than ``max_length``."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        prompts = [self.prompt(t) for t in texts]
        if not prompts:
            return []
        # A rendered chat template already holds its special tokens.
        ids = self.tokenizer(prompts, add_special_tokens=not self.uses_chat_template)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.spec.max_length:
                raise LLMError(f"prompt {i} has {len(row)} tokens, more than max_length "
                               f"{self.spec.max_length}; raise --max-length or shorten the template")
            if not row:
                raise LLMError(f"prompt {i} is empty after tokenization; check the template")
        return ids


def _check_finite(states: np.ndarray, what: str) -> np.ndarray:
    bad = ~np.isfinite(states).all(axis=1)
    if bad.any():
        raise LLMError(f"{what} returned non-finite hidden states for {int(bad.sum())} of "
                       f"{len(states)} prompts (first: {int(np.argmax(bad))}); try dtype float32 "
                       "or another layer")
    return states


def _length_batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (longest first): less padding, same results."""
    order = np.argsort([-len(row) for row in ids], kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------


def _resolve_device(spec: LLMSpec, cuda_available: bool) -> str:
    if spec.device == "auto":
        return "cuda" if cuda_available else "cpu"
    if spec.device.startswith("cuda") and not cuda_available:
        raise LLMError(f"device {spec.device} was asked for but no CUDA GPU is visible; "
                       "use --device cpu (or auto)")
    return spec.device


def _resolve_dtype(spec: LLMSpec, device: str) -> str:
    if spec.dtype != "auto":
        return spec.dtype
    return "float32" if device == "cpu" else "bfloat16"


class TransformersBackend:
    """Hugging Face transformers on CPU or GPU: batched, left-padded, explicit position ids."""

    def __init__(self, spec: LLMSpec):
        import torch
        from transformers import AutoModelForCausalLM

        self.spec = spec.validate()
        self.num_layers, self.hidden_size = model_dims(spec.model)
        self.layer_index = resolve_layer(spec.layer, self.num_layers, spec.model)
        self.device = _resolve_device(spec, torch.cuda.is_available())
        self.dtype = _resolve_dtype(spec, self.device)
        self.tokenizer = load_tokenizer(spec.model)
        self.prompts = PromptBuilder(spec, self.tokenizer)
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec.model),
                                                         dtype=getattr(torch, self.dtype))
        except (OSError, ValueError, KeyError) as exc:
            raise _load_failure(spec.model, "weights", exc) from exc
        self.model = model.to(self.device).eval()
        self._torch = torch

    def _pad(self, rows: Sequence[Sequence[int]]):
        """Left-padded input ids, attention mask and position ids counting real tokens only."""
        torch = self._torch
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        ids = self.prompts.encode(texts)
        out = np.empty((len(ids), self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for batch in _length_batches(ids, self.spec.batch_size):
                input_ids, mask, positions = self._pad([ids[i] for i in batch])
                # The base model skips the LM head: no [batch, tokens, vocab] logits to compute.
                result = self.model.base_model(input_ids=input_ids, attention_mask=mask,
                                               position_ids=positions, output_hidden_states=True,
                                               use_cache=False)
                states = result.hidden_states[self.layer_index]
                if self.spec.pooling == "last":
                    pooled = states[:, -1]
                else:  # where(), not a product: padded positions may hold NaN
                    keep = mask.bool().unsqueeze(-1)
                    pooled = torch.where(keep, states, 0).sum(1) / mask.sum(1, keepdim=True)
                out[batch] = pooled.float().cpu().numpy()
        return _check_finite(out, f"model {self.spec.model}")

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        torch = self._torch
        ids = self.prompts.encode(prompts)
        texts: list[str] = [""] * len(ids)
        sampling = ({"do_sample": True, "temperature": float(temperature)} if temperature > 0
                    else {"do_sample": False})
        with torch.inference_mode():
            for batch in _length_batches(ids, self.spec.batch_size):
                input_ids, mask, _ = self._pad([ids[i] for i in batch])
                generated = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id, **sampling)
                new_tokens = generated[:, input_ids.shape[1]:]
                for i, row in zip(batch, new_tokens):
                    texts[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return texts


# ----------------------------------------------------------------------------------------------
# vLLM
# ----------------------------------------------------------------------------------------------


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
                       "machine (pip install vllm) or use --backend transformers") from exc
    return vllm


def vllm_pooler_options(pooling: str, config_params: Sequence[str]) -> dict[str, Any]:
    """PoolerConfig arguments for plain pooled hidden states: LAST or MEAN, no normalisation.

    vLLM renamed the switch: ``normalize`` in older releases, ``use_activation`` since; pass
    whichever the installed ``PoolerConfig`` takes (``config_params``: its parameter names)."""
    options: dict[str, Any] = {"pooling_type": pooling.upper()}
    if "use_activation" in config_params:
        options["use_activation"] = False
    elif "normalize" in config_params:
        options["normalize"] = False
    else:
        raise LLMError("the installed vLLM's PoolerConfig has neither use_activation nor normalize, "
                       "so embeddings would be L2-normalised; use --backend transformers")
    return options


def vllm_engine_options(spec: LLMSpec, layer_index: int, num_layers: int, *,
                        pooler_params: Sequence[str] = (), extract_dir: str | None = None
                        ) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` that compute ``spec``'s hidden states.

    The last layer uses the pooling runner (its output is the final-normed state, like
    transformers' last hidden state). Intermediate layers need vLLM's hidden-state extraction
    (speculative method ``extract_hidden_states``), whose layer ids count like transformers'
    hidden_states indices; it writes per-request files under ``extract_dir``."""
    common = {"model": os.path.expanduser(spec.model), "dtype": _resolve_dtype(spec, "cuda"),
              "max_model_len": spec.max_length, "seed": 0}
    if layer_index == num_layers:
        # convert="embed" turns a *ForCausalLM checkpoint into a pooling model (no LM head).
        return {**common, "runner": "pooling", "convert": "embed",
                "pooler_config": vllm_pooler_options(spec.pooling, pooler_params)}
    if extract_dir is None:
        raise ValueError("intermediate layers need extract_dir")
    return {
        **common,
        "enable_chunked_prefill": False,  # the extraction path requires whole prompts per step
        "speculative_config": {
            "method": "extract_hidden_states", "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [layer_index]}},
        },
        "kv_transfer_config": {
            "kv_connector": "ExampleHiddenStatesConnector", "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": extract_dir},
        },
    }


def pool_token_states(states: np.ndarray, pooling: str) -> np.ndarray:
    """[tokens, D] -> [D] by the spec's pooling rule (used on vLLM's extracted states)."""
    return states[-1] if pooling == "last" else states.mean(axis=0)


class VLLMBackend:
    """vLLM on a GPU: pooling runner for the last layer, hidden-state extraction for others.

    ``generate`` starts a second (generation) engine the first time it is called; give each
    engine its share of GPU memory with the ``VLLM_GPU_MEMORY_UTILIZATION`` environment variable
    when one process needs both."""

    def __init__(self, spec: LLMSpec, *, hidden_states: bool = True):
        self.spec = spec.validate()
        self._vllm = require_vllm()
        self.num_layers, self.hidden_size = model_dims(spec.model)
        self.layer_index = resolve_layer(spec.layer, self.num_layers, spec.model)
        self.tokenizer = load_tokenizer(spec.model)
        self.prompts = PromptBuilder(spec, self.tokenizer)
        self._extract_dir: tempfile.TemporaryDirectory | None = None
        self._generator = None
        # hidden_states=False (generation only, e.g. LLM play): no hidden-state engine holding
        # GPU memory the generation engine needs; started on first use if asked for after all.
        self._llm = self._engine(self._hidden_state_options()) if hidden_states else None

    def _engine(self, options: dict[str, Any]):
        fraction = os.environ.get("VLLM_GPU_MEMORY_UTILIZATION")
        if fraction:
            options = {**options, "gpu_memory_utilization": float(fraction)}
        return self._vllm.LLM(**options)

    def _hidden_state_options(self) -> dict[str, Any]:
        if self.layer_index == self.num_layers:
            from vllm.config import PoolerConfig

            params = list(inspect.signature(PoolerConfig).parameters)
            options = vllm_engine_options(self.spec, self.layer_index, self.num_layers,
                                          pooler_params=params)
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
        self._extract_dir = tempfile.TemporaryDirectory(prefix="vllm-hidden-states-")
        return vllm_engine_options(self.spec, self.layer_index, self.num_layers,
                                   extract_dir=self._extract_dir.name)

    def _token_prompts(self, texts: Sequence[str]) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": row} for row in self.prompts.encode(texts)]

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        prompts = self._token_prompts(texts)
        out = np.empty((len(prompts), self.hidden_size), dtype=np.float32)
        if not prompts:
            return out
        if self._llm is None:
            self._llm = self._engine(self._hidden_state_options())
        if self.layer_index == self.num_layers:
            results = self._llm.embed(prompts, use_tqdm=False)
            for i, result in enumerate(results):
                out[i] = self._checked_row(np.asarray(result.outputs.embedding, np.float32), i)
        else:
            sampling = self._vllm.SamplingParams(max_tokens=1)
            results = self._llm.generate(prompts, sampling, use_tqdm=False)
            for i, result in enumerate(results):
                path = (result.kv_transfer_params or {}).get("hidden_states_path")
                if not path:
                    raise LLMError(f"vLLM returned no hidden states for prompt {i}")
                saved = self._load_extracted(path)
                for leftover in (path, path + ".lock"):
                    Path(leftover).unlink(missing_ok=True)
                states = np.asarray(saved["hidden_states"].float().cpu().numpy())[:, 0]
                if len(states) != len(prompts[i]["prompt_token_ids"]):
                    raise LLMError(f"vLLM returned states for {len(states)} tokens of prompt {i}, "
                                   f"which has {len(prompts[i]['prompt_token_ids'])}")
                out[i] = self._checked_row(pool_token_states(states, self.spec.pooling), i)
        return _check_finite(out, f"vLLM model {self.spec.model}")

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


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def make_backend(spec: LLMSpec, *, hidden_states: bool = True) -> LLMBackend:
    """Load the model ``spec`` names with its backend (once; reuse the returned object).

    ``hidden_states=False`` is for generation-only users (LLM play): the vLLM backend then does not
    start its hidden-state engine up front (transformers uses one model for both anyway)."""
    spec.validate()
    if spec.backend == "vllm":
        return VLLMBackend(spec, hidden_states=hidden_states)
    return TransformersBackend(spec)


def check_spec(spec: LLMSpec) -> tuple[int, int]:
    """Validate ``spec`` against the model's config without loading weights (for enqueueing).

    Returns (num_layers, hidden_size). The GPU and vLLM checks happen where the model loads."""
    num_layers, hidden_size = model_dims(spec.validate().model)
    resolve_layer(spec.layer, num_layers, spec.model)
    return num_layers, hidden_size


def observation_features(backend: LLMBackend, obs: np.ndarray, env_name: str, *,
                         return_texts: bool = False):
    """Symbolic observations [N, obs_dim] -> float32 hidden states [N, D] via the canonical text.

    The one path from an observation to a feature vector: offline labelling, evaluation of
    policies that take LLM features, live features and the server all call this."""
    from utils.text_obs import render_texts

    texts = render_texts(obs, env_name)
    states = backend.hidden_states(texts)
    return (states, texts) if return_texts else states
