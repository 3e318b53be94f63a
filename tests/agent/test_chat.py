"""The chat service on the real engine: remembered conversations, context fitting, events, errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.chat import ChatService, fit_history
from agent.config import GenerationConfig
from agent.errors import ContextOverflow
from agent.frontdoor import ChatEvent, FrontDoor
from agent.generation import ChatMessage, GenerationEvent, GenerationParams, ModelInfo, Role
from agent.protocol import ChatOptions, ChatRequest, DeltaEvent, DoneEvent, ErrorCode, ErrorEvent
from agent.store import ConversationStore, NewTurn
from tests.agent.chat_support import GREEDY, LONG_REPLY

SYSTEM = "You are ppchat, a helpful assistant running privately on this device."


# ---- fit_history: pure logic over a token counter ------------------------------------------------


def _words(msgs: Sequence[ChatMessage]) -> int:
    return sum(len(m.content.split()) + 2 for m in msgs)


def _msg(role: Role, n: int) -> ChatMessage:
    return ChatMessage(role=role, content=" ".join(["w"] * n))


def _history(sizes: Sequence[int]) -> list[ChatMessage]:
    return [_msg(Role.USER if i % 2 == 0 else Role.ASSISTANT, n) for i, n in enumerate(sizes)]


def test_fit_keeps_everything_that_fits() -> None:
    history = _history([5, 5, 5, 5])
    assert (
        fit_history(_words, [_msg(Role.SYSTEM, 3)], history, _msg(Role.USER, 2), n_ctx=100, max_tokens=10)
        == 0
    )


def test_fit_drops_oldest_whole_exchanges_and_refits_lower() -> None:
    system = [_msg(Role.SYSTEM, 8)]
    history = _history([8] * 10)  # 10 messages of 10 tokens
    last = _msg(Role.USER, 8)
    # prompt = 10 + 100 + 10 = 120; room = 100 - 20 = 80
    k = fit_history(_words, system, history, last, n_ctx=100, max_tokens=20)
    assert k == 4 and history[k].role is Role.USER  # 10 + 60 + 10 = 80
    k = fit_history(_words, system, history, last, n_ctx=100, max_tokens=20, refit_fraction=0.75)
    assert k == 6  # 10 + 40 + 10 = 60 = 0.75 * 80


def test_fit_overflow_and_last_resort() -> None:
    system = [_msg(Role.SYSTEM, 8)]
    with pytest.raises(ContextOverflow):
        fit_history(_words, system, _history([5, 5]), _msg(Role.USER, 200), n_ctx=100, max_tokens=10)
    # No room for max_tokens even alone, but a token can still be generated: drop all history.
    assert fit_history(_words, system, _history([5, 5]), _msg(Role.USER, 80), n_ctx=100, max_tokens=50) == 2


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), max_size=30),
    system=st.integers(min_value=0, max_value=30),
    last=st.integers(min_value=0, max_value=60),
    n_ctx=st.integers(min_value=16, max_value=400),
    max_tokens=st.integers(min_value=1, max_value=200),
    fraction=st.sampled_from([1.0, 0.75, 0.5]),
)
def test_fit_properties(
    sizes: list[int], system: int, last: int, n_ctx: int, max_tokens: int, fraction: float
) -> None:
    sys_msgs = [_msg(Role.SYSTEM, system)]
    history = _history(sizes)
    new = _msg(Role.USER, last)
    minimal = _words([*sys_msgs, new])
    try:
        k = fit_history(
            _words, sys_msgs, history, new, n_ctx=n_ctx, max_tokens=max_tokens, refit_fraction=fraction
        )
    except ContextOverflow:
        assert minimal >= n_ctx
        return
    assert minimal < n_ctx
    assert 0 <= k <= len(history)
    kept = _words([*sys_msgs, *history[k:], new])
    room = n_ctx - max_tokens
    if k == 0:
        assert kept <= room or not history
    if k < len(history):
        assert history[k].role is Role.USER or k == 0
        assert kept <= room  # whatever history is kept leaves room for the reply
    if 0 < k < len(history):
        # minimal: the previous user cut would not have met the target
        prev = max(i for i in range(k) if i == 0 or history[i].role is Role.USER)
        if prev > 0:
            target = max(minimal, int(room * fraction))
            assert _words([*sys_msgs, *history[prev:], new]) > target


# ---- the service on the real engine ----------------------------------------------------------------


class RecordingBackend:
    """Delegates to the real engine and records the prompts it was asked to answer."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.prompts: list[list[ChatMessage]] = []

    @property
    def info(self) -> ModelInfo:
        info: ModelInfo = self.engine.info
        return info

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        n: int = self.engine.count_tokens(messages)
        return n

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        fairness_key: str,
        cancel: Any = None,
    ) -> AsyncIterator[GenerationEvent]:
        self.prompts.append(list(messages))
        stream: AsyncIterator[GenerationEvent] = self.engine.stream_chat(
            messages, params, fairness_key=fairness_key, cancel=cancel
        )
        return stream

    async def set_adapters(self, adapters: Sequence[tuple[Path, float]]) -> None:
        await self.engine.set_adapters(adapters)

    async def close(self) -> None:  # the session's engine outlives the test
        pass


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ConversationStore]:
    s = await ConversationStore.open(tmp_path / "c.sqlite3")
    yield s
    await s.close()


