"""Enrollment with one-time tokens, checked against the store (no broker)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from coordinator.devices import StoreRegistry, enroll, issue_token
from coordinator.errors import EnrollmentError
from coordinator.store import DeviceStatus, Store
from fleet.enrollment import EnrollmentToken
from fleet.errors import UnknownDevice
from fleet.keys import Identity, Role
from fleet.messages import EnrollmentRefusal, EnrollmentReply
from fleet.sealing import open_signed, sign_message

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def coordinator() -> Identity:
    return Identity.generate(Role.COORDINATOR)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "c.sqlite3")
    yield s
    s.close()


def _request(token: EnrollmentToken, device: Identity, *, proof: str | None = None) -> bytes:
    request = token.request(device, at=NOW)
    if proof is not None:
        request = request.model_copy(update={"proof": proof})
    return sign_message(request, device)


def test_enroll_once_and_reply_is_signed(store: Store, coordinator: Identity) -> None:
    token = issue_token(store, coordinator, "pi-1", now=NOW)
    assert token.secret not in store.path.read_bytes()  # sealed, never stored in clear
    device = Identity.generate(Role.DEVICE)
    outcome = enroll(store, coordinator, _request(token, device), topic_device=device.id, now=NOW)
    reply = open_signed(outcome.reply, EnrollmentReply, signer=coordinator.public)
    assert reply.accepted and reply.name == "pi-1" and token.pins(reply.coordinator_keys())
    assert StoreRegistry(store).device_keys(device.id) == device.public
    # The same device again (its reply was lost): accepted again, nothing new recorded.
    again = enroll(store, coordinator, _request(token, device), topic_device=device.id, now=NOW)
    assert again.accepted and len(store.devices()) == 1
    # Another device with the used token: refused.
    other = Identity.generate(Role.DEVICE)
    used = enroll(store, coordinator, _request(token, other), topic_device=other.id, now=NOW)
    assert used.refusal is EnrollmentRefusal.TOKEN_USED
    # Revoked: the registry forgets it and a retry is refused.
    store.set_device_status("pi-1", DeviceStatus.REVOKED)
    with pytest.raises(UnknownDevice):
        StoreRegistry(store).device_keys(device.id)
    revoked = enroll(store, coordinator, _request(token, device), topic_device=device.id, now=NOW)
    assert revoked.refusal is EnrollmentRefusal.REVOKED


@pytest.mark.parametrize(
    ("case", "refusal"),
    [
        ("unknown", EnrollmentRefusal.UNKNOWN_TOKEN),
        ("expired", EnrollmentRefusal.TOKEN_EXPIRED),
        ("bad_proof", EnrollmentRefusal.BAD_PROOF),
        ("other_coordinator", EnrollmentRefusal.UNKNOWN_TOKEN),
    ],
)
def test_refusals(store: Store, coordinator: Identity, case: str, refusal: EnrollmentRefusal) -> None:
    device = Identity.generate(Role.DEVICE)
    token = issue_token(store, coordinator, "pi-2", now=NOW, ttl=timedelta(hours=1))
    now, me, proof = NOW, coordinator, None
    if case == "unknown":
        token = EnrollmentToken.generate(coordinator.public)
    elif case == "expired":
        now = NOW + timedelta(hours=2)
    elif case == "bad_proof":
        proof = "0" * 64
    else:
        me = Identity.generate(Role.COORDINATOR)
    outcome = enroll(store, me, _request(token, device, proof=proof), topic_device=device.id, now=now)
    assert outcome.refusal is refusal and not outcome.accepted
    assert store.find_device(device.id) is None


def test_unusable_requests_get_no_reply(store: Store, coordinator: Identity) -> None:
    token = issue_token(store, coordinator, "pi-3", now=NOW)
    device, other = Identity.generate(Role.DEVICE), Identity.generate(Role.DEVICE)
    with pytest.raises(EnrollmentError):
        enroll(store, coordinator, b"garbage", topic_device=None, now=NOW)
    with pytest.raises(EnrollmentError):  # on another device's topic
        enroll(store, coordinator, _request(token, device), topic_device=other.id, now=NOW)
    with pytest.raises(EnrollmentError):  # signed by a key other than the one it carries
        enroll(
            store, coordinator, sign_message(token.request(device, at=NOW), other), topic_device=None, now=NOW
        )


def test_token_rules(store: Store, coordinator: Identity) -> None:
    with pytest.raises(EnrollmentError):
        issue_token(store, coordinator, "no spaces", now=NOW)
    with pytest.raises(EnrollmentError):
        issue_token(store, coordinator, "pi", now=NOW, ttl=timedelta(0))
