"""The round state machine: OPEN -> AGGREGATING -> RELEASED, or FAILED.

:class:`RoundManager` holds no sockets and reads time only from its injected clock; the service feeds
it received bytes and ticks, and publishes what it returns. Its durable state is the store; its
memory (the decoded deltas of unfinished rounds, the replay guard) is rebuilt from the store by
:meth:`RoundManager.sync`, so a coordinator restarted mid-round resumes it.

An update is accepted only if, in this order:

1. it is at most ``max_update_bytes`` (else ``oversized``, before anything is parsed);
2. it parses, names an enrolled, active device (``unknown_device`` / ``revoked_device``), its signature
   verifies and it decrypts (``forged``);
3. its round is open (``wrong_round`` / ``round_closed``), the deadline has not passed (``late``), and
   neither this device nor this nonce was seen in it before (``replayed``);
4. its header matches the round (norm bound, codec), it decodes to the round's tensor layout
   (``malformed``), and its norm and sparsity obey the round's bound and top-k fraction
   (``out_of_bounds``).

Every refusal is logged with its reason and recorded in the store. A round closes when its target
number of updates has arrived or at its deadline; with fewer than its minimum it fails.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NoReturn

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.aggregate import (
    AggregationSettings,
    ClientUpdate,
    ServerState,
    Tensors,
    aggregate,
    apply_step,
    check_same_layout,
)
from coordinator.config import RoundDefaults
from coordinator.devices import StoreRegistry
from coordinator.errors import (
    AggregationError,
    Conflict,
    RefusalReason,
    ReleaseError,
    RoundError,
    UpdateRejected,
)
from coordinator.releases import SignedRelease, build_release, current_global, decode_state, encode_state
from coordinator.store import RoundRecord, RoundState, Store
from fleet.codec import CodecLimits, CodecParams, Quantization, decode, topk_count
from fleet.errors import (
    DecryptError,
    FleetError,
    ReplayReason,
    ReplayRejected,
    SignatureError,
    TooLarge,
    UnknownDevice,
    WireError,
)
from fleet.framing import DEFAULT_MAX_HEADER, Limits, encode_header
from fleet.keys import Identity
from fleet.messages import LoraSpec, PrivacyTarget, RoundSpec, UpdateHeader
from fleet.sealing import Clock, OpenedUpdate, ReplayGuard, UpdateOpener, read_signed, sign_message
from fleet.tensors import layout_of

log = logging.getLogger("coordinator.rounds")

NORM_TOLERANCE = 1e-4
"""Relative slack on the norm bound (float32 rounding in the device's codec and in our check)."""

_REPLAY_REASONS = {
    ReplayReason.UNKNOWN_ROUND: RefusalReason.WRONG_ROUND,
    ReplayReason.ROUND_CLOSED: RefusalReason.ROUND_CLOSED,
    ReplayReason.LATE: RefusalReason.LATE,
    ReplayReason.DUPLICATE: RefusalReason.REPLAYED,
    ReplayReason.NONCE_REUSED: RefusalReason.REPLAYED,
}


class RoundPlan(BaseModel):
    """What ``coordinator round start`` asks for; the announcement adds the id and the times."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_devices: int = Field(ge=1, le=1_000_000)
    target_devices: int = Field(ge=1, le=1_000_000)
    deadline_s: float = Field(gt=0, le=30 * 86400)
    local_epochs: int = Field(ge=1, le=100)
    learning_rate: float = Field(gt=0, le=10)
    lora: LoraSpec
    norm_bound: float = Field(gt=0, le=1e6)
    codec: CodecParams
    privacy: PrivacyTarget
    base_model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @classmethod
    def from_defaults(
        cls, defaults: RoundDefaults, *, base_model_sha256: str, ffa_seed: int, **overrides: object
    ) -> RoundPlan:
        """A plan from the config's defaults, with ``overrides`` (None values ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        lora = {
            "rank": given.pop("lora_rank", defaults.lora_rank),
            "alpha": given.pop("lora_alpha", defaults.lora_alpha),
            "target_modules": given.pop("target_modules", defaults.target_modules),
            "ffa_seed": ffa_seed,
        }
        codec = {
            "topk_fraction": given.pop("topk_fraction", defaults.topk_fraction),
            "quantization": given.pop("quantization", Quantization.INT8),
        }
        privacy = {
            "epsilon": given.pop("dp_epsilon", defaults.dp_epsilon),
            "delta": given.pop("dp_delta", defaults.dp_delta),
        }
        data: dict[str, object] = {
            "min_devices": defaults.min_devices,
            "target_devices": defaults.target_devices,
            "deadline_s": defaults.deadline_s,
            "local_epochs": defaults.local_epochs,
            "learning_rate": defaults.learning_rate,
            "norm_bound": defaults.norm_bound,
            **given,
            "lora": lora,
            "codec": codec,
            "privacy": privacy,
            "base_model_sha256": base_model_sha256,
        }
        try:
            plan = cls.model_validate(data)
        except ValidationError as exc:
            raise RoundError(f"invalid round: {_describe(exc)}") from None
        if plan.min_devices > plan.target_devices:
            raise RoundError("the minimum number of devices exceeds the target")
        return plan


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)[:4]
    )


