"""The privacy ledger: durable charges before training, refusals, and no overspending under any
sequence of runs and crashes (hypothesis)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import BudgetExceeded, PrivacyError
from agent.train.kinds import AdapterKind, RunStatus
from agent.train.ledger import (
    EgressRecord,
    LedgerState,
    PrivacyLedger,
    charge_state,
    finish_state,
    historic_window_spend,
    new_run_id,
    stored_spend_bound,
    window_runs,
    window_spend,
)
from agent.train.privacy import Accountant, Budget, Mechanism, RunPlan, plan_run, spend_under

RDP = (Accountant.RDP,)  # the fast accountant, for the many compositions of the property tests
BUDGET = Budget(epsilon=2.0, delta=1e-5, period_days=30.0)
DAY = 86400.0


def fixed_plan(mechanism: Mechanism, budget: Budget = BUDGET) -> RunPlan:
    """A planner that ignores the history: whatever it asks, the ledger must check."""
    alone = spend_under(budget, [mechanism], accountants=RDP).epsilon
    return RunPlan(
        mechanism=mechanism,
        delta=budget.delta,
        run_epsilon=alone,
        period_epsilon_after=alone,
        target_epsilon_after=alone,
        accountant=Accountant.RDP,
    )


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_charge_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = PrivacyLedger(tmp_path / "privacy" / "ledger.json", clock=clock)
    assert ledger.read() == LedgerState()
    mech = Mechanism(noise_multiplier=2.0, sample_rate=0.1, steps=20)
    run = ledger.charge(
        budget=BUDGET, plan=lambda h: fixed_plan(mech), adapter=AdapterKind.PERSONAL, accountants=RDP
    )
    on_disk = json.loads((tmp_path / "privacy" / "ledger.json").read_text())
    assert on_disk["runs"][0]["run_id"] == run.run_id
    assert on_disk["runs"][0]["status"] == "charged"
    assert on_disk["runs"][0]["mechanism"] == {"noise_multiplier": 2.0, "sample_rate": 0.1, "steps": 20}
    assert on_disk["egress"] == []
    assert os.stat(tmp_path / "privacy" / "ledger.json").st_mode & 0o777 == 0o600
    assert run.epsilon_period_after == spend_under(BUDGET, [mech], accountants=RDP).epsilon

    ledger.finish(run.run_id, status=RunStatus.STOPPED, steps_done=7)
    stopped = ledger.run(run.run_id)
    assert stopped is not None and stopped.status is RunStatus.STOPPED and stopped.steps_done == 7
    # The charge is for the planned steps, not the ones done.
    assert stopped.mechanism.steps == 20
    with pytest.raises(PrivacyError, match="more than"):
        ledger.finish(run.run_id, status=RunStatus.COMPLETED, steps_done=21)


def test_a_run_over_budget_does_not_start_and_says_why(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", clock=FakeClock())
    greedy = Mechanism(noise_multiplier=0.6, sample_rate=0.5, steps=200)
    with pytest.raises(BudgetExceeded, match=r"over the budget of 2"):
        ledger.charge(
            budget=BUDGET, plan=lambda h: fixed_plan(greedy), adapter=AdapterKind.FLEET, accountants=RDP
        )
    assert ledger.read().runs == ()
    assert not (tmp_path / "ledger.json").exists()


def test_the_window_rolls(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = PrivacyLedger(tmp_path / "ledger.json", clock=clock)
    mech = Mechanism(noise_multiplier=2.0, sample_rate=0.1, steps=40)  # about 1.7 of the 2.0
    ledger.charge(
        budget=BUDGET, plan=lambda h: fixed_plan(mech), adapter=AdapterKind.PERSONAL, accountants=RDP
    )
    with pytest.raises(BudgetExceeded):
        ledger.charge(
            budget=BUDGET, plan=lambda h: fixed_plan(mech), adapter=AdapterKind.PERSONAL, accountants=RDP
        )
    clock.now += 30 * DAY + 1
    ledger.charge(
        budget=BUDGET, plan=lambda h: fixed_plan(mech), adapter=AdapterKind.PERSONAL, accountants=RDP
    )
    state = ledger.read()
    assert len(state.runs) == 2
    assert len(window_runs(state, budget=BUDGET, now=clock.now)) == 1


def test_a_corrupt_ledger_is_an_error_not_an_empty_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "runs": [{"run_id": "nope"}]}')
    ledger = PrivacyLedger(path)
    with pytest.raises(PrivacyError, match="corrupt"):
        ledger.read()
    mech = Mechanism(noise_multiplier=2.0, sample_rate=0.1, steps=5)
    with pytest.raises(PrivacyError):
        ledger.charge(
            budget=BUDGET, plan=lambda h: fixed_plan(mech), adapter=AdapterKind.PERSONAL, accountants=RDP
        )


def test_egress_is_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", clock=FakeClock())
    ledger.record_egress(
        EgressRecord(at=1.0, round_id=3, bytes=2048, norm_bound=1.0, epsilon=0.5, delta=1e-5)
    )
    report = ledger.report(budget=BUDGET, accountants=RDP)
    assert report.spent.epsilon == 0.0
    assert report.remaining == BUDGET.epsilon
    assert [e.round_id for e in report.egress] == [3]


def test_real_planner_through_the_ledger(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = PrivacyLedger(tmp_path / "ledger.json", clock=clock)

    def planner(history: Sequence[Mechanism]) -> RunPlan:
        return plan_run(
            budget=BUDGET, history=history, sample_rate=0.1, steps=20, run_fraction=0.5, accountants=RDP
        )

    first = ledger.charge(budget=BUDGET, plan=planner, adapter=AdapterKind.PERSONAL, accountants=RDP)
    second = ledger.charge(budget=BUDGET, plan=planner, adapter=AdapterKind.FLEET, accountants=RDP)
    assert first.epsilon_period_after <= 1.0 <= second.epsilon_period_after <= 2.0
    with pytest.raises(BudgetExceeded):
        ledger.charge(budget=BUDGET, plan=planner, adapter=AdapterKind.PERSONAL, accountants=RDP)
    report = ledger.report(budget=BUDGET, accountants=RDP)
    assert report.spent.epsilon == pytest.approx(second.epsilon_period_after)


# -- the property: no sequence of runs and crashes overspends -----------------------------------------

mechanisms = st.builds(
    Mechanism,
    noise_multiplier=st.sampled_from([0.7, 1.0, 1.5, 3.0, 8.0]),
    sample_rate=st.sampled_from([0.05, 0.1, 0.25]),
    steps=st.sampled_from([5, 20, 80]),
)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("run"),
            mechanisms,
            st.sampled_from(["complete", "crash_before_charge", "crash_in_training", "stop"]),
        ),
        # Time passes, and sometimes the clock goes back (an RTC reset on a board).
        st.tuples(st.just("wait"), st.sampled_from([1.0, 10 * DAY, 31 * DAY, -20 * DAY])),
    ),
    max_size=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_no_sequence_of_runs_and_crashes_overspends(ops: list[tuple[object, ...]]) -> None:
    now = 1_700_000_000.0
    state = LedgerState()
    trained: dict[str, int] = {}  # steps actually run, per run id
    for op in ops:
        if op[0] == "wait":
            now += float(op[1])  # type: ignore[arg-type]
            continue
        _, mech, fate = op
        assert isinstance(mech, Mechanism)
        if fate == "crash_before_charge":
            continue  # the ledger write never happened: no training either (training starts after it)
        run_id = new_run_id()
        try:
            state, _ = charge_state(
                state,
                budget=BUDGET,
                plan=lambda h, m=mech: fixed_plan(m),  # type: ignore[misc]
                adapter=AdapterKind.PERSONAL,
                now=now,
                run_id=run_id,
                accountants=RDP,
            )
        except BudgetExceeded:
            continue
        done = {"complete": mech.steps, "crash_in_training": mech.steps // 2, "stop": mech.steps // 3}[
            str(fate)
        ]
        trained[run_id] = done
        if fate == "complete":
            state = finish_state(state, run_id, status=RunStatus.COMPLETED, steps_done=done, now=now)
        elif fate == "stop":
            state = finish_state(state, run_id, status=RunStatus.STOPPED, steps_done=done, now=now)
        # Every window (checking at each charge time covers them all) is within the budget ...
        for r in state.runs:
            assert (
                historic_window_spend(state, budget=BUDGET, end=r.charged_at, accountants=RDP).epsilon
                <= BUDGET.epsilon
            )
        # ... the daemon's cheap bound (no accountant) is never below the real spend ...
        bound = stored_spend_bound(state, budget=BUDGET, now=now)
        if bound is not None:
            assert bound >= window_spend(state, budget=BUDGET, now=now, accountants=RDP).epsilon
        # ... and the ledger never shows less than was trained.
        for r in state.runs:
            assert r.mechanism.steps >= trained.get(r.run_id, 0)
