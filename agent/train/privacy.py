"""Privacy presets and the accountant maths: pure functions, no files, no clocks.

A *budget* is an explicit (ε, δ) over a rolling period (for example 30 days). Every DP-SGD run is a
Poisson-subsampled Gaussian mechanism described by ``(noise_multiplier, sample_rate, steps)``; the
spend of a set of runs is their *composition* computed by opacus's accountants over that history:

- PRV (numerical composition of privacy loss random variables, Gopi et al. 2021; opacus returns its
  guaranteed upper bound) and
- RDP (Rényi DP, Mironov 2017),

both sound upper bounds on ε at the budget's δ for the same mechanism, so the smaller of the two is
sound too; it is what :func:`composed_epsilon` reports. Either is much tighter than the naive sum of
each run's own ε (basic composition).

The file state (the ledger) lives in :mod:`agent.train.ledger`; this module only computes. opacus
(and so torch) is imported lazily, inside the functions, so that reading presets and models costs
nothing.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import BudgetExceeded, PrivacyError

SECONDS_PER_DAY = 86400.0
# The largest noise multiplier the planner will pick; above it a run learns nothing (docs/privacy.md).
MAX_NOISE_MULTIPLIER = 1.0e4
MIN_NOISE_MULTIPLIER = 0.05
# A run is refused when the budget left is below this share of a normal run's (it would learn nothing).
MIN_RUN_SHARE = 0.1
# opacus's default resolution of the PRV accountant.
DEFAULT_PRV_EPS_ERROR = 0.01
# The planner leaves at most this fraction of a run's target ε unspent.
EPS_REL_TOLERANCE = 0.01


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PrivacyPreset(str, Enum):
    """The named budgets the product offers, from the least to the most private."""

    MINIMAL = "minimal"
    MODERATE = "moderate"
    HIGH = "high"
    MAXIMUM = "maximum"


class Accountant(str, Enum):
    """An opacus accountant, by its opacus name."""

    PRV = "prv"
    RDP = "rdp"


class Budget(_Frozen):
    """A device's privacy budget: at most ``epsilon`` at ``delta`` over any window of ``period_days``."""

    epsilon: float = Field(gt=0.0, le=100.0)
    delta: float = Field(gt=0.0, lt=1.0e-2)
    period_days: float = Field(gt=0.0, le=3650.0)
    preset: PrivacyPreset | None = None
    """The preset it came from; ``None`` when set by hand."""

    @property
    def period_s(self) -> float:
        return self.period_days * SECONDS_PER_DAY


PRESETS: dict[PrivacyPreset, Budget] = {
    PrivacyPreset.MINIMAL: Budget(epsilon=8.0, delta=1e-5, period_days=30.0, preset=PrivacyPreset.MINIMAL),
    PrivacyPreset.MODERATE: Budget(epsilon=3.0, delta=1e-5, period_days=30.0, preset=PrivacyPreset.MODERATE),
    PrivacyPreset.HIGH: Budget(epsilon=1.0, delta=1e-5, period_days=30.0, preset=PrivacyPreset.HIGH),
    PrivacyPreset.MAXIMUM: Budget(epsilon=0.01, delta=1e-5, period_days=30.0, preset=PrivacyPreset.MAXIMUM),
}
"""Each preset's budget; docs/privacy.md says what each one means and what utility to expect."""


class Mechanism(_Frozen):
    """One run's DP-SGD mechanism, as opacus's accountants take it: ``steps`` Poisson-subsampled
    Gaussian steps at ``sample_rate`` with ``noise_multiplier``."""

    noise_multiplier: float = Field(gt=0.0, le=MAX_NOISE_MULTIPLIER)
    sample_rate: float = Field(gt=0.0, le=1.0)
    steps: int = Field(ge=1, le=10_000_000)

    def as_history(self) -> tuple[float, float, int]:
        """The ``(noise_multiplier, sample_rate, steps)`` triple of an opacus accountant's history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


class Spend(_Frozen):
    """ε of a composition at a δ, with the accountant that gave the (smallest, sound) value."""

    epsilon: float = Field(ge=0.0)
    delta: float
    accountant: Accountant | None
    """``None`` for an empty composition (ε = 0)."""
    by_accountant: dict[Accountant, float]
    """Each accountant's own value (an accountant that could not compute one is absent)."""


class RunPlan(_Frozen):
    """What a run will do and what it costs, decided before it starts."""

    mechanism: Mechanism
    delta: float
    run_epsilon: float
    """The run alone, at ``delta``."""
    period_epsilon_after: float
    """The composition of this run with the runs already in the period, at ``delta``."""
    target_epsilon_after: float
    """What the planner aimed the composition at (≤ the budget)."""
    accountant: Accountant | None

    @model_validator(mode="after")
    def _check(self) -> RunPlan:
        if self.period_epsilon_after < 0 or self.run_epsilon < 0:
            raise ValueError("epsilon must be >= 0")
        return self


