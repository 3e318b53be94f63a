"""The Wyoming door on the real chat service: real llama.cpp on the demo model, the real store, the
wyoming library's own client, and test speech services speaking the real protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from wyoming.audio import AudioChunk
from wyoming.handle import Handled, HandledChunk

from agent.chat import ChatService
from agent.config import GenerationConfig
from agent.frontdoor import FrontDoor
from agent.store import ConversationStore
from tests.agent.wyoming_support import (
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

GENERATION = GenerationConfig(max_tokens=24, temperature=0.0)


@pytest.fixture
async def service(chat_engine: Any, short_tmp: Path) -> AsyncIterator[tuple[ChatService, ConversationStore]]:
    store = await ConversationStore.open(short_tmp / "conversations.sqlite3")
    chat = ChatService(chat_engine, store, generation=GENERATION, system_prompt="You are ppchat.")
    yield chat, store
    await store.close()


def reply_of(events: list[Any]) -> str:
    handled = next(e for e in events if e.type == "handled")
    text = Handled.from_event(handled).text or ""
    chunks = "".join(HandledChunk.from_event(e).text for e in events if e.type == "handled-chunk")
    assert chunks == text
    return text


async def test_a_home_assistant_conversation_with_the_real_model(
    service: tuple[ChatService, ConversationStore],
) -> None:
    chat, store = service
    running = await start_door(chat)
    try:
        first = await ask(running, "Hello! What can you do?", conversation_id="01HAXYZ")
        assert [e.type for e in first][-2:] == ["handled", "handled-stop"]
        reply_of(first)
        # bad input on another connection does not disturb the door
        raw = b'{"type": "transcript", "data_length": 999999999}\n'
        assert first_event(await asyncio.to_thread(raw_exchange, running.address, raw))["type"] == "error"
        second = await ask(running, "And what did I just ask you?", conversation_id="01HAXYZ")
        reply_of(second)
        # one agent conversation holds both turns, stored on the device under the Wyoming door
        agent_id = running.door.conversations.get("01HAXYZ")
        assert agent_id is not None
        conversation = await store.get_conversation(agent_id)
        assert conversation is not None and conversation.source is FrontDoor.WYOMING
        turns = await store.turns(agent_id)
        assert [t.content for t in turns][0::2] == ["Hello! What can you do?", "And what did I just ask you?"]
        assert await store.count_conversations() == 1
    finally:
        await stop_door(running)


async def test_an_audio_round_trip_with_the_real_model(
    service: tuple[ChatService, ConversationStore], short_tmp: Path
) -> None:
    chat, _ = service
    stt, tts = SttRecord(transcript="Tell me about this device."), TtsRecord()
    stt_server = await start_stt(short_tmp / "stt.sock", stt)
    tts_server = await start_tts(short_tmp / "tts.sock", tts)
    running = await start_door(chat, stt_uri=stt_server.uri, tts_uri=tts_server.uri)
    try:
        async with running.client() as client:
            await send_utterance(client, sine_tone(seconds=0.3))
            events = await read_until(client, "audio-stop", "not-handled")
        types = [e.type for e in events]
        assert types[0] == "transcript" and "handled" in types and types[-1] == "audio-stop"
        reply = reply_of(events)
        if reply:  # the tiny model may answer with nothing; then there is nothing to speak
            assert tts.texts == [reply]
            audio = b"".join(AudioChunk.from_event(e).audio for e in events if e.type == "audio-chunk")
            assert audio == tts.tone
        assert stt.utterances == 1
    finally:
        await stop_door(running)
        await stt_server.stop()
        await tts_server.stop()
