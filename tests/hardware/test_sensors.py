from __future__ import annotations

from pathlib import Path

import pytest

from agent.clock import ManualClock
from hardware.profile import PowerSourceKind, get_profile
from hardware.sensors import ActivityTracker, PowerSource, board_sensors
from hardware.sensors.jtop import jtop_available, rails_from_jtop
from hardware.sensors.power import SysfsPowerSensor, ThrottleBit, Throttling
from hardware.sensors.system import PsutilSystemSensor
from hardware.sensors.thermal import SysfsTemperatureSensor
from tests.hardware import sysfs_trees as trees
from tests.hardware.sysfs_trees import FakePsutil, copy_tree, write

PI = (PowerSourceKind.PI_FIRMWARE, PowerSourceKind.POWER_SUPPLY)
JETSON = (PowerSourceKind.JETSON_INA3221, PowerSourceKind.POWER_SUPPLY)


def test_throttling_bits() -> None:
    bits = Throttling(raw=0x50005)
    assert bits.active == (
        ThrottleBit.UNDER_VOLTAGE,
        ThrottleBit.THROTTLED,
        ThrottleBit.UNDER_VOLTAGE_SINCE_BOOT,
        ThrottleBit.THROTTLED_SINCE_BOOT,
    )
    assert Throttling(raw=0).active == ()


def test_pi5_on_a_good_supply() -> None:
    state = SysfsPowerSensor(trees.tree(trees.PI5_GOOD), sources=PI).read_power()
    assert state.source is PowerSource.MAINS
    assert state.has_battery is False
    assert state.under_voltage_now is False
    assert state.under_voltage_since_boot is False
    assert state.throttling == Throttling(raw=0)
    assert "no battery: mains" in state.evidence


def test_pi5_on_a_weak_supply() -> None:
    state = SysfsPowerSensor(trees.tree(trees.PI5_WEAK), sources=PI).read_power()
    assert state.source is PowerSource.MAINS
    assert state.under_voltage_now is True
    assert state.under_voltage_since_boot is True
    assert state.throttling is not None and state.throttling.has(ThrottleBit.THROTTLED)
    assert any("get_throttled: 0x50005" in line for line in state.evidence)
    assert "rpi_volt in0_lcrit_alarm=1" in state.evidence


def test_pi4_throttled_by_heat_but_not_by_supply() -> None:
    state = SysfsPowerSensor(trees.tree(trees.PI4_THROTTLED), sources=PI).read_power()
    assert state.under_voltage_now is False
    assert state.throttling is not None
    assert state.throttling.has(ThrottleBit.SOFT_TEMP_LIMIT)
    assert state.throttling.has(ThrottleBit.FREQ_CAPPED)
    assert not state.throttling.has(ThrottleBit.UNDER_VOLTAGE_SINCE_BOOT)


def test_the_lcrit_alarm_alone_says_under_voltage(tmp_path: Path) -> None:
    root = copy_tree(trees.PI5_GOOD, tmp_path)
    (root / "sys/devices/platform/soc/soc:firmware/get_throttled").unlink()
    write(root, "sys/class/hwmon/hwmon1/in0_lcrit_alarm", "1\n")
    state = SysfsPowerSensor(root, sources=PI).read_power()
    assert state.throttling is None
    assert state.under_voltage_now is True
    assert state.under_voltage_since_boot is None


