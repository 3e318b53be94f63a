"""``agent status``'s field diagnostic: everything a technician asks about one device, in one report.

The report is assembled from four sources, each read so that a missing part gives ``unknown`` or
``not configured`` rather than an error:

- the daemon's status snapshot (:mod:`agent.status`): model, SHA-256 (hashed by the daemon after the
  load), load time, last tokens/s, front doors, fleet connection, the scheduler's verdict;
- systemd (``systemctl show``) when it manages this machine;
- the board, read live (:mod:`hardware`): profile with its detection evidence, power source,
  under-voltage and throttling, temperatures, memory; and the state directory's file system;
- files the daemon keeps, read-only: the privacy ledger, the fleet client's state.

The JSON form (:class:`FieldReport`, ``schema_version`` :data:`SCHEMA_VERSION`) is for fleet scripts:
fields are only ever added within a schema version. :func:`assess` decides the exit status: 0 healthy,
1 degraded (with the reasons), 2 not running. torch is never imported here.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent.config import AgentConfig
from agent.status import StatusSnapshot

SCHEMA_VERSION = 1
UNIT = "ppchat-agent.service"
STALE_AFTER_S = 180.0
"""The daemon rewrites its snapshot at least every minute; three missed rewrites mean it is stuck."""
SYSTEMCTL_PROPERTIES = ("ActiveState", "SubState", "NRestarts", "ExecMainStartTimestamp")
BUDGET_EXHAUSTED_EPSILON = 1e-9


class Health(str, Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    NOT_RUNNING = "not_running"

    @property
    def exit_code(self) -> int:
        return {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.NOT_RUNNING: 2}[self]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServiceInfo(_Section):
    manager: str
    """``systemd`` or ``none`` (not under systemd: a container, a development shell)."""
    unit: str = UNIT
    active_state: str | None = None
    sub_state: str | None = None
    restarts: int | None = None
    started: str | None = None
    note: str | None = None


class BoardInfo(_Section):
    profile: str | None = None
    title: str | None = None
    overridden: bool = False
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    evidence: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class ModelInfo(_Section):
    path: str | None = None
    """The loaded model (from the daemon), else the configured one; None: the demo model, not built."""
    loaded: bool = False
    size_bytes: int | None = None
    file_type: str | None = None
    """Quantization, as the GGUF header says (``Q4_K_M``)."""
    architecture: str | None = None
    n_params: int | None = None
    n_ctx: int | None = None
    sha256: str | None = None
    sha256_source: str | None = None
    """``daemon`` (hashed at load), ``verified`` (hashed now, ``--verify``), or None: not known yet."""
    sha256_pinned: str | None = None
    """``model.sha256`` from the config, when set."""
    load_s: float | None = None
    last_tokens_per_s: float | None = None
    last_reply_at: float | None = None
    error: str | None = None


class DoorInfo(_Section):
    name: str
    enabled: bool
    state: str
    """``listening``, ``down``, ``disabled``, or ``unknown`` (the daemon does not run)."""
    detail: str | None = None


class FleetInfo(_Section):
    enabled: bool
    broker: str | None = None
    connected: bool | None = None
    """None: unknown (the daemon does not run)."""
    enrolled: bool | None = None
    last_round: int | None = None
    """The newest round this device took part in (0: none yet)."""
    adapter_version: int | None = None
    """The global adapter version in use (None: the base model alone)."""


class PrivacyInfo(_Section):
    preset: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    period_days: float | None = None
    spent_epsilon: float | None = None
    """An upper bound of the window's spend: the composed epsilon recorded with the newest charge in
    the window (runs that left the window since only lower it; ``agent privacy`` recomputes it exactly)."""
    remaining_epsilon: float | None = None
    runs_in_window: int | None = None
    runs_total: int | None = None
    exhausted: bool | None = None
    ledger: str | None = None
    error: str | None = None


class SchedulerInfo(_Section):
    known: bool = False
    allowed: bool | None = None
    blocking: tuple[str, ...] = ()
    """``rule: reason`` for each rule that blocks training."""
    summary: str = "unknown"


class PowerInfo(_Section):
    source: str = "unknown"
    battery_percent: float | None = None
    under_voltage_now: bool | None = None
    under_voltage_since_boot: bool | None = None
    throttled_now: bool | None = None
    throttling_flags: tuple[str, ...] = ()
    """The Raspberry Pi firmware's ``get_throttled`` bits that are set, by name."""
    input_power_w: float | None = None
    evidence: tuple[str, ...] = ()


