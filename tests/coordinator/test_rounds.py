"""The round state machine over a real store, real keys, codec and sealing (no broker)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregate import AggregationSettings, ServerOptimizer
from coordinator.config import RoundDefaults
from coordinator.errors import RefusalReason, RoundError, UpdateRejected
from coordinator.releases import open_release
from coordinator.rounds import RoundManager, RoundPlan
from coordinator.store import DeviceStatus, RoundState, Store
from fleet.keys import Identity, PublicKeys, Role
from fleet.messages import RoundSpec
from fleet.sealing import open_signed
from tests.coordinator.sim import BASE_SHA, LAYOUT, ManualClock, SimDevice

FEDAVG = AggregationSettings(weight_cap=1.0)


@pytest.fixture(scope="module")
def coordinator_identity() -> Identity:
    return Identity.generate(Role.COORDINATOR)


@pytest.fixture(scope="module")
def fleet() -> list[SimDevice]:
    return [SimDevice(f"pi-{i}") for i in range(4)]


@pytest.fixture
def store(tmp_path: Path, fleet: list[SimDevice]) -> Iterator[Store]:
    s = Store(tmp_path / "c.sqlite3")
    for device in fleet:
        device.enroll_directly(s)
    yield s
    s.close()


def manager(
    store: Store, identity: Identity, clock: ManualClock, *, aggregation: AggregationSettings = FEDAVG
) -> RoundManager:
    return RoundManager(store, identity, clock=clock, aggregation=aggregation, max_update_bytes=65536)


def plan(**overrides: object) -> RoundPlan:
    defaults = RoundDefaults(
        min_devices=2, target_devices=3, deadline_s=60, topk_fraction=0.25, norm_bound=1.0
    )
    return RoundPlan.from_defaults(defaults, base_model_sha256=BASE_SHA, ffa_seed=7, **overrides)


def test_full_round_releases_the_weighted_average(
    store: Store, coordinator_identity: Identity, fleet: list[SimDevice]
) -> None:
    clock = ManualClock()
    rounds = manager(store, coordinator_identity, clock)
    spec = rounds.start_round(plan())
    assert rounds.sync() == [spec]
    announced = open_signed(rounds.announcement(spec), RoundSpec, signer=coordinator_identity.public)
    assert announced == spec
    sent = []
    for i, device in enumerate(fleet[:3]):
        payload, dense = device.sealed_update(spec, coordinator_identity.public, seed=i, samples=10 * (i + 1))
        accepted = rounds.receive(payload, topic_device=device.id)
        assert accepted.received == i + 1
        sent.append(dense)
    assert accepted.target_reached
    assert rounds.due() == [spec.round_id]
    [outcome] = rounds.tick()
    assert outcome.state is RoundState.RELEASED and outcome.release is not None
    assert outcome.release is not None
    release = open_release(outcome.release.frame, signer=coordinator_identity.public)
    assert release.version == 1 and release.lora == spec.lora and release.base_model_sha256 == BASE_SHA
    weights = np.array([10, 20, 30]) / 60
    for name in LAYOUT:
        expected = sum(w * d[name].astype(np.float64) for w, d in zip(weights, sent, strict=True))
        np.testing.assert_allclose(release.arrays()[name], expected, rtol=1e-5, atol=1e-7)
    record = store.round(spec.round_id)
    latest = store.latest_release()
    assert record.state is RoundState.RELEASED and latest is not None and latest.version == 1


def _refusal_cases(
    spec: RoundSpec, coord: PublicKeys, fleet: list[SimDevice], store: Store, rounds: RoundManager
) -> list[tuple[str, bytes, str, RefusalReason]]:
    """(name, payload, topic device, expected reason) for each refusal; some mutate the world first."""
    good, _ = fleet[0].sealed_update(spec, coord, seed=1)
    rounds.receive(good, topic_device=fleet[0].id)
    again, _ = fleet[0].sealed_update(spec, coord, seed=2)
    # The same nonce under another device's valid update: a replayed nonce.
    header_nonce = json.loads(store.updates(spec.round_id)[0].header)["nonce"]
    reused, _ = fleet[1].sealed_update(spec, coord, seed=3, nonce=header_nonce)
    forged = bytearray(fleet[1].sealed_update(spec, coord, seed=4)[0])
    forged[-1] ^= 0x01
    stranger = SimDevice("stranger")
    impostor, _ = stranger.sealed_update(spec, coord, seed=5)
    wrong_round, _ = fleet[1].sealed_update(spec, coord, seed=6, round_id=spec.round_id + 5)
    too_strong, _ = fleet[1].sealed_update(spec, coord, seed=7, encode_bound=50.0)
    return [
        ("replayed", again, fleet[0].id, RefusalReason.REPLAYED),
        ("nonce", reused, fleet[1].id, RefusalReason.REPLAYED),
        ("forged", bytes(forged), fleet[1].id, RefusalReason.FORGED),
        ("unknown", impostor, stranger.id, RefusalReason.UNKNOWN_DEVICE),
        ("wrong_round", wrong_round, fleet[1].id, RefusalReason.WRONG_ROUND),
        ("oversized", b"\0" * 70000, fleet[1].id, RefusalReason.OVERSIZED),
        ("malformed", b"PPCF garbage", fleet[1].id, RefusalReason.MALFORMED),
        ("out_of_bounds", too_strong, fleet[1].id, RefusalReason.OUT_OF_BOUNDS),
    ]


def test_refusals_are_logged_with_a_reason(
    store: Store, coordinator_identity: Identity, fleet: list[SimDevice], caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    rounds = manager(store, coordinator_identity, clock)
    spec = rounds.start_round(plan(target_devices=4))
    rounds.sync()
    cases = _refusal_cases(spec, coordinator_identity.public, fleet, store, rounds)
    caplog.set_level(logging.WARNING, logger="coordinator.rounds")
    for name, payload, topic_device, reason in cases:
        caplog.clear()
        with pytest.raises(UpdateRejected) as info:
            rounds.receive(payload, topic_device=topic_device)
        assert info.value.reason is reason, name
        assert reason.value in caplog.text, name
    # Late: past the deadline, even a perfectly good update is refused.
    late, _ = fleet[2].sealed_update(spec, coordinator_identity.public, seed=9)
    clock.advance(61)
    with pytest.raises(UpdateRejected) as info:
        rounds.receive(late, topic_device=fleet[2].id)
    assert info.value.reason is RefusalReason.LATE
    # Revoked: refused from then on.
    store.set_device_status(fleet[3].name, DeviceStatus.REVOKED)
    revoked, _ = fleet[3].sealed_update(spec, coordinator_identity.public, seed=10)
    with pytest.raises(UpdateRejected) as info:
        rounds.receive(revoked, topic_device=fleet[3].id)
    assert info.value.reason is RefusalReason.REVOKED_DEVICE
    recorded = {r.reason for r in store.refusals(spec.round_id)}
    assert {"replayed", "forged", "late", "out_of_bounds"} <= recorded
    assert store.update_count(spec.round_id) == 1


def test_redelivery_is_not_a_refusal(
    store: Store, coordinator_identity: Identity, fleet: list[SimDevice]
) -> None:
    rounds = manager(store, coordinator_identity, ManualClock())
    spec = rounds.start_round(plan())
    rounds.sync()
    payload, _ = fleet[0].sealed_update(spec, coordinator_identity.public)
    assert not rounds.receive(payload, topic_device=fleet[0].id).duplicate
    again = rounds.receive(payload, topic_device=fleet[0].id)
    assert again.duplicate and again.received == 1
    assert store.refusals(spec.round_id) == []


def test_restart_mid_round_resumes(
    tmp_path: Path, coordinator_identity: Identity, fleet: list[SimDevice]
) -> None:
    path = tmp_path / "c.sqlite3"
    clock = ManualClock()
    with Store(path) as store:
        for device in fleet:
            device.enroll_directly(store)
        first = manager(store, coordinator_identity, clock)
        spec = first.start_round(plan())
        first.sync()
        early, _ = fleet[0].sealed_update(spec, coordinator_identity.public, seed=1)
        first.receive(early, topic_device=fleet[0].id)
    clock.advance(10)
    with Store(path) as store:  # the coordinator restarted
        second = manager(store, coordinator_identity, clock)
        assert second.sync() == [spec]
        assert second.progress(spec.round_id) == (1, 3)
        other, _ = fleet[0].sealed_update(spec, coordinator_identity.public, seed=2)
        with pytest.raises(UpdateRejected) as info:
            second.receive(other, topic_device=fleet[0].id)
        assert info.value.reason is RefusalReason.REPLAYED
        for i, device in enumerate(fleet[1:3]):
            payload, _ = device.sealed_update(spec, coordinator_identity.public, seed=10 + i)
            second.receive(payload, topic_device=device.id)
        [outcome] = second.tick()
        assert outcome.state is RoundState.RELEASED


def test_deadline_with_too_few_updates_fails(
    store: Store, coordinator_identity: Identity, fleet: list[SimDevice]
) -> None:
    clock = ManualClock()
    rounds = manager(store, coordinator_identity, clock)
    spec = rounds.start_round(plan())
    rounds.sync()
    payload, _ = fleet[0].sealed_update(spec, coordinator_identity.public)
    rounds.receive(payload, topic_device=fleet[0].id)
    assert rounds.tick() == []
    clock.advance(60)
    [outcome] = rounds.tick()
    assert outcome.state is RoundState.FAILED and "1 updates arrived, 2 needed" in outcome.detail
    assert store.round(spec.round_id).failure == outcome.detail


def test_one_round_at_a_time_and_rounds_chain(
    store: Store, coordinator_identity: Identity, fleet: list[SimDevice]
) -> None:
    clock = ManualClock()
    settings = AggregationSettings(optimizer=ServerOptimizer.FEDAVGM, momentum=0.5, weight_cap=1.0)
    rounds = manager(store, coordinator_identity, clock, aggregation=settings)
    releases = []
    for r in range(2):
        spec = rounds.start_round(plan(target_devices=2))
        with pytest.raises(RoundError):
            rounds.start_round(plan())
        rounds.sync()
        for i, device in enumerate(fleet[:2]):
            payload, _ = device.sealed_update(spec, coordinator_identity.public, seed=100 * r + i)
            rounds.receive(payload, topic_device=device.id)
        [outcome] = rounds.tick()
        assert outcome.release is not None
        releases.append(open_release(outcome.release.frame, signer=coordinator_identity.public))
        clock.advance(1)
    assert [r.version for r in releases] == [1, 2]
    # The second release builds on the first (momentum carried in the stored optimizer state).
    saved = store.load_server_state()
    assert saved is not None and saved[0] == 2
    assert not np.allclose(releases[1].arrays()[next(iter(LAYOUT))], releases[0].arrays()[next(iter(LAYOUT))])


def test_plan_validation() -> None:
    with pytest.raises(RoundError):
        plan(min_devices=5, target_devices=2)
    with pytest.raises(RoundError):
        plan(topk_fraction=0.0)
