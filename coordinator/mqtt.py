"""The coordinator's broker client: a small Protocol, and its paho-mqtt 2.x implementation.

:class:`BrokerClient` is the seam the service uses (tests may pass another); :class:`PahoBroker` speaks
MQTT 3.1.1 to a real broker with

- QoS 1 both ways and a persistent session (``clean_session=False``, a fixed client id), so what the
  broker queued while we were away is delivered when we come back;
- manual acknowledgements: a received message is acknowledged only after the service processed it
  (stored or refused), so a coordinator that dies in between gets it again;
- reconnection with exponential backoff and jitter, TLS and username/password from
  :class:`~coordinator.config.BrokerConfig`: the connection itself is :class:`fleet.mqtt_link.MqttLink`,
  shared with the device.

Paho runs its network loop in its own thread; callbacks hand events to the asyncio loop with
``call_soon_threadsafe``. Nothing else crosses threads.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from coordinator.config import BrokerConfig
from coordinator.errors import BrokerError
from fleet.mqtt_link import QOS, Endpoint, MqttLink, MqttLinkError

log = logging.getLogger("coordinator.mqtt")


@dataclass(frozen=True)
class Inbound:
    """A message received from the broker; ``ack`` it once processed."""

    topic: str
    payload: bytes
    retain: bool = False
    mid: int = 0
    qos: int = QOS


@dataclass(frozen=True)
class Connected:
    """The client (re)connected and its subscriptions are in place; ``session_present`` tells whether
    the broker kept our session."""

    session_present: bool


BrokerEvent = Inbound | Connected


class BrokerClient(Protocol):
    """What the service needs from a broker connection."""

    async def run(self) -> None:
        """Connect and stay connected (reconnecting as needed) until cancelled."""
        ...

    def subscribe(self, filters: Sequence[str]) -> None:
        """Topic filters to subscribe to (QoS 1) now and on every reconnect."""
        ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1; queued by the client while disconnected."""
        ...

    async def events(self, *, max_batch: int) -> list[BrokerEvent]:
        """Wait for at least one event; return up to ``max_batch`` already waiting."""
        ...

    def ack(self, message: Inbound) -> None:
        """Acknowledge a processed message (QoS 1 PUBACK)."""
        ...


class PahoBroker:
    """:class:`BrokerClient` over paho-mqtt (see the module doc)."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        queue_size: int = 10_000,
        rng: random.Random | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self._config = config
        self._filters: list[str] = []
        self._queue: asyncio.Queue[BrokerEvent] = asyncio.Queue(maxsize=queue_size)
        self._session_present = False
        self._subscribe_mid: int | None = None
        tls = config.tls
        try:
            self._link = MqttLink(
                Endpoint(
                    host=config.host,
                    port=config.port,
                    keepalive_s=config.keepalive_s,
                    reconnect_min_s=config.reconnect_min_s,
                    reconnect_max_s=config.reconnect_max_s,
                    label=f"the broker {config.url}",
                    tls=config.use_tls,
                    ca_file=tls.ca_file if tls else None,
                    cert_file=tls.cert_file if tls else None,
                    key_file=tls.key_file if tls else None,
                    username=config.username,
                    password=config.read_password() if config.username is not None else None,
                ),
                client_id=config.client_id,
                log=log,
                manual_ack=True,
                rng=rng,
            )
        except MqttLinkError as exc:
            raise BrokerError(str(exc)) from exc
        self._client = self._link.client
        if will is not None:
            self._client.will_set(will[0], will[1], qos=QOS, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # -- the Protocol -------------------------------------------------------------------------------

    def subscribe(self, filters: Sequence[str]) -> None:
        self._filters = list(dict.fromkeys([*self._filters, *filters]))
        if self._client.is_connected():
            self._client.subscribe([(f, QOS) for f in filters])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")

    async def events(self, *, max_batch: int) -> list[BrokerEvent]:
        batch = [await self._queue.get()]
        while len(batch) < max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def ack(self, message: Inbound) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    async def run(self) -> None:
        await self._link.run()

    # -- paho callbacks (network thread) -----------------------------------------------------------

    def _post(self, event: BrokerEvent) -> None:
        self._link.call_in_loop(lambda: self._enqueue(event))

    def _enqueue(self, event: BrokerEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # Not acknowledged, so the broker delivers it again after the next reconnect.
            log.error(
                "inbound queue full; dropping a message from %s until redelivery",
                getattr(event, "topic", "?"),
            )

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("the broker refused the connection: %s", reason)
            return
        self._link.mark_connected()
        self._session_present = bool(flags.session_present)
        log.info("connected to %s (session present: %s)", self._config.url, flags.session_present)
        if self._filters:
            # Connected is posted once the broker confirmed the subscriptions (on_subscribe).
            _, self._subscribe_mid = client.subscribe([(f, QOS) for f in self._filters])
        else:
            self._post(Connected(session_present=self._session_present))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("the broker refused %d of our subscriptions: %s", len(failed), failed[0])
        self._post(Connected(session_present=self._session_present))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._link.mark_lost()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropping a message whose topic is not UTF-8")
            client.ack(message.mid, message.qos)
            return
        self._post(
            Inbound(
                topic=topic,
                payload=bytes(message.payload),
                retain=bool(message.retain),
                mid=int(message.mid),
                qos=int(message.qos),
            )
        )
