"""The training scheduler: the device trains only when it is idle, cool, on mains and has work.

Two layers:

:func:`evaluate` (pure)
    sensor snapshot + user activity + work + clock readings + policy + the previous
    :class:`SchedulerState` -> a :class:`Verdict` (allowed, and every rule's result with a human
    reason) and the next state. The only state is explicit: the thermal hysteresis latch and the
    time of the last pre-emption. Rules live in the :data:`RULES` registry, one function each.

:class:`TrainingScheduler` (async)
    polls the sensors on an injected :class:`~agent.clock.Clock`, starts the trainer through the
    :class:`TrainerControl` seam when every rule holds and pre-empts it when one stops holding. A
    chat request (:meth:`TrainingScheduler.notify_chat_activity`) wakes it at once: ``preempt()`` is
    called in the same turn of the event loop, without waiting for the next poll.

The rules (config section ``[scheduler]``):

==============  ===========================================================================
enabled         ``scheduler.enabled``
power           on mains; with a battery, on the charger and at least ``min_battery_percent``
under_voltage   no under-voltage now (Pi firmware, rpi_volt) and no INA3221 over-current alarm
temperature     hottest zone below the limit; after tripping, resume below limit - hysteresis
idle            no chat request for ``idle_minutes`` and none in progress
load            1-minute load per CPU below ``max_load_per_cpu`` (to start; not while training)
memory          available memory at least ``min_available_memory_mb`` (to start)
hours           inside one of ``allowed_hours`` (local time), when any are set
privacy_budget  more than ``min_privacy_budget`` epsilon left
work            a federated round pending or a personal-adapter run due
backoff         ``restart_backoff_s`` passed since the last pre-emption (to start)
==============  ===========================================================================

Unknown sensor values never pass as good values: an unknown power source blocks, an unknown
under-voltage state does not (no such signal exists on most machines; the reason says so), an
unknown temperature blocks only with ``block_on_unknown_temperature``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from agent.clock import Clock
from agent.config import SchedulerConfig
from agent.errors import ConfigError
from hardware.profile import BoardProfile
from hardware.sensors import Activity, ActivityTracker, PowerSource, SensorSnapshot
from hardware.sensors.power import ThrottleBit

log = logging.getLogger(__name__)

_WINDOW_RE = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RuleName(str, Enum):
    ENABLED = "enabled"
    POWER = "power"
    UNDER_VOLTAGE = "under_voltage"
    TEMPERATURE = "temperature"
    IDLE = "idle"
    LOAD = "load"
    MEMORY = "memory"
    HOURS = "hours"
    PRIVACY_BUDGET = "privacy_budget"
    WORK = "work"
    BACKOFF = "backoff"


class Check(_Frozen):
    rule: RuleName
    ok: bool
    reason: str


class Verdict(_Frozen):
    allowed: bool
    checks: tuple[Check, ...]
    """Every rule's result, in the registry's order."""
    at: datetime

    @property
    def blocking(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def explain(self) -> str:
        """One line for ``agent status``."""
        if self.allowed:
            return "training allowed"
        return "training blocked: " + "; ".join(f"{c.rule.value}: {c.reason}" for c in self.blocking)


class WorkState(_Frozen):
    """What the daemon knows about training work, passed in (the ledger and fleet client own it)."""

    privacy_budget_left: float | None
    """Epsilon left in the device's budget; None: the ledger could not be read."""
    round_pending: bool = False
    personal_run_due: bool = False


class SchedulerState(_Frozen):
    """The scheduler's memory between evaluations."""

    too_hot: bool = False
    """The thermal latch: set at the limit, cleared below limit - hysteresis."""
    preempted_at: float | None = None
    """Monotonic time of the last pre-emption."""


class Inputs(_Frozen):
    snapshot: SensorSnapshot
    activity: Activity
    work: WorkState
    now: datetime
    """Local wall-clock time (allowed hours)."""
    monotonic: float
    training: bool
    """The trainer is running now (load and memory are then its own)."""


class SchedulerPolicy(_Frozen):
    """The ``[scheduler]`` config with the board profile's defaults filled in."""

    config: SchedulerConfig
    max_temperature_c: float = Field(gt=0, le=150)

    @classmethod
    def from_config(cls, config: SchedulerConfig, profile: BoardProfile) -> SchedulerPolicy:
        limit = config.max_temperature_c if config.max_temperature_c is not None else profile.thermal.soft_c
        if limit > profile.thermal.hard_c:
            raise ConfigError(
                f"scheduler.max_temperature_c: {limit} C is above {profile.title}'s hard limit "
                f"({profile.thermal.hard_c} C)"
            )
        return cls(config=config, max_temperature_c=limit)


