"""The fleet client: the device's side of a federated round (docs/fleet-protocol.md).

One supervised service of the daemon. Over the fleet broker (:mod:`agent.fleet_transport`) it

1. **enrolls** once with the one-time token (``[fleet] enrollment_token_path``): sends its public keys,
   self-signed with an HMAC proof; accepts the coordinator's reply only if its keys match the token's
   pin, and pins them (``<state_dir>/fleet/coordinator.pub``);
2. **takes part in rounds**: a round announcement is used only if the pinned coordinator signed it,
   it is for this device's base model, before its deadline and newer than the last round handled; the
   scheduler (when given) must allow training and the privacy budget must have room. The trainer runs
   as a SUBPROCESS (``agent train --adapter fleet --round-spec FILE``; the daemon never imports torch),
   which charges the ledger before its first step. Its B delta is clipped to the round's norm bound,
   top-k sparsified with the durable error-feedback residual and quantized (:mod:`fleet.codec`),
   sealed to the coordinator and signed (:mod:`fleet.sealing`), written to an outbox file, then
   published at QoS 1 (the outbox is re-sent after a restart until the broker acknowledged it). The
   ledger's egress section records what left (round, bytes, norm bound, ε);
3. **installs releases**: a retained global adapter release is used only if the coordinator signed
   it and it names this device's base model; the GGUF adapter is rebuilt (:mod:`agent.fleet_adapter`),
   written atomically, hot-swapped into the engine without a restart, the previous one kept for
   rollback; the version is reported in the signed, retained status message (last will: "offline").

Invariant 1: nothing else leaves the device. Conversations, prompts, tokens and examples never reach
this module; the trainer subprocess hands it only the DP-trained B matrices' change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.config import AgentConfig
from agent.errors import AdapterError, AgentError, PrivacyError
from agent.fleet_adapter import (
    KEEP_VERSIONS,
    BaseModelInfo,
    init_b_path,
    install_release,
    load_state,
    prune_versions,
    remove_quietly,
    save_state,
)
from agent.fleet_transport import FleetTransport
from agent.train.ledger import EgressRecord, PrivacyLedger
from agent.train.update import read_fleet_delta
from fleet.codec import encode
from fleet.enrollment import EnrollmentToken
from fleet.errors import FleetError, ResidualError
from fleet.files import write_atomic
from fleet.framing import Limits
from fleet.keys import Identity, PublicKeys, Role, load_public, save_public
from fleet.messages import DeviceState, DeviceStatus, EnrollmentReply, Release, RoundSpec, UpdateHeader
from fleet.residual import load_residual, save_residual
from fleet.sealing import new_nonce, open_signed, read_signed, seal_update, sign_message
from fleet.tensors import layout_of
from fleet.topics import TopicKind, TopicLayout

log = logging.getLogger("agent.fleet")

RELEASE_LIMITS = Limits(max_header=1 << 20, max_payload=256 * 1024 * 1024)
EXIT_BUDGET = 77
EXIT_NOT_ENOUGH_DATA = 75
EXIT_REFUSED = 65


class FleetClientError(AgentError):
    """The fleet client cannot run (no identity, no coordinator keys, bad files)."""


# -- seams ------------------------------------------------------------------------------------------------


class AdapterSwapper(Protocol):
    """The engine's hot swap (:class:`agent.engine.llama_backend.LlamaEngine`)."""

    @property
    def adapters(self) -> tuple[tuple[Path, float], ...]: ...

    async def set_adapters(self, adapters: Sequence[tuple[Path, float]]) -> None: ...


class TrainGate(Protocol):
    """Whether training may start now (:class:`agent.scheduler.TrainingScheduler`)."""

    def check(self) -> Any:
        """An object with ``allowed: bool`` and ``explain() -> str``."""
        ...


