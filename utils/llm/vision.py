"""Image features: a vision-language model's hidden state of a frame, under the text contract.

    spec = LLMSpec(model="Qwen/Qwen2.5-VL-3B-Instruct", pooling="image_mean")   # modality auto -> image
    backend = make_backend(spec)
    feats = frame_features(backend, frames, "Craftax-Classic-Pixels-v1")       # float32 [N, D]

The definitions are the text backends' (``utils.llm``): ``layer`` indexes the language model's
``hidden_states`` (0 the embeddings, the image's embeddings already merged in; -1 the last layer
after the final norm), ``last`` pools the prompt's last token and ``mean`` all its tokens; dtype,
backend and model revision resolve the same way and go into the identity. Image features add:

* ``image_mean`` pooling: the mean over the image's tokens (the positions holding the model's
  image token id), so the vector describes the frame rather than the question after it.
* the prompt (``utils/llm/prompts.py``): the processor's chat template renders ``[system, user]``
  with the image first in the user turn, then the env family's question inside ``--template``.
* the identity's ``modality`` (``image``) and ``image_processor``: a hash of the image processor's
  class and settings (resize, rescale, normalisation), which decide what the model sees as much as
  the weights do. A machine with torchvision gets transformers' torchvision processor, one without
  it the PIL one: their resizing may differ, and the fingerprint says which ran.

Frames of one env and one size give prompts of one length (same words, same number of image
tokens), so a batch holds only such frames and needs no padding: a frame's vector does not depend
on what it was batched with. The model classes come from ``AutoModelForImageTextToText`` and
``AutoProcessor``, so Qwen2-VL / Qwen2.5-VL (image_token_id) and Gemma 3 (image_token_index) load
through the same code; Qwen's processors need torchvision installed (its video processor).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils.errors import UserError
from utils.frames import as_uint8_frames
from utils.llm import (
    LLMError,
    LLMSpec,
    TransformersBackend,
    _check_finite,
    _check_model_location,
    _load_failure,
    chat_template_options,
    model_config,
    pool_states,
)
from utils.llm.prompts import frame_prompt

__all__ = ["TransformersVisionBackend", "FramePromptBuilder", "frame_features", "load_processor",
           "processor_fingerprint", "image_token_id", "frame_batches", "frame_envs",
           "pool_frame_states", "image_token_mean", "text_request_error"]


def frame_features(backend: Any, frames, env_name: str | Sequence[str]) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` (uint8, or env pixel observations in [0, 1]) of ``env_name`` ->
    float32 [N, D]: the one path from a frame to a feature, for a local backend or the
    hidden-state client alike (both have ``image_hidden_states``)."""
    return backend.image_hidden_states(as_uint8_frames(frames), env_name)


def text_request_error(model: str) -> LLMError:
    """Why an image-feature backend refuses texts (one line, with the fix)."""
    return LLMError(f"model {model} computes image features (modality image): send frames "
                    "(image_hidden_states, utils.llm.frame_features), or load it with --modality text "
                    "for text features")


def load_processor(model: str):
    """The model's ``AutoProcessor`` (tokenizer, image processor and chat template together)."""
    from transformers import AutoProcessor

    _check_model_location(model)
    try:
        processor = AutoProcessor.from_pretrained(os.path.expanduser(model))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise _load_failure(model, "processor", exc) from exc
    if getattr(processor, "image_processor", None) is None:
        raise LLMError(f"the processor of {model} has no image processor; is it a vision-language model?")
    return processor


