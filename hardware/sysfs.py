"""Reading small kernel files (procfs, sysfs, device tree) under a root path.

Every reader takes the root (``/`` on a board, a fake tree in tests) and returns None for a file that
is missing, unreadable or malformed: a sensor reports that as unknown and never guesses a value.
"""

from __future__ import annotations

from pathlib import Path

_MAX_BYTES = 1 << 20


def under(root: Path, relative: str) -> Path:
    """``relative`` (absolute or not) placed under ``root``."""
    return root / relative.lstrip("/")


def read_bytes(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_BYTES)
    except OSError:
        # Missing, unreadable, or a sysfs attribute that errors on read (ENODATA, EINVAL, EIO).
        return None


def read_text(path: Path) -> str | None:
    raw = read_bytes(path)
    if raw is None:
        return None
    return raw.decode("utf-8", errors="replace").strip()


def read_int(path: Path, *, base: int = 10) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def read_strings(path: Path) -> tuple[str, ...]:
    """A NUL-separated device-tree property (``compatible``) as its strings; empty when unreadable."""
    raw = read_bytes(path)
    if raw is None:
        return ()
    return tuple(part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part)
