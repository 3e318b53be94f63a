"""The MQTT chat door on the real chat service (real llama.cpp on the demo model, the real store),
a real Mosquitto, and mosquitto_pub / mosquitto_sub holding the conversation."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.chat import ChatService
from agent.config import GenerationConfig
from agent.frontdoor import FrontDoor
from agent.protocol import DeltaEvent, DoneEvent, ErrorCode, ErrorEvent
from agent.store import ConversationStore
from tests.agent.mqtt_support import Sub, chat, pub, start_door, stop
from tests.mosquitto import MosquittoBroker


@pytest.fixture
async def service(chat_engine: Any, short_tmp: Path) -> AsyncIterator[tuple[ChatService, ConversationStore]]:
    store = await ConversationStore.open(short_tmp / "conversations.sqlite3")
    generation = GenerationConfig(max_tokens=24, temperature=0.0)
    chat_service = ChatService(chat_engine, store, generation=generation, system_prompt="You are ppchat.")
    yield chat_service, store
    await store.close()


async def test_mosquitto_clients_hold_a_chat_with_the_agent(
    service: tuple[ChatService, ConversationStore], mosquitto_broker: MosquittoBroker
) -> None:
    chat_service, store = service
    prefix = f"ppchat/test/{uuid.uuid4().hex[:8]}"
    reply_to = f"{prefix}-me/replies"
    door, task = await start_door(chat_service, mosquitto_broker, prefix)
    sub = await Sub.start(mosquitto_broker, reply_to)
    try:
        await pub(
            mosquitto_broker, door.request_topic, chat("t1", "Hello there!", reply_to, correlation_id="a")
        )
        first = [m.event() for m in await sub.until_final()]
        assert {corr for corr, _ in first} == {"a"}
        done = first[-1][1]
        assert isinstance(done, DoneEvent) and done.conversation_id is not None
        assert "".join(e.text for _, e in first if isinstance(e, DeltaEvent)) == done.text

        await pub(mosquitto_broker, door.request_topic, b"{not json")  # logged, ignored
        bad = {"id": "t0", "type": "chat", "reply_to": reply_to, "text": "x", "options": {"top_p": 7}}
        await pub(mosquitto_broker, door.request_topic, json.dumps(bad))
        (msg,) = await sub.until_final()
        error = msg.event()[1]
        assert isinstance(error, ErrorEvent) and error.code is ErrorCode.BAD_REQUEST

        second = chat(
            "t2", "What did I say?", reply_to, conversation_id=done.conversation_id, correlation_id=2
        )
        await pub(mosquitto_broker, door.request_topic, second)
        corr, last = (await sub.until_final())[-1].event()
        assert corr == 2 and isinstance(last, DoneEvent) and last.conversation_id == done.conversation_id

        conversation = await store.get_conversation(done.conversation_id)
        assert conversation is not None and conversation.source is FrontDoor.MQTT
        turns = await store.turns(done.conversation_id)
        assert [t.content for t in turns][0::2] == ["Hello there!", "What did I say?"]
    finally:
        await sub.close()
        await stop(task)
