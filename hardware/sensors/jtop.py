"""jetson-stats (``jtop``) as an optional power source, used only when installed and its service runs.

jetson-stats is AGPL: it is never a dependency (the ``jetson`` extra installs it on request). Its
service owns ``/run/jtop.sock``; without that socket, or without the package, this source is
absent and the INA3221 hwmon files are read directly instead (:mod:`hardware.sensors.power`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hardware.sensors.power import PowerSensor, PowerState, Rail
from hardware.sysfs import under

JTOP_SOCKET = "run/jtop.sock"


def jtop_available(root: Path = Path("/")) -> bool:
    """jetson-stats is importable and its service's socket exists under ``root``."""
    return importlib.util.find_spec("jtop") is not None and under(root, JTOP_SOCKET).is_socket()


def _milli(value: Any) -> float | None:
    return float(value) / 1000.0 if isinstance(value, int | float) and not isinstance(value, bool) else None


def rails_from_jtop(power: Mapping[str, Any]) -> tuple[Rail, ...]:
    """Rails from ``jtop.power`` (``{"rail": {"VDD_IN": {"volt": mV, "curr": mA, ...}}, ...}``)."""
    rails = power.get("rail")
    if not isinstance(rails, Mapping):
        return ()
    out: list[Rail] = []
    for label, values in rails.items():
        if not isinstance(values, Mapping) or values.get("online") is False:
            continue
        out.append(
            Rail(label=str(label), voltage_v=_milli(values.get("volt")), current_a=_milli(values.get("curr")))
        )
    return tuple(out)


class JtopPowerSensor:
    """The base sensor's state with its rails replaced by jtop's (jtop reads them from the service)."""

    def __init__(self, base: PowerSensor, *, input_rails: Sequence[str] = ()) -> None:
        self._base = base
        self._input_rails = tuple(input_rails)

    def read_power(self) -> PowerState:
        state = self._base.read_power()
        from jtop import JtopException, jtop

        try:
            with jtop() as jetson:
                power = jetson.power
        except JtopException:
            return state
        rails = rails_from_jtop(power if isinstance(power, Mapping) else {})
        inputs = [r.power_w for r in rails if r.label in self._input_rails]
        input_power = sum(p for p in inputs if p is not None) if inputs and None not in inputs else None
        return state.model_copy(
            update={
                "rails": rails,
                "input_power_w": input_power,
                "evidence": (*state.evidence, f"jtop: {len(rails)} rails"),
            }
        )
