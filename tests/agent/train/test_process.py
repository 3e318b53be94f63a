"""The training process: low priority, and SIGTERM as a stop request."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

from agent.train.process import StopSignal

ROOT = Path(__file__).resolve().parents[3]


def test_lower_priority_sets_nice_and_idle_io() -> None:
    code = (
        "import os; from agent.train.process import lower_priority;"
        "print(lower_priority(nice=19, idle_io=True)); print(os.getpriority(os.PRIO_PROCESS, 0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[-1] == "19"
    if platform.machine() in ("x86_64", "aarch64"):
        assert "io idle" in out[0]


def test_sigterm_requests_a_stop() -> None:
    previous = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    stop = StopSignal()
    try:
        stop.install()
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        assert stop.reason == "signal SIGTERM"
        stop.request("later")
        assert stop.reason == "signal SIGTERM"  # the first reason stays
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
