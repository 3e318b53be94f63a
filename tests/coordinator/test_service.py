"""The coordinator service against a real Mosquitto: a round, refusals, a restart, enrollment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregate import AggregationSettings
from coordinator.config import BrokerConfig, CoordinatorConfig, PathsConfig, RoundDefaults
from coordinator.devices import issue_token
from coordinator.mqtt import PahoBroker
from coordinator.releases import open_release
from coordinator.rounds import RoundManager, RoundPlan
from coordinator.service import Service, embedded_broker
from coordinator.store import RoundState, Store
from fleet.enrollment import EnrollmentToken
from fleet.keys import Identity, Role
from fleet.messages import DeviceState, DeviceStatus, EnrollmentRefusal, EnrollmentReply, RoundSpec
from fleet.sealing import Clock, SystemClock, open_signed, sign_message
from fleet.topics import TopicKind, TopicLayout
from tests.coordinator.sim import BASE_SHA, LAYOUT, ManualClock, MqttPeer, SimDevice
from tests.mosquitto import MosquittoBroker, free_port


def _config(broker: MosquittoBroker, tmp_path: Path, root: str, *, tick_s: float) -> CoordinatorConfig:
    return CoordinatorConfig(
        paths=PathsConfig(state_dir=tmp_path),
        broker=BrokerConfig(url=broker.url, client_id=f"c-{root}", topic_root=root, reconnect_min_s=0.05),
        rounds=RoundDefaults(
            min_devices=2, target_devices=3, deadline_s=60, topk_fraction=0.25, max_update_bytes=16384
        ),
        aggregation=AggregationSettings(weight_cap=1.0),
        tick_s=tick_s,
    )


async def _until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


class Running:
    """A service run in the background with its stop event."""

    def __init__(self, config: CoordinatorConfig, store: Store, identity: Identity, clock: Clock) -> None:
        self.stop = asyncio.Event()
        self.service = Service(
            config=config, store=store, identity=identity, broker=PahoBroker(config.broker), clock=clock
        )
        self.task = asyncio.create_task(self.service.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


async def test_round_refusals_and_restart(
    mosquitto_broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator")
    root = f"t{uuid.uuid4().hex[:8]}"
    topics = TopicLayout(root)
    config = _config(mosquitto_broker, tmp_path, root, tick_s=60.0)  # the ticker runs once at start
    identity = Identity.generate(Role.COORDINATOR)
    clock = ManualClock()
    devices = [SimDevice(f"pi-{i}") for i in range(4)]
    store = Store(config.store_path)
    for device in devices:
        device.enroll_directly(store)
    RoundManager(
        store, identity, clock=clock, aggregation=config.aggregation, max_update_bytes=16384
    ).start_round(RoundPlan.from_defaults(config.rounds, base_model_sha256=BASE_SHA, ffa_seed=3))

    peer = MqttPeer(mosquitto_broker.url, f"d-{root}")
    peer.subscribe(topics.build(TopicKind.ROUNDS))
    running = Running(config, store, identity, clock)
    try:
        spec = open_signed(
            await peer.next_on(topics.build(TopicKind.ROUNDS)), RoundSpec, signer=identity.public
        )
        assert spec.round_id == 1

        def update_topic(d: SimDevice) -> str:
            return topics.build(TopicKind.UPDATE, d.id)

        a, b, c, d = devices
        good_a, sent_a = a.sealed_update(spec, identity.public, seed=1, samples=10)
        good_b, sent_b = b.sealed_update(spec, identity.public, seed=2, samples=30)
        second_a, _ = a.sealed_update(spec, identity.public, seed=3)
        forged = bytearray(b.sealed_update(spec, identity.public, seed=4)[0])
        forged[-3] ^= 0xFF
        wrong_round, _ = b.sealed_update(spec, identity.public, seed=5, round_id=9)
        peer.publish(update_topic(a), good_a)
        peer.publish(update_topic(a), good_a)  # redelivered: ignored quietly
        peer.publish(update_topic(a), second_a)
        peer.publish(update_topic(b), bytes(forged))
        peer.publish(update_topic(b), wrong_round)
        peer.publish(update_topic(b), b"\x00" * 20000)
        peer.publish(update_topic(b), good_b)
        await _until(lambda: store.update_count(1) == 2 and len(store.refusals(1)) >= 2)
        await _until(lambda: "oversized" in caplog.text)
        clock.advance(61)
        late, _ = d.sealed_update(spec, identity.public, seed=6)
        peer.publish(update_topic(d), late)
        await _until(lambda: any(r.reason == "late" for r in store.refusals(1)))
        clock.advance(-61)  # back before the deadline, for the rest of the round
        assert store.round(1).state is RoundState.OPEN
    finally:
        await running.close()
    for reason in ("replayed", "forged", "wrong_round", "oversized", "late"):
        assert f": {reason} (" in caplog.text, reason

    # While the coordinator is down, the broker keeps C's update for its persistent session; the
    # restarted coordinator resumes the round, gets it, reaches the target and releases.
    good_c, sent_c = c.sealed_update(spec, identity.public, seed=7, samples=20)
    peer.publish(update_topic(c), good_c)
    store.close()
    store = Store(config.store_path)
    peer.subscribe(topics.build(TopicKind.RELEASES))
    running = Running(config, store, identity, clock)
    try:
        frame = await peer.next_on(topics.build(TopicKind.RELEASES))
    finally:
        await running.close()
        peer.close()
    release = open_release(frame, signer=identity.public)
    assert release.round_id == 1 and release.version == 1
    for name in LAYOUT:
        expected = sum(
            w * s[name].astype(np.float64) for w, s in ((1 / 6, sent_a), (1 / 2, sent_b), (1 / 3, sent_c))
        )
        np.testing.assert_allclose(release.arrays()[name], expected, rtol=1e-5, atol=1e-7)
    assert store.round(1).state is RoundState.RELEASED
    store.close()


@pytest.mark.parametrize("broker_kind", ["mosquitto", "embedded"])
async def test_enrollment_and_status_over_mqtt(
    broker_kind: str, mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    root = f"t{uuid.uuid4().hex[:8]}"
    topics = TopicLayout(root)
    async with contextlib.AsyncExitStack() as stack:
        url = mosquitto_broker.url
        if broker_kind == "embedded":
            port = free_port()
            await stack.enter_async_context(embedded_broker("127.0.0.1", port))
            url = f"mqtt://127.0.0.1:{port}"
        await _enrollment_and_status(url, tmp_path, root, topics)


async def _enrollment_and_status(url: str, tmp_path: Path, root: str, topics: TopicLayout) -> None:
    config = CoordinatorConfig(
        paths=PathsConfig(state_dir=tmp_path),
        broker=BrokerConfig(url=url, client_id=f"c-{root}", topic_root=root, reconnect_min_s=0.05),
        tick_s=0.1,
    )
    identity = Identity.generate(Role.COORDINATOR)
    clock = SystemClock()
    store = Store(config.store_path)
    token = EnrollmentToken.parse(str(issue_token(store, identity, "kitchen-pi", now=clock.now())))
    device = Identity.generate(Role.DEVICE)
    peer = MqttPeer(url, f"d-{root}")
    peer.subscribe(topics.build(TopicKind.ENROLLED, device.id))
    running = Running(config, store, identity, clock)
    try:
        await asyncio.wait_for(running.service.connected.wait(), 10)
        request = sign_message(token.request(device, at=clock.now()), device)
        peer.publish(topics.build(TopicKind.ENROLL, device.id), request)
        reply = open_signed(
            await peer.next_on(topics.build(TopicKind.ENROLLED, device.id)),
            EnrollmentReply,
            signer=identity.public,
        )
        assert reply.accepted and reply.name == "kitchen-pi" and token.pins(reply.coordinator_keys())
        status = DeviceStatus(device_id=device.id, state=DeviceState.IDLE, at=clock.now(), adapter_version=4)
        peer.publish(topics.build(TopicKind.STATUS, device.id), sign_message(status, device))
        await _until(lambda: store.device(device.id).adapter_version == 4)
        # The same token again from another device: refused, and that device is not enrolled.
        other = Identity.generate(Role.DEVICE)
        peer.subscribe(topics.build(TopicKind.ENROLLED, other.id))
        peer.publish(
            topics.build(TopicKind.ENROLL, other.id),
            sign_message(token.request(other, at=clock.now()), other),
        )
        refused = open_signed(
            await peer.next_on(topics.build(TopicKind.ENROLLED, other.id)),
            EnrollmentReply,
            signer=identity.public,
        )
        assert not refused.accepted and refused.refusal is EnrollmentRefusal.TOKEN_USED
        assert store.find_device(other.id) is None
    finally:
        await running.close()
        peer.close()
        store.close()
