"""The fleet envelope: a JSON header and a binary payload, each length-prefixed (docs/fleet-protocol.md).

Layout, all integers big-endian::

    magic      4 bytes   b"PPCF"
    version    1 byte    FRAME_VERSION (1)
    hlen       4 bytes   length of the header
    header     hlen      a JSON object, UTF-8, no NaN/Infinity, no duplicate keys
    plen       4 bytes   length of the payload
    payload    plen      opaque bytes (ciphertext, tensors, ...)

and nothing after. Every length is checked against :class:`Limits` before anything of that size is
read or allocated; every failure is a :class:`~fleet.errors.FramingError` or
:class:`~fleet.errors.TooLarge`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from fleet.errors import FramingError, TooLarge

MAGIC = b"PPCF"
FRAME_VERSION = 1
_PREFIX = struct.Struct(">4sBI")  # magic, version, header length
_LENGTH = struct.Struct(">I")
OVERHEAD = _PREFIX.size + _LENGTH.size
"""Bytes a frame adds to its header and payload."""

DEFAULT_MAX_HEADER = 64 * 1024
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Hard limits on what a decoder accepts (and an encoder produces)."""

    max_header: int = DEFAULT_MAX_HEADER
    max_payload: int = DEFAULT_MAX_PAYLOAD

    def __post_init__(self) -> None:
        if not 2 <= self.max_header <= 0xFFFFFFFF or not 0 <= self.max_payload <= 0xFFFFFFFF:
            raise ValueError("frame limits must fit in 32 bits")

    @property
    def max_frame(self) -> int:
        return OVERHEAD + self.max_header + self.max_payload


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Frame:
    """A decoded envelope. ``header_bytes`` are the exact bytes received (what signatures cover)."""

    header: dict[str, Any]
    header_bytes: bytes
    payload: bytes


def encode_header(header: Mapping[str, Any]) -> bytes:
    """Canonical-enough JSON for a header: compact, ASCII, no NaN."""
    try:
        return json.dumps(dict(header), separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise FramingError(f"header is not JSON-serialisable: {exc}") from None


def pack(header: Mapping[str, Any], payload: bytes = b"", *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode ``header`` and ``payload`` into one frame."""
    return pack_raw(encode_header(header), payload, limits=limits)


def pack_raw(header_bytes: bytes, payload: bytes = b"", *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Frame already-encoded header bytes (as :func:`encode_header` returns them) with a payload."""
    if len(header_bytes) > limits.max_header:
        raise TooLarge("frame header", len(header_bytes), limits.max_header)
    if len(payload) > limits.max_payload:
        raise TooLarge("frame payload", len(payload), limits.max_payload)
    return b"".join(
        (
            _PREFIX.pack(MAGIC, FRAME_VERSION, len(header_bytes)),
            header_bytes,
            _LENGTH.pack(len(payload)),
            payload,
        )
    )


def _check_prefix(prefix: bytes, limits: Limits) -> int:
    magic, version, hlen = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FramingError("not a ppchat fleet frame (bad magic)")
    if version != FRAME_VERSION:
        raise FramingError(f"frame version {version} is not supported (this build speaks {FRAME_VERSION})")
    if hlen > limits.max_header:
        raise TooLarge("frame header", hlen, limits.max_header)
    return int(hlen)


def _check_payload_length(raw: bytes, limits: Limits) -> int:
    (plen,) = _LENGTH.unpack(raw)
    if plen > limits.max_payload:
        raise TooLarge("frame payload", plen, limits.max_payload)
    return int(plen)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FramingError(f"duplicate key {key[:40]!r} in frame header")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise FramingError(f"{name} is not allowed in a frame header")


def decode_header(header_bytes: bytes) -> dict[str, Any]:
    """Parse a header: strict UTF-8 JSON object, no duplicate keys, no NaN/Infinity."""
    try:
        text = header_bytes.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except FramingError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers with too many digits.
        raise FramingError(f"frame header is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise FramingError("frame header is not a JSON object")
    return value


def unpack(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Decode one frame that must span all of ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FramingError("a frame must be bytes")
    view = memoryview(data)
    if len(view) > limits.max_frame:
        raise TooLarge("frame", len(view), limits.max_frame)
    if len(view) < OVERHEAD:
        raise FramingError(f"frame truncated: {len(view)} bytes, at least {OVERHEAD} needed")
    hlen = _check_prefix(bytes(view[: _PREFIX.size]), limits)
    offset = _PREFIX.size
    if len(view) < offset + hlen + _LENGTH.size:
        raise FramingError("frame truncated in its header")
    header_bytes = bytes(view[offset : offset + hlen])
    offset += hlen
    plen = _check_payload_length(bytes(view[offset : offset + _LENGTH.size]), limits)
    offset += _LENGTH.size
    if len(view) != offset + plen:
        if len(view) < offset + plen:
            raise FramingError("frame truncated in its payload")
        raise FramingError(f"{len(view) - offset - plen} unexpected bytes after the frame")
    header = decode_header(header_bytes)
    return Frame(header=header, header_bytes=header_bytes, payload=bytes(view[offset:]))


def _read_exactly(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise FramingError(f"stream ended in the frame's {what}")
    return data


def read_frame(stream: BinaryIO, *, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Read one frame from a binary stream, checking each length before reading that many bytes.

    The stream must end after the frame; a file holding one frame is read with this.
    """
    try:
        hlen = _check_prefix(_read_exactly(stream, _PREFIX.size, "prefix"), limits)
        header_bytes = _read_exactly(stream, hlen, "header")
        plen = _check_payload_length(_read_exactly(stream, _LENGTH.size, "payload length"), limits)
        payload = _read_exactly(stream, plen, "payload")
        if stream.read(1):
            raise FramingError("unexpected bytes after the frame")
    except OSError as exc:
        raise FramingError(f"cannot read frame: {exc}") from None
    return Frame(header=decode_header(header_bytes), header_bytes=header_bytes, payload=payload)
