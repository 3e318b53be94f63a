"""The fleet's messages: typed, versioned, validated at construction (docs/fleet-protocol.md).

Each message travels as one :mod:`fleet.framing` frame: its fields as the JSON header, plus
``"kind"`` (which message) and ``"v"`` (the schema version of that kind), and a binary payload for
the kinds that carry one (a release's tensors). Signed and sealed forms wrap the same header
(:mod:`fleet.sealing`); the plain :meth:`Message.to_wire` / :meth:`Message.from_wire` are the
unsigned form, for tests, files and local use.

======================  ==========================  =========================================
kind                    model                       sent by, to (topic)
======================  ==========================  =========================================
``round``               :class:`RoundSpec`          coordinator, signed -> ``rounds`` (retained)
``update``              :class:`UpdateHeader`       device, sealed -> ``devices/<id>/update``
``release``             :class:`Release`            coordinator, signed -> ``releases`` (retained)
``status``              :class:`DeviceStatus`       device, signed -> ``devices/<id>/status``
``telemetry``           :class:`Telemetry`          device, signed -> ``devices/<id>/telemetry``
``enroll_request``      :class:`EnrollmentRequest`  device, self-signed -> ``devices/<id>/enroll``
``enroll_reply``        :class:`EnrollmentReply`    coordinator, signed -> ``devices/<id>/enrolled``
======================  ==========================  =========================================
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet.codec import CodecParams
from fleet.errors import MessageError, UnsupportedVersion
from fleet.framing import DEFAULT_LIMITS, Frame, Limits, pack, unpack
from fleet.keys import PublicKeys, Role
from fleet.tensors import (
    DEFAULT_TENSOR_LIMITS,
    FloatArray,
    Layout,
    TensorDType,
    TensorInfo,
    TensorLimits,
    pack_dense,
    unpack_dense,
)

MessageT = TypeVar("MessageT", bound="Message")

DeviceId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
HexKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Nonce = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{48}$")]
"""24 random bytes, hex: an update's nonce (also its box nonce)."""
RoundId = Annotated[int, Field(ge=1, le=2**53)]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]
ShortLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
"""A version string or a board name: no spaces, nothing free-form."""
TokenId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class MessageKind(str, Enum):
    ROUND = "round"
    UPDATE = "update"
    RELEASE = "release"
    STATUS = "status"
    TELEMETRY = "telemetry"
    ENROLL_REQUEST = "enroll_request"
    ENROLL_REPLY = "enroll_reply"


def describe_validation_error(exc: ValidationError, *, limit: int = 4) -> str:
    """A short summary (field paths and messages, never the offending values)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:limit]:
        loc = ".".join(str(p) for p in error["loc"])[:80]
        parts.append(f"{loc or '(message)'}: {error['msg'][:120]}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Message(_Model):
    """Base of the wire messages. Subclasses set ``KIND`` and define ``v: Literal[VERSION]``."""

    KIND: ClassVar[MessageKind]
    VERSION: ClassVar[int] = 1

    def header(self) -> dict[str, Any]:
        """The JSON header: ``kind``, ``v`` and the fields (binary fields excluded)."""
        return {"kind": self.KIND.value, **self.model_dump(mode="json")}

    def wire_payload(self) -> bytes:
        """The binary payload this message carries after its header (none by default)."""
        return b""

    def to_wire(self, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
        """The unsigned frame. Use :mod:`fleet.sealing` for what goes on the fleet broker."""
        return pack(self.header(), self.wire_payload(), limits=limits)

    @classmethod
    def from_parts(cls: type[MessageT], header: Mapping[str, Any], payload: bytes = b"") -> MessageT:
        """Validate a decoded header (and payload) as this kind of message."""
        kind = header.get("kind")
        if kind != cls.KIND.value:
            raise MessageError(f"expected a {cls.KIND.value!r} message, got kind {str(kind)[:40]!r}")
        version = header.get("v")
        if type(version) is not int or version != cls.VERSION:
            raise UnsupportedVersion(
                f"{cls.KIND.value} message version {str(version)[:20]} is not supported "
                f"(this build speaks {cls.VERSION})"
            )
        fields = {k: v for k, v in header.items() if k != "kind"}
        try:
            return cls._validate_parts(fields, payload)
        except ValidationError as exc:
            raise MessageError(
                f"invalid {cls.KIND.value} message: {describe_validation_error(exc)}"
            ) from None

    @classmethod
    def _validate_parts(cls: type[MessageT], fields: dict[str, Any], payload: bytes) -> MessageT:
        if payload:
            raise MessageError(f"a {cls.KIND.value} message carries no payload")
        return cls.model_validate(fields)

    @classmethod
    def from_frame(cls: type[MessageT], frame: Frame) -> MessageT:
        return cls.from_parts(frame.header, frame.payload)

    @classmethod
    def from_wire(cls: type[MessageT], data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> MessageT:
        """Decode an unsigned frame of this kind; any defect raises a :class:`WireError`."""
        return cls.from_frame(unpack(data, limits=limits))


# -- round specs ----------------------------------------------------------------------------------


class LoraSpec(_Model):
    """The fleet adapter's shape (FFA-LoRA: A is derived from ``ffa_seed`` and frozen; B is trained)."""

    rank: int = Field(ge=1, le=256)
    alpha: float = Field(gt=0.0, le=4096.0)
    target_modules: tuple[ModuleName, ...] = Field(min_length=1, max_length=16)
    ffa_seed: Seed

    @field_validator("target_modules")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("target modules must be unique")
        return value


