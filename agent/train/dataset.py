"""Training examples from consented conversations: one conversation, one example.

*The privacy unit is a conversation.* Each consented conversation gives exactly one example (its most
recent turns that fit ``max_seq_len`` tokens), so DP-SGD's per-example guarantee is a guarantee per
conversation. Only conversations *created* inside the run's data window ``(charged_at - period,
charged_at]`` are used, and only their turns written up to ``charged_at``: every run that touches a
conversation is then charged inside one budget period, which is what makes the rolling per-period
budget sound (docs/privacy.md).

The loss counts assistant tokens only. An example holds the token ids and, for each position, whether
that token is an assistant token (a *target*); the trainer computes each example's loss as the mean
cross-entropy over its targets.

A deterministic share of conversations (by a hash of the conversation id) is held out: never trained
on, used only to measure the loss before and after a run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.errors import AgentError
from agent.generation import ChatMessage, Role
from agent.train.tokenizer import ChatTokenizer

log = logging.getLogger("agent.train.dataset")


@dataclass(frozen=True)
class SourceConversation:
    """A consented conversation as the trainer sees it."""

    id: str
    created: float
    messages: tuple[ChatMessage, ...]


class ConversationSource(Protocol):
    """Where consented conversations come from (the store; tests pass a list)."""

    def consented(self, *, created_after: float, created_until: float) -> Iterable[SourceConversation]:
        """Conversations with training consent, created in ``(created_after, created_until]``, with
        their turns written up to ``created_until``."""
        ...


class ListSource:
    """An in-memory :class:`ConversationSource` (tests, tools)."""

    def __init__(self, conversations: Sequence[SourceConversation]) -> None:
        self._conversations = list(conversations)

    def consented(self, *, created_after: float, created_until: float) -> Iterator[SourceConversation]:
        for c in self._conversations:
            if created_after < c.created <= created_until:
                yield c


class StoreSource:
    """The conversation store (:class:`agent.store.SqliteStore`) as a :class:`ConversationSource`."""

    def __init__(self, store: object) -> None:
        from agent.store import SqliteStore

        if not isinstance(store, SqliteStore):
            raise TypeError("StoreSource needs an agent.store.SqliteStore")
        self._store = store

    def consented(self, *, created_after: float, created_until: float) -> Iterator[SourceConversation]:
        # A conversation created after ``created_after`` was updated after it too.
        for conv, turns in self._store.iter_consented(updated_since=created_after):
            if not created_after < conv.created <= created_until:
                continue
            messages = tuple(
                ChatMessage(role=t.role, content=t.content) for t in turns if t.created <= created_until
            )
            if messages:
                yield SourceConversation(id=conv.id, created=conv.created, messages=messages)


@dataclass(frozen=True)
class Example:
    conversation_id: str
    created: float
    input_ids: tuple[int, ...]
    targets: tuple[bool, ...]
    """``targets[t]``: token ``t`` is an assistant token the loss counts (never position 0)."""

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


@dataclass(frozen=True)
class DatasetSplit:
    train: tuple[Example, ...]
    holdout: tuple[Example, ...]
    skipped: int
    """Conversations that gave no example (no assistant turn, template refused, ...)."""


def is_holdout(conversation_id: str, fraction: float) -> bool:
    """Whether a conversation belongs to the held-out share (stable across runs)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(b"ppchat/holdout/v1\x00" + conversation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _with_system(messages: Sequence[ChatMessage], system_prompt: str | None) -> list[ChatMessage]:
    if messages and messages[0].role is Role.SYSTEM:
        return list(messages)
    return ([ChatMessage(role=Role.SYSTEM, content=system_prompt)] if system_prompt else []) + list(messages)


def _encode_all(tok: ChatTokenizer, messages: Sequence[ChatMessage]) -> tuple[list[int], list[bool]] | None:
    """Tokens of the whole conversation and the assistant-token mask, or None if the template's
    renderings of the prefixes are not prefixes of the whole (then spans cannot be found)."""
    msgs = tok.sanitize(messages)
    full = tok.render_sanitized(msgs, add_generation_prompt=False)
    ids = tok.tokens(full)
    targets = [False] * len(ids)
    found = False
    for i, m in enumerate(msgs):
        if m.role is not Role.ASSISTANT:
            continue
        before = tok.render_sanitized(msgs[:i], add_generation_prompt=True)
        through = tok.render_sanitized(msgs[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            return None
        start = tok.tokens(before)
        end = tok.tokens(through)
        if ids[: len(start)] != start or ids[: len(end)] != end:
            return None
        for t in range(max(1, len(start)), len(end)):
            targets[t] = True
            found = True
    if not found:
        return None
    return ids, targets


def encode_conversation(
    tok: ChatTokenizer,
    conversation: SourceConversation,
    *,
    system_prompt: str | None,
    max_seq_len: int,
) -> Example | None:
    """One example from a conversation: its latest turns that fit ``max_seq_len`` tokens (the system
    turn kept), or its last ``max_seq_len`` tokens when even the last exchange is longer."""
    messages = [m for m in conversation.messages if m.content or m.role is Role.ASSISTANT]
    system = [m for m in messages[:1] if m.role is Role.SYSTEM]
    rest = messages[len(system) :]
    # Drop trailing non-assistant turns: nothing to learn after the last reply.
    while rest and rest[-1].role is not Role.ASSISTANT:
        rest.pop()
    start = 0
    while start < len(rest):
        while start < len(rest) and rest[start].role is not Role.USER:
            start += 1  # begin at a user turn
        window = rest[start:]
        if not window:
            return None
        try:
            encoded = _encode_all(tok, _with_system(system + window, system_prompt))
        except AgentError as exc:  # the template refused (e.g. roles not alternating)
            log.debug("conversation skipped: %s", exc)
            return None
        if encoded is None:
            return None
        ids, targets = encoded
        if len(ids) <= max_seq_len:
            return Example(conversation.id, conversation.created, tuple(ids), tuple(targets))
        if sum(1 for m in window if m.role is Role.ASSISTANT) <= 1:
            ids, targets = ids[-max_seq_len:], targets[-max_seq_len:]
            targets[0] = False
            if not any(targets):
                return None
            return Example(conversation.id, conversation.created, tuple(ids), tuple(targets))
        start += 1
    return None


def build_dataset(
    source: ConversationSource,
    tok: ChatTokenizer,
    *,
    created_after: float,
    created_until: float,
    system_prompt: str | None,
    max_seq_len: int,
    holdout_fraction: float,
) -> DatasetSplit:
    """The run's examples, split into training and held-out sets (sorted by conversation id)."""
    train: list[Example] = []
    holdout: list[Example] = []
    skipped = 0
    seen: set[str] = set()
    conversations = list(source.consented(created_after=created_after, created_until=created_until))
    for conv in sorted(conversations, key=lambda c: c.id):
        if conv.id in seen:
            continue
        seen.add(conv.id)
        example = encode_conversation(tok, conv, system_prompt=system_prompt, max_seq_len=max_seq_len)
        if example is None:
            skipped += 1
            continue
        (holdout if is_holdout(conv.id, holdout_fraction) else train).append(example)
    return DatasetSplit(train=tuple(train), holdout=tuple(holdout), skipped=skipped)
