"""What the fleet broker enforces: who may publish and read which topic, and who may connect.

The broker is untrusted transport (updates are sealed), but it still keeps devices apart: a device
publishes only under its own id and reads only what the coordinator publishes, so it cannot
impersonate another device, read another device's (sealed) updates or status, or spoof a release.

Accounts: one per device, whose username is its device id (``dev-...``, :mod:`fleet.keys`), and one
for the coordinator. The device rules are Mosquitto ``pattern`` lines with ``%u`` (the username),
so the ACL file does not change when devices are added: only the password file does. The rules
follow :mod:`fleet.topics` kind by kind (:data:`DEVICE_ACCESS`, :data:`COORDINATOR_ACCESS`), so a
new topic kind fails the tests until it is given an access here.

    python -m fleet.acl acl [--coordinator NAME] [--root ROOT]     the ACL file
    python -m fleet.acl passwd USER                                 a password-file line (password on stdin)
    python -m fleet.acl config [--port N] [--no-tls] ...            the broker's config (deploy/mosquitto/)

Password-file lines are Mosquitto 2's PBKDF2-SHA512 format (``user:$7$iterations$salt$hash``), the
same as ``mosquitto_passwd`` writes, so a device's line can be made where the password is (the device)
and only the hash travels to the broker.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from fleet.topics import DEFAULT_ROOT, TopicKind, TopicLayout

PBKDF2_ITERATIONS = 101
"""Mosquitto's default. Device passwords are 256-bit random secrets, for which stretching adds
nothing; pass more iterations for a password a person chose."""
SALT_BYTES = 12
DEFAULT_COORDINATOR = "coordinator"
MAX_PACKET_BYTES = 64 * 1024 * 1024 + 128 * 1024
"""fleet/framing.py's largest payload (64 MiB) plus room for the header and the MQTT framing."""
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Access(str, Enum):
    """Mosquitto's ACL access words. ``read`` covers subscribing and receiving."""

    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"


DEVICE_ACCESS: dict[TopicKind, Access | None] = {
    TopicKind.ROUNDS: Access.READ,
    TopicKind.RELEASES: Access.READ,
    TopicKind.UPDATE: Access.WRITE,
    TopicKind.STATUS: Access.WRITE,
    TopicKind.TELEMETRY: Access.WRITE,
    TopicKind.ENROLL: Access.WRITE,
    TopicKind.ENROLLED: Access.READ,
}
"""A device's access to each kind: per-device kinds under its own id only; None: no access."""

COORDINATOR_ACCESS: dict[TopicKind, Access | None] = {
    TopicKind.ROUNDS: Access.READWRITE,
    TopicKind.RELEASES: Access.READWRITE,
    TopicKind.UPDATE: Access.READ,
    TopicKind.STATUS: Access.READ,
    TopicKind.TELEMETRY: Access.READ,
    TopicKind.ENROLL: Access.READ,
    TopicKind.ENROLLED: Access.WRITE,
}
"""The coordinator's access: every device's per-device topics (``+`` in the device level). It reads
its own retained announcements and releases back when it restarts."""


class AclError(ValueError):
    pass


def validate_username(name: str) -> str:
    """A broker username usable in an ACL (no wildcard, level separator or space)."""
    if _USERNAME.fullmatch(name) is None:
        raise AclError(f"invalid broker username {name!r}: 1-64 characters of A-Z a-z 0-9 . _ -")
    return name


def device_topic_pattern(layout: TopicLayout, kind: TopicKind) -> str:
    """The ACL topic for ``kind`` as seen by the device whose username is its id (``%u``)."""
    if kind.per_device:
        return layout.build(kind, "X").replace("/X/", "/%u/")
    return layout.build(kind)


@dataclass(frozen=True)
class AclPolicy:
    """The fleet broker's ACL for one topic layout and its coordinator account(s)."""

    layout: TopicLayout = field(default_factory=TopicLayout)
    coordinators: tuple[str, ...] = (DEFAULT_COORDINATOR,)

    def __post_init__(self) -> None:
        if not self.coordinators:
            raise AclError("the ACL needs at least one coordinator account")
        for name in self.coordinators:
            validate_username(name)

    def device_lines(self) -> list[str]:
        return [
            f"pattern {access.value} {device_topic_pattern(self.layout, kind)}"
            for kind in TopicKind
            if (access := DEVICE_ACCESS[kind]) is not None
        ]

    def coordinator_lines(self, name: str) -> list[str]:
        return [f"user {name}"] + [
            f"topic {access.value} {self.layout.filter(kind)}"
            for kind in TopicKind
            if (access := COORDINATOR_ACCESS[kind]) is not None
        ]

    def text(self) -> str:
        """The ACL file (Mosquitto ``acl_file``)."""
        lines = [
            "# ppchat fleet broker ACL: made by `python -m fleet.acl acl`; topics as in fleet/topics.py.",
            "# Anonymous clients get nothing (allow_anonymous false; no topic line before the first user).",
            "#",
            "# Devices: every account is a device whose username is its device id (dev-...). A device",
            "# publishes only under its own id and reads only the coordinator's rounds and releases and",
            "# its own enrollment reply. (Mosquitto applies pattern lines to every account; the",
            "# coordinator's username is not a device id, so they give it nothing of a device's.)",
            *self.device_lines(),
        ]
        for name in self.coordinators:
            lines += ["", "# The coordinator: reads what devices send, publishes rounds and releases."]
            lines += self.coordinator_lines(name)
        return "\n".join(lines) + "\n"


