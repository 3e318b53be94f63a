"""Provisioning into a temporary OS root: a fake root file system and a Runner that fakes commands.

The root has what an image's root has for the steps that run for real here (``/etc/passwd`` and
friends, ``/etc/hostname``, ``/etc/machine-id``, systemd's own units for ``systemd-analyze --root``,
``/bin/rm`` for the train unit). Commands (apt-get, python -m venv, pip) go to :class:`FakeRunner`,
which records them and makes the files the real ones would leave behind that later steps and
``systemd-analyze verify`` look at: dpkg's status for installed packages, the venv's executables.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from agent.provision.cli import main
from agent.provision.runner import Command

REPO = Path(__file__).resolve().parents[2]
HOST_UNITS = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """root:x:0:
daemon:x:1:
video:x:44:
render:x:105:
systemd-network:x:998:
nogroup:x:65534:
"""
SHADOW = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
GSHADOW = "root:*::\ndaemon:*::\nvideo:*::\nrender:*::\nnogroup:*::\n"
MACHINE_ID = "0123456789abcdef0123456789abcdef\n"
STUB = "#!/bin/sh\nexit 0\n"


def make_os_root(root: Path, *, hostname: str = "kitchen-pi", jetson_tree: Path | None = None) -> Path:
    """A minimal Debian-like root at ``root`` (see the module doc)."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    for name, text, mode in (
        ("passwd", PASSWD, 0o644),
        ("group", GROUP, 0o644),
        ("shadow", SHADOW, 0o640),
        ("gshadow", GSHADOW, 0o640),
        ("hostname", hostname + "\n", 0o644),
        ("machine-id", MACHINE_ID, 0o444),
    ):
        (etc / name).write_text(text)
        (etc / name).chmod(mode)
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/rm").write_text(STUB)
    (root / "usr/bin/rm").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("")
    if jetson_tree is not None:  # a board's /proc and /etc/nv_tegra_release, for detection
        shutil.copytree(jetson_tree, root, dirs_exist_ok=True)
    return root


@dataclass
class FakeRunner:
    """Records commands; simulates apt-get install and python -m venv in the root."""

    root: Path
    commands: list[Command] = field(default_factory=list)

    def run(self, command: Command) -> None:
        self.commands.append(command)
        argv = command.argv
        if argv[:2] == ("apt-get", "install"):
            status = self.root / "var/lib/dpkg/status"
            packages = [a for a in argv[2:] if not a.startswith("-")]
            with status.open("a") as fh:
                for name in packages:
                    fh.write(f"Package: {name}\nStatus: install ok installed\nVersion: 1\n\n")
        elif argv[1:3] == ("-m", "venv"):
            bin_dir = self.root / argv[3].lstrip("/") / "bin"
            bin_dir.mkdir(parents=True)
            for exe in ("python", "python3", "pip", "agent", "coordinator"):
                (bin_dir / exe).write_text(STUB)
                (bin_dir / exe).chmod(0o755)

    def texts(self) -> list[str]:
        return [c.text() for c in self.commands]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Result:
    code: int
    out: str
    err: str


def provision(argv: list[str], runner: FakeRunner | None = None) -> Result:
    """``scripts/provision ARGV`` in this process, with ``runner`` for its commands."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv, runner=runner)
    return Result(code, out.getvalue(), err.getvalue())
