"""A ChatHandler test double for the front doors' own logic (error mapping, memory keys, cancel).

End-to-end tests use the real ChatService on the demo model; this one only makes the doors' edge
cases reachable on purpose. It replies ``turn N: <text>`` word by word and remembers conversations.
Special texts: ``!error`` (an engine_error event), ``!raise`` (raises EngineError), ``!slow`` (streams
until cancelled, then ``done`` with finish_reason ``cancelled``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agent.errors import EngineError
from agent.frontdoor import CancelSignal, ChatEvent, FrontDoor
from agent.generation import FinishReason
from agent.protocol import ChatRequest, DeltaEvent, DoneEvent, ErrorCode, Timings, Usage, error_event


@dataclass
class Call:
    request: ChatRequest
    source: FrontDoor
    client: str
    cancel: CancelSignal


@dataclass
class ScriptedHandler:
    delay_s: float = 0.0
    calls: list[Call] = field(default_factory=list)
    conversations: dict[str, list[str]] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def forget_all(self) -> None:
        self.conversations.clear()

    async def handle(
        self, request: ChatRequest, *, source: FrontDoor, cancel: CancelSignal, client: str
    ) -> AsyncIterator[ChatEvent]:
        self.calls.append(Call(request, source, client, cancel))
        text = request.text or (request.messages[-1].content if request.messages else "")
        usage = Usage(prompt_tokens=1, cached_tokens=0, completion_tokens=1)
        timings = Timings(time_to_first_token_s=0.0, total_s=0.0, tokens_per_s=0.0)
        if text == "!error":
            yield error_event(request.id, ErrorCode.ENGINE_ERROR, "the engine broke (scripted)")
            return
        if text == "!raise":
            raise EngineError("scripted engine failure")
        if text == "!slow":
            sent = []
            while not cancel.is_set():
                sent.append("tick ")
                yield DeltaEvent(id=request.id, text="tick ")
                await asyncio.sleep(0.01)
            self.cancelled.append(request.id)
            yield DoneEvent(
                id=request.id,
                finish_reason=FinishReason.CANCELLED,
                text="".join(sent),
                usage=usage,
                timings=timings,
            )
            return
        cid = request.conversation_id
        if cid is not None and cid not in self.conversations:
            yield error_event(request.id, ErrorCode.UNKNOWN_CONVERSATION, f"no conversation {cid!r}")
            return
        if request.messages is None:
            if cid is None:
                cid = f"conv-{next(self._ids)}"
                self.conversations[cid] = []
            self.conversations[cid].append(text)
            turn = len(self.conversations[cid])
        else:
            turn = sum(1 for m in request.messages if m.role.value == "user")
        reply = f"turn {turn}: {text}"
        if request.stream:
            words = reply.split(" ")
            for i, word in enumerate(words):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield DeltaEvent(id=request.id, text=word if i == 0 else f" {word}")
        yield DoneEvent(
            id=request.id,
            finish_reason=FinishReason.STOP,
            text=reply,
            conversation_id=cid if request.messages is None else None,
            usage=usage,
            timings=timings,
        )
