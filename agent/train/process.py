"""The training process itself: low priority, and stopping at a step boundary.

No heavy imports: ``agent train`` installs the stop signal before it imports torch.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import threading

from agent.errors import AgentError


class TrainStopped(AgentError):
    """The run was asked to stop before it was charged (nothing spent, nothing trained)."""

    exit_code = 0  # a SIGTERM shutdown exits 0


class StopSignal:
    """Asks a run to stop at its next step boundary (SIGTERM/SIGINT, or the daemon through a call)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def request(self, reason: str = "stop requested") -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self) -> None:
        """Turn SIGTERM and SIGINT into a stop request (call from the main thread)."""

        def handler(signum: int, _frame: object) -> None:
            self.request(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


_IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30, "armv7l": 314, "armv6l": 314, "i686": 289}
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1


def lower_priority(*, nice: int, idle_io: bool) -> list[str]:
    """Lowest CPU priority (``nice``) and, where Linux allows, the idle IO class. Returns notes."""
    notes = []
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        notes.append(f"nice {max(current, nice)}")
    except OSError as exc:
        notes.append(f"nice unchanged ({exc.strerror})")
    if idle_io:
        nr = _IOPRIO_SYSCALL.get(platform.machine())
        if nr is None:
            notes.append("io priority unchanged (unknown syscall number)")
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.syscall(nr, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT)
            notes.append("io idle" if rc == 0 else f"io priority unchanged (errno {ctypes.get_errno()})")
    return notes
