"""Read a GGUF file's header: its metadata and tensor table, nothing else (no tensor data).

Pure Python and size-bounded, so ``agent model info`` and diagnostics work without gguf or
llama.cpp and a corrupt or hostile file gets a clear :class:`~agent.errors.ModelError`.

GGUF layout (little-endian): ``b"GGUF"``, version u32, tensor count u64, metadata count u64, then
each metadata pair (key string, value type u32, value), then each tensor's name, dims, type and
offset. A string is a u64 length and UTF-8 bytes; an array is an element type u32, a count u64 and
the elements.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, Union

from agent.errors import ModelError

MAGIC = b"GGUF"
MAX_STRING = 16 << 20
MAX_ARRAY = 1 << 22
MAX_PAIRS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_DIMS = 8

Value = Union[int, float, bool, str, list["Value"]]


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALARS: dict[ValueType, str] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}

# llama.cpp's llama_ftype (general.file_type) names, for the common ones.
FILE_TYPES: dict[int, str] = {
    0: "ALL_F32",
    1: "MOSTLY_F16",
    2: "MOSTLY_Q4_0",
    3: "MOSTLY_Q4_1",
    7: "MOSTLY_Q8_0",
    8: "MOSTLY_Q5_0",
    9: "MOSTLY_Q5_1",
    10: "MOSTLY_Q2_K",
    11: "MOSTLY_Q3_K_S",
    12: "MOSTLY_Q3_K_M",
    13: "MOSTLY_Q3_K_L",
    14: "MOSTLY_Q4_K_S",
    15: "MOSTLY_Q4_K_M",
    16: "MOSTLY_Q5_K_S",
    17: "MOSTLY_Q5_K_M",
    18: "MOSTLY_Q6_K",
    32: "MOSTLY_BF16",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict[str, Value]
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def file_type(self) -> str | None:
        """``general.file_type`` by llama.cpp's name (e.g. ``MOSTLY_Q4_K_M``), if present."""
        value = self.metadata.get("general.file_type")
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return FILE_TYPES.get(value, f"TYPE_{value}")


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self._fh = fh
        self._path = path

    def bytes(self, n: int) -> bytes:
        data = self._fh.read(n)
        if len(data) != n:
            raise ModelError(f"{self._path}: truncated GGUF header")
        return data

    def unpack(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.bytes(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING:
            raise ModelError(f"{self._path}: a GGUF string of {n} bytes is over the limit")
        try:
            return self.bytes(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelError(f"{self._path}: a GGUF string is not UTF-8") from exc

    def value_type(self) -> ValueType:
        raw = self.u32()
        try:
            return ValueType(raw)
        except ValueError as exc:
            raise ModelError(f"{self._path}: unknown GGUF value type {raw}") from exc

    def value(self, vtype: ValueType, *, depth: int = 0) -> Value:
        if vtype is ValueType.STRING:
            return self.string()
        if vtype is ValueType.ARRAY:
            if depth > 2:
                raise ModelError(f"{self._path}: GGUF arrays nested too deep")
            etype = self.value_type()
            count = self.u64()
            if count > MAX_ARRAY:
                raise ModelError(f"{self._path}: a GGUF array of {count} items is over the limit")
            return [self.value(etype, depth=depth + 1) for _ in range(count)]
        return self.unpack(_SCALARS[vtype])


def read_gguf_info(path: Path) -> GGUFInfo:
    """The header of the GGUF at ``path``; ModelError if it is not a readable GGUF."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            reader = _Reader(fh, path)
            if reader.bytes(4) != MAGIC:
                raise ModelError(f"{path}: not a GGUF file")
            version = reader.u32()
            if version not in (2, 3):
                raise ModelError(f"{path}: unsupported GGUF version {version}")
            n_tensors = reader.u64()
            n_pairs = reader.u64()
            if n_tensors > MAX_TENSORS or n_pairs > MAX_PAIRS:
                raise ModelError(f"{path}: implausible GGUF header ({n_tensors} tensors, {n_pairs} keys)")
            metadata: dict[str, Value] = {}
            for _ in range(n_pairs):
                key = reader.string()
                metadata[key] = reader.value(reader.value_type())
            tensors: list[TensorInfo] = []
            for _ in range(n_tensors):
                name = reader.string()
                n_dims = reader.u32()
                if n_dims > MAX_DIMS:
                    raise ModelError(f"{path}: tensor {name} has {n_dims} dimensions")
                shape = tuple(reader.u64() for _ in range(n_dims))
                tensors.append(TensorInfo(name, shape, reader.u32(), reader.u64()))
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return GGUFInfo(version=version, metadata=metadata, tensors=tuple(tensors))


def summarize(value: Value, *, max_items: int = 8, max_chars: int = 200) -> str:
    """A one-line rendering of a metadata value (long arrays and strings shortened)."""
    if isinstance(value, list):
        head = ", ".join(summarize(v, max_items=max_items, max_chars=40) for v in value[:max_items])
        more = f", ... ({len(value)} items)" if len(value) > max_items else ""
        return f"[{head}{more}]"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
