"""Time to first token of a reply that arrives while training runs ÷ the same reply with no training.

Side by side in one process: the real engine on the demo model, the ChatService told of requests by
the real TrainingScheduler (ManualClock, the fake sysfs tree of a desktop on mains), which pre-empts
the real ``agent train`` subprocess (nice 19, one thread). For each repetition a reply is timed with
no trainer, then the trainer is started, left to step for two seconds, and a request arrives: its
first token is timed from the request's arrival, so it includes the pre-emption (the scheduler wakes,
SIGTERM, the trainer finishing its step and checkpointing while the prompt is evaluated). The reply
does not wait for the trainer to exit. Every request is a new ~160-token conversation (a few turns
of history) that differs from its first token on, so no prefix-cache reuse flatters either arm.

    python -m bench.ttft_during_training [--reps 7] [--threads 1]

The ratio is of the medians. Target: ratio <= 1.05 (exit status 1 when missed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from agent.chat import ChatService
from agent.clock import ManualClock
from agent.config import parse_config
from agent.engine.llama_backend import LlamaEngine
from agent.frontdoor import FrontDoor
from agent.generation import ChatMessage, Role
from agent.protocol import ChatOptions, ChatRequest, DeltaEvent
from agent.scheduler import SchedulerPolicy, TrainingScheduler
from agent.store import ConversationStore, NewTurn, SqliteStore
from agent.trainer_control import PersonalWork, SubprocessTrainerControl, TrainerExit
from hardware.detect import detect
from hardware.sensors import board_sensors

TARGET = 1.05
ROOT = Path(__file__).resolve().parents[1]
DESKTOP = ROOT / "tests" / "fixtures" / "sysfs" / "x86-desktop"
QUESTION = "Hello, who are you and what can you do on this device?"


class _Never:
    def is_set(self) -> bool:
        return False


HISTORY = (
    ("Hello, who are you?", "I am the assistant on this device. I answer questions and keep your data here."),
    ("Can you set a reminder for the plants?", "I can note it here: water the plants on Saturday morning."),
    ("Do you keep our chats?", "Only on this device. Nothing you say is sent to a server."),
    ("What happens at night?", "When the board is idle and cool, it may train a small adapter privately."),
)


def conversation(n: int) -> tuple[ChatMessage, ...]:
    """A realistic prompt (about 200 tokens: a few turns of history and a question), different from
    the first token on for every request, so that no request reuses another's cached prefix and every
    first token waits for the whole prompt to be evaluated, as a new conversation's does."""
    messages = [ChatMessage(role=Role.USER, content=f"Conversation {n}. {HISTORY[0][0]}")]
    messages.append(ChatMessage(role=Role.ASSISTANT, content=HISTORY[0][1]))
    for question, answer in HISTORY[1:]:
        messages += [
            ChatMessage(role=Role.USER, content=question),
            ChatMessage(role=Role.ASSISTANT, content=answer),
        ]
    messages.append(ChatMessage(role=Role.USER, content=QUESTION))
    return tuple(messages)


async def _ttft(chat: ChatService, n: int) -> float:
    request = ChatRequest(
        id=f"b{n}",
        messages=conversation(n),
        options=ChatOptions(max_tokens=8, temperature=0.0),
    )
    t0 = time.perf_counter()
    first: float | None = None
    async for event in chat.handle(request, source=FrontDoor.SOCKET, cancel=_Never(), client="bench"):
        if isinstance(event, DeltaEvent) and first is None:
            first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no token streamed")
    return first


