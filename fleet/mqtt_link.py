"""The MQTT connection both services keep to the fleet broker.

paho-mqtt 2 speaking MQTT 3.1.1 (Mosquitto, EMQX, HiveMQ, cloud IoT brokers and amqtt all take it),
a persistent session (``clean_session`` false, a fixed client id) so that QoS 1 messages wait for
an absent client, nothing dropped by paho while offline (``max_queued_messages`` 0), TLS and
username/password when configured. :meth:`MqttLink.run` connects and reconnects with exponential
backoff and jitter until cancelled; the owner (the device's :mod:`agent.fleet_transport`, the
coordinator's :mod:`coordinator.mqtt`) sets the paho callbacks on :attr:`MqttLink.client` and tells
the link from them when the connection is up (:meth:`~MqttLink.mark_connected`) or lost
(:meth:`~MqttLink.mark_lost`). paho's network thread reaches the event loop only through
:meth:`~MqttLink.call_in_loop`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

QOS = 1


class MqttLinkError(ValueError):
    """The connection cannot be set up (TLS files); the message says why."""


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: uniform in ``[d/2, d]``, ``d = min(cap, base * 2**attempt)``."""
    ceiling = min(cap_s, base_s * (2.0 ** min(attempt, 30)))
    return rng.uniform(ceiling / 2.0, ceiling)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect."""

    host: str
    port: int
    keepalive_s: int
    reconnect_min_s: float
    reconnect_max_s: float
    label: str
    """How logs name the broker (e.g. its URL)."""
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None


class MqttLink:
    """One paho client kept connected (see the module doc)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        client_id: str,
        log: logging.Logger,
        manual_ack: bool = False,
        before_connect: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._log = log
        self._before_connect = before_connect
        """Called before every connection attempt (e.g. to set a fresh last will)."""
        self._on_lost = on_lost
        """Called in the event loop when a connection ends."""
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost: asyncio.Event | None = None
        self._was_connected = False
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        self.client.max_queued_messages_set(0)  # unlimited: nothing we publish is dropped while offline
        if endpoint.username is not None:
            self.client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls or endpoint.cert_file is not None:
            try:
                self.client.tls_set(
                    ca_certs=str(endpoint.ca_file) if endpoint.ca_file else None,
                    certfile=str(endpoint.cert_file) if endpoint.cert_file else None,
                    keyfile=str(endpoint.key_file) if endpoint.key_file else None,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise MqttLinkError(f"cannot set up TLS to {endpoint.label}: {exc}") from None

    # -- from paho's network thread ----------------------------------------------------------------

    def call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    def mark_connected(self) -> None:
        self._was_connected = True

    def mark_lost(self) -> None:
        lost = self._lost
        if lost is not None:
            self.call_in_loop(lost.set)

    # -- in the event loop -------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        e = self.endpoint
        return backoff_delay(attempt, base_s=e.reconnect_min_s, cap_s=e.reconnect_max_s, rng=self._rng)

    async def run(self) -> None:
        """Connect and stay connected (reconnecting) until cancelled; then disconnect."""
        self._loop = asyncio.get_running_loop()
        e = self.endpoint
        attempt = 0
        try:
            while True:
                self._lost = asyncio.Event()
                self._was_connected = False
                if self._before_connect is not None:
                    self._before_connect()
                try:
                    await asyncio.to_thread(self.client.connect, e.host, e.port, e.keepalive_s)
                except (OSError, ValueError) as exc:  # ssl.SSLError and socket errors are OSErrors
                    delay = self._delay(attempt)
                    self._log.warning("%s unreachable (%s); retrying in %.1f s", e.label, exc, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                self.client.loop_start()
                try:
                    await self._lost.wait()
                finally:
                    if self._on_lost is not None:
                        self._on_lost()
                    await asyncio.to_thread(self.client.loop_stop)
                if self._was_connected:
                    attempt = 0
                delay = self._delay(attempt)
                self._log.warning("lost %s; reconnecting in %.1f s", e.label, delay)
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            if self._on_lost is not None:
                self._on_lost()
            if self.client.is_connected():
                self.client.disconnect()
            await asyncio.to_thread(self.client.loop_stop)