@functools.lru_cache(maxsize=4096)
def _accountant_epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, which: Accountant, eps_error: float
) -> float:
    """Memoized: the accountants are slow (PRV up to seconds) and the same histories recur."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = PRVAccountant() if which is Accountant.PRV else RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        # RDP warns when its best order is the largest one; the value stays a sound upper bound.
        warnings.simplefilter("ignore", UserWarning)
        if which is Accountant.PRV:
            eps = float(accountant.get_epsilon(delta=delta, eps_error=eps_error))
        else:
            eps = float(accountant.get_epsilon(delta=delta))
    if not math.isfinite(eps) or eps < 0:
        raise ArithmeticError(f"{which.value} accountant gave epsilon={eps}")
    return eps


def prv_eps_error(budget_epsilon: float) -> float:
    """The PRV accountant's ε resolution for a budget: its upper bound is about this much above its
    estimate, so it must be small beside the budget (opacus's default 0.01 cannot certify ε < 0.01)."""
    return min(DEFAULT_PRV_EPS_ERROR, budget_epsilon / 100.0)


def accountant_epsilon(
    mechanisms: Sequence[Mechanism],
    *,
    delta: float,
    accountant: Accountant,
    eps_error: float = DEFAULT_PRV_EPS_ERROR,
) -> float:
    """One opacus accountant's ε for the composition of ``mechanisms`` at ``delta`` (0 when empty);
    ``eps_error`` is PRV's resolution (ignored by RDP)."""
    if not mechanisms:
        return 0.0
    return _accountant_epsilon(tuple(m.as_history() for m in mechanisms), delta, accountant, eps_error)


def composed_epsilon(
    mechanisms: Sequence[Mechanism],
    *,
    delta: float,
    accountants: Sequence[Accountant] = (Accountant.PRV, Accountant.RDP),
    eps_error: float = DEFAULT_PRV_EPS_ERROR,
) -> Spend:
    """ε of the composition of ``mechanisms`` at ``delta``: the smallest sound value among
    ``accountants``. An accountant that fails numerically (PRV's domain at extreme parameters,
    RDP's orders) is skipped; if all fail, :class:`PrivacyError`."""
    if not accountants:
        raise ValueError("at least one accountant is needed")
    if not mechanisms:
        return Spend(epsilon=0.0, delta=delta, accountant=None, by_accountant={})
    history = tuple(m.as_history() for m in mechanisms)
    values: dict[Accountant, float] = {}
    errors: list[str] = []
    for which in accountants:
        try:
            values[which] = _accountant_epsilon(history, delta, which, eps_error)
        except (ArithmeticError, ValueError, RuntimeError) as exc:
            errors.append(f"{which.value}: {exc}")
    if not values:
        raise PrivacyError("no accountant could compute epsilon: " + "; ".join(errors))
    best = min(values, key=lambda k: values[k])
    return Spend(epsilon=values[best], delta=delta, accountant=best, by_accountant=values)


def spend_under(
    budget: Budget,
    mechanisms: Sequence[Mechanism],
    *,
    accountants: Sequence[Accountant] = (Accountant.PRV, Accountant.RDP),
) -> Spend:
    """The composition of ``mechanisms`` measured the way ``budget`` is: at its δ, with PRV's
    resolution scaled to its ε (:func:`prv_eps_error`)."""
    return composed_epsilon(
        mechanisms, delta=budget.delta, accountants=accountants, eps_error=prv_eps_error(budget.epsilon)
    )


def in_window(times: Sequence[float], *, now: float, period_s: float) -> list[int]:
    """Indices of the events at ``times`` inside the rolling window ``(now - period_s, now]``.

    Future times (a clock that went back) count as inside: an upper bound is safe."""
    start = now - period_s
    return [i for i, t in enumerate(times) if t > start]


def check_delta(*, delta: float, n_examples: int) -> None:
    """δ must be below 1/n, or DP could be met by leaking a whole example."""
    if n_examples <= 0:
        raise PrivacyError("no training examples")
    if delta >= 1.0 / n_examples:
        raise PrivacyError(
            f"delta={delta:g} is not below 1/n = 1/{n_examples}: choose a smaller delta or fewer examples"
        )


def sample_rate_for(*, batch_size: int, n_examples: int) -> float:
    """Poisson sampling rate giving ``batch_size`` examples per step in expectation."""
    if n_examples <= 0 or batch_size <= 0:
        raise ValueError("batch_size and n_examples must be positive")
    return min(1.0, batch_size / n_examples)


def steps_for(*, epochs: float, sample_rate: float, max_steps: int | None = None) -> int:
    """Steps for ``epochs`` passes in expectation at ``sample_rate``, capped at ``max_steps``."""
    steps = max(1, math.ceil(epochs / sample_rate))
    if max_steps is not None:
        steps = min(steps, max_steps)
    return steps


def _solve_sigma(eps_of: Callable[[float], float], target: float, *, start: float, factor: float) -> float:
    """The smallest noise multiplier σ (to within :data:`EPS_REL_TOLERANCE` of the target's ε) with
    ``eps_of(σ) ≤ target``; ``eps_of`` is non-increasing in σ.

    Brackets from ``start`` in steps of ``factor``, then runs the Illinois variant of regula falsi on
    log ε against log σ (smooth there, so a handful of accountant calls). The returned σ was checked
    to meet the target."""

    def f(log_sigma: float) -> float:
        return math.log(max(eps_of(math.exp(log_sigma)), 1e-300)) - math.log(target)

    x = math.log(start)
    fx = f(x)
    step = math.log(factor)
    if fx > 0:  # too little noise: go up until it meets the target
        lo, f_lo = x, fx
        while True:
            x += step
            if x > math.log(MAX_NOISE_MULTIPLIER):
                raise BudgetExceeded(
                    f"the privacy budget left (target epsilon {target:.4g}) is too small for any useful "
                    f"noise level (it would need noise multiplier > {MAX_NOISE_MULTIPLIER:g})"
                )
            fx = f(x)
            if fx <= 0:
                hi, f_hi = x, fx
                break
            lo, f_lo = x, fx
    else:  # enough noise: go down until it no longer meets the target
        hi, f_hi = x, fx
        while True:
            x -= step
            if x < math.log(MIN_NOISE_MULTIPLIER):
                return math.exp(hi)
            fx = f(x)
            if fx > 0:
                lo, f_lo = x, fx
                break
            hi, f_hi = x, fx
    side = 0
    for _ in range(60):
        if f_hi >= math.log1p(-EPS_REL_TOLERANCE) or hi - lo < 1e-6:
            break
        x = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        if not lo < x < hi:
            x = (lo + hi) / 2.0
        fx = f(x)
        if fx <= 0:
            hi, f_hi = x, fx
            if side == -1:
                f_lo /= 2.0
            side = -1
        else:
            lo, f_lo = x, fx
            if side == 1:
                f_hi /= 2.0
            side = 1
    return math.exp(hi)


def plan_run(
    *,
    budget: Budget,
    history: Sequence[Mechanism],
    sample_rate: float,
    steps: int,
    run_fraction: float,
    accountants: Sequence[Accountant] = (Accountant.PRV, Accountant.RDP),
    run_epsilon_cap: float | None = None,
) -> RunPlan:
    """Choose the noise multiplier of a run of ``steps`` at ``sample_rate``.

    ``history`` holds the runs already charged in the current period. The run is aimed so that the
    composition reaches ``min(budget, spent + run_fraction * budget)``: each run spends about that
    share of the budget; with ``run_epsilon_cap`` (a fleet round's per-round ε), the run alone also
    stays within it. Raises :class:`BudgetExceeded` (saying why) when nothing can be spent.
    """
    if not 0.0 < run_fraction <= 1.0:
        raise ValueError("run_fraction must be in (0, 1]")
    spent = spend_under(budget, history, accountants=accountants).epsilon
    if spent >= budget.epsilon:
        raise BudgetExceeded(
            f"privacy budget spent: epsilon {spent:.4g} of {budget.epsilon:g} used in the last "
            f"{budget.period_days:g} days; no training until older runs leave the window"
        )
    target = min(budget.epsilon, spent + run_fraction * budget.epsilon)
    if target - spent < MIN_RUN_SHARE * run_fraction * budget.epsilon:
        raise BudgetExceeded(
            f"privacy budget nearly spent: epsilon {spent:.4g} of {budget.epsilon:g} used in the last "
            f"{budget.period_days:g} days; what is left would buy too much noise to learn anything"
        )

    def eps_after(sigma: float, using: Sequence[Accountant]) -> float:
        run = Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return spend_under(budget, [*history, run], accountants=using).epsilon

    # Bracket with the fast RDP accountant first (its ε is >= the min over accountants, so its σ
    # meets the target), then refine with all of them.
    start, factor = 1.0, 2.0
    if Accountant.RDP in accountants and len(accountants) > 1:
        try:
            start = _solve_sigma(lambda s: eps_after(s, (Accountant.RDP,)), target, start=1.0, factor=2.0)
            factor = 1.15
        except PrivacyError:
            start = 1.0
    sigma = _solve_sigma(lambda s: eps_after(s, accountants), target, start=start, factor=factor)
    if run_epsilon_cap is not None:
        alone_at = spend_under(
            budget,
            [Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)],
            accountants=accountants,
        )
        if alone_at.epsilon > run_epsilon_cap:

            def eps_alone(s: float) -> float:
                run = Mechanism(noise_multiplier=s, sample_rate=sample_rate, steps=steps)
                return spend_under(budget, [run], accountants=accountants).epsilon

            sigma = max(sigma, _solve_sigma(eps_alone, run_epsilon_cap, start=sigma, factor=1.5))
    mechanism = Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
    after = spend_under(budget, [*history, mechanism], accountants=accountants)
    if after.epsilon > budget.epsilon:  # pragma: no cover - guarded by the bisection
        raise BudgetExceeded(f"planned run would spend epsilon {after.epsilon:.4g} > {budget.epsilon:g}")
    alone = spend_under(budget, [mechanism], accountants=accountants)
    return RunPlan(
        mechanism=mechanism,
        delta=budget.delta,
        run_epsilon=alone.epsilon,
        period_epsilon_after=after.epsilon,
        target_epsilon_after=target,
        accountant=after.accountant,
    )
