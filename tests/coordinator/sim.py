"""Simulated devices and a manual clock for coordinator tests (real fleet keys, codec and sealing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from coordinator.store import Store
from fleet.codec import encode
from fleet.keys import Identity, PublicKeys, Role
from fleet.messages import RoundSpec, UpdateHeader
from fleet.sealing import new_nonce, seal_update

LAYOUT = {"layers.0.self_attn.q_proj.lora_B": (32, 4), "layers.0.self_attn.v_proj.lora_B": (32, 4)}
BASE_SHA = "ab" * 32


class ManualClock:
    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime(2025, 1, 1, tzinfo=timezone.utc)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


@dataclass
class SimDevice:
    name: str
    identity: Identity = field(default_factory=lambda: Identity.generate(Role.DEVICE))

    @property
    def id(self) -> str:
        return self.identity.id

    def enroll_directly(self, store: Store, *, now: float = 0.0) -> None:
        store.add_device(
            self.id,
            name=self.name,
            signing_pk=self.identity.public.signing,
            encryption_pk=self.identity.public.encryption,
            now=now,
        )

    def delta(self, seed: int, *, scale: float = 0.1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in LAYOUT.items()
        }

    def sealed_update(
        self,
        spec: RoundSpec,
        coordinator: PublicKeys,
        *,
        seed: int = 0,
        samples: int = 10,
        round_id: int | None = None,
        nonce: str | None = None,
        norm_bound: float | None = None,
        encode_bound: float | None = None,
        sent_at: datetime | None = None,
    ) -> tuple[bytes, dict[str, np.ndarray]]:
        """A sealed update for ``spec`` and the dense delta the coordinator should decode from it."""
        encoded = encode(
            self.delta(seed),
            norm_bound=encode_bound or spec.norm_bound,
            topk_fraction=spec.codec.topk_fraction,
            quantization=spec.codec.quantization,
        )
        header = UpdateHeader(
            round_id=round_id or spec.round_id,
            device_id=self.id,
            nonce=nonce or new_nonce(),
            sample_count=samples,
            norm_bound=norm_bound or spec.norm_bound,
            epsilon=1.0,
            delta=1e-5,
            codec=spec.codec,
            sent_at=sent_at or spec.announced_at,
        )
        return seal_update(header, encoded.data, device=self.identity, coordinator=coordinator), encoded.sent


class MqttPeer:
    """A plain paho client standing in for devices on a real broker (its own network thread)."""

    def __init__(self, url: str, client_id: str) -> None:
        import queue
        from urllib.parse import urlsplit

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        parts = urlsplit(url)
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self.client.on_message = lambda c, u, m: self.received.put((m.topic, bytes(m.payload)))
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, 30)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        # Not waiting for the PUBACK: the broker may run on the caller's event loop (amqtt).
        self.client.publish(topic, payload, qos=1, retain=retain)

    async def next_on(self, topic: str, *, timeout: float = 10.0) -> bytes:
        import asyncio
        import queue

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                got_topic, payload = self.received.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.02)
                continue
            if got_topic == topic and payload:
                return payload
        raise TimeoutError(f"nothing on {topic} within {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
