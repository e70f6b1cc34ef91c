"""The vLLM backend (GPU only): hidden states and generation behind ``utils.llm``'s interface.

vLLM is imported only when this backend is built, and its API is asked at run time which switches
it has (they were renamed across releases), so one code path serves several vLLM versions:

* **Last layer** (the final-normed state, like transformers' last ``hidden_states`` entry): the
  pooling runner (``runner="pooling", convert="embed"``) with LAST or MEAN pooling and *every*
  normalisation switch the installed ``PoolerConfig`` / ``PoolingParams`` has set to False
  (``normalize`` in older releases, ``use_activation`` since). Embedding runners L2-normalise by
  default; a warm-up request checks that the rows are not unit-norm, so a new switch name cannot
  slip through unnoticed.
* **Layer k < num_layers** (the raw residual stream after decoder layer k): vLLM's hidden-state
  extraction of layer id k (the pre-norm output of layer k), from a model truncated to k decoder
  layers with ``hf_overrides`` (the later layers are never computed) when that can load. vLLM 0.32
  cannot load a checkpoint holding more layers than the model (the dropped layers' weights raise
  ValueError in ``AutoWeightsLoader``; vllm-project/vllm#50898 is not in a release), so
  :func:`vllm_truncation_plan` decides *before* the engine starts, from the checkpoint's weight
  names: truncate with random weights (``load_format="dummy"``) or a checkpoint that holds only the
  kept layers, run the whole model otherwise (same values, slower). One engine start either way;
  ``truncated`` / ``loaded_layers`` / ``truncation_reason`` say which ran, so throughput figures
  can be reported apart.
  vLLM writes one file per prompt ([tokens, 1, D] in the model's dtype) and this code reads and
  deletes them after each call. The calls are chunked so that their files fit in a share of the
  folder's free space (checked with ``shutil.disk_usage`` before every call); the folder is
  /dev/shm when it has room for a few of the longest prompts (Docker's default is 64 MB), else the
  system temp folder.
* **Generation**: a second, full-model engine started on first use.

Every engine call gets at most :data:`utils.llm.ENGINE_CHUNK_ROWS` prompts. ``close()`` shuts
the engines' processes down (vllm.LLM 0.32 has no public shutdown: its engine core client's).
"""

from __future__ import annotations

import gc
import json
import os
import re
import struct
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
    free_bytes,
    identity,
    load_tokenizer,
    model_config,
    model_dims,
    param_names,
    pool_token_states,
    prompt_chunks,
    resolve_layer,
    shm_dir,
    truncation_overrides,
)

NORMALISATION_SWITCHES = ("normalize", "use_activation")
"""Every name vLLM has used for "post-process the pooled vector"; all are turned off."""
WARM_UP_TEXTS = ("warm-up", "a second, longer warm-up prompt")
MEMORY_ENV = "VLLM_GPU_MEMORY_UTILIZATION"
PARTIAL_LOADING_SINCE: tuple[int, ...] | None = None
"""First vLLM release that skips a truncated model's dropped layers when loading a full checkpoint
(vllm-project/vllm#50898); None while no release does (0.32.0 raises)."""
EXTRACT_SHARE = 0.5
"""Share of the extraction folder's free space one call's hidden-state files may fill."""
MAX_EXTRACT_BYTES = 4 << 30
"""Most bytes of hidden-state files one call writes, however much room the folder has."""
MIN_EXTRACT_PROMPTS = 8
"""/dev/shm is used when a call there can hold this many prompts of ``max_length`` tokens."""
FILE_OVERHEAD_BYTES = 8192
"""Per prompt file, beyond its tensors: safetensors header, lock file, file-system blocks."""
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LAYER_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+(?:\.\d+)*)", version or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors file's header (8-byte length, then JSON), no tensor read."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return [name for name in header if name != "__metadata__"]


