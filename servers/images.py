"""Frames out of a request body, every size limit checked before anything is decoded.

``POST /v1/image_hidden_states`` takes three bodies (``utils/hidden_state_client.py`` defines
the raw format, ``servers/schemas.py`` the JSON one):

* ``application/octet-stream``: raw uint8 frames, shape in ``X-Shape`` (``N,height,width,3``),
  ``X-Dtype: uint8``, env in ``X-Env``. The headers give every frame's size before the body is
  looked at.
* ``image/png``: one PNG file, env in ``X-Env``.
* ``application/json``: ``{"env": ..., "images": ["<base64 PNG>", ...]}``.

A PNG's size comes from its IHDR header (``utils.frames.png_dimensions``), a base64 string's from
its length, so an oversized image gets 413 before it is decoded or even base64-decoded; a body that
does not decode as a PNG gets 422. The body as a whole is bounded by ``servers.limits.BodyLimit``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from email.message import Message

import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from servers.limits import MB, Limits
from servers.schemas import ImageHiddenStatesRequest
from utils.frames import FrameError, decode_png, png_dimensions
from utils.hidden_state_client import (
    BINARY_MEDIA_TYPE,
    ENV_HEADER,
    PNG_MEDIA_TYPE,
    WireError,
    decode_frames,
    frame_shape,
)
from utils.llm.prompts import frame_family

__all__ = ["read_frames", "png_frame", "IMAGE_MEDIA_TYPES"]

IMAGE_MEDIA_TYPES = ("application/json", PNG_MEDIA_TYPE, BINARY_MEDIA_TYPE)


def _too_many(count: int, max_batch: int) -> HTTPException:
    return HTTPException(413, f"{count} frames in one request, more than this server's max batch of "
                              f"{max_batch}; split the request (utils.hidden_state_client.HiddenStateClient "
                              "does)")


def _check_pixels(what: str, height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_image_pixels:
        raise HTTPException(413, f"{what} is {width} x {height} = {height * width:,} pixels, more than "
                                 f"this server's limit of {limits.max_image_pixels:,} (--max-image-pixels); "
                                 "send smaller frames")


def _check_bytes(i: int, size: int, limits: Limits) -> None:
    if size > limits.max_image_bytes:
        raise HTTPException(413, f"image {i} has {size:,} bytes, more than this server's limit of "
                                 f"{limits.max_image_bytes:,} (--max-image-mb {limits.max_image_bytes / MB:g}); "
                                 "send smaller frames")


def png_frame(i: int, data: bytes, limits: Limits) -> np.ndarray:
    """One PNG -> uint8 [H, W, 3]: byte and pixel limits first (413), then decoding (422)."""
    _check_bytes(i, len(data), limits)
    try:
        width, height = png_dimensions(data)
        _check_pixels(f"image {i}", height, width, limits)
        return decode_png(data)
    except FrameError as error:
        raise HTTPException(422, f"image {i}: {error}") from None


def _env(headers: Mapping[str, str]) -> str:
    env = headers.get(ENV_HEADER)
    if not env:
        raise HTTPException(422, f"binary frames need the {ENV_HEADER} header naming the env they come "
                                 "from (e.g. Craftax-Classic-Pixels-v1); it picks the prompt")
    frame_family(env)  # a UserError (422) for an unknown env, before any decoding
    return env


def _base64_png(i: int, text: str, limits: Limits) -> bytes:
    _check_bytes(i, len(text) * 3 // 4, limits)  # the decoded size, known before decoding
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"image {i} is not valid base64; send base64-encoded PNG bytes") from None


def _json_request(body: bytes) -> ImageHiddenStatesRequest:
    """The JSON body, refused with the server's usual 400/422 answers (its validation handler)."""
    try:
        value = json.loads(body)
    except ValueError as error:
        position = getattr(error, "pos", 0)
        reason = getattr(error, "msg", str(error))
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", position),
                                       "msg": "JSON decode error", "ctx": {"error": reason}}]) from None
    if isinstance(value, dict) and isinstance(value.get("env"), str):
        frame_family(value["env"])  # an unknown env: the frames' own one-line message (422)
    try:
        return ImageHiddenStatesRequest.model_validate(value)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


def media_type(content_type: str | None) -> str:
    """``type/subtype`` of a Content-Type header, lower case, without parameters."""
    message = Message()
    message["content-type"] = content_type or ""
    return message.get_content_type() if content_type else ""


def read_frames(content_type: str | None, body: bytes, headers: Mapping[str, str], limits: Limits,
                max_batch: int) -> tuple[str, list[np.ndarray] | np.ndarray]:
    """(env, frames) of a request to the image endpoint; an HTTPException (or a validation error)
    names the first problem. Runs in a worker thread: PNG decoding is CPU work."""
    kind = media_type(content_type)
    if kind == BINARY_MEDIA_TYPE:
        env = _env(headers)
        try:
            shape = frame_shape(headers)
        except WireError as error:
            raise HTTPException(422, str(error)) from None
        if shape[0] > max_batch:
            raise _too_many(shape[0], max_batch)
        _check_pixels("each frame", shape[1], shape[2], limits)
        try:
            return env, decode_frames(body, shape)
        except WireError as error:
            raise HTTPException(422, str(error)) from None
    if kind == PNG_MEDIA_TYPE:
        env = _env(headers)
        return env, [png_frame(0, body, limits)]
    if not body:
        raise HTTPException(422, "request body is missing; send frames as raw uint8, a PNG, or JSON "
                                 "{\"env\": ..., \"images\": [base64 PNG, ...]}")
    if kind == "application/json" or kind.endswith("+json"):
        request = _json_request(body)
        if len(request.images) > max_batch:
            raise _too_many(len(request.images), max_batch)
        pngs = [_base64_png(i, text, limits) for i, text in enumerate(request.images)]
        return request.env, [png_frame(i, data, limits) for i, data in enumerate(pngs)]
    raise HTTPException(415, f"Content-Type {kind!r} is not a frame format; send "
                             f"{', '.join(IMAGE_MEDIA_TYPES)}")
