"""Fault injection on a round, end to end: the real ``coordinator serve`` process, a real Mosquitto with
persistence, three real fleet clients (paho, persistent sessions, the durable outbox). Only the DP
trainer is scripted (it writes the delta file a DP run writes; tests/test_round_e2e.py runs the real
one), so that the test decides when each device's update leaves.

One round, target three devices:

1. device 0's update arrives normally;
2. the broker is stopped (cleanly, it saves its state); device 1 finishes training while it is down, so
   its sealed update waits in the device's outbox; the broker comes back on the same port; device 1
   reconnects and sends it; the coordinator reconnects to its persistent session and gets it;
3. the coordinator is SIGKILLed; device 2 sends while it is dead; the broker queues the update for the
   coordinator's persistent session; the coordinator restarts, resumes the open round from SQLite,
   receives the queued update, aggregates and releases;

and every device installs the signed release. No update is lost, none counted twice, nothing refused.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.demo_round import DemoRound, Device, wait_for
from agent.fleet_adapter import BaseModelInfo, file_sha256, read_base_model
from agent.fleet_client import FleetClient, TrainCall, TrainOutcome
from agent.fleet_transport import PahoTransport
from tests.agent.test_fleet_client import RecordingSwapper, ScriptedTrainer, make_client
from tests.mosquitto import MosquittoBroker, MosquittoOptions, mosquitto_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAMES = ("blk.0.attn_q.weight.lora_b", "blk.1.attn_q.weight.lora_b", "blk.0.attn_v.weight.lora_b")


@dataclass
class GatedTrainer(ScriptedTrainer):
    """The scripted trainer, held until the test opens its gate."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: int = 0

    async def train(self, call: TrainCall) -> tuple[int, TrainOutcome | None]:
        self.started += 1
        await self.gate.wait()
        return await super().train(call)


@dataclass
class Node:
    device: Device
    trainer: GatedTrainer
    swapper: RecordingSwapper
    client: FleetClient
    transport: PahoTransport
    task: asyncio.Task[None]

    @property
    def outbox_entries(self) -> list[Path]:
        return sorted(self.client.outbox.glob("r*.ppcf")) if self.client.outbox.is_dir() else []


def diagnose(demo: DemoRound, nodes: list[Node]) -> str:
    parts = [
        f"device {n.device.index}: started {n.trainer.started} sent {list(n.client.progress.sent)} "
        f"skipped {n.client.progress.skipped} outbox {[p.name for p in n.outbox_entries]}"
        for n in nodes
    ]
    log = demo.workdir / "coordinator.log"
    parts.append("coordinator log: " + (log.read_text()[-1500:] if log.exists() else "-"))
    return "; ".join(parts)


def round_view(demo: DemoRound) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(demo.coordinator("round", "status", "--json"))
    return view


async def test_broker_restart_and_coordinator_kill_mid_round_lose_no_update(
    tmp_path: Path, demo_model: Any
) -> None:
    if not mosquitto_available():
        pytest.fail("mosquitto is not installed (Debian: apt-get install mosquitto)")
    model = Path(demo_model.q8_0)
    base: BaseModelInfo = read_base_model(model)
    broker = MosquittoBroker(tmp_path / "broker", MosquittoOptions(persistence=True))
    broker.start()
    demo = DemoRound(
        workdir=tmp_path / "fleet", model_path=model, n_devices=3, load_engines=False, port=broker.port
    )
    demo.say = lambda _: None
    demo.broker_kind = "mosquitto"
    nodes: list[Node] = []
    try:
        demo.workdir.mkdir(parents=True)
        demo.setup_coordinator(file_sha256(model))
        demo.devices = [demo.setup_device(i) for i in range(3)]
        demo.start_coordinator()
        for device in demo.devices:
            rank = 4  # the demo coordinator's lora_rank
            shapes = {n: (base.in_features[n.removesuffix(".lora_b")], rank) for n in NAMES}
            trainer, swapper = GatedTrainer(shapes), RecordingSwapper()
            client, transport = make_client(device.config, device.identity, base, trainer, swapper)
            task = asyncio.create_task(client.run(), name=f"device-{device.index}")
            nodes.append(Node(device, trainer, swapper, client, transport, task))
        await wait_for(lambda: all(n.client.enrolled for n in nodes), 60)
        demo.coordinator("round", "start", "--min-devices", "3", "--target-devices", "3")
        await wait_for(
            lambda: all(n.trainer.started for n in nodes), 60, failure=lambda: diagnose(demo, nodes)
        )

        # 1. device 0 sends normally.
        nodes[0].trainer.gate.set()
        await wait_for(lambda: round_view(demo)["received"] == 1, 60)

        # 2. the broker goes down; device 1 seals its update meanwhile; the broker comes back.
        broker.stop()
        await wait_for(lambda: not nodes[1].client.connected, 30)
        nodes[1].trainer.gate.set()
        await wait_for(lambda: 1 in nodes[1].client.progress.sent, 30)
        assert [p.name for p in nodes[1].outbox_entries] == ["r1.ppcf"]  # kept durably, not yet acked
        await asyncio.sleep(1.0)  # a reconnection attempt or two fail while it is down
        broker.start()
        await wait_for(lambda: round_view(demo)["received"] == 2, 60)
        await wait_for(lambda: not nodes[1].outbox_entries, 30)  # acknowledged, then removed

        # 3. the coordinator dies without warning; device 2 sends while it is dead; it comes back.
        proc = demo._coordinator_proc
        assert proc is not None and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        nodes[2].trainer.gate.set()
        await wait_for(lambda: 1 in nodes[2].client.progress.sent and not nodes[2].outbox_entries, 30)
        view = round_view(demo)
        assert view["state"] == "open" and view["received"] == 2
        (demo.workdir / "coordinator.log").write_bytes(b"")  # start_coordinator waits for a new line
        demo.start_coordinator()

        await wait_for(lambda: all(n.client.state.adapter_version == 1 for n in nodes), 90)
        view = round_view(demo)
        assert view["state"] == "released" and view["release_version"] == 1
        assert view["received"] == 3 and view["refused"] == {}
        for node in nodes:
            assert [path.name for path, _ in node.swapper.adapters] == ["1.gguf"]
            assert len(node.trainer.calls) == 1  # one training run each: nothing was redone
    finally:
        for node in nodes:
            node.task.cancel()
        await asyncio.gather(*(n.task for n in nodes), return_exceptions=True)
        await demo.close()
        broker.stop()
