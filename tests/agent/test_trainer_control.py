"""The trainer process control's edges, with a stand-in process (the real trainer: test_preemption.py)."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from agent.trainer_control import SubprocessTrainerControl


class SleeperControl(SubprocessTrainerControl):
    """Runs a process that sleeps and dies of SIGTERM at once, in place of ``agent train``."""

    def __init__(self, script: str = "import time; time.sleep(60)", **kwargs: object) -> None:
        super().__init__(config_path=None, **kwargs)  # type: ignore[arg-type]
        self._script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self._script]


async def test_a_cancelled_preemption_stays_cancelled_when_the_exit_lands_at_the_same_moment() -> None:
    """The daemon's shutdown cancels the scheduler while it waits for a pre-empted trainer to exit.
    If the exit is recorded in the same loop turn, the cancellation must still win (asyncio.wait_for
    before Python 3.12 returned the result instead, and the shutdown then hung)."""
    for _ in range(5):
        control = SleeperControl()
        await control.start()
        preempting = asyncio.create_task(control.preempt())
        await control.wait()  # the exit is recorded; the pre-empting task has not resumed yet
        preempting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await preempting
        assert control.last_run is not None and control.last_run.returncode == -signal.SIGTERM


async def test_a_trainer_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    control = SleeperControl(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
        stop_timeout_s=0.5,
    )
    await control.start()
    await asyncio.sleep(0.5)  # let it install its handler
    await asyncio.wait_for(control.preempt(), 10)
    assert not control.is_running
    assert control.last_run is not None and control.last_run.returncode == -9
