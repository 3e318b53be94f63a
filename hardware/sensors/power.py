"""Power: mains or battery, under-voltage, the Pi firmware's throttling bits, Jetson INA3221 rails.

Sources, each read under a root path (see :class:`hardware.profile.PowerSourceKind`):

``/sys/class/power_supply/*``
    ``type`` (Mains, USB, Battery, UPS, ...), ``online`` for adapters, ``status`` (Charging,
    Discharging, Full, Not charging) and ``capacity`` (percent) for batteries. Entries whose
    ``scope`` is ``Device`` (a wireless mouse's battery) are not the machine's. A machine without a
    battery is on mains: it could not be running otherwise.

The Raspberry Pi firmware (``/sys/devices/platform/soc/soc:firmware/get_throttled``, hex)
    bit 0 under-voltage now, 1 ARM frequency capped now, 2 throttled now, 3 soft temperature limit
    now; bits 16-19 the same conditions "has occurred since boot". The ``rpi_volt`` hwmon's
    ``in0_lcrit_alarm`` is 1 while the supply is below its low limit.

Jetson INA3221 rail monitors (hwmon ``name`` = ``ina3221``)
    ``inN_label`` (``VDD_IN``, ``VDD_CPU_GPU_CV``, ``VDD_SOC``), ``inN_input`` (mV), ``currN_input``
    (mA), ``currN_crit_alarm`` / ``currN_max_alarm`` (over-current). Jetsons expose no under-voltage
    flag: it stays unknown there.

Anything unreadable is None (unknown), never assumed fine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from hardware.profile import PowerSourceKind
from hardware.sysfs import read_int, read_text, under

POWER_SUPPLY_DIR = "sys/class/power_supply"
HWMON_DIR = "sys/class/hwmon"
GET_THROTTLED_PATHS = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/soc:firmware/get_throttled",
)
GET_THROTTLED_GLOB = "sys/devices/platform/*/*firmware/get_throttled"

_ADAPTER_TYPES = frozenset(
    {"Mains", "USB", "USB_C", "USB_PD", "USB_PD_DRP", "USB_DCP", "USB_CDP", "Wireless"}
)
_BATTERY_TYPES = frozenset({"Battery", "UPS"})
_ON_CHARGER_STATUSES = frozenset({"Charging", "Full", "Not charging"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PowerSource(str, Enum):
    MAINS = "mains"
    BATTERY = "battery"
    UNKNOWN = "unknown"


class ThrottleBit(int, Enum):
    """Bits of the Raspberry Pi firmware's ``get_throttled`` value."""

    UNDER_VOLTAGE = 0
    FREQ_CAPPED = 1
    THROTTLED = 2
    SOFT_TEMP_LIMIT = 3
    UNDER_VOLTAGE_SINCE_BOOT = 16
    FREQ_CAPPED_SINCE_BOOT = 17
    THROTTLED_SINCE_BOOT = 18
    SOFT_TEMP_LIMIT_SINCE_BOOT = 19


class Throttling(_Frozen):
    """The decoded ``get_throttled`` value."""

    raw: int = Field(ge=0)

    def has(self, bit: ThrottleBit) -> bool:
        return bool(self.raw >> bit.value & 1)

    @property
    def active(self) -> tuple[ThrottleBit, ...]:
        return tuple(bit for bit in ThrottleBit if self.has(bit))


class Rail(_Frozen):
    """One INA3221 channel."""

    label: str
    voltage_v: float | None = None
    current_a: float | None = None
    over_current: bool | None = None

    @property
    def power_w(self) -> float | None:
        if self.voltage_v is None or self.current_a is None:
            return None
        return self.voltage_v * self.current_a


class PowerState(_Frozen):
    source: PowerSource = PowerSource.UNKNOWN
    battery_percent: float | None = None
    """The lowest capacity among the machine's batteries; None: no battery or unreadable."""
    has_battery: bool | None = None
    charging: bool | None = None
    under_voltage_now: bool | None = None
    under_voltage_since_boot: bool | None = None
    throttling: Throttling | None = None
    rails: tuple[Rail, ...] = ()
    input_power_w: float | None = None
    over_current_now: bool | None = None
    evidence: tuple[str, ...] = ()
    """The files that decided each value, in words."""


class PowerSensor(Protocol):
    def read_power(self) -> PowerState: ...


class _Supply(_Frozen):
    name: str
    kind: str
    online: int | None = None
    status: str | None = None
    capacity: int | None = None


def read_power_supplies(root: Path) -> tuple[PowerSource, bool, float | None, bool | None, list[str]]:
    """(source, has_battery, battery_percent, charging, evidence) from ``/sys/class/power_supply``."""
    supplies: list[_Supply] = []
    folder = under(root, POWER_SUPPLY_DIR)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    for entry in entries:
        kind = read_text(entry / "type")
        if kind is None or read_text(entry / "scope") == "Device":
            continue
        if kind in _BATTERY_TYPES and read_int(entry / "present") == 0:
            continue
        supplies.append(
            _Supply(
                name=entry.name,
                kind=kind,
                online=read_int(entry / "online"),
                status=read_text(entry / "status"),
                capacity=read_int(entry / "capacity"),
            )
        )
    evidence = [
        f"power_supply/{s.name}: {s.kind}"
        + (f" online={s.online}" if s.online is not None else "")
        + (f" {s.status}" if s.status else "")
        + (f" {s.capacity}%" if s.capacity is not None else "")
        for s in supplies
    ]
    adapters = [s for s in supplies if s.kind in _ADAPTER_TYPES and s.online is not None]
    batteries = [s for s in supplies if s.kind in _BATTERY_TYPES]
    if not batteries:
        evidence.append("no battery: mains")
        return PowerSource.MAINS, False, None, None, evidence
    statuses = {b.status for b in batteries if b.status is not None}
    if any(a.online == 1 for a in adapters):
        source = PowerSource.MAINS
    elif "Discharging" in statuses or (adapters and all(a.online == 0 for a in adapters)):
        source = PowerSource.BATTERY
    elif statuses & _ON_CHARGER_STATUSES:
        source = PowerSource.MAINS
    else:
        source = PowerSource.UNKNOWN
    capacities = [b.capacity for b in batteries if b.capacity is not None and 0 <= b.capacity <= 100]
    percent = float(min(capacities)) if len(capacities) == len(batteries) else None
    charging = ("Charging" in statuses) if statuses else None
    return source, True, percent, charging, evidence


