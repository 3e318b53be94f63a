"""Fitting a conversation into the context window: drop the oldest turns, keep the system prompt.

Pure logic over a token-counting function, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agent.errors import ContextOverflow
from agent.generation import ChatMessage, Role


def fit_messages(
    messages: Sequence[ChatMessage],
    count_tokens: Callable[[Sequence[ChatMessage]], int],
    *,
    n_ctx: int,
    max_tokens: int,
) -> tuple[list[ChatMessage], int]:
    """Drop the oldest non-system messages until ``prompt + max_tokens <= n_ctx``.

    Turns are dropped from the front of the history (after the leading system messages) one message
    at a time, then any assistant messages left at the front, so the history still starts with a
    user turn. The last message is never dropped. When only the system prompt and the last message
    are left, the prompt is accepted if it leaves room for at least one generated token (the reply
    then ends with ``FinishReason.CONTEXT`` when the window is full); otherwise
    :class:`ContextOverflow` is raised. Returns the kept messages and their prompt token count.
    """
    if not messages:
        raise ValueError("no messages")
    msgs = list(messages)
    n_system = 0
    while n_system < len(msgs) - 1 and msgs[n_system].role is Role.SYSTEM:
        n_system += 1
    n_prompt = count_tokens(msgs)
    while n_prompt + max_tokens > n_ctx and len(msgs) - n_system > 1:
        del msgs[n_system]
        while len(msgs) - n_system > 1 and msgs[n_system].role is Role.ASSISTANT:
            del msgs[n_system]
        n_prompt = count_tokens(msgs)
    if n_prompt >= n_ctx:
        raise ContextOverflow(
            f"the prompt needs {n_prompt} tokens with only the system prompt and the last message "
            f"kept, and the context window holds {n_ctx}"
        )
    return msgs, n_prompt
