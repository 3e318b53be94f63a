"""The chat service every front door talks to (:class:`agent.frontdoor.ChatHandler`).

For a request with ``text`` the agent remembers the conversation: the history is loaded from the
store, fitted into the context window, the reply generated, and both turns stored. A request with
``messages`` is stateless: the client holds the history and nothing is stored.

Context fitting drops the oldest turns and keeps the system prompt. For a remembered conversation the
cut is sticky: once history has to go, enough goes to fit three quarters of the window, and the next
turns start from the same place, so the prompt keeps the same prefix and the engine can reuse its KV
cache for several turns instead of re-evaluating the whole window on every one.

Engine events become protocol events; errors become :class:`agent.protocol.ErrorEvent` codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from agent.config import GenerationConfig
from agent.errors import (
    AgentError,
    ContextOverflow,
    EngineBusy,
    EngineError,
    ModelError,
    ProtocolError,
    StoreError,
)
from agent.frontdoor import CancelSignal, ChatEvent, FrontDoor
from agent.generation import (
    ChatMessage,
    GenerationParams,
    GenerationResult,
    InferenceBackend,
    Role,
    TokenDelta,
)
from agent.protocol import (
    ChatOptions,
    ChatRequest,
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Timings,
    Usage,
)
from agent.store import ConversationStore, NewTurn, Turn

log = logging.getLogger(__name__)

# A sticky cut keeps the prompt at most this fraction of what fits, leaving room for a few turns.
REFIT_FRACTION = 0.75
MAX_REMEMBERED = 1024
MAX_HISTORY_TURNS = 4096
STREAM_PACE_S = 0.002
"""Streamed deltas are at least this far apart; tokens generated faster are merged."""

CountTokens = Callable[[Sequence[ChatMessage]], int]


def fit_history(
    count_tokens: CountTokens,
    system: Sequence[ChatMessage],
    history: Sequence[ChatMessage],
    last: ChatMessage,
    *,
    n_ctx: int,
    max_tokens: int,
    refit_fraction: float = 1.0,
) -> int:
    """How many of the oldest ``history`` messages to drop so that the prompt fits.

    The prompt is ``system + history[k:] + [last]``; it fits when it leaves ``max_tokens`` for the
    reply. ``k`` is 0 when everything fits; otherwise the smallest cut at a user turn (or the whole
    history) that brings the prompt down to ``refit_fraction`` of the room. When even the system
    prompt and ``last`` leave no room for ``max_tokens``, they are accepted if at least one token
    can still be generated (the reply then ends with ``context``), else :class:`ContextOverflow`.
    ``count_tokens`` is called O(log n) times.
    """
    room = n_ctx - max_tokens

    def size(k: int) -> int:
        return count_tokens([*system, *history[k:], last])

    if size(0) <= room:
        return 0
    cuts = [k for k in range(1, len(history)) if history[k].role is Role.USER]
    cuts.append(len(history))
    minimal = size(len(history))
    if minimal >= n_ctx:
        raise ContextOverflow(
            f"the message needs {minimal} prompt tokens with the system prompt and the context "
            f"window holds {n_ctx}"
        )
    if minimal > room:
        return len(history)
    target = max(minimal, int(room * refit_fraction))
    lo, hi = 0, len(cuts) - 1  # size(cuts[hi]) <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if size(cuts[mid]) <= target:
            hi = mid
        else:
            lo = mid + 1
    return cuts[lo]


@dataclass
class _Remembered:
    """What the service keeps in memory per conversation: a lock and the sticky window start."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    window_from_id: int | None = None


@dataclass(frozen=True)
class ReplyStats:
    """The last reply, for ``agent status``."""

    tokens_per_s: float
    completion_tokens: int
    time_to_first_token_s: float
    finish_reason: str
    at: float
    """Unix time the reply ended."""


class ChatActivity(Protocol):
    """Told of every chat request (:class:`agent.scheduler.TrainingScheduler`: it pre-empts training)."""

    def notify_chat_activity(self) -> None: ...

    def chat_request(self) -> AbstractContextManager[None]: ...


