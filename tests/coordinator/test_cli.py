"""The coordinator CLI: init, enrollment tokens, devices, rounds, exit codes, serve and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.store import RoundState, Store
from tests.mosquitto import MosquittoBroker, free_port

SHA = "cd" * 32


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        '[paths]\nstate_dir = "state"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:1"\nclient_id = "cli-test"\n'
        "[rounds]\nmin_devices = 1\ntarget_devices = 2\n"
    )
    return path


def run(config: Path, *args: str) -> int:
    return main(["-c", str(config), *args])


def test_commands_before_init_say_so(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "round", "status") == 78
    assert "coordinator init" in capsys.readouterr().err
    assert run(config, "devices", "add", "pi") == 78


def test_init_devices_and_rounds(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "init") == 0
    state = config.parent / "state"
    assert (state / "keys" / "identity.key").stat().st_mode & 0o077 == 0
    assert (state / "coordinator.sqlite3").stat().st_mode & 0o077 == 0
    assert run(config, "init") == 0  # idempotent
    assert "existing keys" in capsys.readouterr().out

    assert run(config, "devices", "add", "kitchen-pi") == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("ppe1.")
    assert run(config, "enroll-token", "bad name") == 77
    assert run(config, "devices", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert run(config, "devices", "revoke", "nobody") == 66

    assert run(config, "round", "start") == 78  # no base model anywhere yet
    assert (
        run(config, "round", "start", "--base-sha256", SHA, "--deadline", "30", "--seed", "5", "--json") == 0
    )
    spec = json.loads(capsys.readouterr().out)
    assert spec["round_id"] == 1 and spec["lora"]["ffa_seed"] == 5 and spec["target_devices"] == 2
    assert run(config, "round", "start") == 65  # one round at a time
    assert run(config, "round", "start", "--min-devices", "3") == 65  # min above target

    assert run(config, "round", "status") == 0
    assert "round 1: open  0/2 updates (min 1)" in capsys.readouterr().out
    assert run(config, "round", "status", "7") == 66
    with Store(state / "coordinator.sqlite3") as store:
        store.transition_round(1, source=RoundState.OPEN, target=RoundState.AGGREGATING, now=1.0)
        store.transition_round(
            1, source=RoundState.AGGREGATING, target=RoundState.FAILED, failure="0 updates"
        )
    capsys.readouterr()
    assert run(config, "round", "watch", "--interval", "0.01") == 1
    assert "failed: 0 updates" in capsys.readouterr().out
    # The next round reuses the base model and the frozen-A seed of the previous one.
    assert run(config, "round", "start", "--json") == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["round_id"] == 2 and spec["lora"]["ffa_seed"] == 5 and spec["base_model_sha256"] == SHA
    assert run(config, "rounds", "list", "--json") == 0
    assert [r["round_id"] for r in json.loads(capsys.readouterr().out)] == [2, 1]


def _serve(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "-c", str(config), "serve", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _sigterm_exits_zero(proc: subprocess.Popen[bytes], ready: str) -> str:
    output = b""
    stdout = proc.stdout
    assert stdout is not None
    os.set_blocking(stdout.fileno(), False)

    def seen() -> bool:
        nonlocal output
        output += stdout.read() or b""
        assert proc.poll() is None, output.decode()
        return ready in output.decode()

    try:
        _wait_for(seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        output += stdout.read() or b""
    finally:
        if proc.poll() is None:
            proc.kill()
    return output.decode()


def test_serve_exits_zero_on_sigterm(config: Path, mosquitto_broker: MosquittoBroker) -> None:
    text = config.read_text().replace("mqtt://127.0.0.1:1", mosquitto_broker.url)
    config.write_text(text)
    assert run(config, "init") == 0
    out = _sigterm_exits_zero(_serve(config), "connected to")
    assert "coordinator stopped" in out


def test_serve_with_the_embedded_broker(config: Path) -> None:
    port = free_port()
    config.write_text(config.read_text().replace("mqtt://127.0.0.1:1", f"mqtt://127.0.0.1:{port}"))
    assert run(config, "init") == 0

    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    out = _sigterm_exits_zero(_serve(config, "--embedded-broker"), "connected to")
    assert "embedded broker (amqtt)" in out
    assert not accepts()
