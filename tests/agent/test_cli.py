"""``agent chat`` and ``agent status`` as a user runs them, against a real ``agent run``."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import DeltaEvent, DoneEvent, decode_event
from tests.agent.daemon_support import DaemonProcess, daemon_config, run_agent, running_daemon, write_config

GREEDY_ARGS = ("--temperature", "0", "--seed", "1", "--max-tokens", "24")


@pytest.fixture(scope="module")
def daemon(demo_model: Any) -> Iterator[DaemonProcess]:
    directory = Path(tempfile.mkdtemp(prefix="ppc-cli-", dir="/tmp"))
    try:
        with running_daemon(directory, daemon_config(directory, demo_model.q8_0)) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _chat(daemon: DaemonProcess, *args: str, stdin: str | None = None) -> Any:
    return run_agent("chat", "--config", str(daemon.config_path), *GREEDY_ARGS, *args, stdin=stdin)


def test_one_shot_chat_prints_the_reply(daemon: DaemonProcess) -> None:
    result = _chat(daemon, "What can you do?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "(conversation " in result.stderr


def test_json_output_is_the_protocol_events(daemon: DaemonProcess) -> None:
    result = _chat(daemon, "--json", "hello")
    assert result.returncode == 0, result.stderr
    events = [decode_event(line) for line in result.stdout.splitlines()]
    assert isinstance(events[-1], DoneEvent)
    assert all(isinstance(e, DeltaEvent) for e in events[:-1]) and len(events) >= 2
    assert "".join(e.text for e in events[:-1] if isinstance(e, DeltaEvent)) == events[-1].text


def test_no_stream_and_same_reply(daemon: DaemonProcess) -> None:
    streamed = _chat(daemon, "--json", "How do I check the battery?")
    whole = _chat(daemon, "--json", "--no-stream", "How do I check the battery?")
    assert whole.returncode == 0, whole.stderr
    [done] = [decode_event(line) for line in whole.stdout.splitlines()]
    first = decode_event(streamed.stdout.splitlines()[-1])
    assert isinstance(done, DoneEvent) and isinstance(first, DoneEvent)
    assert done.text == first.text  # greedy: the same reply, streamed or not


def test_interactive_session_keeps_one_conversation(daemon: DaemonProcess) -> None:
    result = _chat(daemon, "--json", stdin="Hello there\n\nWhat did I just say?\n")
    assert result.returncode == 0, result.stderr
    dones = [e for e in map(decode_event, result.stdout.splitlines()) if isinstance(e, DoneEvent)]
    assert len(dones) == 2
    assert dones[0].conversation_id and dones[0].conversation_id == dones[1].conversation_id
    assert dones[1].usage.prompt_tokens > dones[0].usage.prompt_tokens
    # and it can be continued later by id
    later = _chat(daemon, "--json", "--conversation", dones[0].conversation_id, "One more thing")
    last = decode_event(later.stdout.splitlines()[-1])
    assert isinstance(last, DoneEvent) and last.conversation_id == dones[0].conversation_id


def test_unknown_conversation_is_an_error_exit(daemon: DaemonProcess) -> None:
    result = _chat(daemon, "--conversation", "nope", "hi")
    assert result.returncode == 1
    assert "unknown_conversation" in result.stderr


def test_status_reports_the_running_daemon(daemon: DaemonProcess) -> None:
    assert _chat(daemon, "hello").returncode == 0
    result = run_agent("status", "--json", "--config", str(daemon.config_path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["running"] and info["socket_answers"] and info["state"] == "ready"
    assert info["pid"] == daemon.process.pid
    assert info["model"]["file_type"].upper().startswith("Q8_0")
    assert info["model"]["path"].endswith(".gguf") and info["model"]["load_s"] > 0
    assert info["socket"] == str(daemon.socket_path)
    assert info["uptime_s"] >= 0 and info["conversations"] >= 0
    assert info["heavy_modules_loaded"] == []
    human = run_agent("status", "--config", str(daemon.config_path))
    assert human.returncode == 0
    for word in ("uptime", "quantization", "socket", "conversations", "last reply"):
        assert word in human.stdout


def test_status_and_chat_when_not_running(short_tmp: Path) -> None:
    config = write_config(short_tmp / "agent.toml", daemon_config(short_tmp, None))
    status = run_agent("status", "--config", str(config))
    assert status.returncode == 2
    assert "not running" in status.stdout
    as_json = run_agent("status", "--json", "--config", str(config))
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["running"] is False
    chat = run_agent("chat", "--socket", str(short_tmp / "none.sock"), "hi")
    assert chat.returncode == 2
    assert "not running" in chat.stderr


def test_status_after_the_daemon_stopped(short_tmp: Path) -> None:
    with running_daemon(short_tmp, daemon_config(short_tmp, None), extra_args=("--no-model",)) as d:
        assert run_agent("status", "--config", str(d.config_path)).returncode == 0
        assert d.stop() == 0
    assert run_agent("status", "--config", str(d.config_path)).returncode == 2
