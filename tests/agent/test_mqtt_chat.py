"""Chat over a local MQTT broker: a real Mosquitto, and mosquitto_pub / mosquitto_sub as a user's
script would use them. The chat handler here is scripted (door logic); test_mqtt_chat_e2e.py uses the
real ChatService on the demo model."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import MqttChatConfig, parse_config
from agent.errors import ConfigError
from agent.frontdoor import FrontDoor
from agent.generation import FinishReason
from agent.mqtt_chat import (
    BrokerAddress,
    EnvelopeError,
    IncomingMessage,
    MqttChatDoor,
    decode_mqtt_event,
    encode_mqtt_event,
    is_same_broker,
    parse_envelope,
)
from agent.protocol import ChatRequest, DeltaEvent, DoneEvent, ErrorCode, Event, PongEvent
from tests.agent.mqtt_support import TIMEOUT, Sub, chat, pub, start_door, stop
from tests.agent.scripted_chat import ScriptedHandler
from tests.mosquitto import MosquittoBroker, MosquittoOptions, running_mosquitto

# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture
def prefix() -> str:
    return f"ppchat/test/{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def door(
    handler: ScriptedHandler, mosquitto_broker: MosquittoBroker, prefix: str
) -> AsyncIterator[MqttChatDoor]:
    door, task = await start_door(handler, mosquitto_broker, prefix)
    yield door
    await stop(task)


@pytest.fixture
async def replies(mosquitto_broker: MosquittoBroker, prefix: str) -> AsyncIterator[Sub]:
    sub = await Sub.start(mosquitto_broker, f"{prefix}-client/replies")
    yield sub
    await sub.close()


# ---- chat --------------------------------------------------------------------------------------


async def test_a_chat_streams_back_with_the_correlation_id(
    door: MqttChatDoor, replies: Sub, mosquitto_broker: MosquittoBroker, handler: ScriptedHandler, prefix: str
) -> None:
    reply_to = f"{prefix}-client/replies"
    await pub(mosquitto_broker, door.request_topic, chat("r1", "hello agent", reply_to, correlation_id="c-1"))
    messages = await replies.until_final()
    decoded = [m.event() for m in messages]
    assert {corr for corr, _ in decoded} == {"c-1"}
    events = [e for _, e in decoded]
    assert all(isinstance(e, DeltaEvent) for e in events[:-1]) and len(events) > 2
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.id == "r1"
    assert (
        done.text
        == "".join(e.text for e in events[:-1] if isinstance(e, DeltaEvent))
        == "turn 1: hello agent"
    )
    assert done.finish_reason is FinishReason.STOP
    (call,) = handler.calls
    assert call.source is FrontDoor.MQTT and call.client == f"mqtt:{reply_to}"

    # the conversation continues with the id the agent gave
    await pub(
        mosquitto_broker,
        door.request_topic,
        chat("r2", "again", reply_to, conversation_id=done.conversation_id, stream=False, correlation_id=7),
    )
    (msg,) = await replies.until_final()
    corr, second = msg.event()
    assert corr == 7
    assert isinstance(second, DoneEvent) and second.text == "turn 2: again"


async def test_mqtt5_response_topic_and_correlation_data(
    door: MqttChatDoor, mosquitto_broker: MosquittoBroker, prefix: str
) -> None:
    topic = f"{prefix}-v5/answers"
    sub = await Sub.start(mosquitto_broker, topic, v5=True)
    try:
        request = json.dumps({"id": "q", "type": "chat", "text": "hi", "stream": False})
        v5 = [
            "-V",
            "5",
            "-D",
            "publish",
            "response-topic",
            topic,
            "-D",
            "publish",
            "correlation-data",
            "xyz-1",
        ]
        await pub(mosquitto_broker, door.request_topic, request, *v5)
        (msg,) = await sub.until_final()
        assert msg.topic == topic and msg.correlation_data == "xyz-1"
        corr, event = msg.event()
        assert corr == "xyz-1" and isinstance(event, DoneEvent)
    finally:
        await sub.close()


async def test_ping_and_cancel(
    door: MqttChatDoor, replies: Sub, mosquitto_broker: MosquittoBroker, handler: ScriptedHandler, prefix: str
) -> None:
    reply_to = f"{prefix}-client/replies"
    await pub(
        mosquitto_broker, door.request_topic, json.dumps({"id": "p", "type": "ping", "reply_to": reply_to})
    )
    (msg,) = await replies.until_final()
    assert isinstance(msg.event()[1], PongEvent)

    await pub(mosquitto_broker, door.request_topic, chat("long", "!slow", reply_to))
    await replies.next()  # a delta: it is generating
    cancel = {"id": "c", "type": "cancel", "target": "long", "reply_to": reply_to}
    await pub(mosquitto_broker, door.request_topic, json.dumps(cancel))
    finals: list[Event] = []
    while len(finals) < 2:
        finals += [m.event()[1] for m in await replies.until_final()][-1:]
    by_type = {e.type.value: e for e in finals}
    assert by_type["cancelled"].found is True  # type: ignore[union-attr]
    assert by_type["done"].finish_reason is FinishReason.CANCELLED  # type: ignore[union-attr]
    assert handler.cancelled == ["long"]


@pytest.mark.parametrize("text", ["!error", "!raise"])
async def test_a_failed_turn_is_an_error_event(
    door: MqttChatDoor, replies: Sub, mosquitto_broker: MosquittoBroker, prefix: str, text: str
) -> None:
    await pub(
        mosquitto_broker, door.request_topic, chat("f", text, f"{prefix}-client/replies", correlation_id="k")
    )
    (msg,) = await replies.until_final()
    corr, event = msg.event()
    assert corr == "k" and event.type.value == "error"
    assert event.code is ErrorCode.ENGINE_ERROR and "scripted" in event.message  # type: ignore[union-attr]


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"type": "chat", "text": "no id"}, "bad_request"),
        ({"id": "x", "type": "shout"}, "unknown_type"),
        ({"id": "x", "type": "chat", "text": "hi", "v": 9}, "unsupported_version"),
        ({"id": "x", "type": "chat", "text": "hi", "messages": []}, "bad_request"),
        ({"id": "x", "type": "chat", "text": "hi", "correlation_id": ["a"]}, "bad_request"),
        ({"id": "x", "type": "chat", "text": "hi", "options": {"temperature": 99}}, "bad_request"),
    ],
)
async def test_bad_requests_get_an_error_on_the_reply_topic(
    door: MqttChatDoor,
    replies: Sub,
    mosquitto_broker: MosquittoBroker,
    prefix: str,
    payload: dict[str, Any],
    code: str,
) -> None:
    payload = {**payload, "reply_to": f"{prefix}-client/replies"}
    await pub(mosquitto_broker, door.request_topic, json.dumps(payload))
    (msg,) = await replies.until_final()
    _, event = msg.event()
    assert event.type.value == "error" and event.code.value == code  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json at all",
        b"\xff\xfe binary",
        b"[1, 2, 3]",
        b'{"id": "x", "type": "chat", "text": "no reply topic"}',
        b'{"id": "x", "type": "chat", "text": "hi", "reply_to": "a/+/wild"}',
        b'{"id": "x", "type": "chat", "text": "hi", "reply_to": 5}',
        b'{"id": "x", "type": "chat", "text": "hi", "reply_to": "$SYS/x"}',
    ],
)
async def test_bad_payloads_without_a_reply_topic_are_logged_and_serving_goes_on(
    door: MqttChatDoor,
    replies: Sub,
    mosquitto_broker: MosquittoBroker,
    prefix: str,
    payload: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt_chat")
    await pub(mosquitto_broker, door.request_topic, payload)
    await pub(mosquitto_broker, door.request_topic, chat("ok", "still there?", f"{prefix}-client/replies"))
    messages = await replies.until_final()
    assert messages[-1].event()[1].type.value == "done"
    assert any("bad request" in r.getMessage() for r in caplog.records)


async def test_an_oversized_request_gets_an_error_on_the_mqtt5_response_topic(
    handler: ScriptedHandler, mosquitto_broker: MosquittoBroker, prefix: str
) -> None:
    _, task = await start_door(handler, mosquitto_broker, prefix, max_payload_bytes=1024)
    topic = f"{prefix}-v5/big"
    sub = await Sub.start(mosquitto_broker, topic, v5=True)
    try:
        request = chat("big", "x" * 5000, None)
        await pub(
            mosquitto_broker,
            f"{prefix}/request",
            request,
            "-V",
            "5",
            "-D",
            "publish",
            "response-topic",
            topic,
        )
        (msg,) = await sub.until_final()
        _, event = msg.event()
        assert event.code is ErrorCode.LINE_TOO_LONG  # type: ignore[union-attr]
        assert not handler.calls
    finally:
        await sub.close()
        await stop(task)


async def test_overload_and_duplicates_are_refused(
    handler: ScriptedHandler, mosquitto_broker: MosquittoBroker, prefix: str
) -> None:
    door, task = await start_door(handler, mosquitto_broker, prefix, max_concurrent=1, max_pending=1)
    reply_to = f"{prefix}-client/replies"
    sub = await Sub.start(mosquitto_broker, reply_to)
    try:
        await pub(mosquitto_broker, door.request_topic, chat("a", "!slow", reply_to))
        await sub.next()  # "a" is being served
        await pub(mosquitto_broker, door.request_topic, chat("b", "queued", reply_to))
        await pub(mosquitto_broker, door.request_topic, chat("b", "same id", reply_to))
        await pub(mosquitto_broker, door.request_topic, chat("c", "one too many", reply_to))
        errors: dict[str, ErrorCode] = {}
        while len(errors) < 2:
            _, event = (await sub.next()).event()
            if event.type.value == "error":
                errors[event.id or ""] = event.code  # type: ignore[union-attr]
        assert errors == {"b": ErrorCode.DUPLICATE_ID, "c": ErrorCode.TOO_MANY_REQUESTS}
        await pub(
            mosquitto_broker,
            door.request_topic,
            json.dumps({"id": "x", "type": "cancel", "target": "a", "reply_to": reply_to}),
        )
        done_b = None
        while done_b is None:
            _, event = (await sub.next()).event()
            if isinstance(event, DoneEvent) and event.id == "b":
                done_b = event
        assert done_b.text == "turn 1: queued"
    finally:
        await sub.close()
        await stop(task)


async def test_a_retained_request_is_not_served(
    handler: ScriptedHandler, mosquitto_broker: MosquittoBroker, prefix: str, replies: Sub
) -> None:
    reply_to = f"{prefix}-client/replies"
    await pub(mosquitto_broker, f"{prefix}/request", chat("old", "retained", reply_to), "-r")
    door, task = await start_door(handler, mosquitto_broker, prefix)
    try:
        await pub(mosquitto_broker, door.request_topic, chat("new", "fresh", reply_to))
        (*_, last) = await replies.until_final()
        assert last.event()[1].id == "new"
        assert [c.request.id for c in handler.calls] == ["new"]
    finally:
        await pub(mosquitto_broker, f"{prefix}/request", None, "-r")
        await stop(task)


# ---- connection --------------------------------------------------------------------------------


async def test_status_is_online_while_serving_and_offline_after(
    handler: ScriptedHandler, mosquitto_broker: MosquittoBroker, prefix: str
) -> None:
    door, task = await start_door(handler, mosquitto_broker, prefix)
    sub = await Sub.start(mosquitto_broker, door.status_topic)
    try:
        assert (await sub.next()).payload == "online"
        await stop(task)
        assert (await sub.next()).payload == "offline"
    finally:
        await sub.close()


async def test_reconnects_after_the_broker_restarts(
    handler: ScriptedHandler, tmp_path: Path, prefix: str
) -> None:
    with running_mosquitto(tmp_path / "broker", MosquittoOptions()) as broker:
        door, task = await start_door(handler, broker, prefix, reconnect_min_s=1, reconnect_max_s=2)
        try:
            await asyncio.to_thread(broker.restart)
            await asyncio.sleep(0.2)
            await asyncio.wait_for(door.wait_connected(), TIMEOUT)
            reply_to = f"{prefix}-client/replies"
            sub = await Sub.start(broker, reply_to)
            try:
                await pub(broker, door.request_topic, chat("after", "back again", reply_to, stream=False))
                (msg,) = await sub.until_final()
                assert msg.event()[1].text == "turn 1: back again"  # type: ignore[union-attr]
            finally:
                await sub.close()
        finally:
            await stop(task)


async def test_password_authentication(handler: ScriptedHandler, tmp_path: Path, prefix: str) -> None:
    options = MosquittoOptions(allow_anonymous=False, users={"agent": "s3cret"})
    (tmp_path / "pw").write_text("s3cret\n")
    with running_mosquitto(tmp_path / "broker", options) as broker:
        _, task = await start_door(handler, broker, prefix, username="agent", password_path=tmp_path / "pw")
        await stop(task)
        assert "agent" in broker.log_text()


# ---- the fleet broker is refused -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "fleet", "same"),
    [
        ("127.0.0.1:1883", "mqtt://localhost:1883", True),
        ("localhost", "tcp://127.0.0.1", True),
        ("[::1]:1883", "mqtt://127.0.0.1:1883", True),
        ("Broker.Example.COM.", "mqtt://broker.example.com", True),
        ("broker.example.com:8883", "mqtts://broker.example.com", True),
        ("broker.example.com", "mqtts://broker.example.com", False),
        ("10.0.0.2:1883", "mqtt://10.0.0.3:1883", False),
        ("homeassistant.local", "mqtts://fleet.example.com:8883", False),
        ("[::ffff:10.0.0.2]:1883", "10.0.0.2", True),
    ],
)
def test_is_same_broker(local: str, fleet: str, same: bool) -> None:
    assert is_same_broker(local, fleet) is same
    assert is_same_broker(fleet, local) is same


@pytest.mark.parametrize("bad", ["http://x", "mqtt://", "mqtt://h:99999", ""])
def test_bad_broker_urls(bad: str) -> None:
    with pytest.raises(ConfigError):
        BrokerAddress.parse(bad)


async def test_refuses_to_serve_chat_on_the_fleet_broker(handler: ScriptedHandler) -> None:
    config = MqttChatConfig(enabled=True, host="localhost", port=1883)
    door = MqttChatDoor(config, handler, fleet_broker_url="mqtt://127.0.0.1:1883")
    with pytest.raises(ConfigError, match="fleet broker") as info:
        await asyncio.wait_for(door.run(), TIMEOUT)
    assert "allow_fleet_broker" in str(info.value) and "conversation text" in str(info.value)


async def test_allow_fleet_broker_overrides_with_a_warning(
    handler: ScriptedHandler, mosquitto_broker: MosquittoBroker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = MqttChatConfig(
        enabled=True,
        host="localhost",
        port=mosquitto_broker.port,
        topic_prefix=prefix,
        allow_fleet_broker=True,
    )
    door = MqttChatDoor(config, handler, fleet_broker_url=mosquitto_broker.url)
    task = asyncio.create_task(door.run())
    try:
        await asyncio.wait_for(door.wait_connected(), TIMEOUT)
        assert any("allow_fleet_broker" in r.getMessage() for r in caplog.records)
    finally:
        await stop(task)


async def test_a_different_broker_is_fine(handler: ScriptedHandler) -> None:
    config = MqttChatConfig(enabled=True, host="127.0.0.1", port=1883)
    door = MqttChatDoor(config, handler, fleet_broker_url="mqtts://127.0.0.1:8883")
    await door.check_privacy()


# ---- pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section",
    [
        {"password": "a", "password_path": "/x"},
        {"tls_insecure": True},
        {"tls": True, "tls_cert_path": "/c"},
        {"reconnect_min_s": 10, "reconnect_max_s": 5},
        {"protocol": "4"},
    ],
)
def test_config_errors(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="mqtt_chat"):
        parse_config({"mqtt_chat": section})


def test_default_port_follows_tls() -> None:
    assert MqttChatConfig().effective_port == 1883
    assert MqttChatConfig(tls=True).effective_port == 8883


@pytest.mark.parametrize("name", ["bad+name", "bad#name"])
def test_a_device_name_that_cannot_be_a_topic_needs_a_prefix(handler: ScriptedHandler, name: str) -> None:
    with pytest.raises(ConfigError, match="topic_prefix"):
        MqttChatDoor(MqttChatConfig(), handler, device_name=name)
    door = MqttChatDoor(MqttChatConfig(topic_prefix="home/agent"), handler, device_name=name)
    assert door.request_topic == "home/agent/request"


def test_default_topics_follow_the_device_name(handler: ScriptedHandler) -> None:
    door = MqttChatDoor(MqttChatConfig(), handler, device_name="kitchen-pi")
    assert door.request_topic == "ppchat/local/kitchen-pi/request"
    assert door.status_topic == "ppchat/local/kitchen-pi/status"


def test_event_json_round_trip() -> None:
    event = DeltaEvent(id="r", text="héllo")
    payload = encode_mqtt_event(event, "c")
    assert json.loads(payload) == {"v": 1, "id": "r", "type": "delta", "text": "héllo", "correlation_id": "c"}
    assert decode_mqtt_event(payload) == ("c", event)
    assert decode_mqtt_event(encode_mqtt_event(event, None)) == (None, event)


def test_envelope_precedence() -> None:
    body = {"id": "r", "type": "chat", "text": "t", "reply_to": "json/topic"}
    message = IncomingMessage(json.dumps(body).encode(), response_topic="v5/topic", correlation_data=b"d")
    request, route = parse_envelope(message, max_payload_bytes=4096)
    assert isinstance(request, ChatRequest)
    assert route.topic == "json/topic" and route.correlation_data == b"d" and route.correlation_id == "d"
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(message, max_payload_bytes=4096, forbidden_reply_topics=frozenset({"json/topic"}))
    assert info.value.route is not None and info.value.route.topic == "v5/topic"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(
    ["id", "type", "text", "reply_to", "correlation_id", "v", "messages", "stream", "target"]
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(keys, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    ),
    response_topic=st.none() | st.text(max_size=20),
    data=st.none() | st.binary(max_size=40),
)
def test_envelope_parsing_never_fails_unexpectedly(
    body: bytes, response_topic: str | None, data: bytes | None
) -> None:
    message = IncomingMessage(body, response_topic=response_topic, correlation_data=data)
    try:
        _, route = parse_envelope(message, max_payload_bytes=150)
    except EnvelopeError as exc:
        assert exc.error.code in {c.value for c in ErrorCode}
        route = exc.route  # type: ignore[assignment]
    if route is not None:
        assert route.topic and not set(route.topic) & set("+#\0")


async def test_shutdown_finishes_replies_in_flight_and_refuses_new_ones(
    door: MqttChatDoor, replies: Sub, mosquitto_broker: MosquittoBroker, prefix: str
) -> None:
    reply_to = f"{prefix}-client/replies"
    await pub(mosquitto_broker, door.request_topic, chat("s", "!slow", reply_to))
    await replies.next()
    await asyncio.wait_for(door.shutdown(grace_s=5.0), TIMEOUT)
    (*_, last) = await replies.until_final()
    done = last.event()[1]
    assert isinstance(done, DoneEvent) and done.finish_reason is FinishReason.CANCELLED
    await pub(mosquitto_broker, door.request_topic, chat("late", "hello?", reply_to))
    (msg,) = await replies.until_final()
    assert msg.event()[1].code is ErrorCode.SHUTTING_DOWN  # type: ignore[union-attr]
