"""The privacy ledger: a durable, per-device record of every training run's privacy charge.

One JSON file in the state directory (``<state_dir>/privacy/ledger.json``), replaced atomically and
fsynced (:func:`fleet.files.write_atomic`) under an exclusive lock, so that a crash leaves the old or
the new ledger, never a torn one, and two trainers never charge from the same stale copy.

The rules it keeps (docs/privacy.md):

1. A run is charged *before* it trains: its planned mechanism (noise multiplier, sample rate, steps)
   and δ, its own ε and the period's composed ε after it are on disk before the first step.
2. A charge is never taken back: a run stopped early, crashed or refused at export keeps it (an
   upper bound is safe). A resumed run continues its own charge and is not charged again.
3. A run whose composition with the runs of the current window would exceed the budget is refused
   with :class:`agent.errors.BudgetExceeded`, and nothing is recorded.
4. A ledger that cannot be read is an error, never an empty ledger: forgetting charges would overspend.

The ``egress`` section lists what left the device (fleet updates: round, size, norm bound, ε); the
fleet client appends to it with :meth:`PrivacyLedger.record_egress`.

The pure state transitions (:func:`charge_state`, :func:`finish_state`, :func:`window_runs`) are
separate from the file (:class:`PrivacyLedger`), so they can be property-tested.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import BudgetExceeded, PrivacyError
from agent.train.kinds import AdapterKind, RunStatus
from agent.train.privacy import (
    Accountant,
    Budget,
    Mechanism,
    PrivacyPreset,
    RunPlan,
    Spend,
    spend_under,
)
from fleet.files import write_atomic

LEDGER_VERSION = 1
MAX_LEDGER_BYTES = 64 * 1024 * 1024
DEFAULT_ACCOUNTANTS: tuple[Accountant, ...] = (Accountant.PRV, Accountant.RDP)

Clock = Callable[[], float]
Planner = Callable[[Sequence[Mechanism]], RunPlan]
"""Given the mechanisms already charged in the window, the plan of the next run."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LedgerRun(_Frozen):
    """One training run's charge."""

    run_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    adapter: AdapterKind
    charged_at: float
    """Unix time of the charge; the run's data is what was consented and in the window then."""
    mechanism: Mechanism
    delta: float = Field(gt=0.0, lt=1.0)
    epsilon_run: float = Field(ge=0.0)
    """This run alone at ``delta``."""
    epsilon_period_after: float = Field(ge=0.0)
    """The window's composition including this run, when it was charged."""
    accountant: Accountant | None
    budget: Budget
    """The budget in force when it was charged."""
    round_id: int | None = Field(default=None, ge=1)
    status: RunStatus = RunStatus.CHARGED
    steps_done: int = Field(default=0, ge=0)
    finished_at: float | None = None
    note: str | None = Field(default=None, max_length=500)


class EgressRecord(_Frozen):
    """Something that left the device: a sealed fleet update."""

    at: float
    round_id: int = Field(ge=1)
    run_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    bytes: int = Field(ge=0)
    """Size of what was sent (the sealed frame)."""
    norm_bound: float = Field(gt=0.0)
    epsilon: float = Field(ge=0.0)
    """ε of the run the update came from (already charged in ``runs``: not an extra charge)."""
    delta: float = Field(ge=0.0, lt=1.0)
    what: Literal["fleet-update"] = "fleet-update"


class LedgerState(_Frozen):
    version: Literal[1] = 1
    runs: tuple[LedgerRun, ...] = ()
    egress: tuple[EgressRecord, ...] = ()

    def run(self, run_id: str) -> LedgerRun | None:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        return None


# -- pure state transitions -------------------------------------------------------------------------


def window_runs(state: LedgerState, *, budget: Budget, now: float) -> list[LedgerRun]:
    """The runs charged inside the budget's rolling window ``(now - period, now]``.

    A run charged "in the future" (the clock went back) counts as inside: an upper bound is safe."""
    start = now - budget.period_s
    return [r for r in state.runs if r.charged_at > start]


