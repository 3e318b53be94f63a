from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from fleet.errors import MessageError, UnsupportedVersion, WireError
from fleet.framing import pack, unpack
from fleet.keys import Identity, Role
from fleet.messages import (
    MESSAGE_TYPES,
    EnrollmentRefusal,
    EnrollmentReply,
    EnrollmentRequest,
    LoraSpec,
    Release,
    RoundSpec,
    Telemetry,
    decode_any,
)
from fleet.tensors import TensorDType
from tests.fleet.samples import BASE_SHA, T0, round_spec, sample_messages, small_update, update_header


def test_every_kind_round_trips(device: Identity, coordinator: Identity) -> None:
    messages = sample_messages(device, coordinator)
    assert {type(m) for m in messages} == set(MESSAGE_TYPES.values())
    for message in messages:
        wire = message.to_wire()
        assert type(message).from_wire(wire) == message
        assert decode_any(wire) == message
        assert unpack(wire).header["kind"] == message.KIND.value
        assert unpack(wire).header["v"] == 1


def test_release_carries_its_tensors_as_payload() -> None:
    arrays = small_update()
    release = Release.build(
        arrays,
        dtype=TensorDType.FLOAT16,
        version=1,
        created_at=T0,
        base_model_sha256=BASE_SHA,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj",), ffa_seed=1),
    )
    frame = unpack(release.to_wire())
    assert "data" not in frame.header
    assert len(frame.payload) == sum(a.size * 2 for a in arrays.values())
    decoded = Release.from_wire(release.to_wire()).arrays(expected={k: v.shape for k, v in arrays.items()})
    for name, array in arrays.items():
        np.testing.assert_allclose(decoded[name], array, rtol=1e-3)
    with pytest.raises(MessageError, match="payload"):
        Release.from_parts({**frame.header, "data": "xx"}, frame.payload)
    with pytest.raises(MessageError):
        Release.from_parts(frame.header, frame.payload[:-1])


def test_wrong_kind_version_and_fields_are_refused(device: Identity) -> None:
    header = update_header(device).header()
    with pytest.raises(MessageError, match="expected a 'round'"):
        RoundSpec.from_parts(header)
    with pytest.raises(UnsupportedVersion):
        type(update_header(device)).from_parts({**header, "v": 2})
    with pytest.raises(UnsupportedVersion):
        type(update_header(device)).from_parts({**header, "v": True})
    with pytest.raises(MessageError, match="Extra inputs"):
        type(update_header(device)).from_parts({**header, "conversation": "hello"})
    with pytest.raises(MessageError, match="payload"):
        RoundSpec.from_wire(pack(round_spec().header(), b"x"))
    with pytest.raises(MessageError, match="unknown message kind"):
        decode_any(pack({"kind": ["round"], "v": 1}))


@pytest.mark.parametrize(
    "change",
    [
        {"deadline": T0 - timedelta(seconds=1)},
        {"min_devices": 5},
        {"norm_bound": 0},
        {"base_model_sha256": "AB" * 32},
        {"lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "q_proj"], "ffa_seed": 1}},
        {"codec": {"quantization": "int4"}},
        {"codec": {"topk_fraction": 0}},
        {"privacy": {"epsilon": 1.0, "delta": 1.0}},
        {"deadline": "2025-01-01T13:00:00"},
    ],
)
def test_round_spec_validation(change: dict[str, object]) -> None:
    header = {**round_spec().header(), **change}
    with pytest.raises(MessageError):
        RoundSpec.from_parts(header)


def test_enrollment_messages_check_themselves(device: Identity, other_device: Identity) -> None:
    request = sample_messages(device, device)[5].header()
    with pytest.raises(MessageError, match="derived"):
        EnrollmentRequest.from_parts({**request, "device_id": other_device.id})
    reply = sample_messages(device, Identity.generate(Role.COORDINATOR))[6].header()
    with pytest.raises(MessageError, match="reason"):
        EnrollmentReply.from_parts({**reply, "accepted": False})
    refused = EnrollmentReply.from_parts({**reply, "accepted": False, "refusal": "bad_proof"})
    assert refused.refusal is EnrollmentRefusal.BAD_PROOF


def test_telemetry_has_no_room_for_free_text(device: Identity) -> None:
    header = Telemetry(device_id=device.id, at=T0, uptime_s=1).header()
    for field, value in [("board", "my kitchen, near the fridge"), ("note", "hi"), ("cpu_percent", 101)]:
        with pytest.raises(WireError):
            Telemetry.from_parts({**header, field: value})
