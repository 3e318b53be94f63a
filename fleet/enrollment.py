"""One-time enrollment tokens: how a device proves it was invited and pins the coordinator's keys.

``coordinator devices add NAME`` makes a token and prints it::

    ppe1.<token id>.<secret>.<coordinator pin>      (base64url, no padding)

The device sends an :class:`~fleet.messages.EnrollmentRequest` (self-signed) carrying its public keys
and ``proof = HMAC-SHA256(secret, "ppchat/v1/enroll" || token id || device id || keys)``: the secret
never crosses the broker. The coordinator checks the proof (:meth:`EnrollmentToken.check_proof`),
records the keys and answers with an :class:`~fleet.messages.EnrollmentReply` signed by its key and
carrying its public keys, which the device accepts only if they match the token's pin.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from fleet.errors import TokenError
from fleet.keys import Identity, PublicKeys
from fleet.messages import EnrollmentRequest

TOKEN_PREFIX = "ppe1"  # noqa: S105 (a format tag, not a secret)
SECRET_SIZE = 32
_TOKEN = re.compile(r"ppe1\.([A-Za-z0-9_-]{12})\.([A-Za-z0-9_-]{43})\.([A-Za-z0-9_-]{22})")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def coordinator_pin(keys: PublicKeys) -> str:
    """128 bits of the coordinator's public keys' hash, as the token carries them."""
    digest = hashlib.sha256(b"ppchat/v1/pin\x00" + keys.signing + keys.encryption).digest()
    return _b64(digest[:16])


@dataclass(frozen=True)
class EnrollmentToken:
    token_id: str
    secret: bytes
    pin: str

    def __post_init__(self) -> None:
        if len(self.secret) != SECRET_SIZE:
            raise TokenError("an enrollment secret is 32 bytes")

    def __repr__(self) -> str:  # never print the secret by accident
        return f"EnrollmentToken({self.token_id!r})"

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.token_id}.{_b64(self.secret)}.{self.pin}"

    @classmethod
    def generate(cls, coordinator: PublicKeys) -> EnrollmentToken:
        return cls(
            _b64(secrets.token_bytes(9)), secrets.token_bytes(SECRET_SIZE), coordinator_pin(coordinator)
        )

    @classmethod
    def parse(cls, text: str) -> EnrollmentToken:
        match = _TOKEN.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise TokenError("not an enrollment token (expected ppe1.<id>.<secret>.<pin>)")
        try:
            secret = _unb64(match.group(2))
        except (binascii.Error, ValueError):
            raise TokenError("the token's secret is not base64url") from None
        return cls(match.group(1), secret, match.group(3))

    def proof(self, device: PublicKeys) -> str:
        message = b"\x00".join(
            (
                b"ppchat/v1/enroll",
                self.token_id.encode(),
                device.id.encode(),
                device.signing,
                device.encryption,
            )
        )
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def check_proof(self, proof: str, device: PublicKeys) -> bool:
        return hmac.compare_digest(self.proof(device), proof)

    def pins(self, coordinator: PublicKeys) -> bool:
        return hmac.compare_digest(coordinator_pin(coordinator), self.pin)

    def request(self, device: Identity, *, at: datetime) -> EnrollmentRequest:
        """The enrollment request for ``device`` (sign it with :func:`fleet.sealing.sign_message`)."""
        return EnrollmentRequest(
            device_id=device.id,
            signing_key=device.public.signing.hex(),
            encryption_key=device.public.encryption.hex(),
            token_id=self.token_id,
            proof=self.proof(device.public),
            requested_at=at,
        )