@pytest.fixture
def backend(chat_engine: Any) -> RecordingBackend:
    return RecordingBackend(chat_engine)


@pytest.fixture
def service(backend: RecordingBackend, store: ConversationStore) -> ChatService:
    return ChatService(backend, store, generation=GenerationConfig(max_tokens=48), system_prompt=SYSTEM)


async def _ask(service: ChatService, cancel: threading.Event | None = None, **fields: Any) -> list[ChatEvent]:
    fields.setdefault("id", "r")
    fields.setdefault("options", ChatOptions(**GREEDY))
    request = ChatRequest(**fields)
    return [
        ev
        async for ev in service.handle(
            request, source=FrontDoor.SOCKET, cancel=cancel or threading.Event(), client="test"
        )
    ]


def _done(events: list[ChatEvent]) -> DoneEvent:
    assert isinstance(events[-1], DoneEvent), events[-1]
    return events[-1]


async def test_remembered_conversation_round_trip(
    service: ChatService, store: ConversationStore, backend: RecordingBackend
) -> None:
    first = await _ask(service, text="What can you do?")
    done = _done(first)
    assert done.conversation_id and done.text
    assert "".join(e.text for e in first if isinstance(e, DeltaEvent)) == done.text
    second = _done(
        await _ask(service, text="And without the internet?", conversation_id=done.conversation_id)
    )
    assert second.conversation_id == done.conversation_id
    # The second prompt is system + first exchange + the new message, and its prefix was reused.
    roles = [m.role for m in backend.prompts[-1]]
    assert roles == [Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.USER]
    assert backend.prompts[-1][0].content == SYSTEM
    assert backend.prompts[-1][2].content == done.text
    assert second.usage.cached_tokens > 0
    turns = await store.turns(done.conversation_id)
    assert [(t.role, t.content) for t in turns] == [
        (Role.USER, "What can you do?"),
        (Role.ASSISTANT, done.text),
        (Role.USER, "And without the internet?"),
        (Role.ASSISTANT, second.text),
    ]
    assert turns[1].tokens == done.usage.completion_tokens
    assert turns[0].tokens is not None and turns[0].tokens > 0
    conv = await store.get_conversation(done.conversation_id)
    assert conv is not None and conv.source is FrontDoor.SOCKET and conv.train_consent is False
    assert service.replies == 2 and service.last_reply is not None


async def test_history_is_loaded_from_the_store(backend: RecordingBackend, store: ConversationStore) -> None:
    """A new service (a restarted daemon) continues a conversation it never saw."""
    conv = await store.create_conversation(source=FrontDoor.MQTT, train_consent=True)
    await store.append_turns(
        conv.id, [NewTurn(Role.USER, "hello"), NewTurn(Role.ASSISTANT, "Hello! How can I help?")]
    )
    fresh = ChatService(backend, store, generation=GenerationConfig(max_tokens=16), system_prompt=None)
    done = _done(await _ask(fresh, text="What is your name?", conversation_id=conv.id, train_consent=False))
    assert [m.content for m in backend.prompts[-1]] == [
        "hello",
        "Hello! How can I help?",
        "What is your name?",
    ]
    assert done.conversation_id == conv.id
    got = await store.get_conversation(conv.id)
    assert got is not None and got.train_consent is False  # the later turn changed the flag


async def test_unknown_conversation(service: ChatService) -> None:
    [event] = await _ask(service, text="hi", conversation_id="never-was")
    assert isinstance(event, ErrorEvent) and event.code is ErrorCode.UNKNOWN_CONVERSATION and event.id == "r"


async def test_stateless_messages_are_not_stored(
    service: ChatService, store: ConversationStore, backend: RecordingBackend
) -> None:
    msgs = (ChatMessage(role=Role.USER, content="hello"),)
    done = _done(await _ask(service, messages=msgs, stream=False))
    assert done.conversation_id is None
    assert [m.role for m in backend.prompts[-1]] == [Role.SYSTEM, Role.USER]  # the agent's system prompt
    own = (ChatMessage(role=Role.SYSTEM, content="Be brief."), ChatMessage(role=Role.USER, content="hello"))
    _done(await _ask(service, messages=own))
    assert backend.prompts[-1] == list(own)
    assert await store.count_conversations() == 0


