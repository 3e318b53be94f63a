"""The training scheduler's rules, driven by the fake sysfs trees on a manual clock (no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.clock import ManualClock, SystemClock
from agent.config import SchedulerConfig, parse_config
from agent.errors import ConfigError
from agent.scheduler import (
    RULES,
    Inputs,
    RuleName,
    SchedulerPolicy,
    SchedulerState,
    TrainingScheduler,
    Verdict,
    WorkState,
    evaluate,
    in_window,
    thermal_latch,
)
from hardware.profile import get_profile
from hardware.sensors import Activity, ActivityTracker, Sensors, board_sensors
from tests.hardware import sysfs_trees as trees
from tests.hardware.sysfs_trees import FakePsutil, copy_tree, write

PROFILE_OF = {
    trees.PI5_GOOD: "raspberry-pi-5",
    trees.PI5_WEAK: "raspberry-pi-5",
    trees.PI4_THROTTLED: "raspberry-pi-4",
    trees.ORIN_NANO: "jetson-orin-nano",
    trees.LAPTOP_BATTERY: "generic-x86_64",
    trees.X86_DESKTOP: "generic-x86_64",
}
WORK = WorkState(privacy_budget_left=2.5, round_pending=True)
NOON = datetime(2025, 3, 4, 12, 0, tzinfo=timezone.utc)


def sensors_for(name: str, *, root: Path | None = None, psutil: FakePsutil | None = None) -> Sensors:
    return board_sensors(
        get_profile(PROFILE_OF[name]), root=root or trees.tree(name), psutil_module=psutil or FakePsutil()
    )


def policy_for(name: str, **config: object) -> SchedulerPolicy:
    return SchedulerPolicy.from_config(SchedulerConfig.model_validate(config), get_profile(PROFILE_OF[name]))


def judge(
    name: str,
    *,
    root: Path | None = None,
    psutil: FakePsutil | None = None,
    activity: Activity | None = None,
    work: WorkState = WORK,
    now: datetime = NOON,
    training: bool = False,
    state: SchedulerState | None = None,
    monotonic: float = 10_000.0,
    **config: object,
) -> tuple[Verdict, SchedulerState]:
    inputs = Inputs(
        snapshot=sensors_for(name, root=root, psutil=psutil).snapshot(),
        activity=activity or Activity(idle_s=3600.0, active_requests=0, ever_active=True),
        work=work,
        now=now,
        monotonic=monotonic,
        training=training,
    )
    return evaluate(inputs, policy=policy_for(name, **config), state=state or SchedulerState())


def blocking(verdict: Verdict) -> dict[RuleName, str]:
    return {c.rule: c.reason for c in verdict.blocking}


@pytest.mark.parametrize("name", [trees.PI5_GOOD, trees.ORIN_NANO, trees.X86_DESKTOP])
def test_idle_cool_board_on_mains_may_train(name: str) -> None:
    verdict, state = judge(name)
    assert verdict.allowed, verdict.explain()
    assert [c.rule for c in verdict.checks] == list(RULES)
    assert verdict.explain() == "training allowed"
    assert not state.too_hot


def test_weak_supply_blocks_on_under_voltage_only() -> None:
    verdict, _ = judge(trees.PI5_WEAK)
    assert set(blocking(verdict)) == {RuleName.UNDER_VOLTAGE}
    assert "0x50005" in blocking(verdict)[RuleName.UNDER_VOLTAGE]
    assert not judge(trees.PI5_WEAK, block_on_under_voltage=False)[0].blocking


def test_hot_pi4_blocks_on_temperature() -> None:
    verdict, state = judge(trees.PI4_THROTTLED)
    assert set(blocking(verdict)) == {RuleName.TEMPERATURE}
    assert blocking(verdict)[RuleName.TEMPERATURE] == (
        "82.3 °C at cpu-thermal: stopped at 70.0 °C, resumes below 65.0 °C"
    )
    assert state.too_hot
    # A configured limit up to the board's hard limit is honoured.
    hot, _ = judge(trees.PI4_THROTTLED, max_temperature_c=80.0)
    assert blocking(hot)[RuleName.TEMPERATURE].endswith("stopped at 80.0 °C, resumes below 75.0 °C")


def test_limit_above_the_boards_hard_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hard limit"):
        policy_for(trees.PI4_THROTTLED, max_temperature_c=90.0)


def test_jetson_under_voltage_is_reported_unknown_not_fine() -> None:
    verdict, _ = judge(trees.ORIN_NANO)
    reasons = {c.rule: c.reason for c in verdict.checks}
    assert "unknown" in reasons[RuleName.UNDER_VOLTAGE]
    assert reasons[RuleName.TEMPERATURE] == "48.6 °C at tj-thermal (limit 80.0 °C)"


def test_over_current_alarm_blocks(tmp_path: Path) -> None:
    root = copy_tree(trees.ORIN_NANO, tmp_path)
    write(root, "sys/class/hwmon/hwmon1/curr1_crit_alarm", "1\n")
    verdict, _ = judge(trees.ORIN_NANO, root=root)
    assert blocking(verdict) == {RuleName.UNDER_VOLTAGE: "over-current alarm on VDD_IN"}


def test_laptop_on_battery_blocks_on_power() -> None:
    verdict, _ = judge(trees.LAPTOP_BATTERY)
    assert blocking(verdict) == {RuleName.POWER: "running on battery (64%)"}
    assert judge(trees.LAPTOP_BATTERY, require_mains=False)[0].allowed


@pytest.mark.parametrize(
    ("status", "capacity", "allowed", "reason"),
    [
        ("Charging", "64", False, "on the charger, battery at 64% (needs 80%)"),
        ("Charging", "85", True, "on the charger, battery at 85%"),
        ("Full", "100", True, "on the charger, battery at 100%"),
        ("Charging", None, False, "on the charger, but the battery level is unknown"),
    ],
)
def test_laptop_charging_above_a_level(
    tmp_path: Path, status: str, capacity: str | None, allowed: bool, reason: str
) -> None:
    root = copy_tree(trees.LAPTOP_BATTERY, tmp_path)
    write(root, "sys/class/power_supply/AC/online", "1\n")
    write(root, "sys/class/power_supply/BAT0/status", status + "\n")
    if capacity is None:
        (root / "sys/class/power_supply/BAT0/capacity").unlink()
    else:
        write(root, "sys/class/power_supply/BAT0/capacity", capacity + "\n")
    verdict, _ = judge(trees.LAPTOP_BATTERY, root=root)
    power = next(c for c in verdict.checks if c.rule is RuleName.POWER)
    assert (verdict.allowed, power.reason) == (allowed, reason)


def test_unknown_power_source_blocks(tmp_path: Path) -> None:
    root = copy_tree(trees.LAPTOP_BATTERY, tmp_path)
    (root / "sys/class/power_supply/AC/online").unlink()
    (root / "sys/class/power_supply/BAT0/status").unlink()
    assert blocking(judge(trees.LAPTOP_BATTERY, root=root)[0]) == {
        RuleName.POWER: "the power source is unknown"
    }


def test_recent_chat_blocks() -> None:
    recent = Activity(idle_s=180.0, active_requests=0, ever_active=True)
    verdict, _ = judge(trees.PI5_GOOD, activity=recent)
    assert blocking(verdict) == {RuleName.IDLE: "3.0 min since the last chat; needs 10 min without chat"}
    assert judge(trees.PI5_GOOD, activity=recent, idle_minutes=2)[0].allowed
    started = Activity(idle_s=60.0, active_requests=0, ever_active=False)
    assert "since the daemon started" in blocking(judge(trees.PI5_GOOD, activity=started)[0])[RuleName.IDLE]
    busy = Activity(idle_s=0.0, active_requests=2, ever_active=True)
    assert blocking(judge(trees.PI5_GOOD, activity=busy, idle_minutes=0)[0]) == {
        RuleName.IDLE: "2 chat request(s) in progress"
    }


def test_load_blocks_a_start_but_not_a_running_trainer() -> None:
    busy = FakePsutil(load_1m=3.0, cpus=4)
    verdict, _ = judge(trees.PI5_GOOD, psutil=busy)
    assert blocking(verdict) == {RuleName.LOAD: "load 0.75 per CPU (needs below 0.5)"}
    assert judge(trees.PI5_GOOD, psutil=busy, training=True)[0].allowed
    assert judge(trees.PI5_GOOD, psutil=busy, max_load_per_cpu=None)[0].allowed


def test_memory_rule_when_set() -> None:
    tight = FakePsutil(available_mb=900)
    assert judge(trees.PI5_GOOD, psutil=tight)[0].allowed  # unset: not checked
    verdict, _ = judge(trees.PI5_GOOD, psutil=tight, min_available_memory_mb=1500)
    assert blocking(verdict) == {RuleName.MEMORY: "900 MB available (needs 1500 MB)"}
    assert judge(trees.PI5_GOOD, psutil=tight, min_available_memory_mb=1500, training=True)[0].allowed


@pytest.mark.parametrize(
    ("window", "hour", "minute", "inside"),
    [
        ("22:00-06:00", 23, 30, True),
        ("22:00-06:00", 5, 59, True),
        ("22:00-06:00", 6, 0, False),
        ("22:00-06:00", 12, 0, False),
        ("09:00-17:30", 17, 29, True),
        ("09:00-17:30", 8, 59, False),
        ("00:00-24:00", 23, 59, True),
    ],
)
def test_hour_windows(window: str, hour: int, minute: int, inside: bool) -> None:
    assert in_window(window, NOON.replace(hour=hour, minute=minute)) is inside


def test_outside_allowed_hours_blocks() -> None:
    verdict, _ = judge(trees.PI5_GOOD, allowed_hours=("22:00-06:00", "13:00-14:00"))
    assert blocking(verdict) == {
        RuleName.HOURS: "12:00 is outside the allowed hours 22:00-06:00, 13:00-14:00"
    }
    night = NOON.replace(hour=23)
    assert judge(trees.PI5_GOOD, allowed_hours=("22:00-06:00",), now=night)[0].allowed


@pytest.mark.parametrize(
    ("left", "floor", "reason"),
    [
        (None, 0.0, "the privacy budget is unknown (ledger unreadable)"),
        (0.0, 0.0, "privacy budget spent (epsilon left 0)"),
        (0.5, 1.0, "privacy budget spent (epsilon left 0.5)"),
    ],
)
def test_privacy_budget(left: float | None, floor: float, reason: str) -> None:
    work = WorkState(privacy_budget_left=left, personal_run_due=True)
    verdict, _ = judge(trees.PI5_GOOD, work=work, min_privacy_budget=floor)
    assert blocking(verdict) == {RuleName.PRIVACY_BUDGET: reason}


def test_no_work_due_blocks() -> None:
    verdict, _ = judge(trees.PI5_GOOD, work=WorkState(privacy_budget_left=3.0))
    assert blocking(verdict) == {RuleName.WORK: "nothing to train (no round pending, no personal run due)"}
    personal = WorkState(privacy_budget_left=3.0, personal_run_due=True)
    assert judge(trees.PI5_GOOD, work=personal)[0].allowed


def test_disabled_blocks() -> None:
    assert set(blocking(judge(trees.PI5_GOOD, enabled=False)[0])) == {RuleName.ENABLED}


def test_every_blocking_rule_is_listed_with_a_reason() -> None:
    verdict, _ = judge(
        trees.LAPTOP_BATTERY,
        activity=Activity(idle_s=0.0, active_requests=1, ever_active=True),
        work=WorkState(privacy_budget_left=0.0),
        allowed_hours=("22:00-06:00",),
    )
    assert [c.rule for c in verdict.blocking] == [
        RuleName.POWER,
        RuleName.IDLE,
        RuleName.HOURS,
        RuleName.PRIVACY_BUDGET,
        RuleName.WORK,
    ]
    text = verdict.explain()
    assert text.startswith("training blocked: power: running on battery (64%); idle: ")
    assert all(c.reason for c in verdict.checks)


def test_thermal_latch() -> None:
    kw = {"limit": 75.0, "hysteresis": 5.0}
    assert thermal_latch(celsius=74.9, previous=False, **kw) is False
    assert thermal_latch(celsius=75.0, previous=False, **kw) is True
    assert thermal_latch(celsius=72.0, previous=True, **kw) is True
    assert thermal_latch(celsius=72.0, previous=False, **kw) is False
    assert thermal_latch(celsius=69.9, previous=True, **kw) is False
    assert thermal_latch(celsius=None, previous=True, **kw) is True


def test_temperature_hysteresis_through_a_tree(tmp_path: Path) -> None:
    root = copy_tree(trees.PI5_GOOD, tmp_path)
    state = SchedulerState()
    seen = []
    for millic in ("60000", "76000", "72000", "70500", "69900", "72000"):
        write(root, "sys/class/thermal/thermal_zone0/temp", millic + "\n")
        verdict, state = judge(trees.PI5_GOOD, root=root, state=state)
        seen.append(verdict.allowed)
    # Trips at 75, stays off until below 70 (75 - 5), then 72 is fine again.
    assert seen == [True, False, False, False, True, True]


def test_unknown_temperature(tmp_path: Path) -> None:
    root = copy_tree(trees.X86_DESKTOP, tmp_path)
    for zone in (root / "sys/class/thermal").iterdir():
        (zone / "temp").write_text("")
    verdict, _ = judge(trees.X86_DESKTOP, root=root)
    assert verdict.allowed
    assert "unknown" in next(c.reason for c in verdict.checks if c.rule is RuleName.TEMPERATURE)
    strict, _ = judge(trees.X86_DESKTOP, root=root, block_on_unknown_temperature=True)
    assert blocking(strict) == {RuleName.TEMPERATURE: "no thermal zone gives a temperature"}


def test_backoff_after_a_preemption() -> None:
    state = SchedulerState(preempted_at=10_000.0)
    verdict, _ = judge(trees.PI5_GOOD, state=state, monotonic=10_120.0)
    assert blocking(verdict) == {RuleName.BACKOFF: "pre-empted 120 s ago; waits 300 s before restarting"}
    assert judge(trees.PI5_GOOD, state=state, monotonic=10_301.0)[0].allowed


def test_scheduler_config_sections() -> None:
    cfg = parse_config(
        {
            "hardware": {"profile": "raspberry-pi-5", "root_dir": "/tmp/fake"},
            "scheduler": {"idle_minutes": 5, "allowed_hours": ["22:00-06:00"], "max_load_per_cpu": 0.8},
        }
    )
    assert cfg.hardware.profile == "raspberry-pi-5"
    assert cfg.scheduler.allowed_hours == ("22:00-06:00",)
    assert parse_config({}).scheduler.idle_minutes == 10.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"hardware": {"profile": "raspberry-pi-9"}}, "unknown board profile"),
        ({"scheduler": {"allowed_hours": ["25:00-06:00"]}}, "not a window"),
        ({"scheduler": {"allowed_hours": ["06:00-06:00"]}}, "is empty"),
        ({"scheduler": {"idle_minutes": -1}}, "scheduler.idle_minutes"),
        ({"scheduler": {"surprise": True}}, "scheduler.surprise"),
    ],
)
def test_scheduler_config_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


# ---- the async scheduler ------------------------------------------------------------------------------


class FakeTrainer:
    """Records start/preempt calls with the clock's time; preempt stops it at once."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.running = False
        self.calls: list[tuple[str, float]] = []

    @property
    def is_running(self) -> bool:
        return self.running

    async def start(self) -> None:
        self.running = True
        self.calls.append(("start", self.clock.monotonic()))

    async def preempt(self) -> None:
        self.running = False
        self.calls.append(("preempt", self.clock.monotonic()))