@dataclass(frozen=True)
class Accepted:
    """An update was stored; ``received`` of ``target`` have arrived for its round."""

    round_id: int
    device_id: str
    received: int
    target: int
    duplicate: bool = False
    """The very same message again (a QoS 1 redelivery): nothing new was stored."""

    @property
    def target_reached(self) -> bool:
        return self.received >= self.target


@dataclass(frozen=True)
class RoundOutcome:
    round_id: int
    state: RoundState
    release: SignedRelease | None
    detail: str


@dataclass
class _Live:
    """An unfinished round in memory."""

    spec: RoundSpec
    state: RoundState
    layout: dict[str, tuple[int, ...]] | None
    deltas: dict[str, ClientUpdate] = field(default_factory=dict)


def _claimed_round(payload: bytes, limits: Limits) -> int | None:
    """The round an unverified update claims, for attributing a refusal (never for a decision)."""
    try:
        claimed = read_signed(payload, limits=limits).header.get("round_id")
    except WireError:
        return None
    return claimed if type(claimed) is int and 0 < claimed < 2**53 else None


def spec_from_record(record: RoundRecord) -> RoundSpec:
    try:
        return RoundSpec.from_parts(json.loads(record.spec))
    except (ValueError, FleetError) as exc:
        raise RoundError(f"round {record.id}'s stored spec is unreadable: {exc}") from exc


