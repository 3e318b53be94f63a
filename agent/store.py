"""The on-device conversation store: SQLite in the agent's state directory, never leaves the device.

Two tables (schema versioned with SQLite's ``user_version``, migrated forward on open)::

    conversations  id, created, updated, title, train_consent, source (the front door)
    turns          id, conversation_id, role, content, created, tokens

The file and its ``-wal``/``-shm`` companions are created mode 0600 (SQLite gives the companions the
database file's mode). Deleted rows are overwritten (``secure_delete``) and the WAL is truncated after
a retention purge, so purged text does not linger on the card.

:class:`SqliteStore` is the synchronous store, confined to one thread; the trainer (its own process)
uses it directly. :class:`ConversationStore` is the daemon's asyncio face: every call runs on one
dedicated thread, so blocking SQLite never touches the event loop. sqlite3 and OS errors become
:class:`agent.errors.StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import StoreError
from agent.frontdoor import FrontDoor
from agent.generation import Role

FILE_MODE = 0o600
DIR_MODE = 0o700
SCHEMA_VERSION = 1
SECONDS_PER_DAY = 86400.0

# _MIGRATIONS[i] takes the schema from version i to version i + 1. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            title TEXT,
            train_consent INTEGER NOT NULL CHECK (train_consent IN (0, 1)),
            source TEXT NOT NULL
        )""",
        """CREATE TABLE turns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created REAL NOT NULL,
            tokens INTEGER
        )""",
        "CREATE INDEX turns_by_conversation ON turns (conversation_id, id)",
        "CREATE INDEX turns_by_created ON turns (created)",
        "CREATE INDEX conversations_by_consent ON conversations (train_consent, updated)",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

Clock = Callable[[], float]
T = TypeVar("T")


@dataclass(frozen=True)
class Conversation:
    id: str
    created: float
    updated: float
    title: str | None
    train_consent: bool
    source: FrontDoor


@dataclass(frozen=True)
class NewTurn:
    role: Role
    content: str
    tokens: int | None = None


@dataclass(frozen=True)
class Turn:
    id: int
    conversation_id: str
    role: Role
    content: str
    created: float
    tokens: int | None


@dataclass(frozen=True)
class PurgeResult:
    turns: int
    conversations: int


def new_conversation_id() -> str:
    return uuid.uuid4().hex


