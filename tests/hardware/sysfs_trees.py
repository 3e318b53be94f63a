"""The fake sysfs trees in ``tests/fixtures/sysfs`` (modelled on real boards' files) and helpers."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"

PI5_GOOD = "pi5-good"
PI5_WEAK = "pi5-weak-supply"
PI4_THROTTLED = "pi4-throttled"
ORIN_NANO = "orin-nano-barrel-jack"
LAPTOP_BATTERY = "laptop-on-battery"
X86_DESKTOP = "x86-desktop"
ALL_TREES = (PI5_GOOD, PI5_WEAK, PI4_THROTTLED, ORIN_NANO, LAPTOP_BATTERY, X86_DESKTOP)


def tree(name: str) -> Path:
    path = FIXTURES / name
    assert path.is_dir(), path
    return path


def copy_tree(name: str, dest: Path) -> Path:
    """A writable copy of a tree, for tests that change a file."""
    target = dest / name
    shutil.copytree(tree(name), target)
    return target


def write(root: Path, relative: str, content: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


@dataclass(frozen=True)
class FakeVirtualMemory:
    total: int
    available: int


class FakePsutil:
    """The three psutil calls the system sensor makes, with set values."""

    def __init__(
        self, *, load_1m: float = 0.1, cpus: int = 4, total_mb: int = 8192, available_mb: int = 6000
    ):
        self.load_1m = load_1m
        self.cpus = cpus
        self.total_mb = total_mb
        self.available_mb = available_mb

    def getloadavg(self) -> tuple[float, float, float]:
        return (self.load_1m, self.load_1m, self.load_1m)

    def cpu_count(self, logical: bool = True) -> int | None:
        return self.cpus

    def virtual_memory(self) -> FakeVirtualMemory:
        return FakeVirtualMemory(total=self.total_mb << 20, available=self.available_mb << 20)
