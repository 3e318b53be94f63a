"""A real Mosquitto broker for tests: started on a free loopback port with a config written here.

    broker = MosquittoBroker(tmp_dir, MosquittoOptions(persistence=True))
    broker.start()            # waits until it accepts connections
    broker.restart()          # same port, same persistence file (for reliability tests)
    broker.stop()

Password and ACL files for broker-security tests::

    opts = MosquittoOptions(allow_anonymous=False,
                            users={"agent": "secret"},
                            acl=["user agent", "topic readwrite ppchat/#"])

The system's Mosquitto service is never used; each broker lives in its own temporary directory and
logs to ``mosquitto.log`` there (``broker.log_text()`` for assertions and failure messages).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def mosquitto_available() -> bool:
    return Path(MOSQUITTO).exists()


@dataclass(frozen=True)
class MosquittoOptions:
    """What goes into the broker's config file."""

    allow_anonymous: bool = True
    persistence: bool = False
    """Keep sessions, queued QoS 1 messages and retained messages across restarts."""
    autosave_interval_s: int = 1
    """With persistence: how often the in-memory state is saved (also saved on a clean stop)."""
    users: Mapping[str, str] = field(default_factory=dict)
    """user -> password, written with ``mosquitto_passwd`` into ``passwd`` (``password_file``)."""
    acl: Sequence[str] | None = None
    """Lines of an ACL file (``user NAME``, ``topic read|write|readwrite TOPIC``, ``pattern ...``)."""
    message_size_limit: int | None = None
    max_queued_messages: int | None = None
    extra: Sequence[str] = ()
    """More config lines, verbatim."""


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file (hashed by ``mosquitto_passwd``)."""
    path.write_text("")
    path.chmod(0o600)
    for user, password in users.items():
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(path), user, password],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return path


def write_acl_file(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    path.chmod(0o600)
    return path


class MosquittoError(RuntimeError):
    pass


class MosquittoBroker:
    """One Mosquitto process with its own directory, config and port."""

    def __init__(self, directory: Path, options: MosquittoOptions | None = None, *, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.options = options or MosquittoOptions()
        self.port = port if port is not None else free_port()
        self.host = HOST
        self.conf_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self.data_dir = self.directory / "data"
        self.password_path: Path | None = None
        self.acl_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def write_config(self) -> Path:
        o = self.options
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if o.allow_anonymous else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if os.geteuid() == 0:
            # Mosquitto drops root privileges to the 'mosquitto' user unless told otherwise; it must
            # keep writing files in this (root-owned) temporary directory.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if o.persistence:
            self.data_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                "persistence_file mosquitto.db",
                f"autosave_interval {o.autosave_interval_s}",
            ]
        else:
            lines.append("persistence false")
        if o.users:
            self.password_path = write_password_file(self.directory / "passwd", o.users)
            lines.append(f"password_file {self.password_path}")
        if o.acl is not None:
            self.acl_path = write_acl_file(self.directory / "acl", o.acl)
            lines.append(f"acl_file {self.acl_path}")
        if o.message_size_limit is not None:
            lines.append(f"message_size_limit {o.message_size_limit}")
        if o.max_queued_messages is not None:
            lines.append(f"max_queued_messages {o.max_queued_messages}")
        lines += list(o.extra)
        self.conf_path.write_text("".join(f"{line}\n" for line in lines))
        return self.conf_path

    def start(self, *, timeout_s: float = 15.0) -> None:
        if self.running:
            return
        self.write_config()
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.directory,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise MosquittoError(f"mosquitto exited with {code} at start:\n{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise MosquittoError(
                    f"mosquitto did not accept connections in {timeout_s} s:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM (a clean stop: Mosquitto saves its persistence file), then SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, *, timeout_s: float = 15.0) -> None:
        """Stop and start again on the same port (with persistence, state survives)."""
        self.stop()
        self.start(timeout_s=timeout_s)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_mosquitto(directory: Path, options: MosquittoOptions | None = None) -> Iterator[MosquittoBroker]:
    """Start a broker (retrying on another port if the chosen one was taken meanwhile)."""
    last: MosquittoError | None = None
    for _ in range(3):
        broker = MosquittoBroker(directory, options)
        try:
            broker.start()
        except MosquittoError as exc:
            last = exc
            continue
        try:
            yield broker
        finally:
            broker.stop()
        return
    raise last or MosquittoError("mosquitto did not start")
