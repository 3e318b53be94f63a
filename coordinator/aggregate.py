"""Aggregation of client updates: pure functions, no I/O, no clocks, no global state.

An update is a *delta*: a mapping from tensor name to a float32 array (a LoRA B matrix's change on one
device). A round's aggregation has two stages, each chosen from a registry keyed by an Enum:

1. **combine** (``COMBINERS``) the deltas into one pseudo-gradient with per-update weights. Today the
   weighted mean; later issues add robust rules (median, trimmed mean) and secure aggregation beside it.
2. **server optimizer** (``OPTIMIZERS``) turns the pseudo-gradient into the step added to the previous
   global tensors: FedAvg (``step = lr * delta``), FedAvgM (server momentum) or FedAdam (Reddi et al.,
   "Adaptive Federated Optimization", 2021). Optimizer state is passed in and returned explicitly
   (``ServerState.state_dict()`` / ``ServerState.from_state_dict()``), never kept here.

Weights: each update weighs its sample count times a staleness decay (an update computed against the
global model of round ``r - k`` weighs ``decay(k)``), normalised to sum to 1, then capped so that no
device carries more than ``weight_cap`` of the total, the excess redistributed proportionally over the
others (water-filling). When the cap cannot be met (``weight_cap * n < 1``) the weights are uniform,
the closest feasible point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from coordinator.errors import AggregationError, DeltaMismatch

Tensors = Mapping[str, NDArray[np.float32]]
"""Tensor name -> float32 array."""


class CombineRule(str, Enum):
    """How deltas are combined into one pseudo-gradient."""

    WEIGHTED_MEAN = "weighted_mean"


class ServerOptimizer(str, Enum):
    """How the pseudo-gradient becomes the step applied to the global tensors."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"


class StalenessDecay(str, Enum):
    """Weight multiplier for an update ``k`` rounds stale: 1, ``(1 + k) ** -a`` or ``exp(-a k)``."""

    NONE = "none"
    POLYNOMIAL = "polynomial"
    EXPONENTIAL = "exponential"


class AggregationSettings(BaseModel):
    """The aggregation rule and its hyper-parameters (a round's or the coordinator's defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    combine: CombineRule = CombineRule.WEIGHTED_MEAN
    optimizer: ServerOptimizer = ServerOptimizer.FEDAVG
    server_lr: float = Field(default=1.0, gt=0.0, le=100.0)
    """Server learning rate (eta). 1.0 with FedAvg is plain federated averaging."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """FedAvgM: server momentum (beta)."""
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0)
    tau: float = Field(default=1e-3, gt=0.0)
    """FedAdam: adaptivity (epsilon added to the root of the second moment)."""
    weight_cap: float = Field(default=0.5, gt=0.0, le=1.0)
    """The largest share of the total weight one update may carry."""
    staleness_decay: StalenessDecay = StalenessDecay.POLYNOMIAL
    staleness_exponent: float = Field(default=0.5, ge=0.0, le=10.0)


@dataclass(frozen=True)
class ClientUpdate:
    """One device's decoded delta, how many samples produced it and how stale its base model was."""

    delta: Tensors
    num_samples: int
    staleness: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise AggregationError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.staleness < 0:
            raise AggregationError(f"staleness must be >= 0, got {self.staleness}")