def _prepare_file(path: Path) -> None:
    """Create the database file 0600 (its directory 0700 when new) and tighten existing modes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    os.close(fd)
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(p).st_mode & 0o777 != FILE_MODE:
                os.chmod(p, FILE_MODE)


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        created=row["created"],
        updated=row["updated"],
        title=row["title"],
        train_consent=bool(row["train_consent"]),
        source=FrontDoor(row["source"]),
    )


def _turn(row: sqlite3.Row) -> Turn:
    return Turn(
        id=row["id"],
        conversation_id=row["conversation_id"],
        role=Role(row["role"]),
        content=row["content"],
        created=row["created"],
        tokens=row["tokens"],
    )


class SqliteStore:
    """The synchronous store. Use it from one thread at a time (the daemon: its store thread)."""

    def __init__(
        self,
        path: Path,
        *,
        train_consent_default: bool = False,
        max_turns_per_conversation: int = 10000,
        clock: Clock = time.time,
    ) -> None:
        self.path = Path(path)
        self.train_consent_default = train_consent_default
        self.max_turns_per_conversation = max_turns_per_conversation
        self._clock = clock
        try:
            _prepare_file(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the conversation store {self.path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        try:
            self._setup()
        except StoreError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open the conversation store {self.path}: {exc}") from None

    def _setup(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA secure_delete=ON")
        self._migrate()
        # The companions exist now; make sure an older file's companions are 0600 as well.
        _prepare_file(self.path)

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this agent's ({SCHEMA_VERSION})"
            )
        while version < SCHEMA_VERSION:
            with self._transaction():
                for statement in _MIGRATIONS[version]:
                    self._db.execute(statement)
                version += 1
                self._db.execute(f"PRAGMA user_version={version}")

    @property
    def schema_version(self) -> int:
        return int(self._call(lambda: self._db.execute("PRAGMA user_version").fetchone()[0]))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            raise StoreError(f"conversation store {self.path}: {exc}") from None

    # ---- conversations --------------------------------------------------------------------------

    def create_conversation(
        self,
        *,
        source: FrontDoor,
        conversation_id: str | None = None,
        train_consent: bool | None = None,
        title: str | None = None,
    ) -> Conversation:
        now = self._clock()
        conv = Conversation(
            id=conversation_id or new_conversation_id(),
            created=now,
            updated=now,
            title=title,
            train_consent=self.train_consent_default if train_consent is None else train_consent,
            source=source,
        )

        def insert() -> None:
            self._db.execute(
                "INSERT INTO conversations (id, created, updated, title, train_consent, source)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (conv.id, conv.created, conv.updated, conv.title, int(conv.train_consent), conv.source.value),
            )

        self._call(insert)
        return conv

    def get_conversation(self, conversation_id: str) -> Conversation | None:
        row = self._call(
            lambda: self._db.execute(
                "SELECT * FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
        )
        return None if row is None else _conversation(row)

    def set_train_consent(self, conversation_id: str, consent: bool) -> bool:
        """Set a conversation's training flag; False when there is no such conversation."""
        cur = self._call(
            lambda: self._db.execute(
                "UPDATE conversations SET train_consent = ? WHERE id = ?", (int(consent), conversation_id)
            )
        )
        return cur.rowcount > 0

    def delete_conversation(self, conversation_id: str) -> bool:
        """Delete a conversation and its turns (also from the WAL)."""

        def delete() -> bool:
            cur = self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if cur.rowcount:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return cur.rowcount > 0

        return self._call(delete)

    def count_conversations(self) -> int:
        return int(self._call(lambda: self._db.execute("SELECT count(*) FROM conversations").fetchone()[0]))

    def count_turns(self) -> int:
        return int(self._call(lambda: self._db.execute("SELECT count(*) FROM turns").fetchone()[0]))

    # ---- turns ----------------------------------------------------------------------------------

    def append_turns(self, conversation_id: str, turns: Sequence[NewTurn]) -> list[Turn]:
        """Add turns to a conversation in one transaction; the oldest beyond the per-conversation
        limit are deleted. Raises StoreError when the conversation does not exist."""
        now = self._clock()

        def append() -> list[Turn]:
            with self._transaction():
                cur = self._db.execute(
                    "UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id)
                )
                if cur.rowcount == 0:
                    raise StoreError(f"no conversation {conversation_id!r} in the store")
                out = []
                for turn in turns:
                    cur = self._db.execute(
                        "INSERT INTO turns (conversation_id, role, content, created, tokens)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (conversation_id, turn.role.value, turn.content, now, turn.tokens),
                    )
                    assert cur.lastrowid is not None
                    out.append(
                        Turn(cur.lastrowid, conversation_id, turn.role, turn.content, now, turn.tokens)
                    )
                self._db.execute(
                    "DELETE FROM turns WHERE conversation_id = ? AND id NOT IN"
                    " (SELECT id FROM turns WHERE conversation_id = ? ORDER BY id DESC LIMIT ?)",
                    (conversation_id, conversation_id, self.max_turns_per_conversation),
                )
                return out

        return self._call(append)

    def turns(
        self, conversation_id: str, *, from_id: int | None = None, limit: int | None = None
    ) -> list[Turn]:
        """A conversation's turns, oldest first: those with ``id >= from_id``, at most the newest
        ``limit`` of them."""

        def select() -> list[sqlite3.Row]:
            rows = self._db.execute(
                "SELECT * FROM turns WHERE conversation_id = ? AND id >= ? ORDER BY id DESC LIMIT ?",
                (conversation_id, from_id or 0, -1 if limit is None else limit),
            ).fetchall()
            rows.reverse()
            return rows

        return [_turn(r) for r in self._call(select)]

    # ---- retention and training -----------------------------------------------------------------

    def purge(self, *, retention_days: float) -> PurgeResult:
        """Delete turns older than ``retention_days`` and conversations left empty and idle as long,
        then checkpoint and truncate the WAL so the text is gone from disk too."""
        cutoff = self._clock() - retention_days * SECONDS_PER_DAY

        def delete() -> PurgeResult:
            with self._transaction():
                turns = self._db.execute("DELETE FROM turns WHERE created < ?", (cutoff,)).rowcount
                convs = self._db.execute(
                    "DELETE FROM conversations WHERE updated < ? AND NOT EXISTS"
                    " (SELECT 1 FROM turns WHERE turns.conversation_id = conversations.id)",
                    (cutoff,),
                ).rowcount
            if turns or convs:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return PurgeResult(turns=turns, conversations=convs)

        return self._call(delete)

    def iter_consented(
        self, *, updated_since: float | None = None
    ) -> Iterator[tuple[Conversation, list[Turn]]]:
        """For the trainer: each conversation whose owner allowed training, with its turns."""
        rows = self._call(
            lambda: self._db.execute(
                "SELECT * FROM conversations WHERE train_consent = 1 AND updated >= ? ORDER BY updated, id",
                (updated_since if updated_since is not None else float("-inf"),),
            ).fetchall()
        )
        for row in rows:
            conv = _conversation(row)
            turns = self.turns(conv.id)
            if turns:
                yield conv, turns

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


class ConversationStore:
    """The daemon's asyncio face of :class:`SqliteStore`: one dedicated thread runs every call."""

    def __init__(self, store: SqliteStore, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        train_consent_default: bool = False,
        max_turns_per_conversation: int = 10000,
        clock: Clock = time.time,
    ) -> ConversationStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppchat-store")
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(
                executor,
                functools.partial(
                    SqliteStore,
                    path,
                    train_consent_default=train_consent_default,
                    max_turns_per_conversation=max_turns_per_conversation,
                    clock=clock,
                ),
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(store, executor)

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def train_consent_default(self) -> bool:
        return self._store.train_consent_default

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def create_conversation(
        self,
        *,
        source: FrontDoor,
        conversation_id: str | None = None,
        train_consent: bool | None = None,
        title: str | None = None,
    ) -> Conversation:
        return await self._run(
            self._store.create_conversation,
            source=source,
            conversation_id=conversation_id,
            train_consent=train_consent,
            title=title,
        )

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        return await self._run(self._store.get_conversation, conversation_id)

    async def set_train_consent(self, conversation_id: str, consent: bool) -> bool:
        return await self._run(self._store.set_train_consent, conversation_id, consent)

    async def delete_conversation(self, conversation_id: str) -> bool:
        return await self._run(self._store.delete_conversation, conversation_id)

    async def count_conversations(self) -> int:
        return await self._run(self._store.count_conversations)

    async def append_turns(self, conversation_id: str, turns: Sequence[NewTurn]) -> list[Turn]:
        return await self._run(self._store.append_turns, conversation_id, list(turns))

    async def turns(
        self, conversation_id: str, *, from_id: int | None = None, limit: int | None = None
    ) -> list[Turn]:
        return await self._run(self._store.turns, conversation_id, from_id=from_id, limit=limit)

    async def purge(self, *, retention_days: float) -> PurgeResult:
        return await self._run(self._store.purge, retention_days=retention_days)

    async def close(self) -> None:
        try:
            await self._run(self._store.close)
        finally:
            self._executor.shutdown(wait=True)
