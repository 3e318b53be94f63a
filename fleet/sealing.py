"""Signing, sealing and opening fleet messages (PyNaCl), and the coordinator's replay guard.

**Signed frame** (every message on the fleet broker): a :mod:`fleet.framing` frame whose payload is
``signature (64 bytes) || body``. The Ed25519 signature covers::

    b"ppchat/v1/signed\\0" || u32 BE len(header) || header bytes as framed || SHA-256(body)

so the header (its ``kind``, round id, device id, nonce, ...) and the body are bound together, and a
signature made for one kind of message cannot pass as another.

**Sealed update**: a signed frame whose header is an :class:`~fleet.messages.UpdateHeader` and whose
body is ``crypto_box(encoded update)`` from the device's X25519 key to the coordinator's, with the
header's 24-byte ``nonce`` as the box nonce (the body holds the ciphertext and its 16-byte tag only).
The box authenticates the sender's encryption key, so a ciphertext copied under another device's
header (and re-signed by that device) does not decrypt; the signature makes every update attributable.

Coordinator messages (round specs, releases, enrollment replies) are signed frames verified with the
coordinator's public key; device messages (status, telemetry) with the enrolled device's key; an
enrollment request with the key it carries.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils

from fleet.errors import (
    DecryptError,
    FramingError,
    MessageError,
    ReplayReason,
    ReplayRejected,
    SignatureError,
)
from fleet.framing import DEFAULT_LIMITS, Limits, encode_header, pack_raw, unpack
from fleet.keys import Identity, PublicKeys
from fleet.messages import (
    DeviceStatus,
    EnrollmentRequest,
    Message,
    Telemetry,
    UpdateHeader,
)

SIGNATURE_SIZE = 64
NONCE_SIZE = nacl.public.Box.NONCE_SIZE
BOX_OVERHEAD = 16  # the Poly1305 tag
_CONTEXT = b"ppchat/v1/signed\x00"
_U32 = struct.Struct(">I")

MessageT = TypeVar("MessageT", bound=Message)
DeviceMessageT = TypeVar("DeviceMessageT", DeviceStatus, Telemetry)


class DeviceRegistry(Protocol):
    """Where the coordinator looks up enrolled devices' public keys."""

    def device_keys(self, device_id: str) -> PublicKeys:
        """The device's keys; raise :class:`~fleet.errors.UnknownDevice` if not enrolled or revoked."""
        ...


def new_nonce() -> str:
    """A fresh random nonce for an update header (24 bytes, hex)."""
    return nacl.utils.random(NONCE_SIZE).hex()


def _to_sign(header_bytes: bytes, body: bytes) -> bytes:
    return _CONTEXT + _U32.pack(len(header_bytes)) + header_bytes + hashlib.sha256(body).digest()


# -- signed frames --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedFrame:
    """A received signed frame, not yet verified."""

    header: dict[str, Any]
    header_bytes: bytes
    signature: bytes
    body: bytes

    def verify(self, keys: PublicKeys) -> None:
        """Raise :class:`SignatureError` unless ``keys`` signed this frame."""
        try:
            nacl.bindings.crypto_sign_open(
                self.signature + _to_sign(self.header_bytes, self.body), keys.signing
            )
        except (nacl.exceptions.CryptoError, ValueError):
            raise SignatureError(f"signature does not verify with {keys.role.value} {keys.id}") from None


