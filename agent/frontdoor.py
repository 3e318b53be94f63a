"""The seam between the front doors (Unix socket, Wyoming, local MQTT) and the chat service.

Every front door turns its own wire format into a :class:`agent.protocol.ChatRequest`, hands it to a
:class:`ChatHandler` and relays the events it yields: zero or more ``DeltaEvent`` (when streaming),
then exactly one ``DoneEvent`` or ``ErrorEvent``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from enum import Enum
from typing import Protocol

from agent.protocol import ChatRequest, DeltaEvent, DoneEvent, ErrorEvent


class FrontDoor(str, Enum):
    SOCKET = "socket"
    WYOMING = "wyoming"
    MQTT = "mqtt"


class CancelSignal(Protocol):
    def is_set(self) -> bool: ...


ChatEvent = DeltaEvent | DoneEvent | ErrorEvent


class ChatHandler(Protocol):
    def handle(
        self,
        request: ChatRequest,
        *,
        source: FrontDoor,
        cancel: CancelSignal,
        client: str,
    ) -> AsyncIterator[ChatEvent]:
        """Answer one chat request. ``client`` names the caller for fair queuing and logs
        (e.g. ``socket:uid=1000,pid=42``); it never reaches the store or the fleet."""
        ...
