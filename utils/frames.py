"""RGB frames as uint8 arrays, and PNG bytes of them: the one conversion every image path shares.

A vision-language model sees a frame, so a feature is exact only if every path hands it the same
bytes. Env pixel observations are floats in [0, 1] (craftax renders integers and divides by 255);
:func:`as_uint8_frames` turns them back into the integers they came from, so a frame sent by the
client, decoded by the server from PNG, or passed to an in-process backend is bit-identical. PNG
is lossless, which is why it is the one compressed format the server takes.

The server must refuse a frame that is too large *before* decoding it: a few hundred bytes of
PNG can claim (and decompress to) gigabytes. :func:`png_dimensions` reads the size from the
PNG's fixed-position IHDR header without decoding anything.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np

from utils.errors import UserError

__all__ = ["FrameError", "as_uint8_frames", "as_uint8_frame", "encode_png", "decode_png",
           "png_dimensions", "PNG_SIGNATURE"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sII")  # chunk length, chunk type, width, height
_IHDR_END = len(PNG_SIGNATURE) + _IHDR.size


class FrameError(UserError):
    """A frame that is not an RGB image this code can use; one line saying what is wrong."""


def as_uint8_frame(frame, what: str = "frame") -> np.ndarray:
    """One RGB frame ``[height, width, 3]`` as uint8: uint8 as is, integers in 0..255, or floats
    in [0, 1] (env pixel observations) scaled by 255 and rounded (exact for craftax's k / 255)."""
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        raise FrameError(f"{what} has shape {array.shape}; an RGB frame is [height, width, 3]")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise FrameError(f"{what} holds floats outside [0, 1]; pass uint8 frames or env pixel "
                             "observations (floats in [0, 1])")
        return np.rint(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise FrameError(f"{what} has dtype {array.dtype}; pass uint8 values 0..255 or floats in [0, 1]")


def as_uint8_frames(frames) -> np.ndarray | list[np.ndarray]:
    """A batch of RGB frames as uint8: an array ``[N, height, width, 3]`` stays one array, a list
    (frames may differ in size) stays a list. A single frame is refused, so a missing batch axis
    is never read as N frames of one row."""
    if isinstance(frames, np.ndarray) or not isinstance(frames, Sequence):
        array = np.asarray(frames)
        if array.ndim != 4:
            raise FrameError(f"frames have shape {array.shape}; pass a batch [N, height, width, 3] "
                             "(add a leading axis for one frame)")
        if array.size == 0:
            return np.zeros(array.shape, np.uint8)
        return as_uint8_frame(array.reshape(-1, *array.shape[2:]), "frames").reshape(array.shape)
    return [as_uint8_frame(frame, f"frame {i}") for i, frame in enumerate(frames)]


def encode_png(frame) -> bytes:
    """Lossless PNG bytes of one RGB frame (what the client sends with ``encoding="png"``)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(as_uint8_frame(frame)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR header, reading 24 bytes and decoding nothing.

    Raises FrameError for bytes that are not a PNG (signature, then an IHDR chunk of 13 bytes)."""
    if len(data) < _IHDR_END or not data.startswith(PNG_SIGNATURE):
        raise FrameError("it is not a PNG (no PNG signature); send PNG files or raw uint8 frames")
    length, kind, width, height = _IHDR.unpack_from(data, len(PNG_SIGNATURE))
    if kind != b"IHDR" or length != 13 or width == 0 or height == 0:
        raise FrameError("it is not a valid PNG (no IHDR header with a non-zero size first)")
    return width, height


def decode_png(data: bytes) -> np.ndarray:
    """uint8 ``[height, width, 3]`` of PNG bytes (greyscale, palette and alpha become RGB; alpha is
    dropped). Check the size with :func:`png_dimensions` first: this decodes the whole image."""
    from PIL import Image

    png_dimensions(data)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FrameError(f"it does not decode as a PNG ({reason})") from None
