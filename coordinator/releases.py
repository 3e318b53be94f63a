"""Global adapter releases: build, sign and reopen them; persist the server optimizer's state.

A release (:class:`fleet.messages.Release`) names its version, the round that produced it, the base
model's SHA-256 and the LoRA spec (rank, alpha, target modules, frozen-A seed), and carries the global
B matrices: the previous compatible release's B plus the aggregated step (or the step alone when
there is none, LoRA's B starting at zero). It is signed by the coordinator
(:func:`fleet.sealing.sign_message`) and published retained.

The server optimizer's state travels nowhere; it is stored beside the release it led to, as a fleet
frame (JSON header + float32 tensors, :mod:`fleet.tensors`), never pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.aggregate import ServerOptimizer, ServerState, Tensors
from coordinator.errors import AggregationError, ReleaseError
from coordinator.store import ReleaseRecord, Store
from fleet.errors import FleetError
from fleet.framing import Limits, pack, unpack
from fleet.keys import Identity, PublicKeys
from fleet.messages import Release, RoundSpec
from fleet.sealing import open_signed, read_signed, sign_message
from fleet.tensors import TensorDType, TensorInfo, layout_of, pack_dense, unpack_dense

RELEASE_LIMITS = Limits(max_header=1 << 20, max_payload=256 * 1024 * 1024)


@dataclass(frozen=True)
class SignedRelease:
    release: Release
    frame: bytes
    """The signed frame to publish (and store)."""

    @property
    def signature(self) -> bytes:
        return read_signed(self.frame, limits=RELEASE_LIMITS).signature


def build_release(
    tensors: Tensors, *, version: int, spec: RoundSpec, created_at: datetime, identity: Identity
) -> SignedRelease:
    """The signed release of ``tensors`` (the new global B matrices) for ``spec``'s model and LoRA."""
    try:
        release = Release.build(
            tensors,
            dtype=TensorDType.FLOAT32,
            version=version,
            round_id=spec.round_id,
            created_at=created_at,
            base_model_sha256=spec.base_model_sha256,
            lora=spec.lora,
        )
        frame = sign_message(release, identity, limits=RELEASE_LIMITS)
    except (FleetError, ValidationError) as exc:
        raise ReleaseError(f"cannot build release {version}: {exc}") from exc
    return SignedRelease(release=release, frame=frame)


def open_release(frame: bytes, *, signer: PublicKeys) -> Release:
    """Verify and decode a stored or received release."""
    try:
        return open_signed(frame, Release, signer=signer, limits=RELEASE_LIMITS)
    except FleetError as exc:
        raise ReleaseError(f"release does not open: {exc}") from exc


def fits(release: Release, spec: RoundSpec) -> bool:
    """Whether ``release``'s B matrices are a valid starting point for ``spec``'s round."""
    return release.base_model_sha256 == spec.base_model_sha256 and release.lora == spec.lora


@dataclass(frozen=True)
class GlobalModel:
    """The latest release a round builds on (``None`` fields: no compatible release yet)."""

    version: int | None
    tensors: dict[str, NDArray[np.float32]] | None

    @property
    def layout(self) -> dict[str, tuple[int, ...]] | None:
        return None if self.tensors is None else layout_of(self.tensors)


def current_global(store: Store, *, signer: PublicKeys, spec: RoundSpec) -> GlobalModel:
    """The latest release if it fits ``spec`` (same base model and LoRA), else nothing."""
    record: ReleaseRecord | None = store.latest_release()
    if record is None:
        return GlobalModel(version=None, tensors=None)
    release = open_release(record.payload, signer=signer)
    if not fits(release, spec):
        return GlobalModel(version=None, tensors=None)
    try:
        return GlobalModel(version=record.version, tensors=release.arrays())
    except FleetError as exc:
        raise ReleaseError(f"release {record.version} holds unreadable tensors: {exc}") from exc


# -- the server optimizer's state --------------------------------------------------------------------


class _StateHeader(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["server_state"] = "server_state"
    v: Literal[1] = 1
    optimizer: ServerOptimizer
    step: int = Field(ge=0)
    slots: dict[str, tuple[TensorInfo, ...]]


def encode_state(state: ServerState) -> bytes:
    infos: dict[str, tuple[TensorInfo, ...]] = {}
    chunks: list[bytes] = []
    try:
        for slot, tensors in state.slots.items():
            infos[slot], data = pack_dense(tensors, dtype=TensorDType.FLOAT32)
            chunks.append(data)
        header = _StateHeader(optimizer=state.optimizer, step=state.step, slots=infos)
        return pack(header.model_dump(mode="json"), b"".join(chunks), limits=RELEASE_LIMITS)
    except (FleetError, ValidationError) as exc:
        raise AggregationError(f"cannot encode the server optimizer state: {exc}") from exc


def decode_state(blob: bytes) -> ServerState:
    try:
        frame = unpack(blob, limits=RELEASE_LIMITS)
        header = _StateHeader.model_validate(frame.header)
        slots: dict[str, Any] = {}
        offset = 0
        for slot, infos in header.slots.items():
            size = sum(info.nbytes for info in infos)
            slots[slot] = unpack_dense(infos, frame.payload[offset : offset + size])
            offset += size
        if offset != len(frame.payload):
            raise AggregationError("server optimizer state has trailing bytes")
    except (FleetError, ValidationError) as exc:
        raise AggregationError(f"stored server optimizer state is unreadable: {exc}") from exc
    return ServerState.from_state_dict(
        {"optimizer": header.optimizer.value, "step": header.step, "slots": slots}
    )
