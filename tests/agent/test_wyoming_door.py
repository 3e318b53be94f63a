"""The Wyoming door with the wyoming library's own client, a scripted chat handler and test speech
services speaking the real protocol (the real ChatService is in test_wyoming_e2e.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from wyoming.asr import Transcript
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, NotHandled
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong

from agent.config import WyomingConfig, parse_config
from agent.errors import ConfigError
from agent.frontdoor import FrontDoor
from agent.wyoming_door import ConversationMap, WyomingDoor
from agent.wyoming_wire import WyomingErrorCode
from tests.agent.scripted_chat import ScriptedHandler
from tests.agent.wyoming_support import (
    RATE,
    TIMEOUT,
    Running,
    SttRecord,
    TtsRecord,
    ask,
    first_event,
    raw_exchange,
    read_until,
    send_utterance,
    sine_tone,
    start_door,
    start_stt,
    start_tts,
    stop_door,
)


@pytest.fixture
def handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture
async def door(handler: ScriptedHandler) -> AsyncIterator[Running]:
    running = await start_door(handler)
    yield running
    await stop_door(running)


# ---- describe / info ----------------------------------------------------------------------------


async def test_describe_answers_info_with_a_handle_program(door: Running) -> None:
    async with door.client() as client:
        await client.write_event(Describe().event())
        (event,) = await read_until(client, "info")
    info = Info.from_event(event)
    assert not info.asr and not info.tts
    (program,) = info.handle
    assert program.name == "ppchat" and program.installed
    assert program.supports_handled_streaming is True
    assert program.version
    (model,) = program.models
    assert model.name == "demo-q8_0" and model.languages == ["en"] and model.installed


async def test_info_follows_the_config(handler: ScriptedHandler) -> None:
    running = await start_door(handler, name="kitchen", languages=("de", "fr"), streaming=False)
    try:
        async with running.client() as client:
            await client.write_event(Describe().event())
            (event,) = await read_until(client, "info")
        (program,) = Info.from_event(event).handle
        assert program.name == "kitchen"
        assert program.supports_handled_streaming is False
        assert program.models[0].languages == ["de", "fr"]
    finally:
        await stop_door(running)


async def test_ping_pong(door: Running) -> None:
    async with door.client() as client:
        await client.write_event(Ping(text="hi").event())
        (event,) = await read_until(client, "pong")
    assert Pong.from_event(event).text == "hi"


# ---- transcript -> handled ----------------------------------------------------------------------


async def test_transcript_streams_handled_events_in_protocol_order(
    door: Running, handler: ScriptedHandler
) -> None:
    events = await ask(door, "hello there", conversation_id="01HA-CONV")
    types = [e.type for e in events]
    assert types[0] == "handled-start"
    assert types[-2:] == ["handled", "handled-stop"]
    assert set(types[1:-2]) == {"handled-chunk"}
    chunks = "".join(HandledChunk.from_event(e).text for e in events[1:-2])
    handled = Handled.from_event(events[-2])
    assert handled.text == chunks == "turn 1: hello there"
    assert handled.context == {"conversation_id": "01HA-CONV"}
    assert HandledStart.from_event(events[0]).context == {"conversation_id": "01HA-CONV"}
    (call,) = handler.calls
    assert call.source is FrontDoor.WYOMING and call.client.startswith("wyoming:127.0.0.1:")
    assert call.request.text == "hello there" and call.request.stream


async def test_without_streaming_only_handled(handler: ScriptedHandler) -> None:
    running = await start_door(handler, streaming=False)
    try:
        events = await ask(running, "hello")
        assert [e.type for e in events] == ["handled"]
        assert Handled.from_event(events[0]).text == "turn 1: hello"
        assert handler.calls[0].request.stream is False
    finally:
        await stop_door(running)


async def test_a_home_assistant_conversation_keeps_its_history(
    door: Running, handler: ScriptedHandler
) -> None:
    # Home Assistant opens a new connection per turn and sends its conversation id in the context.
    first = await ask(door, "my name is Ada", conversation_id="ha-1")
    other = await ask(door, "unrelated", conversation_id="ha-2")
    second = await ask(door, "what is my name", conversation_id="ha-1")
    assert Handled.from_event(first[-2]).text == "turn 1: my name is Ada"
    assert Handled.from_event(other[-2]).text == "turn 1: unrelated"
    assert Handled.from_event(second[-2]).text == "turn 2: what is my name"
    agent_ids = [c.request.conversation_id for c in handler.calls]
    assert agent_ids[0] is None and agent_ids[1] is None
    assert agent_ids[2] == "conv-1"
    assert handler.conversations["conv-1"] == ["my name is Ada", "what is my name"]


async def test_without_context_the_connection_is_the_conversation(door: Running) -> None:
    async with door.client() as client:
        for expected in ("turn 1: a", "turn 2: b"):
            await client.write_event(Transcript(text=expected[-1]).event())
            events = await read_until(client, "handled-stop")
            handled = Handled.from_event(events[-2])
            assert handled.text == expected
    # the key handed back in the context continues it from another connection
    assert handled.context is not None
    key = handled.context["conversation_id"]
    events = await ask(door, "c", conversation_id=key)
    assert Handled.from_event(events[-2]).text == "turn 3: c"


async def test_a_forgotten_agent_conversation_starts_afresh(door: Running, handler: ScriptedHandler) -> None:
    await ask(door, "one", conversation_id="ha-x")
    handler.forget_all()  # e.g. retention deleted it
    events = await ask(door, "two", conversation_id="ha-x")
    assert Handled.from_event(events[-2]).text == "turn 1: two"
    assert [c.request.conversation_id for c in handler.calls] == [None, "conv-1", None]


@pytest.mark.parametrize("text", ["!error", "!raise"])
async def test_a_failed_turn_is_not_handled_with_the_reason(door: Running, text: str) -> None:
    events = await ask(door, text, conversation_id="ha-e")
    assert [e.type for e in events] == ["not-handled"]
    reason = NotHandled.from_event(events[0]).text or ""
    assert "scripted" in reason
    # and the door keeps serving
    assert Handled.from_event((await ask(door, "still there?"))[-2]).text == "turn 1: still there?"


@pytest.mark.parametrize("data", [{}, {"text": ""}, {"text": "   "}, {"text": 42}])
async def test_a_transcript_without_text_is_not_handled(door: Running, data: dict[str, Any]) -> None:
    async with door.client() as client:
        await client.write_event(Event(type="transcript", data=data))
        events = await read_until(client, "not-handled", "handled")
    assert [e.type for e in events] == ["not-handled"]


async def test_hanging_up_mid_reply_cancels_the_generation(door: Running, handler: ScriptedHandler) -> None:
    async with door.client() as client:
        await client.write_event(Transcript(text="!slow").event())
        await read_until(client, "handled-chunk")
    for _ in range(500):
        if handler.cancelled:
            break
        await asyncio.sleep(0.01)
    assert handler.cancelled == [handler.calls[0].request.id]


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"this is not json\n", "bad_json"),
        (b"[1, 2]\n", "bad_json"),
        (b'{"data": {}}\n', "bad_request"),
        (b'{"type": "transcript", "data": [1]}\n', "bad_request"),
        (b'{"type": "audio-chunk", "payload_length": 99999999999}\n', "line_too_long"),
        (b'{"type": "transcript", "data_length": 10000000}\n', "line_too_long"),
        (b'{"type": "transcript", "data_length": -1}\n', "bad_request"),
        (b'{"type": "transcript", "data_length": 5}\n[1,2]', "bad_json"),
        (b'{"type": "transcript", "data_length": 50}\n{"text"', "bad_request"),
        (b"{" + b" " * 400_000 + b"}\n", "line_too_long"),
    ],
)
async def test_bad_framing_gets_an_error_and_the_door_keeps_serving(
    door: Running, raw: bytes, code: str
) -> None:
    reply = await asyncio.to_thread(raw_exchange, door.address, raw)
    event = first_event(reply)
    assert event["type"] == "error"
    assert event["data"]["code"] == code and event["data"]["text"]
    assert Handled.from_event((await ask(door, "ok?"))[-2]).text == "turn 1: ok?"


async def test_too_many_connections_get_an_error(handler: ScriptedHandler) -> None:
    running = await start_door(handler, max_connections=1)
    try:
        async with running.client() as first:
            await first.write_event(Ping().event())
            await read_until(first, "pong")
            async with running.client() as second:
                (event,) = await read_until(second, "error")
                assert Error.from_event(event).code == WyomingErrorCode.TOO_MANY_CONNECTIONS.value
                assert await second.read_event() is None
        assert Handled.from_event((await ask(running, "free again"))[-2]).text == "turn 1: free again"
    finally:
        await stop_door(running)


# ---- audio -------------------------------------------------------------------------------------


async def test_audio_without_speech_services_gets_a_clear_error(door: Running) -> None:
    async with door.client() as client:
        await send_utterance(client, sine_tone(seconds=0.2))
        (event,) = await read_until(client, "error")
        error = Error.from_event(event)
        assert error.code == WyomingErrorCode.AUDIO_NOT_SUPPORTED.value
        assert "stt_uri" in error.text
        # one error per utterance, not per chunk; and text still works on the same connection
        await client.write_event(Transcript(text="typed instead").event())
        events = await read_until(client, "handled-stop")
    assert [e.type for e in events][-2:] == ["handled", "handled-stop"]


async def test_audio_round_trip_through_speech_services(handler: ScriptedHandler, short_tmp: Path) -> None:
    stt, tts = SttRecord(transcript=" turn on the lights "), TtsRecord()
    stt_server = await start_stt(short_tmp / "stt.sock", stt)
    tts_server = await start_tts(short_tmp / "tts.sock", tts)
    running = await start_door(
        handler, stt_uri=stt_server.uri, tts_uri=tts_server.uri, stt_language="en", tts_voice="en_US-test"
    )
    try:
        utterance = sine_tone(seconds=0.5, hz=300)
        async with running.client() as client:
            await send_utterance(client, utterance)
            events = await read_until(client, "audio-stop")
            types = [e.type for e in events]
            assert types[0] == "transcript"
            assert Transcript.from_event(events[0]).text == "turn on the lights"
            assert types[1] == "handled-start"
            handled_at = types.index("handled")
            assert types[handled_at + 1] == "handled-stop"
            assert types[handled_at + 2] == "audio-start"
            assert types[-1] == "audio-stop"
            audio = b"".join(AudioChunk.from_event(e).audio for e in events if e.type == "audio-chunk")
            assert audio == tts.tone
            reply = Handled.from_event(events[handled_at]).text
            assert reply == "turn 1: turn on the lights"
            # a second utterance on the same connection continues the conversation
            await send_utterance(client, utterance, language="de")
            events = await read_until(client, "audio-stop")
        assert Handled.from_event(next(e for e in events if e.type == "handled")).text == (
            "turn 2: turn on the lights"
        )
        assert bytes(stt.audio) == utterance * 2
        assert stt.formats == [(RATE, 2, 1)] * 2 and stt.languages == ["en", "de"]
        assert tts.texts == [reply, "turn 2: turn on the lights"] and tts.voices == ["en_US-test"] * 2
    finally:
        await stop_door(running)
        await stt_server.stop()
        await tts_server.stop()


async def test_speech_services_down_give_errors_and_text_still_works(
    handler: ScriptedHandler, short_tmp: Path
) -> None:
    stt = SttRecord()
    stt_server = await start_stt(short_tmp / "stt.sock", stt)
    running = await start_door(handler, stt_uri=stt_server.uri, tts_uri=f"unix://{short_tmp}/no-tts.sock")
    try:
        async with running.client() as client:
            await send_utterance(client, sine_tone(seconds=0.1))
            events = await read_until(client, "error")
            assert events[0].type == "transcript"
            assert "handled" in [e.type for e in events]
            assert Error.from_event(events[-1]).code == WyomingErrorCode.TTS_UNAVAILABLE.value
        await stt_server.stop()
        async with running.client() as client:
            await send_utterance(client, sine_tone(seconds=0.1))
            (event,) = await read_until(client, "error")
            assert Error.from_event(event).code == WyomingErrorCode.STT_UNAVAILABLE.value
            await client.write_event(Transcript(text="typed").event())
            assert (await read_until(client, "handled-stop"))[-1].type == "handled-stop"
    finally:
        await stop_door(running)


async def test_too_much_audio_is_refused(handler: ScriptedHandler, short_tmp: Path) -> None:
    stt = SttRecord()
    stt_server = await start_stt(short_tmp / "stt.sock", stt)
    running = await start_door(handler, stt_uri=stt_server.uri, max_audio_s=0.1)
    try:
        async with running.client() as client:
            await send_utterance(client, sine_tone(seconds=0.3))
            (event,) = await read_until(client, "error")
            assert Error.from_event(event).code == WyomingErrorCode.AUDIO_TOO_LONG.value
            await send_utterance(client, sine_tone(seconds=0.05))
            events = await read_until(client, "handled-stop")
            assert events[0].type == "transcript"
        assert stt.utterances == 1
    finally:
        await stop_door(running)
        await stt_server.stop()


@pytest.mark.parametrize("data", [{}, {"rate": 16000, "width": 0, "channels": 1}, {"rate": "x", "width": 2}])
async def test_bad_audio_format_is_an_error(
    handler: ScriptedHandler, short_tmp: Path, data: dict[str, Any]
) -> None:
    stt_server = await start_stt(short_tmp / "stt.sock", SttRecord())
    running = await start_door(handler, stt_uri=stt_server.uri)
    try:
        async with running.client() as client:
            await client.write_event(Event(type="audio-start", data=data))
            (event,) = await read_until(client, "error")
            assert Error.from_event(event).code == WyomingErrorCode.BAD_AUDIO.value
    finally:
        await stop_door(running)
        await stt_server.stop()


# ---- listening ---------------------------------------------------------------------------------


async def test_serves_on_a_unix_socket_with_its_mode(handler: ScriptedHandler, short_tmp: Path) -> None:
    path = short_tmp / "wyoming.sock"
    path.touch()  # a regular file in the way: the door must not delete it; it retries instead
    door = WyomingDoor(WyomingConfig(enabled=True, uri=f"unix://{path}"), handler)
    task = asyncio.create_task(door.run())
    await asyncio.sleep(0.3)
    assert door.address is None and path.is_file()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    path.unlink()
    running = await start_door(handler, uri=f"unix://{path}", socket_mode=0o600)
    try:
        assert running.address == f"unix://{path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # a second agent on the same path does not take the live socket away
        second = WyomingDoor(WyomingConfig(enabled=True, uri=f"unix://{path}"), handler)
        second_task = asyncio.create_task(second.run())
        await asyncio.sleep(0.3)
        assert second.address is None
        second_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second_task
        events = await ask(running, "over unix")
        assert Handled.from_event(events[-2]).text == "turn 1: over unix"
    finally:
        await stop_door(running)
    assert not path.exists()


async def test_relistens_when_the_port_frees_up(handler: ScriptedHandler) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    door = WyomingDoor(WyomingConfig(enabled=True, uri=f"tcp://127.0.0.1:{port}"), handler)
    task = asyncio.create_task(door.run())
    await asyncio.sleep(0.3)
    assert door.address is None
    blocker.close()
    address = await asyncio.wait_for(door.wait_ready(), TIMEOUT)
    assert address == f"tcp://127.0.0.1:{port}"
    client = AsyncTcpClient("127.0.0.1", port, read_timeout=TIMEOUT)
    async with client:
        await client.write_event(Describe().event())
        assert (await read_until(client, "info"))[0].type == "info"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---- config and pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section",
    [
        {"uri": "http://x:1"},
        {"uri": "tcp://127.0.0.1"},
        {"uri": "unix://relative.sock"},
        {"stt_uri": "stdio://"},
        {"languages": []},
        {"bogus": 1},
    ],
)
def test_config_errors_name_the_key(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="wyoming"):
        parse_config({"wyoming": section})


def test_config_defaults_are_off_and_local() -> None:
    cfg = parse_config({}).wyoming
    assert cfg.enabled is False and cfg.uri == "tcp://127.0.0.1:10700"


def test_conversation_map_is_bounded_lru() -> None:
    m = ConversationMap(max_entries=2)
    m.set("a", "1")
    m.set("b", "2")
    assert m.get("a") == "1"  # a is now the most recent
    m.set("c", "3")
    assert m.get("b") is None and m.get("a") == "1" and m.get("c") == "3" and len(m) == 2


async def test_shutdown_cancels_replies_in_flight_and_stops_accepting(door: Running) -> None:
    async with door.client() as client:
        await client.write_event(Transcript(text="!slow", context={"conversation_id": "ha-s"}).event())
        await read_until(client, "handled-chunk")
        await asyncio.wait_for(door.door.shutdown(grace_s=5.0), TIMEOUT)
        events = await read_until(client, "not-handled")
        assert NotHandled.from_event(events[-1]).text == "the reply was cancelled"
        assert (await read_until(client, "handled-stop"))[-1].type == "handled-stop"
    with pytest.raises(OSError):
        async with door.client() as client:
            await client.write_event(Describe().event())