@dataclass(frozen=True)
class ServerState:
    """The server optimizer's state: its kind, the step count and named slots of tensors.

    FedAvg has no slots, FedAvgM has ``momentum``, FedAdam ``m`` and ``v``.
    """

    optimizer: ServerOptimizer
    step: int = 0
    slots: Mapping[str, Tensors] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.value,
            "step": self.step,
            "slots": {slot: {name: arr.copy() for name, arr in t.items()} for slot, t in self.slots.items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ServerState:
        """Validate and rebuild a state written by ``state_dict`` (e.g. after a restart)."""
        try:
            optimizer = ServerOptimizer(state["optimizer"])
            step = state["step"]
            raw_slots = state["slots"]
        except (KeyError, ValueError, TypeError) as exc:
            raise AggregationError(f"invalid server optimizer state: {exc}") from exc
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise AggregationError(f"invalid server optimizer state: step {step!r}")
        if not isinstance(raw_slots, Mapping) or set(raw_slots) != set(SLOTS[optimizer]):
            raise AggregationError(
                f"invalid server optimizer state: {optimizer.value} needs slots {sorted(SLOTS[optimizer])}"
            )
        slots: dict[str, dict[str, NDArray[np.float32]]] = {}
        for slot, tensors in raw_slots.items():
            if not isinstance(tensors, Mapping):
                raise AggregationError(f"invalid server optimizer state: slot {slot!r} is not a mapping")
            slots[slot] = {name: _as_float32(f"{slot}/{name}", arr) for name, arr in tensors.items()}
        reference = next(iter(slots.values()), None)
        for tensors in slots.values():
            if reference is not None:
                check_same_layout(reference, tensors)
        return cls(optimizer=optimizer, step=step, slots=slots)


@dataclass(frozen=True)
class AggregateResult:
    """What a round's aggregation produced: the step to add to the global tensors, the normalised
    weights used (in the order of the input updates) and the optimizer's new state."""

    step: dict[str, NDArray[np.float32]]
    weights: tuple[float, ...]
    state: ServerState


# -- weights ---------------------------------------------------------------------------------------


def _no_decay(staleness: int, exponent: float) -> float:
    return 1.0


def _polynomial_decay(staleness: int, exponent: float) -> float:
    return float((1.0 + staleness) ** -exponent)


def _exponential_decay(staleness: int, exponent: float) -> float:
    return math.exp(-exponent * staleness)


DECAYS: dict[StalenessDecay, Callable[[int, float], float]] = {
    StalenessDecay.NONE: _no_decay,
    StalenessDecay.POLYNOMIAL: _polynomial_decay,
    StalenessDecay.EXPONENTIAL: _exponential_decay,
}


def staleness_weight(staleness: int, *, settings: AggregationSettings) -> float:
    """The multiplier for an update computed ``staleness`` rounds ago (1.0 when fresh)."""
    return DECAYS[settings.staleness_decay](staleness, settings.staleness_exponent)


def capped_weights(raw: Sequence[float], *, cap: float) -> NDArray[np.float64]:
    """Normalise ``raw`` (positive) to sum to 1 with no weight above ``cap`` (see module doc)."""
    weights = np.asarray(raw, dtype=np.float64)
    n = weights.size
    if n == 0:
        raise AggregationError("no updates to weigh")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0.0):
        raise AggregationError("weights must be finite and positive")
    if not 0.0 < cap <= 1.0:
        raise AggregationError(f"weight cap must be in (0, 1], got {cap}")
    if cap * n <= 1.0:
        return np.full(n, 1.0 / n)
    capped = np.zeros(n, dtype=bool)
    out = np.empty(n, dtype=np.float64)
    while True:
        free = ~capped
        mass = 1.0 - cap * int(capped.sum())
        share = weights[free] / weights[free].sum() * mass
        over = share > cap
        if not over.any():
            out[free] = share
            out[capped] = cap
            return out
        free_index = np.flatnonzero(free)
        capped[free_index[over]] = True


def update_weights(updates: Sequence[ClientUpdate], *, settings: AggregationSettings) -> NDArray[np.float64]:
    """Sample count times staleness decay, normalised and capped."""
    raw = [u.num_samples * staleness_weight(u.staleness, settings=settings) for u in updates]
    return capped_weights(raw, cap=settings.weight_cap)


# -- validation ------------------------------------------------------------------------------------


def _as_float32(name: str, value: object) -> NDArray[np.float32]:
    if not isinstance(value, np.ndarray):
        raise DeltaMismatch(name, f"expected a numpy array, got {type(value).__name__}")
    if value.dtype != np.float32:
        raise DeltaMismatch(name, f"expected float32, got {value.dtype}")
    # One float64 reduction: finite float32 values cannot overflow it, and NaN/inf propagate.
    if not math.isfinite(float(value.sum(dtype=np.float64))):
        raise DeltaMismatch(name, "contains NaN or infinity")
    return value


def check_same_layout(reference: Tensors, other: Tensors) -> None:
    """Raise ``DeltaMismatch`` unless ``other`` has exactly ``reference``'s names and shapes."""
    if reference.keys() != other.keys():
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        tensor = (missing or extra)[0]
        raise DeltaMismatch(tensor, f"tensor names differ (missing {missing}, unexpected {extra})")
    for name, arr in reference.items():
        if other[name].shape != arr.shape:
            raise DeltaMismatch(name, f"shape {other[name].shape} differs from {arr.shape}")


