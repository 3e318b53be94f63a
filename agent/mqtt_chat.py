"""Chat over a LOCAL MQTT broker (docs/mqtt_chat.md).

Requests arrive on ``<prefix>/request`` (QoS 1) as the socket protocol's request JSON plus two
envelope fields, so MQTT 3.1.1 clients work::

    {"v": 1, "id": "r1", "type": "chat", "text": "hello", "reply_to": "me/replies", "correlation_id": "42"}

MQTT 5's response-topic and correlation-data properties are honoured when present (the JSON fields win
when both are given). The reply streams to the reply topic as the socket's ``delta`` / ``done`` /
``error`` events (``ping`` -> ``pong``, ``cancel`` -> ``cancelled``), each with ``correlation_id``
added when the request had one, and with the request's correlation-data property under MQTT 5.
``<prefix>/status`` holds ``online`` / ``offline`` (retained; ``offline`` is the will).

The privacy invariant: conversation text never crosses the fleet broker, so the door refuses to serve
on the fleet broker's address unless ``allow_fleet_broker = true``. Bad payloads get an ``error`` on
the reply topic when one can be found, are logged otherwise, and never stop the door.

paho's network loop runs in its own thread (``loop_start``) and reconnects with exponential backoff;
messages cross into asyncio with ``call_soon_threadsafe`` and wait in a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import AgentConfig, MqttChatConfig, MqttProtocolVersion
from agent.errors import AgentError, ConfigError, ProtocolError
from agent.frontdoor import ChatHandler, FrontDoor
from agent.protocol import (
    CancelledEvent,
    CancelRequest,
    ChatRequest,
    ErrorCode,
    Event,
    PingRequest,
    PongEvent,
    Request,
    decode_event,
    error_event,
    parse_request,
)

log = logging.getLogger("agent.mqtt_chat")

REQUEST_TOPIC = "request"
STATUS_TOPIC = "status"
MAX_TOPIC_CHARS = 512
MAX_CORRELATION_CHARS = 256
MAX_CORRELATION_DATA_BYTES = 1024
RESOLVE_TIMEOUT_S = 5.0

_DEFAULT_PORTS = {
    "mqtt": 1883,
    "tcp": 1883,
    "mqtts": 8883,
    "ssl": 8883,
    "tls": 8883,
    "mqtt+ssl": 8883,
    "ws": 80,
    "wss": 443,
}
_LOOPBACK = "loopback"

CorrelationId = str | int


# ---- which broker --------------------------------------------------------------------------------


def _normal_host(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return _LOOPBACK
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return _LOOPBACK
    return ip.compressed


@dataclass(frozen=True)
class BrokerAddress:
    """A broker's host (normalized: lower case, loopback names and addresses as one) and port."""

    host: str
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> BrokerAddress:
        return cls(host=_normal_host(host), port=port)

    @classmethod
    def parse(cls, value: str) -> BrokerAddress:
        """``mqtt://h:1883``, ``mqtts://h`` (8883), ``tcp://``, ``ssl://``, ``ws(s)://``, ``h:port``."""
        text = value.strip()
        if "://" in text:
            parsed = urlsplit(text)
            scheme = parsed.scheme.lower()
            if scheme not in _DEFAULT_PORTS:
                raise ConfigError(f"broker URL {value!r}: unknown scheme {scheme!r}")
        else:
            parsed = urlsplit(f"//{text}")
            scheme = "mqtt"
        try:
            port = parsed.port
        except ValueError:
            raise ConfigError(f"broker URL {value!r}: bad port") from None
        if not parsed.hostname:
            raise ConfigError(f"broker URL {value!r}: no host")
        return cls.of(parsed.hostname, port if port is not None else _DEFAULT_PORTS[scheme])

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def is_same_broker(a: str | BrokerAddress, b: str | BrokerAddress) -> bool:
    """Whether two broker addresses name the same listener, by their text (no DNS).

    Loopback names (``localhost``, ``127.0.0.1``, ``::1``, ``0.0.0.0``) count as one host. Two ports of
    one broker share its topics but cannot be told apart here; :func:`resolves_to_same_broker` adds a
    DNS comparison.
    """
    first = a if isinstance(a, BrokerAddress) else BrokerAddress.parse(a)
    second = b if isinstance(b, BrokerAddress) else BrokerAddress.parse(b)
    return first == second


