"""Request and response models of the hidden-state server: the wire format, and its OpenAPI schema.

Typed pydantic models make FastAPI validate every request before it reaches the model and list
every field in ``/openapi.json``. Unknown fields are refused (``extra="forbid"``) so a typo such as
``"text"`` for ``"texts"`` is an error that names the field, not a silently ignored key.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from utils.llm.prompts import FRAME_ENV_NAMES
from utils.text_obs import TEXT_ENV_NAMES

# Literal over the renderer's own list: the schema enumerates exactly the envs that have a text.
EnvName = Literal[TEXT_ENV_NAMES]  # type: ignore[valid-type]
# Frames of every env have a prompt (utils/llm/prompts.py).
FrameEnvName = Literal[FRAME_ENV_NAMES]  # type: ignore[valid-type]
Pooling = Literal["last", "mean", "image_mean"]
Modality = Literal["text", "image"]


# "Exactly one of" in the schema itself, so a client generated from /openapi.json (or a schema fuzzer)
# never builds a body the validator below refuses. The wire format stays one flat object: each branch
# only says which fields hold a value there (JSON Schema's "properties" apply to keys that are present,
# so a field may be absent or null, as the validator allows). The branches exclude each other on
# "texts" (array in one, null in the other), so "oneOf" and the validator agree on every body.
ONE_INPUT_SCHEMA = [
    {"title": "texts", "required": ["texts"],
     "properties": {"texts": {"type": "array"}, "observations": {"type": "null"}, "env": {"type": "null"}}},
    {"title": "observations", "required": ["observations", "env"],
     "properties": {"observations": {"type": "array"}, "env": {"type": "string"}, "texts": {"type": "null"}}},
]


class HiddenStatesRequest(BaseModel):
    """Either ``texts``, or ``observations`` with their ``env``: never both, never neither."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": ONE_INPUT_SCHEMA,
                           "examples": [{"texts": ["Health 9, food 9, drink 9, energy 9."]}]},
    )

    texts: Optional[list[str]] = Field(
        default=None, min_length=1,
        description="Texts to embed; the server applies its prompt template to each.")
    observations: Optional[list[list[float]]] = Field(
        default=None, min_length=1,
        description="Flat symbolic observations, one list per observation, rendered to the "
                    "canonical text (utils/text_obs.py) on the server.")
    env: Optional[EnvName] = Field(
        default=None, description="Env the observations come from (required with observations).")
    return_texts: bool = Field(
        default=False, description="Also return the text each vector was computed from.")

    @model_validator(mode="after")
    def _one_input(self) -> "HiddenStatesRequest":
        if (self.texts is None) == (self.observations is None):
            raise ValueError("give exactly one of 'texts' or 'observations' (with 'env')"
                             + (", not both" if self.texts is not None else ""))
        if self.observations is not None and self.env is None:
            raise ValueError(f"'observations' need 'env': one of {', '.join(TEXT_ENV_NAMES)}")
        if self.texts is not None and self.env is not None:
            raise ValueError("'env' goes with 'observations'; texts are embedded as they are")
        return self

    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.observations or [])