def password_entry(
    username: str, password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """A Mosquitto 2 password-file line for ``username`` (PBKDF2-HMAC-SHA512, 64-byte hash)."""
    validate_username(username)
    if not password:
        raise AclError("an empty password")
    if iterations < 1:
        raise AclError("iterations must be positive")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    encoded = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"{username}:$7${iterations}${encoded[0]}${encoded[1]}"


def check_password(entry: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` password-file line (what the broker does at CONNECT)."""
    _, sep, hashed = entry.strip().partition(":")
    parts = hashed.split("$")
    if not sep or len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        raise AclError("not a Mosquitto $7$ password entry")
    salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]), len(expected))
    return secrets.compare_digest(digest, expected)


def new_password() -> str:
    """A random broker password (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TlsFiles:
    cafile: Path
    certfile: Path
    keyfile: Path


@dataclass(frozen=True)
class BrokerSettings:
    """The fleet broker's listener and files (rendered by :func:`broker_config`)."""

    port: int = 8883
    bind_address: str | None = None
    """None: every interface."""
    tls: TlsFiles | None = field(
        default_factory=lambda: TlsFiles(
            Path("/etc/mosquitto/ppchat/ca.pem"),
            Path("/etc/mosquitto/ppchat/server.pem"),
            Path("/etc/mosquitto/ppchat/server.key"),
        )
    )
    password_file: Path = Path("/etc/mosquitto/ppchat/passwd")
    acl_file: Path = Path("/etc/mosquitto/ppchat/acl")
    persistence_dir: Path | None = Path("/var/lib/mosquitto")
    max_packet_bytes: int = MAX_PACKET_BYTES
    session_expiry: str = "14d"
    """How long the broker keeps an offline device's session and queued QoS 1 messages."""
    max_queued_messages: int = 100_000
    """Per client session. The coordinator's queue holds every update that arrives faster than it
    acknowledges them (or while it restarts): it must exceed the largest round's target number of
    devices, or Mosquitto drops the excess (bench/round_fleet.py: 1,061 of 3,000 arrived at 1,000)."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise AclError(f"port {self.port} out of range")


def broker_config(settings: BrokerSettings | None = None) -> str:
    """The Mosquitto (2.x) configuration for the fleet broker (``deploy/mosquitto/ppchat-fleet.conf``)."""
    s = settings or BrokerSettings()
    listener = f"listener {s.port}" + (f" {s.bind_address}" if s.bind_address else "")
    lines = [
        "# ppchat fleet broker: Mosquitto 2.x. Generated by `python -m fleet.acl config`;",
        "# docs/operations.md says how to make the certificates, the password file and the ACL.",
        "per_listener_settings false",
        "# Every client logs in: one account per device (username = device id), one for the coordinator.",
        "allow_anonymous false",
        f"password_file {s.password_file}",
        f"acl_file {s.acl_file}",
        "",
        listener,
        "protocol mqtt",
    ]
    if s.tls is not None:
        lines += [
            f"cafile {s.tls.cafile}",
            f"certfile {s.tls.certfile}",
            f"keyfile {s.tls.keyfile}",
            "tls_version tlsv1.2",
            "require_certificate false",
        ]
    lines += [
        "",
        "# Sealed updates and signed releases are at most fleet/framing.py's 64 MiB payload.",
        f"max_packet_size {s.max_packet_bytes}",
        "# QoS 1 with persistent sessions: an update sent while a device or the coordinator is away is",
        "# delivered when it returns. The coordinator's queue must hold a whole round's updates (it fills",
        "# when devices publish faster than it acknowledges, or while it restarts): more than the largest",
        "# round's target number of devices, or Mosquitto drops the excess.",
        f"max_queued_messages {s.max_queued_messages}",
        f"persistent_client_expiration {s.session_expiry}",
    ]
    if s.persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {str(s.persistence_dir).rstrip('/')}/"]
    else:
        lines.append("persistence false")
    lines += ["connection_messages true", "log_timestamp true"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.acl", description="the fleet broker's ACL and config"
    )
    sub = parser.add_subparsers(dest="what", required=True)
    acl = sub.add_parser("acl", help="print the ACL file")
    acl.add_argument("--coordinator", action="append", default=None, help="coordinator account (repeatable)")
    acl.add_argument("--root", default=DEFAULT_ROOT, help="topic root (default ppchat)")
    pw = sub.add_parser("passwd", help="print a password-file line; the password is read from stdin")
    pw.add_argument("username")
    pw.add_argument("--iterations", type=int, default=PBKDF2_ITERATIONS)
    cfg = sub.add_parser("config", help="print the broker config")
    cfg.add_argument("--port", type=int, default=8883)
    cfg.add_argument("--bind", default=None, help="listen address (default: every interface)")
    cfg.add_argument("--no-tls", action="store_true", help="plain MQTT (a loopback test broker only)")
    cfg.add_argument("--dir", type=Path, default=Path("/etc/mosquitto/ppchat"), help="certs, passwd, acl")
    args = parser.parse_args(argv)
    try:
        if args.what == "acl":
            policy = AclPolicy(TopicLayout(args.root), tuple(args.coordinator or (DEFAULT_COORDINATOR,)))
            sys.stdout.write(policy.text())
        elif args.what == "passwd":
            password = sys.stdin.readline().rstrip("\n")
            print(password_entry(args.username, password, iterations=args.iterations))
        else:
            d: Path = args.dir
            tls = None if args.no_tls else TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")
            settings = BrokerSettings(
                port=args.port,
                bind_address=args.bind,
                tls=tls,
                password_file=d / "passwd",
                acl_file=d / "acl",
            )
            sys.stdout.write(broker_config(settings))
    except AclError as exc:
        print(f"fleet.acl: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
