"""The daemon (``agent run``): one supervisor owning the engine, the store and the front doors.

Start: open the store, load the model (off the loop), listen on the socket, then tell systemd
``READY=1``. The supervisor then runs each front door's ``serve()`` and its own housekeeping loops
(watchdog pings, retention purge, status snapshot) as tasks of one group. The first of them to end
decides: a SIGTERM/SIGINT asks for a clean stop (exit 0); any task that fails stops the others and
its exception leaves :meth:`Daemon.run` (the CLI exits non-zero and systemd restarts the daemon).

Stop: ``STOPPING=1``, new requests get ``shutting_down``, in-flight replies are cancelled (each
client still gets its ``done``, or ``shutting_down`` after ``socket.shutdown_grace_s``), the
sockets are closed and removed, the engine and the store closed, the status snapshot removed.

The group is a small ``asyncio.wait`` supervisor rather than ``asyncio.TaskGroup`` so that it runs
on Python 3.10 (JetPack 6) and can shut the front doors down gracefully when a sibling fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.chat import ChatService
from agent.config import AgentConfig
from agent.errors import ModelError, StoreError
from agent.frontdoor import CancelSignal, ChatEvent, FrontDoor
from agent.generation import InferenceBackend
from agent.notify import Notifier
from agent.protocol import ChatRequest, ErrorCode, ErrorEvent
from agent.socket_server import SocketServer, remove_stale_socket
from agent.status import (
    BlockingRule,
    DaemonState,
    DoorState,
    DoorStatus,
    FleetLiveStatus,
    LastReply,
    ModelStatus,
    StatusSnapshot,
    TrainingStatus,
    heavy_modules_loaded,
    remove_snapshot,
    rss_bytes,
    write_snapshot,
)
from agent.store import ConversationStore

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 5.0
STATUS_REFRESH_S = 60.0
"""The snapshot is rewritten when something in it changes, and at least this often."""


class FrontDoorService(Protocol):
    """What the supervisor needs of a front door (the socket server; later Wyoming and MQTT)."""

    async def serve(self) -> None: ...

    async def shutdown(self, *, grace_s: float) -> None: ...


class _NoModel:
    """The chat handler of a daemon started without a model (``agent run --no-model``: benchmarks)."""

    async def handle(
        self, request: ChatRequest, *, source: FrontDoor, cancel: CancelSignal, client: str
    ) -> AsyncIterator[ChatEvent]:
        yield ErrorEvent(id=request.id, code=ErrorCode.ENGINE_ERROR, message="the agent runs without a model")


@dataclass
class _Supervised:
    name: str
    task: asyncio.Task[None]


@dataclass
class Daemon:
    """``agent run``. Construct with the config, then ``await run()``; it returns after a clean stop."""

    config: AgentConfig
    notifier: Notifier = field(default_factory=Notifier.from_env)
    load_model: bool = True
    status_interval_s: float = STATUS_INTERVAL_S
    clock: Callable[[], float] = time.time
    config_path: Path | None = None
    """The config file, for the trainer subprocess the fleet client starts (else $PPCHAT_CONFIG)."""

    def __post_init__(self) -> None:
        self._stop: asyncio.Event | None = None
        self._started_at = self.clock()
        self._state = DaemonState.STARTING
        self._engine: InferenceBackend | None = None
        self._store: ConversationStore | None = None
        self._chat: ChatService | None = None
        self._doors: list[tuple[str, FrontDoorService]] = []
        self._fleet: Any = None
        self._scheduler: Any = None
        self._trainer: Any = None
        self._work: Any = None
        self._conversations = 0
        self._last_written: tuple[Any, ...] | None = None
        self._last_write_at = 0.0
        self._last_status_line = ""
        self._model_sha256: str | None = None

    # ---- control ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a clean stop (the SIGTERM handler; also for tests)."""
        if self._stop is not None and not self._stop.is_set():
            log.info("stopping")
            self._stop.set()

    @property
    def chat(self) -> ChatService | None:
        return self._chat

    # ---- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        try:
            await self._run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            self.notifier.close()

    async def _run(self) -> None:
        assert self._stop is not None
        cfg = self.config
        if cfg.socket.enabled:
            remove_stale_socket(cfg.socket_path)  # before touching anything a running agent owns
        self._write_status()
        try:
            self.notifier.status("opening the conversation store")
            self._store = await ConversationStore.open(
                cfg.store_path,
                train_consent_default=cfg.store.train_consent_default,
                max_turns_per_conversation=cfg.store.max_turns_per_conversation,
                clock=self.clock,
            )
            self._conversations = await self._store.count_conversations()
            handler: Any
            if self.load_model and cfg.scheduler.enabled:
                self._build_scheduler()
            if self.load_model:
                self.notifier.status("loading the model")
                self._engine = await self._load_engine()
                await self._attach_personal_adapter()
                self._chat = ChatService(
                    self._engine,
                    self._store,
                    generation=cfg.generation,
                    system_prompt=cfg.model.system_prompt,
                    activity=self._scheduler,
                )
                handler = self._chat
            else:
                # Import the engine all the same, so the daemon's footprint is the real one.
                import agent.engine.llama_backend  # noqa: F401

                handler = _NoModel()
            if self._stop.is_set():
                return  # SIGTERM while loading
            if cfg.socket.enabled:
                server = SocketServer(handler, cfg.socket, cfg.socket_path)
                await server.start()
                self._doors.append(("socket", server))
            await self._add_wyoming_and_mqtt_doors(handler)
            self._add_fleet_client()
            await self._supervise()
        finally:
            await self._close()

    async def _add_wyoming_and_mqtt_doors(self, handler: Any) -> None:
        """The Wyoming voice door and the local MQTT chat door, each when enabled in the config."""
        cfg = self.config
        if cfg.wyoming.enabled:
            from agent.wyoming_door import WyomingDoor

            model_name = self._engine.info.path.stem if self._engine is not None else "none"
            self._doors.append(("wyoming", WyomingDoor(cfg.wyoming, handler, model_name=model_name)))
        if cfg.mqtt_chat.enabled:
            from agent.mqtt_chat import MqttChatDoor, fleet_broker_url_of

            door = MqttChatDoor(
                cfg.mqtt_chat, handler, device_name=cfg.device_name, fleet_broker_url=fleet_broker_url_of(cfg)
            )
            await door.check_privacy()  # refuse the fleet broker before telling systemd READY
            self._doors.append(("mqtt_chat", door))

    async def _attach_personal_adapter(self) -> None:
        """The device's personal adapter, at start and after each completed personal run."""
        from agent.personal_adapter import personal_adapter_path, swap_in_personal

        if self._engine is not None:
            await swap_in_personal(self._engine, personal_adapter_path(self.config.adapters_dir))  # type: ignore[arg-type]

    def _build_scheduler(self) -> None:
        """The training scheduler (agent/scheduler.py) over this board's sensors, driving the personal
        trainer process (agent/trainer_control.py). Runs when ``scheduler.enabled`` and a model is
        loaded; personal runs are started only when ``scheduler.personal_interval_h`` is set."""
        from agent.clock import SystemClock
        from agent.scheduler import SchedulerPolicy, TrainingScheduler
        from agent.trainer_control import PersonalWork, SubprocessTrainerControl
        from hardware.detect import detect
        from hardware.sensors import board_sensors

        cfg = self.config
        hw = cfg.hardware
        detection = detect(hw.root_dir, override=hw.profile)
        for warning in detection.warnings:
            log.warning("hardware: %s", warning)
        profile = detection.profile
        self._trainer = SubprocessTrainerControl(
            config_path=self.config_path,
            stop_timeout_s=cfg.scheduler.stop_timeout_s,
            freeze_s=cfg.scheduler.preempt_freeze_s,
            on_completed=self._attach_personal_adapter,
        )
        self._work = PersonalWork(cfg, control=self._trainer)
        self._scheduler = TrainingScheduler(
            policy=SchedulerPolicy.from_config(cfg.scheduler, profile),
            sensors=board_sensors(
                profile, root=hw.root_dir, ignore_zones=hw.ignore_thermal_zones, use_jtop=hw.use_jtop
            ),
            work=self._work,
            trainer=self._trainer,
            clock=SystemClock(),
        )
        log.info("training scheduler on %s (%s)", profile.title, "; ".join(detection.reasons))

    def _add_fleet_client(self) -> None:
        """The fleet client (agent/fleet_client.py), one more supervised service, when enabled."""
        cfg = self.config
        if not cfg.fleet.enabled:
            return
        from agent.fleet_client import build_fleet_client

        self._fleet = build_fleet_client(
            cfg,
            model_path=cfg.model.path or _demo_model_path(),
            swapper=self._engine,  # type: ignore[arg-type]
            config_path=self.config_path,
            gate=_RoundGate(self._scheduler, self._work) if self._scheduler is not None else None,
        )

    async def _load_engine(self) -> InferenceBackend:
        from agent.engine.llama_backend import LlamaEngine

        model = self.config.model
        if model.path is None:
            model = model.model_copy(update={"path": _demo_model_path()})
        t0 = time.perf_counter()
        engine = await LlamaEngine.open(model, default_threads=_physical_cores())
        info = engine.info
        log.info(
            "model %s loaded (%s, %s, n_ctx %d) in %.2f s",
            info.path,
            info.architecture,
            info.file_type,
            info.n_ctx,
            time.perf_counter() - t0,
        )
        return engine

    async def _supervise(self) -> None:
        assert self._stop is not None
        tasks: list[_Supervised] = [
            _Supervised(name, asyncio.create_task(door.serve(), name=name)) for name, door in self._doors
        ]
        for name, coro in self._housekeeping():
            tasks.append(_Supervised(name, asyncio.create_task(coro, name=name)))
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        failure: BaseException | None = None
        try:
            await self._wait_doors_listening([t.task for t in tasks] + [stop])
            if not stop.done():
                self._state = DaemonState.READY
                self._write_status()
                self.notifier.ready(status=self._status_line())
                log.info("ready: %s", self._status_line())
            done, _ = await asyncio.wait(
                [t.task for t in tasks] + [stop], return_when=asyncio.FIRST_COMPLETED
            )
            for t in tasks:
                if t.task in done:
                    exc = t.task.exception()
                    if exc is not None:
                        log.error("%s failed; stopping", t.name, exc_info=exc)
                        failure = failure or exc
                    else:
                        log.info("%s ended; stopping", t.name)
        finally:
            stop.cancel()
            await self._shut_doors()
            for t in tasks:
                t.task.cancel()
            await asyncio.gather(*(t.task for t in tasks), return_exceptions=True)
        if failure is not None:
            raise failure

    async def _wait_doors_listening(self, tasks: list[asyncio.Task[Any]]) -> None:
        """READY=1 means every front door accepts: wait for the doors that bind inside ``serve()``
        (those with ``wait_ready()``), unless a task ends first (its failure is then supervised)."""
        waits = [door.wait_ready() for _, door in self._doors if hasattr(door, "wait_ready")]
        if not waits:
            return
        ready = asyncio.ensure_future(asyncio.gather(*waits))
        try:
            await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)

    def _housekeeping(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        loops: list[tuple[str, Coroutine[Any, Any, None]]] = [
            ("purge", self._purge_loop()),
            ("status", self._status_loop()),
        ]
        if self._fleet is not None:
            loops.append(("fleet", self._fleet.run()))
        if self._scheduler is not None:
            loops.append(("scheduler", self._scheduler.run()))
        if self.notifier.watchdog_interval_s is not None:
            loops.append(("watchdog", self._watchdog_loop(self.notifier.watchdog_interval_s)))
        return loops

    async def _shut_doors(self) -> None:
        self._state = DaemonState.STOPPING
        self.notifier.stopping(status="stopping: cancelling replies in flight")
        self._write_status()
        if self._chat is not None:
            self._chat.begin_shutdown()
        grace = self.config.socket.shutdown_grace_s
        await asyncio.gather(*(door.shutdown(grace_s=grace) for _, door in self._doors))

    async def _close(self) -> None:
        if self._trainer is not None:
            await self._trainer.close()  # SIGTERM: it checkpoints and resumes under the next daemon
        if self._engine is not None:
            await self._engine.close()
            self._engine = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        with contextlib.suppress(OSError):
            remove_snapshot(self.config.status_path, pid=os.getpid())

    # ---- housekeeping loops -----------------------------------------------------------------------

    async def _watchdog_loop(self, interval_s: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    async def _purge_loop(self) -> None:
        assert self._store is not None
        days = self.config.store.retention_days
        while True:
            try:
                result = await self._store.purge(retention_days=days)
            except StoreError as exc:
                log.error(
                    "retention purge failed (retrying in %g s): %s", self.config.store.purge_interval_s, exc
                )
            else:
                if result.turns or result.conversations:
                    log.info(
                        "retention: deleted %d turns and %d conversations older than %g days",
                        result.turns,
                        result.conversations,
                        days,
                    )
            await asyncio.sleep(self.config.store.purge_interval_s)

    async def _status_loop(self) -> None:
        assert self._store is not None
        if self._engine is not None:  # the model's SHA-256 for `agent status`, once, off the loop
            try:
                self._model_sha256 = await asyncio.to_thread(_file_sha256, self._engine.info.path)
            except OSError as exc:
                log.warning("cannot hash the model %s: %s", self._engine.info.path, exc)
            await asyncio.to_thread(self._write_status)
        while True:
            await asyncio.sleep(self.status_interval_s)
            try:
                self._conversations = await self._store.count_conversations()
            except StoreError as exc:
                log.warning("cannot count conversations: %s", exc)
            await asyncio.to_thread(self._write_status)  # fsync: off the loop
            line = self._status_line()
            if line != self._last_status_line:
                self.notifier.status(line)
                self._last_status_line = line

    # ---- status -----------------------------------------------------------------------------------

    def _status_line(self) -> str:
        if self._engine is None:
            return f"{self._state.value}, no model"
        info = self._engine.info
        line = (
            f"{self._state.value}: {info.path.name} ({info.file_type}), {self._conversations} conversations"
        )
        last = self._chat.last_reply if self._chat is not None else None
        if last is not None:
            line += f", last reply {last.tokens_per_s:.1f} tokens/s"
        return line

    def snapshot(self) -> StatusSnapshot:
        model: ModelStatus | None = None
        if self._engine is not None:
            info = self._engine.info
            model = ModelStatus(
                path=str(info.path),
                file_type=info.file_type,
                architecture=info.architecture,
                n_params=info.n_params,
                n_ctx=info.n_ctx,
                load_s=info.load_s,
                sha256=self._model_sha256,
            )
        last: LastReply | None = None
        replies = 0
        if self._chat is not None:
            replies = self._chat.replies
            if self._chat.last_reply is not None:
                r = self._chat.last_reply
                last = LastReply(
                    tokens_per_s=r.tokens_per_s,
                    completion_tokens=r.completion_tokens,
                    time_to_first_token_s=r.time_to_first_token_s,
                    finish_reason=r.finish_reason,
                    at=r.at,
                )
        return StatusSnapshot(
            training=self._training_status(),
            pid=os.getpid(),
            state=self._state,
            started_at=self._started_at,
            written_at=self.clock(),
            model=model,
            socket=str(self.config.socket_path) if self.config.socket.enabled else None,
            store=str(self.config.store_path),
            conversations=self._conversations,
            replies=replies,
            last_reply=last,
            heavy_modules_loaded=heavy_modules_loaded(),
            rss_bytes=rss_bytes(),
            doors=self._door_statuses(),
            fleet=self._fleet_status(),
        )

    def _door_statuses(self) -> tuple[DoorStatus, ...]:
        # A door whose serve() fails stops the daemon, so while READY every door listens.
        state = DoorState.LISTENING if self._state is DaemonState.READY else DoorState.DOWN
        return tuple(DoorStatus(name=name, state=state) for name, _ in self._doors)

    def _fleet_status(self) -> FleetLiveStatus | None:
        if self._fleet is None:
            return None
        return FleetLiveStatus(
            connected=self._fleet.connected,
            enrolled=self._fleet.enrolled,
            last_round=self._fleet.state.last_round,
            adapter_version=self._fleet.state.adapter_version,
        )

    def _training_status(self) -> TrainingStatus | None:
        verdict = self._scheduler.last_verdict if self._scheduler is not None else None
        if verdict is None:
            return None
        last = self._trainer.last_run if self._trainer is not None else None
        return TrainingStatus(
            allowed=verdict.allowed,
            blocking=tuple(BlockingRule(rule=c.rule.value, reason=c.reason) for c in verdict.blocking),
            explain=verdict.explain(),
            at=verdict.at.timestamp(),
            running=self._trainer is not None and self._trainer.is_running,
            last_outcome=last.outcome.value if last is not None else None,
        )

    def _write_status(self) -> None:
        snap = self.snapshot()
        key = (
            snap.state,
            snap.model is not None,
            snap.conversations,
            snap.replies,
            snap.heavy_modules_loaded,
            None if snap.training is None else (snap.training.allowed, snap.training.running),
            snap.model.sha256 if snap.model is not None else None,
            snap.doors,
            snap.fleet,
        )
        now = self.clock()
        if key == self._last_written and now - self._last_write_at < STATUS_REFRESH_S:
            return
        try:
            write_snapshot(self.config.status_path, snap)
        except OSError as exc:
            log.warning("cannot write the status snapshot %s: %s", self.config.status_path, exc)
            return
        self._last_written = key
        self._last_write_at = now


class _RoundGate:
    """The fleet client's gate: the scheduler's rules now, with the waiting round as the work."""

    def __init__(self, scheduler: Any, work: Any) -> None:
        self._scheduler = scheduler
        self._work = work

    def check(self) -> Any:
        work = self._work.work_state()
        return self._scheduler.check(work.model_copy(update={"round_pending": True}))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _physical_cores() -> int | None:
    import psutil

    cores = psutil.cpu_count(logical=False)
    return int(cores) if cores else None


def _demo_model_path() -> Path:
    """The cached demo model (development only: ``model.path`` unset). Never builds it: that takes
    minutes and torch, which the daemon does not import."""
    from agent.model.demo import DemoModel, build_key, default_cache_dir

    key = build_key()
    model = DemoModel.at(default_cache_dir() / "demo-model" / key, key)
    if not model.manifest.is_file():
        raise ModelError(
            "model.path is not set and the demo model is not built; set model.path in the config, "
            "or build the demo model with `agent model build-demo`"
        )
    log.warning("model.path is not set: using the demo model %s (development only)", model.q4_k_m)
    return model.q4_k_m