def check_updates(updates: Sequence[ClientUpdate]) -> Tensors:
    """Validate that every delta is finite float32 with the same layout; return the first."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    reference = updates[0].delta
    if not reference:
        raise AggregationError("an update has no tensors")
    for update in updates:
        for name, arr in update.delta.items():
            _as_float32(name, arr)
        check_same_layout(reference, update.delta)
    return reference


# -- combining -------------------------------------------------------------------------------------

Combiner = Callable[[Sequence[Tensors], NDArray[np.float64]], dict[str, NDArray[np.float32]]]


def weighted_mean(deltas: Sequence[Tensors], weights: NDArray[np.float64]) -> dict[str, NDArray[np.float32]]:
    """``sum_i w_i * delta_i`` per tensor, accumulated in float64."""
    out: dict[str, NDArray[np.float32]] = {}
    for name, first in deltas[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        term = np.empty(first.shape, dtype=np.float64)
        for w, delta in zip(weights, deltas, strict=True):
            # float64 products: a Python float times a float32 array would stay float32 (NEP 50).
            np.multiply(delta[name], np.float64(w), out=term, dtype=np.float64)
            acc += term
        out[name] = acc.astype(np.float32)
    return out


COMBINERS: dict[CombineRule, Combiner] = {CombineRule.WEIGHTED_MEAN: weighted_mean}


# -- server optimizers -----------------------------------------------------------------------------

Optimizer = Callable[
    [Tensors, ServerState, AggregationSettings], tuple[dict[str, NDArray[np.float32]], ServerState]
]

SLOTS: dict[ServerOptimizer, tuple[str, ...]] = {
    ServerOptimizer.FEDAVG: (),
    ServerOptimizer.FEDAVGM: ("momentum",),
    ServerOptimizer.FEDADAM: ("m", "v"),
}


def _fedavg(
    delta: Tensors, state: ServerState, settings: AggregationSettings
) -> tuple[dict[str, NDArray[np.float32]], ServerState]:
    step = {name: (settings.server_lr * arr).astype(np.float32) for name, arr in delta.items()}
    return step, ServerState(optimizer=state.optimizer, step=state.step + 1)


def _fedavgm(
    delta: Tensors, state: ServerState, settings: AggregationSettings
) -> tuple[dict[str, NDArray[np.float32]], ServerState]:
    previous = state.slots.get("momentum", {})
    momentum: dict[str, NDArray[np.float32]] = {}
    step: dict[str, NDArray[np.float32]] = {}
    for name, arr in delta.items():
        m = arr.astype(np.float64)
        if name in previous:
            m += np.float64(settings.momentum) * previous[name]
        momentum[name] = m.astype(np.float32)
        step[name] = (settings.server_lr * m).astype(np.float32)
    return step, ServerState(optimizer=state.optimizer, step=state.step + 1, slots={"momentum": momentum})


def _fedadam(
    delta: Tensors, state: ServerState, settings: AggregationSettings
) -> tuple[dict[str, NDArray[np.float32]], ServerState]:
    prev_m = state.slots.get("m", {})
    prev_v = state.slots.get("v", {})
    new_m: dict[str, NDArray[np.float32]] = {}
    new_v: dict[str, NDArray[np.float32]] = {}
    step: dict[str, NDArray[np.float32]] = {}
    for name, arr in delta.items():
        d = arr.astype(np.float64)
        m = (1.0 - settings.beta1) * d
        v = (1.0 - settings.beta2) * d * d
        if name in prev_m:
            m += np.float64(settings.beta1) * prev_m[name]
            v += np.float64(settings.beta2) * prev_v[name]
        new_m[name] = m.astype(np.float32)
        new_v[name] = v.astype(np.float32)
        step[name] = (settings.server_lr * m / (np.sqrt(v) + settings.tau)).astype(np.float32)
    slots = {"m": new_m, "v": new_v}
    return step, ServerState(optimizer=state.optimizer, step=state.step + 1, slots=slots)


OPTIMIZERS: dict[ServerOptimizer, Optimizer] = {
    ServerOptimizer.FEDAVG: _fedavg,
    ServerOptimizer.FEDAVGM: _fedavgm,
    ServerOptimizer.FEDADAM: _fedadam,
}


# -- the entry points ------------------------------------------------------------------------------


def aggregate(
    updates: Sequence[ClientUpdate],
    *,
    settings: AggregationSettings,
    state: ServerState | None = None,
) -> AggregateResult:
    """Combine ``updates`` and run the server optimizer; return the step, weights and new state.

    Raises ``DeltaMismatch`` when updates (or the optimizer state) disagree on names or shapes and
    ``AggregationError`` when there is nothing to aggregate or the state belongs to another optimizer.
    """
    reference = check_updates(updates)
    if state is None:
        state = ServerState(optimizer=settings.optimizer)
    elif state.optimizer is not settings.optimizer:
        raise AggregationError(
            f"server state is for {state.optimizer.value}, settings ask for {settings.optimizer.value}"
        )
    for tensors in state.slots.values():
        check_same_layout(reference, tensors)
    weights = update_weights(updates, settings=settings)
    combined = COMBINERS[settings.combine]([u.delta for u in updates], weights)
    step, new_state = OPTIMIZERS[settings.optimizer](combined, state, settings)
    return AggregateResult(step=step, weights=tuple(float(w) for w in weights), state=new_state)


def apply_step(global_tensors: Tensors | None, step: Tensors) -> dict[str, NDArray[np.float32]]:
    """The new global tensors: ``global + step`` (the step itself when there is no global yet)."""
    if global_tensors is None:
        return {name: arr.astype(np.float32, copy=True) for name, arr in step.items()}
    check_same_layout(global_tensors, step)
    return {name: (global_tensors[name] + step[name]).astype(np.float32) for name in global_tensors}