async def test_non_streaming_sends_only_done(service: ChatService) -> None:
    events = await _ask(service, text="hello", stream=False)
    assert len(events) == 1 and _done(events).text


async def test_long_history_is_fitted_keeping_the_system_prompt(
    service: ChatService, store: ConversationStore, backend: RecordingBackend, chat_engine: Any
) -> None:
    conv = await store.create_conversation(source=FrontDoor.SOCKET)
    for i in range(40):  # ~40 * 2 * 30 tokens: far more than the 1024-token window
        await store.append_turns(
            conv.id,
            [
                NewTurn(Role.USER, f"question {i}: how do I check the battery of the device please"),
                NewTurn(Role.ASSISTANT, f"answer {i}: open the status page and read the battery line there"),
            ],
        )
    done = _done(await _ask(service, text="And the temperature?", conversation_id=conv.id))
    prompt = backend.prompts[-1]
    assert prompt[0] == ChatMessage(role=Role.SYSTEM, content=SYSTEM)
    assert prompt[1].role is Role.USER and prompt[-1].content == "And the temperature?"
    assert 3 < len(prompt) < 81
    n_ctx = chat_engine.info.n_ctx
    assert done.usage.prompt_tokens <= 0.75 * (n_ctx - 48) + 1
    assert prompt[-2].content.startswith("answer 39")  # the newest history is kept
    # The cut is sticky: the next turn starts from the same place, so the prefix is reused.
    start = prompt[1].content
    nxt = _done(await _ask(service, text="Thanks!", conversation_id=conv.id))
    assert backend.prompts[-1][1].content == start
    assert nxt.usage.cached_tokens > done.usage.prompt_tokens // 2


async def test_message_that_can_never_fit_is_context_overflow(service: ChatService) -> None:
    [event] = await _ask(service, text="battery " * 3000)
    assert isinstance(event, ErrorEvent) and event.code is ErrorCode.CONTEXT_OVERFLOW


async def test_cancel_signal_ends_with_cancelled(service: ChatService) -> None:
    cancel = threading.Event()
    events: list[ChatEvent] = []
    request = ChatRequest(
        id="c", text="tell me everything", options=ChatOptions(max_tokens=600, **LONG_REPLY)
    )
    async for ev in service.handle(request, source=FrontDoor.SOCKET, cancel=cancel, client="t"):
        events.append(ev)
        cancel.set()
    done = _done(events)
    assert done.finish_reason.value == "cancelled"
    assert done.usage.completion_tokens < 600


async def test_conversation_deleted_mid_reply_is_a_store_error(
    service: ChatService, store: ConversationStore
) -> None:
    first = _done(await _ask(service, text="hello"))
    assert first.conversation_id is not None
    request = ChatRequest(
        id="d",
        text="go on",
        conversation_id=first.conversation_id,
        options=ChatOptions(max_tokens=200, **LONG_REPLY),
    )
    events: list[ChatEvent] = []
    async for ev in service.handle(request, source=FrontDoor.SOCKET, cancel=threading.Event(), client="t"):
        if not events:
            assert await store.delete_conversation(first.conversation_id)
        events.append(ev)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code is ErrorCode.STORE_ERROR
    assert any(isinstance(e, DeltaEvent) for e in events)


async def test_replies_in_one_conversation_are_serialized(
    service: ChatService, store: ConversationStore
) -> None:
    cid = _done(await _ask(service, text="hello")).conversation_id
    results = await asyncio.gather(
        *(_ask(service, id=f"r{i}", text=f"message {i}", conversation_id=cid) for i in range(3))
    )
    assert all(isinstance(r[-1], DoneEvent) for r in results)
    assert cid is not None
    turns = await store.turns(cid)
    assert [t.content for t in turns if t.role is Role.USER] == [
        "hello",
        "message 0",
        "message 1",
        "message 2",
    ]


async def test_options_override_config_defaults(service: ChatService) -> None:
    params = service.params(ChatOptions(max_tokens=7, stop=("x",)))
    assert (
        params.max_tokens == 7
        and params.stop == ("x",)
        and params.temperature == GenerationConfig().temperature
    )
    done = _done(
        await _ask(service, text="Tell me about yourself", options=ChatOptions(max_tokens=3, temperature=0))
    )
    assert done.usage.completion_tokens <= 3


async def test_shutting_down_refuses_new_requests(service: ChatService) -> None:
    service.begin_shutdown()
    [event] = await _ask(service, text="hi")
    assert isinstance(event, ErrorEvent) and event.code is ErrorCode.SHUTTING_DOWN