def read_get_throttled(root: Path) -> tuple[Throttling | None, str | None]:
    """The firmware's throttling bits and the file they came from; (None, None) when absent."""
    candidates = [under(root, p) for p in GET_THROTTLED_PATHS]
    candidates += sorted(root.glob(GET_THROTTLED_GLOB))
    for path in candidates:
        text = read_text(path)
        if text is None:
            continue
        try:
            raw = int(text.removeprefix("0x"), 16)
        except ValueError:
            continue
        if raw >= 0:
            return Throttling(raw=raw), str(path.relative_to(root))
    return None, None


def _hwmon_dirs(root: Path, name: str) -> list[Path]:
    folder = under(root, HWMON_DIR)
    if not folder.is_dir():
        return []
    return [d for d in sorted(folder.iterdir()) if read_text(d / "name") == name]


def read_lcrit_alarm(root: Path) -> bool | None:
    """The Pi's ``rpi_volt`` hwmon ``in0_lcrit_alarm``: True while under-voltage; None when absent."""
    for folder in _hwmon_dirs(root, "rpi_volt"):
        value = read_int(folder / "in0_lcrit_alarm")
        if value is not None:
            return value != 0
    return None


def read_ina3221_rails(root: Path) -> tuple[Rail, ...]:
    """Every connected INA3221 channel's voltage, current and over-current alarm."""
    rails: list[Rail] = []
    for folder in _hwmon_dirs(root, "ina3221"):
        for channel in (1, 2, 3):
            label = read_text(folder / f"in{channel}_label")
            if label is None or label.upper() == "NC" or read_int(folder / f"in{channel}_enable") == 0:
                continue
            millivolts = read_int(folder / f"in{channel}_input")
            milliamps = read_int(folder / f"curr{channel}_input")
            alarms = [read_int(folder / f"curr{channel}_{kind}_alarm") for kind in ("crit", "max")]
            known = [a for a in alarms if a is not None]
            rails.append(
                Rail(
                    label=label,
                    voltage_v=None if millivolts is None else millivolts / 1000.0,
                    current_a=None if milliamps is None else milliamps / 1000.0,
                    over_current=any(known) if known else None,
                )
            )
    return tuple(rails)


def _any_true(values: Iterable[bool | None]) -> bool | None:
    known = [v for v in values if v is not None]
    return any(known) if known else None


class SysfsPowerSensor:
    """The power state from the profile's sources, read under ``root``."""

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        sources: Sequence[PowerSourceKind] = (PowerSourceKind.POWER_SUPPLY,),
        input_rails: Sequence[str] = (),
    ) -> None:
        self._root = root
        self._sources = tuple(sources)
        self._input_rails = tuple(input_rails)

    def read_power(self) -> PowerState:
        # The power_supply class is always read: it is what says "battery" on any board.
        source, has_battery, percent, charging, evidence = read_power_supplies(self._root)
        throttling: Throttling | None = None
        lcrit: bool | None = None
        if PowerSourceKind.PI_FIRMWARE in self._sources:
            throttling, where = read_get_throttled(self._root)
            if throttling is not None:
                evidence.append(f"{where}: {throttling.raw:#x}")
            lcrit = read_lcrit_alarm(self._root)
            if lcrit is not None:
                evidence.append(f"rpi_volt in0_lcrit_alarm={int(lcrit)}")
        rails: tuple[Rail, ...] = ()
        input_power: float | None = None
        if PowerSourceKind.JETSON_INA3221 in self._sources:
            rails = read_ina3221_rails(self._root)
            inputs = [r.power_w for r in rails if r.label in self._input_rails]
            if inputs and all(p is not None for p in inputs):
                input_power = sum(p for p in inputs if p is not None)
            evidence.extend(
                f"ina3221 {r.label}: {r.voltage_v} V {r.current_a} A over_current={r.over_current}"
                for r in rails
            )
        return PowerState(
            source=source,
            battery_percent=percent,
            has_battery=has_battery,
            charging=charging,
            under_voltage_now=_any_true(
                [None if throttling is None else throttling.has(ThrottleBit.UNDER_VOLTAGE), lcrit]
            ),
            under_voltage_since_boot=(
                None if throttling is None else throttling.has(ThrottleBit.UNDER_VOLTAGE_SINCE_BOOT)
            ),
            throttling=throttling,
            rails=rails,
            input_power_w=input_power,
            over_current_now=_any_true(r.over_current for r in rails),
            evidence=tuple(evidence),
        )
