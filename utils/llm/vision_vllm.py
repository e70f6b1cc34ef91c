"""Image features through vLLM (GPU only): frames into the pooling runner as multimodal prompts.

Each frame is one request ``{"prompt": <chat-template prompt with the image placeholder>,
"multi_modal_data": {"image": <PIL image>}}``; the prompt is rendered by the model's own processor
exactly as the transformers backend renders it (``utils.llm.vision.FramePromptBuilder``), and vLLM
expands the placeholder into the image's tokens with the same Hugging Face image processor.
The engine is the text backend's pooling engine (``runner="pooling", convert="embed"``, every
normalisation switch off, ``limit_mm_per_prompt={"image": 1}``), and pooling follows the spec:

* ``last`` / ``mean``: the engine's sequence pooler (LAST / MEAN) through ``LLM.embed``.
* ``image_mean``: the engine serves ``token_embed`` (one pooling task per engine in recent vLLM:
  ``PoolerConfig(task=...)``), ``LLM.encode(..., pooling_task="token_embed")`` returns every
  token's state with the prompt's token ids (image placeholders expanded), and the mean over the
  image token's positions is taken here (``utils.llm.vision.image_token_mean``).

Only the last layer (-1): vLLM's intermediate-layer extraction (``utils.llm.vllm_engine``) does not
take multimodal prompts; use the transformers backend for layer k. A warm-up checks that the
engine did not L2-normalise (per token for ``image_mean``). Written against vLLM 0.32's API (the
project's pin) and not yet run on a GPU here: the CPU tests drive it with a stand-in engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils.frames import as_uint8_frames
from utils.llm import (
    LLMError,
    LLMSpec,
    _check_finite,
    _resolve_dtype,
    check_not_unit_norm,
    engine_memory_fraction,
    identity,
    model_config,
    model_dims,
    param_names,
    prompt_chunks,
    resolve_layer,
    vllm_engine,
)
from utils.llm.vision import (
    FramePromptBuilder,
    ImageOnly,
    frame_envs,
    image_token_id,
    image_token_mean,
    load_processor,
    processor_fingerprint,
)

__all__ = ["VLLMVisionBackend", "vllm_vision_engine_options", "vllm_frame_pooler_options",
           "vllm_frame_requests"]

WARM_UP_FRAMES = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)])
WARM_UP_ENV = "Craftax-Classic-Pixels-v1"


def vllm_frame_pooler_options(pooling: str, config_params: Sequence[str]) -> dict[str, Any]:
    """PoolerConfig arguments for image features: the text rule (``vllm_pooler_options``) for
    ``last``/``mean``; for ``image_mean`` every token's state (the ``token_embed`` task, ALL
    pooling), nothing normalised."""
    if pooling != "image_mean":
        return vllm_engine.vllm_pooler_options(pooling, config_params)
    options = vllm_engine.vllm_pooler_options("last", config_params)
    options.pop("seq_pooling_type", None)
    options.pop("pooling_type", None)
    options["tok_pooling_type" if "tok_pooling_type" in config_params else "pooling_type"] = "ALL"
    if "task" in config_params:  # recent vLLM serves one pooling task per engine
        options["task"] = "token_embed"
    return options


def vllm_vision_engine_options(spec: LLMSpec, *, pooler_params: Sequence[str] = ()) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` that compute ``spec``'s image features (last layer)."""
    return {"model": os.path.expanduser(spec.model), "dtype": _resolve_dtype(spec, "cuda"),
            "max_model_len": spec.max_length, "seed": 0, "runner": "pooling", "convert": "embed",
            "limit_mm_per_prompt": {"image": 1},
            "pooler_config": vllm_frame_pooler_options(spec.pooling, pooler_params)}


def vllm_frame_requests(prompts: FramePromptBuilder, frames: Sequence[np.ndarray],
                        envs: Sequence[str]) -> list[dict[str, Any]]:
    """One multimodal request per frame: the rendered prompt and the frame as an RGB PIL image."""
    from PIL import Image

    return [{"prompt": prompts.prompt(env), "multi_modal_data": {"image": Image.fromarray(frame)}}
            for frame, env in zip(frames, envs)]


