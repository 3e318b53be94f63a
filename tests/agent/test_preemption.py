"""A chat request during training, with the real trainer (``agent train``) and the real engine.

The scheduler runs on a ManualClock over the fake sysfs tree of a desktop on mains; the trainer is
the real subprocess on the demo model. A chat request pre-empts it: it stops at a step boundary with
a checkpoint, the reply streams, and training later resumes from the checkpoint under one charge.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent.chat import ChatService
from agent.clock import ManualClock
from agent.config import parse_config
from agent.engine.llama_backend import LlamaEngine
from agent.frontdoor import FrontDoor
from agent.protocol import ChatRequest, DeltaEvent, DoneEvent
from agent.scheduler import SchedulerPolicy, TrainingScheduler
from agent.store import ConversationStore, NewTurn, SqliteStore
from agent.train.kinds import RunStatus
from agent.train.ledger import PrivacyLedger
from agent.trainer_control import PersonalWork, SubprocessTrainerControl, TrainerExit
from hardware.detect import detect
from hardware.sensors import board_sensors
from tests.agent.train.conftest import config_data, private_conversations, write_config_file

ROOT = Path(__file__).resolve().parents[2]
DESKTOP = ROOT / "tests" / "fixtures" / "sysfs" / "x86-desktop"


class _Never:
    def is_set(self) -> bool:
        return False


async def _until(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_chat_preempts_the_real_trainer_which_resumes_under_one_charge(
    tmp_path: Path, demo_model: Any
) -> None:
    data = config_data(
        tmp_path,
        demo_model.f16,
        train={
            "max_steps": 30,
            "epochs": 8.0,
            "batch_size": 8,
            "max_seq_len": 64,
            "threads": 1,
            "checkpoint_every": 100,
        },
        privacy={"accountants": ["rdp"]},
        hardware={"root_dir": str(DESKTOP)},
        scheduler={"idle_minutes": 1.0, "max_load_per_cpu": None, "restart_backoff_s": 60.0},
    )
    config_file = write_config_file(tmp_path / "agent.toml", data)  # what the trainer reads
    cfg = parse_config(data)
    db = SqliteStore(cfg.store_path)
    for conv in private_conversations(60, seed=5):
        c = db.create_conversation(source=FrontDoor.SOCKET, train_consent=True)
        db.append_turns(c.id, [NewTurn(role=m.role, content=m.content) for m in conv.messages])
    db.close()

    clock = ManualClock()
    detection = detect(DESKTOP, override=None)
    completed: list[float] = []

    async def on_completed() -> None:  # the daemon hot-swaps the personal adapter here
        completed.append(time.monotonic())

    control = SubprocessTrainerControl(  # as the daemon builds it: frozen for a moment, then stopped
        config_path=config_file,
        stop_timeout_s=30.0,
        freeze_s=cfg.scheduler.preempt_freeze_s,
        on_completed=on_completed,
    )
    scheduler = TrainingScheduler(
        policy=SchedulerPolicy.from_config(cfg.scheduler, detection.profile),
        sensors=board_sensors(detection.profile, root=DESKTOP),
        work=PersonalWork(cfg, control=control, monotonic=clock.monotonic),
        trainer=control,
        clock=clock,
    )
    engine = await LlamaEngine.open(cfg.model, default_threads=1)
    store = await ConversationStore.open(cfg.store_path, train_consent_default=False)
    chat = ChatService(engine, store, generation=cfg.generation, system_prompt=None, activity=scheduler)
    ledger = PrivacyLedger(cfg.ledger_path)
    ckpt = cfg.train_dir / "personal" / "state.json"
    loop_task = asyncio.create_task(scheduler.run())
    try:
        await asyncio.sleep(0.1)
        verdict = scheduler.last_verdict
        assert verdict is not None and not verdict.allowed
        assert [c.rule.value for c in verdict.blocking] == ["idle"]

        clock.advance(61.0)  # idle long enough: every rule holds, the trainer starts
        await _until(lambda: control.is_running, timeout=10, what="the trainer to start")
        assert scheduler.last_verdict is not None and scheduler.last_verdict.allowed
        # Charged, checkpointed at step 0, and stepping.
        await _until(ckpt.is_file, timeout=240, what="the first checkpoint")
        await asyncio.sleep(1.5)
        assert control.is_running, "the run ended before the chat arrived; make it longer"

        request = ChatRequest(id="r1", text="Hello")
        first_token_at: float | None = None
        events = []
        async for event in chat.handle(request, source=FrontDoor.SOCKET, cancel=_Never(), client="test"):
            if isinstance(event, DeltaEvent) and first_token_at is None:
                first_token_at = time.monotonic()
            events.append(event)
        assert isinstance(events[-1], DoneEvent)
        assert first_token_at is not None  # the reply streamed

        run = await control.wait()
        assert run is not None and run.outcome is TrainerExit.STOPPED
        # At a step boundary, checkpoint saved, within a second of SIGTERM (the process exit follows).
        assert control.last_boundary_s is not None and control.last_boundary_s < 1.0, control.last_boundary_s
        assert control.last_stop_s is not None
        print(
            f"step boundary {control.last_boundary_s:.3f} s after SIGTERM; exit {control.last_stop_s:.3f} s"
        )
        runs = ledger.read().runs
        assert len(runs) == 1 and runs[0].status is RunStatus.STOPPED
        stopped_at = runs[0].steps_done
        assert 0 < stopped_at < runs[0].mechanism.steps
        assert ckpt.is_file()
        assert scheduler.state.preempted_at is not None

        # Later: idle again and past the back-off, it resumes from the checkpoint under the same charge.
        await _until(lambda: clock.sleepers > 0, timeout=10, what="the scheduler to wait again")
        clock.advance(61.0)
        await _until(lambda: control.is_running or len(control.runs) > 1, timeout=10, what="a restart")
        run = await control.wait()
        assert run is not None and run.outcome is TrainerExit.COMPLETED, run
        assert len(completed) == 1  # only the run that completed, not the pre-empted one
        runs = ledger.read().runs
        assert len(runs) == 1, "the resumed run was charged again"
        assert runs[0].status is RunStatus.COMPLETED and runs[0].steps_done == runs[0].mechanism.steps
        assert not ckpt.exists()
        assert (cfg.adapters_dir / "personal.gguf").is_file()
    finally:
        loop_task.cancel()
        await asyncio.wait({loop_task}, timeout=5.0)  # see the report: a ManualClock sleep may linger
        await control.close()
        await engine.close()
        await store.close()