def window_spend(
    state: LedgerState,
    *,
    budget: Budget,
    now: float,
    accountants: Sequence[Accountant] = DEFAULT_ACCOUNTANTS,
) -> Spend:
    """The composed ε of the runs in the window, measured at the budget's δ."""
    runs = window_runs(state, budget=budget, now=now)
    return spend_under(budget, [r.mechanism for r in runs], accountants=accountants)


def stored_spend_bound(state: LedgerState, *, budget: Budget, now: float) -> float | None:
    """An upper bound on the window's spend from the ledger's stored values, without an accountant
    (for the daemon, which does not import opacus); ``None`` when it cannot vouch for one.

    The last run charged among those in the window was checked against every run then in the ledger
    charged after ``its time - period``, which holds all runs in the window as long as the clock has
    not gone back since (and the δ is the same): its ``epsilon_period_after`` bounds the window."""
    runs = window_runs(state, budget=budget, now=now)
    if not runs:
        return 0.0
    last = runs[-1]  # the ledger appends: the last in the list was charged last
    if now < last.charged_at or any(r.budget.delta != budget.delta for r in runs):
        return None
    return last.epsilon_period_after


def historic_window_spend(
    state: LedgerState,
    *,
    budget: Budget,
    end: float,
    accountants: Sequence[Accountant] = DEFAULT_ACCOUNTANTS,
) -> Spend:
    """The composed ε of the runs charged in exactly ``(end - period, end]`` (auditing past windows;
    checking them at every charge time covers every window)."""
    runs = [r for r in state.runs if end - budget.period_s < r.charged_at <= end]
    return spend_under(budget, [r.mechanism for r in runs], accountants=accountants)


def new_run_id() -> str:
    return uuid.uuid4().hex


def charge_state(
    state: LedgerState,
    *,
    budget: Budget,
    plan: Planner,
    adapter: AdapterKind,
    now: float,
    run_id: str,
    round_id: int | None = None,
    accountants: Sequence[Accountant] = DEFAULT_ACCOUNTANTS,
) -> tuple[LedgerState, LedgerRun]:
    """The state with a new run charged, or :class:`BudgetExceeded` saying why not.

    The planner sees the window's mechanisms; whatever it plans, the composition is measured again
    here and must stay within the budget."""
    if state.run(run_id) is not None:
        raise PrivacyError(f"run {run_id} is already in the ledger")
    history = [r.mechanism for r in window_runs(state, budget=budget, now=now)]
    planned = plan(history)
    after = spend_under(budget, [*history, planned.mechanism], accountants=accountants)
    if after.epsilon > budget.epsilon:
        before = spend_under(budget, history, accountants=accountants)
        raise BudgetExceeded(
            f"this run would bring the privacy spend of the last {budget.period_days:g} days to "
            f"epsilon {after.epsilon:.4g}, over the budget of {budget.epsilon:g} "
            f"(already spent {before.epsilon:.4g}; delta {budget.delta:g})"
        )
    if planned.delta != budget.delta:
        raise PrivacyError(f"the plan's delta {planned.delta:g} is not the budget's {budget.delta:g}")
    run = LedgerRun(
        run_id=run_id,
        adapter=adapter,
        charged_at=now,
        mechanism=planned.mechanism,
        delta=budget.delta,
        epsilon_run=planned.run_epsilon,
        epsilon_period_after=after.epsilon,
        accountant=after.accountant,
        budget=budget,
        round_id=round_id,
    )
    return state.model_copy(update={"runs": (*state.runs, run)}), run


def finish_state(
    state: LedgerState,
    run_id: str,
    *,
    status: RunStatus,
    steps_done: int,
    now: float,
    note: str | None = None,
) -> LedgerState:
    """The state with a run's outcome noted. The charge itself never changes."""
    if status is RunStatus.CHARGED:
        raise ValueError("a finished run needs an outcome")
    runs = list(state.runs)
    for i, r in enumerate(runs):
        if r.run_id == run_id:
            if steps_done > r.mechanism.steps:
                raise PrivacyError(
                    f"run {run_id} reports {steps_done} steps, more than the {r.mechanism.steps} it was "
                    "charged for"
                )
            runs[i] = r.model_copy(
                update={
                    "status": status,
                    "steps_done": max(steps_done, r.steps_done),
                    "finished_at": now,
                    "note": None if note is None else note[:500],
                }
            )
            return state.model_copy(update={"runs": tuple(runs)})
    raise PrivacyError(f"run {run_id} is not in the ledger")