def _toml(data: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def _config(tmp: Path, model: Path, threads: int) -> dict[str, dict[str, object]]:
    return {
        "paths": {"state_dir": str(tmp / "state"), "runtime_dir": str(tmp / "run")},
        "model": {"path": str(model), "n_threads": threads},
        "train": {
            "max_steps": 1000,
            "epochs": 100.0,  # long enough that every repetition interrupts a running trainer
            "batch_size": 8,
            "max_seq_len": 64,
            "lora_rank": 4,
            "threads": 1,
            "checkpoint_every": 1000,
            "min_examples": 8,
        },
        "privacy": {"preset": "minimal", "accountants": ["rdp"]},
        "hardware": {"root_dir": str(DESKTOP)},
        "scheduler": {"idle_minutes": 1.0, "max_load_per_cpu": None, "restart_backoff_s": 0.0},
    }


async def run(reps: int, threads: int) -> tuple[list[float], list[float]]:
    from agent.model.demo import ensure_demo_model

    demo = ensure_demo_model()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = _config(tmp, demo.f16, threads)
        config_file = tmp / "agent.toml"
        config_file.write_text(_toml(data))
        cfg = parse_config(data)
        db = SqliteStore(cfg.store_path)
        for i in range(60):
            c = db.create_conversation(source=FrontDoor.SOCKET, train_consent=True)
            db.append_turns(
                c.id,
                [NewTurn(role=Role.USER, content=f"Hi {i}"), NewTurn(role=Role.ASSISTANT, content="Hello.")],
            )
        db.close()
        clock = ManualClock()
        profile = detect(DESKTOP).profile
        control = SubprocessTrainerControl(
            config_path=config_file, stop_timeout_s=30.0, freeze_s=cfg.scheduler.preempt_freeze_s
        )
        scheduler = TrainingScheduler(
            policy=SchedulerPolicy.from_config(cfg.scheduler, profile),
            sensors=board_sensors(profile, root=DESKTOP),
            work=PersonalWork(cfg, control=control, monotonic=clock.monotonic),
            trainer=control,
            clock=clock,
        )
        engine = await LlamaEngine.open(cfg.model, default_threads=threads)
        store = await ConversationStore.open(cfg.store_path, train_consent_default=False)
        chat = ChatService(engine, store, generation=cfg.generation, system_prompt=None, activity=scheduler)
        loop_task = asyncio.create_task(scheduler.run())
        quiet: list[float] = []
        busy: list[float] = []
        try:
            await _ttft(chat, 0)  # warm-up
            print(f"prompt: {engine.count_tokens(conversation(0))} tokens", flush=True)
            for n in range(reps):
                rep_start = time.monotonic()
                quiet.append(await _ttft(chat, 2 * n + 1))
                waited = time.monotonic() + 60
                while clock.sleepers == 0:  # the scheduler is back in its poll wait
                    if time.monotonic() > waited:
                        raise RuntimeError("the scheduler did not return to its poll wait")
                    await asyncio.sleep(0.01)
                clock.advance(61.0)  # idle: the scheduler starts (or resumes) the trainer
                deadline = time.monotonic() + 300
                while not (control.is_running and control.stepping):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the trainer did not start stepping; runs: {control.runs}")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.0)  # steps under way
                if not control.is_running:
                    raise RuntimeError(f"the trainer ended before the request; runs: {control.runs}")
                busy.append(await _ttft(chat, 2 * n + 2))
                run = await control.wait()
                if run is None or run.outcome is not TrainerExit.STOPPED:
                    raise RuntimeError(f"the trainer was not pre-empted at a step boundary: {run}")
                print(
                    f"rep {n} ({time.monotonic() - rep_start:.0f} s): quiet {quiet[-1] * 1000:.1f} ms, "
                    f"during training {busy[-1] * 1000:.1f} ms, "
                    f"trainer at its step boundary {(control.last_boundary_s or 0) * 1000:.0f} ms after "
                    f"SIGTERM, exited after {(control.last_stop_s or 0) * 1000:.0f} ms "
                    f"({control.last_run.outcome.value if control.last_run else '-'})",
                    flush=True,
                )
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
            await control.close()
            await engine.close()
            await store.close()
    return quiet, busy


def main(argv: Sequence[str] | None = None) -> int:
    import faulthandler

    faulthandler.dump_traceback_later(1200, exit=True)  # a hang prints where, instead of nothing
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet, busy = asyncio.run(run(args.reps, args.threads))
    ratio = statistics.median(busy) / statistics.median(quiet)
    print(
        f"ttft during training / quiet: median {statistics.median(busy) * 1000:.1f} / "
        f"{statistics.median(quiet) * 1000:.1f} ms = ratio {ratio:.3f} (target <= {TARGET})"
    )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