class TemperatureInfo(_Section):
    max_c: float | None = None
    soft_limit_c: float | None = None
    hard_limit_c: float | None = None
    zones: dict[str, float] = Field(default_factory=dict)


class MemoryInfo(_Section):
    total_mb: int | None = None
    available_mb: int | None = None
    daemon_rss_mb: float | None = None
    load_per_cpu: float | None = None


class DiskInfo(_Section):
    path: str
    total_bytes: int | None = None
    free_bytes: int | None = None
    used_percent: float | None = None


class Versions(_Section):
    ppchat: str
    llama_cpp: str | None = None
    python: str


class FieldReport(_Section):
    """The ``agent status --json`` object (schema version 1)."""

    schema_version: int = SCHEMA_VERSION
    generated_at: float
    health: Health
    exit_code: int
    reasons: tuple[str, ...] = ()
    """Why the device is degraded or not running (empty when healthy)."""
    notes: tuple[str, ...] = ()
    """Worth knowing, not degrading (under-voltage since boot, no model loaded)."""
    device_name: str
    running: bool
    socket_answers: bool
    status_file: str
    socket: str
    pid: int | None = None
    state: str | None = None
    uptime_s: float | None = None
    snapshot_age_s: float | None = None
    conversations: int | None = None
    replies: int | None = None
    heavy_modules_loaded: tuple[str, ...] = ()
    service: ServiceInfo
    board: BoardInfo
    model: ModelInfo
    doors: tuple[DoorInfo, ...]
    fleet: FleetInfo
    privacy: PrivacyInfo
    scheduler: SchedulerInfo
    power: PowerInfo
    temperature: TemperatureInfo
    memory: MemoryInfo
    disk: DiskInfo
    versions: Versions


# -- systemd ------------------------------------------------------------------------------------------

Runner = Callable[[list[str]], str]
"""Runs a command and returns its stdout; raises OSError or subprocess.SubprocessError on failure."""


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=5.0, check=True).stdout


def systemd_is_pid1(root: Path = Path("/")) -> bool:
    try:
        return (root / "proc/1/comm").read_text(encoding="utf-8").strip() == "systemd"
    except OSError:
        return False


def parse_systemctl_show(text: str) -> ServiceInfo:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    restarts = values.get("NRestarts", "")
    return ServiceInfo(
        manager="systemd",
        active_state=values.get("ActiveState") or None,
        sub_state=values.get("SubState") or None,
        restarts=int(restarts) if restarts.isdigit() else None,
        started=values.get("ExecMainStartTimestamp") or None,
    )


def service_state(
    *, unit: str = UNIT, runner: Runner = _run, pid1_is_systemd: bool | None = None
) -> ServiceInfo:
    if shutil.which("systemctl") is None:
        return ServiceInfo(manager="none", note="not under systemd (no systemctl)")
    if not (systemd_is_pid1() if pid1_is_systemd is None else pid1_is_systemd):
        return ServiceInfo(manager="none", note="not under systemd (systemd is not PID 1)")
    argv = ["systemctl", "show", unit, "-p", ",".join(SYSTEMCTL_PROPERTIES)]
    try:
        return parse_systemctl_show(runner(argv))
    except (OSError, subprocess.SubprocessError) as exc:
        return ServiceInfo(manager="systemd", note=f"systemctl show failed: {exc}")


# -- the board, read live ----------------------------------------------------------------------------


