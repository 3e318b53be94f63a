from __future__ import annotations

import io
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.errors import FramingError, TooLarge
from fleet.framing import MAGIC, Limits, pack, read_frame, unpack

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=80, deadline=None)
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=6), payload=st.binary(max_size=300))
def test_round_trip(header: dict[str, object], payload: bytes) -> None:
    data = pack(header, payload)
    frame = unpack(data)
    assert frame.header == header
    assert frame.payload == payload
    assert read_frame(io.BytesIO(data)) == frame


def _frame(header: bytes, payload: bytes = b"", *, magic: bytes = MAGIC, version: int = 1) -> bytes:
    return (
        magic
        + bytes([version])
        + struct.pack(">I", len(header))
        + header
        + struct.pack(">I", len(payload))
        + payload
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_frame(b"{}", magic=b"XXXX"), "magic"),
        (_frame(b"{}", version=2), "version"),
        (_frame(b"[]"), "object"),
        (_frame(b'{"a":1,"a":2}'), "duplicate"),
        (_frame(b'{"a":NaN}'), "NaN"),
        (_frame(b'{"a":Infinity}'), "Infinity"),
        (_frame(b'{"a":1'), "JSON"),
        (_frame(b'{"a":"\xff"}'), "JSON"),
        (_frame(b'{"a":' + b"9" * 5000 + b"}"), "JSON"),
        (_frame(b"[" * 30000 + b"]" * 30000), "JSON"),
        (_frame(b"{}") + b"x", "unexpected"),
        (_frame(b"{}", b"abc")[:-1], "truncated"),
        (b"PPC", "truncated"),
    ],
)
def test_malformed_frames_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(FramingError, match=message):
        unpack(data)


def test_declared_sizes_are_checked_before_reading() -> None:
    limits = Limits(max_header=1024, max_payload=4096)
    huge_header = MAGIC + b"\x01" + struct.pack(">I", 0xFFFFFFFF)
    huge_payload = MAGIC + b"\x01" + struct.pack(">I", 2) + b"{}" + struct.pack(">I", 0xFFFFFFF0)
    tracemalloc.start()
    try:
        for data in (huge_header, huge_payload):
            with pytest.raises(TooLarge):
                unpack(data + b"\x00" * 16, limits=limits)
            with pytest.raises(TooLarge):
                read_frame(io.BytesIO(data), limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(TooLarge):
        unpack(b"\x00" * (limits.max_frame + 1), limits=limits)
    with pytest.raises(TooLarge):
        pack({}, b"x" * 5000, limits=limits)


def test_stream_must_end_after_the_frame() -> None:
    with pytest.raises(FramingError, match="unexpected"):
        read_frame(io.BytesIO(pack({"a": 1}) + b"more"))
    with pytest.raises(FramingError, match="ended"):
        read_frame(io.BytesIO(pack({"a": 1}, b"payload")[:-2]))


def test_unserialisable_headers_are_refused() -> None:
    with pytest.raises(FramingError):
        pack({"a": float("nan")})
    with pytest.raises(FramingError):
        pack({"a": object()})