class ImageHiddenStatesRequest(BaseModel):
    """Frames of one env as base64-encoded PNG files (the JSON form of the image endpoint; raw uint8
    frames and single PNG files go as binary bodies)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"env": "Craftax-Classic-Pixels-v1", "images": ["iVBORw0KGgo..."]}]},
    )

    env: FrameEnvName = Field(description="Env the frames come from; it picks the prompt.")
    images: list[str] = Field(min_length=1, description="Base64-encoded PNG files, one per frame.")

    @model_validator(mode="before")
    @classmethod
    def _no_text_inputs(cls, value):
        if isinstance(value, dict) and ({"texts", "observations"} & set(value)):
            raise ValueError("texts and observations go to /v1/hidden_states; this endpoint takes "
                             "'images' (base64 PNG) with their 'env'")
        return value


class HiddenStatesResponse(BaseModel):
    """The vectors, in request order, and what produced them."""

    model: str = Field(description="Model folder or hub id the server loaded.")
    layer: int = Field(description="Layer as configured (negative counts from the end).")
    layer_index: int = Field(description="Index into transformers' hidden_states: 0 = embeddings.")
    pooling: Pooling = Field(description="How token states became one vector.")
    template_hash: str = Field(description="Hash of the prompt template and system prompt.")
    dim: int = Field(description="Length of each vector (the model's hidden size).")
    thinking: bool = Field(default=False, description="Qwen3-style enable_thinking (in the template hash when on).")
    backend: Optional[str] = Field(default=None, description="Engine: transformers, vllm or sglang.")
    compute_dtype: Optional[str] = Field(
        default=None, description="Resolved compute dtype (float32, bfloat16 or float16), never 'auto'.")
    model_revision: Optional[str] = Field(
        default=None, description="Hub snapshot commit, or 'local:' + a fingerprint of a local folder.")
    modality: Modality = Field(default="text", description="Features of texts or of images (frames).")
    image_processor: Optional[str] = Field(
        default=None, description="Image features: the image processor's class and a hash of its settings.")
    count: int = Field(description="Number of vectors (= texts, observations or frames sent).")
    vectors: list[list[float]] = Field(description="float32 hidden states, [count, dim].")
    texts: Optional[list[str]] = Field(
        default=None, description="The canonical texts, when return_texts was set.")


class HealthResponse(BaseModel):
    """The server is up and its model is loaded; what it computes, how it batches, its limits.
    With status "failing" (HTTP 503) the last model calls all failed and ``detail`` says why."""

    status: Literal["ok", "failing"] = "ok"
    detail: Optional[str] = Field(default=None, description="Why the status is failing.")
    model: str
    layer: int
    layer_index: int
    num_layers: int
    pooling: Pooling
    template: str
    system_prompt: Optional[str]
    template_hash: str
    thinking: bool = False
    backend: str
    compute_dtype: Optional[str] = Field(
        default=None, description="Resolved compute dtype (float32, bfloat16 or float16), never 'auto'.")
    model_revision: Optional[str] = Field(
        default=None, description="Hub snapshot commit, or 'local:' + a fingerprint of a local folder.")
    dim: int
    modality: Modality = Field(default="text", description="text: POST /v1/hidden_states; image: "
                                                           "POST /v1/image_hidden_states.")
    image_processor: Optional[str] = Field(
        default=None, description="Image features: the image processor's class and a hash of its settings.")
    max_batch: int = Field(description="Most texts, observations or frames one request may carry.")
    max_wait_ms: float = Field(description="How long a batch waits for more requests.")
    envs: list[str] = Field(description="Envs whose observations (text) or frames (image) the server takes.")
    max_body_bytes: int = Field(description="Largest request body; larger gets 413 unread.")
    max_text_chars: int = Field(description="Longest text in characters; longer gets 413.")
    max_image_bytes: int = Field(default=0, description="Largest PNG frame in bytes; larger gets 413 undecoded.")
    max_image_pixels: int = Field(default=0, description="Most pixels of one frame; more get 413 undecoded.")
    max_queue: int = Field(description="Most texts waiting for the model; more get 429.")
    queued: int = Field(description="Texts waiting for the model now.")
    request_timeout_s: float = Field(description="Deadline of a request; past it, 504.")


class StatsResponse(BaseModel):
    """Counters since start: how well requests were gathered into model calls."""

    requests: int
    texts: int
    batches: int = Field(description="Model calls.")
    mean_batch: float = Field(description="Texts per model call.")
    batch_sizes: dict[int, int] = Field(description="Texts per model call -> number of calls.")
    model_seconds: float = Field(description="Seconds spent in model calls.")
    queued: int = Field(description="Texts waiting for the model now.")
    rejected: int = Field(description="Requests refused with 429 (queue full).")
    dropped: int = Field(description="Requests given up uncomputed: client gone or deadline passed.")
    failed_in_a_row: int = Field(description="Model calls failing since the last one that worked.")
    last_error: Optional[str] = Field(description="The most recent model failure.")


class ErrorItem(BaseModel):
    loc: list[Union[str, int]] = Field(description="Where in the request, e.g. ['body', 'texts', 0].")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one line saying what is wrong and how to fix it."""

    detail: str
    errors: Optional[list[ErrorItem]] = Field(
        default=None, description="Each validation problem, for 422 answers to invalid fields.")


__all__ = ["HiddenStatesRequest", "ImageHiddenStatesRequest", "HiddenStatesResponse", "HealthResponse",
           "StatsResponse", "ErrorResponse", "ErrorItem", "EnvName", "FrameEnvName"]
