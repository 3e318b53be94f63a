"""CPU load and memory through psutil (injected, so tests pass a fake with the same three calls)."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict


class SystemLoad(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    load_1m: float | None = None
    cpu_count: int | None = None
    memory_total_mb: int | None = None
    memory_available_mb: int | None = None

    @property
    def load_per_cpu(self) -> float | None:
        """The 1-minute load average divided by the logical CPUs (1.0: every CPU busy)."""
        if self.load_1m is None or not self.cpu_count:
            return None
        return self.load_1m / self.cpu_count


class VirtualMemory(Protocol):
    @property
    def total(self) -> int: ...
    @property
    def available(self) -> int: ...


class PsutilLike(Protocol):
    """The part of psutil used here."""

    def getloadavg(self) -> tuple[float, float, float]: ...
    def cpu_count(self, logical: bool = True) -> int | None: ...
    def virtual_memory(self) -> VirtualMemory: ...


class SystemSensor(Protocol):
    def read_system(self) -> SystemLoad: ...


class PsutilSystemSensor:
    def __init__(self, psutil_module: PsutilLike | None = None) -> None:
        if psutil_module is None:
            import psutil

            psutil_module = psutil
        self._ps: PsutilLike = psutil_module

    def read_system(self) -> SystemLoad:
        try:
            load: float | None = float(self._ps.getloadavg()[0])
        except OSError:
            load = None
        try:
            memory = self._ps.virtual_memory()
            total: int | None = int(memory.total) // (1 << 20)
            available: int | None = int(memory.available) // (1 << 20)
        except OSError:
            total = available = None
        return SystemLoad(
            load_1m=load,
            cpu_count=self._ps.cpu_count(logical=True),
            memory_total_mb=total,
            memory_available_mb=available,
        )
