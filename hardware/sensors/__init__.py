"""Sensors: small Protocols, each with a sysfs (or psutil) implementation that takes a root path.

    PowerSensor        read_power() -> PowerState          power.py  (power_supply, Pi firmware, INA3221)
    TemperatureSensor  read_temperature() -> Temperatures  thermal.py (thermal zones)
    SystemSensor       read_system() -> SystemLoad         system.py (psutil: load, memory)
    ActivitySensor     read_activity() -> Activity         activity.py (fed by the daemon)

:func:`board_sensors` assembles the first three for a board profile; :class:`Sensors` reads them
into one :class:`SensorSnapshot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hardware.profile import BoardProfile, PowerSourceKind
from hardware.sensors.activity import Activity, ActivitySensor, ActivityTracker
from hardware.sensors.jtop import JtopPowerSensor, jtop_available
from hardware.sensors.power import PowerSensor, PowerSource, PowerState, SysfsPowerSensor
from hardware.sensors.system import PsutilLike, PsutilSystemSensor, SystemLoad, SystemSensor
from hardware.sensors.thermal import SysfsTemperatureSensor, Temperatures, TemperatureSensor

__all__ = [
    "Activity",
    "ActivitySensor",
    "ActivityTracker",
    "PowerSensor",
    "PowerSource",
    "PowerState",
    "SensorSnapshot",
    "Sensors",
    "SystemLoad",
    "SystemSensor",
    "TemperatureSensor",
    "Temperatures",
    "board_sensors",
]


class SensorSnapshot(BaseModel):
    """One reading of every board sensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    power: PowerState
    temperature: Temperatures
    system: SystemLoad


@dataclass(frozen=True)
class Sensors:
    power: PowerSensor
    temperature: TemperatureSensor
    system: SystemSensor

    def snapshot(self) -> SensorSnapshot:
        return SensorSnapshot(
            power=self.power.read_power(),
            temperature=self.temperature.read_temperature(),
            system=self.system.read_system(),
        )


def board_sensors(
    profile: BoardProfile,
    *,
    root: Path = Path("/"),
    ignore_zones: Sequence[str] = (),
    use_jtop: bool = False,
    psutil_module: PsutilLike | None = None,
) -> Sensors:
    """The sensors a board's profile names, reading under ``root``.

    jtop is used only when the profile lists it, ``use_jtop`` asks for it, and it is installed with its
    service running; otherwise the sysfs files are read directly (no socket round trip per poll).
    """
    power: PowerSensor = SysfsPowerSensor(
        root, sources=profile.power.sources, input_rails=profile.power.input_rails
    )
    if use_jtop and PowerSourceKind.JTOP in profile.power.sources and jtop_available(root):
        power = JtopPowerSensor(power, input_rails=profile.power.input_rails)
    return Sensors(
        power=power,
        temperature=SysfsTemperatureSensor(root, ignore_zones=(*profile.thermal.ignore_zones, *ignore_zones)),
        system=PsutilSystemSensor(psutil_module),
    )
