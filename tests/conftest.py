"""Shared fixtures. Helpers append their own sections; keep each section self-contained."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# ---- Mosquitto (tests/mosquitto.py) ----------------------------------------------------------------
from tests.mosquitto import MosquittoBroker, mosquitto_available, running_mosquitto


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One real Mosquitto for the session (anonymous, no persistence) on a free loopback port.

    Tests share it: give each test its own topic prefix. Tests that restart or reconfigure a broker
    build their own with ``tests.mosquitto.running_mosquitto(tmp_path, MosquittoOptions(...))``.
    """
    if not mosquitto_available():
        pytest.fail("mosquitto is not installed (Debian: apt-get install mosquitto mosquitto-clients)")
    with running_mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


# ---- the chat daemon: a real engine on the demo model (agent/chat.py, socket_server.py, daemon.py) -----
@pytest.fixture(scope="session")
def chat_engine(demo_model: Any) -> Iterator[Any]:
    """One real :class:`agent.engine.llama_backend.LlamaEngine` on the demo model (Q8_0, n_ctx 1024)
    shared by the chat, socket and daemon tests. Tests use their own conversations. One llama.cpp
    thread: the tests check behaviour, and on shared CI cores several threads waiting on each other's
    barriers decode ten times slower than one."""
    import asyncio

    from agent.config import ModelConfig
    from agent.engine.llama_backend import LlamaEngine

    engine = LlamaEngine.load(
        ModelConfig(path=demo_model.q8_0, n_ctx=1024, n_threads=1, n_batch=256, prefix_cache_mb=32)
    )
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (a Unix socket path holds at most 107 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ppc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def chat_socket(chat_engine: Any, short_tmp: Path) -> AsyncIterator[Any]:
    """The socket front door with the real chat service, in this test's event loop."""
    from tests.agent.chat_support import running_chat_socket

    async with running_chat_socket(chat_engine, short_tmp) as running:
        yield running


# ---- the demo model (agent/model/demo.py) -----------------------------------------------------------
def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the demo model (minutes, once per build key) before any test's timeout starts to run."""
    if any("demo_model" in getattr(item, "fixturenames", ()) for item in session.items):
        from agent.model.demo import ensure_demo_model

        capture = session.config.pluginmanager.getplugin("capturemanager")
        if capture is None:
            ensure_demo_model()
            return
        with capture.global_and_fixture_disabled():  # show the builder's progress lines
            ensure_demo_model()


@pytest.fixture(scope="session")
def demo_model() -> Any:
    """The cached demo model (:class:`agent.model.demo.DemoModel`: ``.f16``, ``.q8_0``, ``.q4_k_m``,
    ``.manifest``, ...) in ``$PPCHAT_CACHE_DIR`` or ``~/.cache/ppchat``."""
    from agent.model.demo import ensure_demo_model

    return ensure_demo_model()