def test_under_voltage_is_unknown_without_pi_signals(tmp_path: Path) -> None:
    root = copy_tree(trees.PI5_GOOD, tmp_path)
    (root / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("garbage\n")
    (root / "sys/class/hwmon/hwmon1/in0_lcrit_alarm").unlink()
    state = SysfsPowerSensor(root, sources=PI).read_power()
    assert state.under_voltage_now is None


def test_orin_nano_on_its_barrel_jack() -> None:
    profile = get_profile("jetson-orin-nano")
    state = SysfsPowerSensor(
        trees.tree(trees.ORIN_NANO), sources=JETSON, input_rails=profile.power.input_rails
    ).read_power()
    # The offline USB-C entry is not a battery: no battery means mains.
    assert state.source is PowerSource.MAINS
    assert [r.label for r in state.rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    vdd_in = state.rails[0]
    assert vdd_in.voltage_v == pytest.approx(5.072)
    assert vdd_in.current_a == pytest.approx(1.424)
    assert state.input_power_w == pytest.approx(5.072 * 1.424)
    assert state.over_current_now is False
    assert state.under_voltage_now is None  # Jetsons have no such flag: unknown, not "fine"


def test_ina3221_over_current_alarm(tmp_path: Path) -> None:
    root = copy_tree(trees.ORIN_NANO, tmp_path)
    write(root, "sys/class/hwmon/hwmon1/curr1_crit_alarm", "1\n")
    state = SysfsPowerSensor(root, sources=JETSON, input_rails=("VDD_IN",)).read_power()
    assert state.over_current_now is True
    assert state.rails[0].over_current is True


def test_laptop_on_battery_ignores_the_mouse_battery() -> None:
    state = SysfsPowerSensor(trees.tree(trees.LAPTOP_BATTERY)).read_power()
    assert state.source is PowerSource.BATTERY
    assert state.has_battery is True
    assert state.battery_percent == 64.0
    assert state.charging is False
    assert not any("hid-" in line for line in state.evidence)


@pytest.mark.parametrize(
    ("online", "status", "source", "charging"),
    [
        ("1", "Charging", PowerSource.MAINS, True),
        ("1", "Full", PowerSource.MAINS, False),
        ("1", "Not charging", PowerSource.MAINS, False),
        ("0", "Discharging", PowerSource.BATTERY, False),
        (None, "Charging", PowerSource.MAINS, True),
        (None, "Unknown", PowerSource.UNKNOWN, False),
        (None, None, PowerSource.UNKNOWN, None),
    ],
)
def test_laptop_power_states(
    tmp_path: Path, online: str | None, status: str | None, source: PowerSource, charging: bool | None
) -> None:
    root = copy_tree(trees.LAPTOP_BATTERY, tmp_path)
    supplies = root / "sys/class/power_supply"
    if online is None:
        (supplies / "AC/online").unlink()
    else:
        (supplies / "AC/online").write_text(online + "\n")
    if status is None:
        (supplies / "BAT0/status").unlink()
    else:
        (supplies / "BAT0/status").write_text(status + "\n")
    state = SysfsPowerSensor(root).read_power()
    assert state.source is source
    assert state.charging is charging


def test_battery_without_capacity_has_unknown_level(tmp_path: Path) -> None:
    root = copy_tree(trees.LAPTOP_BATTERY, tmp_path)
    (root / "sys/class/power_supply/BAT0/capacity").unlink()
    assert SysfsPowerSensor(root).read_power().battery_percent is None


def test_absent_battery_is_no_battery(tmp_path: Path) -> None:
    root = copy_tree(trees.LAPTOP_BATTERY, tmp_path)
    write(root, "sys/class/power_supply/BAT0/present", "0\n")
    state = SysfsPowerSensor(root).read_power()
    assert (state.source, state.has_battery) == (PowerSource.MAINS, False)


def test_desktop_without_power_supply_entries_is_on_mains() -> None:
    state = SysfsPowerSensor(trees.tree(trees.X86_DESKTOP)).read_power()
    assert (state.source, state.has_battery, state.battery_percent) == (PowerSource.MAINS, False, None)


def test_temperatures_per_zone_and_max() -> None:
    temps = SysfsTemperatureSensor(trees.tree(trees.ORIN_NANO)).read_temperature()
    by_type = {z.type: z.celsius for z in temps.zones}
    assert by_type["cpu-thermal"] == pytest.approx(48.5)
    assert by_type["cv0-thermal"] is None  # a sensor that is off reads -256 C: not a temperature
    assert temps.max_c == pytest.approx(48.593)
    assert temps.hottest is not None and temps.hottest.type == "tj-thermal"
    assert [z.zone for z in temps.zones] == [f"thermal_zone{i}" for i in range(6)]


def test_unreadable_zone_is_unknown() -> None:
    temps = SysfsTemperatureSensor(trees.tree(trees.LAPTOP_BATTERY)).read_temperature()
    assert {z.type: z.celsius for z in temps.zones} == {
        "acpitz": 50.0,
        "x86_pkg_temp": 56.0,
        "iwlwifi_1": None,
    }
    assert temps.max_c == 56.0


def test_ignored_zones_do_not_count(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "PMIC-Die\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "100000\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/type", "CPU-therm\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "41500\n")
    nano = get_profile("jetson-nano")
    temps = SysfsTemperatureSensor(tmp_path, ignore_zones=nano.thermal.ignore_zones).read_temperature()
    assert temps.max_c == 41.5
    assert temps.zones[0].ignored


def test_no_thermal_zones_is_unknown(tmp_path: Path) -> None:
    temps = SysfsTemperatureSensor(tmp_path).read_temperature()
    assert (temps.zones, temps.max_c, temps.hottest) == ((), None, None)


def test_system_load_through_injected_psutil() -> None:
    system = PsutilSystemSensor(
        FakePsutil(load_1m=3.0, cpus=4, total_mb=8192, available_mb=5000)
    ).read_system()
    assert system.load_per_cpu == 0.75
    assert (system.memory_total_mb, system.memory_available_mb) == (8192, 5000)


def test_system_load_from_the_real_psutil() -> None:
    system = PsutilSystemSensor().read_system()
    assert system.cpu_count is not None and system.cpu_count >= 1
    assert system.memory_total_mb is not None and system.memory_total_mb > 0


def test_activity_tracker_on_a_manual_clock() -> None:
    clock = ManualClock()
    tracker = ActivityTracker(monotonic=clock.monotonic)
    clock.advance(30)
    first = tracker.read_activity()
    assert (first.idle_s, first.ever_active) == (30.0, False)  # idle since start, not since forever
    with tracker.request():
        clock.advance(12)
        busy = tracker.read_activity()
        assert (busy.idle_s, busy.active_requests) == (0.0, 1)
    clock.advance(100)
    after = tracker.read_activity()
    assert (after.idle_s, after.active_requests, after.ever_active) == (100.0, 0, True)
    tracker.notify()
    assert tracker.read_activity().idle_s == 0.0


def test_jtop_is_optional() -> None:
    assert jtop_available(trees.tree(trees.ORIN_NANO)) is False
    power = {
        "rail": {
            "VDD_IN": {"online": True, "volt": 5072, "curr": 1424, "power": 7222},
            "VDD_SOC": {"online": False, "volt": 0, "curr": 0},
            "odd": "not a mapping",
        },
        "tot": {"power": 7222},
    }
    rails = rails_from_jtop(power)
    assert [(r.label, r.voltage_v, r.current_a) for r in rails] == [("VDD_IN", 5.072, 1.424)]
    assert rails_from_jtop({}) == ()


@pytest.mark.parametrize(
    ("name", "profile"), [(trees.PI5_WEAK, "raspberry-pi-5"), (trees.ORIN_NANO, "jetson-orin-nano")]
)
def test_board_sensors_snapshot(name: str, profile: str) -> None:
    sensors = board_sensors(get_profile(profile), root=trees.tree(name), psutil_module=FakePsutil())
    snap = sensors.snapshot()
    assert snap.power.source is PowerSource.MAINS
    assert snap.temperature.max_c is not None
    assert snap.system.load_per_cpu == pytest.approx(0.025)
