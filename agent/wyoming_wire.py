"""What the Wyoming door reads from clients: events read with every size bounded, audio formats
validated, and the door's error codes. The wyoming library's own reader trusts announced lengths and
turns malformed input into end of stream; a door facing the network needs neither."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from wyoming.event import Event

from agent.errors import ProtocolError
from agent.protocol import ErrorCode


class WyomingErrorCode(str, Enum):
    """Codes of the ``error`` events this door sends (besides the socket protocol's framing codes)."""

    AUDIO_NOT_SUPPORTED = "audio_not_supported"  # no stt_uri configured
    BAD_AUDIO = "bad_audio"  # audio-start/-chunk with a missing or impossible format
    AUDIO_TOO_LONG = "audio_too_long"  # more than max_audio_s of audio
    STT_UNAVAILABLE = "stt_unavailable"  # the speech-to-text service failed or is unreachable
    TTS_UNAVAILABLE = "tts_unavailable"  # the text-to-speech service failed or is unreachable
    TOO_MANY_CONNECTIONS = ErrorCode.TOO_MANY_CONNECTIONS.value


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST.value, f"'{key}' must be a non-negative integer")
    if value > limit:
        raise ProtocolError(
            ErrorCode.LINE_TOO_LONG.value, f"'{key}' is {value} bytes; this agent accepts at most {limit}"
        )
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON.value, f"the event {what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON.value, f"the event {what} must be a JSON object")
    return obj


async def read_client_event(
    reader: asyncio.StreamReader, *, max_data_bytes: int, max_payload_bytes: int
) -> Event | None:
    """Read one Wyoming event with every size bounded; ``None`` at a clean end of stream.

    The wyoming library's reader trusts the announced lengths and turns malformed input into end of
    stream; a door facing the network needs neither.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise ProtocolError(ErrorCode.BAD_JSON.value, "the stream ended inside an event header") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(ErrorCode.LINE_TOO_LONG.value, "an event header line is too long") from None
    header = _json_object(line, "header")
    event_type = header.get("type")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 64:
        raise ProtocolError(ErrorCode.BAD_REQUEST.value, "an event needs a 'type' string")
    data = header.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST.value, "an event's 'data' must be a JSON object")
    data_length = _length(header, "data_length", max_data_bytes)
    payload_length = _length(header, "payload_length", max_payload_bytes)
    payload: bytes | None = None
    try:
        if data_length:
            data.update(_json_object(await reader.readexactly(data_length), "data"))
        if payload_length:
            payload = await reader.readexactly(payload_length)
    except asyncio.IncompleteReadError:
        raise ProtocolError(ErrorCode.BAD_REQUEST.value, "the stream ended inside an event") from None
    return Event(type=event_type, data=data, payload=payload)


@dataclass(frozen=True)
class AudioFormat:
    rate: int
    width: int
    channels: int

    @property
    def bytes_per_second(self) -> int:
        return self.rate * self.width * self.channels


def audio_format_of(data: dict[str, Any]) -> AudioFormat:
    """The audio format of an ``audio-start`` / ``audio-chunk``, validated."""
    values: dict[str, int] = {}
    for key, high in (("rate", 384_000), ("width", 4), ("channels", 16)):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ProtocolError(
                WyomingErrorCode.BAD_AUDIO.value, f"audio '{key}' must be an integer 1..{high}"
            )
        values[key] = value
    return AudioFormat(rate=values["rate"], width=values["width"], channels=values["channels"])