@dataclass(frozen=True)
class RuleContext:
    inputs: Inputs
    policy: SchedulerPolicy
    state: SchedulerState
    """The state after this evaluation's latch update."""


Rule = Callable[[RuleContext], Check]


def _fmt_c(value: float) -> str:
    return f"{value:.1f} °C"


def rule_enabled(ctx: RuleContext) -> Check:
    if ctx.policy.config.enabled:
        return Check(rule=RuleName.ENABLED, ok=True, reason="enabled")
    return Check(rule=RuleName.ENABLED, ok=False, reason="disabled in the config (scheduler.enabled = false)")


def rule_power(ctx: RuleContext) -> Check:
    cfg = ctx.policy.config
    power = ctx.inputs.snapshot.power
    name = RuleName.POWER
    if not cfg.require_mains:
        return Check(rule=name, ok=True, reason="not checked (scheduler.require_mains = false)")
    percent = power.battery_percent
    if power.source is PowerSource.BATTERY:
        level = f" ({percent:.0f}%)" if percent is not None else ""
        return Check(rule=name, ok=False, reason=f"running on battery{level}")
    if power.source is PowerSource.UNKNOWN:
        return Check(rule=name, ok=False, reason="the power source is unknown")
    if not power.has_battery:
        return Check(rule=name, ok=True, reason="on mains (no battery)")
    if percent is None:
        return Check(rule=name, ok=False, reason="on the charger, but the battery level is unknown")
    if percent < cfg.min_battery_percent:
        return Check(
            rule=name,
            ok=False,
            reason=f"on the charger, battery at {percent:.0f}% (needs {cfg.min_battery_percent:.0f}%)",
        )
    return Check(rule=name, ok=True, reason=f"on the charger, battery at {percent:.0f}%")


def rule_under_voltage(ctx: RuleContext) -> Check:
    name = RuleName.UNDER_VOLTAGE
    if not ctx.policy.config.block_on_under_voltage:
        return Check(rule=name, ok=True, reason="not checked (scheduler.block_on_under_voltage = false)")
    power = ctx.inputs.snapshot.power
    throttling = power.throttling
    bits = f" (get_throttled {throttling.raw:#x})" if throttling is not None else ""
    if power.under_voltage_now:
        return Check(
            rule=name, ok=False, reason=f"the supply is under-voltage now{bits}: use a stronger supply"
        )
    if power.over_current_now:
        rails = ", ".join(r.label for r in power.rails if r.over_current)
        return Check(rule=name, ok=False, reason=f"over-current alarm on {rails}")
    if power.under_voltage_now is None:
        return Check(rule=name, ok=True, reason="no under-voltage signal on this machine (unknown)")
    since = (
        " (but under-voltage has occurred since boot)"
        if throttling is not None and throttling.has(ThrottleBit.UNDER_VOLTAGE_SINCE_BOOT)
        else ""
    )
    return Check(rule=name, ok=True, reason=f"supply voltage good{since}")


def rule_temperature(ctx: RuleContext) -> Check:
    name = RuleName.TEMPERATURE
    cfg = ctx.policy.config
    limit = ctx.policy.max_temperature_c
    temps = ctx.inputs.snapshot.temperature
    hottest = temps.hottest
    if hottest is None or hottest.celsius is None:
        if cfg.block_on_unknown_temperature:
            return Check(rule=name, ok=False, reason="no thermal zone gives a temperature")
        return Check(rule=name, ok=True, reason="no thermal zone gives a temperature (unknown; not required)")
    where = f"{_fmt_c(hottest.celsius)} at {hottest.type or hottest.zone}"
    if ctx.state.too_hot:
        resume = limit - cfg.temperature_hysteresis_c
        return Check(
            rule=name,
            ok=False,
            reason=f"{where}: stopped at {_fmt_c(limit)}, resumes below {_fmt_c(resume)}",
        )
    return Check(rule=name, ok=True, reason=f"{where} (limit {_fmt_c(limit)})")


def rule_idle(ctx: RuleContext) -> Check:
    name = RuleName.IDLE
    activity = ctx.inputs.activity
    need_s = ctx.policy.config.idle_minutes * 60.0
    if activity.active_requests:
        return Check(rule=name, ok=False, reason=f"{activity.active_requests} chat request(s) in progress")
    if activity.idle_s < need_s:
        what = "since the last chat" if activity.ever_active else "since the daemon started"
        return Check(
            rule=name,
            ok=False,
            reason=f"{activity.idle_s / 60:.1f} min {what}; needs {need_s / 60:g} min without chat",
        )
    return Check(rule=name, ok=True, reason=f"no chat for {activity.idle_s / 60:.1f} min")


