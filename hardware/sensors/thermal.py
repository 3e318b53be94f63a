"""Temperatures from the kernel's thermal zones (``/sys/class/thermal/thermal_zone*``).

Each zone has a ``type`` (``cpu-thermal``, ``x86_pkg_temp``, ``tj-thermal``) and a ``temp`` in
millidegrees Celsius. A zone that errors on read (a Wi-Fi chip that is down) or reports an
impossible value (Jetson zones that read -40 C when their sensor is off, or a constant like the
Nano's ``PMIC-Die`` listed in the profile's ``ignore_zones``) is unknown, not a temperature.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from hardware.sysfs import read_int, read_text, under

THERMAL_DIR = "sys/class/thermal"
_ZONE_RE = re.compile(r"^thermal_zone(\d+)$")
_PLAUSIBLE_C = (-39.0, 150.0)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ZoneReading(_Frozen):
    zone: str
    """``thermal_zone0``."""
    type: str | None
    celsius: float | None
    ignored: bool = False


class Temperatures(_Frozen):
    zones: tuple[ZoneReading, ...] = ()

    @property
    def valid(self) -> tuple[ZoneReading, ...]:
        return tuple(z for z in self.zones if z.celsius is not None and not z.ignored)

    @property
    def max_c(self) -> float | None:
        """The hottest trusted zone; None when no zone gives a temperature."""
        return max((z.celsius for z in self.valid if z.celsius is not None), default=None)

    @property
    def hottest(self) -> ZoneReading | None:
        valid = self.valid
        return max(valid, key=lambda z: z.celsius or 0.0) if valid else None


class TemperatureSensor(Protocol):
    def read_temperature(self) -> Temperatures: ...


class SysfsTemperatureSensor:
    def __init__(self, root: Path = Path("/"), *, ignore_zones: Sequence[str] = ()) -> None:
        self._root = root
        self._ignore = frozenset(ignore_zones)

    def read_temperature(self) -> Temperatures:
        folder = under(self._root, THERMAL_DIR)
        if not folder.is_dir():
            return Temperatures()
        zones: list[tuple[int, ZoneReading]] = []
        for entry in folder.iterdir():
            found = _ZONE_RE.match(entry.name)
            if found is None:
                continue
            kind = read_text(entry / "type")
            millic = read_int(entry / "temp")
            celsius = None if millic is None else millic / 1000.0
            if celsius is not None and not _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]:
                celsius = None
            zones.append(
                (
                    int(found.group(1)),
                    ZoneReading(zone=entry.name, type=kind, celsius=celsius, ignored=kind in self._ignore),
                )
            )
        return Temperatures(zones=tuple(z for _, z in sorted(zones, key=lambda item: item[0])))
