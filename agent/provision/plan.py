"""The provisioning plan: named steps, each a list of actions, printed by ``--dry-run`` or run.

(The steps themselves are built in :mod:`agent.provision.steps`; the config files' text in
:mod:`agent.provision.config_files`.)

An action is a :class:`~agent.provision.runner.Command` (run through the injected Runner, inside
the target root with ``chroot`` when ``--root`` is not ``/``) or a :class:`Task` (Python: writing a
file, fetching the model, checking units). Each step first looks at the target and says when there
is nothing to do, so running provisioning twice changes nothing the second time.

Steps, in order (``--skip NAME`` leaves one out)::

    user      the ppchat system user and group (+ video, render on Jetson)
    packages  Debian packages (a compiler, CMake, python3-venv, libsystemd-dev; OpenBLAS on Jetson)
    source    the ppchat source tree to <prefix>/src
    venv      <prefix>/.venv
    torch     torch for the trainer, from the board's source (NVIDIA's Jetson wheels, PyPI, ...)
    llama     llama-cpp-python built from source with the board's CMAKE_ARGS
    ppchat    ppchat itself into the venv (with the train and systemd extras)
    model     the GGUF, fetched from a URL pinned by SHA-256 (file:// works)
    config    /etc/ppchat/agent.toml (with [fleet] for a broker) and the broker's CA
    enroll    the one-time enrollment token, 0600, for the first boot
    image     --image only: an empty /etc/machine-id, and no device keys in the image
    units     the systemd units (Jetson drop-ins), enabled
    verify    systemd-analyze verify, and the agent's exposure at most 2.0
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, Union
from urllib.parse import urlsplit

from agent.provision import units
from agent.provision.board import Board, TorchSource
from agent.provision.errors import ProvisionError
from agent.provision.fetch import SHA256_RE, check_url
from agent.provision.runner import Command, Runner

STEP_NAMES = (
    "user", "packages", "source", "venv", "torch", "llama", "ppchat",
    "model", "config", "enroll", "image", "units", "verify",
)  # fmt: skip
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GGUF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.gguf")
_TOPIC_ROOT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


@dataclass(frozen=True)
class Options:
    """What ``scripts/provision`` was asked to do (validated here, before anything runs)."""

    root: Path
    source: Path
    board: str | None = None
    prefix: str = units.DEFAULT_PREFIX
    device_name: str | None = None
    model_url: str | None = None
    model_sha256: str | None = None
    model_name: str | None = None
    model_max_bytes: int | None = None
    broker_url: str | None = None
    broker_ca: Path | None = None
    topic_root: str = "ppchat"
    enroll_token_file: Path | None = None
    privacy_preset: str = "moderate"
    torch_index_url: str | None = None
    torch_version: str | None = None
    extras: tuple[str, ...] = ("train", "systemd")
    skip: frozenset[str] = frozenset()
    image: bool = False
    start: bool = False
    python: str = "python3"

    def __post_init__(self) -> None:
        unknown = sorted(self.skip - set(STEP_NAMES))
        if unknown:
            raise ProvisionError(
                f"--skip: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_NAMES)}"
            )
        if not Path(self.prefix).is_absolute():
            raise ProvisionError("--prefix must be an absolute path")
        if (self.model_url is None) != (self.model_sha256 is None):
            raise ProvisionError("--model-url and --model-sha256 go together (a model is pinned by its hash)")
        if self.model_url is not None:
            check_url(self.model_url)
        if self.model_sha256 is not None and SHA256_RE.fullmatch(self.model_sha256) is None:
            raise ProvisionError("--model-sha256 must be 64 lowercase hex digits")
        if self.model_url is not None and _GGUF_RE.fullmatch(self.model_file_name) is None:
            raise ProvisionError(f"model file name {self.model_file_name!r}: give --model-name NAME.gguf")
        if self.broker_url is not None:
            parts = urlsplit(self.broker_url)
            if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
                raise ProvisionError(
                    "--broker-url must be mqtts://HOST:PORT (or mqtt:// on a trusted network)"
                )
        if _TOPIC_ROOT_RE.fullmatch(self.topic_root) is None:
            raise ProvisionError("--topic-root: 1-32 characters of a-z 0-9 . _ -")
        if self.device_name is not None and NAME_RE.fullmatch(self.device_name) is None:
            raise ProvisionError("--device-name: 1-64 characters of A-Z a-z 0-9 . _ -")

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    @property
    def chroot(self) -> Path | None:
        return None if self.live else self.root

    def target(self, path: str) -> Path:
        """``path`` (absolute on the device) under the root being provisioned."""
        return self.root / path.lstrip("/")

    @property
    def venv(self) -> str:
        return f"{self.prefix.rstrip('/')}/.venv"

    @property
    def venv_python(self) -> str:
        return f"{self.venv}/bin/python"

    @property
    def source_dest(self) -> str:
        return f"{self.prefix.rstrip('/')}/src"

    @property
    def model_file_name(self) -> str:
        if self.model_name is not None:
            return self.model_name
        return Path(urlsplit(self.model_url or "").path).name

    @property
    def model_path(self) -> str | None:
        if self.model_url is None:
            return None
        return f"{self.prefix.rstrip('/')}/models/{self.model_file_name}"


@dataclass(frozen=True)
class Task:
    """A Python action; ``run`` returns a short account of what it did."""

    description: str
    run: Callable[[], str]


Action = Union[Command, Task]


@dataclass
class Step:
    name: str
    title: str
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    done: str | None = None
    """Why the step has nothing to do (the target is already as wanted, or it was not asked for)."""
    skipped: bool = False


@dataclass
class Plan:
    options: Options
    board: Board
    torch: TorchSource
    steps: list[Step]

    def header(self, *, dry_run: bool) -> list[str]:
        o, b = self.options, self.board
        mem = f", {b.memory_mb} MB RAM" if b.memory_mb is not None else ", RAM unknown"
        lines = [
            "ppchat provisioning plan" + (" (dry run: nothing is changed)" if dry_run else ""),
            f"  root:      {o.root}{'' if o.live else ' (an image or mounted root: commands run in chroot)'}",
            f"  board:     {b.name} ({b.title}, {b.arch}{mem}): {'; '.join(b.reasons)}",
            f"  llama.cpp: CMAKE_ARGS={shlex.quote(b.cmake_args)}" + (" (CUDA)" if b.cuda else ""),
            f"  torch:     {self.torch.index_url or 'https://pypi.org/simple'} ({self.torch.why})",
        ]
        if b.recommended_model:
            fits = "fits this board" if b.memory_mb is not None else "fits the smallest of these boards"
            lines.append(f"  models:    up to {b.recommended_model} {fits}")
        if b.notes:
            lines.append(f"  notes:     {b.notes}")
        lines += [f"  warning:   {w}" for w in b.warnings]
        return lines

    def render(self, *, dry_run: bool = True) -> str:
        lines = self.header(dry_run=dry_run)
        total = len(self.steps)
        for i, step in enumerate(self.steps, 1):
            lines.append(f"[{i}/{total}] {step.name}: {step.title}")
            if step.skipped:
                lines.append(f"    skipped (--skip {step.name})")
                continue
            lines += [f"    note: {note}" for note in step.notes]
            if step.done is not None:
                lines.append(f"    nothing to do: {step.done}")
                continue
            for action in step.actions:
                lines.append(
                    f"    $ {action.text()}" if isinstance(action, Command) else f"    - {action.description}"
                )
        return "\n".join(lines) + "\n"

    def execute(self, runner: Runner, *, out: TextIO | None = None) -> None:
        out = out or sys.stdout
        for line in self.header(dry_run=False):
            print(line, file=out)
        total = len(self.steps)
        for i, step in enumerate(self.steps, 1):
            print(f"[{i}/{total}] {step.name}: {step.title}", file=out, flush=True)
            if step.skipped:
                print(f"    skipped (--skip {step.name})", file=out)
                continue
            for note in step.notes:
                print(f"    note: {note}", file=out)
            if step.done is not None:
                print(f"    nothing to do: {step.done}", file=out)
                continue
            for action in step.actions:
                if isinstance(action, Command):
                    print(f"    $ {action.text()}", file=out, flush=True)
                    runner.run(action)
                else:
                    print(f"    - {action.description}", file=out, flush=True)
                    print(f"      {action.run()}", file=out, flush=True)