class FixedWork:
    def __init__(self, work: WorkState = WORK) -> None:
        self.work = work

    def work_state(self) -> WorkState:
        return self.work


async def settle() -> None:
    """Let every task that can run, run (no time passes on the manual clock)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Harness:
    def __init__(self, root: Path, *, psutil: FakePsutil | None = None, **config: object) -> None:
        self.root = root
        self.clock = ManualClock(start=NOON)
        self.trainer = FakeTrainer(self.clock)
        self.work = FixedWork()
        self.scheduler = TrainingScheduler(
            policy=policy_for(trees.PI5_GOOD, **config),
            sensors=sensors_for(trees.PI5_GOOD, root=root, psutil=psutil),
            work=self.work,
            trainer=self.trainer,
            clock=self.clock,
        )

    async def advance(self, seconds: float, *, step: float = 30.0) -> None:
        """Move the clock in poll-sized steps, letting the scheduler run after each."""
        left = seconds
        while left > 0:
            self.clock.advance(min(step, left))
            left -= step
            await settle()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(copy_tree(trees.PI5_GOOD, tmp_path), poll_interval_s=30.0, idle_minutes=10.0)
    task = asyncio.create_task(h.scheduler.run())
    await settle()
    yield h
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_starts_after_the_idle_period(harness: Harness) -> None:
    assert harness.trainer.calls == []
    last = harness.scheduler.last_verdict
    assert last is not None and set(blocking(last)) == {RuleName.IDLE}
    await harness.advance(595)
    assert harness.trainer.calls == []
    await harness.advance(10)
    assert [c for c, _ in harness.trainer.calls] == ["start"]
    assert harness.scheduler.last_verdict is not None and harness.scheduler.last_verdict.allowed


async def test_chat_preempts_within_one_second(harness: Harness) -> None:
    await harness.advance(605)
    assert harness.trainer.is_running
    await harness.advance(2.5, step=2.5)  # mid-way between two polls
    asked = harness.clock.monotonic()
    harness.scheduler.notify_chat_activity()
    await settle()  # no clock time passes: pre-emption does not wait for the next poll
    assert [c for c, _ in harness.trainer.calls] == ["start", "preempt"]
    assert harness.trainer.calls[-1][1] - asked < 1.0
    verdict = harness.scheduler.last_verdict
    assert verdict is not None and RuleName.IDLE in blocking(verdict)
    # It resumes only after another full idle period (which outlasts the restart backoff).
    await harness.advance(595)
    assert not harness.trainer.is_running
    await harness.advance(10)
    assert [c for c, _ in harness.trainer.calls] == ["start", "preempt", "start"]


async def test_a_request_in_progress_keeps_training_off(harness: Harness) -> None:
    await harness.advance(605)
    with harness.scheduler.chat_request():
        await settle()
        assert not harness.trainer.is_running
        await harness.advance(900)  # a very long reply
        assert not harness.trainer.is_running
    await harness.advance(605)
    assert harness.trainer.is_running


async def test_heat_preempts_at_the_next_poll_and_hysteresis_holds(harness: Harness) -> None:
    zone = harness.root / "sys/class/thermal/thermal_zone0/temp"
    await harness.advance(605)
    assert harness.trainer.is_running
    zone.write_text("77000\n")
    await harness.advance(30)
    assert not harness.trainer.is_running
    assert harness.scheduler.state.too_hot
    zone.write_text("72000\n")
    await harness.advance(600)
    assert not harness.trainer.is_running  # 72 C is still above 75 - 5
    zone.write_text("65000\n")
    await harness.advance(30)
    assert harness.trainer.is_running


async def test_weak_supply_backs_off_before_restarting(harness: Harness) -> None:
    throttled = harness.root / "sys/devices/platform/soc/soc:firmware/get_throttled"
    await harness.advance(605)
    throttled.write_text("50005\n")
    await harness.advance(30)
    assert not harness.trainer.is_running
    throttled.write_text("50000\n")  # recovered, but it happened since boot
    await harness.advance(240)
    assert not harness.trainer.is_running  # restart_backoff_s = 300
    await harness.advance(60)
    assert harness.trainer.is_running
    reasons = {c.rule: c.reason for c in harness.scheduler.check().checks}
    assert (
        reasons[RuleName.UNDER_VOLTAGE] == "supply voltage good (but under-voltage has occurred since boot)"
    )


async def test_check_answers_the_fleet_without_acting(harness: Harness) -> None:
    await harness.advance(605)
    harness.trainer.running = False  # pretend it finished
    harness.work.work = WorkState(privacy_budget_left=1.0)
    round_offer = WorkState(privacy_budget_left=1.0, round_pending=True)
    assert harness.scheduler.check(round_offer).allowed
    assert not harness.scheduler.check().allowed
    assert harness.trainer.calls == [("start", harness.trainer.calls[0][1])]


async def test_manual_clock_sleep_and_advance() -> None:
    clock = ManualClock(start=NOON)
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(clock.monotonic())

    tasks = [asyncio.create_task(sleeper(s)) for s in (10, 5, 30)]
    await settle()
    assert clock.sleepers == 3
    clock.advance(12)
    await settle()
    assert woke == [1012.0, 1012.0]
    assert clock.now() == NOON + timedelta(seconds=12)
    clock.set_time(NOON + timedelta(minutes=1))
    await settle()
    assert len(woke) == 3 and clock.sleepers == 0
    await asyncio.gather(*tasks)
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        ManualClock(start=datetime(2025, 1, 1))  # naive


async def test_system_clock_is_real() -> None:
    clock = SystemClock()
    before = clock.monotonic()
    await clock.sleep(0)
    assert clock.monotonic() >= before
    assert clock.now().tzinfo is not None


def test_tracker_is_shared_with_the_daemon() -> None:
    clock = ManualClock()
    tracker = ActivityTracker(monotonic=clock.monotonic)
    scheduler = TrainingScheduler(
        policy=policy_for(trees.PI5_GOOD),
        sensors=sensors_for(trees.PI5_GOOD),
        work=FixedWork(),
        trainer=FakeTrainer(clock),
        clock=clock,
        activity=tracker,
    )
    assert scheduler.activity is tracker
