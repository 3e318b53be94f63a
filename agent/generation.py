"""Types shared by the inference engine and everything that asks it for replies.

The engine takes a list of :class:`ChatMessage` and :class:`GenerationParams` and streams
:class:`TokenDelta` items followed by exactly one :class:`GenerationResult`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str = Field(max_length=1_000_000)


class GenerationParams(BaseModel):
    """Sampling settings for one reply (validated bounds; keyword-only by construction)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    repeat_penalty: float = Field(default=1.1, ge=0.0, le=5.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: tuple[str, ...] = Field(default=(), max_length=8)


class FinishReason(str, Enum):
    STOP = "stop"  # end of turn or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the client cancelled or went away
    CONTEXT = "context"  # the context window is full


@dataclass(frozen=True)
class TokenDelta:
    """A piece of reply text (one or more tokens, always whole UTF-8 characters)."""

    text: str


@dataclass(frozen=True)
class GenerationResult:
    """The last item of every stream."""

    finish_reason: FinishReason
    text: str
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens whose KV state was reused instead of evaluated."""
    completion_tokens: int
    time_to_first_token_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.time_to_first_token_s
        if self.completion_tokens <= 1 or decode_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / decode_s


GenerationEvent = TokenDelta | GenerationResult


class Cancellation(Protocol):
    """Anything with ``is_set()`` (threading.Event works); checked between tokens."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    file_type: str
    """Quantization as GGUF reports it, e.g. ``Q4_K_M``."""
    architecture: str
    n_params: int
    n_ctx: int
    n_ctx_train: int
    load_s: float
    chat_template: str | None


class InferenceBackend(Protocol):
    """The seam between the daemon and llama.cpp. Tests of the daemon use the real one."""

    @property
    def info(self) -> ModelInfo: ...

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        fairness_key: str,
        cancel: Cancellation | None = None,
    ) -> AsyncIterator[GenerationEvent]: ...

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int: ...

    async def set_adapters(self, adapters: Sequence[tuple[Path, float]]) -> None: ...

    async def close(self) -> None: ...
