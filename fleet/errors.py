"""The fleet protocol's exception tree.

    FleetError                   base of every error the fleet package raises on purpose
    ├── TopicError               a topic or device id is malformed, or not one of the protocol's topics
    ├── WireError                received bytes do not parse: the base of every decoder's errors
    │   ├── FramingError         bad envelope: magic, version, lengths, JSON header, trailing bytes
    │   ├── TooLarge             a declared size is over a hard limit (checked before allocating)
    │   ├── MessageError         the header does not validate against its schema, or is the wrong kind
    │   │   └── UnsupportedVersion   the message's schema version is one this build does not speak
    │   └── CodecError           an encoded update or tensor table is malformed or out of bounds
    ├── KeyStoreError            a key file is missing, unreadable, corrupt or readable by others
    ├── TokenError               an enrollment token is malformed
    ├── SealError                a signed or sealed message does not open
    │   ├── SignatureError       the signature does not verify (tampered, forged, or the wrong key)
    │   ├── DecryptError         the ciphertext does not decrypt (tampered, or not sealed for us)
    │   └── UnknownDevice        the message names a device that is not enrolled (or was revoked)
    ├── ReplayRejected           an update is replayed, late, duplicate or for a round not open (``reason``)
    └── ResidualError            the error-feedback residual file is corrupt or does not fit the update

Foreign errors (``json``, ``pydantic.ValidationError``, ``nacl.exceptions``, ``zstandard.ZstdError``,
``OSError``) are translated into this tree where they are met, so a service can catch
:class:`FleetError` (or :class:`WireError` for anything received) and keep serving.
"""

from __future__ import annotations

from enum import Enum


class FleetError(Exception):
    """Base of the fleet package's errors."""


class TopicError(FleetError):
    pass


class WireError(FleetError):
    """Bytes received from a peer (or read from disk) do not decode. Never a crash."""


class FramingError(WireError):
    pass


class TooLarge(WireError):
    """A declared size exceeds a limit; raised before anything of that size is allocated."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} ({size}) is over the limit of {limit}")
        self.what = what
        self.size = size
        self.limit = limit


class MessageError(WireError):
    pass


class UnsupportedVersion(MessageError):
    pass


class CodecError(WireError):
    pass


class KeyStoreError(FleetError):
    pass


class TokenError(FleetError):
    pass


class SealError(FleetError):
    pass


class SignatureError(SealError):
    pass


class DecryptError(SealError):
    pass


class UnknownDevice(SealError):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is not enrolled")
        self.device_id = device_id


class ReplayReason(str, Enum):
    """Why the coordinator refused an otherwise valid update; stable, for logs and metrics."""

    UNKNOWN_ROUND = "unknown_round"  # no such round was opened
    ROUND_CLOSED = "round_closed"  # the round was aggregated or abandoned
    LATE = "late"  # received after the round's deadline
    DUPLICATE = "duplicate"  # this device already sent an update for this round
    NONCE_REUSED = "nonce_reused"  # the nonce was seen before (a replayed message)


class ReplayRejected(FleetError):
    def __init__(self, reason: ReplayReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class ResidualError(FleetError):
    pass
