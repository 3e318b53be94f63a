"""``coordinator serve``: the MQTT service around the round state machine.

One supervisor (:func:`supervise`) owns three tasks and ends them all when one fails or ``stop`` is set
(SIGTERM): the broker connection (:meth:`BrokerClient.run`), the inbound loop and the ticker.

- **Inbound**: events come in batches; each batch is processed in one store transaction (one fsync for
  many updates) and its messages are acknowledged only after the commit. Per-device topics:
  ``update`` -> :meth:`RoundManager.receive`; ``enroll`` -> :func:`coordinator.devices.enroll`, the signed
  reply published (retained) on the device's ``enrolled`` topic; ``status`` / ``telemetry`` -> verified
  with the device's key, its last-seen time and adapter version recorded. Anything malformed is logged
  and acknowledged; only store failures stop the service.
- **Ticker**: every ``tick_s`` picks up rounds created by ``coordinator round start`` (announcing them,
  signed and retained) and closes due rounds, publishing their signed releases, retained.
- **(Re)connect**: publishes the open round's announcement and the latest release again (retained), so a
  broker that lost its retained messages gets them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.devices import StoreRegistry, enroll
from coordinator.errors import EnrollmentError, UpdateRejected
from coordinator.mqtt import BrokerClient, Connected, Inbound
from coordinator.rounds import RoundManager, RoundOutcome
from coordinator.store import Store
from fleet.errors import FleetError, TopicError
from fleet.keys import Identity
from fleet.messages import DeviceStatus, RoundSpec, Telemetry
from fleet.sealing import Clock, open_device_signed
from fleet.topics import TopicKind, TopicLayout

log = logging.getLogger("coordinator.service")

MAX_BATCH = 256


async def supervise(stop: asyncio.Event, *coroutines: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutines`` until ``stop`` is set or one of them ends; re-raise the first failure."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in [*tasks, stopper]:
            task.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)


class Service:
    """The coordinator's MQTT service (see the module doc)."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        store: Store,
        identity: Identity,
        broker: BrokerClient,
        clock: Clock,
        rounds: RoundManager | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._identity = identity
        self._broker = broker
        self._clock = clock
        self._topics = TopicLayout(config.broker.topic_root)
        self._registry = StoreRegistry(store)
        self.rounds = rounds or RoundManager(
            store,
            identity,
            clock=clock,
            aggregation=config.aggregation,
            max_update_bytes=config.rounds.max_update_bytes,
        )
        self.connected = asyncio.Event()
        """Set once connected and subscribed (for health checks and tests)."""
        self.outcomes: list[RoundOutcome] = []
        """Rounds this service closed (for the CLI's summary and tests)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raise if the broker task or the store fails."""
        self._broker.subscribe(
            [
                self._topics.filter(TopicKind.UPDATE),
                self._topics.filter(TopicKind.ENROLL),
                self._topics.filter(TopicKind.STATUS),
                self._topics.filter(TopicKind.TELEMETRY),
            ]
        )
        for spec in self.rounds.sync():
            self._announce(spec)
        self._publish_release()
        log.info("coordinator %s serving on %s", self._identity.id, self._config.broker.url)
        await supervise(stop, self._broker.run(), self._inbound(), self._ticker())
        log.info("coordinator stopped")

    # -- publishing ----------------------------------------------------------------------------------

    def _announce(self, spec: RoundSpec) -> None:
        self._broker.publish(
            self._topics.build(TopicKind.ROUNDS), self.rounds.announcement(spec), retain=True
        )
        log.info("announced round %d", spec.round_id)

    def _publish_release(self) -> None:
        record = self._store.latest_release()
        if record is not None:
            self._broker.publish(self._topics.build(TopicKind.RELEASES), record.payload, retain=True)

    def _publish_state(self) -> None:
        for spec in self.rounds.open_specs():
            self._announce(spec)
        self._publish_release()

    def _close_due(self) -> None:
        for outcome in self.rounds.tick():
            self.outcomes.append(outcome)
            if outcome.release is not None:
                self._broker.publish(
                    self._topics.build(TopicKind.RELEASES), outcome.release.frame, retain=True
                )
                log.info("published release %d", outcome.release.release.version)

    # -- tasks ---------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            for spec in self.rounds.sync():
                self._announce(spec)
            self._close_due()
            await asyncio.sleep(self._config.tick_s)

    async def _inbound(self) -> None:
        while True:
            events = await self._broker.events(max_batch=MAX_BATCH)
            messages = [e for e in events if isinstance(e, Inbound)]
            if any(isinstance(e, Connected) for e in events):
                self._publish_state()
                self.connected.set()
            target_reached = False
            with self._store.transaction():
                for message in messages:
                    target_reached |= self._handle(message)
            for message in messages:
                self._broker.ack(message)
            if target_reached:
                self._close_due()

    def _handle(self, message: Inbound) -> bool:
        """Process one message; True when it completed a round's target."""
        if not message.payload:
            return False  # a cleared retained message
        try:
            topic = self._topics.parse(message.topic)
        except TopicError as exc:
            log.warning("ignoring a message: %s", exc)
            return False
        now = self._clock.now()
        if topic.kind is TopicKind.UPDATE:
            try:
                return self.rounds.receive(message.payload, topic_device=topic.device_id).target_reached
            except UpdateRejected:
                return False  # logged and recorded by the round manager
        if topic.kind is TopicKind.ENROLL:
            try:
                outcome = enroll(
                    self._store, self._identity, message.payload, topic_device=topic.device_id, now=now
                )
            except EnrollmentError as exc:
                log.warning("enrollment request on %s ignored: %s", message.topic, exc)
                return False
            self._broker.publish(
                self._topics.build(TopicKind.ENROLLED, outcome.device_id), outcome.reply, retain=True
            )
            return False
        if topic.kind in (TopicKind.STATUS, TopicKind.TELEMETRY):
            self._device_report(message, topic.kind, topic.device_id, now.timestamp())
        return False

    def _device_report(self, message: Inbound, kind: TopicKind, device_id: str | None, now: float) -> None:
        try:
            if kind is TopicKind.STATUS:
                status = open_device_signed(
                    message.payload, DeviceStatus, registry=self._registry, device_id=device_id
                )
                self._store.touch_device(status.device_id, now=now, adapter_version=status.adapter_version)
            else:
                telemetry = open_device_signed(
                    message.payload, Telemetry, registry=self._registry, device_id=device_id
                )
                self._store.touch_device(telemetry.device_id, now=now)
        except FleetError as exc:
            log.debug("ignoring %s from %s: %s", kind.value, device_id, exc)


@contextlib.asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[object]:
    """An in-process amqtt broker (MQTT 3.1.1) for the demo; see ``coordinator serve --help``.

    Caveat (measured with amqtt 0.12.1): it keeps retained messages but did not deliver QoS 1 messages
    queued for a persistent session while its client was offline (Mosquitto did, in the same test).
    Use it for demos and fleets whose devices stay connected; run production and reliability tests on
    Mosquitto (or another full broker).
    """
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 10_000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    log.info("embedded broker (amqtt) listening on %s:%d", host, port)
    try:
        yield broker
    finally:
        await broker.shutdown()