async def _addresses(address: BrokerAddress) -> set[str]:
    if address.host == _LOOPBACK:
        return {_LOOPBACK}
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
    )
    return {_normal_host(str(info[4][0])) for info in infos}


async def resolves_to_same_broker(a: BrokerAddress, b: BrokerAddress) -> bool:
    """:func:`is_same_broker`, or the two host names resolve to a shared address on the same port.

    A name that does not resolve (offline, no DNS yet) compares by its text only.
    """
    if a == b:
        return True
    if a.port != b.port:
        return False
    try:
        first, second = await _addresses(a), await _addresses(b)
    except (OSError, asyncio.TimeoutError):
        return False
    return bool(first & second)


def privacy_refusal(local: BrokerAddress, fleet: BrokerAddress) -> str:
    return (
        f"[mqtt_chat] points at the fleet broker ({local}, the same as the fleet's broker {fleet}). "
        "Chat over MQTT carries conversation text, and conversation text must never cross the broker "
        "the fleet coordinator uses. Point [mqtt_chat] host/port at a local broker (the board's own "
        "Mosquitto or Home Assistant's), or set allow_fleet_broker = true if that broker is yours alone."
    )


# ---- topics and envelopes ------------------------------------------------------------------------


def check_topic(topic: str, what: str) -> str:
    """A topic this door may publish to or subscribe under: no wildcards, no ``$``, no NUL."""
    if not topic or len(topic) > MAX_TOPIC_CHARS:
        raise ValueError(f"{what} must be 1..{MAX_TOPIC_CHARS} characters")
    if any(c in topic for c in "+#\0"):
        raise ValueError(f"{what} must not contain '+', '#' or NUL")
    if topic.startswith("$"):
        raise ValueError(f"{what} must not start with '$'")
    return topic


def default_topic_prefix(device_name: str) -> str:
    return f"ppchat/local/{device_name}"


@dataclass(frozen=True)
class IncomingMessage:
    """What the paho thread hands over: the raw payload and the MQTT 5 properties that matter."""

    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class ReplyRoute:
    """Where and how to answer one request."""

    topic: str
    correlation_id: CorrelationId | None = None
    correlation_data: bytes | None = None


