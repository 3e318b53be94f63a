"""``agent run`` as a real process on the demo model: sd_notify, SIGTERM mid-reply, status, retention."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from agent.notify import Notifier
from agent.protocol import DeltaEvent, DoneEvent, ErrorCode, ErrorEvent
from agent.status import read_snapshot
from agent.store import SqliteStore
from tests.agent.chat_support import GREEDY, LONG_REPLY
from tests.agent.daemon_support import daemon_config, run_agent, running_daemon, write_config

# ---- sd_notify, in process ----------------------------------------------------------------------


@pytest.fixture
def notify_socket(short_tmp: Path) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = short_tmp / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(30)
    yield path, sock
    sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notifier_sends_datagrams(notify_socket: Any) -> None:
    path, sock = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
    assert n.enabled and n.watchdog_interval_s == 1.5
    assert n.ready(status="serving\nnow")
    assert _recv(sock) == ["READY=1", "STATUS=serving now"]
    assert n.watchdog() and _recv(sock) == ["WATCHDOG=1"]
    assert n.stopping() and _recv(sock) == ["STOPPING=1"]
    with pytest.raises(ValueError):
        n.notify("READY=1\nMAINPID=1")
    n.close()


def test_notifier_abstract_namespace() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"ppchat-test-{os.getpid()}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).status("hi")
        assert _recv(sock) == ["STATUS=hi"]
    finally:
        sock.close()


@pytest.mark.parametrize(
    "env",
    [{}, {"NOTIFY_SOCKET": "vsock:2:1234"}, {"NOTIFY_SOCKET": "/nonexistent/notify"}],
    ids=["unset", "unsupported", "missing"],
)
def test_notifier_without_a_manager_does_nothing(env: dict[str, str]) -> None:
    n = Notifier.from_env({**env, "WATCHDOG_USEC": "1000"})
    assert not n.ready()
    assert n.watchdog_interval_s is None or env.get("NOTIFY_SOCKET", "").startswith("/")


def test_watchdog_for_another_pid_is_ignored(notify_socket: Any) -> None:
    path, _ = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval_s is None


# ---- the daemon process --------------------------------------------------------------------------


def test_ready_after_model_load_then_watchdog_and_stopping(
    demo_model: Any, short_tmp: Path, notify_socket: Any
) -> None:
    path, sock = notify_socket
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    sections = daemon_config(short_tmp, demo_model.q8_0)
    with running_daemon(short_tmp, sections, env=env, wait=False) as daemon:
        messages: list[str] = []
        while "READY=1" not in messages:
            messages.extend(_recv(sock))
        # READY comes after the model loaded and the socket listens: it answers at once.
        assert any(m.startswith("STATUS=loading the model") for m in messages)
        assert "model" in daemon.log() and "loaded" in daemon.log()
        with daemon.client() as client:
            client.ping()
        snap = read_snapshot(daemon.status_path)
        assert snap is not None and snap.state.value == "ready" and snap.model is not None
        assert snap.model.file_type.upper().startswith("Q8_0")
        assert snap.heavy_modules_loaded == ()
        deadline = time.monotonic() + 10
        while "WATCHDOG=1" not in messages and time.monotonic() < deadline:
            messages.extend(_recv(sock))
        assert "WATCHDOG=1" in messages
        assert daemon.stop() == 0
        rest: list[str] = []
        sock.settimeout(2)
        try:
            while "STOPPING=1" not in rest:
                rest.extend(_recv(sock))
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    assert not daemon.socket_path.exists()
    assert not daemon.status_path.exists()


def test_sigterm_with_a_reply_in_flight(demo_model: Any, short_tmp: Path) -> None:
    sections = daemon_config(short_tmp, demo_model.q8_0)
    with running_daemon(short_tmp, sections) as daemon:
        with daemon.client() as client:
            events = client.chat("tell me everything", options={**LONG_REPLY, "max_tokens": 900})
            first = next(events)
            assert isinstance(first, DeltaEvent)
            daemon.process.send_signal(signal.SIGTERM)
            rest = list(events)
        final = rest[-1]
        assert (isinstance(final, DoneEvent) and final.finish_reason.value in ("cancelled", "stop")) or (
            isinstance(final, ErrorEvent) and final.code is ErrorCode.SHUTTING_DOWN
        ), final
        assert daemon.process.wait(30) == 0, daemon.log()
    assert not daemon.socket_path.exists()
    assert not daemon.status_path.exists()
    assert "Traceback" not in daemon.log()


def test_restart_after_a_crash_replaces_the_stale_socket_and_remembers(
    demo_model: Any, short_tmp: Path
) -> None:
    sections = daemon_config(short_tmp, demo_model.q8_0)
    with running_daemon(short_tmp, sections) as daemon:
        with daemon.client() as client:
            done = list(client.chat("hello", options=GREEDY))[-1]
        assert isinstance(done, DoneEvent) and done.conversation_id
        daemon.process.kill()  # no cleanup: the socket file stays behind
        daemon.process.wait()
    assert daemon.socket_path.exists()
    with running_daemon(short_tmp, sections) as again:
        with again.client() as client:
            second = list(client.chat("and now?", conversation_id=done.conversation_id, options=GREEDY))[-1]
        assert isinstance(second, DoneEvent) and second.conversation_id == done.conversation_id
        assert second.usage.prompt_tokens > done.usage.prompt_tokens
        assert again.stop() == 0


def test_second_daemon_on_the_same_socket_is_refused(short_tmp: Path) -> None:
    sections = daemon_config(short_tmp, None)
    with running_daemon(short_tmp, sections, extra_args=("--no-model",)) as first:
        second = run_agent("run", "--config", str(first.config_path), "--no-model")
        assert second.returncode == 75, second.stderr
        assert "already running" in second.stderr
        with first.client() as client:
            client.ping()
        snap = read_snapshot(first.status_path)
        assert snap is not None and snap.pid == first.process.pid


def test_retention_purge_runs_in_the_daemon(demo_model: Any, short_tmp: Path) -> None:
    # 2e-5 days is under two seconds: a conversation is forgotten soon after its last turn.
    sections = daemon_config(
        short_tmp, demo_model.q8_0, store={"retention_days": 2e-5, "purge_interval_s": 0.2}
    )
    with running_daemon(short_tmp, sections) as daemon:
        with daemon.client() as client:
            done = list(client.chat("remember me", options={**GREEDY, "max_tokens": 4}))[-1]
            assert isinstance(done, DoneEvent) and done.conversation_id
            store = SqliteStore(short_tmp / "state" / "conversations.sqlite3")
            try:
                deadline = time.monotonic() + 30
                while store.get_conversation(done.conversation_id) is not None:
                    assert time.monotonic() < deadline, "the conversation was never purged"
                    time.sleep(0.2)
            finally:
                store.close()
            [final] = list(client.chat("still there?", conversation_id=done.conversation_id, options=GREEDY))
            assert isinstance(final, ErrorEvent) and final.code is ErrorCode.UNKNOWN_CONVERSATION
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[socket]\nmax_connections = 0\n", "socket.max_connections"),
        ("[store]\nretention_days = -1\n", "store.retention_days"),
        ("[sockets]\npath = 'x'\n", "sockets"),
        ("not toml ===", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(short_tmp: Path, toml: str, needle: str) -> None:
    config = short_tmp / "bad.toml"
    config.write_text(toml)
    result = run_agent("run", "--config", str(config))
    assert result.returncode == 78
    assert needle in result.stderr


def test_missing_model_file_is_a_model_error(short_tmp: Path) -> None:
    config = write_config(short_tmp / "agent.toml", daemon_config(short_tmp, short_tmp / "nope.gguf"))
    result = run_agent("run", "--config", str(config))
    assert result.returncode == 66, result.stderr
    assert "nope.gguf" in result.stderr
    assert not (short_tmp / "run" / "agent.sock").exists()


def test_daemon_without_a_model_imports_no_torch(short_tmp: Path) -> None:
    sections = daemon_config(short_tmp, None)
    with running_daemon(short_tmp, sections, extra_args=("--no-model",)) as daemon:
        snap = read_snapshot(daemon.status_path)
        assert snap is not None and snap.model is None and snap.heavy_modules_loaded == ()
        with daemon.client() as client:
            [event] = list(client.chat("hi"))
        assert isinstance(event, ErrorEvent) and event.code is ErrorCode.ENGINE_ERROR
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
        assert "libtorch" not in maps
        assert daemon.stop() == 0


def test_sigterm_during_startup_exits_cleanly(demo_model: Any, short_tmp: Path) -> None:
    sections = daemon_config(short_tmp, demo_model.q8_0)
    with running_daemon(short_tmp, sections, wait=False) as daemon:
        deadline = time.monotonic() + 60
        while not daemon.status_path.exists():  # written once the signal handlers are in place
            assert time.monotonic() < deadline and daemon.process.poll() is None, daemon.log()
            time.sleep(0.01)
        assert daemon.stop() == 0, daemon.log()
    assert not daemon.socket_path.exists()
