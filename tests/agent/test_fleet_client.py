"""The fleet client's pieces against a real Mosquitto, with the test standing in for the coordinator
(real keys, enrollment, sealing, codec, store). The trainer subprocess is replaced by a scripted
:class:`RoundTrainer` that writes a real fleet delta file (tests/test_round_e2e.py runs the real one)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import AgentConfig, parse_config
from agent.demo_round import wait_for
from agent.fleet_adapter import BaseModelInfo, read_base_model
from agent.fleet_client import FleetClient, TrainCall, TrainOutcome
from agent.fleet_transport import PahoTransport
from agent.train.ledger import PrivacyLedger
from agent.train.update import FleetDeltaHeader, write_fleet_delta
from coordinator.devices import StoreRegistry, enroll, issue_token
from coordinator.store import Store
from fleet.codec import decode, l2_norm
from fleet.keys import Identity, Role, save_public
from fleet.messages import DeviceState, DeviceStatus, LoraSpec, PrivacyTarget, Release, RoundSpec
from fleet.sealing import UpdateOpener, open_device_signed, sign_message
from fleet.topics import TopicKind, TopicLayout
from tests.coordinator.sim import MqttPeer
from tests.mosquitto import MosquittoBroker

NAMES = ("blk.0.attn_q.weight.lora_b", "blk.1.attn_q.weight.lora_b")
RANK = 4
_roots = itertools.count()


@dataclass
class ScriptedTrainer:
    """Writes the B delta a DP run would have produced (the real trainer runs in the e2e test)."""

    shapes: dict[str, tuple[int, int]]
    calls: list[TrainCall] = field(default_factory=list)
    exit_code: int = 0

    async def train(self, call: TrainCall) -> tuple[int, TrainOutcome | None]:
        self.calls.append(call)
        if self.exit_code != 0:
            return self.exit_code, None
        spec = RoundSpec.from_parts(json.loads(call.spec_path.read_text()))
        rng = np.random.default_rng(len(self.calls))
        delta = {n: (rng.standard_normal(s) * 0.5).astype(np.float32) for n, s in self.shapes.items()}
        path = call.out_dir / f"fleet-update-r{spec.round_id}.ppcf"
        call.out_dir.mkdir(parents=True, exist_ok=True)
        write_fleet_delta(
            path,
            FleetDeltaHeader(
                round_id=spec.round_id,
                run_id="ab" * 16,
                ffa_seed=spec.lora.ffa_seed,
                rank=RANK,
                alpha=8.0,
                target_modules=("q_proj",),
                architecture="llama",
                base_model_sha256=spec.base_model_sha256,
                epsilon=1.5,
                delta=1e-5,
                sample_count=20,
                steps=3,
                tensors=(),
            ),
            delta,
        )
        outcome = TrainOutcome(status="completed", update_path=str(path), epsilon_run=1.5, steps_done=3)
        return 0, outcome


@dataclass
class RecordingSwapper:
    adapters: tuple[tuple[Path, float], ...] = ()
    history: list[tuple[tuple[Path, float], ...]] = field(default_factory=list)

    async def set_adapters(self, adapters: Sequence[tuple[Path, float]]) -> None:
        self.adapters = tuple(adapters)
        self.history.append(self.adapters)


@dataclass
class Coordinator:
    """The test's coordinator: its identity, store and an MQTT peer on the same broker."""

    identity: Identity
    store: Store
    peer: MqttPeer
    topics: TopicLayout

    def spec(self, round_id: int, base: str, *, deadline_s: float = 300.0) -> RoundSpec:
        now = datetime.now(timezone.utc)
        return RoundSpec(
            round_id=round_id,
            announced_at=now,
            deadline=now + timedelta(seconds=deadline_s),
            min_devices=1,
            target_devices=1,
            local_epochs=1,
            learning_rate=0.01,
            lora=LoraSpec(rank=RANK, alpha=8.0, target_modules=("q_proj",), ffa_seed=7),
            norm_bound=1.0,
            privacy=PrivacyTarget(epsilon=2.0, delta=1e-5),
            base_model_sha256=base,
        )

    def release(self, version: int, base: str, shapes: dict[str, tuple[int, int]]) -> Release:
        rng = np.random.default_rng(version)
        return Release.build(
            {n: (rng.standard_normal(s) * 0.01).astype(np.float32) for n, s in shapes.items()},
            version=version,
            round_id=version,
            created_at=datetime.now(timezone.utc),
            base_model_sha256=base,
            lora=LoraSpec(rank=RANK, alpha=8.0, target_modules=("q_proj",), ffa_seed=7),
        )