def read_board(config: AgentConfig) -> tuple[BoardInfo, PowerInfo, TemperatureInfo, MemoryInfo]:
    from hardware.detect import detect
    from hardware.errors import ProfileError
    from hardware.sensors import board_sensors

    hw = config.hardware
    try:
        found = detect(hw.root_dir, override=hw.profile)
    except ProfileError as exc:
        return BoardInfo(error=str(exc)), PowerInfo(), TemperatureInfo(), MemoryInfo()
    profile = found.profile
    board = BoardInfo(
        profile=profile.name,
        title=profile.title,
        overridden=found.overridden,
        reasons=found.reasons,
        warnings=found.warnings,
        evidence=found.evidence.model_dump(mode="json", exclude={"cpu_features", "root"}, exclude_none=True),
    )
    sensors = board_sensors(
        profile, root=hw.root_dir, ignore_zones=hw.ignore_thermal_zones, use_jtop=hw.use_jtop
    ).snapshot()
    p = sensors.power
    flags = p.throttling.active if p.throttling is not None else ()
    current = {"UNDER_VOLTAGE", "FREQ_CAPPED", "THROTTLED", "SOFT_TEMP_LIMIT"}
    power = PowerInfo(
        source=p.source.value,
        battery_percent=p.battery_percent,
        under_voltage_now=p.under_voltage_now,
        under_voltage_since_boot=p.under_voltage_since_boot,
        throttled_now=None if p.throttling is None else any(f.name in current for f in flags),
        throttling_flags=tuple(f.name.lower() for f in flags),
        input_power_w=p.input_power_w,
        evidence=p.evidence,
    )
    t = sensors.temperature
    temperature = TemperatureInfo(
        max_c=t.max_c,
        soft_limit_c=profile.thermal.soft_c,
        hard_limit_c=profile.thermal.hard_c,
        zones={(z.type or z.zone): z.celsius for z in t.valid if z.celsius is not None},
    )
    s = sensors.system
    memory = MemoryInfo(
        total_mb=s.memory_total_mb, available_mb=s.memory_available_mb, load_per_cpu=s.load_per_cpu
    )
    return board, power, temperature, memory


def read_disk(path: Path) -> DiskInfo:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the state dir may not exist yet: its file system is its parent's
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return DiskInfo(path=str(path))
    used = 100.0 * (usage.total - usage.free) / usage.total if usage.total else None
    return DiskInfo(path=str(path), total_bytes=usage.total, free_bytes=usage.free, used_percent=used)


# -- files the daemon keeps, read-only ----------------------------------------------------------------


def read_privacy(config: AgentConfig, *, now: float) -> PrivacyInfo:
    """The budget from the ledger, read-only (no lock taken, nothing written, no opacus)."""
    from agent.errors import PrivacyError
    from agent.train.ledger import PrivacyLedger, window_runs

    budget = config.privacy.budget
    base = PrivacyInfo(
        preset=budget.preset.value if budget.preset is not None else "custom",
        epsilon=budget.epsilon,
        delta=budget.delta,
        period_days=budget.period_days,
        ledger=str(config.ledger_path),
    )
    try:
        state = PrivacyLedger(config.ledger_path).read()
    except PrivacyError as exc:
        return base.model_copy(update={"error": str(exc)})
    runs = window_runs(state, budget=budget, now=now)
    newest = max(runs, key=lambda r: r.charged_at, default=None)
    spent = newest.epsilon_period_after if newest is not None else 0.0
    remaining = max(0.0, budget.epsilon - spent)
    return base.model_copy(
        update={
            "spent_epsilon": spent,
            "remaining_epsilon": remaining,
            "runs_in_window": len(runs),
            "runs_total": len(state.runs),
            "exhausted": remaining <= BUDGET_EXHAUSTED_EPSILON,
        }
    )


def read_fleet(config: AgentConfig, snapshot: Mapping[str, Any] | None) -> FleetInfo:
    from agent.fleet_adapter import load_state

    fc = config.fleet
    if not fc.enabled:
        return FleetInfo(enabled=False)
    state = load_state(config.fleet_dir / "state.json")
    live = snapshot.get("fleet") if snapshot is not None else None
    connected = live.get("connected") if isinstance(live, Mapping) else None
    return FleetInfo(
        enabled=True,
        broker=fc.url,
        connected=connected if isinstance(connected, bool) else None,
        enrolled=state.enrolled,
        last_round=state.last_round,
        adapter_version=state.adapter_version,
    )


