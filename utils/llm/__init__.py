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
  tokens (template and chat markup included, padding excluded); ``image_mean`` (image features
  only): the mean over the image's tokens.
* **modality** ``text`` (texts and observations rendered to text) or ``image`` (frames, through a
  vision-language model: ``utils.llm.vision``); ``auto`` is ``image`` for a model whose config
  has a vision tower, else ``text``. One backend computes one modality, and the modality is part
  of every feature identity, so text and image features are never mixed.
* **prompt**: ``template`` with ``{text}`` replaced by the text (a plain replace, so other braces
  need no escaping). With a ``system_prompt``, a tokenizer that has a chat template renders
  ``[system, user]`` messages with ``add_generation_prompt=True`` (the last token is then the
  start of the assistant's turn); a tokenizer without one gets ``system_prompt + "\\n\\n" +
  prompt``. Without a system prompt the prompt is tokenized as is, with the tokenizer's own
  special tokens. Both backends tokenize with the same Hugging Face tokenizer, so they see
  identical token ids.
* Prompts longer than ``max_length`` tokens are an error, never silently truncated: truncation
  would change what the hidden state describes.

* **thinking**: chat templates that know ``enable_thinking`` (Qwen3) get it as ``spec.thinking``,
  False by default, so the prompt ends where an answer (not a reasoning block) starts.

Exactness: a hidden state depends on more than model, layer, pooling and prompt. ``identity(spec)``
adds the *resolved* compute dtype (``auto`` becomes float32 or bfloat16 for the device the model
runs on), the backend and the model revision (a hub snapshot's commit, or a fingerprint of a local
folder's config and weights). Labelled datasets and PPO run folders compare it, so bf16 GPU
features are never mixed silently with fp32 CPU ones. Pooling always sums in float32.

Backends (all load the model only through :func:`make_backend`; the GPU engines import lazily):

Every backend works through a long list of texts (a 16k-row shard) in chunks: at most
:data:`ENGINE_CHUNK_ROWS` prompts are tokenized and handed to an engine at a time, and engines whose
answers grow with the prompts' tokens (SGLang's per-token lists, vLLM's per-prompt files) get a
token budget too, so memory stays flat as the input grows. ``close()`` frees a backend's model and
engine processes at once (a worker switching models must not hold two).

* ``transformers``: CPU or GPU; batches prompts sorted by length with left padding and explicit
  position ids (so a padded row equals the same prompt alone). An intermediate layer ``k`` loads
  only ``k`` decoder layers (and no final norm): the rest would be computed and thrown away.
* ``vllm`` (GPU): the last layer through the pooling runner with every normalisation switch the
  installed vLLM has turned off (checked at warm-up: rows must not come back unit-norm);
  layer ``k`` by extracting the pre-norm state of layer ``k``, from a model truncated to ``k``
  layers (``hf_overrides``) when the checkpoint can be loaded that way (decided before the engine
  starts) and from the whole model otherwise, with the per-prompt files under /dev/shm when it has
  room.
* ``sglang`` (GPU): the last layer through ``return_hidden_states`` (SGLang returns the final,
  normed state only, so intermediate layers are refused), and generation.

Image features (``modality="image"``) have a transformers backend (CPU or GPU) and a vLLM one
(GPU, last layer): ``utils/llm/vision.py`` and ``utils/llm/vision_vllm.py``, with the prompts of
``utils/llm/prompts.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from utils.errors import UserError

__all__ = [
    "LLMError", "LLMSpec", "LLMBackend", "TransformersBackend", "VLLMBackend", "SGLangBackend",
    "make_backend", "close_backend", "observation_features", "model_dims", "model_config", "resolve_layer",
    "check_spec", "load_tokenizer", "PromptBuilder", "identity", "model_revision",
    "RESOLVED_FIELDS", "IMAGE_FIELDS", "is_resolved", "identity_differences", "check_identity",
    "truncation_overrides", "pool_states", "pool_token_states", "check_not_unit_norm",
    "require_vllm", "require_sglang", "sglang_engine_options", "sglang_prompt_states",
    "vllm_engine_options", "vllm_pooler_options", "vllm_pooling_switches", "vllm_truncation_plan",
    "ENGINE_CHUNK_ROWS", "prompt_chunks", "free_bytes", "shm_dir",
    "MODALITIES", "is_vision_model", "resolve_modality", "feature_identity", "chat_template_options",
    "TransformersVisionBackend", "VLLMVisionBackend", "frame_features",
]

POOLINGS = ("last", "mean", "image_mean")
MODALITIES = ("auto", "text", "image")
BACKENDS = ("transformers", "vllm", "sglang")
GPU_BACKENDS = ("vllm", "sglang")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Bump when the rules that turn a text into a prompt change: old labels then get a new hash.
PROMPT_FORMAT_VERSION = 1
_SYSTEM_SEPARATOR = "\n\n"
ENGINE_CHUNK_ROWS = 1024
"""Most texts a backend tokenizes and hands to its engine at once. Labelling sends a whole shard
(16,384 rows at the CPU preset) in one ``hidden_states`` call; chunking inside the backend keeps
the token ids, the engine's queue and its answers to this many rows, whatever the shard size."""


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
    """Pool token states into one vector: 'last' (last prompt token), 'mean' (all prompt tokens) or
    'image_mean' (the image's tokens; image features only)."""
    template: str = "{text}"
    """Prompt template; '{text}' is replaced by the observation text."""
    system_prompt: str | None = None
    """Optional system prompt, applied through the tokenizer's chat template (prepended when it has none)."""
    backend: str = "transformers"
    """'transformers' (CPU or GPU), 'vllm' or 'sglang' (GPU only)."""
    batch_size: int = 16
    """Prompts per forward pass (transformers; vLLM schedules its own batches)."""
    max_length: int = 4096
    """Longest prompt in tokens; a longer one is an error, never truncated."""
    dtype: str = "auto"
    """Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N' (transformers backend)."""
    thinking: bool = False
    """Qwen3-style chat templates: render with enable_thinking=True (off by default: answer directly)."""
    modality: str = "auto"
    """What the features are of: 'text', 'image' (frames, through a vision-language model) or 'auto'
    (image for a model with a vision tower, else text)."""

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
        if self.modality not in MODALITIES:
            raise LLMError(f"unknown modality {self.modality!r}; use one of {', '.join(MODALITIES)}")
        if self.pooling == "image_mean" and self.modality == "text":
            raise LLMError("pooling image_mean averages an image's tokens; text features use last or mean")
        if "{text}" not in self.template:
            raise LLMError(f"template {self.template!r} has no '{{text}}' placeholder for the observation")
        if self.batch_size < 1 or self.max_length < 1:
            raise LLMError("batch_size and max_length must be positive")
        return self

    # -- identity --------------------------------------------------------------------------------

    def template_hash(self) -> str:
        """Stable short hash of everything that shapes the prompt besides the model's own tokenizer:
        the template, the system prompt and the prompt-building rules' version."""
        fields = {"template": self.template, "system_prompt": self.system_prompt,
                  "prompt_format": PROMPT_FORMAT_VERSION}
        if self.thinking:  # only when on, so hashes of labels made before the flag stay valid
            fields["thinking"] = True
        if self.modality == "image":  # the words around a frame (utils/llm/prompts.py) shape it too
            from utils.llm.prompts import frame_prompts_digest

            fields["frame_prompts"] = frame_prompts_digest()
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_manifest(self) -> dict[str, Any]:
        """The fields that decide what a hidden state is (not batch size or device), for manifests.

        ``compute_dtype`` is this spec's ``dtype`` as asked for (maybe ``auto``) and
        ``model_revision`` is None: both are resolved where the model loads (:func:`identity`).
        The name leaves ``dtype`` free for the storage dtype a labelled dataset's manifest
        records next to these fields."""
        block = {"model": self.model, "layer": self.layer, "pooling": self.pooling,
                 "template": self.template, "system_prompt": self.system_prompt,
                 "template_hash": self.template_hash(), "backend": self.backend,
                 "compute_dtype": self.dtype, "model_revision": None}
        if self.thinking:
            block["thinking"] = True
        if self.modality == "image":  # only then, so text labels' blocks stay as they were
            block["modality"] = "image"
        return block

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
                   dtype=block.get("compute_dtype", "auto"),
                   thinking=bool(block.get("thinking", False)),
                   modality=block.get("modality", "auto"), **runtime)
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
    identity: dict[str, Any]
    """:func:`identity` as this backend resolved it (dtype, backend, model revision)."""

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), hidden_size]; raises LLMError instead of returning a bad row."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        """Continuations of each prompt (built like hidden-state prompts); greedy at temperature 0."""

    def close(self) -> None:
        """Free the model and stop any engine processes now; the backend is unusable afterwards.
        Idempotent. (Engine processes outlive a dropped object and keep its GPU memory.)"""


# ----------------------------------------------------------------------------------------------
# Model metadata and prompts (shared by every backend)
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


def model_config(model: str):
    """The model's transformers config (no weights loaded)."""
    from transformers import AutoConfig

    _check_model_location(model)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(model))
    except (OSError, ValueError, KeyError) as exc:
        raise _load_failure(model, "config", exc) from exc