class ChatService:
    """Answers chat requests from every front door with one engine and one store."""

    def __init__(
        self,
        backend: InferenceBackend,
        store: ConversationStore,
        *,
        generation: GenerationConfig,
        system_prompt: str | None,
        max_remembered: int = MAX_REMEMBERED,
        activity: ChatActivity | None = None,
    ) -> None:
        self.activity = activity
        """Told of every request, whichever front door it came through (the training scheduler)."""
        self._backend = backend
        self._store = store
        self._generation = generation
        self._system = [ChatMessage(role=Role.SYSTEM, content=system_prompt)] if system_prompt else []
        self._max_remembered = max_remembered
        self._remembered: OrderedDict[str, _Remembered] = OrderedDict()
        self._shutting_down = False
        self.replies = 0
        self.last_reply: ReplyStats | None = None

    def begin_shutdown(self) -> None:
        """From now on new requests get ``shutting_down``; in-flight ones are cancelled by their doors."""
        self._shutting_down = True

    # ---- the ChatHandler seam -------------------------------------------------------------------

    async def handle(
        self,
        request: ChatRequest,
        *,
        source: FrontDoor,
        cancel: CancelSignal,
        client: str,
    ) -> AsyncIterator[ChatEvent]:
        activity = self.activity
        if activity is not None:
            activity.notify_chat_activity()  # pre-empts training before the prompt is evaluated
        busy = activity.chat_request() if activity is not None else contextlib.nullcontext()
        with busy:
            async for event in self._handle(request, source=source, cancel=cancel, client=client):
                yield event

    async def _handle(
        self,
        request: ChatRequest,
        *,
        source: FrontDoor,
        cancel: CancelSignal,
        client: str,
    ) -> AsyncIterator[ChatEvent]:
        try:
            if self._shutting_down:
                raise ProtocolError(ErrorCode.SHUTTING_DOWN.value, "the agent is shutting down")
            params = self.params(request.options)
            if request.text is not None:
                events = self._remembered_chat(
                    request, request.text, params, source=source, cancel=cancel, client=client
                )
            else:
                assert request.messages is not None
                events = self._stateless_chat(request, request.messages, params, cancel=cancel, client=client)
            async for event in events:
                yield event
        except AgentError as exc:
            yield self._error_event(request.id, exc)

    def _error_event(self, request_id: str, exc: AgentError) -> ErrorEvent:
        code: ErrorCode
        if isinstance(exc, ProtocolError):
            code = ErrorCode(exc.code)
        elif isinstance(exc, ContextOverflow):
            code = ErrorCode.CONTEXT_OVERFLOW
        elif self._shutting_down:
            code = ErrorCode.SHUTTING_DOWN
        elif isinstance(exc, EngineBusy):
            code = ErrorCode.BUSY
        elif isinstance(exc, StoreError):
            code = ErrorCode.STORE_ERROR
        elif isinstance(exc, EngineError | ModelError):
            code = ErrorCode.ENGINE_ERROR
        else:
            raise exc  # not a client-facing error: the supervisor decides
        if code in (ErrorCode.ENGINE_ERROR, ErrorCode.STORE_ERROR):
            log.warning("request %s failed: %s: %s", request_id, code.value, exc)
        return ErrorEvent(id=request_id, code=code, message=str(exc))

    def params(self, options: ChatOptions) -> GenerationParams:
        """The request's options over the config's defaults."""
        g = self._generation
        return GenerationParams(
            max_tokens=g.max_tokens if options.max_tokens is None else options.max_tokens,
            temperature=g.temperature if options.temperature is None else options.temperature,
            top_p=g.top_p if options.top_p is None else options.top_p,
            top_k=g.top_k if options.top_k is None else options.top_k,
            repeat_penalty=g.repeat_penalty if options.repeat_penalty is None else options.repeat_penalty,
            seed=options.seed,
            stop=options.stop or (),
        )

    # ---- stateless and remembered conversations -------------------------------------------------

    async def _stateless_chat(
        self,
        request: ChatRequest,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        cancel: CancelSignal,
        client: str,
    ) -> AsyncIterator[ChatEvent]:
        msgs = list(messages)
        n_system = 0
        while n_system < len(msgs) - 1 and msgs[n_system].role is Role.SYSTEM:
            n_system += 1
        system = msgs[:n_system] if n_system or msgs[0].role is Role.SYSTEM else list(self._system)
        history, last = msgs[n_system:-1], msgs[-1]
        drop = await asyncio.to_thread(
            fit_history,
            self._backend.count_tokens,
            system,
            history,
            last,
            n_ctx=self._backend.info.n_ctx,
            max_tokens=params.max_tokens,
        )
        prompt = [*system, *history[drop:], last]
        result: GenerationResult | None = None
        async for item in self._generate(request, prompt, params, cancel=cancel, client=client):
            if isinstance(item, GenerationResult):
                result = item
            else:
                yield item
        assert result is not None
        yield self._done(request, result, None)

    def _remembered_state(self, conversation_id: str) -> _Remembered:
        state = self._remembered.get(conversation_id)
        if state is None:
            state = self._remembered[conversation_id] = _Remembered()
            if len(self._remembered) > self._max_remembered:
                for key, old in list(self._remembered.items()):
                    if len(self._remembered) <= self._max_remembered:
                        break
                    if not old.lock.locked() and key != conversation_id:
                        del self._remembered[key]
        else:
            self._remembered.move_to_end(conversation_id)
        return state

    async def _remembered_chat(
        self,
        request: ChatRequest,
        text: str,
        params: GenerationParams,
        *,
        source: FrontDoor,
        cancel: CancelSignal,
        client: str,
    ) -> AsyncIterator[ChatEvent]:
        history: list[Turn] = []
        if request.conversation_id is None:
            conv = await self._store.create_conversation(source=source, train_consent=request.train_consent)
            state = self._remembered_state(conv.id)
        else:
            state = self._remembered_state(request.conversation_id)
        async with state.lock:  # one reply at a time per conversation, in order
            if request.conversation_id is not None:
                found = await self._store.get_conversation(request.conversation_id)
                if found is None:
                    self._remembered.pop(request.conversation_id, None)
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_CONVERSATION.value,
                        f"no conversation {request.conversation_id!r} (never started, or deleted after "
                        "the retention period)",
                    )
                conv = found
                if request.train_consent is not None and request.train_consent != conv.train_consent:
                    await self._store.set_train_consent(conv.id, request.train_consent)
                history = await self._store.turns(
                    conv.id, from_id=state.window_from_id, limit=MAX_HISTORY_TURNS
                )
            user = ChatMessage(role=Role.USER, content=text)
            past = [ChatMessage(role=t.role, content=t.content) for t in history]
            drop = await asyncio.to_thread(
                fit_history,
                self._backend.count_tokens,
                self._system,
                past,
                user,
                n_ctx=self._backend.info.n_ctx,
                max_tokens=params.max_tokens,
                refit_fraction=REFIT_FRACTION,
            )
            if drop:
                state.window_from_id = history[drop].id if drop < len(history) else history[-1].id + 1
                log.debug("conversation %s: %d old turns left the context window", conv.id, drop)
            prompt = [*self._system, *past[drop:], user]
            result: GenerationResult | None = None
            async for item in self._generate(request, prompt, params, cancel=cancel, client=client):
                if isinstance(item, GenerationResult):
                    result = item
                else:
                    yield item
            assert result is not None
            user_tokens = await asyncio.to_thread(self._backend.count_tokens, [user])
            await self._store.append_turns(
                conv.id,
                [
                    NewTurn(Role.USER, text, tokens=user_tokens),
                    NewTurn(Role.ASSISTANT, result.text, tokens=result.completion_tokens),
                ],
            )
        yield self._done(request, result, conv.id)

    async def _generate(
        self,
        request: ChatRequest,
        prompt: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        cancel: CancelSignal,
        client: str,
    ) -> AsyncIterator[DeltaEvent | GenerationResult]:
        """The engine's stream as delta events (when streaming) and, last, the result."""
        stream = self._backend.stream_chat(prompt, params, fairness_key=client, cancel=cancel)
        result: GenerationResult | None = None
        try:
            async for item in stream:
                if isinstance(item, TokenDelta):
                    if request.stream and item.text:
                        yield DeltaEvent(id=request.id, text=item.text)
                        # Let tokens that come faster than this gather into the next delta: far
                        # less work per token for the event loop (which shares the GIL and the
                        # cores with the engine), never noticeable by a reader.
                        await asyncio.sleep(STREAM_PACE_S)
                else:
                    result = item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if result is None:
            raise EngineError("the engine's stream ended without a result")
        self.replies += 1
        self.last_reply = ReplyStats(
            tokens_per_s=result.tokens_per_s,
            completion_tokens=result.completion_tokens,
            time_to_first_token_s=result.time_to_first_token_s,
            finish_reason=result.finish_reason.value,
            at=time.time(),
        )
        yield result

    @staticmethod
    def _done(request: ChatRequest, result: GenerationResult, conversation_id: str | None) -> DoneEvent:
        return DoneEvent(
            id=request.id,
            finish_reason=result.finish_reason,
            text=result.text,
            conversation_id=conversation_id,
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
                completion_tokens=result.completion_tokens,
            ),
            timings=Timings(
                time_to_first_token_s=result.time_to_first_token_s,
                total_s=result.total_s,
                tokens_per_s=result.tokens_per_s,
            ),
        )