# -- the file ----------------------------------------------------------------------------------------


class PrivacyLedger:
    """The ledger file. Every change is read-modify-write under an exclusive ``flock``."""

    def __init__(self, path: Path, *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PrivacyError(f"cannot open the privacy ledger lock {self.lock_path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock (the kernel does too if we are killed)

    def read(self) -> LedgerState:
        """The ledger; an absent file is an empty ledger, an unreadable one an error."""
        try:
            with self.path.open("rb") as fh:
                raw = fh.read(MAX_LEDGER_BYTES + 1)
        except FileNotFoundError:
            return LedgerState()
        except OSError as exc:
            raise PrivacyError(f"cannot read the privacy ledger {self.path}: {exc}") from None
        if len(raw) > MAX_LEDGER_BYTES:
            raise PrivacyError(f"the privacy ledger {self.path} is larger than {MAX_LEDGER_BYTES} bytes")
        try:
            return LedgerState.model_validate_json(raw)
        except ValidationError as exc:
            raise PrivacyError(
                f"the privacy ledger {self.path} is corrupt ({exc.error_count()} errors); refusing to train "
                "rather than forget what was spent"
            ) from None

    def _write(self, state: LedgerState) -> None:
        data = state.model_dump_json(indent=1).encode("utf-8") + b"\n"
        try:
            write_atomic(self.path, data, mode=0o600)
        except OSError as exc:
            raise PrivacyError(f"cannot write the privacy ledger {self.path}: {exc}") from None

    def charge(
        self,
        *,
        budget: Budget,
        plan: Planner,
        adapter: AdapterKind,
        round_id: int | None = None,
        accountants: Sequence[Accountant] = DEFAULT_ACCOUNTANTS,
        run_id: str | None = None,
    ) -> LedgerRun:
        """Plan and charge a run durably; when this returns the charge is on disk (fsynced)."""
        with self._locked():
            state = self.read()
            new_state, run = charge_state(
                state,
                budget=budget,
                plan=plan,
                adapter=adapter,
                now=self._clock(),
                run_id=run_id or new_run_id(),
                round_id=round_id,
                accountants=accountants,
            )
            self._write(new_state)
        return run

    def finish(self, run_id: str, *, status: RunStatus, steps_done: int, note: str | None = None) -> None:
        with self._locked():
            state = finish_state(
                self.read(), run_id, status=status, steps_done=steps_done, now=self._clock(), note=note
            )
            self._write(state)

    def run(self, run_id: str) -> LedgerRun | None:
        return self.read().run(run_id)

    def spent_bound(self, *, budget: Budget) -> float | None:
        """:func:`stored_spend_bound` now: cheap, no accountant; ``None`` if unknown."""
        return stored_spend_bound(self.read(), budget=budget, now=self._clock())

    def record_egress(self, record: EgressRecord) -> None:
        """Note something that left the device (the fleet client calls this after sending)."""
        with self._locked():
            state = self.read()
            self._write(state.model_copy(update={"egress": (*state.egress, record)}))

    def report(
        self, *, budget: Budget, accountants: Sequence[Accountant] = DEFAULT_ACCOUNTANTS
    ) -> PrivacyReport:
        now = self._clock()
        state = self.read()
        runs = window_runs(state, budget=budget, now=now)
        spend = spend_under(budget, [r.mechanism for r in runs], accountants=accountants)
        return PrivacyReport(
            now=now,
            budget=budget,
            preset=budget.preset,
            window_start=now - budget.period_s,
            spent=spend,
            remaining=max(0.0, budget.epsilon - spend.epsilon),
            runs_in_window=tuple(runs),
            runs_total=len(state.runs),
            egress=state.egress,
            ledger_path=str(self.path),
        )


class PrivacyReport(_Frozen):
    """What ``agent privacy`` shows."""

    now: float
    budget: Budget
    preset: PrivacyPreset | None
    window_start: float
    spent: Spend
    remaining: float
    runs_in_window: tuple[LedgerRun, ...]
    runs_total: int
    egress: tuple[EgressRecord, ...]
    ledger_path: str
