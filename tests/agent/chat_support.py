"""Test support for the chat socket: a raw asyncio client and a running in-process chat server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.chat import ChatService
from agent.config import GenerationConfig, SocketConfig
from agent.frontdoor import CancelSignal, ChatEvent, ChatHandler, FrontDoor
from agent.generation import InferenceBackend
from agent.protocol import ChatRequest, DeltaEvent, DoneEvent, ErrorEvent, Event, decode_event
from agent.socket_server import SocketServer
from agent.store import ConversationStore

# Sampling that keeps the tiny demo model talking: near-uniform over the vocabulary, so the end of
# turn comes rarely and a reply runs to max_tokens (deterministic with a seed).
LONG_REPLY: dict[str, Any] = {"temperature": 5.0, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0, "seed": 3}
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 1}


class RawClient:
    """A socket client that sends whatever it is given and reads events as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=16 * 1024 * 1024)
        return cls(reader, writer)

    async def send_line(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, request: dict[str, Any]) -> None:
        await self.send_line(json.dumps(request).encode() + b"\n")

    async def event(self, timeout: float = 60.0) -> Event:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("the agent closed the connection")
        return decode_event(line)

    async def until_end(self, request_id: str, timeout: float = 120.0) -> list[Event]:
        """Events of one request up to its done/error (others' events are dropped)."""
        out: list[Event] = []
        while True:
            ev = await self.event(timeout)
            if getattr(ev, "id", None) != request_id or ev.type.value in ("pong", "cancelled"):
                continue
            out.append(ev)
            if not isinstance(ev, DeltaEvent):
                return out

    async def chat(self, request_id: str, text: str, **fields: Any) -> list[Event]:
        await self.send({"id": request_id, "type": "chat", "text": text, **fields})
        return await self.until_end(request_id)

    async def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True when the agent closes the connection (reading what is left on the way)."""
        try:
            while True:
                line = await asyncio.wait_for(self.reader.readline(), timeout)
                if not line:
                    return True
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


def last(events: list[Event]) -> DoneEvent:
    ev = events[-1]
    assert isinstance(ev, DoneEvent), ev
    return ev


def error_of(events: list[Event]) -> ErrorEvent:
    ev = events[-1]
    assert isinstance(ev, ErrorEvent), ev
    return ev


class RecordingHandler:
    """Wraps the chat service and records each request's final event (a ChatHandler itself)."""

    def __init__(self, inner: ChatHandler) -> None:
        self.inner = inner
        self.finished: dict[str, ChatEvent] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.ended: dict[str, asyncio.Event] = {}
        self.cancels: dict[str, CancelSignal] = {}

    def _ended(self, request_id: str) -> asyncio.Event:
        return self.ended.setdefault(request_id, asyncio.Event())

    async def wait_finished(self, request_id: str, timeout: float = 60.0) -> ChatEvent:
        await asyncio.wait_for(self._ended(request_id).wait(), timeout)
        return self.finished[request_id]

    async def handle(
        self, request: ChatRequest, *, source: FrontDoor, cancel: CancelSignal, client: str
    ) -> AsyncIterator[ChatEvent]:
        self.cancels[request.id] = cancel
        self.started.setdefault(request.id, asyncio.Event()).set()
        try:
            async for event in self.inner.handle(request, source=source, cancel=cancel, client=client):
                if not isinstance(event, DeltaEvent):
                    self.finished[request.id] = event
                yield event
        finally:
            self._ended(request.id).set()


@dataclass
class ChatSocket:
    path: Path
    server: SocketServer
    chat: ChatService
    store: ConversationStore
    handler: RecordingHandler

    async def client(self) -> RawClient:
        return await RawClient.connect(self.path)


@asynccontextmanager
async def running_chat_socket(
    engine: InferenceBackend,
    directory: Path,
    *,
    socket: SocketConfig | None = None,
    generation: GenerationConfig | None = None,
    system_prompt: str | None = "You are ppchat, a helpful assistant running privately on this device.",
) -> AsyncIterator[ChatSocket]:
    store = await ConversationStore.open(directory / "state" / "conversations.sqlite3")
    chat = ChatService(
        engine, store, generation=generation or GenerationConfig(), system_prompt=system_prompt
    )
    handler = RecordingHandler(chat)
    server = SocketServer(handler, socket or SocketConfig(), directory / "run" / "agent.sock")
    await server.start()
    serving = asyncio.create_task(server.serve())
    try:
        yield ChatSocket(server.path, server, chat, store, handler)
    finally:
        await server.shutdown(grace_s=5.0)
        await serving
        await store.close()