def _numpy(data) -> np.ndarray:
    return data.float().cpu().numpy() if hasattr(data, "float") else np.asarray(data, np.float32)


class VLLMVisionBackend(ImageOnly):
    """A vision-language model in vLLM's pooling runner: frames -> last-layer hidden states."""

    modality = "image"

    def __init__(self, spec: LLMSpec, *, engine_options: dict[str, Any] | None = None):
        if spec.modality != "image":
            raise LLMError(f"VLLMVisionBackend computes image features, not {spec.modality!r} ones; "
                           "build backends with utils.llm.make_backend")
        self.spec = spec.validate()
        self._vllm = vllm_engine.require_vllm()
        self.num_layers, self.hidden_size = model_dims(spec.model)
        self.layer_index = resolve_layer(spec.layer, self.num_layers, spec.model)
        if self.layer_index != self.num_layers:
            raise LLMError(f"the vllm backend computes image features of the last layer only (-1), not "
                           f"layer {spec.layer}; use --backend transformers for intermediate layers")
        self.processor = load_processor(spec.model)
        self.prompts = FramePromptBuilder(self.spec, self.processor)
        self.image_token = image_token_id(model_config(spec.model))
        self.identity = {**identity(spec), "modality": "image",
                         "image_processor": processor_fingerprint(self.processor)}
        self.engine_options = dict(engine_options or {})
        self._closed = False
        self._llm = self._engine()
        self._rows(vllm_frame_requests(self.prompts, WARM_UP_FRAMES, [WARM_UP_ENV] * 2), check=True)

    def _engine(self):
        from vllm.config import PoolerConfig

        options = vllm_vision_engine_options(self.spec, pooler_params=param_names(PoolerConfig))
        options = {**options, "pooler_config": PoolerConfig(**options["pooler_config"]),
                   **self.engine_options}
        fraction = engine_memory_fraction(vllm_engine.MEMORY_ENV)
        if fraction:
            options["gpu_memory_utilization"] = fraction
        return self._vllm.LLM(**options)

    def _require_open(self) -> None:
        if self._closed:
            raise LLMError(f"this vllm backend of {self.spec.model} was closed; make a new one")

    def image_hidden_states(self, frames, env_name: str | Sequence[str]) -> np.ndarray:
        """float32 [N, hidden_size] of uint8 frames (as ``TransformersVisionBackend``)."""
        self._require_open()
        frames = as_uint8_frames(frames)
        envs = frame_envs(env_name, len(frames))
        out = np.empty((len(frames), self.hidden_size), dtype=np.float32)
        for rows in prompt_chunks([0] * len(frames)):
            requests = vllm_frame_requests(self.prompts, frames[rows], envs[rows])
            for i, row in enumerate(self._rows(requests), start=rows.start):
                if row.shape != (self.hidden_size,):
                    raise LLMError(f"vLLM returned a vector of shape {row.shape} for frame {i}; "
                                   f"expected ({self.hidden_size},)")
                out[i] = row
        return _check_finite(out, f"vLLM model {self.spec.model}")

    def _rows(self, requests: list[dict[str, Any]], check: bool = False) -> list[np.ndarray]:
        """One pooled float32 vector per request; ``check``: refuse L2-normalised states (warm-up)."""
        if self.spec.pooling != "image_mean":
            rows = [np.asarray(r.outputs.embedding, np.float32)
                    for r in self._llm.embed(requests, use_tqdm=False)]
            if check:
                check_not_unit_norm(np.stack(rows), "vLLM")
            return rows
        rows = []
        for result in self._llm.encode(requests, pooling_task="token_embed", use_tqdm=False):
            states = _numpy(result.outputs.data)
            if check:
                check_not_unit_norm(states, "vLLM")
            rows.append(image_token_mean(states, result.prompt_token_ids, self.image_token))
        return rows

    def close(self) -> None:
        """Shut the engine's processes down now (``vllm_engine.shutdown_engines``). Idempotent."""
        self._closed = True
        engines = [self._llm] if getattr(self, "_llm", None) is not None else []
        self._llm = None
        vllm_engine.shutdown_engines(engines)
