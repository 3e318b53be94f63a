"""The update codec (pure maths): clip, top-k with error feedback, quantize, delta-encode, compress.

:func:`encode` turns named float arrays (a device's B-matrix deltas) into a compact blob:

1. **clip** the fresh update to the round's L2 ``norm_bound`` (global norm over all tensors);
2. add the **residual** kept from the previous rounds (error feedback);
3. keep the ``k = ceil(topk_fraction * n)`` entries of largest magnitude (global top-k), and scale
   them so that their norm is at most ``norm_bound``: every update on the wire obeys the bound;
4. **quantize** them: ``INT8`` (symmetric, one float32 scale per tensor, rounded toward zero) or
   ``FP16`` (rounded toward zero); entries that quantize to zero are not sent;
5. encode their flat indices as varint **gaps**, then **zstd** the whole body.

What top-k left out and the quantization error are the new residual, returned for the device to
keep (:mod:`fleet.residual`) and add next round. What the scaling to the bound cut off is discarded
(``dropped``), as clipping discards it: carried over, it would pile up on a device whose updates
keep saturating the bound (a heterogeneous device, round after round), and the ever-growing, stale
residual would then dominate what it sends (bench/round_codec.py measured a 7 % worse fixed point).
Over rounds ``sum(sent) + residual + sum(dropped) == sum(clipped updates)``.

:func:`decode` checks every size, count, index and shape against :class:`CodecLimits` (and an
expected layout when given) before allocating, and returns dense float32 arrays equal to the
encoder's ``sent``. Blob layout (docs/fleet-protocol.md)::

    magic b"PPCU" | version u8 | quantization u8 | body length u32 LE | zstd frame of the body

    body (little-endian):
      u32 tensor count T, u32 names length, names (ASCII, joined by "\n"), u8 ndim[T], u32 dims[sum ndim]
      u32 nnz, u32 gap bytes, gaps (nnz LEB128 varints: first index, then index - previous - 1)
      INT8: f32 scale per tensor, i8 value[nnz]          FP16: f16 value[nnz]
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import zstandard
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import CodecError, ResidualError, TooLarge
from fleet.tensors import (
    DEFAULT_TENSOR_LIMITS,
    MAX_NAME_LENGTH,
    MAX_NDIM,
    FloatArray,
    Layout,
    TensorLimits,
    as_float_arrays,
    check_expected,
    check_layout,
    layout_of,
)

MAGIC = b"PPCU"
CODEC_VERSION = 1
_HEAD = struct.Struct("<4sBBI")
_U32 = struct.Struct("<I")
_FP16_MAX = 65504.0
_INT8_MAX = 127
_BOUND_MARGIN = 1.0 - 2.0**-20
"""Sent values are scaled to ``norm_bound * _BOUND_MARGIN`` so float32 rounding never exceeds the bound."""


class Quantization(str, Enum):
    INT8 = "int8"
    FP16 = "fp16"


_QUANT_CODE = {Quantization.INT8: 1, Quantization.FP16: 2}
_CODE_QUANT = {code: quant for quant, code in _QUANT_CODE.items()}


class CodecParams(BaseModel):
    """How an update was (or is to be) encoded; carried in round specs and update headers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(default=CODEC_VERSION, ge=1, le=255)
    quantization: Quantization = Quantization.INT8
    topk_fraction: float = Field(default=0.01, gt=0.0, le=1.0)


@dataclass(frozen=True)
class CodecLimits:
    """What :func:`decode` accepts. Peak memory is about 4 bytes per element plus 40 per sent value."""

    max_blob: int = 16 * 1024 * 1024
    max_body: int = 32 * 1024 * 1024
    tensors: TensorLimits = field(default_factory=lambda: DEFAULT_TENSOR_LIMITS)


DEFAULT_CODEC_LIMITS = CodecLimits()


@dataclass(frozen=True)
class EncodedUpdate:
    """The result of :func:`encode`."""

    data: bytes
    """The blob to seal and send."""
    sent: dict[str, FloatArray]
    """Exactly what :func:`decode` will return for ``data``."""
    residual: dict[str, FloatArray]
    """What was not sent; keep it (durably) and pass it to the next round's :func:`encode`."""
    input_norm: float
    """L2 norm of the fresh update before clipping."""
    sent_norm: float
    nnz: int
    dropped: dict[str, FloatArray]
    """What the scaling of the chosen entries to the bound cut off (zero when it did not bind)."""


def _norm(flat: NDArray[np.floating]) -> float:
    """L2 norm without BLAS (whose thread pool costs more than it saves at these sizes)."""
    values = flat.astype(np.float64, copy=False)
    return math.sqrt(float(np.multiply(values, values).sum()))