class PrivacyTarget(_Model):
    """The (ε, δ) a device may spend on this round's training."""

    epsilon: float = Field(gt=0.0, le=100.0)
    delta: float = Field(gt=0.0, lt=1.0)


class RoundSpec(Message):
    """A round announcement: what to train, how to encode it, by when."""

    KIND = MessageKind.ROUND
    v: Literal[1] = 1
    round_id: RoundId
    announced_at: AwareDatetime
    deadline: AwareDatetime
    min_devices: int = Field(ge=1, le=1_000_000)
    target_devices: int = Field(ge=1, le=1_000_000)
    local_epochs: int = Field(ge=1, le=100)
    learning_rate: float = Field(gt=0.0, le=10.0)
    lora: LoraSpec
    norm_bound: float = Field(gt=0.0, le=1e6)
    codec: CodecParams = CodecParams()
    privacy: PrivacyTarget
    base_model_sha256: Sha256

    @model_validator(mode="after")
    def _consistent(self) -> RoundSpec:
        if self.deadline <= self.announced_at:
            raise ValueError("the deadline must come after the announcement")
        if self.target_devices < self.min_devices:
            raise ValueError("target_devices must be at least min_devices")
        return self


# -- updates --------------------------------------------------------------------------------------


class UpdateHeader(Message):
    """The clear header of a sealed update; the encoded update itself is the ciphertext after it."""

    KIND = MessageKind.UPDATE
    v: Literal[1] = 1
    round_id: RoundId
    device_id: DeviceId
    nonce: Nonce
    sample_count: int = Field(ge=1, le=1_000_000_000)
    norm_bound: float = Field(gt=0.0, le=1e6)
    epsilon: float = Field(ge=0.0, le=100.0)
    delta: float = Field(ge=0.0, lt=1.0)
    codec: CodecParams
    sent_at: AwareDatetime


# -- releases -------------------------------------------------------------------------------------


class Release(Message):
    """A global fleet adapter: the aggregated B matrices and what they fit. Tensors are the payload."""

    KIND = MessageKind.RELEASE
    v: Literal[1] = 1
    version: int = Field(ge=1, le=2**53)
    round_id: RoundId | None = None
    created_at: AwareDatetime
    base_model_sha256: Sha256
    lora: LoraSpec
    tensors: tuple[TensorInfo, ...] = Field(min_length=1, max_length=DEFAULT_TENSOR_LIMITS.max_tensors)
    data: bytes = Field(default=b"", exclude=True, repr=False)

    @model_validator(mode="after")
    def _sized(self) -> Release:
        needed = sum(info.nbytes for info in self.tensors)
        if len(self.data) != needed:
            raise ValueError(f"the tensor data is {len(self.data)} bytes, the table describes {needed}")
        return self

    @classmethod
    def build(
        cls,
        arrays: Mapping[str, NDArray[np.floating]],
        *,
        dtype: TensorDType = TensorDType.FLOAT32,
        **fields: Any,
    ) -> Release:
        """A release holding ``arrays`` (the B matrices by name); ``fields`` are the other fields."""
        infos, data = pack_dense(arrays, dtype=dtype)
        return cls(tensors=infos, data=data, **fields)

    def arrays(
        self, *, limits: TensorLimits = DEFAULT_TENSOR_LIMITS, expected: Layout | None = None
    ) -> dict[str, FloatArray]:
        """The B matrices as float32 arrays, checked against ``limits`` and ``expected``."""
        return unpack_dense(self.tensors, self.data, limits=limits, expected=expected)

    def wire_payload(self) -> bytes:
        return self.data

    @classmethod
    def _validate_parts(cls: type[MessageT], fields: dict[str, Any], payload: bytes) -> MessageT:
        if "data" in fields:
            raise MessageError("a release's tensor data travels as its payload, not in its header")
        return cls.model_validate({**fields, "data": payload})


