"""The Wyoming voice door: the agent as a Wyoming ``handle`` service (docs/wyoming.md).

Home Assistant's Wyoming integration adds it as a conversation agent: it sends ``describe`` (answered
with ``info``), then one ``transcript`` per user turn with ``context.conversation_id``; the reply is
``handled`` (preceded by ``handled-start`` / ``handled-chunk`` and followed by ``handled-stop`` when
streaming is on), or ``not-handled`` with the reason. A Home Assistant conversation id maps to one
agent conversation, so the conversation keeps its history across turns and connections.

A satellite may send audio here instead (``transcribe``?, ``audio-start``, ``audio-chunk``...,
``audio-stop``): with ``stt_uri`` configured it is streamed to that speech-to-text service, the
transcript is answered as above (the satellite gets the ``transcript`` first), and with ``tts_uri``
the reply is synthesized and streamed back as ``audio-start`` / ``audio-chunk`` / ``audio-stop``.
Without ``stt_uri`` audio gets an ``error`` event saying so.

Client input is read with bounded sizes; a malformed event gets an ``error`` event and the
connection closes; the door keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Attribution, Describe, HandleModel, HandleProgram, Info
from wyoming.ping import Ping, Pong

from agent import __version__
from agent.config import WyomingConfig
from agent.errors import AgentError, ProtocolError
from agent.frontdoor import ChatHandler, FrontDoor
from agent.generation import FinishReason
from agent.protocol import ChatRequest, DeltaEvent, DoneEvent, ErrorCode, ErrorEvent
from agent.wyoming_speech import SpeechServiceError, SttUpload, synthesize
from agent.wyoming_wire import (
    WyomingErrorCode,
    audio_format_of,
    read_client_event,
)

log = logging.getLogger("agent.wyoming")

HEADER_SLACK_BYTES = 4096
"""A header line may carry the event's data inline (older clients): allowed data size plus this."""
MAX_CONTEXT_KEY_CHARS = 256
ATTRIBUTION = Attribution(name="ppchat", url="")


# ---- conversations -----------------------------------------------------------------------------


class ConversationMap:
    """Client conversation keys (Home Assistant's ``conversation_id``) -> agent conversation ids.

    Bounded, least recently used first out. In memory only: after a restart a Home Assistant
    conversation continues as a new agent conversation.
    """

    def __init__(self, *, max_entries: int) -> None:
        self._max = max_entries
        self._map: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        value = self._map.get(key)
        if value is not None:
            self._map.move_to_end(key)
        return value

    def set(self, key: str, conversation_id: str) -> None:
        self._map[key] = conversation_id
        self._map.move_to_end(key)
        while len(self._map) > self._max:
            self._map.popitem(last=False)

    def forget(self, key: str) -> None:
        self._map.pop(key, None)

    def __len__(self) -> int:
        return len(self._map)


def context_conversation_key(data: dict[str, Any]) -> str | None:
    """The client's conversation key from an event's ``context``, if it gives a usable one."""
    context = data.get("context")
    if not isinstance(context, dict):
        return None
    value = context.get("conversation_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    key = str(value)
    return key if 0 < len(key) <= MAX_CONTEXT_KEY_CHARS else None


# ---- info ------------------------------------------------------------------------------------------


def build_info(config: WyomingConfig, *, model_name: str) -> Info:
    """The ``info`` answer: one installed handle program with one model."""
    languages = list(config.languages)
    return Info(
        handle=[
            HandleProgram(
                name=config.name,
                attribution=ATTRIBUTION,
                installed=True,
                description=config.description,
                version=__version__,
                models=[
                    HandleModel(
                        name=model_name,
                        attribution=ATTRIBUTION,
                        installed=True,
                        description=config.description,
                        version=__version__,
                        languages=languages,
                    )
                ],
                supports_handled_streaming=config.streaming,
                supports_home_control=False,
            )
        ]
    )


# ---- the door ----------------------------------------------------------------------------------


class _ClientGone(Exception):
    """Writing to the client failed or timed out: stop working for this connection."""


class _Backoff:
    def __init__(self, *, initial_s: float = 1.0, maximum_s: float = 60.0) -> None:
        self._initial = initial_s
        self._max = maximum_s
        self._next = initial_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._max)
        return delay

    def reset(self) -> None:
        self._next = self._initial


