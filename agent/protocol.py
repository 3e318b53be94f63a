"""The local chat protocol (docs/protocol.md): one JSON object per line, versioned.

Used by the Unix socket and, with the same events, by the local MQTT chat topic. Requests are parsed
into typed models here; nothing else in the agent touches raw client JSON.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from agent.errors import ProtocolError
from agent.generation import ChatMessage, FinishReason

PROTOCOL_VERSION = 1
MAX_ID_LENGTH = 128
MAX_MESSAGES = 512


class ErrorCode(str, Enum):
    """Stable error codes; clients may switch on them."""

    BAD_JSON = "bad_json"  # the line is not a JSON object
    BAD_REQUEST = "bad_request"  # a field is missing or invalid
    UNKNOWN_TYPE = "unknown_type"  # the request type is not one of chat, cancel, ping
    UNSUPPORTED_VERSION = "unsupported_version"
    LINE_TOO_LONG = "line_too_long"  # the line exceeds the configured limit; the connection closes
    TOO_MANY_CONNECTIONS = "too_many_connections"  # sent once, then the connection closes
    TOO_MANY_REQUESTS = "too_many_requests"  # this connection has too many requests in flight
    DUPLICATE_ID = "duplicate_id"  # a request with this id is still in flight on this connection
    UNKNOWN_CONVERSATION = "unknown_conversation"
    CONTEXT_OVERFLOW = "context_overflow"  # the newest message alone does not fit the context
    SHUTTING_DOWN = "shutting_down"
    ENGINE_ERROR = "engine_error"  # generation failed; the daemon keeps serving
    BUSY = "busy"  # the engine's queue is full; try again later
    STORE_ERROR = "store_error"  # the conversation store failed; nothing was remembered


class RequestType(str, Enum):
    CHAT = "chat"
    CANCEL = "cancel"
    PING = "ping"


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatOptions(_Wire):
    """Per-request generation options; unset ones take the config's defaults."""

    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    repeat_penalty: float | None = Field(default=None, ge=0.0, le=5.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] | None = Field(
        default=None, max_length=8
    )


RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


class ChatRequest(_Wire):
    """``messages`` (the whole history, stateless) or ``text`` (one user turn, the agent remembers)."""

    v: int = PROTOCOL_VERSION
    id: RequestId
    type: Literal[RequestType.CHAT] = RequestType.CHAT
    messages: tuple[ChatMessage, ...] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    text: str | None = Field(default=None, min_length=1, max_length=1_000_000)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    stream: bool = True
    options: ChatOptions = ChatOptions()
    train_consent: bool | None = None
    """For a new remembered conversation: may it be used for on-device training? Unset: config default."""

    @model_validator(mode="after")
    def _one_input(self) -> ChatRequest:
        if (self.messages is None) == (self.text is None):
            raise ValueError("give exactly one of 'messages' or 'text'")
        if self.messages is not None and self.conversation_id is not None:
            raise ValueError("'conversation_id' goes with 'text', not with 'messages'")
        return self


class CancelRequest(_Wire):
    v: int = PROTOCOL_VERSION
    id: RequestId
    type: Literal[RequestType.CANCEL] = RequestType.CANCEL
    target: RequestId
    """The id of the chat request to stop."""


class PingRequest(_Wire):
    v: int = PROTOCOL_VERSION
    id: RequestId
    type: Literal[RequestType.PING] = RequestType.PING


Request = ChatRequest | CancelRequest | PingRequest
_REQUEST_MODELS: dict[str, type[_Wire]] = {
    RequestType.CHAT.value: ChatRequest,
    RequestType.CANCEL.value: CancelRequest,
    RequestType.PING.value: PingRequest,
}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else str(err["msg"])


def request_id_of(obj: Any) -> str | None:
    """The request's id when it is usable for an error reply, else None."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LENGTH:
            return rid
    return None


def parse_request(line: bytes | str) -> Request:
    """Parse one request line or raise :class:`ProtocolError` with a stable code."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON.value, "the line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON.value, "a request must be a JSON object")
    version = obj.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION.value,
            f"protocol version {version!r} is not supported (this agent speaks {PROTOCOL_VERSION})",
        )
    kind = obj.get("type")
    model = _REQUEST_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE.value,
            f"unknown request type {kind!r}; expected one of {sorted(_REQUEST_MODELS)}",
        )
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST.value, _first_error(exc)) from None


# ---- events (agent -> client) -------------------------------------------------------------------


class EventType(str, Enum):
    DELTA = "delta"
    DONE = "done"
    ERROR = "error"
    PONG = "pong"
    CANCELLED = "cancelled"  # acknowledges a cancel request


class Usage(_Wire):
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class Timings(_Wire):
    time_to_first_token_s: float
    total_s: float
    tokens_per_s: float


class DeltaEvent(_Wire):
    v: int = PROTOCOL_VERSION
    id: str
    type: Literal[EventType.DELTA] = EventType.DELTA
    text: str


class DoneEvent(_Wire):
    v: int = PROTOCOL_VERSION
    id: str
    type: Literal[EventType.DONE] = EventType.DONE
    finish_reason: FinishReason
    text: str
    """The whole reply (also when streamed)."""
    conversation_id: str | None = None
    usage: Usage
    timings: Timings


class ErrorEvent(_Wire):
    v: int = PROTOCOL_VERSION
    id: str | None
    type: Literal[EventType.ERROR] = EventType.ERROR
    code: ErrorCode
    message: str


class PongEvent(_Wire):
    v: int = PROTOCOL_VERSION
    id: str
    type: Literal[EventType.PONG] = EventType.PONG


class CancelledEvent(_Wire):
    v: int = PROTOCOL_VERSION
    id: str
    type: Literal[EventType.CANCELLED] = EventType.CANCELLED
    target: str
    found: bool


Event = DeltaEvent | DoneEvent | ErrorEvent | PongEvent | CancelledEvent
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Annotated[Event, Field(discriminator="type")])


def encode_event(event: Event) -> bytes:
    """One event as a JSON line (UTF-8, newline-terminated)."""
    return event.model_dump_json().encode("utf-8") + b"\n"


def decode_event(line: bytes | str) -> Event:
    """Parse an event line (for clients: ``agent chat``, tests, the MQTT door's users)."""
    try:
        return _EVENT_ADAPTER.validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON.value, f"bad event from agent: {_first_error(exc)}") from None


def error_event(request_id: str | None, code: ErrorCode, message: str) -> ErrorEvent:
    return ErrorEvent(id=request_id, code=code, message=message)