class RoundManager:
    """Runs rounds over a store; see the module doc. Use from one thread."""

    def __init__(
        self,
        store: Store,
        identity: Identity,
        *,
        clock: Clock,
        aggregation: AggregationSettings,
        max_update_bytes: int,
    ) -> None:
        self._store = store
        self._identity = identity
        self._clock = clock
        self._aggregation = aggregation
        self._max_update_bytes = max_update_bytes
        self._registry = StoreRegistry(store)
        self._limits = Limits(max_header=DEFAULT_MAX_HEADER, max_payload=max_update_bytes)
        self._codec_limits = CodecLimits(max_blob=max_update_bytes)
        self._opener = UpdateOpener(identity, self._registry, limits=self._limits)
        self._guard = ReplayGuard(clock=clock)
        self._live: dict[int, _Live] = {}

    # -- starting and resuming --------------------------------------------------------------------

    def start_round(self, plan: RoundPlan) -> RoundSpec:
        """Create an OPEN round (the service announces it); RoundError if one is still open."""
        for record in self._store.unfinished_rounds():
            raise RoundError(f"round {record.id} is still {record.state.value}; one round at a time")
        now = self._clock.now()
        deadline = now + timedelta(seconds=plan.deadline_s)
        specs: list[RoundSpec] = []

        def spec_for(round_id: int) -> str:
            spec = RoundSpec(
                round_id=round_id,
                announced_at=now,
                deadline=deadline,
                **plan.model_dump(exclude={"deadline_s"}),
            )
            specs.append(spec)
            return encode_header(spec.header()).decode()

        self._store.create_round(spec_for, created_at=now.timestamp(), deadline=deadline.timestamp())
        log.info(
            "round %d opened: %d-%d devices until %s",
            specs[0].round_id,
            plan.min_devices,
            plan.target_devices,
            deadline.isoformat(),
        )
        return specs[0]

    def sync(self) -> list[RoundSpec]:
        """Load unfinished rounds the manager does not hold yet (created by ``round start`` or left by a
        previous run), re-opening their stored updates; return their specs (to announce)."""
        loaded: list[RoundSpec] = []
        for record in self._store.unfinished_rounds():
            if record.id in self._live:
                continue
            spec = spec_from_record(record)
            base = current_global(self._store, signer=self._identity.public, spec=spec)
            live = _Live(spec=spec, state=record.state, layout=base.layout)
            self._live[record.id] = live
            self._guard.open_round(record.id, deadline=spec.deadline)
            for stored in self._store.updates(record.id):
                try:
                    opened = self._opener.open(stored.blob, device_id=stored.device_id)
                    tensors = self._decode(opened, live)
                except (FleetError, UpdateRejected) as exc:
                    log.warning(
                        "round %d: dropping stored update of %s: %s", record.id, stored.device_id, exc
                    )
                    continue
                self._guard.record(opened.header)
                live.deltas[stored.device_id] = ClientUpdate(
                    delta=tensors, num_samples=opened.header.sample_count
                )
                if live.layout is None:
                    live.layout = layout_of(tensors)
            if record.state is not RoundState.OPEN:
                self._guard.close_round(record.id)
            log.info("round %d (%s) loaded with %d updates", record.id, record.state.value, len(live.deltas))
            loaded.append(spec)
        return loaded

    def open_specs(self) -> list[RoundSpec]:
        return [live.spec for live in self._live.values() if live.state is RoundState.OPEN]

    def announcement(self, spec: RoundSpec) -> bytes:
        """The signed round announcement to publish (retained)."""
        return sign_message(spec, self._identity)

    def progress(self, round_id: int) -> tuple[int, int] | None:
        live = self._live.get(round_id)
        return None if live is None else (len(live.deltas), live.spec.target_devices)

    # -- receiving ----------------------------------------------------------------------------------

    def receive(self, payload: bytes, *, topic_device: str | None = None) -> Accepted:
        """Check and store one sealed update; raise UpdateRejected (logged and recorded) if refused."""
        if len(payload) > self._max_update_bytes:
            self._refuse(
                RefusalReason.OVERSIZED,
                f"{len(payload)} bytes, the limit is {self._max_update_bytes}",
                device_id=topic_device,
            )
        opened = self._open(payload, topic_device)
        header = opened.header
        try:
            self._guard.check(header)
        except ReplayRejected as exc:
            duplicate = self._redelivery(header, payload, exc)
            if duplicate is not None:
                return duplicate
            self._refuse(_REPLAY_REASONS[exc.reason], exc.detail, header=header)
        live = self._live[header.round_id]
        tensors = self._decode(opened, live)
        now = self._clock.now()
        try:
            with self._store.transaction():
                self._store.add_update(
                    header.round_id,
                    header.device_id,
                    nonce=bytes.fromhex(header.nonce),
                    header=header.model_dump_json(),
                    blob=bytes(payload),
                    received_at=now.timestamp(),
                )
                self._store.touch_device(header.device_id, now=now.timestamp())
        except Conflict as exc:
            self._refuse(RefusalReason.REPLAYED, f"already stored: {exc}", header=header)
        self._guard.record(header)
        live.deltas[header.device_id] = ClientUpdate(delta=tensors, num_samples=header.sample_count)
        if live.layout is None:
            live.layout = layout_of(tensors)
        received = len(live.deltas)
        log.info(
            "round %d: update %d/%d from %s (%d samples)",
            header.round_id,
            received,
            live.spec.target_devices,
            header.device_id,
            header.sample_count,
        )
        return Accepted(header.round_id, header.device_id, received, live.spec.target_devices)

    def _open(self, payload: bytes, topic_device: str | None) -> OpenedUpdate:
        try:
            return self._opener.open(payload, device_id=topic_device)
        except TooLarge as exc:
            reason, detail = RefusalReason.OVERSIZED, str(exc)
        except UnknownDevice as exc:
            revoked = self._registry.is_revoked(exc.device_id)
            reason = RefusalReason.REVOKED_DEVICE if revoked else RefusalReason.UNKNOWN_DEVICE
            detail = str(exc)
        except (SignatureError, DecryptError) as exc:
            reason, detail = RefusalReason.FORGED, str(exc)
        except WireError as exc:
            reason, detail = RefusalReason.MALFORMED, str(exc)
        self._refuse(
            reason, detail, device_id=topic_device, claimed_round=_claimed_round(payload, self._limits)
        )

    def _redelivery(self, header: UpdateHeader, payload: bytes, exc: ReplayRejected) -> Accepted | None:
        """The same bytes as an update already stored (a QoS 1 redelivery) is not a refusal."""
        if exc.reason not in (ReplayReason.DUPLICATE, ReplayReason.NONCE_REUSED):
            return None
        live = self._live.get(header.round_id)
        if live is None:
            return None
        stored = self._store.find_update(header.round_id, header.device_id)
        if stored is None or stored.blob != payload:
            return None
        log.debug("round %d: redelivered update from %s ignored", header.round_id, header.device_id)
        return Accepted(
            header.round_id, header.device_id, len(live.deltas), live.spec.target_devices, duplicate=True
        )

    def _decode(self, opened: OpenedUpdate, live: _Live) -> dict[str, np.ndarray]:
        header, spec = opened.header, live.spec
        if header.codec != spec.codec:
            self._refuse(RefusalReason.MALFORMED, "codec parameters differ from the round's", header=header)
        if not header.norm_bound <= spec.norm_bound:
            self._refuse(
                RefusalReason.OUT_OF_BOUNDS,
                f"norm bound {header.norm_bound} exceeds the round's {spec.norm_bound}",
                header=header,
            )
        try:
            tensors = decode(opened.encoded, limits=self._codec_limits, expected=live.layout)
        except TooLarge as exc:
            self._refuse(RefusalReason.OVERSIZED, str(exc), header=header)
        except WireError as exc:
            self._refuse(RefusalReason.MALFORMED, str(exc), header=header)
        flats = [t.reshape(-1) for t in tensors.values()]
        norm = math.sqrt(sum(float(np.dot(f, f)) for f in flats))
        if norm > spec.norm_bound * (1.0 + NORM_TOLERANCE):
            self._refuse(
                RefusalReason.OUT_OF_BOUNDS,
                f"norm {norm:.6g} exceeds the bound {spec.norm_bound}",
                header=header,
            )
        total = sum(f.size for f in flats)
        nnz = sum(int(np.count_nonzero(f)) for f in flats)
        allowed = topk_count(total, spec.codec.topk_fraction)
        if nnz > allowed:
            self._refuse(
                RefusalReason.OUT_OF_BOUNDS, f"{nnz} non-zero values, top-k allows {allowed}", header=header
            )
        return tensors

    def _refuse(
        self,
        reason: RefusalReason,
        detail: str,
        *,
        header: UpdateHeader | None = None,
        device_id: str | None = None,
        claimed_round: int | None = None,
    ) -> NoReturn:
        round_id = header.round_id if header is not None else claimed_round
        device = header.device_id if header is not None else device_id
        log.warning(
            "refused update from %s for round %s: %s (%s)",
            device or "?",
            round_id or "?",
            reason.value,
            detail,
        )
        known_round = round_id if round_id is not None and self._store.find_round(round_id) else None
        self._store.add_refusal(
            round_id=known_round,
            device_id=device,
            reason=reason.value,
            detail=detail,
            at=self._clock.now().timestamp(),
        )
        raise UpdateRejected(reason, detail)

    # -- closing ----------------------------------------------------------------------------------

    def due(self) -> list[int]:
        """Rounds to close now: target reached, deadline passed, or left AGGREGATING by a crash."""
        now = self._clock.now()
        return [
            round_id
            for round_id, live in self._live.items()
            if live.state is RoundState.AGGREGATING
            or len(live.deltas) >= live.spec.target_devices
            or now >= live.spec.deadline
        ]

    def tick(self) -> list[RoundOutcome]:
        """Close every due round (call regularly and when a target is reached)."""
        return [self.close(round_id) for round_id in self.due()]

    def close(self, round_id: int) -> RoundOutcome:
        """Aggregate and release round ``round_id``, or fail it if it has too few updates."""
        live = self._live.get(round_id)
        if live is None:
            raise RoundError(f"round {round_id} is not open here")
        now = self._clock.now()
        self._guard.close_round(round_id)
        if live.state is RoundState.OPEN:
            self._store.transition_round(
                round_id, source=RoundState.OPEN, target=RoundState.AGGREGATING, now=now.timestamp()
            )
            live.state = RoundState.AGGREGATING
        updates = [u for device, u in live.deltas.items() if not self._registry.is_revoked(device)]
        if len(updates) < live.spec.min_devices:
            return self._fail(live, f"{len(updates)} updates arrived, {live.spec.min_devices} needed")
        try:
            signed, state = self._aggregate(live, updates, now)
        except (AggregationError, ReleaseError) as exc:
            return self._fail(live, str(exc))
        with self._store.transaction():
            self._store.add_release(
                signed.release.version,
                round_id=round_id,
                payload=signed.frame,
                signature=signed.signature,
                created_at=now.timestamp(),
            )
            self._store.save_server_state(encode_state(state), release_version=signed.release.version)
            self._store.transition_round(round_id, source=RoundState.AGGREGATING, target=RoundState.RELEASED)
        del self._live[round_id]
        detail = f"release {signed.release.version} from {len(updates)} updates"
        log.info("round %d released: %s", round_id, detail)
        return RoundOutcome(round_id, RoundState.RELEASED, signed, detail)

    def _aggregate(
        self, live: _Live, updates: list[ClientUpdate], now: datetime
    ) -> tuple[SignedRelease, ServerState]:
        base = current_global(self._store, signer=self._identity.public, spec=live.spec)
        state = self._server_state(base.version, updates[0].delta)
        result = aggregate(updates, settings=self._aggregation, state=state)
        tensors = apply_step(base.tensors, result.step)
        version = self._store.next_release_version()
        signed = build_release(
            tensors, version=version, spec=live.spec, created_at=now, identity=self._identity
        )
        return signed, result.state

    def _server_state(self, base_version: int | None, reference: Tensors) -> ServerState | None:
        """The optimizer state that led to the base release, if it still fits; else a fresh start."""
        stored = self._store.load_server_state()
        if base_version is None or stored is None or stored[0] != base_version:
            return None
        try:
            state = decode_state(stored[1])
            if state.optimizer is not self._aggregation.optimizer:
                return None
            for tensors in state.slots.values():
                check_same_layout(reference, tensors)
        except AggregationError as exc:
            log.warning("server optimizer state reset: %s", exc)
            return None
        return state

    def _fail(self, live: _Live, reason: str) -> RoundOutcome:
        round_id = live.spec.round_id
        self._store.transition_round(
            round_id, source=RoundState.AGGREGATING, target=RoundState.FAILED, failure=reason
        )
        del self._live[round_id]
        log.warning("round %d failed: %s", round_id, reason)
        return RoundOutcome(round_id, RoundState.FAILED, None, reason)


__all__ = [
    "Accepted",
    "RoundManager",
    "RoundOutcome",
    "RoundPlan",
    "spec_from_record",
]
