"""The engine's pure parts: UTF-8 assembly, stop strings, the prefix cache, fair queuing, context fitting."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.engine.chat_template import ChatTemplate, TemplateRaised
from agent.engine.context_window import fit_messages
from agent.engine.fair_queue import FairQueue, QueueClosed, QueueFull
from agent.engine.prefix_cache import PrefixCache, common_prefix_len
from agent.engine.text import StopMatcher, Utf8Assembler
from agent.errors import ContextOverflow, EngineError, ModelError
from agent.generation import ChatMessage, Role


def _chunks(data: bytes | str, cuts: list[int]) -> list[bytes] | list[str]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]  # type: ignore[return-value]


@given(st.text(), st.lists(st.integers(min_value=0, max_value=10_000)))
def test_utf8_assembler_emits_whole_characters_only(text: str, cuts: list[int]) -> None:
    asm = Utf8Assembler()
    out = []
    for piece in _chunks(text.encode("utf-8"), cuts):
        got = asm.push(piece)  # type: ignore[arg-type]
        got.encode("utf-8")  # never a lone surrogate or partial character
        out.append(got)
    out.append(asm.flush())
    assert "".join(out) == text


def test_utf8_assembler_replaces_invalid_bytes() -> None:
    asm = Utf8Assembler()
    assert asm.push(b"a\xe6\x97") == "a"
    assert asm.push(b"\xa5") == "日"
    assert asm.push(b"\xff") == "\ufffd"
    assert asm.push(b"\xe6") == ""
    assert asm.flush() == "\ufffd"


@given(
    st.text(alphabet="abc<>/", max_size=40),
    st.lists(st.text(alphabet="abc<>/", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(min_value=0, max_value=100)),
)
def test_stop_matcher_emits_exactly_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    matcher = StopMatcher(stops)
    emitted = []
    hit = False
    for chunk in _chunks(text, cuts):
        safe, hit = matcher.push(chunk)  # type: ignore[arg-type]
        emitted.append(safe)
        # never emits anything a stop string could still start in
        so_far = "".join(emitted)
        assert not any(stop in so_far for stop in stops)
        if hit:
            break
    if not hit:
        emitted.append(matcher.flush())
    # The oracle: generation stops at the end of the first chunk in which any stop string is
    # complete, and the reply is cut where the earliest complete stop string starts.
    seen, expected, stopped = "", text, False
    for chunk in _chunks(text, cuts):
        seen += chunk
        starts = [seen.find(s) for s in stops if s in seen]
        if starts:
            expected, stopped = seen[: min(starts)], True
            break
    assert "".join(emitted) == expected
    assert hit == stopped


def test_stop_matcher_holds_back_a_partial_stop() -> None:
    m = StopMatcher(["</end>"])
    assert m.push("Hello </e") == ("Hello ", False)
    assert m.pending == "</e"
    assert m.push("x") == ("</ex", False)
    assert m.push(" bye </end> more") == (" bye ", True)


@given(st.lists(st.integers(0, 3), max_size=30), st.lists(st.integers(0, 3), max_size=30))
def test_common_prefix_len(a: list[int], b: list[int]) -> None:
    n = common_prefix_len(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


def test_prefix_cache_longest_match_and_lru_eviction() -> None:
    cache: PrefixCache[str] = PrefixCache(capacity_bytes=100)
    assert cache.put([1, 2, 3], "a", nbytes=40)
    assert cache.put([1, 2, 9, 9], "b", nbytes=40)
    match = cache.best_match([1, 2, 3, 4])
    assert match is not None and match[0].payload == "a" and match[1] == 3
    # "a" was just used, so "b" is the least recently used and goes first
    assert cache.put([7], "c", nbytes=40)
    assert [7] in cache and [1, 2, 3] in cache and [1, 2, 9, 9] not in cache
    assert cache.size_bytes == 80
    assert not cache.put([8], "too big", nbytes=101)
    assert cache.put([7, 1, 2], "c2", nbytes=10)  # extends [7]: replaces it
    assert [7] not in cache and len(cache) == 2 and cache.size_bytes == 50
    assert cache.best_match([5]) is None
    cache.clear()
    assert len(cache) == 0 and cache.size_bytes == 0


@given(st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=6), st.integers(1, 50))))
def test_prefix_cache_never_exceeds_capacity(puts: list[tuple[list[int], int]]) -> None:
    cache: PrefixCache[int] = PrefixCache(capacity_bytes=100)
    for tokens, size in puts:
        cache.put(tokens, size, nbytes=size)
        assert cache.size_bytes <= 100
        assert cache.size_bytes == sum(e.nbytes for e in cache._entries.values())


def test_fair_queue_round_robin_over_keys() -> None:
    q: FairQueue[str] = FairQueue(max_items=10)
    for i in range(3):
        q.put("a", f"a{i}")
    q.put("b", "b0")
    q.put("c", "c0")
    q.put_priority("ctl")
    order = [q.get(timeout=0) for _ in range(6)]
    assert order == ["ctl", "a0", "b0", "c0", "a1", "a2"]
    assert q.get(timeout=0) is None


@given(st.lists(st.sampled_from("abcd"), max_size=40))
def test_fair_queue_serves_waiting_keys_in_rounds(keys: list[str]) -> None:
    q: FairQueue[tuple[str, int]] = FairQueue(max_items=64)
    counts: dict[str, int] = {}
    for key in keys:
        q.put(key, (key, counts.get(key, 0)))
        counts[key] = counts.get(key, 0) + 1
    served = [q.get(timeout=0) for _ in keys]
    order = list(dict.fromkeys(keys))  # keys by first arrival
    rounds = max(counts.values(), default=0)
    assert served == [(k, r) for r in range(rounds) for k in order if counts[k] > r]


def test_fair_queue_newcomer_goes_before_the_key_just_served() -> None:
    q: FairQueue[str] = FairQueue(max_items=10)
    q.put("a", "a0")
    q.put("a", "a1")
    assert q.get() == "a0"  # a0 is now being served
    q.put("b", "b0")  # b arrives while a still has a1 waiting
    assert [q.get(), q.get()] == ["b0", "a1"]


def test_fair_queue_bounded_remove_and_close() -> None:
    q: FairQueue[str] = FairQueue(max_items=2)
    q.put("a", "x")
    q.put("b", "y")
    with pytest.raises(QueueFull):
        q.put("c", "z")
    assert q.remove("x") and not q.remove("x")
    q.put("c", "z")
    assert len(q) == 2
    assert q.close() == ["y", "z"]
    with pytest.raises(QueueClosed):
        q.put("a", "w")
    with pytest.raises(QueueClosed):
        q.get()


def test_fair_queue_get_blocks_until_put() -> None:
    q: FairQueue[int] = FairQueue(max_items=1)
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    q.put("k", 7)
    t.join(10)
    assert got == [7]


def _msg(role: Role, n: int) -> ChatMessage:
    return ChatMessage(role=role, content="x" * n)


def _count(msgs: Sequence[ChatMessage]) -> int:
    return sum(len(m.content) + 2 for m in msgs)


def test_fit_messages_drops_oldest_turns_and_keeps_the_system_prompt() -> None:
    msgs = [
        _msg(Role.SYSTEM, 8),
        _msg(Role.USER, 20),
        _msg(Role.ASSISTANT, 20),
        _msg(Role.USER, 20),
        _msg(Role.ASSISTANT, 20),
        _msg(Role.USER, 10),
    ]
    kept, n = fit_messages(msgs, _count, n_ctx=100, max_tokens=20)
    assert kept == [msgs[0], msgs[3], msgs[4], msgs[5]]
    assert n == _count(kept) and n + 20 <= 100
    assert fit_messages(msgs, _count, n_ctx=1000, max_tokens=20)[0] == msgs


def test_fit_messages_keeps_the_last_message_with_less_room_then_overflows() -> None:
    msgs = [_msg(Role.SYSTEM, 8), _msg(Role.USER, 50), _msg(Role.ASSISTANT, 50), _msg(Role.USER, 40)]
    kept, _ = fit_messages(msgs, _count, n_ctx=60, max_tokens=30)
    assert kept == [msgs[0], msgs[3]]  # 52 tokens: less than max_tokens left, still accepted
    with pytest.raises(ContextOverflow):
        fit_messages(msgs, _count, n_ctx=52, max_tokens=30)


@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.integers(1, 200), st.integers(1, 50))
def test_fit_messages_properties(sizes: list[int], n_ctx: int, max_tokens: int) -> None:
    roles = [Role.USER if i % 2 == 0 else Role.ASSISTANT for i in range(len(sizes))]
    msgs = [_msg(Role.SYSTEM, 5), *(_msg(r, n) for r, n in zip(roles, sizes, strict=True))]
    if len(msgs) % 2 == 1:
        msgs.append(_msg(Role.USER, 3))
    try:
        kept, n = fit_messages(msgs, _count, n_ctx=n_ctx, max_tokens=max_tokens)
    except ContextOverflow:
        assert _count([msgs[0], msgs[-1]]) >= n_ctx
        return
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert kept[1].role is Role.USER or len(kept) == 2
    assert n < n_ctx
    assert n + max_tokens <= n_ctx or len(kept) == 2
    tail = msgs[len(msgs) - len(kept) + 1 :]
    assert kept[1:] == tail  # a suffix of the history


def test_chat_template_renders_with_bos_and_generation_prompt() -> None:
    tpl = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m.content | trim }}{{ eos_token }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        bos_token="<s>",
        eos_token="</s>",
    )
    msgs = [ChatMessage(role=Role.SYSTEM, content="sys"), ChatMessage(role=Role.USER, content=" hi ")]
    assert tpl.render(msgs) == "<s>[system]sys</s>[user]hi</s>[assistant]"
    assert tpl.render(msgs, add_generation_prompt=False) == "<s>[system]sys</s>[user]hi</s>"


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}",
            TemplateRaised,
        ),
        ("{{ messages.append(1) }}", EngineError),  # the sandbox is immutable
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", EngineError),
    ],
)
def test_chat_template_errors(source: str, error: type[Exception]) -> None:
    tpl = ChatTemplate(source, bos_token="", eos_token="")
    with pytest.raises(error):
        tpl.render([ChatMessage(role=Role.SYSTEM, content="x")])


def test_chat_template_that_does_not_compile_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="does not compile"):
        ChatTemplate("{% for %}", bos_token="", eos_token="")
