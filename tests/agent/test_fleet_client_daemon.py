"""The daemon runs the fleet client as one more supervised service when ``[fleet] enabled``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.daemon import Daemon
from agent.identity import keys_dir
from agent.notify import Notifier
from fleet.keys import Identity, Role
from fleet.messages import DeviceState, DeviceStatus
from fleet.sealing import open_signed
from fleet.topics import TopicKind, TopicLayout
from tests.coordinator.sim import MqttPeer
from tests.mosquitto import MosquittoBroker


async def test_daemon_starts_the_fleet_client(
    short_tmp: Path, demo_model: Any, mosquitto_broker: MosquittoBroker
) -> None:
    root = "daemonfleet"
    config = parse_config(
        {
            "paths": {"state_dir": str(short_tmp / "state"), "runtime_dir": str(short_tmp / "run")},
            "model": {"path": str(demo_model.q8_0)},
            "socket": {"enabled": False},
            "fleet": {"enabled": True, "broker_url": mosquitto_broker.url, "topic_root": root},
        }
    )
    identity = Identity.generate(Role.DEVICE)
    identity.save(keys_dir(config.paths.state_dir))
    peer = MqttPeer(mosquitto_broker.url, "daemon-fleet-watch")
    topic = TopicLayout(root).build(TopicKind.STATUS, identity.id)
    peer.subscribe(topic)
    daemon = Daemon(config, notifier=Notifier(None), load_model=False)
    task = asyncio.create_task(daemon.run())
    try:
        payload = await peer.next_on(topic, timeout=20)
        status = open_signed(payload, DeviceStatus, signer=identity.public)
        assert status.state is DeviceState.ONLINE and status.device_id == identity.id
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)
        peer.close()