def rule_load(ctx: RuleContext) -> Check:
    name = RuleName.LOAD
    limit = ctx.policy.config.max_load_per_cpu
    if limit is None:
        return Check(rule=name, ok=True, reason="not checked (scheduler.max_load_per_cpu unset)")
    if ctx.inputs.training:
        return Check(rule=name, ok=True, reason="not checked while training (the load is the trainer's)")
    load = ctx.inputs.snapshot.system.load_per_cpu
    if load is None:
        return Check(rule=name, ok=False, reason="the load average is unknown")
    if load >= limit:
        return Check(rule=name, ok=False, reason=f"load {load:.2f} per CPU (needs below {limit:g})")
    return Check(rule=name, ok=True, reason=f"load {load:.2f} per CPU")


def rule_memory(ctx: RuleContext) -> Check:
    name = RuleName.MEMORY
    need = ctx.policy.config.min_available_memory_mb
    if need is None:
        return Check(rule=name, ok=True, reason="not checked (scheduler.min_available_memory_mb unset)")
    if ctx.inputs.training:
        return Check(rule=name, ok=True, reason="not checked while training")
    available = ctx.inputs.snapshot.system.memory_available_mb
    if available is None:
        return Check(rule=name, ok=False, reason="available memory is unknown")
    if available < need:
        return Check(rule=name, ok=False, reason=f"{available} MB available (needs {need} MB)")
    return Check(rule=name, ok=True, reason=f"{available} MB available")


def parse_window(window: str) -> tuple[int, int]:
    """``"22:00-06:00"`` -> (start, end) in minutes of the day; end may be 1440 (``24:00``)."""
    found = _WINDOW_RE.fullmatch(window)
    if found is None:
        raise ValueError(f"not an hour window: {window!r}")
    h1, m1, h2, m2 = (int(g) for g in found.groups())
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(window: str, when: datetime) -> bool:
    start, end = parse_window(window)
    minute = when.hour * 60 + when.minute
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # crosses midnight


def rule_hours(ctx: RuleContext) -> Check:
    name = RuleName.HOURS
    windows = ctx.policy.config.allowed_hours
    if not windows:
        return Check(rule=name, ok=True, reason="any time")
    now = ctx.inputs.now
    listed = ", ".join(windows)
    if any(in_window(w, now) for w in windows):
        return Check(rule=name, ok=True, reason=f"{now:%H:%M} is inside {listed}")
    return Check(rule=name, ok=False, reason=f"{now:%H:%M} is outside the allowed hours {listed}")


def rule_privacy_budget(ctx: RuleContext) -> Check:
    name = RuleName.PRIVACY_BUDGET
    left = ctx.inputs.work.privacy_budget_left
    floor = ctx.policy.config.min_privacy_budget
    if left is None:
        return Check(rule=name, ok=False, reason="the privacy budget is unknown (ledger unreadable)")
    if left <= floor:
        return Check(rule=name, ok=False, reason=f"privacy budget spent (epsilon left {left:.3g})")
    return Check(rule=name, ok=True, reason=f"epsilon left {left:.3g}")


def rule_work(ctx: RuleContext) -> Check:
    work = ctx.inputs.work
    due = [
        what
        for what, flag in (
            ("a federated round", work.round_pending),
            ("a personal run", work.personal_run_due),
        )
        if flag
    ]
    if not due:
        return Check(
            rule=RuleName.WORK, ok=False, reason="nothing to train (no round pending, no personal run due)"
        )
    return Check(rule=RuleName.WORK, ok=True, reason=" and ".join(due) + " due")


def rule_backoff(ctx: RuleContext) -> Check:
    name = RuleName.BACKOFF
    backoff = ctx.policy.config.restart_backoff_s
    since = ctx.state.preempted_at
    if ctx.inputs.training or since is None or backoff <= 0:
        return Check(rule=name, ok=True, reason="no recent pre-emption")
    waited = ctx.inputs.monotonic - since
    if waited < backoff:
        return Check(
            rule=name,
            ok=False,
            reason=f"pre-empted {waited:.0f} s ago; waits {backoff:.0f} s before restarting",
        )
    return Check(rule=name, ok=True, reason=f"last pre-emption {waited:.0f} s ago")


RULES: dict[RuleName, Rule] = {
    RuleName.ENABLED: rule_enabled,
    RuleName.POWER: rule_power,
    RuleName.UNDER_VOLTAGE: rule_under_voltage,
    RuleName.TEMPERATURE: rule_temperature,
    RuleName.IDLE: rule_idle,
    RuleName.LOAD: rule_load,
    RuleName.MEMORY: rule_memory,
    RuleName.HOURS: rule_hours,
    RuleName.PRIVACY_BUDGET: rule_privacy_budget,
    RuleName.WORK: rule_work,
    RuleName.BACKOFF: rule_backoff,
}