def model_dims(model: str) -> tuple[int, int]:
    """(number of decoder layers, hidden size) from the model's config, without loading weights."""
    text_config = model_config(model).get_text_config()
    return int(text_config.num_hidden_layers), int(text_config.hidden_size)


def is_vision_model(model: str) -> bool:
    """Whether ``model``'s config has a vision tower (``vision_config``), read without weights."""
    return getattr(model_config(model), "vision_config", None) is not None


def resolve_modality(spec: LLMSpec) -> LLMSpec:
    """``spec`` with ``modality`` decided (``auto`` -> image for a vision-language model, else text)
    and checked against the model, so a text backend never gets an image spec or the reverse."""
    vision = is_vision_model(spec.model)
    modality = ("image" if vision else "text") if spec.modality == "auto" else spec.modality
    if modality == "image" and not vision:
        raise LLMError(f"model {spec.model} has no vision tower (no vision_config in its config), so it "
                       "cannot compute image features; use a vision-language model (e.g. python -m "
                       "utils.testing.tiny_vlm runs/tiny_vlm) or --modality text")
    return spec.replace(modality=modality).validate()


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


def chat_template_options(template: Any, thinking: bool) -> dict[str, Any]:
    """Extra chat-template arguments: Qwen3-style templates open a <think> block unless told not to,
    so ``enable_thinking`` is passed, only to templates that read the switch (others render
    exactly as before)."""
    template = template or ""
    return {"enable_thinking": thinking} if isinstance(template, str) and "enable_thinking" in template else {}


