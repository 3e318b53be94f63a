from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.codec import decode, encode
from fleet.enrollment import EnrollmentToken
from fleet.errors import (
    DecryptError,
    FleetError,
    MessageError,
    ReplayReason,
    ReplayRejected,
    SignatureError,
    UnknownDevice,
)
from fleet.framing import encode_header, pack_raw, unpack
from fleet.keys import Identity, Role
from fleet.messages import DeviceState, DeviceStatus, LoraSpec, Release, RoundSpec, UpdateHeader
from fleet.sealing import (
    ReplayGuard,
    UpdateOpener,
    open_device_signed,
    open_enrollment,
    open_signed,
    seal_update,
    sign_frame,
    sign_message,
)
from tests.fleet.samples import T0, FakeClock, Registry, round_spec, small_update, update_header

_ENCODED = encode(small_update(), norm_bound=1.0, topk_fraction=0.25).data


def _sealed(device: Identity, coordinator: Identity, **kwargs: object) -> tuple[UpdateHeader, bytes]:
    header = update_header(device, **kwargs)  # type: ignore[arg-type]
    return header, seal_update(header, _ENCODED, device=device, coordinator=coordinator.public)


def test_sealed_update_round_trip(device: Identity, coordinator: Identity, registry: Registry) -> None:
    header, sealed = _sealed(device, coordinator)
    opened = UpdateOpener(coordinator, registry).open(sealed, device_id=device.id)
    assert opened.header == header
    assert opened.encoded == _ENCODED
    assert set(decode(opened.encoded)) == set(small_update())
    assert _ENCODED not in sealed  # the update is ciphertext on the wire


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tampering_with_any_byte_fails(
    device: Identity, coordinator: Identity, registry: Registry, data: st.DataObject
) -> None:
    _, sealed = _sealed(device, coordinator)
    position = data.draw(st.integers(0, len(sealed) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(sealed)
    tampered[position] ^= flip
    with pytest.raises(FleetError):
        UpdateOpener(coordinator, registry).open(bytes(tampered))


def test_an_update_checked_against_another_devices_key_fails(
    device: Identity, other_device: Identity, coordinator: Identity
) -> None:
    _, sealed = _sealed(device, coordinator)
    impostor = Registry(other_device.public)
    impostor.devices[device.id] = other_device.public  # the registry holds a different key for this id
    with pytest.raises(SignatureError):
        UpdateOpener(coordinator, impostor).open(sealed)
    with pytest.raises(UnknownDevice):
        UpdateOpener(coordinator, Registry(other_device.public)).open(sealed)


def test_a_copied_ciphertext_resigned_by_another_device_does_not_decrypt(
    device: Identity, other_device: Identity, coordinator: Identity, registry: Registry
) -> None:
    _, sealed = _sealed(device, coordinator)
    frame = unpack(sealed)
    stolen = update_header(other_device, nonce=frame.header["nonce"])
    resealed = sign_frame(stolen.header(), frame.payload[64:], other_device)
    with pytest.raises(DecryptError):
        UpdateOpener(coordinator, registry).open(resealed)


def test_only_the_coordinator_can_open(device: Identity, coordinator: Identity, registry: Registry) -> None:
    _, sealed = _sealed(device, coordinator)
    with pytest.raises(DecryptError):
        UpdateOpener(Identity.generate(Role.COORDINATOR), registry).open(sealed)


def test_topic_and_header_must_name_the_same_device(
    device: Identity, other_device: Identity, coordinator: Identity, registry: Registry
) -> None:
    _, sealed = _sealed(device, coordinator)
    with pytest.raises(MessageError, match="topic"):
        UpdateOpener(coordinator, registry).open(sealed, device_id=other_device.id)
    with pytest.raises(ValueError, match="identity"):
        seal_update(update_header(device), _ENCODED, device=other_device, coordinator=coordinator.public)


def test_coordinator_messages_are_verified(coordinator: Identity) -> None:
    spec = round_spec()
    signed = sign_message(spec, coordinator)
    assert open_signed(signed, RoundSpec, signer=coordinator.public) == spec
    with pytest.raises(SignatureError):
        open_signed(signed, RoundSpec, signer=Identity.generate(Role.COORDINATOR).public)
    with pytest.raises(MessageError):
        open_signed(signed, Release, signer=coordinator.public)
    unsigned = spec.to_wire()
    with pytest.raises(FleetError):
        open_signed(unsigned, RoundSpec, signer=coordinator.public)


def test_release_payload_is_signed(coordinator: Identity) -> None:
    release = Release.build(
        small_update(),
        version=1,
        created_at=T0,
        base_model_sha256="cd" * 32,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj",), ffa_seed=1),
    )
    signed = sign_message(release, coordinator)
    assert open_signed(signed, Release, signer=coordinator.public).data == release.data
    tampered = bytearray(signed)
    tampered[-3] ^= 1
    with pytest.raises(SignatureError):
        open_signed(bytes(tampered), Release, signer=coordinator.public)


def test_device_messages_are_verified_with_the_enrolled_key(
    device: Identity, other_device: Identity, registry: Registry
) -> None:
    status = DeviceStatus(device_id=device.id, state=DeviceState.OFFLINE, at=T0)
    assert open_device_signed(sign_message(status, device), DeviceStatus, registry=registry) == status
    with pytest.raises(SignatureError):
        open_device_signed(sign_message(status, other_device), DeviceStatus, registry=registry)
    with pytest.raises(MessageError):
        open_device_signed(
            sign_message(status, device), DeviceStatus, registry=registry, device_id=other_device.id
        )


def test_enrollment_request_is_self_signed(
    device: Identity, other_device: Identity, coordinator: Identity
) -> None:
    token = EnrollmentToken.generate(coordinator.public)
    request = token.request(device, at=T0)
    opened = open_enrollment(sign_message(request, device), device_id=device.id)
    assert token.check_proof(opened.proof, opened.public_keys())
    with pytest.raises(SignatureError):
        open_enrollment(sign_message(request, other_device))


def test_a_signature_does_not_cover_another_header(device: Identity, registry: Registry) -> None:
    status = DeviceStatus(device_id=device.id, state=DeviceState.IDLE, at=T0)
    signed = unpack(sign_message(status, device))
    changed = {**signed.header, "state": DeviceState.OFFLINE.value}
    forged = pack_raw(encode_header(changed), signed.payload)
    with pytest.raises(SignatureError):
        open_device_signed(forged, DeviceStatus, registry=registry)


class TestReplayGuard:
    def guard(self) -> tuple[ReplayGuard, FakeClock]:
        clock = FakeClock()
        guard = ReplayGuard(clock=clock)
        guard.open_round(1, deadline=round_spec().deadline)
        return guard, clock

    def test_one_update_per_device_per_round(self, device: Identity, other_device: Identity) -> None:
        guard, _ = self.guard()
        guard.accept(update_header(device))
        guard.accept(update_header(other_device))
        with pytest.raises(ReplayRejected) as info:
            guard.accept(update_header(device))
        assert info.value.reason is ReplayReason.DUPLICATE
        assert guard.accepted(1) == {device.id, other_device.id}

    def test_replayed_nonce(self, device: Identity) -> None:
        guard, _ = self.guard()
        header = update_header(device)
        guard.accept(header)
        guard.open_round(2, deadline=round_spec().deadline)
        with pytest.raises(ReplayRejected) as info:
            guard.accept(header.model_copy(update={"round_id": 2}))
        assert info.value.reason is ReplayReason.NONCE_REUSED

    def test_deadline_unknown_and_closed_rounds(self, device: Identity) -> None:
        guard, clock = self.guard()
        with pytest.raises(ReplayRejected) as info:
            guard.check(update_header(device, round_id=7))
        assert info.value.reason is ReplayReason.UNKNOWN_ROUND
        clock.advance(30 * 60)
        guard.check(update_header(device))  # exactly at the deadline: still in time
        clock.advance(1)
        with pytest.raises(ReplayRejected) as info:
            guard.check(update_header(device))
        assert info.value.reason is ReplayReason.LATE
        guard.close_round(1)
        with pytest.raises(ReplayRejected) as info:
            guard.check(update_header(device))
        assert info.value.reason is ReplayReason.ROUND_CLOSED

    def test_check_records_nothing(self, device: Identity) -> None:
        guard, _ = self.guard()
        header = update_header(device)
        guard.check(header)
        guard.check(header)
        guard.record(header)
        with pytest.raises(ReplayRejected):
            guard.check(header)