def read_scheduler(config: AgentConfig, snap: StatusSnapshot | None) -> SchedulerInfo:
    if not config.scheduler.enabled:
        return SchedulerInfo(known=True, allowed=False, summary="not configured (scheduler disabled)")
    training = snap.training if snap is not None else None
    if training is None:
        return SchedulerInfo(summary="unknown (no verdict from the daemon yet)")
    return SchedulerInfo(
        known=True,
        allowed=training.allowed,
        blocking=tuple(f"{b.rule}: {b.reason}" for b in training.blocking),
        summary=training.explain + (" (a trainer runs now)" if training.running else ""),
    )


# -- the model ----------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model(config: AgentConfig, snap: StatusSnapshot | None, *, verify: bool) -> ModelInfo:
    from agent.errors import ModelError
    from agent.model.info import read_gguf_info

    m = snap.model if snap is not None else None
    path = Path(m.path) if m is not None else config.model.path
    if path is None:
        return ModelInfo(error="model.path not set (the demo model is used, development only)")
    info = ModelInfo(path=str(path), loaded=m is not None, sha256_pinned=config.model.sha256)
    update: dict[str, Any] = {}
    if m is not None:
        update.update(
            file_type=m.file_type,
            architecture=m.architecture,
            n_params=m.n_params,
            n_ctx=m.n_ctx,
            load_s=m.load_s,
            sha256=m.sha256,
            sha256_source="daemon" if m.sha256 else None,
        )
    if snap is not None and snap.last_reply is not None:
        update.update(last_tokens_per_s=snap.last_reply.tokens_per_s, last_reply_at=snap.last_reply.at)
    try:
        update["size_bytes"] = path.stat().st_size
        if m is None:
            header = read_gguf_info(path)
            update.update(file_type=header.file_type, architecture=header.architecture)
        if verify:
            update.update(sha256=file_sha256(path), sha256_source="verified")
    except (OSError, ModelError) as exc:
        update["error"] = f"cannot read {path}: {exc}"
    return info.model_copy(update=update)


# -- versions -----------------------------------------------------------------------------------------


def versions() -> Versions:
    from agent import __version__

    try:
        import llama_cpp

        llama: str | None = str(llama_cpp.__version__)
    except ImportError:
        llama = None
    return Versions(ppchat=__version__, llama_cpp=llama, python=platform.python_version())


# -- the verdict --------------------------------------------------------------------------------------


def assess(report: FieldReport) -> tuple[Health, tuple[str, ...], tuple[str, ...]]:
    """(health, reasons it is degraded or not running, notes). Pure: reads only the report."""
    notes: list[str] = []
    if not report.running:
        return (
            Health.NOT_RUNNING,
            (f"no live daemon ({report.status_file}) and no answer on {report.socket}",),
            (),
        )
    reasons: list[str] = []
    if report.state is not None and report.state != "ready":
        reasons.append(f"daemon is {report.state}")
    if report.snapshot_age_s is not None and report.snapshot_age_s > STALE_AFTER_S:
        reasons.append(f"status snapshot is stale ({report.snapshot_age_s:.0f} s old)")
    if report.pid is None:
        reasons.append("the socket answers but the daemon wrote no status snapshot")
    for door in report.doors:
        if door.enabled and door.state == "down":
            reasons.append(f"front door {door.name} is down" + (f" ({door.detail})" if door.detail else ""))
    if report.heavy_modules_loaded:
        reasons.append("training libraries loaded in the daemon: " + ", ".join(report.heavy_modules_loaded))
    p = report.power
    if p.under_voltage_now:
        reasons.append("under-voltage now: use a stronger power supply")
    elif p.under_voltage_since_boot:
        notes.append("under-voltage happened since boot")
    if p.throttled_now:
        active = [f for f in p.throttling_flags if not f.endswith("since_boot")]
        reasons.append("throttled now (" + ", ".join(active) + ")")
    t = report.temperature
    if t.max_c is not None and t.hard_limit_c is not None and t.max_c >= t.hard_limit_c:
        reasons.append(f"temperature {t.max_c:.0f} °C at or above the board's limit {t.hard_limit_c:.0f} °C")
    if report.privacy.exhausted:
        reasons.append("privacy budget exhausted: no training until the window rolls on")
    if report.privacy.error:
        reasons.append(f"privacy ledger unreadable: {report.privacy.error}")
    f = report.fleet
    if f.enabled and f.connected is False:
        reasons.append(f"fleet broker {f.broker} not connected")
    m = report.model
    if m.sha256 and m.sha256_pinned and m.sha256 != m.sha256_pinned:
        reasons.append("model SHA-256 differs from model.sha256 in the config")
    if not m.loaded:
        notes.append("no model loaded")
    health = Health.DEGRADED if reasons else Health.HEALTHY
    return health, tuple(reasons), tuple(notes)