class PromptBuilder:
    """Texts -> prompt strings -> token ids, the same way for every backend."""

    def __init__(self, spec: LLMSpec, tokenizer):
        self.spec = spec
        self.tokenizer = tokenizer
        self.uses_chat_template = (spec.system_prompt is not None
                                   and bool(getattr(tokenizer, "chat_template", None)))
        self.chat_options = chat_template_options(getattr(tokenizer, "chat_template", None), spec.thinking)

    def prompt(self, text: str) -> str:
        """The exact string handed to the tokenizer for ``text``."""
        user = self.spec.template.replace("{text}", text)
        if self.spec.system_prompt is None:
            return user
        if self.uses_chat_template:
            messages = [{"role": "system", "content": self.spec.system_prompt},
                        {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True,
                                                      **self.chat_options)
        return self.spec.system_prompt + _SYSTEM_SEPARATOR + user

    def encode(self, texts: Sequence[str], first: int = 0) -> list[list[int]]:
        """Token ids per text; raises when one is longer than ``max_length``. ``first`` is the
        index of ``texts[0]`` in the caller's whole list (chunks), so errors name the right prompt."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        prompts = [self.prompt(t) for t in texts]
        if not prompts:
            return []
        # A rendered chat template already holds its special tokens.
        ids = self.tokenizer(prompts, add_special_tokens=not self.uses_chat_template)["input_ids"]
        for i, row in enumerate(ids, start=first):
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


def prompt_chunks(sizes: Sequence[int], max_rows: int | None = None,
                  max_size: int | None = None) -> Iterator[slice]:
    """Consecutive slices of prompts, each with at most ``max_rows`` prompts (default
    :data:`ENGINE_CHUNK_ROWS`) and, with ``max_size``, a total of ``sizes`` (per prompt: tokens,
    bytes, ...) of at most ``max_size``; a single prompt over ``max_size`` gets a slice of its own
    (callers that cannot take it check first).

    What bounds an engine call's memory: the rows for engines that answer one vector per prompt,
    the tokens (or bytes) for engines that answer one vector per token."""
    max_rows = ENGINE_CHUNK_ROWS if max_rows is None else max_rows
    start, total = 0, 0
    for i, size in enumerate(sizes):
        full = i - start >= max_rows or (max_size is not None and total + size > max_size)
        if full and i > start:
            yield slice(start, i)
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield slice(start, len(sizes))


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


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))


def model_revision(model: str, probe_bytes: int = 1 << 20) -> str | None:
    """Which exact weights ``model`` names: a hub snapshot's commit hash, or for a local folder
    ``local:`` + a hash of config.json and, per weight file, its name, size and first and last
    ``probe_bytes`` (reading whole multi-GB checkpoints on every load would cost more than it
    protects against). None for a hub id that is not downloaded yet: the worker that loads it
    fills it in. Why: "Qwen/Qwen3-4B" names a moving target, and two folders with the same
    name can hold different checkpoints."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        if folder.parent.name == "snapshots":  # a path inside the Hugging Face cache
            return folder.name
        digest = hashlib.sha256()
        config = folder / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for path in _weight_files(folder):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(probe_bytes))
                if size > probe_bytes:
                    handle.seek(max(probe_bytes, size - probe_bytes))
                    digest.update(handle.read(probe_bytes))
        return "local:" + digest.hexdigest()[:16]
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(model, "config.json")
    return Path(cached).parent.name if isinstance(cached, str) else None


