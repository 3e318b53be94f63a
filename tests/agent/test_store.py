"""The conversation store: schema, file modes, turns, retention, consent, errors."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.frontdoor import FrontDoor
from agent.generation import Role
from agent.store import (
    SCHEMA_VERSION,
    SECONDS_PER_DAY,
    ConversationStore,
    NewTurn,
    SqliteStore,
)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance_days(self, days: float) -> None:
        self.now += days * SECONDS_PER_DAY


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state" / "conv.sqlite3", clock=clock, max_turns_per_conversation=6)
    yield s
    s.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_store_files_are_private_and_wal(store: SqliteStore) -> None:
    conv = store.create_conversation(source=FrontDoor.SOCKET)
    store.append_turns(conv.id, [NewTurn(Role.USER, "hello")])
    files = [store.path, Path(f"{store.path}-wal"), Path(f"{store.path}-shm")]
    for f in files:
        assert f.exists(), f
        assert _mode(f) == 0o600, (f, oct(_mode(f)))
    assert _mode(store.path.parent) == 0o700
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_existing_loose_modes_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "conv.sqlite3"
    SqliteStore(path).close()
    os.chmod(path, 0o644)
    SqliteStore(path).close()
    assert _mode(path) == 0o600


def test_reopen_keeps_data_and_schema(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "conv.sqlite3"
    s = SqliteStore(path, clock=clock)
    conv = s.create_conversation(source=FrontDoor.MQTT, train_consent=True, title="t")
    s.append_turns(conv.id, [NewTurn(Role.USER, "hi", 3), NewTurn(Role.ASSISTANT, "hello!", 4)])
    s.close()
    s = SqliteStore(path, clock=clock)
    assert s.schema_version == SCHEMA_VERSION
    got = s.get_conversation(conv.id)
    assert got == conv.__class__(**{**conv.__dict__, "updated": clock.now})
    assert got is not None and got.source is FrontDoor.MQTT and got.train_consent
    assert [(t.role, t.content, t.tokens) for t in s.turns(conv.id)] == [
        (Role.USER, "hi", 3),
        (Role.ASSISTANT, "hello!", 4),
    ]
    s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "conv.sqlite3"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"\0" * 4096 + b"junk"])
def test_corrupt_file_is_a_store_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "conv.sqlite3"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="conversation store"):
        SqliteStore(path)


def test_unwritable_location_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError):
        SqliteStore(blocker / "conv.sqlite3")


def test_consent_default_and_override(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.sqlite3", train_consent_default=True)
    assert s.create_conversation(source=FrontDoor.SOCKET).train_consent is True
    c = s.create_conversation(source=FrontDoor.SOCKET, train_consent=False)
    assert c.train_consent is False
    assert s.set_train_consent(c.id, True)
    assert s.get_conversation(c.id).train_consent is True  # type: ignore[union-attr]
    assert not s.set_train_consent("nope", True)
    s.close()


def test_duplicate_conversation_id_is_a_store_error(store: SqliteStore) -> None:
    store.create_conversation(source=FrontDoor.SOCKET, conversation_id="abc")
    with pytest.raises(StoreError):
        store.create_conversation(source=FrontDoor.SOCKET, conversation_id="abc")


def test_append_to_missing_conversation_is_a_store_error(store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="no conversation"):
        store.append_turns("missing", [NewTurn(Role.USER, "x")])
    assert store.count_turns() == 0


def test_turn_window_and_limit(store: SqliteStore, clock: FakeClock) -> None:
    conv = store.create_conversation(source=FrontDoor.SOCKET)
    for i in range(4):
        clock.now += 1
        store.append_turns(conv.id, [NewTurn(Role.USER, f"q{i}"), NewTurn(Role.ASSISTANT, f"a{i}")])
    # max_turns_per_conversation=6: the two oldest turns are gone
    turns = store.turns(conv.id)
    assert [t.content for t in turns] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    assert [t.content for t in store.turns(conv.id, limit=2)] == ["q3", "a3"]
    assert [t.content for t in store.turns(conv.id, from_id=turns[4].id)] == ["q3", "a3"]
    assert store.get_conversation(conv.id).updated == clock.now  # type: ignore[union-attr]


def test_unicode_and_sql_metacharacters_round_trip(store: SqliteStore) -> None:
    conv = store.create_conversation(source=FrontDoor.SOCKET, conversation_id="x'; DROP TABLE turns; --")
    text = "héllo 🌍 \0 '\"; DROP TABLE conversations; --"
    store.append_turns(conv.id, [NewTurn(Role.USER, text)])
    assert store.turns(conv.id)[0].content == text


def test_retention_purge(store: SqliteStore, clock: FakeClock) -> None:
    old = store.create_conversation(source=FrontDoor.SOCKET)
    store.append_turns(old.id, [NewTurn(Role.USER, "old secret"), NewTurn(Role.ASSISTANT, "old reply")])
    mixed = store.create_conversation(source=FrontDoor.SOCKET)
    store.append_turns(mixed.id, [NewTurn(Role.USER, "old in mixed")])
    clock.advance_days(20)
    store.append_turns(mixed.id, [NewTurn(Role.USER, "new in mixed")])
    empty_new = store.create_conversation(source=FrontDoor.SOCKET)
    clock.advance_days(15)  # "old" turns are now 35 days old, "new" ones 15

    result = store.purge(retention_days=30)
    assert (result.turns, result.conversations) == (3, 1)
    assert store.get_conversation(old.id) is None
    assert [t.content for t in store.turns(mixed.id)] == ["new in mixed"]
    assert store.get_conversation(empty_new.id) is not None  # empty, but not idle for long enough
    # Purged text is gone from the file and the WAL, not just unlinked from the b-tree.
    raw = store.path.read_bytes() + Path(f"{store.path}-wal").read_bytes()
    assert b"old secret" not in raw
    assert store.purge(retention_days=30) == type(result)(turns=0, conversations=0)


def test_delete_conversation_cascades(store: SqliteStore) -> None:
    conv = store.create_conversation(source=FrontDoor.SOCKET)
    store.append_turns(conv.id, [NewTurn(Role.USER, "bye")])
    assert store.delete_conversation(conv.id)
    assert store.count_turns() == 0
    assert not store.delete_conversation(conv.id)


def test_iter_consented_yields_only_consented_with_turns(store: SqliteStore, clock: FakeClock) -> None:
    yes = store.create_conversation(source=FrontDoor.SOCKET, train_consent=True)
    no = store.create_conversation(source=FrontDoor.SOCKET, train_consent=False)
    store.create_conversation(source=FrontDoor.SOCKET, train_consent=True)  # no turns
    for conv in (yes, no):
        store.append_turns(conv.id, [NewTurn(Role.USER, "u"), NewTurn(Role.ASSISTANT, "a")])
    got = list(store.iter_consented())
    assert [c.id for c, _ in got] == [yes.id]
    assert [t.role for t in got[0][1]] == [Role.USER, Role.ASSISTANT]
    assert list(store.iter_consented(updated_since=clock.now + 1)) == []


async def test_async_store_runs_off_the_loop(tmp_path: Path) -> None:
    import threading

    store = await ConversationStore.open(tmp_path / "c.sqlite3", train_consent_default=True)
    try:
        conv = await store.create_conversation(source=FrontDoor.WYOMING)
        assert conv.train_consent
        await store.append_turns(conv.id, [NewTurn(Role.USER, "hi")])
        assert [t.content for t in await store.turns(conv.id)] == ["hi"]
        assert await store.count_conversations() == 1
        names: list[str] = []
        await store._run(lambda: names.append(threading.current_thread().name))
        assert names[0].startswith("ppchat-store") and names[0] != threading.current_thread().name
        with pytest.raises(StoreError):
            await store.append_turns("missing", [NewTurn(Role.USER, "x")])
        assert (await store.purge(retention_days=1)).turns == 0
    finally:
        await store.close()


async def test_async_open_failure_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "c.sqlite3").write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError):
        await ConversationStore.open(tmp_path / "c.sqlite3")