def thermal_latch(*, celsius: float | None, limit: float, hysteresis: float, previous: bool) -> bool:
    """The hysteresis latch: trips at ``limit``, clears below ``limit - hysteresis``; unknown keeps it."""
    if celsius is None:
        return previous
    if celsius >= limit:
        return True
    if celsius < limit - hysteresis:
        return False
    return previous


def evaluate(
    inputs: Inputs, *, policy: SchedulerPolicy, state: SchedulerState
) -> tuple[Verdict, SchedulerState]:
    """Every rule over ``inputs``; returns the verdict and the next state. Pure."""
    latch = thermal_latch(
        celsius=inputs.snapshot.temperature.max_c,
        limit=policy.max_temperature_c,
        hysteresis=policy.config.temperature_hysteresis_c,
        previous=state.too_hot,
    )
    next_state = state.model_copy(update={"too_hot": latch})
    ctx = RuleContext(inputs=inputs, policy=policy, state=next_state)
    checks = tuple(rule(ctx) for rule in RULES.values())
    verdict = Verdict(allowed=all(c.ok for c in checks), checks=checks, at=inputs.now)
    return verdict, next_state


class TrainerControl(Protocol):
    """The trainer process, as the scheduler sees it (implemented by the training side).

    ``start()`` must return once the process is launched, not when it is ready; ``preempt()`` asks
    it to stop at the next step boundary (it checkpoints and resumes later) and returns promptly.
    """

    @property
    def is_running(self) -> bool: ...

    async def start(self) -> None: ...

    async def preempt(self) -> None: ...


class WorkSource(Protocol):
    def work_state(self) -> WorkState: ...


class SnapshotSource(Protocol):
    def snapshot(self) -> SensorSnapshot: ...


class TrainingScheduler:
    """Polls the rules on ``clock``; starts and pre-empts the trainer."""

    def __init__(
        self,
        *,
        policy: SchedulerPolicy,
        sensors: SnapshotSource,
        work: WorkSource,
        trainer: TrainerControl,
        clock: Clock,
        activity: ActivityTracker | None = None,
    ) -> None:
        self._policy = policy
        self._sensors = sensors
        self._work = work
        self._trainer = trainer
        self._clock = clock
        self.activity = activity if activity is not None else ActivityTracker(monotonic=clock.monotonic)
        self._state = SchedulerState()
        self._wake = asyncio.Event()
        self._last: Verdict | None = None

    @property
    def state(self) -> SchedulerState:
        return self._state

    @property
    def last_verdict(self) -> Verdict | None:
        """The verdict of the latest poll (what ``agent status`` shows)."""
        return self._last

    def notify_chat_activity(self) -> None:
        """A chat request arrived: the trainer, if running, is pre-empted in this loop turn."""
        self.activity.notify()
        self._wake.set()

    @contextlib.contextmanager
    def chat_request(self) -> Iterator[None]:
        """Wraps a request from arrival to the end of its reply (training stays blocked meanwhile)."""
        with self.activity.request():
            self._wake.set()
            yield

    def check(self, work: WorkState | None = None) -> Verdict:
        """The rules now, without acting or changing state (e.g. before accepting a fleet round)."""
        verdict, _ = evaluate(self._inputs(work), policy=self._policy, state=self._state)
        return verdict

    def _inputs(self, work: WorkState | None = None) -> Inputs:
        return Inputs(
            snapshot=self._sensors.snapshot(),
            activity=self.activity.read_activity(),
            work=work if work is not None else self._work.work_state(),
            now=self._clock.now(),
            monotonic=self._clock.monotonic(),
            training=self._trainer.is_running,
        )

    async def step(self) -> Verdict:
        """One evaluation, and the start or pre-emption it calls for."""
        verdict, self._state = evaluate(self._inputs(), policy=self._policy, state=self._state)
        self._last = verdict
        running = self._trainer.is_running
        if running and not verdict.allowed:
            log.info("pre-empting training: %s", verdict.explain())
            self._state = self._state.model_copy(update={"preempted_at": self._clock.monotonic()})
            await self._trainer.preempt()
        elif not running and verdict.allowed:
            log.info("starting training")
            await self._trainer.start()
        return verdict

    async def run(self) -> None:
        """Poll forever (cancel to stop); a chat notification cuts the wait short."""
        while True:
            self._wake.clear()
            await self.step()
            await self._wait(self._policy.config.poll_interval_s)

    async def _wait(self, seconds: float) -> None:
        if self._wake.is_set():
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