def identity(spec: LLMSpec, *, cuda_available: bool | None = None) -> dict[str, Any]:
    """What decides a hidden state beyond the spec's own fields, as resolved *here*.

    ``compute_dtype`` is ``auto`` resolved for the device the backend uses (the GPU engines always
    run on CUDA), ``backend`` the engine and ``model_revision`` :func:`model_revision`. Called
    where the model loads: a manifest written before that keeps ``auto`` and None."""
    if spec.backend in GPU_BACKENDS:
        device = "cuda"
    else:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        device = _resolve_device(spec, cuda_available)
    return {"backend": spec.backend, "compute_dtype": _resolve_dtype(spec, device),
            "model_revision": model_revision(spec.model)}


RESOLVED_FIELDS = ("backend", "compute_dtype", "model_revision")
""":func:`identity`'s fields, part of every feature identity (labelled datasets' labels blocks,
offline checkpoints, PPO-LLM run folders, the hidden-state server's /health). Records written
before they were recorded lack them; records written before a model was loaded (a freshly
enqueued labels block) or by a spec with ``dtype="auto"`` hold ``auto`` / None."""
IMAGE_FIELDS = ("modality", "image_processor")
"""What image features add to an identity: the modality and :func:`utils.llm.vision.processor_fingerprint`
(how frames are resized and normalised). Records without ``modality`` are of text features."""
_IDENTITY_DEFAULTS = {"modality": "text"}


