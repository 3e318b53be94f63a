"""A whole federated round through a real Mosquitto: three devices with different private
conversations train, send sealed top-k updates, the coordinator aggregates and releases, every device
hot-swaps the global adapter. A listener on ``#`` sees every byte the broker carried: no canary from any
device's conversations may appear in it, in clear or decompressed, and every update is ciphertext. A
fourth device, offline during the round, picks up the retained release when it comes back."""

from __future__ import annotations

import contextlib
import queue
import re
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.demo_round import PRIVATE, DemoRound
from agent.scheduler import Check, RuleName, Verdict
from fleet.codec import decode
from fleet.errors import FleetError
from fleet.sealing import read_signed
from fleet.topics import TopicKind, TopicLayout
from tests.coordinator.sim import MqttPeer
from tests.mosquitto import mosquitto_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_OUT = 64 * 1024 * 1024


class NeverIdle:
    """The scheduler's answer for a device that is busy all the time: no training."""

    def check(self) -> Verdict:
        return Verdict(
            allowed=False,
            checks=(Check(rule=RuleName.IDLE, ok=False, reason="in use"),),
            at=datetime.now(timezone.utc),
        )


def decompressed_views(payload: bytes) -> list[bytes]:
    """``payload`` itself and whatever zstd or zlib streams start anywhere inside it."""
    views = [payload]
    for match in re.finditer(re.escape(ZSTD_MAGIC), payload):
        try:
            reader = zstandard.ZstdDecompressor().decompressobj()
            views.append(reader.decompress(payload[match.start() :])[:MAX_OUT])
        except zstandard.ZstdError:
            pass
    for offset in range(len(payload) - 1):
        if payload[offset] == 0x78 and payload[offset + 1] in (0x01, 0x5E, 0x9C, 0xDA):
            with contextlib.suppress(zlib.error):
                views.append(zlib.decompressobj().decompress(payload[offset:], MAX_OUT))
    return views


def secrets_of(index: int) -> list[bytes]:
    question, answer = PRIVATE[index % len(PRIVATE)]
    token = re.search(r"canary-[a-z]+-\d+", answer)
    assert token is not None
    return [token.group(0).encode(), answer.encode(), question.encode()]


@pytest.fixture
def model_path(demo_model: Any) -> Path:
    return Path(demo_model.q8_0)


async def test_round_through_mosquitto_leaks_nothing_and_offline_device_catches_up(
    tmp_path: Path, model_path: Path
) -> None:
    if not mosquitto_available():
        pytest.fail("mosquitto is not installed (Debian: apt-get install mosquitto)")
    demo = DemoRound(
        workdir=tmp_path,
        model_path=model_path,
        n_devices=4,
        max_steps=3,
        use_mosquitto=True,
        say=lambda _: None,
    )
    demo.gates[3] = NeverIdle()
    sniffer: MqttPeer | None = None
    try:
        demo.start_broker()
        sniffer = MqttPeer(demo.url, "e2e-sniffer")
        sniffer.subscribe("#")
        # start() sets up the coordinator and the devices and waits for every enrollment.
        demo.start_broker = lambda: None  # type: ignore[method-assign]
        await demo.start()
        offline = demo.devices[3]
        await demo.stop_device(offline)  # away for the whole round
        version = await demo.run_round(devices=demo.devices[:3], timeout_s=400)
        assert version == 1
        for device in demo.devices[:3]:
            assert device.client is not None and device.engine is not None
            assert device.client.state.adapter_version == 1
            active = [p for p, _ in device.engine.adapters]
            assert active == [device.config.global_adapters_dir / "1.gguf"]
            sent = device.client.progress.sent[1]
            assert sent.sealed_bytes < sent.dense_bytes
            # the ledger lists what left the device
            from agent.train.ledger import PrivacyLedger

            egress = PrivacyLedger(device.config.ledger_path).read().egress
            assert [(e.round_id, e.bytes) for e in egress] == [(1, sent.sealed_bytes)]

        # The offline device comes back and installs the retained release without training.
        await demo.start_device(offline)
        from agent.demo_round import wait_for

        await wait_for(lambda: offline.client is not None and offline.client.state.adapter_version == 1, 60)
        assert offline.client is not None and 1 not in offline.client.progress.sent
        assert (offline.config.global_adapters_dir / "1.gguf").is_file()
    finally:
        await demo.close()
        if sniffer is not None:
            sniffer.close()

    assert sniffer is not None
    captured: list[tuple[str, bytes]] = []
    while True:
        try:
            captured.append(sniffer.received.get_nowait())
        except queue.Empty:
            break
    layout = TopicLayout()
    updates = [p for t, p in captured if p and layout.parse(t).kind is TopicKind.UPDATE]
    assert len(updates) >= 3
    assert any(layout.parse(t).kind is TopicKind.RELEASES for t, p in captured if p)
    for update in updates:
        signed = read_signed(update)
        assert signed.header["kind"] == "update"
        body = signed.body
        assert b"PPCU" not in body and ZSTD_MAGIC not in body
        with pytest.raises(FleetError):
            decode(body)
        assert len(set(body)) > min(200, len(body) // 4)  # ciphertext: bytes spread over the range
    forbidden = [s for i in range(4) for s in secrets_of(i)]
    for topic, payload in captured:
        for view in decompressed_views(payload):
            for secret in forbidden:
                assert secret not in view, f"{secret!r} crossed the broker on {topic}"