def _checkpoint_folder(model: str) -> Path | None:
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ("model.safetensors.index.json", "model.safetensors"):
        cached = try_to_load_from_cache(model, name)
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def checkpoint_layers(model: str) -> set[int] | None:
    """Decoder-layer indices the checkpoint of ``model`` holds weights for, read from its
    safetensors index or file headers (no weights loaded); an empty set for a folder without
    weights; None when that cannot be told (a hub id not downloaded yet, .bin weights)."""
    folder = _checkpoint_folder(model)
    if folder is None:
        return None
    try:
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            names = [n for index in indexes for n in json.loads(index.read_text()).get("weight_map", {})]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if any(folder.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth", "*.gguf")) and not files:
                return None
            names = [n for path in files for n in _safetensors_names(path)]
    except (OSError, ValueError, struct.error):
        return None
    return {int(match.group(1)) for name in names if (match := _LAYER_WEIGHT.search(name))}


def vllm_truncation_plan(model: str, layer_index: int, num_layers: int, *,
                         engine_options: dict[str, Any] | None = None,
                         vllm_version: str | None = None) -> tuple[bool, str]:
    """Whether vLLM should run a model truncated to the layers ``layer_index`` needs, and why;
    decided before any engine starts, so a load that would fail never costs an engine start.

    Truncation loads when nothing past the kept layers is in the checkpoint: random weights
    (``load_format="dummy"``), or a checkpoint holding only the kept layers; or when the installed
    vLLM skips the dropped layers' weights itself (:data:`PARTIAL_LOADING_SINCE`). Otherwise the
    whole model runs and the layer is extracted from it (same values)."""
    keep = max(layer_index, 1)
    if layer_index == num_layers:
        return False, "the last layer needs the whole model"
    if (engine_options or {}).get("load_format") == "dummy":
        return True, f"random weights (load_format=dummy): {keep} of {num_layers} layers"
    layers = checkpoint_layers(model)
    if layers is not None and all(index < keep for index in layers):
        return True, f"the checkpoint holds only the first {keep} layers"
    version = _version_tuple(vllm_version)
    if PARTIAL_LOADING_SINCE is not None and version is not None and version >= PARTIAL_LOADING_SINCE:
        return True, f"vLLM {vllm_version} loads the first {keep} layers of a full checkpoint"
    what = "weights of unknown layers" if layers is None else f"weights of {max(layers) + 1} layers"
    return False, (f"vLLM {vllm_version or '?'} cannot load a checkpoint holding {what} into a model "
                   f"truncated to {keep} (vllm-project/vllm#50898): running all {num_layers} layers")


def extract_bytes_per_token(hidden_size: int, dtype: str) -> int:
    """Bytes one prompt token takes in vLLM's hidden-state file: one layer's state in the model's
    dtype plus its int64 token id."""
    return hidden_size * _DTYPE_BYTES.get(dtype, 4) + 8


def extract_budget(folder: str) -> int:
    """Bytes of hidden-state files one call may write into ``folder`` now: a share of its free
    space, capped (checked before every call: other processes use the same folder)."""
    return int(min(free_bytes(folder) * EXTRACT_SHARE, MAX_EXTRACT_BYTES))


def shutdown_engines(engines: list) -> None:
    """Stop ``vllm.LLM`` engines' processes now. vllm.LLM 0.32 has no public shutdown; its engine
    core client's ``shutdown`` stops the engine process, which otherwise lives (holding its GPU
    memory) until the object is garbage-collected. Empties ``engines``."""
    for engine in engines:
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None) or getattr(engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
    engines.clear()
    gc.collect()


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
        self._closed = False
        self.truncated, self.truncation_reason = vllm_truncation_plan(
            spec.model, self.layer_index, self.num_layers, engine_options=self.engine_options,
            vllm_version=getattr(self._vllm, "__version__", None))
        self.loaded_layers = max(self.layer_index, 1) if self.truncated else self.num_layers
        """Decoder layers the hidden-state engine runs (``truncated``: fewer than num_layers)."""
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
        self._require_open()
        options = self._hidden_state_options()
        if not self.truncated:  # decided up front (vllm_truncation_plan): one engine start
            options.pop("hf_overrides", None)
            if self.layer_index < self.num_layers:
                print(f"note: layer {self.spec.layer}: {self.truncation_reason} (same values, slower)",
                      file=sys.stderr)
        self._llm = self._engine(options)
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
        self._bytes_per_token = extract_bytes_per_token(self.hidden_size, _resolve_dtype(self.spec, "cuda"))
        room = MIN_EXTRACT_PROMPTS * (self.spec.max_length * self._bytes_per_token + FILE_OVERHEAD_BYTES)
        self._extract_dir = tempfile.TemporaryDirectory(prefix="vllm-hidden-states-",
                                                        dir=shm_dir(int(room / EXTRACT_SHARE)))
        truncation = truncation_overrides(model_config(self.spec.model), max(self.layer_index, 1))
        return vllm_engine_options(self.spec, self.layer_index, self.num_layers,
                                   extract_dir=self._extract_dir.name, truncation=truncation)

    def _require_open(self) -> None:
        if self._closed:
            raise LLMError(f"this vllm backend of {self.spec.model} was closed; make a new one")

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        self._require_open()
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        out = np.empty((len(texts), self.hidden_size), dtype=np.float32)
        if not len(texts):
            return out
        if self._llm is None:
            self._start_hidden_state_engine()
        for rows in prompt_chunks([0] * len(texts)):
            prompts = [{"prompt_token_ids": row} for row in self.prompts.encode(texts[rows], first=rows.start)]
            if self.layer_index == self.num_layers:
                self._embed(prompts, out[rows], rows.start)
            else:
                self._extract(prompts, out[rows], rows.start)
        return _check_finite(out, f"vLLM model {self.spec.model}")

    def _embed(self, prompts: list[dict], out: np.ndarray, first: int) -> None:
        # No per-request PoolingParams: left unset they take the engine's PoolerConfig, whose
        # switches are all off; setting them per request fails validation on some versions.
        results = self._llm.embed(prompts, use_tqdm=False)
        for i, result in enumerate(results):
            out[i] = self._checked_row(np.asarray(result.outputs.embedding, np.float32), first + i)

    def _extract(self, prompts: list[dict], out: np.ndarray, first: int) -> None:
        """Intermediate layer: calls whose files fit the extraction folder's free space now."""
        folder = self._extract_dir.name
        sizes = [len(p["prompt_token_ids"]) * self._bytes_per_token + FILE_OVERHEAD_BYTES for p in prompts]
        budget = extract_budget(folder)
        if max(sizes) > budget:
            longest = max(len(p["prompt_token_ids"]) for p in prompts)
            raise LLMError(f"{folder} has {free_bytes(folder) / 2**20:.0f} MiB free, too little for vLLM's "
                           f"hidden-state file of one {longest}-token prompt "
                           f"({max(sizes) / 2**20:.1f} MiB, at most {EXTRACT_SHARE:.0%} of the free space "
                           "is used); free space there, enlarge /dev/shm (docker run --shm-size=8g) or "
                           "set TMPDIR to a larger folder")
        sampling = self._vllm.SamplingParams(max_tokens=1)
        for part in prompt_chunks(sizes, max_size=budget):
            results = self._llm.generate(prompts[part], sampling, use_tqdm=False)
            for j, result in enumerate(results, start=part.start):
                states = self._extracted_states(result, first + j, len(prompts[j]["prompt_token_ids"]))
                out[j] = self._checked_row(pool_token_states(states, self.spec.pooling), first + j)

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
        self._require_open()
        if isinstance(prompts, str):
            raise TypeError("pass a sequence of prompts, not a single string")
        if self._generator is None:
            options = {"model": os.path.expanduser(self.spec.model),
                       "dtype": _resolve_dtype(self.spec, "cuda"),
                       "max_model_len": self.spec.max_length, "seed": 0}
            self._generator = self._engine(options)
        sampling = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
        texts: list[str] = []
        for rows in prompt_chunks([0] * len(prompts)):
            ids = self.prompts.encode(prompts[rows], first=rows.start)
            results = self._generator.generate([{"prompt_token_ids": row} for row in ids], sampling,
                                               use_tqdm=False)
            texts += [r.outputs[0].text for r in results]
        return texts

    def close(self) -> None:
        """Shut both engines' processes down (:func:`shutdown_engines`) and delete the extraction
        folder. Idempotent."""
        self._closed = True
        engines = [e for e in (self._llm, self._generator) if e is not None]
        self._llm = self._generator = None
        shutdown_engines(engines)
        if self._extract_dir is not None:
            self._extract_dir.cleanup()
            self._extract_dir = None