def is_resolved(value: Any) -> bool:
    """Whether a recorded identity value is known: not missing (None) and not ``auto``."""
    return value is not None and value != "auto"


def identity_differences(recorded: dict[str, Any], current: dict[str, Any],
                         fields: Sequence[str]) -> tuple[list[str], list[str]]:
    """How ``current`` (the features about to be computed) differs from ``recorded`` (what a
    dataset, checkpoint or run folder was made with) over ``fields``: ``(differences, unchecked)``.

    The one rule every consumer of recorded features follows: each field must be equal, except
    that a :data:`RESOLVED_FIELDS` field ``recorded`` lacks or holds unresolved (``auto``, None)
    is *unchecked* (a record made before these fields existed still loads; callers print a note
    naming them). A resolved recorded value against an unknown current one (a server too old to
    report it) is a difference. ``differences`` read ``"field: recorded -> current"``."""
    differences, unchecked = [], []
    for key in fields:
        default = _IDENTITY_DEFAULTS.get(key)  # a record without a modality is of text features
        was, now = recorded.get(key, default), current.get(key, default)
        if key in RESOLVED_FIELDS and not is_resolved(was):
            unchecked.append(key)
        elif was != now:
            differences.append(f"{key}: {was!r} -> {now!r}")
    return differences, unchecked


def feature_identity(spec: LLMSpec, backend: Any) -> dict[str, Any]:
    """Everything that says what ``backend``'s vectors are, as the server reports it with every
    answer: the spec's fields, the layer index and dim, what the backend resolved where its model
    loaded (:data:`RESOLVED_FIELDS`) and the modality (with the image processor for images).

    ``spec`` may still say ``modality="auto"``; the backend's modality decides it (a stand-in
    without one computes text features)."""
    resolved = getattr(backend, "identity", None) or identity(spec)
    modality = resolved.get("modality", "text")
    if spec.modality != modality:
        spec = spec.replace(modality=modality)
    layer_index = getattr(backend, "layer_index", None)
    if layer_index is None:
        layer_index = resolve_layer(spec.layer, backend.num_layers, spec.model)
    return {"model": spec.model, "layer": spec.layer, "layer_index": int(layer_index),
            "pooling": spec.pooling, "template_hash": spec.template_hash(),
            "dim": int(backend.hidden_size), "thinking": bool(spec.thinking),
            **{k: resolved.get(k) for k in RESOLVED_FIELDS},
            "modality": modality, "image_processor": resolved.get("image_processor")}


