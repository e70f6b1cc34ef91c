"""Binary wire format of hidden-state answers: raw little-endian floats plus a shape header.

A JSON answer spells every float in decimal: for a batch of 256 vectors of dim 896 that is about
four megabytes of text that the server formats and the client parses, which costs more than the
model call on a GPU. The binary answer is the array's bytes, row-major, with the shape and dtype
in headers, so encoding and decoding are a copy.

``float16`` halves the bytes again and is what labelled datasets store (docs/design.md), so a
policy trained on labelled data sees the same rounding. Vectors whose values do not fit float16
(|x| > 65504, which some models' middle layers reach) are sent as ``float32`` instead, and the
``X-Dtype`` header says so: a client never gets ``inf`` from an overflow.

The server (``servers/hidden_state_server.py``) encodes; the client (``utils/hidden_state_client.py``)
decodes; both import these names so the two sides cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

BINARY_MEDIA_TYPE = "application/octet-stream"
SHAPE_HEADER = "X-Shape"
DTYPE_HEADER = "X-Dtype"
FORMATS = ("json", "f16", "f32")
"""Values of the ``format`` query parameter; ``Accept: application/octet-stream`` means f16."""

_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_F16_MAX = float(np.finfo(np.float16).max)


class WireError(ValueError):
    """A binary answer that does not match its headers (truncated, wrong shape or dtype)."""


def encode(states: np.ndarray, fmt: str) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of float32 ``states`` [N, D] in format ``f16`` or ``f32``."""
    states = np.asarray(states, dtype=np.float32)
    dtype = "float16" if fmt == "f16" and _fits_float16(states) else "float32"
    body = np.ascontiguousarray(states, dtype=_DTYPES[dtype]).tobytes()
    return body, {SHAPE_HEADER: ",".join(str(n) for n in states.shape), DTYPE_HEADER: dtype}


def decode(body: bytes, headers: Mapping[str, str]) -> np.ndarray:
    """float32 [N, D] from a binary answer; a WireError if body and headers disagree."""
    try:
        shape = tuple(int(n) for n in headers[SHAPE_HEADER].split(","))
        dtype = _DTYPES[headers[DTYPE_HEADER]]
    except (KeyError, ValueError) as error:
        raise WireError(f"binary answer without a proper {SHAPE_HEADER}/{DTYPE_HEADER} header "
                        f"({type(error).__name__}: {error})") from None
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(shape) != 2 or len(body) != expected:
        raise WireError(f"binary answer of {len(body)} bytes does not hold {dtype} of shape {shape} "
                        f"({expected} bytes); truncated?")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(np.float32)


def _fits_float16(states: np.ndarray) -> bool:
    return states.size == 0 or float(np.abs(states).max()) <= _F16_MAX


__all__ = ["BINARY_MEDIA_TYPE", "SHAPE_HEADER", "DTYPE_HEADER", "FORMATS", "WireError", "encode",
           "decode"]
