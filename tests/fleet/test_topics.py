from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.errors import TopicError
from fleet.topics import DEFAULT_LAYOUT, Topic, TopicKind, TopicLayout, validate_device_id

device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(TopicKind), device_id=device_ids)
def test_build_then_parse_gives_the_same_topic(kind: TopicKind, device_id: str) -> None:
    did = device_id if kind.per_device else None
    topic = DEFAULT_LAYOUT.build(kind, did)
    assert topic.startswith("ppchat/v1/")
    assert DEFAULT_LAYOUT.parse(topic) == Topic(kind, did)


def test_layout_is_as_documented() -> None:
    assert DEFAULT_LAYOUT.build(TopicKind.ROUNDS) == "ppchat/v1/rounds"
    assert DEFAULT_LAYOUT.build(TopicKind.RELEASES) == "ppchat/v1/releases"
    assert DEFAULT_LAYOUT.build(TopicKind.UPDATE, "dev-1") == "ppchat/v1/devices/dev-1/update"
    assert DEFAULT_LAYOUT.build(TopicKind.STATUS, "dev-1") == "ppchat/v1/devices/dev-1/status"
    assert DEFAULT_LAYOUT.filter(TopicKind.UPDATE) == "ppchat/v1/devices/+/update"
    assert DEFAULT_LAYOUT.filter(TopicKind.ROUNDS) == "ppchat/v1/rounds"
    assert TopicLayout(root="lab").build(TopicKind.ENROLL, "d") == "lab/v1/devices/d/enroll"


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "#", "+", "a#", "x" * 65, ".a", "-a", "_a", "é", "a b", "a\x00", "a\n"]
)
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_device_id(bad)
    with pytest.raises(TopicError):
        DEFAULT_LAYOUT.build(TopicKind.UPDATE, bad)


@pytest.mark.parametrize(
    "topic",
    [
        "ppchat/v2/rounds",
        "ppchat/v1/round",
        "ppchat/v1/rounds/extra",
        "ppchat/v1/devices/dev-1",
        "ppchat/v1/devices/dev-1/unknown",
        "ppchat/v1/devices/+/update",
        "ppchat/v1/devices/dev-1/rounds",
        "ppchat/v1/devices//update",
        "ppchat/v1/update",
        "other/v1/rounds",
        "ppchat/v1/devices/" + "x" * 600 + "/update",
    ],
)
def test_foreign_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(TopicError):
        DEFAULT_LAYOUT.parse(topic)


def test_kinds_insist_on_their_device_level() -> None:
    with pytest.raises(TopicError):
        DEFAULT_LAYOUT.build(TopicKind.UPDATE)
    with pytest.raises(TopicError):
        DEFAULT_LAYOUT.build(TopicKind.ROUNDS, "dev-1")
    with pytest.raises(TopicError):
        TopicLayout(root="a/b")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=120))
def test_parse_of_any_text_raises_only_topic_errors(text: str) -> None:
    with contextlib.suppress(TopicError):
        DEFAULT_LAYOUT.parse(text)