def sign_frame(
    header: Mapping[str, Any], body: bytes, identity: Identity, *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """A signed frame holding ``header`` and ``body``."""
    header_bytes = encode_header(header)
    signature = identity.signing_key.sign(_to_sign(header_bytes, body)).signature
    return pack_raw(header_bytes, signature + body, limits=limits)


def read_signed(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> SignedFrame:
    """Split a signed frame (signature unchecked)."""
    frame = unpack(data, limits=limits)
    if len(frame.payload) < SIGNATURE_SIZE:
        raise FramingError("signed frame too short to hold its signature")
    return SignedFrame(
        header=frame.header,
        header_bytes=frame.header_bytes,
        signature=frame.payload[:SIGNATURE_SIZE],
        body=frame.payload[SIGNATURE_SIZE:],
    )


def sign_message(message: Message, identity: Identity, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The signed wire form of ``message`` (its payload, if any, is the signed body)."""
    return sign_frame(message.header(), message.wire_payload(), identity, limits=limits)


def open_signed(
    data: bytes, cls: type[MessageT], *, signer: PublicKeys, limits: Limits = DEFAULT_LIMITS
) -> MessageT:
    """Verify a frame signed by ``signer`` (e.g. the coordinator), then decode it as ``cls``."""
    signed = read_signed(data, limits=limits)
    signed.verify(signer)
    return cls.from_parts(signed.header, signed.body)


def open_device_signed(
    data: bytes,
    cls: type[DeviceMessageT],
    *,
    registry: DeviceRegistry,
    device_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> DeviceMessageT:
    """Decode a device's message, then verify it with that device's enrolled key.

    ``device_id``, when given (from the topic), must be the one the message names.
    """
    signed = read_signed(data, limits=limits)
    message = cls.from_parts(signed.header, signed.body)
    _check_topic(message.device_id, device_id)
    signed.verify(registry.device_keys(message.device_id))
    return message


def open_enrollment(
    data: bytes, *, device_id: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> EnrollmentRequest:
    """Decode an enrollment request and verify it with the signing key it carries (proof of
    possession; the token proof is checked by :mod:`fleet.enrollment`)."""
    signed = read_signed(data, limits=limits)
    request = EnrollmentRequest.from_parts(signed.header, signed.body)
    _check_topic(request.device_id, device_id)
    signed.verify(request.public_keys())
    return request


def _check_topic(named: str, topic_device: str | None) -> None:
    if topic_device is not None and topic_device != named:
        raise MessageError(f"message on device {topic_device!r}'s topic names device {named!r}")


# -- sealed updates -------------------------------------------------------------------------------


def seal_update(
    header: UpdateHeader,
    encoded: bytes,
    *,
    device: Identity,
    coordinator: PublicKeys,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Encrypt ``encoded`` (a :mod:`fleet.codec` blob) to the coordinator and sign it with ``header``."""
    if header.device_id != device.id:
        raise ValueError(f"the header names device {header.device_id!r} but the identity is {device.id!r}")
    box = nacl.public.Box(device.encryption_key, coordinator.box_key)
    ciphertext = box.encrypt(encoded, bytes.fromhex(header.nonce)).ciphertext
    return sign_frame(header.header(), ciphertext, device, limits=limits)


@dataclass(frozen=True)
class OpenedUpdate:
    header: UpdateHeader
    encoded: bytes
    """The decrypted :mod:`fleet.codec` blob; decode it with the round's expected layout."""


class UpdateOpener:
    """Verifies and decrypts sealed updates for the coordinator, caching each device's box key."""

    def __init__(
        self,
        coordinator: Identity,
        registry: DeviceRegistry,
        *,
        limits: Limits = DEFAULT_LIMITS,
        cache_size: int = 4096,
    ) -> None:
        self._coordinator = coordinator
        self._registry = registry
        self._limits = limits
        self._cache_size = cache_size
        self._boxes: OrderedDict[bytes, nacl.public.Box] = OrderedDict()

    def _box(self, keys: PublicKeys) -> nacl.public.Box:
        box = self._boxes.get(keys.encryption)
        if box is None:
            try:
                box = nacl.public.Box(self._coordinator.encryption_key, keys.box_key)
            except nacl.exceptions.CryptoError:
                raise DecryptError(f"device {keys.id} has an unusable encryption key") from None
            self._boxes[keys.encryption] = box
            if len(self._boxes) > self._cache_size:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(keys.encryption)
        return box

    def open(self, data: bytes, *, device_id: str | None = None) -> OpenedUpdate:
        """Parse, verify (enrolled device key), decrypt. ``device_id``: the topic's device, if known.

        Raises :class:`~fleet.errors.WireError` (malformed), :class:`~fleet.errors.UnknownDevice`,
        :class:`SignatureError` or :class:`DecryptError`. Replay checks are :class:`ReplayGuard`'s.
        """
        signed = read_signed(data, limits=self._limits)
        header = UpdateHeader.from_parts(signed.header)
        _check_topic(header.device_id, device_id)
        keys = self._registry.device_keys(header.device_id)
        signed.verify(keys)
        try:
            encoded = self._box(keys).decrypt(signed.body, bytes.fromhex(header.nonce))
        except nacl.exceptions.CryptoError:
            raise DecryptError(f"update from {header.device_id} does not decrypt") from None
        return OpenedUpdate(header=header, encoded=encoded)


# -- replay protection ----------------------------------------------------------------------------


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


@dataclass
class _Round:
    deadline: datetime
    devices: set[str]
    closed: bool = False


class ReplayGuard:
    """Accepts one update per device per open round, before the round's deadline, never a nonce twice.

    Pure bookkeeping over an injected clock; the coordinator rebuilds it after a restart by calling
    :meth:`open_round` and :meth:`record` for what its store holds. Call :meth:`check` before the
    expensive work (after the signature verified), and :meth:`record` once the update is stored.
    """

    def __init__(self, *, clock: Clock, grace: timedelta = timedelta(0), max_nonces: int = 1_000_000) -> None:
        self._clock = clock
        self._grace = grace
        self._rounds: dict[int, _Round] = {}
        self._nonces: set[str] = set()
        self._nonce_order: deque[str] = deque()
        self._max_nonces = max_nonces

    def open_round(self, round_id: int, *, deadline: datetime) -> None:
        if deadline.tzinfo is None:
            raise ValueError("the deadline must be timezone-aware")
        existing = self._rounds.get(round_id)
        if existing is None:
            self._rounds[round_id] = _Round(deadline=deadline, devices=set())
        else:
            existing.deadline = deadline

    def close_round(self, round_id: int) -> None:
        if round_id in self._rounds:
            self._rounds[round_id].closed = True

    def accepted(self, round_id: int) -> frozenset[str]:
        """The devices whose update for ``round_id`` was recorded."""
        state = self._rounds.get(round_id)
        return frozenset(state.devices) if state else frozenset()

    def check(self, header: UpdateHeader) -> None:
        """Raise :class:`ReplayRejected` if ``header``'s update must be refused; record nothing."""
        if header.nonce in self._nonces:
            raise ReplayRejected(ReplayReason.NONCE_REUSED, f"nonce from {header.device_id} was seen before")
        state = self._rounds.get(header.round_id)
        if state is None:
            raise ReplayRejected(ReplayReason.UNKNOWN_ROUND, f"round {header.round_id} is not open")
        if state.closed:
            raise ReplayRejected(ReplayReason.ROUND_CLOSED, f"round {header.round_id} is closed")
        now = self._clock.now()
        if now > state.deadline + self._grace:
            raise ReplayRejected(
                ReplayReason.LATE, f"round {header.round_id}'s deadline was {state.deadline.isoformat()}"
            )
        if header.device_id in state.devices:
            raise ReplayRejected(
                ReplayReason.DUPLICATE,
                f"{header.device_id} already sent an update for round {header.round_id}",
            )

    def record(self, header: UpdateHeader) -> None:
        """Mark ``header``'s device as done for its round and its nonce as used (no checks)."""
        state = self._rounds.get(header.round_id)
        if state is not None:
            state.devices.add(header.device_id)
        if header.nonce not in self._nonces:
            self._nonces.add(header.nonce)
            self._nonce_order.append(header.nonce)
            while len(self._nonce_order) > self._max_nonces:
                self._nonces.discard(self._nonce_order.popleft())

    def accept(self, header: UpdateHeader) -> None:
        """:meth:`check`, then :meth:`record`."""
        self.check(header)
        self.record(header)
