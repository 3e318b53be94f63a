"""Wyoming test support: a running door, client helpers, and small speech services speaking the real
protocol with the wyoming library.

``FixedStt`` answers any audio with a fixed transcript and records what it received; ``ToneTts``
answers ``synthesize`` with a short sine tone and records the texts. Both listen on Unix sockets.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.event import Event
from wyoming.server import AsyncEventHandler, AsyncUnixServer
from wyoming.tts import Synthesize

from agent.config import WyomingConfig
from agent.frontdoor import ChatHandler
from agent.wyoming_door import WyomingDoor

RATE = 16000
TIMEOUT = 10.0


def sine_tone(*, seconds: float, hz: float = 440.0, rate: int = RATE) -> bytes:
    n = int(seconds * rate)
    return b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / rate))) for i in range(n))


@dataclass
class SttRecord:
    transcript: str = "what is the weather like"
    audio: bytearray = field(default_factory=bytearray)
    languages: list[str | None] = field(default_factory=list)
    formats: list[tuple[int, int, int]] = field(default_factory=list)
    utterances: int = 0


@dataclass
class TtsRecord:
    texts: list[str] = field(default_factory=list)
    voices: list[str | None] = field(default_factory=list)
    tone: bytes = field(default_factory=lambda: sine_tone(seconds=0.1))


class _SttHandler(AsyncEventHandler):
    def __init__(self, record: SttRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.record = record

    async def handle_event(self, event: Event) -> bool:
        if Transcribe.is_type(event.type):
            self.record.languages.append(Transcribe.from_event(event).language)
        elif AudioStart.is_type(event.type):
            start = AudioStart.from_event(event)
            self.record.formats.append((start.rate, start.width, start.channels))
        elif AudioChunk.is_type(event.type):
            self.record.audio += AudioChunk.from_event(event).audio
        elif AudioStop.is_type(event.type):
            self.record.utterances += 1
            await self.write_event(Transcript(text=self.record.transcript).event())
            return False
        return True


class _TtsHandler(AsyncEventHandler):
    def __init__(self, record: TtsRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.record = record

    async def handle_event(self, event: Event) -> bool:
        if not Synthesize.is_type(event.type):
            return True
        request = Synthesize.from_event(event)
        self.record.texts.append(request.text)
        self.record.voices.append(request.voice.name if request.voice else None)
        await self.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        half = len(self.record.tone) // 2
        for part in (self.record.tone[:half], self.record.tone[half:]):
            await self.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=part).event())
        await self.write_event(AudioStop().event())
        return False


class SpeechServer:
    """A running test service; ``uri`` is its ``unix://`` address."""

    def __init__(self, path: Path, server: AsyncUnixServer) -> None:
        self.path = path
        self.server = server

    @property
    def uri(self) -> str:
        return f"unix://{self.path}"

    async def stop(self) -> None:
        await self.server.stop()


async def start_stt(path: Path, record: SttRecord) -> SpeechServer:
    server = AsyncUnixServer(path)
    await server.start(lambda r, w: _SttHandler(record, r, w))
    return SpeechServer(path, server)


async def start_tts(path: Path, record: TtsRecord) -> SpeechServer:
    server = AsyncUnixServer(path)
    await server.start(lambda r, w: _TtsHandler(record, r, w))
    return SpeechServer(path, server)


# ---- the door and its clients ------------------------------------------------------------------


class Running:
    def __init__(self, door: WyomingDoor, task: asyncio.Task[None], address: str) -> None:
        self.door = door
        self.task = task
        self.address = address

    def client(self) -> AsyncClient:
        return AsyncClient.from_uri(self.address, connect_timeout=TIMEOUT, read_timeout=TIMEOUT)


async def start_door(handler: ChatHandler, **settings: Any) -> Running:
    settings.setdefault("uri", "tcp://127.0.0.1:0")
    door = WyomingDoor(WyomingConfig(enabled=True, **settings), handler, model_name="demo-q8_0")
    task = asyncio.create_task(door.run())
    address = await asyncio.wait_for(door.wait_ready(), TIMEOUT)
    return Running(door, task, address)


async def stop_door(running: Running) -> None:
    running.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running.task


async def read_until(client: AsyncClient, *types: str) -> list[Event]:
    """Events up to and including the first one of ``types``."""
    events: list[Event] = []
    while True:
        event = await client.read_event()
        assert event is not None, f"connection closed; got {[e.type for e in events]}"
        events.append(event)
        if event.type in types:
            return events


async def ask(running: Running, text: str, conversation_id: str | None = None) -> list[Event]:
    """One Home-Assistant-style turn: a new connection, one transcript, read to the end of the reply."""
    context = {"conversation_id": conversation_id} if conversation_id else None
    async with running.client() as client:
        await client.write_event(Transcript(text=text, context=context, language="en").event())
        events = await read_until(client, "handled", "not-handled")
        if events[0].type == "handled-start":
            events += await read_until(client, "handled-stop")
        return events


async def send_utterance(client: AsyncClient, audio: bytes, *, language: str | None = None) -> None:
    if language:
        await client.write_event(Transcribe(language=language).event())
    await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
    for i in range(0, len(audio), 3200):
        await client.write_event(
            AudioChunk(rate=RATE, width=2, channels=1, audio=audio[i : i + 3200]).event()
        )
    await client.write_event(AudioStop().event())


def raw_exchange(address: str, data: bytes) -> bytes:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def first_event(raw: bytes) -> dict[str, Any]:
    header, _, rest = raw.partition(b"\n")
    event: dict[str, Any] = json.loads(header)
    if event.get("data_length"):
        event["data"] = json.loads(rest[: event["data_length"]])
    return event
