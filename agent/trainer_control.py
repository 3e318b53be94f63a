"""The personal trainer process as the scheduler drives it (:class:`agent.scheduler.TrainerControl`).

:class:`SubprocessTrainerControl` starts ``python -m agent train --adapter personal --config FILE``
in its own session (``start_new_session=True``: a Ctrl-C in the daemon's terminal does not reach it;
the trainer lowers its own CPU and IO priority). :meth:`~SubprocessTrainerControl.preempt` sends
SIGTERM: the trainer stops at its next step boundary, saves a checkpoint and exits 0 with status
``stopped``; the next start resumes that checkpoint under the same privacy charge. With ``freeze_s``
it is also frozen (SIGSTOP) for that long and then thawed, so that the reply that pre-empted it has
the machine to itself while its prompt is evaluated. A trainer that does not exit within
``stop_timeout_s`` is killed (the checkpoint of its last boundary stands).

:class:`PersonalWork` tells the scheduler whether a personal run is due and roughly how much privacy
budget is left, without the opacus accountant (which would import torch into the daemon): the
window's spend is bounded by the latest charge's recorded composition. The trainer itself is the
authority: it refuses a run the budget cannot pay (exit 77).

Nothing here blocks the event loop: the process is awaited with asyncio, its output read by tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import PrivacyError
from agent.scheduler import WorkState

log = logging.getLogger(__name__)

MAX_STDOUT_BYTES = 1 << 20
STDERR_TAIL_LINES = 20
STOPPED_MARK = "checkpoint saved"
STEPPING_MARK = re.compile(r"training \w+ adapter: ")
"""What it logs just before its first DP-SGD step (agent/train/trainer.py)."""
"""What ``agent train`` logs once it stopped at a step boundary (agent/train/trainer.py)."""


class TrainerExit(str, Enum):
    """How a trainer process ended (``agent train``'s exit codes, agent/commands/train.py)."""

    COMPLETED = "completed"
    STOPPED = "stopped"
    """Stopped at a step boundary with a checkpoint (resumable)."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    NOTHING_TO_TRAIN = "nothing_to_train"
    EXPORT_REFUSED = "export_refused"
    CONFIG_ERROR = "config_error"
    KILLED = "killed"
    FAILED = "failed"


_EXIT_CODES = {
    77: TrainerExit.BUDGET_EXHAUSTED,
    75: TrainerExit.NOTHING_TO_TRAIN,
    65: TrainerExit.EXPORT_REFUSED,
    78: TrainerExit.CONFIG_ERROR,
}


def classify_exit(returncode: int, status: str | None) -> TrainerExit:
    """The outcome of ``agent train`` from its exit code and the ``status`` of its JSON result."""
    if returncode == 0:
        return TrainerExit.STOPPED if status == "stopped" else TrainerExit.COMPLETED
    if returncode < 0:
        return TrainerExit.KILLED
    return _EXIT_CODES.get(returncode, TrainerExit.FAILED)


def parse_status(stdout: bytes) -> str | None:
    """The ``status`` field of the JSON result ``agent train`` prints (None if absent or malformed)."""
    text = stdout[:MAX_STDOUT_BYTES].decode("utf-8", errors="replace")
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
    except ValueError:
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


@dataclass(frozen=True)
class TrainerRun:
    """One finished trainer process."""

    outcome: TrainerExit
    returncode: int
    started_at: float
    ended_at: float
    """Monotonic times."""
    stderr_tail: tuple[str, ...] = ()


class SubprocessTrainerControl:
    """Starts and pre-empts ``agent train --adapter personal`` (one process at a time)."""

    def __init__(
        self,
        *,
        config_path: Path | None,
        python: str = sys.executable,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        stop_timeout_s: float = 10.0,
        freeze_s: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
        on_completed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._on_completed = on_completed
        """Awaited after a run that completed (the daemon hot-swaps the new personal adapter)."""
        self._config_path = config_path
        self._python = python
        self._extra_args = extra_args
        self._env = env
        self._stop_timeout_s = stop_timeout_s
        self._freeze_s = freeze_s
        """Seconds the trainer is held stopped (SIGSTOP) after the SIGTERM of a pre-emption."""
        self._monotonic = monotonic
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self.runs: list[TrainerRun] = []
        """Finished processes, oldest first."""
        self._term_at: float | None = None
        self.stepping = False
        """The running trainer has reported its first step coming (its setup is done)."""
        self.last_stop_s: float | None = None
        """Seconds from the latest SIGTERM to the process's exit."""
        self.last_boundary_s: float | None = None
        """Seconds from the latest SIGTERM to the trainer's report that it stopped at a step
        boundary with its checkpoint saved (before the process tears down)."""

    def command(self) -> list[str]:
        cmd = [self._python, "-m", "agent", "train", "--adapter", "personal"]
        if self._config_path is not None:
            cmd += ["--config", str(self._config_path)]
        return cmd + list(self._extra_args)

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running and self._proc is not None else None

    @property
    def last_run(self) -> TrainerRun | None:
        return self.runs[-1] if self.runs else None

    async def start(self) -> None:
        if self.is_running:
            return
        env = {**os.environ, **(self._env or {})}
        self._proc = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self._started_at = self._monotonic()
        self.stepping = False
        log.info("trainer started (pid %d)", self._proc.pid)
        self._watcher = asyncio.create_task(self._watch(self._proc), name="trainer-watch")

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        saved_on_stop = False

        async def read_stderr(stream: asyncio.StreamReader) -> None:
            nonlocal saved_on_stop
            async for raw in stream:
                line = raw.decode("utf-8", errors="replace").rstrip()
                if STEPPING_MARK.search(line):
                    self.stepping = True
                if self._term_at is not None and STOPPED_MARK in line:
                    self.last_boundary_s = self._monotonic() - self._term_at
                    saved_on_stop = True
                tail.append(line)
                log.debug("trainer: %s", line)

        async def read_stdout(stream: asyncio.StreamReader) -> bytes:
            out = bytearray()
            while chunk := await stream.read(65536):
                if len(out) < MAX_STDOUT_BYTES:
                    out += chunk[: MAX_STDOUT_BYTES - len(out)]
            return bytes(out)

        out, _ = await asyncio.gather(read_stdout(proc.stdout), read_stderr(proc.stderr))
        rc = await proc.wait()
        if self._term_at is not None:
            self.last_stop_s = self._monotonic() - self._term_at
            self._term_at = None
        outcome = classify_exit(rc, parse_status(out))
        if rc == -signal.SIGTERM and saved_on_stop:
            outcome = TrainerExit.STOPPED  # it reported its checkpoint before the signal ended it
        run = TrainerRun(
            outcome=outcome,
            returncode=rc,
            started_at=self._started_at,
            ended_at=self._monotonic(),
            stderr_tail=tuple(tail),
        )
        self.runs.append(run)
        level = logging.INFO if rc == 0 else logging.WARNING
        log.log(level, "trainer exited %d (%s)", rc, run.outcome.value)
        if run.outcome in (TrainerExit.FAILED, TrainerExit.CONFIG_ERROR):
            log.warning("trainer's last lines: %s", " | ".join(tail))
        if run.outcome is TrainerExit.COMPLETED and self._on_completed is not None:
            await self._on_completed()

    async def wait(self) -> TrainerRun | None:
        """Until the current process (if any) has ended and been recorded."""
        if self._watcher is not None:
            await asyncio.shield(self._watcher)
        return self.last_run

    async def preempt(self) -> None:
        """SIGTERM, then await the exit (bounded by ``stop_timeout_s``; SIGKILL after that)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        self._term_at = self._monotonic()
        self.last_boundary_s = None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            if self._freeze_s > 0:
                # Frozen at once: the request that pre-empts it gets the cores to itself while its
                # prompt is evaluated; thawed, the trainer handles the SIGTERM at its step boundary.
                proc.send_signal(signal.SIGSTOP)
                asyncio.get_running_loop().call_later(self._freeze_s, self._thaw, proc)
        # asyncio.wait, not wait_for: before Python 3.12, wait_for swallows a cancellation that
        # arrives as the awaited exit completes, and the daemon's shutdown then hangs on this task.
        watcher = self._watcher
        if watcher is None:
            return
        done, _ = await asyncio.wait({watcher}, timeout=self._stop_timeout_s)
        if done:
            return
        log.warning("trainer did not stop within %g s: killing it", self._stop_timeout_s)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await self._watched()

    @staticmethod
    def _thaw(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)

    async def _watched(self) -> None:
        if self._watcher is not None:
            await self._watcher

    async def close(self) -> None:
        """Stop a running trainer (the daemon's shutdown)."""
        await self.preempt()


class PersonalWork:
    """The scheduler's :class:`~agent.scheduler.WorkSource` for the personal adapter."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        control: SubprocessTrainerControl | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = config
        self._control = control
        self._wall = wall_clock
        self._monotonic = monotonic
        self._ledger_key: tuple[int, int] | None = None
        self._ledger_cache: tuple[float | None, float | None] = (None, None)

    def work_state(self) -> WorkState:
        left, last_completed = self._ledger_facts()
        return WorkState(privacy_budget_left=left, personal_run_due=self._personal_due(last_completed))

    def _personal_due(self, last_completed: float | None) -> bool:
        interval_h = self._cfg.scheduler.personal_interval_h
        if interval_h is None:
            return False
        if _has_checkpoint(self._cfg.train_dir / "personal"):
            return True  # a stopped run resumes under its charge
        interval_s = interval_h * 3600.0
        last = self._control.last_run if self._control is not None else None
        recent = last is not None and self._monotonic() - last.ended_at < interval_s
        if last is not None and recent and last.outcome is not TrainerExit.STOPPED:
            return False  # done, refused or failed lately: try again after the interval
        return last_completed is None or self._wall() - last_completed >= interval_s

    def _ledger_facts(self) -> tuple[float | None, float | None]:
        """(epsilon left, upper bound; unix time of the latest completed personal run), cached on the
        ledger file's identity. None for epsilon: the ledger cannot be read."""
        from agent.train.kinds import AdapterKind, RunStatus
        from agent.train.ledger import PrivacyLedger, window_runs

        path = self._cfg.ledger_path
        try:
            st = path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = (0, 0)
        except OSError:
            return None, None
        if key == self._ledger_key:
            return self._ledger_cache
        budget = self._cfg.privacy.budget
        try:
            state = PrivacyLedger(path, clock=self._wall).read()
        except PrivacyError as exc:
            log.warning("the scheduler cannot read the privacy ledger: %s", exc)
            return None, None
        runs = window_runs(state, budget=budget, now=self._wall())
        spent = max((r.epsilon_period_after for r in runs), default=0.0)
        completed = [
            r.finished_at or r.charged_at
            for r in state.runs
            if r.adapter is AdapterKind.PERSONAL and r.status is RunStatus.COMPLETED
        ]
        facts = (max(0.0, budget.epsilon - spent), max(completed, default=None))
        self._ledger_key, self._ledger_cache = key, facts
        return facts


def _has_checkpoint(directory: Path) -> bool:
    from agent.train.checkpoint import STATE_FILE

    return (directory / STATE_FILE).is_file()