# -- device status and telemetry -----------------------------------------------------------------


class DeviceState(str, Enum):
    ONLINE = "online"
    IDLE = "idle"
    TRAINING = "training"
    OFFLINE = "offline"  # the last will, published by the broker when the device drops


class DeviceStatus(Message):
    """What a device runs and does; retained on its status topic."""

    KIND = MessageKind.STATUS
    v: Literal[1] = 1
    device_id: DeviceId
    state: DeviceState
    at: AwareDatetime
    adapter_version: int | None = Field(default=None, ge=1, le=2**53)
    base_model_sha256: Sha256 | None = None
    round_id: RoundId | None = None
    agent_version: ShortLabel | None = None


class Telemetry(Message):
    """Non-sensitive health numbers. No free text: every field is a bounded number or a label."""

    KIND = MessageKind.TELEMETRY
    v: Literal[1] = 1
    device_id: DeviceId
    at: AwareDatetime
    uptime_s: float = Field(ge=0.0, le=1e10)
    cpu_percent: float | None = Field(default=None, ge=0.0, le=100.0)
    memory_used_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    temperature_c: float | None = Field(default=None, ge=-60.0, le=200.0)
    disk_free_bytes: int | None = Field(default=None, ge=0, le=2**62)
    on_mains: bool | None = None
    board: ShortLabel | None = None
    tokens_per_second: float | None = Field(default=None, ge=0.0, le=1e6)
    training: bool = False


# -- enrollment -----------------------------------------------------------------------------------


class EnrollmentRequest(Message):
    """A device's public keys, with an HMAC proof of its one-time token (:mod:`fleet.enrollment`).

    Sent self-signed: the signature verifies against ``signing_key``, proving the device holds it.
    """

    KIND = MessageKind.ENROLL_REQUEST
    v: Literal[1] = 1
    device_id: DeviceId
    signing_key: HexKey
    encryption_key: HexKey
    token_id: TokenId
    proof: Sha256
    requested_at: AwareDatetime

    @model_validator(mode="after")
    def _id_matches_key(self) -> EnrollmentRequest:
        if self.public_keys().id != self.device_id:
            raise ValueError("device_id is not the one derived from signing_key")
        return self

    def public_keys(self) -> PublicKeys:
        return PublicKeys(Role.DEVICE, bytes.fromhex(self.signing_key), bytes.fromhex(self.encryption_key))


class EnrollmentRefusal(str, Enum):
    """Why an enrollment was refused (codes, not secrets)."""

    UNKNOWN_TOKEN = "unknown_token"  # noqa: S105
    TOKEN_USED = "token_used"  # noqa: S105
    TOKEN_EXPIRED = "token_expired"  # noqa: S105
    BAD_PROOF = "bad_proof"
    REVOKED = "revoked"


class EnrollmentReply(Message):
    """The coordinator's answer, signed by it; carries its public keys (pinned by the token)."""

    KIND = MessageKind.ENROLL_REPLY
    v: Literal[1] = 1
    device_id: DeviceId
    accepted: bool
    refusal: EnrollmentRefusal | None = None
    name: ShortLabel | None = None
    coordinator_signing_key: HexKey
    coordinator_encryption_key: HexKey
    replied_at: AwareDatetime

    @model_validator(mode="after")
    def _reason(self) -> EnrollmentReply:
        if self.accepted == (self.refusal is not None):
            raise ValueError("a refusal needs a reason, and an acceptance has none")
        return self

    def coordinator_keys(self) -> PublicKeys:
        return PublicKeys(
            Role.COORDINATOR,
            bytes.fromhex(self.coordinator_signing_key),
            bytes.fromhex(self.coordinator_encryption_key),
        )


MESSAGE_TYPES: dict[MessageKind, type[Message]] = {
    cls.KIND: cls
    for cls in (RoundSpec, UpdateHeader, Release, DeviceStatus, Telemetry, EnrollmentRequest, EnrollmentReply)
}


def message_type(header: Mapping[str, Any]) -> type[Message]:
    """The message class a decoded header names."""
    try:
        return MESSAGE_TYPES[MessageKind(header.get("kind"))]
    except ValueError:
        raise MessageError(f"unknown message kind {str(header.get('kind'))[:40]!r}") from None


def decode_any(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode an unsigned frame of any kind."""
    frame = unpack(data, limits=limits)
    return message_type(frame.header).from_frame(frame)
