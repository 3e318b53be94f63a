"""A small synchronous client of the local chat socket (``agent chat``, the demo, benchmarks, tests).

One connection; requests are sent one at a time and their events read as they arrive::

    with AgentClient.connect(path) as client:
        for event in client.chat("hello", conversation_id=None):
            ...  # DeltaEvent..., then one DoneEvent or ErrorEvent
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.errors import AgentError, NotRunning, ProtocolError
from agent.protocol import (
    PROTOCOL_VERSION,
    CancelledEvent,
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    PongEvent,
    decode_event,
)

MAX_EVENT_BYTES = 64 * 1024 * 1024


class ClientError(AgentError):
    """The agent answered with an error event (``code``) or broke the protocol."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._ids = itertools.count(1)

    @classmethod
    def connect(cls, path: Path, *, timeout: float | None = None) -> AgentClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise NotRunning(f"the agent is not running (no answer on {path}: {exc.strerror})") from None
        except PermissionError:
            sock.close()
            raise NotRunning(f"no permission to use {path} (are you in the agent's group?)") from None
        except OSError as exc:
            sock.close()
            raise NotRunning(f"cannot connect to {path}: {exc.strerror or exc}") from None
        return cls(sock)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def next_id(self) -> str:
        return f"r{next(self._ids)}"

    def send(self, request: dict[str, Any]) -> None:
        request.setdefault("v", PROTOCOL_VERSION)
        self._sock.sendall(json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n")

    def read_event(self) -> Event:
        line = self._file.readline(MAX_EVENT_BYTES)
        if not line:
            raise ProtocolError(ErrorCode.BAD_JSON.value, "the agent closed the connection")
        return decode_event(line)

    def ping(self) -> None:
        rid = self.next_id()
        self.send({"id": rid, "type": "ping"})
        event = self.read_event()
        if not isinstance(event, PongEvent) or event.id != rid:
            raise ClientError("bad_reply", f"expected a pong, got {event.type.value}")

    def cancel(self, target: str) -> str:
        rid = self.next_id()
        self.send({"id": rid, "type": "cancel", "target": target})
        return rid

    def chat(
        self,
        text: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        conversation_id: str | None = None,
        stream: bool = True,
        options: dict[str, Any] | None = None,
        train_consent: bool | None = None,
        request_id: str | None = None,
    ) -> Iterator[DeltaEvent | DoneEvent | ErrorEvent]:
        """Send one chat request and yield its events (other requests' events are skipped)."""
        rid = request_id or self.next_id()
        request: dict[str, Any] = {"id": rid, "type": "chat", "stream": stream}
        if text is not None:
            request["text"] = text
        if messages is not None:
            request["messages"] = messages
        if conversation_id is not None:
            request["conversation_id"] = conversation_id
        if options:
            request["options"] = options
        if train_consent is not None:
            request["train_consent"] = train_consent
        self.send(request)
        return self.events_of(rid)

    def events_of(self, request_id: str) -> Iterator[DeltaEvent | DoneEvent | ErrorEvent]:
        while True:
            event = self.read_event()
            if isinstance(event, PongEvent | CancelledEvent):
                continue
            if event.id is None and isinstance(event, ErrorEvent):
                raise ClientError(event.code.value, event.message)
            if event.id != request_id:
                continue
            yield event
            if not isinstance(event, DeltaEvent):
                return
