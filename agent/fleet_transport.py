"""The device's connection to the fleet broker: paho-mqtt 2, MQTT 3.1.1, QoS 1, persistent session.

The client id is the device id and ``clean_session`` is false, so the broker keeps the device's
subscriptions and queues QoS 1 messages while it is away. The connection and its reconnects
(exponential backoff with jitter) are :class:`fleet.mqtt_link.MqttLink`, shared with the coordinator.
The last will (set again before every connect, so its time is fresh) is the device's signed
"offline" status, retained. paho's network thread hands messages to the asyncio loop through a queue;
nothing here decodes a payload (that is :mod:`agent.fleet_client`'s job).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from agent.config import FleetConfig
from agent.errors import AgentError
from fleet.mqtt_link import QOS, Endpoint, MqttLink, MqttLinkError

log = logging.getLogger("agent.fleet")


class FleetTransportError(AgentError):
    """The fleet broker connection cannot be set up (TLS files, credentials)."""


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class FleetTransport(Protocol):
    """What the fleet client needs from a broker connection (tests may pass another)."""

    connected: asyncio.Event

    def subscribe(self, filters: Sequence[str]) -> None: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Any:
        """Queue ``payload`` at QoS 1; returns a handle for :meth:`wait_published`."""
        ...

    async def wait_published(self, handle: Any, *, timeout_s: float) -> bool:
        """True once the broker acknowledged the publication."""
        ...

    async def run(self) -> None:
        """Connect and stay connected (reconnecting) until cancelled."""
        ...

    async def receive(self) -> Received: ...


def read_password(config: FleetConfig, default_file: Any | None = None) -> str | None:
    path = config.password_path or default_file
    if config.password is not None:
        return config.password
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FleetTransportError(f"cannot read the fleet broker password file {path}: {exc}") from None


class PahoTransport:
    """:class:`FleetTransport` over paho-mqtt 2 (see the module doc)."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        will: Callable[[], tuple[str, bytes]] | None = None,
        on_connect: Callable[[], None] | None = None,
        rng: random.Random | None = None,
        queue_size: int = 1024,
    ) -> None:
        self._config = config
        self._will = will
        self._on_connect_hook = on_connect
        self._filters: list[str] = []
        self._queue: asyncio.Queue[Received] = asyncio.Queue(maxsize=queue_size)
        self.connected = asyncio.Event()
        try:
            self._link = MqttLink(
                Endpoint(
                    host=config.host,
                    port=config.port,
                    keepalive_s=config.keepalive_s,
                    reconnect_min_s=config.reconnect_min_s,
                    reconnect_max_s=config.reconnect_max_s,
                    label=f"the fleet broker {config.broker_url}",
                    tls=config.use_tls,
                    ca_file=config.tls_ca_path,
                    cert_file=config.tls_cert_path,
                    key_file=config.tls_key_path,
                    username=username,
                    password=password,
                ),
                client_id=client_id,
                log=log,
                before_connect=self._set_will,
                on_lost=self.connected.clear,
                rng=rng,
            )
        except MqttLinkError as exc:
            raise FleetTransportError(str(exc)) from None
        self._client = self._link.client
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def subscribe(self, filters: Sequence[str]) -> None:
        self._filters = list(dict.fromkeys([*self._filters, *filters]))
        if self._client.is_connected():
            self._client.subscribe([(f, QOS) for f in filters])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise FleetTransportError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        return info

    async def wait_published(self, handle: Any, *, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if handle.is_published():
                return True
            await asyncio.sleep(0.05)
        return bool(handle.is_published())

    async def receive(self) -> Received:
        return await self._queue.get()

    def _set_will(self) -> None:
        """Before every connect: the last will, signed now (its time stays fresh)."""
        if self._will is not None:
            topic, payload = self._will()
            self._client.will_set(topic, payload, qos=QOS, retain=True)

    async def run(self) -> None:
        await self._link.run()

    def drop(self) -> None:
        """Close the socket without a DISCONNECT (tests: the broker publishes the last will)."""
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    # -- paho callbacks (network thread) ----------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        self._link.call_in_loop(fn)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("the fleet broker refused the connection: %s", reason)
            return
        self._link.mark_connected()
        log.info(
            "connected to the fleet broker %s (session present: %s)",
            self._config.broker_url,
            flags.session_present,
        )
        if self._filters:
            client.subscribe([(f, QOS) for f in self._filters])

        def connected() -> None:
            self.connected.set()
            if self._on_connect_hook is not None:
                self._on_connect_hook()

        self._call(connected)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._link.mark_lost()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        item = Received(topic=topic, payload=bytes(message.payload), retain=bool(message.retain))

        def put() -> None:
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                log.error("fleet inbound queue full; dropping a message on %s", item.topic)

        self._call(put)
