"""Fuzzing every decoder: random and mutated bytes raise only the fleet's own errors, quickly,
without allocating beyond the limits."""

from __future__ import annotations

import contextlib
import io
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.codec import CodecLimits, Quantization, decode, encode
from fleet.enrollment import EnrollmentToken
from fleet.errors import FleetError
from fleet.framing import Limits, read_frame, unpack
from fleet.keys import Identity, Role
from fleet.messages import (
    MESSAGE_TYPES,
    DeviceState,
    DeviceStatus,
    Message,
    decode_any,
)
from fleet.residual import load_residual, save_residual
from fleet.sealing import (
    UpdateOpener,
    open_device_signed,
    open_enrollment,
    open_signed,
    seal_update,
    sign_message,
)
from fleet.tensors import TensorLimits
from tests.fleet.samples import T0, Registry, sample_messages, small_update, update_header

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
INTERESTING_U32 = [0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "u32", "insert", "delete", "truncate", "append"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "u32":
            value = draw(st.sampled_from(INTERESTING_U32))
            order = draw(st.sampled_from([">I", "<I"]))
            data[pos : pos + 4] = struct.pack(order, value)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def fuzz_input(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), mutated(seeds))


def only_fleet_errors(decoder: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(FleetError):
        decoder(data)


# -- seeds ----------------------------------------------------------------------------------------


DEVICE = Identity.generate(Role.DEVICE)
COORDINATOR = Identity.generate(Role.COORDINATOR)
REGISTRY = Registry(DEVICE.public)
MESSAGES = sample_messages(DEVICE, COORDINATOR)
UNSIGNED = [m.to_wire() for m in MESSAGES]
SIGNED = [sign_message(m, COORDINATOR) for m in MESSAGES]
STATUS = sign_message(DeviceStatus(device_id=DEVICE.id, state=DeviceState.ONLINE, at=T0), DEVICE)
ENROLL = sign_message(MESSAGES[5], DEVICE)
BLOBS = [
    encode(small_update(i), norm_bound=1.0, topk_fraction=f, quantization=q).data
    for i, (f, q) in enumerate([(0.1, Quantization.INT8), (0.5, Quantization.FP16), (1.0, Quantization.INT8)])
]
SEALED = [
    seal_update(update_header(DEVICE), blob, device=DEVICE, coordinator=COORDINATOR.public) for blob in BLOBS
]


# -- framing and messages -------------------------------------------------------------------------


@FUZZ
@given(fuzz_input(UNSIGNED + SIGNED))
def test_framing(data: bytes) -> None:
    only_fleet_errors(unpack, data)
    only_fleet_errors(lambda d: read_frame(io.BytesIO(d)), data)


@FUZZ
@given(fuzz_input(UNSIGNED))
def test_messages(data: bytes) -> None:
    only_fleet_errors(decode_any, data)
    for cls in MESSAGE_TYPES.values():
        only_fleet_errors(cls.from_wire, data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(message=st.sampled_from(MESSAGES), data=st.data())
def test_message_fields(message: Message, data: st.DataObject) -> None:
    """Any JSON value in any field (or a new field) gives a valid message or a MessageError."""
    header: dict[str, Any] = message.header()
    key = data.draw(st.sampled_from([*header, "extra"]))
    header[key] = data.draw(json_values)
    only_fleet_errors(lambda _: type(message).from_parts(header, message.wire_payload()), b"")


# -- codec ----------------------------------------------------------------------------------------

LIMITS = CodecLimits(max_blob=1 << 16, max_body=1 << 18, tensors=TensorLimits(max_total_elements=1 << 16))


def _recompressed(draw: st.DrawFn) -> bytes:
    """A valid blob whose body (not the zstd frame) was mutated, so the parser itself is fuzzed."""
    blob = draw(st.sampled_from(BLOBS))
    body = zstandard.ZstdDecompressor().decompress(blob[10:])
    body = draw(mutated([body]))
    head = blob[:6] + struct.pack("<I", len(body))
    return head + zstandard.ZstdCompressor().compress(body)


@FUZZ
@given(st.one_of(fuzz_input(BLOBS), st.composite(_recompressed)()))
def test_codec(data: bytes) -> None:
    tracemalloc.start()
    try:
        try:
            out = decode(data, limits=LIMITS)
        except FleetError:
            out = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    if out is not None:
        assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in out.values())


# -- sealing --------------------------------------------------------------------------------------


@FUZZ
@given(fuzz_input(SEALED))
def test_open_update(data: bytes) -> None:
    only_fleet_errors(UpdateOpener(COORDINATOR, REGISTRY).open, data)


@FUZZ
@given(fuzz_input([*SIGNED, STATUS, ENROLL]))
def test_open_signed(data: bytes) -> None:
    for cls in MESSAGE_TYPES.values():
        with contextlib.suppress(FleetError):
            open_signed(data, cls, signer=COORDINATOR.public)
    only_fleet_errors(lambda d: open_device_signed(d, DeviceStatus, registry=REGISTRY), data)
    only_fleet_errors(open_enrollment, data)


@FUZZ
@given(fuzz_input([SIGNED[2]]))
def test_release_tensors(data: bytes) -> None:
    def decode_release(d: bytes) -> object:
        release = open_signed(d, type(MESSAGES[2]), signer=COORDINATOR.public)
        return release.arrays()  # type: ignore[attr-defined]

    only_fleet_errors(decode_release, data)
    only_fleet_errors(lambda d: type(MESSAGES[2]).from_wire(d).arrays(), data)  # type: ignore[attr-defined]


@FUZZ
@given(st.one_of(st.text(max_size=120), st.just(str(EnrollmentToken.generate(COORDINATOR.public)))))
def test_tokens(text: str) -> None:
    only_fleet_errors(lambda _: EnrollmentToken.parse(text), b"")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_residual_files(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    path: Path = tmp_path_factory.mktemp("residual") / "residual.bin"
    save_residual(path, small_update(), key="k")
    path.write_bytes(data.draw(fuzz_input([path.read_bytes()])))
    only_fleet_errors(lambda _: load_residual(path, key="k"), b"")


def test_limits_are_consistent() -> None:
    assert Limits().max_frame > LIMITS.max_blob