@pytest.fixture(scope="module")
def base(demo_model: Any) -> BaseModelInfo:
    return read_base_model(Path(demo_model.q8_0))


@pytest.fixture
def shapes(base: BaseModelInfo) -> dict[str, tuple[int, int]]:
    return {n: (base.in_features[n.removesuffix(".lora_b")], RANK) for n in NAMES}


def device_config(tmp: Path, url: str, root: str, **fleet: Any) -> AgentConfig:
    return parse_config(
        {
            "paths": {"state_dir": str(tmp / "state"), "runtime_dir": str(tmp / "run")},
            "privacy": {"preset": "minimal"},
            "fleet": {
                "enabled": True,
                "broker_url": url,
                "topic_root": root,
                "reconnect_min_s": 0.1,
                "reconnect_max_s": 0.5,
                **fleet,
            },
        }
    )


@dataclass
class Rig:
    client: FleetClient
    transport: PahoTransport
    coordinator: Coordinator
    trainer: ScriptedTrainer
    swapper: RecordingSwapper
    config: AgentConfig
    task: asyncio.Task[None]


def make_client(
    config: AgentConfig,
    identity: Identity,
    base: BaseModelInfo,
    trainer: ScriptedTrainer,
    swapper: RecordingSwapper,
) -> tuple[FleetClient, PahoTransport]:
    holder: dict[str, FleetClient] = {}
    transport = PahoTransport(
        config.fleet,
        client_id=identity.id,
        username=None,
        password=None,
        will=lambda: holder["c"].will(),  # noqa: PLW0108
        on_connect=lambda: holder["c"].on_connected(),  # noqa: PLW0108
    )
    client = FleetClient(
        config=config,
        identity=identity,
        transport=transport,
        trainer=trainer,
        base=base,
        swapper=swapper,
        enroll_retry_s=0.5,
    )
    holder["c"] = client
    return client, transport