class TrainOutcome(BaseModel):
    """What the fleet client reads from ``agent train``'s JSON result (the rest is ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    status: str
    reason: str | None = None
    run_id: str | None = None
    steps_done: int = 0
    epsilon_run: float = 0.0
    delta: float = 0.0
    holdout_loss_before: float | None = None
    holdout_loss_after: float | None = None
    update_path: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class TrainCall:
    spec_path: Path
    out_dir: Path
    init_b: Path | None
    max_steps: int | None
    timeout_s: float


class RoundTrainer(Protocol):
    async def train(self, call: TrainCall) -> tuple[int, TrainOutcome | None]:
        """Run one fleet training; return the exit code and the parsed result (if any)."""
        ...


@dataclass
class SubprocessTrainer:
    """``python -m agent train --adapter fleet ...`` in its own process (torch lives only there)."""

    config_path: Path | None = None
    python: str = sys.executable
    env: dict[str, str] | None = None

    def command(self, call: TrainCall) -> list[str]:
        cmd = [self.python, "-m", "agent", "train", "--adapter", "fleet", "--round-spec", str(call.spec_path)]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += ["--out", str(call.out_dir)]
        if call.init_b is not None:
            cmd += ["--init-b", str(call.init_b)]
        if call.max_steps is not None:
            cmd += ["--max-steps", str(call.max_steps)]
        return cmd

    async def train(self, call: TrainCall) -> tuple[int, TrainOutcome | None]:
        cmd = self.command(call)
        env = {**os.environ, **(self.env or {})}
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=call.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()  # the trainer checkpoints on SIGTERM
            with contextlib.suppress(asyncio.TimeoutError, ProcessLookupError):
                await asyncio.wait_for(proc.wait(), timeout=30.0)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        if rc != 0:
            tail = err.decode("utf-8", errors="replace").strip().splitlines()[-3:]
            log.warning("agent train exited %d: %s", rc, " | ".join(tail))
        return rc, _parse_outcome(out, call.out_dir)


def _parse_outcome(stdout: bytes, out_dir: Path) -> TrainOutcome | None:
    text = stdout.decode("utf-8", errors="replace").strip()
    candidates = [text]
    result_file = out_dir / "fleet-result.json"
    with contextlib.suppress(OSError):
        candidates.append(result_file.read_text(encoding="utf-8"))
    for candidate in candidates:
        start = candidate.find("{")
        if start < 0:
            continue
        try:
            return TrainOutcome.model_validate_json(candidate[start:])
        except ValidationError:
            continue
    return None


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


# -- what happened (for status, the demo and tests) -----------------------------------------------------


@dataclass(frozen=True)
class SentUpdate:
    round_id: int
    sealed_bytes: int
    dense_bytes: int
    nnz: int
    epsilon: float
    norm_bound: float
    input_norm: float
    holdout_loss_before: float | None
    holdout_loss_after: float | None


@dataclass
class FleetProgress:
    sent: dict[int, SentUpdate] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    installed: list[int] = field(default_factory=list)
    refused_messages: int = 0


# -- the client -------------------------------------------------------------------------------------------


class FleetClient:
    """The device's fleet service (see the module doc). ``await run()`` until cancelled."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        identity: Identity,
        transport: FleetTransport,
        trainer: RoundTrainer,
        base: BaseModelInfo,
        swapper: AdapterSwapper | None = None,
        gate: TrainGate | None = None,
        clock: Clock | None = None,
        agent_version: str | None = None,
        gate_poll_s: float = 30.0,
        enroll_retry_s: float = 30.0,
    ) -> None:
        if identity.role is not Role.DEVICE:
            raise FleetClientError("the fleet client needs a device identity")
        self._cfg = config
        self._fc = config.fleet
        self.identity = identity
        self._transport = transport
        self._trainer = trainer
        self._base = base
        self._swapper = swapper
        self._gate = gate
        self._clock = clock or SystemClock()
        self._agent_version = agent_version
        self._gate_poll_s = gate_poll_s
        self._enroll_retry_s = enroll_retry_s
        self._topics = TopicLayout(self._fc.topic_root)
        self._dir = config.fleet_dir
        self._state_path = self._dir / "state.json"
        self.state = load_state(self._state_path)
        self._coordinator = self._load_coordinator()
        self._device_state = DeviceState.ONLINE
        self._round_task: asyncio.Task[None] | None = None
        self._current_round: int | None = None
        self._enroll_sent = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.progress = FleetProgress()
        self.changed = asyncio.Event()
        """Set whenever something happened (tests and the demo wait on it)."""

    # -- files ---------------------------------------------------------------------------------------

    @property
    def coordinator_keys_file(self) -> Path:
        return self._dir / "coordinator.pub"

    @property
    def outbox(self) -> Path:
        return self._dir / "outbox"

    @property
    def residual_path(self) -> Path:
        return self._dir / "residual.ppcf"

    def _load_coordinator(self) -> PublicKeys | None:
        for path in (self._fc.coordinator_keys_path, self.coordinator_keys_file):
            if path is not None and Path(path).exists():
                try:
                    return load_public(Path(path), role=Role.COORDINATOR)
                except FleetError as exc:
                    raise FleetClientError(f"the coordinator's keys {path}: {exc}") from None
        return None

    def _save(self, **changes: Any) -> None:
        self.state = self.state.model_copy(update=changes)
        save_state(self._state_path, self.state)
        self.changed.set()

    # -- messages we send ----------------------------------------------------------------------------

    def status_message(self, state: DeviceState | None = None) -> tuple[str, bytes]:
        status = DeviceStatus(
            device_id=self.identity.id,
            state=state or self._device_state,
            at=self._clock.now(),
            adapter_version=self.state.adapter_version,
            base_model_sha256=self._base.sha256,
            round_id=self._current_round,
            agent_version=self._agent_version,
        )
        return self._topics.build(TopicKind.STATUS, self.identity.id), sign_message(status, self.identity)

    def will(self) -> tuple[str, bytes]:
        """The last will: this device's signed "offline" status (retained)."""
        return self.status_message(DeviceState.OFFLINE)

    def _publish_status(self) -> None:
        topic, payload = self.status_message()
        self._transport.publish(topic, payload, retain=True)

    def on_connected(self) -> None:
        """Called on every (re)connection: status, enrollment, the outbox again."""
        self._publish_status()
        self._maybe_enroll()
        self._resend_outbox()

    def _maybe_enroll(self) -> None:
        if self.state.enrolled or self._fc.enrollment_token_path is None:
            return
        token = self._read_token()
        if token is None:
            return
        request = token.request(self.identity, at=self._clock.now())
        self._transport.publish(
            self._topics.build(TopicKind.ENROLL, self.identity.id), sign_message(request, self.identity)
        )
        self._enroll_sent = True
        log.info("enrollment request sent (token %s)", token.token_id)

    def _read_token(self) -> EnrollmentToken | None:
        path = self._fc.enrollment_token_path
        if path is None:
            return None
        try:
            text = Path(path).read_text(encoding="utf-8")[:1024]
        except OSError as exc:
            log.warning("cannot read the enrollment token %s: %s", path, exc)
            return None
        try:
            return EnrollmentToken.parse(text)
        except FleetError as exc:
            log.warning("the enrollment token in %s is unusable: %s", path, exc)
            return None

    def _resend_outbox(self) -> None:
        if not self.outbox.is_dir():
            return
        for entry in sorted(self.outbox.glob("r*.ppcf")):
            try:
                payload = entry.read_bytes()
            except OSError:
                continue
            self._spawn_publish(entry, payload)

    def _spawn_publish(self, entry: Path, payload: bytes) -> None:
        handle = self._transport.publish(self._topics.build(TopicKind.UPDATE, self.identity.id), payload)

        async def confirm() -> None:
            if await self._transport.wait_published(handle, timeout_s=120.0):
                remove_quietly(entry)

        asyncio.get_running_loop().create_task(confirm())

    # -- the service ---------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._restore_adapter()
        self._transport.subscribe(
            [
                self._topics.build(TopicKind.ROUNDS),
                self._topics.build(TopicKind.RELEASES),
                self._topics.build(TopicKind.ENROLLED, self.identity.id),
            ]
        )
        conn = asyncio.create_task(self._transport.run(), name="fleet-broker")
        retry = asyncio.create_task(self._enroll_retry(), name="fleet-enroll")
        try:
            while True:
                recv = asyncio.create_task(self._transport.receive())
                done, _ = await asyncio.wait([conn, recv], return_when=asyncio.FIRST_COMPLETED)
                if conn in done:
                    recv.cancel()
                    conn.result()
                    return
                message = recv.result()
                await self._handle(message.topic, message.payload)
        finally:
            if self._round_task is not None:
                self._round_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._round_task
            for task in (retry, conn):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _enroll_retry(self) -> None:
        """Send the enrollment request again while no reply came (the coordinator may have been away)."""
        while not self.state.enrolled and self._fc.enrollment_token_path is not None:
            await asyncio.sleep(self._enroll_retry_s)
            if not self.state.enrolled and self._transport.connected.is_set():
                self._maybe_enroll()

    async def _handle(self, topic_name: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            topic = self._topics.parse(topic_name)
        except FleetError:
            return
        try:
            if topic.kind is TopicKind.ENROLLED and topic.device_id == self.identity.id:
                self._on_enrolled(payload)
            elif topic.kind is TopicKind.ROUNDS:
                self._on_round(payload)
            elif topic.kind is TopicKind.RELEASES:
                await self._on_release(payload)
        except FleetError as exc:
            self.progress.refused_messages += 1
            self.changed.set()
            log.warning("ignoring a %s message: %s", topic.kind.value, exc)

    # -- enrollment ----------------------------------------------------------------------------------

    def _on_enrolled(self, payload: bytes) -> None:
        if self.state.enrolled:
            return
        token = self._read_token()
        if token is None:
            return
        signed = read_signed(payload)
        reply = EnrollmentReply.from_parts(signed.header, signed.body)
        keys = reply.coordinator_keys()
        if reply.device_id != self.identity.id or not token.pins(keys):
            log.warning("an enrollment reply with keys the token does not pin: ignored")
            return
        signed.verify(keys)
        if self._coordinator is not None and self._coordinator != keys:
            log.warning("the enrollment reply's coordinator differs from the configured one: ignored")
            return
        if not reply.accepted:
            log.error("enrollment refused: %s", reply.refusal.value if reply.refusal else "?")
            return
        save_public(self.coordinator_keys_file, keys)
        self._coordinator = keys
        self._save(enrolled=True, coordinator_id=keys.id, name=reply.name)
        log.info("enrolled with coordinator %s as %s", keys.id, reply.name)

    @property
    def connected(self) -> bool:
        """Connected to the fleet broker now (for ``agent status``; read-only)."""
        return self._transport.connected.is_set()

    @property
    def enrolled(self) -> bool:
        return self.state.enrolled or (
            self._coordinator is not None and self._fc.enrollment_token_path is None
        )

    # -- rounds --------------------------------------------------------------------------------------

    def _on_round(self, payload: bytes) -> None:
        if self._coordinator is None:
            log.info("a round announcement before enrollment: ignored")
            return
        spec = open_signed(payload, RoundSpec, signer=self._coordinator)
        if spec.round_id <= self.state.last_round or spec.round_id == self._current_round:
            return
        reason = self._round_refusal(spec)
        if reason is not None:
            self._skip(spec.round_id, reason)
            return
        if self._round_task is not None and not self._round_task.done():
            log.info("round %d announced while another runs: later", spec.round_id)
            return
        self._current_round = spec.round_id
        self._round_task = asyncio.get_running_loop().create_task(self._take_part(spec))

    def _round_refusal(self, spec: RoundSpec) -> str | None:
        if spec.base_model_sha256 != self._base.sha256:
            return "the round is for another base model"
        if self._clock.now() >= spec.deadline:
            return "the round's deadline has passed"
        return None

    def _skip(self, round_id: int, reason: str) -> None:
        log.info("not taking part in round %d: %s", round_id, reason)
        self.progress.skipped[round_id] = reason
        self.changed.set()

    def _budget_left(self) -> float:
        """ε left in the window, from the ledger's stored bound: no accountant, so the daemon never
        imports opacus or torch. When the ledger cannot vouch for a bound, the trainer decides (it
        composes with the accountant and refuses, exit 77, before charging anything)."""
        budget = self._cfg.privacy.budget
        spent = PrivacyLedger(self._cfg.ledger_path).spent_bound(budget=budget)
        return budget.epsilon if spent is None else budget.epsilon - spent

    async def _take_part(self, spec: RoundSpec) -> None:
        try:
            await self._take_part_inner(spec)
        except (AgentError, FleetError, OSError) as exc:
            log.error("round %d failed on this device: %s", spec.round_id, exc)
            self._skip(spec.round_id, f"failed: {exc}")
        finally:
            self._current_round = None
            self._device_state = DeviceState.ONLINE
            with contextlib.suppress(FleetError, AgentError):
                self._publish_status()

    async def _take_part_inner(self, spec: RoundSpec) -> None:
        while self._gate is not None:
            verdict = self._gate.check()
            if verdict.allowed:
                break
            if self._clock.now() >= spec.deadline:
                self._skip(spec.round_id, "the scheduler did not allow training before the deadline")
                return
            log.info("round %d waits: %s", spec.round_id, verdict.explain())
            await asyncio.sleep(self._gate_poll_s)
        try:
            left = await asyncio.to_thread(self._budget_left)
        except PrivacyError as exc:
            self._skip(spec.round_id, f"the privacy ledger is unusable: {exc}")
            return
        if left <= 0.0:
            self._skip(spec.round_id, "no privacy budget left")
            self._save(last_round=spec.round_id)
            return
        rounds_dir = self._dir / "rounds"
        rounds_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec_path = rounds_dir / f"r{spec.round_id}.json"
        write_atomic(spec_path, json.dumps(spec.header()).encode(), mode=0o600)
        self._device_state = DeviceState.TRAINING
        self._publish_status()
        out_dir = self._dir / "train-out"
        remaining = (spec.deadline - self._clock.now()).total_seconds()
        call = TrainCall(
            spec_path=spec_path,
            out_dir=out_dir,
            init_b=self._init_b(spec),
            max_steps=self._fc.train_max_steps,
            timeout_s=max(1.0, min(self._fc.train_timeout_s, remaining)),
        )
        log.info(
            "round %d: training (%s)",
            spec.round_id,
            "from the global adapter" if call.init_b else "from zero",
        )
        try:
            rc, outcome = await self._trainer.train(call)
        except asyncio.TimeoutError:
            self._skip(spec.round_id, "training did not finish before the deadline")
            return
        if rc in (EXIT_BUDGET, EXIT_NOT_ENOUGH_DATA, EXIT_REFUSED):
            why = {EXIT_BUDGET: "the privacy budget refused", EXIT_NOT_ENOUGH_DATA: "too few conversations"}
            self._skip(spec.round_id, why.get(rc, "the export guard refused the result"))
            self._save(last_round=spec.round_id)
            return
        if rc != 0 or outcome is None or outcome.status != "completed" or outcome.update_path is None:
            self._skip(spec.round_id, f"training ended with exit code {rc}")
            return
        await asyncio.to_thread(self._send_update, spec, Path(outcome.update_path), outcome)

    def _init_b(self, spec: RoundSpec) -> Path | None:
        version = self.state.adapter_version
        if version is None:
            return None
        path = init_b_path(self._cfg.global_adapters_dir, version)
        if not path.exists():
            return None
        try:
            header, _ = read_fleet_delta(path)
        except PrivacyError:
            return None
        if header.ffa_seed != spec.lora.ffa_seed or header.rank != spec.lora.rank:
            return None
        if tuple(header.target_modules) != tuple(spec.lora.target_modules):
            return None
        return path

    def residual_key(self, spec: RoundSpec) -> str:
        lora = spec.lora
        return f"{spec.base_model_sha256[:16]}:r{lora.rank}:s{lora.ffa_seed}:{'+'.join(lora.target_modules)}"

    def _send_update(self, spec: RoundSpec, update_path: Path, outcome: TrainOutcome) -> None:
        """Encode, seal, queue durably, then publish (runs in a worker thread except the publish)."""
        header, delta = read_fleet_delta(update_path)
        if header.round_id != spec.round_id:
            raise FleetClientError(
                f"the trainer's update is for round {header.round_id}, not {spec.round_id}"
            )
        key = self.residual_key(spec)
        try:
            residual = load_residual(self.residual_path, key=key, expected=layout_of(delta))
        except ResidualError as exc:
            log.warning("discarding the error-feedback residual: %s", exc)
            residual = None
        encoded = encode(
            delta,
            residual,
            norm_bound=spec.norm_bound,
            topk_fraction=spec.codec.topk_fraction,
            quantization=spec.codec.quantization,
        )
        update = UpdateHeader(
            round_id=spec.round_id,
            device_id=self.identity.id,
            nonce=new_nonce(),
            sample_count=header.sample_count,
            norm_bound=spec.norm_bound,
            epsilon=min(100.0, header.epsilon),
            delta=header.delta,
            codec=spec.codec,
            sent_at=self._clock.now(),
        )
        assert self._coordinator is not None
        sealed = seal_update(update, encoded.data, device=self.identity, coordinator=self._coordinator)
        self.outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = self.outbox / f"r{spec.round_id}.ppcf"
        write_atomic(entry, sealed, mode=0o600)  # queued durably before the residual moves on
        save_residual(self.residual_path, encoded.residual, key=key)
        PrivacyLedger(self._cfg.ledger_path).record_egress(
            EgressRecord(
                at=time.time(),
                round_id=spec.round_id,
                run_id=header.run_id if header.run_id != "0" * 32 else None,
                bytes=len(sealed),
                norm_bound=spec.norm_bound,
                epsilon=header.epsilon,
                delta=header.delta,
            )
        )
        dense = sum(int(a.size) * 4 for a in delta.values())
        sent = SentUpdate(
            round_id=spec.round_id,
            sealed_bytes=len(sealed),
            dense_bytes=dense,
            nnz=encoded.nnz,
            epsilon=header.epsilon,
            norm_bound=spec.norm_bound,
            input_norm=encoded.input_norm if math.isfinite(encoded.input_norm) else 0.0,
            holdout_loss_before=outcome.holdout_loss_before,
            holdout_loss_after=outcome.holdout_loss_after,
        )

        def publish() -> None:
            self.progress.sent[spec.round_id] = sent
            self._save(last_round=spec.round_id)
            self._spawn_publish(entry, sealed)
            log.info(
                "round %d: sealed update sent, %d bytes (dense %d), epsilon %.3g",
                spec.round_id,
                len(sealed),
                dense,
                header.epsilon,
            )

        self._call_in_loop(publish)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is None:
            raise FleetClientError("the fleet client is not running")
        self._loop.call_soon_threadsafe(fn)

    # -- releases ------------------------------------------------------------------------------------

    async def _on_release(self, payload: bytes) -> None:
        if self._coordinator is None:
            return
        release = open_signed(payload, Release, signer=self._coordinator, limits=RELEASE_LIMITS)
        current = self.state.adapter_version
        if current is not None and release.version <= current:
            return
        if release.base_model_sha256 != self._base.sha256:
            log.warning("release %d is for another base model: ignored", release.version)
            self.progress.refused_messages += 1
            return
        directory = self._cfg.global_adapters_dir
        try:
            path = await asyncio.to_thread(install_release, release, self._base, directory)
        except (AdapterError, PrivacyError, OSError, ValueError) as exc:
            log.error("cannot rebuild release %d: %s", release.version, exc)
            return
        if self._swapper is not None:
            try:
                await self._swap(path)
            except AdapterError as exc:
                log.error("release %d does not load; keeping the previous adapter: %s", release.version, exc)
                remove_quietly(path)
                return
        previous = current
        self._save(adapter_version=release.version, previous_version=previous)
        keep = {release.version} | ({previous} if previous is not None else set())
        assert len(keep) <= KEEP_VERSIONS
        await asyncio.to_thread(prune_versions, directory, keep=keep)
        self.progress.installed.append(release.version)
        self._publish_status()
        log.info(
            "global adapter v%d installed%s", release.version, " and swapped in" if self._swapper else ""
        )

    async def _swap(self, path: Path | None) -> None:
        assert self._swapper is not None
        directory = self._cfg.global_adapters_dir.resolve()
        others = [(p, s) for p, s in self._swapper.adapters if Path(p).resolve().parent != directory]
        await self._swapper.set_adapters([*others, *([(path, 1.0)] if path is not None else [])])

    async def _restore_adapter(self) -> None:
        version = self.state.adapter_version
        if self._swapper is None or version is None:
            return
        path = self._cfg.global_adapters_dir / f"{version}.gguf"
        if path.exists():
            try:
                await self._swap(path)
            except AdapterError as exc:
                log.error("the global adapter v%d does not load: %s", version, exc)

    async def rollback(self) -> int | None:
        """Go back to the previous global adapter (if kept); return the version now active."""
        previous = self.state.previous_version
        if previous is None:
            return self.state.adapter_version
        path = self._cfg.global_adapters_dir / f"{previous}.gguf"
        if not path.exists():
            return self.state.adapter_version
        if self._swapper is not None:
            await self._swap(path)
        self._save(adapter_version=previous, previous_version=None)
        self._publish_status()
        return previous


def load_device_identity(config: AgentConfig) -> Identity:
    """The device identity made on first boot (agent/identity.py), or an error saying how to make it."""
    from agent.identity import keys_dir

    directory = keys_dir(config.paths.state_dir)
    try:
        return Identity.load(directory, role=Role.DEVICE)
    except FleetError as exc:
        raise FleetClientError(
            f"no usable device identity in {directory} ({exc}); run 'python -m agent.identity' first"
        ) from None


def build_fleet_client(
    config: AgentConfig,
    *,
    model_path: Path,
    swapper: AdapterSwapper | None = None,
    gate: TrainGate | None = None,
    config_path: Path | None = None,
    identity: Identity | None = None,
    enroll_retry_s: float = 30.0,
) -> FleetClient:
    """The fleet client as the daemon runs it (real broker, trainer subprocess)."""
    from agent import __version__
    from agent.fleet_adapter import read_base_model
    from agent.fleet_transport import PahoTransport, read_password
    from agent.identity import BROKER_PASSWORD_FILE, keys_dir

    fc = config.fleet
    ident = identity or load_device_identity(config)
    base = read_base_model(model_path, sha256=config.model.sha256, cache_dir=config.fleet_dir)
    holder: dict[str, FleetClient] = {}
    transport = PahoTransport(
        fc,
        client_id=ident.id[:64],
        username=fc.username or ident.id,
        password=read_password(fc, keys_dir(config.paths.state_dir) / BROKER_PASSWORD_FILE),
        will=lambda: holder["client"].will(),  # noqa: PLW0108 (bound later)
        on_connect=lambda: holder["client"].on_connected(),  # noqa: PLW0108
    )
    client = FleetClient(
        config=config,
        identity=ident,
        transport=transport,
        trainer=SubprocessTrainer(config_path=config_path),
        base=base,
        swapper=swapper,
        gate=gate,
        agent_version=_label(__version__),
        enroll_retry_s=enroll_retry_s,
    )
    holder["client"] = client
    return client


def _label(version: str) -> str | None:
    import re

    return version if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", version) else None
