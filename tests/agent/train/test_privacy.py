"""The accountant maths (agent/train/privacy.py) against opacus's own accountants."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from agent.errors import BudgetExceeded, PrivacyError
from agent.train.privacy import (
    PRESETS,
    Accountant,
    Budget,
    Mechanism,
    PrivacyPreset,
    check_delta,
    composed_epsilon,
    plan_run,
    prv_eps_error,
    sample_rate_for,
    spend_under,
    steps_for,
)

MODERATE = PRESETS[PrivacyPreset.MODERATE]


def _opacus(history: list[tuple[float, float, int]], delta: float, accountant: str, **kw: float) -> float:
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta, **kw))


def test_presets_are_explicit_and_ordered() -> None:
    eps = [PRESETS[p].epsilon for p in PrivacyPreset]
    assert eps == sorted(eps, reverse=True)  # minimal (least private) ... maximum
    assert PRESETS[PrivacyPreset.MAXIMUM].epsilon == 0.01
    for p, b in PRESETS.items():
        assert b.preset is p
        assert b.delta <= 1e-5
        assert b.period_days == 30.0


HISTORIES = [
    [(1.0, 0.05, 100)],
    [(1.1, 0.1, 40), (2.0, 0.05, 60)],
    [(4.0, 0.2, 20)],
]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("history", HISTORIES)
def test_composition_is_opacus_and_prv_cross_checks_rdp(history: list[tuple[float, float, int]]) -> None:
    mechs = [Mechanism(noise_multiplier=s, sample_rate=q, steps=n) for s, q, n in history]
    spend = composed_epsilon(mechs, delta=1e-5)
    prv = _opacus(history, 1e-5, "prv")
    rdp = _opacus(history, 1e-5, "rdp")
    assert spend.by_accountant == {Accountant.PRV: prv, Accountant.RDP: rdp}
    assert spend.epsilon == min(prv, rdp)
    # The two accountants bound the same mechanism: PRV is the tighter, but not far off RDP.
    assert prv <= rdp
    assert prv >= 0.7 * rdp


def test_composition_beats_the_naive_sum() -> None:
    runs = [Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=30)] * 4
    composed = composed_epsilon(runs, delta=1e-5).epsilon
    # Basic composition: four runs at delta/4 each sum to (sum eps, delta).
    naive = 4 * composed_epsilon(runs[:1], delta=1e-5 / 4).epsilon
    assert composed < naive


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_planned_noise_matches_opacus_get_noise_multiplier() -> None:
    plan = plan_run(
        budget=MODERATE,
        history=[],
        sample_rate=0.1,
        steps=50,
        run_fraction=1.0,
        accountants=(Accountant.PRV,),
    )
    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, steps=50, accountant="prv"
    )
    assert plan.mechanism.noise_multiplier == pytest.approx(sigma, rel=0.02)
    assert 0.98 * 3.0 <= plan.period_epsilon_after <= 3.0


def test_plan_composes_with_history_and_stays_in_budget() -> None:
    first = plan_run(budget=MODERATE, history=[], sample_rate=0.1, steps=30, run_fraction=0.5)
    assert first.period_epsilon_after <= 1.5
    second = plan_run(budget=MODERATE, history=[first.mechanism], sample_rate=0.1, steps=30, run_fraction=0.5)
    assert 0.98 * 3.0 <= second.period_epsilon_after <= 3.0
    # Composition is sub-additive here: the second run alone may spend more than the remaining 1.5.
    assert second.run_epsilon > 3.0 - first.period_epsilon_after
    with pytest.raises(BudgetExceeded, match="spent"):
        plan_run(
            budget=MODERATE,
            history=[first.mechanism, second.mechanism],
            sample_rate=0.1,
            steps=30,
            run_fraction=0.5,
        )


def test_round_cap_limits_the_run_alone() -> None:
    plan = plan_run(
        budget=MODERATE, history=[], sample_rate=0.1, steps=30, run_fraction=1.0, run_epsilon_cap=0.5
    )
    assert plan.run_epsilon <= 0.5
    assert plan.run_epsilon >= 0.45


def test_tiny_budget_uses_a_finer_prv_resolution() -> None:
    budget = PRESETS[PrivacyPreset.MAXIMUM]
    assert prv_eps_error(budget.epsilon) == pytest.approx(1e-4)
    mech = Mechanism(noise_multiplier=2000.0, sample_rate=0.1, steps=30)
    spend = spend_under(budget, [mech], accountants=(Accountant.PRV,))
    assert spend.epsilon == _opacus([mech.as_history()], 1e-5, "prv", eps_error=1e-4)
    assert spend.epsilon < 0.01


def test_delta_must_be_below_one_over_n() -> None:
    check_delta(delta=1e-5, n_examples=99_999)
    with pytest.raises(PrivacyError, match="1/n"):
        check_delta(delta=1e-5, n_examples=100_000)
    with pytest.raises(PrivacyError):
        check_delta(delta=1e-5, n_examples=0)


def test_rates_and_steps() -> None:
    assert sample_rate_for(batch_size=8, n_examples=100) == 0.08
    assert sample_rate_for(batch_size=200, n_examples=100) == 1.0
    assert steps_for(epochs=2.0, sample_rate=0.1) == 20
    assert steps_for(epochs=2.0, sample_rate=0.1, max_steps=5) == 5


def test_budget_validation() -> None:
    with pytest.raises(ValueError):
        Budget(epsilon=1.0, delta=0.5, period_days=30)
    with pytest.raises(ValueError):
        Budget(epsilon=0.0, delta=1e-5, period_days=30)
