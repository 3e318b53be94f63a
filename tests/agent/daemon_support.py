"""Test support for the daemon: ``agent run`` as a real subprocess on a temporary config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.client import AgentClient
from agent.errors import AgentError

REPO = Path(__file__).resolve().parents[2]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def daemon_config(
    directory: Path, model: Path | None, **overrides: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """A config for a daemon living entirely in ``directory`` (keep it short: socket paths <= 107 bytes)."""
    sections: dict[str, dict[str, Any]] = {
        "paths": {"state_dir": directory / "state", "runtime_dir": directory / "run"},
        "model": {"n_ctx": 1024, "n_threads": 1, "prefix_cache_mb": 16},
        "socket": {"shutdown_grace_s": 5.0},
        "logging": {"level": "debug"},
    }
    if model is not None:
        sections["model"]["path"] = model
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


@dataclass
class DaemonProcess:
    process: subprocess.Popen[bytes]
    config_path: Path
    socket_path: Path
    status_path: Path
    log_path: Path

    def client(self) -> AgentClient:
        return AgentClient.connect(self.socket_path, timeout=60.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def _status_is_ready(status_path: Path) -> bool:
    """The daemon writes state "ready" once every front door listens (READY=1 for systemd)."""
    try:
        return bool(json.loads(status_path.read_text()).get("state") == "ready")
    except (OSError, ValueError):
        return False


def wait_for_socket(proc: subprocess.Popen[bytes], socket_path: Path, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"agent run exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        if socket_path.exists() and _status_is_ready(socket_path.parent / "status.json"):
            try:
                with AgentClient.connect(socket_path, timeout=5.0) as client:
                    client.ping()
                return
            except (AgentError, OSError):
                pass
        time.sleep(0.05)
    raise TimeoutError(
        f"the agent did not listen on {socket_path} within {timeout} s:\n{log_path.read_text()}"
    )


@contextmanager
def running_daemon(
    directory: Path,
    sections: Mapping[str, Mapping[str, Any]],
    *,
    extra_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    timeout: float = 120.0,
) -> Iterator[DaemonProcess]:
    """``agent run`` in a subprocess; SIGTERMed (and waited for) on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_config(directory / "agent.toml", sections)
    log_path = directory / "agent.log"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            agent_command("run", "--config", str(config_path), *extra_args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )
    daemon = DaemonProcess(
        process=proc,
        config_path=config_path,
        socket_path=directory / "run" / "agent.sock",
        status_path=directory / "run" / "status.json",
        log_path=log_path,
    )
    try:
        if wait:
            wait_for_socket(proc, daemon.socket_path, log_path, timeout)
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_agent(
    *args: str, stdin: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run one ``agent`` command to completion (not checked: tests look at the exit code)."""
    return subprocess.run(
        agent_command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
