"""The seam between the plan and the machine: every command provisioning runs goes through a Runner.

Tests inject their own (recording, or simulating a command's effect); ``--dry-run`` runs nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.provision.errors import ProvisionError


@dataclass(frozen=True)
class Command:
    """A command line; ``chroot`` runs it inside that root (``--root``) instead of on the host."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    chroot: Path | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("an empty command")

    def text(self) -> str:
        """The command as a shell line (what ``--dry-run`` prints)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        line = shlex.join(self.argv)
        if self.chroot is not None:
            line = f"chroot {shlex.quote(str(self.chroot))} {line}"
        return f"{env} {line}" if env else line


class Runner(Protocol):
    def run(self, command: Command) -> None:
        """Run ``command``; raise :class:`ProvisionError` if it fails."""


class SystemRunner:
    """Runs commands for real, their output going to ours."""

    def run(self, command: Command) -> None:
        argv = list(command.argv)
        if command.chroot is not None:
            argv = ["chroot", str(command.chroot), *argv]
        env = {**os.environ, **command.env}
        try:
            result = subprocess.run(argv, env=env, check=False)
        except OSError as exc:
            raise ProvisionError(f"cannot run {command.argv[0]}: {exc.strerror}") from None
        if result.returncode != 0:
            raise ProvisionError(f"command failed with exit status {result.returncode}: {command.text()}")
