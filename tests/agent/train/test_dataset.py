"""Examples from conversations: the engine's tokens, assistant-only targets, one example per
conversation, the data window, consent, and the held-out split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.frontdoor import FrontDoor
from agent.generation import ChatMessage, Role
from agent.store import NewTurn, SqliteStore
from agent.train.dataset import (
    ListSource,
    SourceConversation,
    StoreSource,
    build_dataset,
    encode_conversation,
    is_holdout,
)
from agent.train.tokenizer import ChatTokenizer, LlamaVocab
from tests.agent.train.conftest import NOW, PRIVATE_REPLY, private_conversations

SYSTEM = "You are ppchat."


@pytest.fixture(scope="module")
def tok(demo: Any) -> Iterator[ChatTokenizer]:
    vocab = LlamaVocab(demo.f16)
    yield ChatTokenizer(vocab)
    vocab.close()


def conv(*turns: tuple[Role, str], cid: str = "c1", created: float = NOW) -> SourceConversation:
    return SourceConversation(
        id=cid, created=created, messages=tuple(ChatMessage(role=r, content=c) for r, c in turns)
    )


def test_examples_use_the_engines_prompt_and_tokens(tok: ChatTokenizer, chat_engine: Any) -> None:
    messages = [
        ChatMessage(role=Role.SYSTEM, content=SYSTEM),
        ChatMessage(role=Role.USER, content="Hello, where is </s> kept? <|end|>"),
    ]
    rendered = tok.render(tok.sanitize(messages), add_generation_prompt=True)
    assert rendered == chat_engine.render_prompt(messages)
    prompt = tok.prompt_tokens(messages)
    assert len(prompt) == chat_engine.count_tokens(messages)

    c = conv((Role.USER, messages[1].content), (Role.ASSISTANT, PRIVATE_REPLY))
    example = encode_conversation(tok, c, system_prompt=SYSTEM, max_seq_len=256)
    assert example is not None
    first_target = example.targets.index(True)
    # What the model learns to continue is exactly what the engine feeds it at chat time ...
    assert list(example.input_ids[:first_target]) == prompt
    # ... and the loss counts the reply and its end-of-turn token, nothing else.
    reply = [t for t, m in zip(example.input_ids, example.targets, strict=True) if m]
    text = b"".join(tok.vocab.piece(t) for t in reply).decode()
    assert text.startswith(PRIVATE_REPLY)
    assert tok.vocab.token_text(reply[-1]) == "<|end|>"
    assert example.targets[0] is False


def test_multi_turn_targets_every_reply_and_no_user_text(tok: ChatTokenizer) -> None:
    c = conv(
        (Role.USER, "Hi"),
        (Role.ASSISTANT, "Hello."),
        (Role.USER, "What is the gate code?"),
        (Role.ASSISTANT, "Seven four one."),
        (Role.USER, "Thanks"),  # trailing user turn: nothing to learn after it
    )
    example = encode_conversation(tok, c, system_prompt=SYSTEM, max_seq_len=256)
    assert example is not None
    spans: list[list[int]] = []
    for t, m in zip(example.input_ids, example.targets, strict=True):
        if m:
            if not spans or spans[-1][-1] is None:
                spans.append([])
            spans[-1].append(t)
        elif spans and spans[-1] and spans[-1][-1] is not None:
            spans[-1].append(None)  # type: ignore[arg-type]
    texts = [b"".join(tok.vocab.piece(t) for t in s if t is not None).decode() for s in spans]
    assert texts == ["Hello.", "Seven four one."]
    assert "Thanks" not in b"".join(tok.vocab.piece(t) for t in example.input_ids).decode()


def test_long_conversations_keep_their_latest_turns(tok: ChatTokenizer) -> None:
    turns: list[tuple[Role, str]] = []
    for i in range(30):
        turns += [(Role.USER, f"Question number {i} about the device?"), (Role.ASSISTANT, f"Answer {i}.")]
    example = encode_conversation(tok, conv(*turns), system_prompt=SYSTEM, max_seq_len=64)
    assert example is not None
    assert len(example.input_ids) <= 64
    text = b"".join(tok.vocab.piece(t) for t in example.input_ids).decode()
    assert "Answer 29." in text and SYSTEM in text and "Answer 0." not in text


def test_conversations_without_a_reply_give_no_example(tok: ChatTokenizer) -> None:
    assert encode_conversation(tok, conv((Role.USER, "Hi")), system_prompt=SYSTEM, max_seq_len=64) is None


def test_window_and_holdout(tok: ChatTokenizer) -> None:
    convs = private_conversations(200, start=NOW - 10_000)
    old = conv((Role.USER, "Hi"), (Role.ASSISTANT, "Old."), cid="old", created=NOW - 40 * 86400)
    future = conv((Role.USER, "Hi"), (Role.ASSISTANT, "Later."), cid="later", created=NOW + 10)
    split = build_dataset(
        ListSource([*convs, old, future]),
        tok,
        created_after=NOW - 30 * 86400,
        created_until=NOW,
        system_prompt=SYSTEM,
        max_seq_len=96,
        holdout_fraction=0.2,
    )
    ids = {e.conversation_id for e in split.train} | {e.conversation_id for e in split.holdout}
    assert ids == {c.id for c in convs}  # one example per conversation, only inside the window
    assert not {e.conversation_id for e in split.train} & {e.conversation_id for e in split.holdout}
    assert 20 <= len(split.holdout) <= 60
    assert all(is_holdout(e.conversation_id, 0.2) for e in split.holdout)
    assert not is_holdout("anything", 0.0)


def test_store_source_reads_consented_conversations_in_the_window(tmp_path: Path) -> None:
    clock = {"now": NOW - 100.0}
    store = SqliteStore(tmp_path / "c.sqlite3", clock=lambda: clock["now"])
    yes = store.create_conversation(source=FrontDoor(next(iter(FrontDoor)).value), train_consent=True)
    store.append_turns(
        yes.id, [NewTurn(role=Role.USER, content="Hi"), NewTurn(role=Role.ASSISTANT, content="Hello.")]
    )
    no = store.create_conversation(source=next(iter(FrontDoor)), train_consent=False)
    store.append_turns(
        no.id, [NewTurn(role=Role.USER, content="Secret"), NewTurn(role=Role.ASSISTANT, content="Ok.")]
    )
    clock["now"] = NOW + 50.0  # after the run's charge: not part of it
    store.append_turns(yes.id, [NewTurn(role=Role.USER, content="More")])
    late = store.create_conversation(source=next(iter(FrontDoor)), train_consent=True)
    store.append_turns(
        late.id, [NewTurn(role=Role.USER, content="Hi"), NewTurn(role=Role.ASSISTANT, content="Hey.")]
    )
    got = list(StoreSource(store).consented(created_after=NOW - 30 * 86400, created_until=NOW))
    store.close()
    assert [c.id for c in got] == [yes.id]
    assert [m.content for m in got[0].messages] == ["Hi", "Hello."]
    with pytest.raises(TypeError):
        StoreSource(object())