def check_identity(recorded: dict[str, Any], current: dict[str, Any], fields: Sequence[str], *,
                   subject: str, fix: str) -> list[str]:
    """Raise LLMError when ``current`` features differ from ``recorded`` ones in any of ``fields``
    (:func:`identity_differences`): ``"{subject} was made with other LLM features than these
    (field: recorded -> current; ...); {fix}"``.
    Prints a note for the fields ``recorded`` does not hold and returns them."""
    differences, unchecked = identity_differences(recorded, current, fields)
    if differences:
        raise LLMError(f"{subject} was made with other LLM features than these "
                       f"({'; '.join(differences)}); {fix}")
    if unchecked:
        print(f"note: {subject} does not record the features' {', '.join(unchecked)} (saved before "
              "they were recorded, or never resolved), so those are not checked", file=sys.stderr)
    return unchecked


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def truncation_overrides(config, keep: int) -> dict[str, Any]:
    """Config fields that make a model with ``keep`` decoder layers (for layer ``keep``'s output).

    Per-layer lists (``layer_types``) are cut to match, or a newer transformers/vLLM refuses a
    config whose list is longer than its layer count."""
    text = _text_config(config)
    overrides: dict[str, Any] = {"num_hidden_layers": keep}
    layer_types = getattr(text, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        overrides["layer_types"] = list(layer_types[:keep])
    return overrides


def pool_states(states, mask, pooling: str):
    """[batch, tokens, D] torch states (left-padded; ``mask`` 1 on real tokens) -> float32 [batch, D].

    Mean pooling sums in float32: a bf16 sum over hundreds of tokens loses the low bits that
    distinguish similar observations. ``where``, not a product: padded positions may hold NaN."""
    import torch

    if pooling == "last":
        return states[:, -1].float()
    keep = mask.bool().unsqueeze(-1)
    return torch.where(keep, states.float(), 0.0).sum(1) / mask.sum(1, keepdim=True).float()


def decoder_of(model):
    """The decoder stack (``layers``, final ``norm``) of a causal LM or of a vision-language model,
    whose base model holds it as ``language_model`` next to the vision tower."""
    base = model.base_model
    return getattr(base, "language_model", base)


class TransformersBackend:
    """Hugging Face transformers on CPU or GPU: batched, left-padded, explicit position ids."""

    modality = "text"

    def __init__(self, spec: LLMSpec):
        from transformers import AutoModelForCausalLM

        self._resolve(spec)
        self.tokenizer = load_tokenizer(spec.model)
        self.prompts = PromptBuilder(spec, self.tokenizer)
        self.model = self._load(AutoModelForCausalLM, self.loaded_layers).to(self.device).eval()

    def _resolve(self, spec: LLMSpec) -> None:
        """Dims, layer, device, dtype and identity, from the config alone: what every transformers
        backend (text or image) settles before it loads any weights."""
        import torch

        self.spec = spec.validate()
        self.num_layers, self.hidden_size = model_dims(spec.model)
        self.layer_index = resolve_layer(spec.layer, self.num_layers, spec.model)
        self.device = _resolve_device(spec, torch.cuda.is_available())
        self.dtype = _resolve_dtype(spec, self.device)
        self.identity = {**identity(spec, cuda_available=torch.cuda.is_available()),
                         "compute_dtype": self.dtype}
        self._torch = torch
        # Layer k < num_layers needs only k decoder layers (1 for the embeddings): load no more.
        self.loaded_layers = (self.num_layers if self.layer_index == self.num_layers
                              else max(self.layer_index, 1))

    def _load(self, auto_class, keep: int):
        """The model with its first ``keep`` decoder layers; without the final norm when truncated,
        so the last output is the raw residual stream of layer ``keep``, like hidden_states[keep]."""
        from transformers import AutoConfig

        path = os.path.expanduser(self.spec.model)
        try:
            config = AutoConfig.from_pretrained(path)
            if keep < self.num_layers:
                overrides = truncation_overrides(config, keep)
                target = _text_config(config)
                for key, value in overrides.items():
                    setattr(target, key, value)
            model = auto_class.from_pretrained(path, config=config,
                                               dtype=getattr(self._torch, self.dtype))
        except (OSError, ValueError, KeyError) as exc:
            raise _load_failure(self.spec.model, "weights", exc) from exc
        if keep < self.num_layers:
            decoder = decoder_of(model)
            layers = len(decoder.layers)
            if layers != keep:
                raise LLMError(f"model {self.spec.model} loaded {layers} decoder layers when "
                               f"{keep} were asked for; use the last layer (-1)")
            decoder.norm = self._torch.nn.Identity()
        return model

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

    def _require_open(self) -> None:
        if self.model is None:
            raise LLMError(f"this backend of {self.spec.model} was closed; make a new one with make_backend")

    def close(self) -> None:
        """Drop the model now (and give its GPU memory back to the driver's cache)."""
        if getattr(self, "model", None) is None:
            return
        self.model = None
        if str(self.device).startswith("cuda"):
            self._torch.cuda.empty_cache()

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        self._require_open()
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        out = np.empty((len(texts), self.hidden_size), dtype=np.float32)
        # Tokenized ENGINE_CHUNK_ROWS texts at a time: a shard's token ids never exist all at once.
        for rows in prompt_chunks([0] * len(texts)):
            out[rows] = self._hidden_states(self.prompts.encode(texts[rows], first=rows.start))
        return _check_finite(out, f"model {self.spec.model}")

    def _hidden_states(self, ids: list[list[int]]) -> np.ndarray:
        torch = self._torch
        out = np.empty((len(ids), self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for batch in _length_batches(ids, self.spec.batch_size):
                input_ids, mask, positions = self._pad([ids[i] for i in batch])
                # The base model skips the LM head: no [batch, tokens, vocab] logits to compute.
                # Its last output is the wanted layer (truncated model, no final norm) except for
                # the embeddings, which only the hidden_states tuple holds.
                embeddings = self.layer_index == 0
                result = self.model.base_model(input_ids=input_ids, attention_mask=mask,
                                               position_ids=positions, use_cache=False,
                                               output_hidden_states=embeddings)
                states = result.hidden_states[0] if embeddings else result.last_hidden_state
                out[batch] = pool_states(states, mask, self.spec.pooling).cpu().numpy()
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        torch = self._torch
        self._require_open()
        if self.loaded_layers < self.num_layers:
            raise LLMError(f"this backend loaded {self.loaded_layers} of {self.num_layers} layers for "
                           f"layer {self.spec.layer}'s hidden states and cannot generate; load the "
                           "model for generation with layer -1")
        if isinstance(prompts, str):
            raise TypeError("pass a sequence of prompts, not a single string")
        texts: list[str] = [""] * len(prompts)
        sampling = ({"do_sample": True, "temperature": float(temperature)} if temperature > 0
                    else {"do_sample": False})
        with torch.inference_mode():
            for rows in prompt_chunks([0] * len(prompts)):
                ids = self.prompts.encode(prompts[rows], first=rows.start)
                for batch in _length_batches(ids, self.spec.batch_size):
                    input_ids, mask, _ = self._pad([ids[i] for i in batch])
                    generated = self.model.generate(
                        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id, **sampling)
                    new_tokens = generated[:, input_ids.shape[1]:]
                    for i, row in zip(batch, new_tokens):
                        texts[rows.start + i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return texts


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def make_backend(spec: LLMSpec, *, hidden_states: bool = True,
                 engine_options: dict[str, Any] | None = None) -> LLMBackend:
    """Load the model ``spec`` names with its backend (once; reuse the returned object).

    ``hidden_states=False`` is for generation-only users (LLM play): the vLLM backend then does not
    start its hidden-state engine up front (transformers uses one model for both anyway).
    ``engine_options`` go to the GPU engine's constructor as they are (e.g. ``load_format="dummy"``
    for throughput checks with random weights); the transformers backend takes none."""
    if spec.validate().backend == "transformers" and engine_options:
        raise LLMError(f"engine options {sorted(engine_options)} are for the vllm and sglang "
                       "backends; the transformers backend takes none")
    spec = resolve_modality(spec)
    if spec.modality == "image":
        return _make_vision_backend(spec, engine_options)
    if spec.backend == "vllm":
        from utils.llm.vllm_engine import VLLMBackend

        return VLLMBackend(spec, hidden_states=hidden_states, engine_options=engine_options)
    if spec.backend == "sglang":
        from utils.llm.sglang_engine import SGLangBackend

        return SGLangBackend(spec, hidden_states=hidden_states, engine_options=engine_options)
    return TransformersBackend(spec)


def _make_vision_backend(spec: LLMSpec, engine_options: dict[str, Any] | None) -> LLMBackend:
    """The image-feature backend of a resolved ``spec`` (``utils/llm/vision*.py``)."""
    if spec.backend == "vllm":
        from utils.llm.vision_vllm import VLLMVisionBackend

        return VLLMVisionBackend(spec, engine_options=engine_options)
    if spec.backend != "transformers":
        raise LLMError(f"image features run on the transformers or vllm backend, not {spec.backend}; "
                       "pass --backend transformers or --backend vllm")
    from utils.llm.vision import TransformersVisionBackend

    return TransformersVisionBackend(spec)


def check_spec(spec: LLMSpec) -> tuple[int, int]:
    """Validate ``spec`` against the model's config without loading weights (for enqueueing).

    Returns (num_layers, hidden_size). The GPU and vLLM checks happen where the model loads."""
    num_layers, hidden_size = model_dims(spec.validate().model)
    resolve_layer(spec.layer, num_layers, spec.model)
    resolve_modality(spec)
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


def pool_token_states(states: np.ndarray, pooling: str) -> np.ndarray:
    """[tokens, D] -> float32 [D] by the spec's pooling rule (for engines that return every token)."""
    states = np.asarray(states, dtype=np.float32)
    return states[-1] if pooling == "last" else states.mean(axis=0, dtype=np.float32)


def check_not_unit_norm(rows: np.ndarray, engine: str) -> None:
    """Raise when every row has L2 norm 1: the engine normalised the states (an embedding
    default) and they would not equal the transformers backend's. Raw hidden states of a real
    model have norms far from 1 (the final RMS norm alone gives about sqrt(hidden_size))."""
    norms = np.linalg.norm(np.asarray(rows, dtype=np.float64), axis=1)
    if len(norms) and np.allclose(norms, 1.0, atol=1e-3):
        raise LLMError(f"{engine} returned unit-norm hidden states (L2-normalised embeddings): the "
                       "installed version has a normalisation switch this code does not turn off; "
                       "use --backend transformers or another engine version")


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes free for this user in ``folder``'s file system (0 when it cannot be read)."""
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return 0


def shm_dir(min_free_bytes: int = 0) -> str | None:
    """/dev/shm when it is a writable folder with at least ``min_free_bytes`` free (files there
    never touch a disk), else None (the system temp folder). Docker gives containers a 64 MB
    /dev/shm by default: writable, but too small for a chunk of hidden-state files."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    return str(shm) if free_bytes(shm) >= min_free_bytes else None


def close_backend(backend: Any) -> None:
    """``backend.close()`` when it has one (stand-ins may not); a failure is a warning, so closing
    on the way out never hides the error that caused it."""
    close = getattr(backend, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as exc:  # noqa: BLE001 -- reported, and the caller goes on shutting down
        print(f"warning: closing the {getattr(getattr(backend, 'spec', None), 'backend', 'LLM')} backend "
              f"failed ({type(exc).__name__}: {exc})", file=sys.stderr)


def param_names(obj) -> list[str]:
    """Parameter names of a callable, dataclass or msgspec struct, to ask the *installed* engine
    which switches it has instead of assuming one release's API."""
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    fields = getattr(obj, "__struct_fields__", None)
    if fields is not None:
        return list(fields)
    try:
        return list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return []


def engine_memory_fraction(env_name: str) -> float | None:
    """A GPU memory share from ``env_name`` (when one process runs several engines)."""
    value = os.environ.get(env_name)
    if not value:
        return None
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise LLMError(f"{env_name}={value!r} is not a fraction in (0, 1]")
    return fraction


from utils.llm.sglang_engine import (  # noqa: E402
    SGLangBackend,
    require_sglang,
    sglang_engine_options,
    sglang_prompt_states,
)
from utils.llm.vision import TransformersVisionBackend, frame_features  # noqa: E402
from utils.llm.vision_vllm import VLLMVisionBackend  # noqa: E402
from utils.llm.vllm_engine import (  # noqa: E402  (re-exported: one import path for callers)
    VLLMBackend,
    require_vllm,
    vllm_engine_options,
    vllm_pooler_options,
    vllm_pooling_switches,
    vllm_truncation_plan,
)