class EnvelopeError(Exception):
    """A request that cannot be served; ``route`` is where to say so, when one is known."""

    def __init__(self, error: ProtocolError, route: ReplyRoute | None, request_id: str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.route = route
        self.request_id = request_id


def _correlation_from_data(data: bytes | None) -> CorrelationId | None:
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if 0 < len(text) <= MAX_CORRELATION_CHARS else None


def parse_envelope(
    message: IncomingMessage, *, max_payload_bytes: int, forbidden_reply_topics: frozenset[str] = frozenset()
) -> tuple[Request, ReplyRoute]:
    """The request and where to answer it, or :class:`EnvelopeError` saying what is wrong."""
    data = message.correlation_data
    if data is not None and len(data) > MAX_CORRELATION_DATA_BYTES:
        data = None
    fallback = None
    if message.response_topic is not None:
        with contextlib.suppress(ValueError):
            check_topic(message.response_topic, "response topic")
            if message.response_topic not in forbidden_reply_topics:
                fallback = ReplyRoute(
                    message.response_topic, correlation_id=_correlation_from_data(data), correlation_data=data
                )

    def fail(code: ErrorCode, text: str, route: ReplyRoute | None, rid: str | None = None) -> EnvelopeError:
        return EnvelopeError(ProtocolError(code.value, text), route, rid)

    if len(message.payload) > max_payload_bytes:
        raise fail(
            ErrorCode.LINE_TOO_LONG,
            f"the message is {len(message.payload)} bytes; this agent accepts at most {max_payload_bytes}",
            fallback,
        )
    try:
        obj = json.loads(message.payload)
    except (ValueError, RecursionError):
        raise fail(ErrorCode.BAD_JSON, "the message is not valid JSON", fallback) from None
    if not isinstance(obj, dict):
        raise fail(ErrorCode.BAD_JSON, "a request must be a JSON object", fallback)
    rid = obj.get("id") if isinstance(obj.get("id"), str) and len(obj["id"]) <= 128 else None

    reply_to = obj.pop("reply_to", None)
    route = fallback
    if reply_to is not None:
        try:
            if not isinstance(reply_to, str):
                raise ValueError("'reply_to' must be a string")
            check_topic(reply_to, "'reply_to'")
            if reply_to in forbidden_reply_topics:
                raise ValueError("'reply_to' must not be this agent's own request or status topic")
        except ValueError as exc:
            raise fail(ErrorCode.BAD_REQUEST, str(exc), fallback, rid) from None
        route = ReplyRoute(reply_to, correlation_id=_correlation_from_data(data), correlation_data=data)
    correlation: Any = obj.pop("correlation_id", None)
    if correlation is not None and (
        isinstance(correlation, bool)
        or not isinstance(correlation, (str, int))
        or (isinstance(correlation, str) and not 0 < len(correlation) <= MAX_CORRELATION_CHARS)
        or (isinstance(correlation, int) and not -(2**63) <= correlation < 2**63)
    ):
        raise fail(
            ErrorCode.BAD_REQUEST,
            f"'correlation_id' must be a string of 1..{MAX_CORRELATION_CHARS} characters or a 64-bit integer",
            route,
            rid,
        )
    if route is None:
        raise fail(
            ErrorCode.BAD_REQUEST,
            "a request needs a reply topic: 'reply_to' in the JSON (or the MQTT 5 response topic)",
            None,
            rid,
        )
    if correlation is not None:
        route = ReplyRoute(route.topic, correlation_id=correlation, correlation_data=route.correlation_data)
    try:
        request = parse_request(json.dumps(obj))
    except ProtocolError as exc:
        raise EnvelopeError(exc, route, rid) from None
    return request, route


def encode_mqtt_event(event: Event, correlation_id: CorrelationId | None) -> bytes:
    """The socket protocol's event JSON (one object, no newline) with ``correlation_id`` added."""
    obj = event.model_dump(mode="json")
    if correlation_id is not None:
        obj["correlation_id"] = correlation_id
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_mqtt_event(payload: bytes | str) -> tuple[CorrelationId | None, Event]:
    """For clients: an event published by this door, and its correlation id."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON.value, "bad event from agent: not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON.value, "bad event from agent: not a JSON object")
    correlation = obj.pop("correlation_id", None)
    return correlation, decode_event(json.dumps(obj))


# ---- the door ------------------------------------------------------------------------------------


def _read_password(config: MqttChatConfig) -> str | None:
    if config.password_path is None:
        return config.password
    try:
        lines = config.password_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"mqtt_chat.password_path: cannot read {config.password_path}: {exc}") from None
    return lines[0] if lines else ""


class MqttChatDoor:
    """Serves chat on ``<prefix>/request`` of a local broker until cancelled."""

    def __init__(
        self,
        config: MqttChatConfig,
        handler: ChatHandler,
        *,
        device_name: str = "ppchat-device",
        fleet_broker_url: str | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.prefix = config.topic_prefix or default_topic_prefix(device_name)
        try:
            check_topic(self.prefix, "mqtt_chat.topic_prefix")
        except ValueError as exc:
            hint = "" if config.topic_prefix else " (it is derived from device_name: set topic_prefix)"
            raise ConfigError(f"{exc}{hint}") from None
        if self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ConfigError("mqtt_chat.topic_prefix must not start or end with '/'")
        self.request_topic = f"{self.prefix}/{REQUEST_TOPIC}"
        self.status_topic = f"{self.prefix}/{STATUS_TOPIC}"
        self._forbidden = frozenset({self.request_topic, self.status_topic})
        self.broker = BrokerAddress.of(config.host, config.effective_port)
        self.fleet_broker = BrokerAddress.parse(fleet_broker_url) if fleet_broker_url else None
        safe_name = re.sub(r"[^A-Za-z0-9_-]", "-", device_name)[:40]
        self.client_id = config.client_id or f"ppchat-chat-{safe_name}-{uuid.uuid4().hex[:6]}"
        self._client: mqtt.Client | None = None
        self._queue: asyncio.Queue[tuple[ChatRequest, ReplyRoute]] | None = None
        self._inflight: dict[tuple[str, str], threading.Event] = {}
        self._failure: asyncio.Future[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self.served = 0
        """Chat requests answered (any outcome), for status and tests."""

    # -- lifecycle --

    async def check_privacy(self) -> None:
        """Refuse the fleet broker (raises :class:`ConfigError`) unless explicitly allowed."""
        if self.fleet_broker is None:
            return
        if not await resolves_to_same_broker(self.broker, self.fleet_broker):
            return
        message = privacy_refusal(self.broker, self.fleet_broker)
        if not self.config.allow_fleet_broker:
            raise ConfigError(message)
        log.warning("mqtt_chat: allow_fleet_broker is set: serving chat on the fleet broker %s", self.broker)

    async def wait_connected(self) -> None:
        """Until subscribed to the request topic (tests, status)."""
        await self._connected.wait()

    async def serve(self) -> None:
        """The daemon supervisor's name for :meth:`run`."""
        await self.run()

    async def shutdown(self, *, grace_s: float) -> None:
        """Refuse new chats (``shutting_down``), cancel those in flight or queued and give them
        ``grace_s`` to publish their last event; then the supervisor cancels :meth:`run`."""
        self._closing = True
        for cancel in self._inflight.values():
            cancel.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        await self.check_privacy()
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.config.max_pending)
        self._failure = loop.create_future()
        client = self._make_client(loop)
        self._client = client
        client.connect_async(self.config.host, self.config.effective_port, keepalive=self.config.keepalive_s)
        client.loop_start()
        workers = [
            loop.create_task(self._worker(), name=f"mqtt_chat worker {i}")
            for i in range(self.config.max_concurrent)
        ]
        for worker in workers:
            worker.add_done_callback(self._worker_done)
        log.info("mqtt_chat: serving %s on %s", self.request_topic, self.broker)
        try:
            await self._failure
        finally:
            for cancel in self._inflight.values():
                cancel.set()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.to_thread(self._shutdown_client, client)
            self._client = None
            self._connected.clear()

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._failure is not None and not self._failure.done():
            self._failure.set_exception(exc)

    def _shutdown_client(self, client: mqtt.Client) -> None:
        if client.is_connected():
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        client.disconnect()
        client.loop_stop()

    def _make_client(self, loop: asyncio.AbstractEventLoop) -> mqtt.Client:
        cfg = self.config
        v5 = cfg.protocol is MqttProtocolVersion.V5
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)
        client.max_queued_messages_set(1000)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, _read_password(cfg))
        if cfg.tls:
            try:
                client.tls_set(
                    ca_certs=str(cfg.tls_ca_path) if cfg.tls_ca_path else None,
                    certfile=str(cfg.tls_cert_path) if cfg.tls_cert_path else None,
                    keyfile=str(cfg.tls_key_path) if cfg.tls_key_path else None,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"mqtt_chat TLS settings: {exc}") from None
            if cfg.tls_insecure:
                client.tls_insecure_set(True)
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)

        def on_connect(
            client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
        ) -> None:
            if reason.is_failure:
                log.warning("mqtt_chat: broker %s refused the connection: %s", self.broker, reason)
                return
            failures[0] = 0
            client.subscribe(self.request_topic, qos=1)
            client.publish(self.status_topic, b"online", qos=1, retain=True)
            log.info("mqtt_chat: connected to %s", self.broker)
            with contextlib.suppress(RuntimeError):  # the loop is closing: shutting down
                loop.call_soon_threadsafe(self._connected.set)

        failures = [0]

        def on_connect_fail(client: mqtt.Client, userdata: Any) -> None:
            failures[0] += 1
            level = logging.WARNING if failures[0] == 1 else logging.DEBUG
            log.log(level, "mqtt_chat: cannot reach the broker %s; retrying with backoff", self.broker)

        def on_disconnect(
            client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
        ) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._connected.clear)
            if reason.is_failure:
                log.warning("mqtt_chat: lost the broker %s (%s); reconnecting", self.broker, reason)

        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            if message.retain:
                log.warning("mqtt_chat: ignoring a retained request on %s", message.topic)
                return
            props = message.properties
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            incoming = IncomingMessage(
                payload=bytes(message.payload),
                response_topic=response_topic if isinstance(response_topic, str) else None,
                correlation_data=bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None,
            )
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_message, incoming)

        client.on_connect = on_connect
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        return client

    # -- requests (on the event loop) --

    def _on_message(self, message: IncomingMessage) -> None:
        """Ping and cancel are answered at once; chat requests queue for a worker."""
        try:
            request, route = parse_envelope(
                message,
                max_payload_bytes=self.config.max_payload_bytes,
                forbidden_reply_topics=self._forbidden,
            )
        except EnvelopeError as exc:
            where = exc.route.topic if exc.route else "nowhere (no reply topic)"
            log.info(
                "mqtt_chat: bad request (%s): %s; error sent to %s", exc.error.code, exc.error.message, where
            )
            if exc.route is not None:
                self.publish(
                    exc.route, error_event(exc.request_id, ErrorCode(exc.error.code), exc.error.message)
                )
            return
        if isinstance(request, PingRequest):
            self.publish(route, PongEvent(id=request.id))
        elif isinstance(request, CancelRequest):
            cancel = self._inflight.get((route.topic, request.target))
            if cancel is not None:
                cancel.set()
            self.publish(
                route, CancelledEvent(id=request.id, target=request.target, found=cancel is not None)
            )
        else:
            self._enqueue(request, route)

    def _enqueue(self, request: ChatRequest, route: ReplyRoute) -> None:
        assert self._queue is not None
        key = (route.topic, request.id)
        if self._closing:
            message = "the agent is shutting down"
            self.publish(route, error_event(request.id, ErrorCode.SHUTTING_DOWN, message))
            return
        if key in self._inflight:
            message = f"a request with id {request.id!r} for this reply topic is still in flight"
            self.publish(route, error_event(request.id, ErrorCode.DUPLICATE_ID, message))
            return
        try:
            self._queue.put_nowait((request, route))
        except asyncio.QueueFull:
            message = f"the agent has {self.config.max_pending} MQTT requests waiting; try again later"
            self.publish(route, error_event(request.id, ErrorCode.TOO_MANY_REQUESTS, message))
            return
        self._inflight[key] = threading.Event()

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            request, route = await self._queue.get()
            try:
                await self._serve(request, route)
            finally:
                self._inflight.pop((route.topic, request.id), None)
                self.served += 1

    async def _serve(self, request: ChatRequest, route: ReplyRoute) -> None:
        cancel = self._inflight.get((route.topic, request.id)) or threading.Event()
        stream = self.handler.handle(
            request, source=FrontDoor.MQTT, cancel=cancel, client=f"mqtt:{route.topic}"
        )
        try:
            async for event in stream:
                self.publish(route, event)
        except AgentError as exc:
            self.publish(route, error_event(request.id, ErrorCode.ENGINE_ERROR, str(exc)))
        finally:
            cancel.set()
            await _close(stream)

    def publish(self, route: ReplyRoute, event: Event) -> None:
        """Publish one event (QoS 1) on the route's topic; paho queues it while disconnected."""
        client = self._client
        if client is None:
            return
        properties = None
        if route.correlation_data is not None and self.config.protocol is MqttProtocolVersion.V5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = route.correlation_data
        info = client.publish(
            route.topic, encode_mqtt_event(event, route.correlation_id), qos=1, properties=properties
        )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("mqtt_chat: cannot publish to %s: %s", route.topic, mqtt.error_string(info.rc))


def fleet_broker_url_of(config: AgentConfig) -> str | None:
    """The fleet broker's URL from the agent's config; ``None`` when no fleet is configured."""
    return config.fleet.broker_url


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
