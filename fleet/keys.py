"""Device and coordinator identities: an Ed25519 key to sign, an X25519 key to receive sealed data.

Keys are generated where they are used (on the device, on the coordinator) with PyNaCl and stored
in a directory:

    identity.key   0600  {"kind": "ppchat-identity", "v": 1, "role", "signing_seed", "encryption_key"}
    identity.pub   0644  {"kind": "ppchat-public-keys", "v": 1, "role", "id", "signing", "encryption"}

(keys as lowercase hex).

Loading the secret file refuses a file that is not a regular file owned by us, or that group or
others may read. A party's id is derived from its signing public key (:func:`derive_id`), so an id
cannot be claimed without the matching key.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import nacl.exceptions
import nacl.public
import nacl.signing
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from fleet.errors import KeyStoreError
from fleet.files import write_atomic, write_secret

KEY_FILE_VERSION: Final = 1
SECRET_FILE = "identity.key"  # noqa: S105 (a file name)
PUBLIC_FILE = "identity.pub"
KEY_SIZE = 32
_MAX_KEY_FILE = 4096

HexKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Role(str, Enum):
    DEVICE = "device"
    COORDINATOR = "coordinator"

    @property
    def id_prefix(self) -> str:
        return "dev-" if self is Role.DEVICE else "coord-"


def derive_id(role: Role, signing_public: bytes) -> str:
    """The id of the party holding ``signing_public``: a prefix and 128 bits of its hash."""
    digest = hashlib.sha256(b"ppchat/v1/id\x00" + role.value.encode() + b"\x00" + signing_public).digest()
    return role.id_prefix + digest[:16].hex()


@dataclass(frozen=True)
class PublicKeys:
    """A party's public keys: ``signing`` (Ed25519) and ``encryption`` (X25519), 32 bytes each."""

    role: Role
    signing: bytes
    encryption: bytes

    def __post_init__(self) -> None:
        if len(self.signing) != KEY_SIZE or len(self.encryption) != KEY_SIZE:
            raise KeyStoreError("public keys must be 32 bytes each")

    @property
    def id(self) -> str:
        return derive_id(self.role, self.signing)

    @property
    def fingerprint(self) -> str:
        """A short, human-comparable digest of both keys (``ab12-cd34-ef56-7890``)."""
        digest = hashlib.sha256(b"ppchat/v1/fingerprint\x00" + self.signing + self.encryption).hexdigest()
        return "-".join(digest[i : i + 4] for i in range(0, 16, 4))

    @property
    def verify_key(self) -> nacl.signing.VerifyKey:
        return nacl.signing.VerifyKey(self.signing)

    @property
    def box_key(self) -> nacl.public.PublicKey:
        return nacl.public.PublicKey(self.encryption)

    def to_json(self) -> dict[str, Any]:
        return _PublicFile(
            role=self.role, id=self.id, signing=self.signing.hex(), encryption=self.encryption.hex()
        ).model_dump(mode="json")

    @classmethod
    def from_json(cls, data: object) -> PublicKeys:
        try:
            parsed = _PublicFile.model_validate(data)
        except ValidationError as exc:
            raise KeyStoreError(f"invalid public keys: {exc.error_count()} errors") from None
        keys = cls(parsed.role, bytes.fromhex(parsed.signing), bytes.fromhex(parsed.encryption))
        if keys.id != parsed.id:
            raise KeyStoreError(f"public keys claim id {parsed.id!r} but their signing key gives {keys.id!r}")
        return keys


class _File(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _SecretFile(_File):
    kind: Literal["ppchat-identity"] = "ppchat-identity"
    v: Literal[1] = KEY_FILE_VERSION
    role: Role
    signing_seed: HexKey
    encryption_key: HexKey


class _PublicFile(_File):
    kind: Literal["ppchat-public-keys"] = "ppchat-public-keys"
    v: Literal[1] = KEY_FILE_VERSION
    role: Role
    id: str
    signing: HexKey
    encryption: HexKey


class Identity:
    """A party's secret keys. Construct with :meth:`generate` or :meth:`load`."""

    def __init__(
        self, role: Role, signing_key: nacl.signing.SigningKey, encryption_key: nacl.public.PrivateKey
    ) -> None:
        self.role = role
        self.signing_key = signing_key
        self.encryption_key = encryption_key
        self.public = PublicKeys(role, bytes(signing_key.verify_key), bytes(encryption_key.public_key))

    def __repr__(self) -> str:
        return f"Identity({self.role.value}, {self.id})"

    @property
    def id(self) -> str:
        return self.public.id

    @classmethod
    def generate(cls, role: Role) -> Identity:
        return cls(role, nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())

    def save(self, directory: Path) -> None:
        """Write ``identity.key`` (0600) and ``identity.pub`` (0644) atomically into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = _SecretFile(
            role=self.role,
            signing_seed=bytes(self.signing_key).hex(),
            encryption_key=bytes(self.encryption_key).hex(),
        )
        write_secret(directory / SECRET_FILE, secret.model_dump_json().encode())
        save_public(directory / PUBLIC_FILE, self.public)

    @classmethod
    def load(cls, directory: Path, *, role: Role) -> Identity:
        """Load the identity in ``directory``, checking its file's owner and permissions."""
        path = Path(directory) / SECRET_FILE
        raw = _read_private(path)
        try:
            parsed = _SecretFile.model_validate_json(raw)
        except ValidationError as exc:
            raise KeyStoreError(f"key file {path} is corrupt: {exc.error_count()} errors") from None
        if parsed.role is not role:
            raise KeyStoreError(
                f"key file {path} holds a {parsed.role.value} identity, not a {role.value} one"
            )
        try:
            return cls(
                role,
                nacl.signing.SigningKey(bytes.fromhex(parsed.signing_seed)),
                nacl.public.PrivateKey(bytes.fromhex(parsed.encryption_key)),
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise KeyStoreError(f"key file {path} holds invalid keys: {exc}") from None

    @classmethod
    def load_or_generate(cls, directory: Path, *, role: Role) -> Identity:
        if (Path(directory) / SECRET_FILE).exists():
            return cls.load(directory, role=role)
        identity = cls.generate(role)
        identity.save(directory)
        return identity


def _read_private(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyStoreError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyStoreError(f"cannot open key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyStoreError(f"key file {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise KeyStoreError(f"key file {path} is owned by uid {info.st_uid}, not by us ({os.geteuid()})")
        if info.st_mode & 0o077:
            raise KeyStoreError(
                f"key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                "run: chmod 600 " + str(path)
            )
        if info.st_size > _MAX_KEY_FILE:
            raise KeyStoreError(f"key file {path} is too large to be a key file")
        try:
            return fh.read(_MAX_KEY_FILE + 1)
        except OSError as exc:
            raise KeyStoreError(f"cannot read key file {path}: {exc.strerror}") from None


def save_public(path: Path, keys: PublicKeys) -> None:
    write_atomic(Path(path), (json.dumps(keys.to_json(), indent=2) + "\n").encode())


def load_public(path: Path, *, role: Role | None = None) -> PublicKeys:
    """Load a public key file (``identity.pub``), for example the coordinator's on a device."""
    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyStoreError(f"cannot read public key file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_KEY_FILE:
        raise KeyStoreError(f"public key file {path} is too large")
    try:
        data = json.loads(raw)
    except ValueError:
        raise KeyStoreError(f"public key file {path} is not JSON") from None
    keys = PublicKeys.from_json(data)
    if role is not None and keys.role is not role:
        raise KeyStoreError(f"public key file {path} holds {keys.role.value} keys, not {role.value} keys")
    return keys
