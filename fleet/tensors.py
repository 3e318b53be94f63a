"""Named dense tensors in a bounded binary layout: a table (names, shapes, dtypes) and raw bytes.

Used by adapter releases and the residual file; the sparse update codec (:mod:`fleet.codec`) shares
its name rules and limits. Bytes are little-endian, row-major, concatenated in table order. Nothing
here allocates before the table has been checked against :class:`TensorLimits` and the byte count
matches the table exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from fleet.errors import CodecError, TooLarge

MAX_NDIM = 4
MAX_NAME_LENGTH = 200
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,199}"
_NAME = re.compile(NAME_PATTERN)

TensorName = Annotated[str, StringConstraints(pattern=f"^{NAME_PATTERN}$")]
Layout = Mapping[str, tuple[int, ...]]
"""Tensor names to shapes: what an update or a release must hold."""

FloatArray = NDArray[np.float32]


class TensorDType(str, Enum):
    FLOAT32 = "f32"
    FLOAT16 = "f16"

    @property
    def numpy(self) -> np.dtype[np.floating]:
        return np.dtype("<f4") if self is TensorDType.FLOAT32 else np.dtype("<f2")

    @property
    def itemsize(self) -> int:
        return 4 if self is TensorDType.FLOAT32 else 2


@dataclass(frozen=True)
class TensorLimits:
    """Bounds on a tensor table (defaults fit a 7B model's rank-16 q/v B matrices several times)."""

    max_tensors: int = 4096
    max_dim: int = 1 << 24
    max_tensor_elements: int = 1 << 24
    max_total_elements: int = 1 << 24


DEFAULT_TENSOR_LIMITS = TensorLimits()


class TensorInfo(BaseModel):
    """One row of a tensor table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TensorName
    shape: tuple[Annotated[int, Field(ge=1, le=0x7FFFFFFF)], ...] = Field(min_length=1, max_length=MAX_NDIM)
    dtype: TensorDType = TensorDType.FLOAT32

    @field_validator("shape", mode="before")
    @classmethod
    def _shape_is_list(cls, value: object) -> object:
        # JSON gives a list; refuse strings and mappings that pydantic might coerce.
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ValueError("shape must be a list of integers")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def validate_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise CodecError(f"invalid tensor name {str(name)[:60]!r}")
    return name


def check_layout(layout: Sequence[tuple[str, tuple[int, ...]]], limits: TensorLimits) -> int:
    """Check names (valid, unique) and shapes against ``limits``; return the total element count."""
    if len(layout) > limits.max_tensors:
        raise TooLarge("tensor count", len(layout), limits.max_tensors)
    seen: set[str] = set()
    total = 0
    for name, shape in layout:
        validate_name(name)
        if name in seen:
            raise CodecError(f"tensor {name!r} appears twice")
        seen.add(name)
        if not 1 <= len(shape) <= MAX_NDIM:
            raise CodecError(f"tensor {name!r} has {len(shape)} dimensions (1-{MAX_NDIM} allowed)")
        for dim in shape:
            if not 1 <= dim <= limits.max_dim:
                raise CodecError(f"tensor {name!r} has dimension {dim} (1-{limits.max_dim} allowed)")
        numel = math.prod(shape)
        if numel > limits.max_tensor_elements:
            raise TooLarge(f"tensor {name!r}", numel, limits.max_tensor_elements)
        total += numel
        if total > limits.max_total_elements:
            raise TooLarge("total tensor elements", total, limits.max_total_elements)
    return total


def check_expected(layout: Sequence[tuple[str, tuple[int, ...]]], expected: Layout | None) -> None:
    """Refuse a layout that differs from ``expected`` (same names, same shapes; order free)."""
    if expected is None:
        return
    got = dict(layout)
    if got.keys() != expected.keys():
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        raise CodecError(
            f"tensor names differ from the expected layout (missing {missing}, unexpected {extra})"
        )
    for name, shape in got.items():
        if tuple(expected[name]) != tuple(shape):
            raise CodecError(f"tensor {name!r} has shape {shape}, expected {tuple(expected[name])}")


def layout_of(arrays: Mapping[str, NDArray[np.generic]]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in array.shape) for name, array in arrays.items()}


def as_float_arrays(
    arrays: Mapping[str, NDArray[np.generic]], *, limits: TensorLimits = DEFAULT_TENSOR_LIMITS
) -> dict[str, NDArray[np.float64]]:
    """Validate named float arrays (names, shapes, finiteness) and return float64 copies."""
    check_layout(list(layout_of(arrays).items()), limits)
    out: dict[str, NDArray[np.float64]] = {}
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise CodecError(f"tensor {name!r} has dtype {array.dtype}, a float dtype is required")
        values = np.asarray(array, dtype=np.float64)
        if not np.isfinite(values).all():
            raise CodecError(f"tensor {name!r} holds NaN or infinite values")
        out[name] = values
    return out


def pack_dense(
    arrays: Mapping[str, NDArray[np.generic]],
    *,
    dtype: TensorDType = TensorDType.FLOAT32,
    limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
) -> tuple[tuple[TensorInfo, ...], bytes]:
    """Encode named float arrays as a table and raw little-endian bytes."""
    values = as_float_arrays(arrays, limits=limits)
    infos: list[TensorInfo] = []
    chunks: list[bytes] = []
    for name, array in values.items():
        converted = array.astype(dtype.numpy)
        if not np.isfinite(converted).all():
            raise CodecError(f"tensor {name!r} overflows {dtype.value}")
        infos.append(TensorInfo(name=name, shape=tuple(int(d) for d in array.shape), dtype=dtype))
        chunks.append(np.ascontiguousarray(converted).tobytes())
    return tuple(infos), b"".join(chunks)


def unpack_dense(
    infos: Sequence[TensorInfo],
    data: bytes,
    *,
    limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
    expected: Layout | None = None,
) -> dict[str, FloatArray]:
    """Decode what :func:`pack_dense` wrote into float32 arrays, checking everything first."""
    layout = [(info.name, info.shape) for info in infos]
    check_layout(layout, limits)
    check_expected(layout, expected)
    needed = sum(info.nbytes for info in infos)
    if len(data) != needed:
        raise CodecError(f"tensor data is {len(data)} bytes, the table describes {needed}")
    out: dict[str, FloatArray] = {}
    offset = 0
    for info in infos:
        raw = np.frombuffer(data, dtype=info.dtype.numpy, count=info.numel, offset=offset)
        offset += info.nbytes
        if not np.isfinite(raw).all():
            raise CodecError(f"tensor {info.name!r} holds NaN or infinite values")
        out[info.name] = raw.astype(np.float32).reshape(info.shape)
    return out
