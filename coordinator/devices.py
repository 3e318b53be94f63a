"""Devices: the registry the update opener consults, and enrollment with one-time tokens.

``coordinator devices add NAME`` (:func:`issue_token`) makes a :class:`fleet.enrollment.EnrollmentToken`
and records its id, the name it is for and its secret *sealed* under a key derived from the
coordinator's signing key (the device's HMAC proof needs the secret, so it cannot be stored hashed;
sealed, a copy of the database alone does not let anyone enroll). The device answers with a
self-signed :class:`~fleet.messages.EnrollmentRequest`; :func:`enroll` checks it and returns the
signed :class:`~fleet.messages.EnrollmentReply` to publish. Enrolling the same device again with the
same token (a lost reply) is accepted again; anything else a used token is refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import nacl.exceptions
import nacl.secret
from pydantic import TypeAdapter, ValidationError

from coordinator.errors import Conflict, EnrollmentError
from coordinator.store import DeviceStatus, Store
from fleet.enrollment import EnrollmentToken, coordinator_pin
from fleet.errors import FleetError, UnknownDevice
from fleet.keys import Identity, PublicKeys, Role
from fleet.messages import EnrollmentRefusal, EnrollmentReply, EnrollmentRequest, ShortLabel
from fleet.sealing import open_enrollment, sign_message

log = logging.getLogger("coordinator.devices")

DEFAULT_TOKEN_TTL = timedelta(days=7)


class StoreRegistry:
    """``fleet.sealing.DeviceRegistry`` over the store: active devices' keys, revoked ones unknown."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def device_keys(self, device_id: str) -> PublicKeys:
        record = self._store.find_device(device_id)
        if record is None or record.status is not DeviceStatus.ACTIVE:
            raise UnknownDevice(device_id)
        return PublicKeys(Role.DEVICE, record.signing_pk, record.encryption_pk)

    def is_revoked(self, device_id: str) -> bool:
        record = self._store.find_device(device_id)
        return record is not None and record.status is DeviceStatus.REVOKED


def _token_box(identity: Identity) -> nacl.secret.SecretBox:
    key = hashlib.sha256(b"ppchat/v1/token-box\x00" + bytes(identity.signing_key)).digest()
    return nacl.secret.SecretBox(key)


_NAME = TypeAdapter(ShortLabel)


def _check_name(name: str) -> str:
    try:
        return _NAME.validate_python(name)
    except ValidationError:
        raise EnrollmentError(
            f"invalid device name {name[:40]!r}: 1-64 characters of A-Z a-z 0-9 . _ + -, "
            "starting with a letter or digit"
        ) from None


def issue_token(
    store: Store, identity: Identity, name: str, *, now: datetime, ttl: timedelta = DEFAULT_TOKEN_TTL
) -> EnrollmentToken:
    """A new one-time token for the device to be called ``name`` (print it once; it is not kept)."""
    _check_name(name)
    if ttl <= timedelta(0):
        raise EnrollmentError("a token's lifetime must be positive")
    token = EnrollmentToken.generate(identity.public)
    store.add_token(
        token.token_id,
        device_name=name,
        secret_box=bytes(_token_box(identity).encrypt(token.secret)),
        now=now.timestamp(),
        ttl_s=ttl.total_seconds(),
    )
    return token


@dataclass(frozen=True)
class EnrollmentOutcome:
    device_id: str
    accepted: bool
    refusal: EnrollmentRefusal | None
    name: str | None
    reply: bytes
    """The signed reply, for ``devices/<id>/enrolled``."""


def enroll(
    store: Store, identity: Identity, payload: bytes, *, topic_device: str | None, now: datetime
) -> EnrollmentOutcome:
    """Check an enrollment request and record the device; raise EnrollmentError if the request itself
    is unusable (malformed or not signed by the key it carries: no reply can be trusted to anyone)."""
    try:
        request = open_enrollment(payload, device_id=topic_device)
    except FleetError as exc:
        raise EnrollmentError(f"unusable enrollment request: {exc}") from exc
    refusal, name = _decide(store, identity, request, now=now)
    reply = EnrollmentReply(
        device_id=request.device_id,
        accepted=refusal is None,
        refusal=refusal,
        name=name if refusal is None else None,
        coordinator_signing_key=identity.public.signing.hex(),
        coordinator_encryption_key=identity.public.encryption.hex(),
        replied_at=now,
    )
    if refusal is None:
        log.info("enrolled device %s as %r", request.device_id, name)
    else:
        log.warning("refused enrollment of %s: %s", request.device_id, refusal.value)
    return EnrollmentOutcome(
        device_id=request.device_id,
        accepted=refusal is None,
        refusal=refusal,
        name=name,
        reply=sign_message(reply, identity),
    )


def _decide(
    store: Store, identity: Identity, request: EnrollmentRequest, *, now: datetime
) -> tuple[EnrollmentRefusal | None, str | None]:
    token = store.find_token(request.token_id)
    if token is None:
        return EnrollmentRefusal.UNKNOWN_TOKEN, None
    try:
        secret = _token_box(identity).decrypt(token.secret_box)
    except nacl.exceptions.CryptoError:
        # Sealed under another coordinator key: the store and the keys do not belong together.
        log.error("enrollment token %s does not open with this coordinator's key", token.token_id)
        return EnrollmentRefusal.UNKNOWN_TOKEN, None
    keys = request.public_keys()
    if not EnrollmentToken(token.token_id, secret, coordinator_pin(identity.public)).check_proof(
        request.proof, keys
    ):
        return EnrollmentRefusal.BAD_PROOF, None
    existing = store.find_device(request.device_id)
    if token.used_at is not None:
        if token.device_id == request.device_id and existing is not None:
            if existing.status is DeviceStatus.REVOKED:
                return EnrollmentRefusal.REVOKED, None
            return None, existing.name  # the same device asking again: the reply was lost
        return EnrollmentRefusal.TOKEN_USED, None
    if now.timestamp() > token.expires_at:
        return EnrollmentRefusal.TOKEN_EXPIRED, None
    if existing is not None:
        # Already enrolled under another token (or revoked): a token does not rename or revive a device.
        if existing.status is DeviceStatus.REVOKED:
            return EnrollmentRefusal.REVOKED, None
        return EnrollmentRefusal.TOKEN_USED, None
    try:
        with store.transaction():
            store.use_token(token.token_id, device_id=request.device_id, now=now.timestamp())
            store.add_device(
                request.device_id,
                name=token.device_name,
                signing_pk=keys.signing,
                encryption_pk=keys.encryption,
                now=now.timestamp(),
            )
    except (Conflict, EnrollmentError):
        return EnrollmentRefusal.TOKEN_USED, None
    return None, token.device_name
