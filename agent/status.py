"""The daemon's status snapshot: written atomically to ``config.status_path``, read by ``agent status``.

It holds no conversation text: the model, the socket, uptime, the last reply's speed, how many
conversations are stored, and which heavy libraries (that the chat daemon must never import) are
loaded in the daemon. ``agent status`` reads it and checks that the daemon's process is alive and its
socket answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.files import write_atomic

STATUS_VERSION = 1
STATUS_FILE_MODE = 0o644
HEAVY_MODULES = ("torch", "peft", "opacus", "transformers")
"""Libraries that belong in ``agent train`` only; the snapshot lists any found in the daemon."""


class DaemonState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class ModelStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    file_type: str
    """Quantization as GGUF reports it, e.g. ``Q4_K_M``."""
    architecture: str
    n_params: int
    n_ctx: int
    load_s: float
    sha256: str | None = None
    """The file's SHA-256, hashed by the daemon after the load (None until it is done)."""


class LastReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens_per_s: float
    completion_tokens: int
    time_to_first_token_s: float
    finish_reason: str
    at: float


class BlockingRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: str
    reason: str


class TrainingStatus(BaseModel):
    """The training scheduler's latest verdict (agent/scheduler.py) and the trainer's state."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed: bool
    blocking: tuple[BlockingRule, ...] = ()
    """The rules that do not hold, each with its reason."""
    explain: str
    """One line: ``training allowed`` or ``training blocked: rule: reason; ...``."""
    at: float
    """Unix time of the verdict."""
    running: bool = False
    """A trainer process runs now."""
    last_outcome: str | None = None
    """How the latest trainer process ended (agent/trainer_control.py's TrainerExit)."""


class DoorState(str, Enum):
    LISTENING = "listening"
    DOWN = "down"


class DoorStatus(BaseModel):
    """One chat front door (socket, wyoming, mqtt_chat) as the supervisor sees it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    state: DoorState
    detail: str | None = None


class FleetLiveStatus(BaseModel):
    """The fleet client's connection, as the daemon sees it (its durable state is in its own file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    connected: bool
    enrolled: bool
    last_round: int
    adapter_version: int | None = None


class StatusSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = STATUS_VERSION
    pid: int
    state: DaemonState
    started_at: float
    """Unix time the daemon started."""
    written_at: float
    model: ModelStatus | None
    """None while loading, or when the daemon runs without a model."""
    socket: str | None
    store: str
    conversations: int
    replies: int
    last_reply: LastReply | None = None
    heavy_modules_loaded: tuple[str, ...] = Field(default=())
    rss_bytes: int | None = None
    training: TrainingStatus | None = None
    """None when the daemon runs no training scheduler (or before its first verdict)."""
    doors: tuple[DoorStatus, ...] = ()
    """The chat front doors the supervisor runs (empty in snapshots from older daemons)."""
    fleet: FleetLiveStatus | None = None
    """None when the fleet client is not enabled."""

    def uptime_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.started_at)


def heavy_modules_loaded() -> tuple[str, ...]:
    return tuple(name for name in HEAVY_MODULES if name in sys.modules)


def rss_bytes() -> int | None:
    """This process's resident set size, from /proc (no psutil needed)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def write_snapshot(path: Path, snapshot: StatusSnapshot) -> None:
    write_atomic(path, snapshot.model_dump_json(indent=2).encode("utf-8") + b"\n", mode=STATUS_FILE_MODE)


def remove_snapshot(path: Path, *, pid: int) -> None:
    """Remove the snapshot if it is this process's (a newer daemon may have replaced it)."""
    snap = read_snapshot(path)
    if snap is not None and snap.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def read_snapshot(path: Path) -> StatusSnapshot | None:
    """The snapshot, or None when it is missing or unreadable (a daemon from another version)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        return StatusSnapshot.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True
