"""Installing, enabling and checking the systemd units (``systemd/`` in the source tree).

Units go to ``<root>/etc/systemd/system``; "enable" is the ``[Install] WantedBy=`` symlinks, made
here so that it works in an image root without a running systemd (``systemctl --root`` would do the
same). Checks use the real ``systemd-analyze``: ``verify``, and ``security --offline=true`` whose
overall exposure for the agent must stay at or below :data:`MAX_EXPOSURE`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.provision.errors import ProvisionError
from fleet.files import write_atomic

UNIT_DIR = "etc/systemd/system"
AGENT_UNITS = ("ppchat-agent.service", "ppchat-train.service", "ppchat-train.path")
ENABLED = ("ppchat-agent.service",)
"""Units enabled at boot; the train units are started by the agent (Wants=, the path unit)."""
CUDA_DROPINS = (
    "ppchat-agent.service.d/50-jetson-gpu.conf",
    "ppchat-train.service.d/50-jetson-gpu.conf",
)
DEFAULT_PREFIX = "/opt/ppchat"
MAX_EXPOSURE = 2.0
_EXPOSURE_RE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class UnitFile:
    name: str
    """Relative to the unit directory (``ppchat-agent.service.d/50-jetson-gpu.conf`` for a drop-in)."""
    text: str


def unit_files(source: Path, *, cuda: bool, prefix: str = DEFAULT_PREFIX) -> list[UnitFile]:
    """The device's units from ``<source>/systemd`` (plus the Jetson drop-ins), for ``prefix``."""
    base = Path(source) / "systemd"
    names = [*AGENT_UNITS, *(CUDA_DROPINS if cuda else ())]
    files = []
    for name in names:
        path = base / name if "/" not in name else base / "jetson" / name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProvisionError(f"cannot read the unit {path}: {exc.strerror}") from None
        if prefix != DEFAULT_PREFIX:
            text = text.replace(DEFAULT_PREFIX + "/", prefix.rstrip("/") + "/")
        files.append(UnitFile(name, text))
    return files


def wanted_by(text: str) -> list[str]:
    """The ``WantedBy=`` targets of a unit's ``[Install]`` section."""
    section, targets = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Install]" and line.startswith("WantedBy="):
            targets += line.split("=", 1)[1].split()
    return targets


def pending(root: Path, files: list[UnitFile]) -> list[str]:
    """The unit files that are missing or differ under ``root``."""
    unit_dir = root / UNIT_DIR
    out = []
    for f in files:
        try:
            if (unit_dir / f.name).read_text(encoding="utf-8") == f.text:
                continue
        except OSError:
            pass
        out.append(f.name)
    return out


def install(root: Path, files: list[UnitFile]) -> list[str]:
    """Write the unit files (0644); returns the names written."""
    unit_dir = root / UNIT_DIR
    changed = pending(root, files)
    for f in files:
        if f.name in changed:
            write_atomic(unit_dir / f.name, f.text.encode(), mode=0o644)
    return changed


def _links(root: Path, files: list[UnitFile]) -> list[tuple[Path, str]]:
    unit_dir = root / UNIT_DIR
    return [
        (unit_dir / f"{target}.wants" / f.name, f"/{UNIT_DIR}/{f.name}")
        for f in files
        if f.name in ENABLED
        for target in wanted_by(f.text)
    ]


def links_missing(root: Path, files: list[UnitFile]) -> list[str]:
    """The enable symlinks that are missing or point elsewhere."""
    return [
        f"{link.parent.name}/{link.name}"
        for link, dest in _links(root, files)
        if not (link.is_symlink() and str(link.readlink()) == dest)
    ]


def enable(root: Path, files: list[UnitFile]) -> list[str]:
    """The ``<target>.wants/<unit>`` symlinks of :data:`ENABLED`; returns those created."""
    made = []
    for link, dest in _links(root, files):
        if link.is_symlink() and str(link.readlink()) == dest:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(dest)
        made.append(f"{link.parent.name}/{link.name}")
    return made


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        raise ProvisionError("systemd-analyze is not installed (Debian: systemd)")
    return tool


def _root_args(root: Path) -> list[str]:
    return [] if root == Path("/") else [f"--root={root}"]


def verify(root: Path, units: list[str]) -> None:
    """``systemd-analyze verify`` of ``units`` as installed under ``root``; raises on a failure or on
    any complaint about our units (the distribution's own units may draw warnings of their own)."""
    result = subprocess.run(
        [_analyze(), "verify", *_root_args(root), *units],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    complaints = "\n".join(line for line in output.splitlines() if "ppchat" in line)
    if result.returncode != 0 or complaints:
        raise ProvisionError(f"systemd-analyze verify {' '.join(units)} failed:\n{complaints or output}")


def exposure(root: Path, unit: str) -> float:
    """The overall exposure ``systemd-analyze security --offline=true`` gives ``unit`` (0 to 10)."""
    result = subprocess.run(
        [_analyze(), "security", "--offline=true", *_root_args(root), unit],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"SYSTEMD_COLORS": "0", "PATH": "/usr/bin:/bin"},
    )
    found = _EXPOSURE_RE.search(result.stdout + result.stderr)
    if found is None:
        raise ProvisionError(f"systemd-analyze security {unit}: no exposure level in its output")
    return float(found.group(2))


def has_systemd_units(root: Path) -> bool:
    """Whether ``root`` is an OS root whose own units ``systemd-analyze --root`` can resolve."""
    dirs = ("usr/lib/systemd/system", "lib/systemd/system")
    return any((root / d / "sysinit.target").exists() for d in dirs)