# -- assembling ---------------------------------------------------------------------------------------


def _doors(
    config: AgentConfig, snapshot: Mapping[str, Any] | None, *, socket_answers: bool
) -> tuple[DoorInfo, ...]:
    enabled = {
        "socket": config.socket.enabled,
        "wyoming": config.wyoming.enabled,
        "mqtt_chat": config.mqtt_chat.enabled,
    }
    live: dict[str, Mapping[str, Any]] = {}
    if snapshot is not None:
        for d in snapshot.get("doors") or ():
            if isinstance(d, Mapping) and isinstance(d.get("name"), str):
                live[d["name"]] = d
    out: list[DoorInfo] = []
    for name, on in enabled.items():
        if not on:
            out.append(DoorInfo(name=name, enabled=False, state="disabled"))
            continue
        d = live.get(name)
        if name == "socket":
            state = "listening" if socket_answers else "down"
            detail = str(config.socket_path) + ("" if socket_answers else " does not answer")
        elif d is None:
            state, detail = ("unknown" if snapshot is None else "down"), None
        else:
            state, detail = str(d.get("state", "unknown")), d.get("detail")
        out.append(DoorInfo(name=name, enabled=True, state=state, detail=detail))
    return tuple(out)


def build_report(
    config: AgentConfig,
    *,
    snap: StatusSnapshot | None,
    alive: bool,
    socket_answers: bool,
    verify: bool = False,
    service: ServiceInfo | None = None,
    now: float | None = None,
) -> FieldReport:
    """The whole report; ``snap`` is the daemon's snapshot when its process is alive."""
    now = time.time() if now is None else now
    live = snap if (snap is not None and alive) else None
    raw = live.model_dump(mode="json") if live is not None else None
    board, power, temperature, memory = read_board(config)
    if live is not None and live.rss_bytes:
        memory = memory.model_copy(update={"daemon_rss_mb": round(live.rss_bytes / 2**20, 1)})
    running = alive or socket_answers
    report = FieldReport(
        generated_at=now,
        health=Health.HEALTHY,
        exit_code=0,
        device_name=config.device_name,
        running=running,
        socket_answers=socket_answers,
        status_file=str(config.status_path),
        socket=live.socket if live is not None and live.socket else str(config.socket_path),
        pid=live.pid if live is not None else None,
        state=live.state.value if live is not None else None,
        uptime_s=round(live.uptime_s(now), 1) if live is not None else None,
        snapshot_age_s=round(max(0.0, now - live.written_at), 1) if live is not None else None,
        conversations=live.conversations if live is not None else None,
        replies=live.replies if live is not None else None,
        heavy_modules_loaded=live.heavy_modules_loaded if live is not None else (),
        service=service if service is not None else service_state(),
        board=board,
        model=read_model(config, live, verify=verify),
        doors=_doors(config, raw, socket_answers=socket_answers),
        fleet=read_fleet(config, raw),
        privacy=read_privacy(config, now=now),
        scheduler=read_scheduler(config, live),
        power=power,
        temperature=temperature,
        memory=memory,
        disk=read_disk(config.paths.state_dir),
        versions=versions(),
    )
    health, reasons, notes = assess(report)
    return report.model_copy(
        update={"health": health, "exit_code": health.exit_code, "reasons": reasons, "notes": notes}
    )


def pid_of_snapshot_alive(snap: StatusSnapshot | None) -> bool:
    from agent.status import pid_alive

    return snap is not None and snap.pid != os.getpid() and pid_alive(snap.pid)