def processor_fingerprint(processor) -> str:
    """Class and settings of the image processor, hashed: what a frame becomes before the model."""
    image_processor = processor.image_processor
    settings = {"class": type(image_processor).__name__, **image_processor.to_dict()}
    payload = json.dumps(settings, sort_keys=True, default=str)
    return type(image_processor).__name__ + ":" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def image_token_id(config) -> int:
    """The token id that stands for one image position in the prompt (Qwen-VL: image_token_id;
    Gemma 3: image_token_index)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise LLMError("the model's config names no image token (image_token_id / image_token_index), "
                   "so image positions cannot be found; this vision-language model is not supported")


def frame_envs(env_name: str | Sequence[str], count: int) -> list[str]:
    """One env name per frame (``env_name`` given once, or per frame); each has a prompt family."""
    envs = [env_name] * count if isinstance(env_name, str) else list(env_name)
    if len(envs) != count:
        raise LLMError(f"{len(envs)} env names for {count} frames; give one, or one per frame")
    for env in dict.fromkeys(envs):
        try:
            frame_prompt(env)  # an unknown env is refused here, before any model call
        except UserError as error:
            raise LLMError(str(error)) from None
    return envs


def frame_batches(frames: Sequence[np.ndarray], envs: Sequence[str], batch_size: int) -> list[list[int]]:
    """Frame indices in batches of at most ``batch_size`` sharing env and size, so every prompt of a
    batch has the same length and none is padded; first appearance order."""
    groups: dict[tuple, list[int]] = {}
    for i, (frame, env) in enumerate(zip(frames, envs)):
        groups.setdefault((env, frame.shape), []).append(i)
    return [rows[k:k + batch_size] for rows in groups.values() for k in range(0, len(rows), batch_size)]


def pool_frame_states(states, input_ids, mask, pooling: str, image_token: int):
    """[batch, tokens, D] torch states -> float32 [batch, D]: ``image_mean`` averages the image's
    positions, ``last``/``mean`` are the text rule (``utils.llm.pool_states``)."""
    if pooling != "image_mean":
        return pool_states(states, mask, pooling)
    image = (input_ids == image_token) & mask.bool()
    if not bool(image.any(dim=1).all()):
        raise LLMError("a frame's prompt holds no image tokens, so image_mean has nothing to average; "
                       "does the chat template place the image?")
    return pool_states(states, image, "mean")


def image_token_mean(states: np.ndarray, token_ids: Sequence[int], image_token: int) -> np.ndarray:
    """[tokens, D] states of one prompt -> float32 [D]: the mean over its image positions (for
    engines that return every token's state)."""
    image = np.asarray(token_ids) == image_token
    if len(image) != len(states) or not image.any():
        raise LLMError(f"cannot average the image tokens: {int(image.sum())} image positions among "
                       f"{len(token_ids)} token ids for {len(states)} states")
    return np.asarray(states, dtype=np.float32)[image].mean(axis=0, dtype=np.float32)


class FramePromptBuilder:
    """Env name -> the prompt string one frame of that env gets (its image placeholder included),
    the same for every backend: the processor's chat template renders it."""

    def __init__(self, spec: LLMSpec, processor):
        template = getattr(processor, "chat_template", None)
        if not template:
            raise LLMError(f"the processor of {spec.model} has no chat template, which is where a "
                           "vision-language model's image tokens are placed; use a chat (instruct) model")
        self.spec, self.processor = spec, processor
        self.chat_options = chat_template_options(template, spec.thinking)
        self._prompts: dict[str, str] = {}

    def messages(self, env_name: str) -> list[dict[str, Any]]:
        """``[system, user]``: the spec's system prompt (else the family's), then the image and the
        family's question inside the spec's template."""
        words = frame_prompt(env_name)
        system = self.spec.system_prompt if self.spec.system_prompt is not None else words.system
        question = self.spec.template.replace("{text}", words.question)
        return [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def prompt(self, env_name: str) -> str:
        if env_name not in self._prompts:
            self._prompts[env_name] = self.processor.apply_chat_template(
                self.messages(env_name), tokenize=False, add_generation_prompt=True, **self.chat_options)
        return self._prompts[env_name]


class ImageOnly:
    """What an image backend answers to the text half of the backend interface: a clear refusal."""

    spec: Any

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        raise text_request_error(self.spec.model)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[str]:
        raise LLMError(f"this backend computes image features of {self.spec.model}; it does not generate")


class TransformersVisionBackend(ImageOnly, TransformersBackend):
    """A vision-language model through transformers (CPU or GPU): frames -> hidden states.

    Loads ``AutoProcessor`` and ``AutoModelForImageTextToText``; an intermediate layer loads only
    the decoder layers it needs, like the text backend (the vision tower always loads whole)."""

    modality = "image"

    def __init__(self, spec: LLMSpec):
        from transformers import AutoModelForImageTextToText

        if spec.modality != "image":
            raise LLMError(f"TransformersVisionBackend computes image features, not {spec.modality!r} "
                           "ones; build backends with utils.llm.make_backend")
        self._resolve(spec)
        self.processor = load_processor(spec.model)
        self.tokenizer = self.processor.tokenizer
        self.prompts = FramePromptBuilder(self.spec, self.processor)
        self.image_token = image_token_id(model_config(spec.model))
        self.identity = {**self.identity, "modality": "image",
                         "image_processor": processor_fingerprint(self.processor)}
        self.model = self._load(AutoModelForImageTextToText, self.loaded_layers).to(self.device).eval()

    def image_hidden_states(self, frames, env_name: str | Sequence[str]) -> np.ndarray:
        """float32 [N, hidden_size] of uint8 frames ``[N, H, W, 3]`` (or a list of frames of
        different sizes), each prompted for ``env_name`` (one name, or one per frame)."""
        self._require_open()
        frames = as_uint8_frames(frames)
        envs = frame_envs(env_name, len(frames))
        out = np.empty((len(frames), self.hidden_size), dtype=np.float32)
        for rows in frame_batches(frames, envs, self.spec.batch_size):
            out[rows] = self._frame_states([frames[i] for i in rows], envs[rows[0]], rows[0])
        return _check_finite(out, f"model {self.spec.model}")

    def _inputs(self, frames: list[np.ndarray], env_name: str, first: int) -> dict[str, Any]:
        """Processor outputs for frames of one env and size, on the device, floats in the model's dtype."""
        from PIL import Image

        prompt = self.prompts.prompt(env_name)
        images = [[Image.fromarray(frame)] for frame in frames]
        inputs = self.processor(text=[prompt] * len(frames), images=images, return_tensors="pt")
        tokens = inputs["input_ids"].shape[1]
        if tokens > self.spec.max_length:
            raise LLMError(f"frame {first}'s prompt has {tokens} tokens (image included), more than "
                           f"max_length {self.spec.max_length}; raise --max-length or send smaller frames")
        if not bool(inputs["attention_mask"].all()):
            raise RuntimeError("frames of one env and size gave prompts of different lengths")
        dtype = getattr(self._torch, self.dtype)
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def _frame_states(self, frames: list[np.ndarray], env_name: str, first: int) -> np.ndarray:
        inputs = self._inputs(frames, env_name, first)
        embeddings = self.layer_index == 0  # only the hidden_states tuple holds them
        with self._torch.inference_mode():
            result = self.model.base_model(**inputs, use_cache=False, output_hidden_states=embeddings)
        states = result.hidden_states[0] if embeddings else result.last_hidden_state
        pooled = pool_frame_states(states, inputs["input_ids"], inputs["attention_mask"],
                                   self.spec.pooling, self.image_token)
        return pooled.cpu().numpy()