class WyomingDoor:
    """Serves the Wyoming protocol on ``config.uri`` until cancelled; re-listens by itself."""

    def __init__(self, config: WyomingConfig, handler: ChatHandler, *, model_name: str = "ppchat") -> None:
        self.config = config
        self.handler = handler
        self.info = build_info(config, model_name=model_name)
        self.conversations = ConversationMap(max_entries=config.max_conversations)
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._failure: asyncio.Future[None] | None = None
        self._ready = asyncio.Event()
        self.address: str | None = None
        """The URI actually listened on (``tcp://HOST:PORT`` with the real port) while serving."""

    async def wait_ready(self) -> str:
        await self._ready.wait()
        assert self.address is not None
        return self.address

    async def serve(self) -> None:
        """The daemon supervisor's name for :meth:`run`."""
        await self.run()

    async def shutdown(self, *, grace_s: float) -> None:
        """Stop accepting, cancel the replies in flight and give them ``grace_s`` to send their
        ``not-handled``; then the supervisor cancels :meth:`run`."""
        if self._server is not None:
            self._server.close()
        turns = []
        for conn in list(self.connections):
            conn.cancel()
            if conn.turn is not None and not conn.turn.done():
                turns.append(conn.turn)
        if turns:
            await asyncio.wait(turns, timeout=grace_s)

    async def run(self) -> None:
        backoff = _Backoff()
        while True:
            try:
                server = await self._listen()
            except OSError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "wyoming: cannot listen on %s: %s; retrying in %.0f s", self.config.uri, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self._server = server
            self._failure = asyncio.get_running_loop().create_future()
            log.info("wyoming: serving on %s", self.address)
            self._ready.set()
            try:
                await self._failure  # only a bug in a connection ends this: the supervisor decides
            finally:
                self._ready.clear()
                server.close()
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await server.wait_closed()
                self._unlink_socket()
                self.address = None
                self._server = None

    async def _listen(self) -> asyncio.AbstractServer:
        parsed = urlsplit(self.config.uri)
        limit = self.config.max_event_data_bytes + HEADER_SLACK_BYTES
        if parsed.scheme == "unix":
            path = Path(parsed.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._unlink_socket(only_stale=True)
            server = await asyncio.start_unix_server(self._on_connect, path=str(path), limit=limit)
            os.chmod(path, self.config.socket_mode)
            self.address = f"unix://{path}"
        else:
            server = await asyncio.start_server(
                self._on_connect, host=parsed.hostname, port=parsed.port, limit=limit
            )
            host, port = server.sockets[0].getsockname()[:2]
            self.address = f"tcp://{host}:{port}"
        return server

    def _unlink_socket(self, *, only_stale: bool = False) -> None:
        """Remove our Unix socket file; with ``only_stale``, refuse (``OSError``) if something answers
        on it, e.g. another agent. Anything but a socket is never removed."""
        parsed = urlsplit(self.config.uri)
        if parsed.scheme != "unix":
            return
        path = Path(parsed.path)
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                return
        except FileNotFoundError:
            return
        if only_stale:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(str(path))
                except OSError:
                    pass  # nobody there: stale
                else:
                    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task of this door; an unexpected exception in it ends :meth:`run` with that exception."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._failure is not None and not self._failure.done():
            self._failure.set_exception(exc)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        conn = _Connection(self, reader, writer, client=f"wyoming:{name}")
        self.spawn(conn.run(), name=f"wyoming {name}")


class _Connection:
    """One client connection: reads events in order; one chat turn runs at a time, in a task, so a
    client that hangs up mid-reply cancels its generation."""

    def __init__(
        self, door: WyomingDoor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client: str
    ) -> None:
        self.door = door
        self.config = door.config
        self.reader = reader
        self.writer = writer
        self.client = client
        self._write_lock = asyncio.Lock()
        self._cancel = threading.Event()
        self.turn: asyncio.Task[None] | None = None
        self._own_key: str | None = None
        # audio input state
        self._transcribe: dict[str, Any] = {}
        self._upload: SttUpload | None = None
        self._discarding = False

    # -- plumbing --

    async def send(self, event: Event) -> None:
        if self.writer.is_closing():
            raise _ClientGone
        try:
            async with self._write_lock:
                await asyncio.wait_for(async_write_event(event, self.writer), self.config.write_timeout_s)
        except (OSError, asyncio.TimeoutError):
            self._cancel.set()
            raise _ClientGone from None

    def cancel(self) -> None:
        """Stop the reply in flight (it ends with ``not-handled``)."""
        self._cancel.set()

    async def send_error(self, code: str, message: str) -> None:
        await self.send(Error(text=message, code=code).event())

    async def run(self) -> None:
        door = self.door
        door.connections.add(self)
        try:
            if len(door.connections) > self.config.max_connections:
                await self.send_error(
                    WyomingErrorCode.TOO_MANY_CONNECTIONS.value,
                    f"this agent serves at most {self.config.max_connections} Wyoming connections at once",
                )
                return
            await self._serve()
        except _ClientGone:
            pass
        finally:
            door.connections.discard(self)
            self._cancel.set()
            if self._upload is not None:
                await self._upload.close()
            if self.turn is not None:
                # the turn notices the cancel within a token; its own failure, if any, is reported
                # to the door by the task's done callback
                await asyncio.wait([self.turn])
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    async def _serve(self) -> None:
        while True:
            try:
                event = await read_client_event(
                    self.reader,
                    max_data_bytes=self.config.max_event_data_bytes,
                    max_payload_bytes=self.config.max_audio_chunk_bytes,
                )
            except ProtocolError as exc:
                log.info("wyoming: %s sent a bad event: %s", self.client, exc.message)
                await self.send_error(exc.code, exc.message)
                return  # the stream is out of step: close
            except OSError:
                return
            if event is None:
                return
            await self._dispatch(event)

    async def _dispatch(self, event: Event) -> None:
        kind = event.type
        if Describe.is_type(kind):
            await self.send(self.door.info.event())
        elif Ping.is_type(kind):
            text = event.data.get("text")
            await self.send(Pong(text=text if isinstance(text, str) else None).event())
        elif Transcript.is_type(kind):
            await self._on_transcript(event)
        elif Transcribe.is_type(kind):
            self._transcribe = event.data
        elif AudioStart.is_type(kind):
            await self._on_audio_start(event)
        elif AudioChunk.is_type(kind):
            await self._on_audio_chunk(event)
        elif AudioStop.is_type(kind):
            await self._on_audio_stop()
        else:
            log.debug("wyoming: %s: ignoring %r", self.client, kind)

    async def _start_turn(self, coro: Coroutine[Any, Any, None]) -> None:
        previous = self.turn
        if previous is not None:
            await asyncio.wait([previous])  # one turn at a time per connection, in order
        self.turn = self.door.spawn(self._guard(coro), name=f"wyoming turn {self.client}")

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(_ClientGone):
            await coro

    def _key(self, data: dict[str, Any]) -> str:
        key = context_conversation_key(data)
        if key is not None:
            return key
        if self._own_key is None:
            self._own_key = f"ppchat-{uuid.uuid4().hex}"
        return self._own_key

    # -- text --

    async def _on_transcript(self, event: Event) -> None:
        text = event.data.get("text")
        key = self._key(event.data)
        if not isinstance(text, str) or not text.strip():
            await self.send(
                NotHandled(text="the transcript has no text", context={"conversation_id": key}).event()
            )
            return
        await self._start_turn(self._answer(text.strip(), key, speak=False))

    async def _answer(self, text: str, key: str, *, speak: bool) -> None:
        reply = await self._chat(text, key)
        if reply and speak and self.config.tts_uri is not None:
            try:
                await synthesize(
                    self.config.tts_uri,
                    reply,
                    voice=self.config.tts_voice,
                    timeout_s=self.config.service_timeout_s,
                    emit=self.send,
                )
            except SpeechServiceError as exc:
                log.warning("wyoming: %s", exc.message)
                await self.send_error(exc.code.value, exc.message)

    async def _chat(self, text: str, key: str) -> str | None:
        """One chat turn relayed as handled events; the reply text, or None when not handled."""
        context = {"conversation_id": key}
        conversation_id = self.door.conversations.get(key)
        while True:
            request = ChatRequest(
                id=f"wyoming-{uuid.uuid4().hex[:16]}",
                text=text,
                conversation_id=conversation_id,
                stream=self.config.streaming,
            )
            started = False
            stream = self.door.handler.handle(
                request, source=FrontDoor.WYOMING, cancel=self._cancel, client=self.client
            )
            try:
                async for item in stream:
                    if isinstance(item, DeltaEvent):
                        if self.config.streaming and item.text:
                            if not started:
                                await self.send(HandledStart(context=context).event())
                                started = True
                            await self.send(HandledChunk(text=item.text).event())
                    elif isinstance(item, DoneEvent):
                        return await self._done(item, key, context, started)
                    elif isinstance(item, ErrorEvent):
                        if (
                            item.code is ErrorCode.UNKNOWN_CONVERSATION
                            and conversation_id is not None
                            and not started
                        ):
                            # the agent forgot it (retention, store reset): continue as a new one
                            self.door.conversations.forget(key)
                            conversation_id = None
                            break
                        await self._not_handled(item.message, context, started)
                        return None
                else:
                    await self._not_handled("the agent ended the reply without an answer", context, started)
                    return None
            except AgentError as exc:
                await self._not_handled(str(exc), context, started)
                return None
            finally:
                await _close(stream)

    async def _done(self, done: DoneEvent, key: str, context: dict[str, str], started: bool) -> str | None:
        if done.conversation_id is not None:
            self.door.conversations.set(key, done.conversation_id)
        if done.finish_reason is FinishReason.CANCELLED:
            await self._not_handled("the reply was cancelled", context, started)
            return None
        await self.send(Handled(text=done.text, context=context).event())
        if started:
            await self.send(HandledStop().event())
        return done.text

    async def _not_handled(self, reason: str, context: dict[str, str], started: bool) -> None:
        await self.send(NotHandled(text=reason, context=context).event())
        if started:
            await self.send(HandledStop().event())

    # -- audio --

    async def _on_audio_start(self, event: Event) -> None:
        if self._upload is not None:
            await self._upload.close()
            self._upload = None
        self._discarding = True  # until this utterance's audio-stop, unless the upload opens
        if self.config.stt_uri is None:
            await self.send_error(
                WyomingErrorCode.AUDIO_NOT_SUPPORTED.value,
                "this agent has no speech-to-text service configured ([wyoming] stt_uri, e.g. "
                "wyoming-faster-whisper); send a 'transcript' event instead",
            )
            return
        try:
            fmt = audio_format_of(event.data)
        except ProtocolError as exc:
            await self.send_error(exc.code, exc.message)
            return
        language = self._transcribe.get("language")
        if not isinstance(language, str):
            language = self.config.stt_language
        upload = SttUpload(
            self.config.stt_uri,
            timeout_s=self.config.service_timeout_s,
            fmt=fmt,
            max_bytes=int(self.config.max_audio_s * fmt.bytes_per_second),
        )
        try:
            await upload.open(language=language)
        except SpeechServiceError as exc:
            log.warning("wyoming: %s", exc.message)
            await self.send_error(exc.code.value, exc.message)
            return
        self._upload = upload
        self._discarding = False

    async def _on_audio_chunk(self, event: Event) -> None:
        upload = self._upload
        if upload is None:
            if not self._discarding:
                log.debug("wyoming: %s: audio-chunk without audio-start", self.client)
            return
        try:
            fmt = audio_format_of(event.data)
            await upload.send(event.payload or b"", fmt)
        except (ProtocolError, SpeechServiceError) as exc:
            await upload.close()
            self._upload = None
            self._discarding = True
            code = exc.code if isinstance(exc, ProtocolError) else exc.code.value
            await self.send_error(code, exc.message)

    async def _on_audio_stop(self) -> None:
        upload, self._upload = self._upload, None
        self._discarding = False
        transcribe, self._transcribe = self._transcribe, {}
        if upload is None:
            return
        try:
            text = await upload.finish()
        except SpeechServiceError as exc:
            log.warning("wyoming: %s", exc.message)
            await self.send_error(exc.code.value, exc.message)
            return
        key = self._key(transcribe)
        await self.send(Transcript(text=text, context={"conversation_id": key}).event())
        if not text:
            await self.send(
                NotHandled(text="no speech was recognized", context={"conversation_id": key}).event()
            )
            return
        await self._start_turn(self._answer(text, key, speak=True))


async def _close(stream: AsyncIterator[Any]) -> None:
    """Close a handler's stream early (generators stop generating); a no-op for plain iterators."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
