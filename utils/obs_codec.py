"""Lossless, compact encoding of observation arrays for trajectory shards.

Craftax observations are float32 but carry little information: symbolic ones are mostly one-hot
0/1 columns with a handful of fractional columns (inventory k/10, light level), and pixel ones
hold a few hundred distinct colours per frame by day (random static at night). Storing them as
float32 would make datasets tens to hundreds of times larger than needed, and any lossy shortcut
(e.g. ``round(obs * 255)``) would silently change the values a policy was trained on. So the codec
works on the raw bit patterns, never on arithmetic, and is bit-exact for every dtype it accepts
(``-0.0`` and NaN payloads included).

Layout of one encoded array ``x`` of shape ``[rows, *feature_shape]`` viewed as ``[rows, F]``:

* columns whose every value is bit-identical to 0 or to 1 are stored as bits
  (``np.packbits``, one byte row per observation row) plus a packed column mask;
* the remaining ("residual") columns are stored, in order of preference, as
  ``palette``: uint8/uint16 indices into the sorted distinct bit patterns (<= 65,536 of them),
  ``planes``: the bytes split into planes (all first bytes, then all second bytes, ...), which
  zlib compresses better for noisy floats, or ``raw``; between ``planes`` and ``raw`` a small
  trial compression of a few rows decides, because which one wins depends on the data;
* everything then goes through zlib inside ``np.savez_compressed``.

Each encoded array records its own choices in a small JSON string (``<prefix>__meta``), so every
shard decodes itself even if a later codec version changes the heuristics.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Collection, Mapping

import numpy as np

OBS_ENCODING = "bitpack-palette-v1"
"""Codec family name recorded in dataset manifests."""

_SEP = "__"
_PALETTE_MAX = 1 << 16
_TRIAL_RUNS = 8
_TRIAL_RUN_LENGTH = 4
_UINT_BY_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def encoded_keys(prefix: str, keys: Collection[str]) -> list[str]:
    """The stored array names that belong to the encoded array ``prefix`` (for selective loads)."""
    head = prefix + _SEP
    return [k for k in keys if k.startswith(head)]


def is_encoded(prefix: str, keys: Collection[str]) -> bool:
    """Whether ``keys`` hold an encoded array named ``prefix`` (its meta record is present)."""
    return prefix + _SEP + "meta" in keys


def encode_array(x: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """Encode ``x`` (leading axis = rows) into arrays named ``<prefix>__*`` for an npz file."""
    x = np.ascontiguousarray(x)
    if x.ndim < 1:
        raise ValueError(f"cannot encode a 0-d array as {prefix!r}: need a leading row axis")
    features = int(np.prod(x.shape[1:], dtype=np.int64))
    bits = _bit_view(x).reshape(x.shape[0], features)  # explicit: -1 is ambiguous with 0 rows
    zero, one = _zero_one_bits(x.dtype)
    binary = np.all((bits == zero) | (bits == one), axis=0)
    out: dict[str, np.ndarray] = {}
    if binary.any():
        out[prefix + _SEP + "columns"] = np.packbits(binary)
        out[prefix + _SEP + "bits"] = np.packbits(bits[:, binary] == one, axis=1)
    residual_mode, residual_arrays = _encode_residual(bits[:, ~binary])
    out.update({prefix + _SEP + name: arr for name, arr in residual_arrays.items()})
    meta = {
        "codec": OBS_ENCODING,
        "dtype": x.dtype.str,
        "shape": list(x.shape),
        "binary_columns": int(binary.sum()),
        "residual": residual_mode,
    }
    out[prefix + _SEP + "meta"] = np.array(json.dumps(meta))
    return out


def decode_array(arrays: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """Rebuild the exact array ``encode_array`` was given from its stored parts."""
    meta = json.loads(str(arrays[prefix + _SEP + "meta"]))
    if meta.get("codec") != OBS_ENCODING:
        raise ValueError(f"{prefix!r} uses unknown codec {meta.get('codec')!r}")
    dtype = np.dtype(meta["dtype"])
    shape = tuple(meta["shape"])
    rows = shape[0]
    features = int(np.prod(shape[1:], dtype=np.int64))
    uint = _uint_for(dtype)
    bits = np.empty((rows, features), dtype=uint)
    binary = np.zeros(features, dtype=bool)
    if meta["binary_columns"]:
        binary = np.unpackbits(arrays[prefix + _SEP + "columns"], count=features).astype(bool)
        packed = arrays[prefix + _SEP + "bits"]
        ones = np.unpackbits(packed, axis=1, count=int(binary.sum())).astype(bool)
        zero, one = _zero_one_bits(dtype)
        bits[:, binary] = np.where(ones, one, zero)
    residual_parts = {k[len(prefix) + len(_SEP):]: v for k, v in arrays.items()
                      if k.startswith(prefix + _SEP)}
    residual_cols = features - int(binary.sum())
    residual = _decode_residual(meta["residual"], residual_parts, rows, residual_cols, uint)
    if residual is not None:
        bits[:, ~binary] = residual
    return bits.view(dtype).reshape(shape)


def _bit_view(x: np.ndarray) -> np.ndarray:
    """Unsigned-integer view of ``x``: equality of bit patterns is what bit-exactness needs."""
    return x.view(_uint_for(x.dtype))


def _uint_for(dtype: np.dtype) -> type:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" or dtype.itemsize not in _UINT_BY_SIZE:
        raise ValueError(f"observation dtype {dtype} is not supported (need bool, int, uint or float)")
    return _UINT_BY_SIZE[dtype.itemsize]


def _zero_one_bits(dtype: np.dtype) -> tuple[np.generic, np.generic]:
    """The bit patterns of 0 and 1 in ``dtype`` (positive zero only, so -0.0 stays residual)."""
    uint = _uint_for(dtype)
    zero = np.zeros(1, dtype=dtype).view(uint)[0]
    one = np.ones(1, dtype=dtype).view(uint)[0]
    return zero, one


def _encode_residual(rest: np.ndarray) -> tuple[str, dict[str, np.ndarray]]:
    """Pick the smallest-looking representation for the non-binary columns."""
    if rest.size == 0:
        return "none", {}
    values = np.unique(rest)
    if len(values) <= _PALETTE_MAX:
        index_dtype = np.uint8 if len(values) <= 256 else np.uint16
        index = np.searchsorted(values, rest).astype(index_dtype)
        return "palette", {"palette": values, "index": index}
    if rest.dtype.itemsize > 1 and _planes_compress_better(_trial_sample(rest)):
        return "planes", {"planes": _to_planes(rest)}
    return "raw", {"raw": np.ascontiguousarray(rest)}


def _trial_sample(rest: np.ndarray) -> np.ndarray:
    """A few short runs of consecutive rows spread over the shard: consecutive rows are what zlib
    exploits, and spreading the runs keeps one unusual stretch (e.g. a night) from deciding alone."""
    rows = rest.shape[0]
    if rows <= _TRIAL_RUNS * _TRIAL_RUN_LENGTH:
        return rest
    starts = np.linspace(0, rows - _TRIAL_RUN_LENGTH, _TRIAL_RUNS).astype(np.int64)
    picked = (starts[:, None] + np.arange(_TRIAL_RUN_LENGTH)).reshape(-1)
    return rest[picked]


def _planes_compress_better(sample: np.ndarray) -> bool:
    """Trial-compress a few rows both ways: noisy floats favour planes, smooth images raw."""
    raw = len(zlib.compress(np.ascontiguousarray(sample).tobytes()))
    planes = len(zlib.compress(_to_planes(sample).tobytes()))
    return planes < raw


def _to_planes(rest: np.ndarray) -> np.ndarray:
    """[rows, cols] of k-byte ints -> [k, rows, cols] uint8: slowly varying bytes end up together."""
    size = rest.dtype.itemsize
    as_bytes = np.ascontiguousarray(rest).view(np.uint8).reshape(*rest.shape, size)
    return np.ascontiguousarray(np.moveaxis(as_bytes, -1, 0))


def _decode_residual(mode: str, parts: Mapping[str, np.ndarray], rows: int, cols: int,
                     uint: type) -> np.ndarray | None:
    if mode == "none":
        return None
    if mode == "palette":
        return parts["palette"].astype(uint, copy=False)[parts["index"]]
    if mode == "planes":
        planes = parts["planes"]
        return np.ascontiguousarray(np.moveaxis(planes, 0, -1)).view(uint).reshape(rows, cols)
    if mode == "raw":
        return parts["raw"].astype(uint, copy=False).reshape(rows, cols)
    raise ValueError(f"unknown residual encoding {mode!r}")
