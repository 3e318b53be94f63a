"""Property tests for the pure aggregation rules."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator.aggregate import (
    AggregationSettings,
    ClientUpdate,
    ServerOptimizer,
    ServerState,
    StalenessDecay,
    aggregate,
    apply_step,
    capped_weights,
    staleness_weight,
)
from coordinator.errors import AggregationError, DeltaMismatch

FEDAVG = AggregationSettings(weight_cap=1.0)
finite = st.floats(min_value=-1e3, max_value=1e3, width=32, allow_nan=False)
shapes = st.lists(hnp.array_shapes(min_dims=1, max_dims=2, max_side=5), min_size=1, max_size=3)


@st.composite
def update_sets(draw: st.DrawFn, min_size: int = 1) -> list[ClientUpdate]:
    layout = draw(shapes)
    count = draw(st.integers(min_value=min_size, max_value=6))
    out = []
    for _ in range(count):
        delta = {
            f"layer{i}.lora_B": draw(hnp.arrays(np.float32, shape, elements=finite))
            for i, shape in enumerate(layout)
        }
        out.append(ClientUpdate(delta=delta, num_samples=draw(st.integers(1, 10_000))))
    return out


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_allclose(value, b[name], rtol=1e-5, atol=1e-3)


@given(update_sets(), st.randoms(use_true_random=False), st.sampled_from(list(ServerOptimizer)))
@settings(max_examples=60, deadline=None)
def test_permutation_invariant(
    updates: list[ClientUpdate], rnd: random.Random, optimizer: ServerOptimizer
) -> None:
    config = AggregationSettings(optimizer=optimizer, weight_cap=0.4)
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    _close(aggregate(updates, settings=config).step, aggregate(shuffled, settings=config).step)


@given(update_sets(), st.floats(min_value=0.05, max_value=1.0))
@settings(max_examples=60, deadline=None)
def test_equal_deltas_give_that_delta(updates: list[ClientUpdate], cap: float) -> None:
    same = [ClientUpdate(delta=updates[0].delta, num_samples=u.num_samples) for u in updates]
    result = aggregate(same, settings=AggregationSettings(weight_cap=cap))
    for name, arr in updates[0].delta.items():
        assert result.step[name].shape == arr.shape
        assert result.step[name].dtype == np.float32
        np.testing.assert_array_equal(result.step[name], arr)


@given(update_sets())
@settings(max_examples=40, deadline=None)
def test_shapes_and_names_preserved(updates: list[ClientUpdate]) -> None:
    for optimizer in ServerOptimizer:
        step = aggregate(updates, settings=AggregationSettings(optimizer=optimizer)).step
        assert {k: v.shape for k, v in step.items()} == {k: v.shape for k, v in updates[0].delta.items()}
        assert all(v.dtype == np.float32 for v in step.values())


@given(
    st.lists(st.floats(min_value=1e-3, max_value=1e6), min_size=1, max_size=40),
    st.floats(min_value=0.01, max_value=1.0),
)
def test_cap_respected(raw: list[float], cap: float) -> None:
    w = capped_weights(raw, cap=cap)
    assert w.shape == (len(raw),)
    assert abs(w.sum() - 1.0) < 1e-9
    assert w.max() <= max(cap, 1.0 / len(raw)) + 1e-9
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(w[order]) >= -1e-12)  # caps keep the order of the raw weights


def test_cap_redistributes_proportionally() -> None:
    w = capped_weights([100.0, 1.0, 3.0], cap=0.5)
    np.testing.assert_allclose(w, [0.5, 0.125, 0.375])


def test_infeasible_cap_falls_back_to_uniform() -> None:
    np.testing.assert_allclose(capped_weights([1.0, 9.0], cap=0.25), [0.5, 0.5])


def test_weighted_by_samples() -> None:
    a = {"b": np.array([1.0, 0.0], dtype=np.float32)}
    b = {"b": np.array([0.0, 1.0], dtype=np.float32)}
    result = aggregate(
        [ClientUpdate(delta=a, num_samples=3), ClientUpdate(delta=b, num_samples=1)], settings=FEDAVG
    )
    np.testing.assert_allclose(result.step["b"], [0.75, 0.25])
    assert result.weights == pytest.approx((0.75, 0.25))


def test_staleness_discounts_old_updates() -> None:
    config = AggregationSettings(weight_cap=1.0, staleness_decay=StalenessDecay.EXPONENTIAL)
    assert staleness_weight(0, settings=config) == 1.0
    a = {"b": np.ones(2, dtype=np.float32)}
    z = {"b": np.zeros(2, dtype=np.float32)}
    fresh = ClientUpdate(delta=a, num_samples=10)
    stale = ClientUpdate(delta=z, num_samples=10, staleness=3)
    result = aggregate([fresh, stale], settings=config)
    assert result.weights[0] > result.weights[1]
    none = AggregationSettings(weight_cap=1.0, staleness_decay=StalenessDecay.NONE)
    assert aggregate([fresh, stale], settings=none).weights == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize(
    ("other", "tensor"),
    [
        ({"a": np.zeros(3, np.float32), "c": np.zeros(2, np.float32)}, "b"),
        ({"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}, "a"),
        ({"a": np.zeros(3, np.float32)}, "b"),
        ({"a": np.zeros(3, np.float64), "b": np.zeros(2, np.float32)}, "a"),
        ({"a": np.full(3, np.nan, np.float32), "b": np.zeros(2, np.float32)}, "a"),
    ],
)
def test_mismatched_updates_rejected(other: dict[str, np.ndarray], tensor: str) -> None:
    first = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(DeltaMismatch) as info:
        aggregate(
            [ClientUpdate(delta=first, num_samples=1), ClientUpdate(delta=other, num_samples=1)],
            settings=FEDAVG,
        )
    assert info.value.tensor == tensor


def test_invalid_inputs() -> None:
    with pytest.raises(AggregationError):
        aggregate([], settings=FEDAVG)
    with pytest.raises(AggregationError):
        ClientUpdate(delta={}, num_samples=0)
    with pytest.raises(AggregationError):
        aggregate(
            [ClientUpdate(delta={"a": np.zeros(1, np.float32)}, num_samples=1)],
            settings=FEDAVG,
            state=ServerState(optimizer=ServerOptimizer.FEDADAM),
        )


def test_fedavgm_accumulates_momentum() -> None:
    config = AggregationSettings(optimizer=ServerOptimizer.FEDAVGM, momentum=0.5)
    u = [ClientUpdate(delta={"b": np.ones(2, np.float32)}, num_samples=1)]
    first = aggregate(u, settings=config)
    np.testing.assert_allclose(first.step["b"], [1.0, 1.0])
    second = aggregate(u, settings=config, state=first.state)
    np.testing.assert_allclose(second.step["b"], [1.5, 1.5])
    assert second.state.step == 2


def test_fedadam_state_round_trips() -> None:
    config = AggregationSettings(optimizer=ServerOptimizer.FEDADAM, server_lr=0.1)
    u = [ClientUpdate(delta={"b": np.array([1.0, -2.0], np.float32)}, num_samples=1)]
    first = aggregate(u, settings=config)
    # Adam's first step moves each coordinate by about lr in the delta's direction.
    assert np.all(np.sign(first.step["b"]) == [1, -1])
    restored = ServerState.from_state_dict(first.state.state_dict())
    again = aggregate(u, settings=config, state=restored)
    np.testing.assert_array_equal(again.step["b"], aggregate(u, settings=config, state=first.state).step["b"])
    with pytest.raises(AggregationError):
        ServerState.from_state_dict({"optimizer": "fedadam", "step": 1, "slots": {"m": {}}})
    with pytest.raises(DeltaMismatch):
        aggregate(
            [ClientUpdate(delta={"c": np.ones(2, np.float32)}, num_samples=1)],
            settings=config,
            state=first.state,
        )


def test_apply_step() -> None:
    step = {"b": np.ones(2, np.float32)}
    assert np.array_equal(apply_step(None, step)["b"], step["b"])
    np.testing.assert_array_equal(apply_step({"b": np.full(2, 2, np.float32)}, step)["b"], [3, 3])
    with pytest.raises(DeltaMismatch):
        apply_step({"b": np.ones(3, np.float32)}, step)
