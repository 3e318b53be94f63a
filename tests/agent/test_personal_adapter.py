"""The personal adapter is attached at start and hot-swapped after a run, beside the global one."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ModelConfig
from agent.engine.llama_backend import LlamaEngine
from agent.generation import ChatMessage, Role
from agent.personal_adapter import personal_adapter_path, swap_in_personal
from tests.agent.test_engine_adapters import make_lora

PROMPT = [ChatMessage(role=Role.USER, content="What are you?")]


@pytest.fixture
async def engine(demo_model: Any) -> AsyncIterator[LlamaEngine]:
    eng = await LlamaEngine.open(ModelConfig(path=Path(demo_model.q8_0), n_ctx=256, n_threads=1))
    yield eng
    await eng.close()


async def test_swap_keeps_the_global_adapter_and_reloads_a_rewritten_file(
    engine: LlamaEngine, demo_model: Any, tmp_path: Path
) -> None:
    base = Path(demo_model.q8_0)
    (tmp_path / "global").mkdir()
    global_adapter = make_lora(base, tmp_path / "global" / "1.gguf", seed=1)
    await engine.set_adapters([(global_adapter, 1.0)])
    with_global = await engine.logits(PROMPT)

    personal = personal_adapter_path(tmp_path / "adapters")
    assert not await swap_in_personal(engine, personal)  # nothing trained yet: nothing changes
    assert engine.adapters == ((global_adapter, 1.0),)

    personal.parent.mkdir()
    make_lora(base, personal, seed=7)
    assert await swap_in_personal(engine, personal)
    assert [p for p, _ in engine.adapters] == [global_adapter, personal]
    first = await engine.logits(PROMPT)
    assert max(abs(a - b) for a, b in zip(first, with_global, strict=True)) > 1e-3

    # The trainer rewrites the file atomically (a new inode, a new mtime): the swap reloads it.
    fresh = make_lora(base, tmp_path / "next.gguf", seed=8)
    os.replace(fresh, personal)
    assert await swap_in_personal(engine, personal)
    assert [p for p, _ in engine.adapters] == [global_adapter, personal]
    second = await engine.logits(PROMPT)
    assert max(abs(a - b) for a, b in zip(first, second, strict=True)) > 1e-3


async def test_a_refused_file_keeps_the_previous_adapters(
    engine: LlamaEngine, demo_model: Any, tmp_path: Path
) -> None:
    personal = personal_adapter_path(tmp_path)
    make_lora(Path(demo_model.q8_0), personal, seed=3)
    assert await swap_in_personal(engine, personal)
    before = engine.adapters
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    shutil.move(broken, personal)
    assert not await swap_in_personal(engine, personal)
    assert engine.adapters == before


def test_the_daemon_attaches_the_personal_adapter_at_start(demo_model: Any, short_tmp: Path) -> None:
    from tests.agent.daemon_support import daemon_config, running_daemon

    personal = personal_adapter_path(short_tmp / "state" / "adapters")
    personal.parent.mkdir(parents=True)
    make_lora(Path(demo_model.q8_0), personal, seed=5)
    sections = daemon_config(short_tmp, Path(demo_model.q8_0))
    with running_daemon(short_tmp, sections) as daemon:
        with daemon.client() as client:
            client.ping()
        log = daemon.log()
    assert f"personal adapter {personal} attached" in log, log
