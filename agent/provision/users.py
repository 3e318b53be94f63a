"""The ``ppchat`` system user and group, and its extra groups (``video``, ``render`` on Jetson).

On a live system (``--root /``) the shadow tools do it (``groupadd``, ``useradd``, ``usermod``), so
NSS, locking and caches are respected. In an image root they cannot be trusted to run (a foreign
architecture, a root that is only a directory), so the four files are edited directly, atomically,
keeping each file's owner and mode, with ids taken like ``useradd --system`` takes them: the highest
free id in the root's ``SYS_UID_MIN``..``SYS_UID_MAX`` (100..999 unless ``/etc/login.defs`` says).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.provision.errors import ProvisionError
from agent.provision.runner import Command
from fleet.files import write_atomic

USER = "ppchat"
GROUP = "ppchat"
HOME = "/var/lib/ppchat"
SHELL = "/usr/sbin/nologin"
GECOS = "ppchat agent"
_LOGIN_DEFS_RE = re.compile(r"^\s*(SYS_UID_MIN|SYS_UID_MAX|SYS_GID_MIN|SYS_GID_MAX)\s+(\d+)", re.MULTILINE)


def _etc(root: Path, name: str) -> Path:
    return root / "etc" / name


def _entries(root: Path, name: str) -> list[list[str]]:
    try:
        text = _etc(root, name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def user_ids(root: Path, user: str = USER) -> tuple[int, int] | None:
    """``(uid, gid)`` of ``user`` in the root's ``/etc/passwd``, or None."""
    for fields in _entries(root, "passwd"):
        if fields[0] == user and len(fields) >= 4:
            return int(fields[2]), int(fields[3])
    return None


def group_id(root: Path, group: str) -> int | None:
    for fields in _entries(root, "group"):
        if fields[0] == group and len(fields) >= 3:
            return int(fields[2])
    return None


def group_members(root: Path, group: str) -> list[str]:
    for fields in _entries(root, "group"):
        if fields[0] == group and len(fields) >= 4:
            return [m for m in fields[3].split(",") if m]
    return []


@dataclass(frozen=True)
class UserState:
    """What is missing for the ``ppchat`` account in a root."""

    group_missing: bool
    user_missing: bool
    join: tuple[str, ...]
    """Extra groups that exist in the root and the user is not yet a member of."""
    absent_groups: tuple[str, ...]
    """Extra groups asked for that the root does not have (reported, not created)."""

    @property
    def done(self) -> bool:
        return not (self.group_missing or self.user_missing or self.join)


def inspect(root: Path, extra_groups: tuple[str, ...]) -> UserState:
    present = [g for g in extra_groups if group_id(root, g) is not None]
    return UserState(
        group_missing=group_id(root, GROUP) is None,
        user_missing=user_ids(root) is None,
        join=tuple(g for g in present if USER not in group_members(root, g)),
        absent_groups=tuple(g for g in extra_groups if g not in present),
    )


def live_commands(state: UserState) -> list[Command]:
    """The shadow-tool commands that make ``state`` complete on a running system."""
    commands = []
    if state.group_missing:
        commands.append(Command(("groupadd", "--system", GROUP)))
    if state.user_missing:
        useradd = ["useradd", "--system", "--gid", GROUP, "--home-dir", HOME, "--no-create-home"]
        commands.append(Command((*useradd, "--shell", SHELL, "--comment", GECOS, USER)))
    if state.join:
        commands.append(Command(("usermod", "--append", "--groups", ",".join(state.join), USER)))
    return commands


def _system_range(root: Path, kind: str) -> tuple[int, int]:
    try:
        text = _etc(root, "login.defs").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    found = dict(_LOGIN_DEFS_RE.findall(text))
    return int(found.get(f"SYS_{kind}_MIN", 100)), int(found.get(f"SYS_{kind}_MAX", 999))


def _free_id(taken: set[int], low: int, high: int) -> int:
    for candidate in range(high, low - 1, -1):
        if candidate not in taken:
            return candidate
    raise ProvisionError(f"no free system id between {low} and {high}")


def _rewrite(path: Path, lines: list[list[str]]) -> None:
    info = path.stat()
    write_atomic(
        path, "".join(":".join(fields) + "\n" for fields in lines).encode(), mode=info.st_mode & 0o7777
    )
    os.chown(path, info.st_uid, info.st_gid)


def apply_to_image(root: Path, state: UserState) -> str:
    """Edit the root's passwd, group, shadow and gshadow to complete ``state``; returns what was done."""
    done = []
    passwd, group = _entries(root, "passwd"), _entries(root, "group")
    if not _etc(root, "passwd").exists() or not _etc(root, "group").exists():
        raise ProvisionError(f"{root}/etc has no passwd or group file: is this an OS root?")
    if state.group_missing:
        taken = {int(f[2]) for f in group if len(f) > 2 and f[2].isdigit()}
        low, high = _system_range(root, "GID")
        uid_wanted = None
        if state.user_missing:  # prefer the same number for the user and its group, like useradd
            uid_taken = {int(f[2]) for f in passwd if len(f) > 2 and f[2].isdigit()}
            uid_wanted = _free_id(uid_taken | taken, *_system_range(root, "UID"))
        gid = (
            uid_wanted if uid_wanted is not None and low <= uid_wanted <= high else _free_id(taken, low, high)
        )
        group.append([GROUP, "x", str(gid), ""])
        _rewrite(_etc(root, "group"), group)
        if _etc(root, "gshadow").exists():
            _rewrite(_etc(root, "gshadow"), [*_entries(root, "gshadow"), [GROUP, "!", "", ""]])
        done.append(f"group {GROUP} ({gid})")
    gid_now = group_id(root, GROUP)
    assert gid_now is not None
    if state.user_missing:
        taken = {int(f[2]) for f in passwd if len(f) > 2 and f[2].isdigit()}
        low, high = _system_range(root, "UID")
        uid = gid_now if gid_now not in taken and low <= gid_now <= high else _free_id(taken, low, high)
        passwd.append([USER, "x", str(uid), str(gid_now), GECOS, HOME, SHELL])
        _rewrite(_etc(root, "passwd"), passwd)
        if _etc(root, "shadow").exists():
            _rewrite(
                _etc(root, "shadow"), [*_entries(root, "shadow"), [USER, "!*", "", "", "", "", "", "", ""]]
            )
        done.append(f"user {USER} ({uid})")
    if state.join:
        for name in ("group", "gshadow"):
            if not _etc(root, name).exists():
                continue
            entries = _entries(root, name)
            for fields in entries:
                if fields[0] in state.join and len(fields) >= 4:
                    members = [m for m in fields[3].split(",") if m]
                    fields[3] = ",".join([*members, USER]) if USER not in members else fields[3]
            _rewrite(_etc(root, name), entries)
        done.append(f"{USER} joined {', '.join(state.join)}")
    return "; ".join(done) or "nothing to do"
