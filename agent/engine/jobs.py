"""The units of work queued for the engine's worker, and the stream a caller reads a reply from.

A :class:`ChatJob` carries one request and a :class:`Channel` back to the caller's event loop; a
:class:`CallJob` runs a function on the worker between requests. :class:`ChatStream` is what
:meth:`agent.engine.llama_backend.LlamaEngine.stream_chat` returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.engine.fair_queue import FairQueue
from agent.errors import AgentError, EngineError
from agent.generation import (
    Cancellation,
    ChatMessage,
    FinishReason,
    GenerationEvent,
    GenerationParams,
    GenerationResult,
    TokenDelta,
)

if TYPE_CHECKING:
    from agent.engine.worker import Worker


class Channel:
    """Worker -> event loop: a locked deque plus one wake-up per batch of items (not per item)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[object] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._wake_pending = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._loop is None:
                self._loop = loop
                self._event = asyncio.Event()

    def send(self, item: object) -> bool:
        """Called on the worker; False when the consumer's event loop is gone."""
        with self._lock:
            self._items.append(item)
            loop = self._loop
            if loop is None or self._wake_pending:
                return True
            self._wake_pending = True
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody will read this
            return False
        return True

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            event = self._event
        if event is not None:
            event.set()

    async def receive(self) -> list[object]:
        self.bind(asyncio.get_running_loop())
        assert self._event is not None
        while True:
            with self._lock:
                if self._items:
                    out = list(self._items)
                    self._items.clear()
                    return out
                self._event.clear()
            await self._event.wait()


@dataclass(eq=False)
class ChatJob:
    messages: tuple[ChatMessage, ...]
    params: GenerationParams
    fairness_key: str
    cancel: Cancellation | None
    submitted: float
    channel: Channel = field(default_factory=Channel)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def stopped(self) -> bool:
        return self.abandoned.is_set() or (self.cancel is not None and self.cancel.is_set())


@dataclass(eq=False)
class CallJob:
    """A function to run on the worker between requests (adapter swaps, diagnostics)."""

    fn: Callable[[Worker], object]
    future: concurrent.futures.Future[object] = field(default_factory=concurrent.futures.Future)


Job = ChatJob | CallJob


def cancelled_result(job: ChatJob) -> GenerationResult:
    elapsed = time.perf_counter() - job.submitted
    return GenerationResult(
        finish_reason=FinishReason.CANCELLED,
        text="",
        prompt_tokens=0,
        cached_tokens=0,
        completion_tokens=0,
        time_to_first_token_s=elapsed,
        total_s=elapsed,
    )


class ChatStream:
    """``AsyncIterator[GenerationEvent]``: deltas, then one :class:`GenerationResult` (or an error).

    Consecutive deltas that are ready together come out as one. Closing the stream (``aclose``), the
    consuming task being cancelled, or dropping the stream stops the generation at the next token.
    """

    def __init__(self, queue: FairQueue[Job], job: ChatJob, error: AgentError | None) -> None:
        self._queue = queue
        self._job = job
        self._error = error
        self._buffer: deque[object] = deque()
        self._done = False

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        if self._error is not None:
            self._done = True
            raise self._error
        try:
            if not self._buffer:
                self._buffer.extend(await self._job.channel.receive())
        except asyncio.CancelledError:
            self._abandon()
            raise
        item = self._buffer.popleft()
        if isinstance(item, TokenDelta):
            parts = [item.text]
            while self._buffer and isinstance(self._buffer[0], TokenDelta):
                nxt = self._buffer.popleft()
                assert isinstance(nxt, TokenDelta)
                parts.append(nxt.text)
            return TokenDelta("".join(parts)) if len(parts) > 1 else item
        self._done = True
        if isinstance(item, GenerationResult):
            return item
        if isinstance(item, BaseException):
            raise item
        raise EngineError(f"unexpected item from the worker: {type(item).__name__}")

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            self._job.abandoned.set()
            self._queue.remove(self._job)

    def __del__(self) -> None:
        if not self._done:
            self._job.abandoned.set()