def l2_norm(arrays: Mapping[str, NDArray[np.floating]]) -> float:
    """Global L2 norm over all tensors, accumulated in float64."""
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays.values()))


def clip(flat: NDArray[np.float64], bound: float) -> NDArray[np.float64]:
    """Scale ``flat`` so that its L2 norm is at most ``bound``."""
    norm = _norm(flat)
    return flat * (bound / norm) if norm > bound else flat


def topk_count(n: int, fraction: float) -> int:
    return min(n, max(1, math.ceil(fraction * n)))


# -- varints -------------------------------------------------------------------------------------


def encode_varints(values: NDArray[np.uint64]) -> bytes:
    """LEB128-encode unsigned integers below 2**32 (vectorised)."""
    v = values.astype(np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.shape, dtype=np.int64)
    for bits in (7, 14, 21, 28):
        nbytes += v >= np.uint64(1 << bits)
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(5):
        mask = nbytes > j
        if not mask.any():
            break
        byte = ((v[mask] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= (nbytes[mask] > j + 1).astype(np.uint8) << np.uint8(7)
        out[starts[mask] + j] = byte
    return out.tobytes()


def decode_varints(data: bytes, count: int) -> NDArray[np.int64]:
    """Decode exactly ``count`` canonical LEB128 varints (each below 2**32) spanning all of ``data``."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if raw.size:
            raise CodecError("index stream has bytes but no indices")
        return np.zeros(0, dtype=np.int64)
    if not count <= raw.size <= 5 * count:
        raise CodecError(f"index stream of {raw.size} bytes cannot hold {count} indices")
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != count or ends[-1] != raw.size - 1:
        raise CodecError("index stream does not hold exactly the declared number of indices")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > 5:
        raise CodecError("index varint longer than 5 bytes")
    if (raw[ends[lengths > 1]] == 0).any():
        raise CodecError("index varint is not in canonical form")
    values = np.zeros(count, dtype=np.int64)
    for j in range(int(lengths.max())):
        mask = lengths > j
        values[mask] += (raw[starts[mask] + j] & 0x7F).astype(np.int64) << (7 * j)
    if int(values.max()) > 0xFFFFFFFF:
        raise CodecError("index gap over 2**32")
    return values


# -- encode --------------------------------------------------------------------------------------


def _quantize_int8(
    values: NDArray[np.float64], tensor_of: NDArray[np.int64], n_tensors: int
) -> tuple[NDArray[np.int8], NDArray[np.float32], NDArray[np.float32]]:
    """Per-tensor symmetric int8, rounded toward zero. Returns (q, scales, dequantized)."""
    peak = np.zeros(n_tensors, dtype=np.float64)
    np.maximum.at(peak, tensor_of, np.abs(values))
    scales = (peak / _INT8_MAX).astype(np.float32)
    # Round each scale down, so that the tensor's largest value maps to exactly 127.
    rounded_up = scales.astype(np.float64) * _INT8_MAX > peak
    scales[rounded_up] = np.nextafter(scales[rounded_up], np.float32(0))
    per_value = scales[tensor_of].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(per_value > 0, values / np.where(per_value > 0, per_value, 1.0), 0.0)
    q = np.clip(np.trunc(ratio), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    dequantized = q.astype(np.float32) * scales[tensor_of]
    return q, scales, dequantized


def _quantize_fp16(values: NDArray[np.float64]) -> tuple[NDArray[np.float16], NDArray[np.float32]]:
    """float16 rounded toward zero (so ``|sent| <= |value|``). Returns (h, dequantized)."""
    h = np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)
    over = np.abs(h.astype(np.float64)) > np.abs(values)
    h[over] = np.nextafter(h[over], np.float16(0))
    return h, h.astype(np.float32)


def encode(
    update: Mapping[str, NDArray[np.floating]],
    residual: Mapping[str, NDArray[np.floating]] | None = None,
    *,
    norm_bound: float,
    topk_fraction: float,
    quantization: Quantization = Quantization.INT8,
    level: int = 3,
    limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
) -> EncodedUpdate:
    """Encode ``update`` (see the module doc). ``residual`` must have the update's names and shapes."""
    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError("norm_bound must be a positive finite number")
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError("topk_fraction must be in (0, 1]")
    values = as_float_arrays(update, limits=limits)
    if not values:
        raise CodecError("an update needs at least one tensor")
    layout = layout_of(values)
    names = list(layout)
    sizes = np.array([values[name].size for name in names], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    flat = np.concatenate([values[name].ravel() for name in names])
    input_norm = _norm(flat)
    accumulated = clip(flat, norm_bound)
    if residual is not None:
        if layout_of(residual) != layout:
            raise ResidualError("the residual's tensors do not match the update's; discard it")
        carried = as_float_arrays(residual, limits=limits)
        accumulated = accumulated + np.concatenate([carried[name].ravel() for name in names])

    n = flat.size
    if n > 0xFFFFFFFF:
        raise CodecError("an update of 2**32 elements or more cannot be index-encoded")
    k = topk_count(n, topk_fraction)
    if k < n:
        index = np.argpartition(np.abs(accumulated), n - k)[n - k :]
        index.sort()
    else:
        index = np.arange(n, dtype=np.int64)
    index = index.astype(np.int64)
    chosen = accumulated[index]
    chosen_norm = _norm(chosen)
    target = norm_bound * _BOUND_MARGIN
    dropped_flat = np.zeros(n, dtype=np.float64)
    if chosen_norm > target:
        scaled = chosen * (target / chosen_norm)
        dropped_flat[index] = chosen - scaled
        chosen = scaled

    tensor_of = (np.searchsorted(offsets, index, side="right") - 1).astype(np.int64)
    if quantization is Quantization.INT8:
        q8, scales, sent_values = _quantize_int8(chosen, tensor_of, len(names))
        keep = q8 != 0
        quantized: NDArray[np.generic] = q8[keep]
    else:
        h, sent_values = _quantize_fp16(chosen)
        keep = h != 0
        quantized = h[keep]
        scales = np.zeros(0, dtype=np.float32)
    index = index[keep]
    sent_values = sent_values[keep]

    sent_flat = np.zeros(n, dtype=np.float32)
    sent_flat[index] = sent_values
    new_residual = (accumulated - dropped_flat - sent_flat.astype(np.float64)).astype(np.float32)

    gap_bytes = encode_varints((np.diff(index, prepend=-1) - 1).astype(np.uint64))
    body = b"".join(
        (
            _encode_table(layout),
            _U32.pack(index.size),
            _U32.pack(len(gap_bytes)),
            gap_bytes,
            scales.astype("<f4").tobytes() if quantization is Quantization.INT8 else b"",
            quantized.astype("<f2" if quantization is Quantization.FP16 else "i1").tobytes(),
        )
    )
    compressed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    blob = _HEAD.pack(MAGIC, CODEC_VERSION, _QUANT_CODE[quantization], len(body)) + compressed
    return EncodedUpdate(
        data=blob,
        sent=_split(sent_flat, layout),
        residual=_split(new_residual, layout),
        input_norm=input_norm,
        sent_norm=_norm(sent_flat),
        nnz=int(index.size),
        dropped=_split(dropped_flat.astype(np.float32), layout),
    )


def _encode_table(layout: Mapping[str, tuple[int, ...]]) -> bytes:
    names = "\n".join(layout).encode("ascii")
    ndims = bytes(len(shape) for shape in layout.values())
    dims = [d for shape in layout.values() for d in shape]
    return b"".join(
        (_U32.pack(len(layout)), _U32.pack(len(names)), names, ndims, struct.pack(f"<{len(dims)}I", *dims))
    )


def _split(flat: FloatArray, layout: Mapping[str, tuple[int, ...]]) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    offset = 0
    for name, shape in layout.items():
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return out


# -- decode --------------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked little-endian reads from a body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise CodecError(f"update body truncated in {what}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset


def _decompress(blob: bytes, limits: CodecLimits) -> tuple[Quantization, bytes]:
    if len(blob) > limits.max_blob:
        raise TooLarge("encoded update", len(blob), limits.max_blob)
    if len(blob) < _HEAD.size:
        raise CodecError("encoded update truncated")
    magic, version, quant_code, body_length = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise CodecError("not an encoded update (bad magic)")
    if version != CODEC_VERSION:
        raise CodecError(f"codec version {version} is not supported (this build speaks {CODEC_VERSION})")
    quantization = _CODE_QUANT.get(quant_code)
    if quantization is None:
        raise CodecError(f"unknown quantization code {quant_code}")
    if body_length > limits.max_body:
        raise TooLarge("update body", body_length, limits.max_body)
    compressed = blob[_HEAD.size :]
    try:
        declared = zstandard.frame_content_size(compressed)
    except zstandard.ZstdError:
        raise CodecError("update body is not a zstd frame") from None
    if declared != body_length:
        raise CodecError("update body's zstd frame does not declare the body's length")
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 25).decompressobj()
    try:
        body = decompressor.decompress(compressed)
    except zstandard.ZstdError as exc:
        raise CodecError(f"update body does not decompress: {exc}") from None
    if not decompressor.eof or decompressor.unused_data or len(body) != body_length:
        raise CodecError("update body's zstd frame is incomplete or followed by other bytes")
    return quantization, body


@dataclass(frozen=True)
class _Table:
    layout: dict[str, tuple[int, ...]]
    offsets: NDArray[np.int64]
    """Start of each tensor in the flat vector, and the total at the end (read-only)."""

    @property
    def total(self) -> int:
        return int(self.offsets[-1])


@functools.lru_cache(maxsize=64)
def _parse_table(names: bytes, ndims: bytes, dims: bytes, limits: TensorLimits) -> _Table:
    """Validate a tensor table (cached: a coordinator sees the same table from every device)."""
    try:
        name_list = names.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise CodecError("tensor names are not ASCII") from None
    if len(name_list) != len(ndims):
        raise CodecError(f"{len(name_list)} tensor names for {len(ndims)} tensors")
    flat_dims = struct.unpack(f"<{len(dims) // 4}I", dims)
    entries: list[tuple[str, tuple[int, ...]]] = []
    start = 0
    for name, ndim in zip(name_list, ndims, strict=True):
        entries.append((name, tuple(flat_dims[start : start + ndim])))
        start += ndim
    check_layout(entries, limits)
    sizes = [math.prod(shape) for _, shape in entries]
    offsets = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).astype(np.int64)
    offsets.setflags(write=False)
    return _Table(layout=dict(entries), offsets=offsets)


def _read_table(reader: _Reader, limits: TensorLimits) -> _Table:
    count = reader.u32("tensor count")
    if count > limits.max_tensors:
        raise TooLarge("tensor count", count, limits.max_tensors)
    if count == 0:
        raise CodecError("an update needs at least one tensor")
    names_length = reader.u32("tensor names length")
    if names_length > count * (MAX_NAME_LENGTH + 1):
        raise CodecError("tensor names are longer than the names of that many tensors can be")
    names = reader.take(names_length, "tensor names")
    ndims = reader.take(count, "tensor ranks")
    if not all(1 <= ndim <= MAX_NDIM for ndim in ndims):
        raise CodecError(f"a tensor rank is outside 1-{MAX_NDIM}")
    dims = reader.take(4 * sum(ndims), "tensor shapes")
    return _parse_table(names, ndims, dims, limits)


def decode(
    data: bytes, *, limits: CodecLimits = DEFAULT_CODEC_LIMITS, expected: Layout | None = None
) -> dict[str, FloatArray]:
    """Decode a blob from :func:`encode` into dense float32 arrays; raise :class:`CodecError` /
    :class:`TooLarge` on anything malformed, before allocating for it."""
    if not isinstance(data, (bytes, bytearray)):
        raise CodecError("an encoded update must be bytes")
    quantization, body = _decompress(bytes(data), limits)
    reader = _Reader(body)
    table = _read_table(reader, limits.tensors)
    layout = table.layout
    check_expected(list(layout.items()), expected)
    total = table.total
    nnz = reader.u32("value count")
    if nnz > total:
        raise CodecError(f"{nnz} values for {total} elements")
    gap_bytes = reader.take(reader.u32("index stream length"), "index stream")
    value_bytes = 4 * len(layout) + nnz if quantization is Quantization.INT8 else 2 * nnz
    if reader.remaining != value_bytes:
        raise CodecError(f"value section is {reader.remaining} bytes, {value_bytes} expected")
    gaps = decode_varints(gap_bytes, nnz)
    index = np.cumsum(gaps + 1) - 1
    if nnz and int(index[-1]) >= total:
        raise CodecError("an index is past the end of the update")
    offsets = table.offsets
    if quantization is Quantization.INT8:
        scales = np.frombuffer(reader.take(4 * len(layout), "scales"), dtype="<f4")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError("int8 scales must be finite and non-negative")
        q = np.frombuffer(reader.take(nnz, "values"), dtype=np.int8)
        if (q == -128).any():
            raise CodecError("int8 value -128 is outside the symmetric range")
        tensor_of = np.searchsorted(offsets, index, side="right") - 1
        with np.errstate(over="ignore"):
            values = q.astype(np.float32) * scales[tensor_of]
        if not np.isfinite(values).all():
            raise CodecError("an int8 value times its scale overflows float32")
    else:
        h = np.frombuffer(reader.take(2 * nnz, "values"), dtype="<f2")
        if not np.isfinite(h).all():
            raise CodecError("fp16 values must be finite")
        values = h.astype(np.float32)
    flat = np.zeros(total, dtype=np.float32)
    flat[index] = values
    return _split(flat, layout)