@pytest.fixture
async def rig(
    tmp_path: Path, mosquitto_broker: MosquittoBroker, base: BaseModelInfo, shapes: dict[str, tuple[int, int]]
) -> AsyncIterator[Rig]:
    root = f"t{next(_roots)}fc{random.randrange(10**6)}"
    topics = TopicLayout(root)
    coord_identity = Identity.generate(Role.COORDINATOR)
    store = Store(tmp_path / "coordinator.sqlite3")
    peer = MqttPeer(mosquitto_broker.url, f"coord-{root}")
    peer.subscribe(f"{topics.prefix}/#")
    coordinator = Coordinator(coord_identity, store, peer, topics)
    identity = Identity.generate(Role.DEVICE)
    token = issue_token(store, coord_identity, "test-device", now=datetime.now(timezone.utc))
    (tmp_path / "token").write_text(str(token))
    config = device_config(
        tmp_path, mosquitto_broker.url, root, enrollment_token_path=str(tmp_path / "token")
    )
    trainer, swapper = ScriptedTrainer(shapes), RecordingSwapper()
    client, transport = make_client(config, identity, base, trainer, swapper)
    task = asyncio.create_task(client.run())
    # Act as the coordinator for the enrollment request.
    request = await peer.next_on(topics.build(TopicKind.ENROLL, identity.id), timeout=15)
    outcome = enroll(store, coord_identity, request, topic_device=identity.id, now=datetime.now(timezone.utc))
    peer.publish(topics.build(TopicKind.ENROLLED, identity.id), outcome.reply, retain=True)
    await wait_for(lambda: client.state.enrolled, 15)
    try:
        yield Rig(client, transport, coordinator, trainer, swapper, config, task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        peer.close()
        store.close()


async def test_enrollment_pins_the_coordinator(rig: Rig) -> None:
    assert rig.client.coordinator_keys_file.is_file()
    assert rig.client.state.coordinator_id == rig.coordinator.identity.id
    assert rig.client.state.name == "test-device"


async def test_round_trains_seals_and_records_egress(rig: Rig, base: BaseModelInfo) -> None:
    c = rig.coordinator
    topic = c.topics.build(TopicKind.UPDATE, rig.client.identity.id)
    # A round signed by someone else, and one for another base model, are ignored.
    impostor = Identity.generate(Role.COORDINATOR)
    c.peer.publish(
        c.topics.build(TopicKind.ROUNDS), sign_message(c.spec(1, base.sha256), impostor), retain=True
    )
    c.peer.publish(
        c.topics.build(TopicKind.ROUNDS), sign_message(c.spec(2, "cd" * 32), c.identity), retain=True
    )
    await wait_for(lambda: rig.client.progress.refused_messages >= 1 and 2 in rig.client.progress.skipped, 10)
    assert rig.trainer.calls == []

    spec = c.spec(3, base.sha256)
    c.peer.publish(c.topics.build(TopicKind.ROUNDS), sign_message(spec, c.identity), retain=True)
    payload = await c.peer.next_on(topic, timeout=20)
    opened = UpdateOpener(c.identity, StoreRegistry(c.store)).open(payload, device_id=rig.client.identity.id)
    assert opened.header.round_id == 3 and opened.header.epsilon == 1.5
    layout = {n: (base.in_features[n.removesuffix(".lora_b")], RANK) for n in NAMES}
    decoded = decode(opened.encoded, expected=layout)
    assert l2_norm(decoded) <= spec.norm_bound
    await wait_for(lambda: not any(rig.client.outbox.glob("*.ppcf")), 10)
    assert rig.client.residual_path.is_file()
    egress = PrivacyLedger(rig.config.ledger_path).read().egress
    assert [(e.round_id, e.bytes, e.norm_bound, e.epsilon) for e in egress] == [(3, len(payload), 1.0, 1.5)]
    assert rig.client.state.last_round == 3
    # The same round announced again is not trained twice.
    c.peer.publish(c.topics.build(TopicKind.ROUNDS), sign_message(spec, c.identity), retain=True)
    await asyncio.sleep(0.5)
    assert len(rig.trainer.calls) == 1


async def test_release_installs_swaps_reports_and_rolls_back(
    rig: Rig, base: BaseModelInfo, shapes: dict[str, tuple[int, int]]
) -> None:
    c = rig.coordinator
    releases = c.topics.build(TopicKind.RELEASES)
    forged = sign_message(c.release(5, base.sha256, shapes), Identity.generate(Role.COORDINATOR))
    c.peer.publish(releases, forged, retain=True)
    await wait_for(lambda: rig.client.progress.refused_messages >= 1, 10)
    assert rig.client.state.adapter_version is None

    for version in (1, 2):
        c.peer.publish(
            releases, sign_message(c.release(version, base.sha256, shapes), c.identity), retain=True
        )
        await wait_for(lambda v=version: rig.client.state.adapter_version == v, 15)  # type: ignore[misc]
    gdir = rig.config.global_adapters_dir
    assert rig.swapper.adapters == ((gdir / "2.gguf", 1.0),)
    assert (gdir / "1.gguf").is_file()  # kept for rollback

    from agent.train.export import read_lora_gguf

    adapter = read_lora_gguf(gdir / "2.gguf")
    assert sorted(adapter.pairs) == sorted(n.removesuffix(".lora_b") for n in NAMES)

    status_topic = c.topics.build(TopicKind.STATUS, rig.client.identity.id)
    registry = StoreRegistry(c.store)

    async def latest_status() -> DeviceStatus:
        while True:
            payload = await c.peer.next_on(status_topic, timeout=10)
            status = open_device_signed(payload, DeviceStatus, registry=registry)
            if status.adapter_version == rig.client.state.adapter_version:
                return status

    assert (await latest_status()).adapter_version == 2
    assert await rig.client.rollback() == 1
    assert rig.swapper.adapters == ((gdir / "1.gguf", 1.0),)
    assert (await latest_status()).adapter_version == 1


async def test_last_will_is_a_signed_offline_status(rig: Rig) -> None:
    c = rig.coordinator
    topic = c.topics.build(TopicKind.STATUS, rig.client.identity.id)
    rig.task.cancel()
    await asyncio.gather(rig.task, return_exceptions=True)
    # A clean disconnect sends no will; a dropped connection does. Reconnect, then drop.
    rig.task = asyncio.create_task(rig.client.run())
    await wait_for(rig.transport.connected.is_set, 10)
    rig.transport.drop()
    registry = StoreRegistry(c.store)
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        payload = await c.peer.next_on(topic, timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
        status = open_device_signed(payload, DeviceStatus, registry=registry)
        if status.state is DeviceState.OFFLINE:
            break


def test_pinned_coordinator_file_is_used(tmp_path: Path, base: BaseModelInfo) -> None:
    coord = Identity.generate(Role.COORDINATOR)
    save_public(tmp_path / "coordinator.pub", coord.public)
    config = device_config(
        tmp_path, "mqtt://127.0.0.1:1", "pin", coordinator_keys_path=str(tmp_path / "coordinator.pub")
    )
    client, _ = make_client(
        config, Identity.generate(Role.DEVICE), base, ScriptedTrainer({}), RecordingSwapper()
    )
    assert client.enrolled
