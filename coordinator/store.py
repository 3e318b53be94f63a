"""The coordinator's durable state in SQLite: devices, enrollment tokens, rounds, updates, releases.

One file (``<state_dir>/coordinator.sqlite3``, mode 0600, WAL journal) whose schema version is
SQLite's ``user_version``; :data:`MIGRATIONS` upgrades older files in place. Every write runs in an
explicit transaction (``BEGIN IMMEDIATE``); :meth:`Store.transaction` groups several writes into one.
Rounds left ``OPEN`` or ``AGGREGATING`` by a stopped coordinator are found by :meth:`Store.unfinished_rounds`
and resumed. ``sqlite3`` errors never leave this module: they become :class:`StoreError` (or its
subclasses :class:`NotFound` and :class:`Conflict`).

Timestamps are Unix seconds (float) from the caller's clock; nothing here reads the time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from coordinator.errors import Conflict, EnrollmentError, NotFound, StoreError

SCHEMA_VERSION = 1

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the first schema.
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        signing_pk BLOB NOT NULL,
        encryption_pk BLOB NOT NULL,
        enrolled_at REAL NOT NULL,
        last_seen REAL,
        status TEXT NOT NULL,
        adapter_version INTEGER
    );
    CREATE TABLE enrollment_tokens (
        token_id TEXT PRIMARY KEY,
        device_name TEXT NOT NULL,
        secret_box BLOB NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        device_id TEXT
    );
    CREATE TABLE rounds (
        id INTEGER PRIMARY KEY,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        deadline REAL NOT NULL,
        closed_at REAL,
        failure TEXT
    );
    CREATE INDEX rounds_state ON rounds(state);
    CREATE TABLE updates (
        round_id INTEGER NOT NULL REFERENCES rounds(id),
        device_id TEXT NOT NULL REFERENCES devices(id),
        nonce BLOB NOT NULL UNIQUE,
        header TEXT NOT NULL,
        blob BLOB NOT NULL,
        received_at REAL NOT NULL,
        UNIQUE (round_id, device_id)
    );
    CREATE TABLE refusals (
        id INTEGER PRIMARY KEY,
        round_id INTEGER,
        device_id TEXT,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX refusals_round ON refusals(round_id);
    CREATE TABLE releases (
        version INTEGER PRIMARY KEY,
        round_id INTEGER NOT NULL UNIQUE REFERENCES rounds(id),
        payload BLOB NOT NULL,
        signature BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE server_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        release_version INTEGER NOT NULL,
        blob BLOB NOT NULL
    );
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class RoundState(str, Enum):
    """OPEN -> AGGREGATING -> RELEASED, or -> FAILED from OPEN/AGGREGATING."""

    OPEN = "open"
    AGGREGATING = "aggregating"
    RELEASED = "released"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RoundState.RELEASED, RoundState.FAILED)


class DeviceStatus(str, Enum):
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    """Derived from the device's signing key (``fleet.keys.derive_id``); used in its topics."""
    name: str
    """The human name its enrollment token was made for."""
    signing_pk: bytes
    encryption_pk: bytes
    enrolled_at: float
    last_seen: float | None
    status: DeviceStatus
    adapter_version: int | None = None


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    device_name: str
    secret_box: bytes
    created_at: float
    expires_at: float
    used_at: float | None
    device_id: str | None


@dataclass(frozen=True)
class RoundRecord:
    id: int
    spec: str
    """The signed round announcement's JSON header, as published."""
    state: RoundState
    created_at: float
    deadline: float
    closed_at: float | None
    failure: str | None


@dataclass(frozen=True)
class UpdateRecord:
    round_id: int
    device_id: str
    nonce: bytes
    header: str
    blob: bytes
    """The sealed update exactly as received (re-opened after a restart)."""
    received_at: float


@dataclass(frozen=True)
class RefusalRecord:
    round_id: int | None
    device_id: str | None
    reason: str
    detail: str
    at: float


@dataclass(frozen=True)
class ReleaseRecord:
    version: int
    round_id: int
    payload: bytes
    """The signed release frame, exactly as published."""
    signature: bytes
    created_at: float


def _create_private_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


class Store:
    """The coordinator's SQLite store. Use from one thread (the service's event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._depth = 0
        try:
            _create_private_file(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot prepare the store {self.path}: {exc}") from exc

    # -- plumbing -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path} has schema version {version}; this coordinator knows {SCHEMA_VERSION}"
            )
        for target in range(version, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {target + 1}")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One explicit transaction; nested calls join the outermost. sqlite errors become StoreError."""
        outer = self._depth == 0
        try:
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            if outer:
                self._db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            if outer:
                self._db.execute("ROLLBACK")
            raise Conflict(str(exc)) from exc
        except sqlite3.Error as exc:
            if outer and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"store {self.path}: {exc}") from exc
        except BaseException:
            if outer and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        try:
            return list(self._db.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc

    # -- devices --------------------------------------------------------------------------------

    def add_device(
        self, device_id: str, *, name: str, signing_pk: bytes, encryption_pk: bytes, now: float
    ) -> DeviceRecord:
        """Record an enrolled device; EnrollmentError if the id or the name is taken."""
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO devices (id, name, signing_pk, encryption_pk, enrolled_at, last_seen, "
                    "status) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (device_id, name, signing_pk, encryption_pk, now, now, DeviceStatus.ACTIVE.value),
                )
        except Conflict as exc:
            raise EnrollmentError(f"device {device_id!r} or name {name!r} is already enrolled") from exc
        return self.device(device_id)

    def find_device(self, device_id: str) -> DeviceRecord | None:
        rows = self._query(
            "SELECT id, name, signing_pk, encryption_pk, enrolled_at, last_seen, status, adapter_version "
            "FROM devices WHERE id = ?",
            (device_id,),
        )
        return _device(rows[0]) if rows else None

    def find_device_by_name(self, name: str) -> DeviceRecord | None:
        rows = self._query(
            "SELECT id, name, signing_pk, encryption_pk, enrolled_at, last_seen, status, adapter_version "
            "FROM devices WHERE name = ?",
            (name,),
        )
        return _device(rows[0]) if rows else None

    def device(self, device_id: str) -> DeviceRecord:
        found = self.find_device(device_id)
        if found is None:
            raise NotFound(f"no device {device_id!r}")
        return found

    def devices(self) -> list[DeviceRecord]:
        rows = self._query(
            "SELECT id, name, signing_pk, encryption_pk, enrolled_at, last_seen, status, adapter_version "
            "FROM devices ORDER BY name"
        )
        return [_device(row) for row in rows]

    def set_device_status(self, name: str, status: DeviceStatus) -> DeviceRecord:
        """Set the status of the device called ``name`` (e.g. revoke it); NotFound if none."""
        with self.transaction() as db:
            cur = db.execute("UPDATE devices SET status = ? WHERE name = ?", (status.value, name))
            if cur.rowcount == 0:
                raise NotFound(f"no device named {name!r}")
        found = self.find_device_by_name(name)
        assert found is not None
        return found

    def touch_device(self, device_id: str, *, now: float, adapter_version: int | None = None) -> None:
        """Record that the device was heard from (and the adapter version it reports, if any)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?), "
                "adapter_version = COALESCE(?, adapter_version) WHERE id = ?",
                (now, adapter_version, device_id),
            )

    # -- enrollment tokens ----------------------------------------------------------------------

    def add_token(
        self, token_id: str, *, device_name: str, secret_box: bytes, now: float, ttl_s: float
    ) -> None:
        """Record a one-time token for ``device_name``. ``secret_box`` is its secret, sealed by the caller
        (the HMAC proof needs the secret; the store never holds it in clear)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM devices WHERE name = ?", (device_name,)).fetchone():
                raise EnrollmentError(f"a device named {device_name!r} is already enrolled")
            db.execute(
                "INSERT INTO enrollment_tokens (token_id, device_name, secret_box, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (token_id, device_name, secret_box, now, now + ttl_s),
            )

    def find_token(self, token_id: str) -> TokenRecord | None:
        rows = self._query(
            "SELECT token_id, device_name, secret_box, created_at, expires_at, used_at, device_id "
            "FROM enrollment_tokens WHERE token_id = ?",
            (token_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return TokenRecord(
            token_id=str(r[0]),
            device_name=str(r[1]),
            secret_box=bytes(r[2]),
            created_at=float(r[3]),
            expires_at=float(r[4]),
            used_at=None if r[5] is None else float(r[5]),
            device_id=None if r[6] is None else str(r[6]),
        )

    def use_token(self, token_id: str, *, device_id: str, now: float) -> None:
        """Mark a token used by ``device_id``; Conflict if it was used meanwhile. Call inside the
        transaction that enrolls the device, so that both happen or neither."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE enrollment_tokens SET used_at = ?, device_id = ? "
                "WHERE token_id = ? AND used_at IS NULL",
                (now, device_id, token_id),
            )
            if cur.rowcount == 0:
                raise Conflict(f"enrollment token {token_id} is unknown or already used")

    # -- rounds ---------------------------------------------------------------------------------

    def create_round(
        self, spec_for: Callable[[int], str], *, created_at: float, deadline: float
    ) -> RoundRecord:
        """Insert a new OPEN round; ``spec_for(round_id)`` builds its spec once the id is known."""
        with self.transaction() as db:
            (last,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM rounds").fetchone()
            round_id = int(last) + 1
            db.execute(
                "INSERT INTO rounds (id, spec, state, created_at, deadline) VALUES (?, ?, ?, ?, ?)",
                (round_id, spec_for(round_id), RoundState.OPEN.value, created_at, deadline),
            )
        return self.round(round_id)

    def find_round(self, round_id: int) -> RoundRecord | None:
        rows = self._query(
            "SELECT id, spec, state, created_at, deadline, closed_at, failure FROM rounds WHERE id = ?",
            (round_id,),
        )
        return _round(rows[0]) if rows else None

    def round(self, round_id: int) -> RoundRecord:
        found = self.find_round(round_id)
        if found is None:
            raise NotFound(f"no round {round_id}")
        return found

    def latest_round(self) -> RoundRecord | None:
        rows = self._query(
            "SELECT id, spec, state, created_at, deadline, closed_at, failure "
            "FROM rounds ORDER BY id DESC LIMIT 1"
        )
        return _round(rows[0]) if rows else None

    def rounds(self, *, limit: int = 100) -> list[RoundRecord]:
        rows = self._query(
            "SELECT id, spec, state, created_at, deadline, closed_at, failure "
            "FROM rounds ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [_round(row) for row in rows]

    def unfinished_rounds(self) -> list[RoundRecord]:
        """Rounds a stopped coordinator left OPEN or AGGREGATING, oldest first."""
        rows = self._query(
            "SELECT id, spec, state, created_at, deadline, closed_at, failure "
            "FROM rounds WHERE state IN (?, ?) ORDER BY id",
            (RoundState.OPEN.value, RoundState.AGGREGATING.value),
        )
        return [_round(row) for row in rows]

    def transition_round(
        self,
        round_id: int,
        *,
        source: RoundState,
        target: RoundState,
        now: float | None = None,
        failure: str | None = None,
    ) -> None:
        """Move a round from ``source`` to ``target``; NotFound/Conflict if it is not in ``source``.

        ``now`` is recorded as the closing time when the round leaves OPEN.
        """
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE rounds SET state = ?, closed_at = COALESCE(closed_at, ?), failure = ? "
                "WHERE id = ? AND state = ?",
                (target.value, now, failure, round_id, source.value),
            )
            if cur.rowcount == 0:
                current = self.round(round_id)
                raise Conflict(f"round {round_id} is {current.state.value}, not {source.value}")

    # -- updates --------------------------------------------------------------------------------

    def add_update(
        self, round_id: int, device_id: str, *, nonce: bytes, header: str, blob: bytes, received_at: float
    ) -> None:
        """Record an accepted update; Conflict if the device already sent one this round or reused a nonce."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO updates (round_id, device_id, nonce, header, blob, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (round_id, device_id, nonce, header, blob, received_at),
            )

    def updates(self, round_id: int) -> list[UpdateRecord]:
        rows = self._query(
            "SELECT round_id, device_id, nonce, header, blob, received_at FROM updates "
            "WHERE round_id = ? ORDER BY received_at, device_id",
            (round_id,),
        )
        return [_update(r) for r in rows]

    def find_update(self, round_id: int, device_id: str) -> UpdateRecord | None:
        rows = self._query(
            "SELECT round_id, device_id, nonce, header, blob, received_at FROM updates "
            "WHERE round_id = ? AND device_id = ?",
            (round_id, device_id),
        )
        return _update(rows[0]) if rows else None

    def update_count(self, round_id: int) -> int:
        return int(self._query("SELECT COUNT(*) FROM updates WHERE round_id = ?", (round_id,))[0][0])

    def has_update(self, round_id: int, device_id: str) -> bool:
        rows = self._query(
            "SELECT 1 FROM updates WHERE round_id = ? AND device_id = ?", (round_id, device_id)
        )
        return bool(rows)

    def nonce_seen(self, nonce: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM updates WHERE nonce = ?", (nonce,)))

    # -- refusals -------------------------------------------------------------------------------

    def add_refusal(
        self, *, round_id: int | None, device_id: str | None, reason: str, detail: str, at: float
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO refusals (round_id, device_id, reason, detail, at) VALUES (?, ?, ?, ?, ?)",
                (round_id, device_id, reason, detail[:500], at),
            )

    def refusals(self, round_id: int) -> list[RefusalRecord]:
        rows = self._query(
            "SELECT round_id, device_id, reason, detail, at FROM refusals WHERE round_id = ? ORDER BY id",
            (round_id,),
        )
        return [
            RefusalRecord(
                round_id=None if r[0] is None else int(r[0]),
                device_id=None if r[1] is None else str(r[1]),
                reason=str(r[2]),
                detail=str(r[3]),
                at=float(r[4]),
            )
            for r in rows
        ]

    # -- releases and the server optimizer's state ----------------------------------------------

    def next_release_version(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(version), 0) + 1 FROM releases")[0][0])

    def add_release(
        self, version: int, *, round_id: int, payload: bytes, signature: bytes, created_at: float
    ) -> ReleaseRecord:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO releases (version, round_id, payload, signature, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (version, round_id, payload, signature, created_at),
            )
        return ReleaseRecord(
            version=version, round_id=round_id, payload=payload, signature=signature, created_at=created_at
        )

    def latest_release(self) -> ReleaseRecord | None:
        rows = self._query(
            "SELECT version, round_id, payload, signature, created_at "
            "FROM releases ORDER BY version DESC LIMIT 1"
        )
        return _release(rows[0]) if rows else None

    def release_for_round(self, round_id: int) -> ReleaseRecord | None:
        rows = self._query(
            "SELECT version, round_id, payload, signature, created_at FROM releases WHERE round_id = ?",
            (round_id,),
        )
        return _release(rows[0]) if rows else None

    def save_server_state(self, blob: bytes, *, release_version: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO server_state (id, release_version, blob) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET "
                "release_version = excluded.release_version, blob = excluded.blob",
                (release_version, blob),
            )

    def load_server_state(self) -> tuple[int, bytes] | None:
        rows = self._query("SELECT release_version, blob FROM server_state WHERE id = 1")
        if not rows:
            return None
        version, blob = rows[0]
        return int(version), bytes(blob)


def _device(row: Any) -> DeviceRecord:
    return DeviceRecord(
        id=str(row[0]),
        name=str(row[1]),
        signing_pk=bytes(row[2]),
        encryption_pk=bytes(row[3]),
        enrolled_at=float(row[4]),
        last_seen=None if row[5] is None else float(row[5]),
        status=DeviceStatus(row[6]),
        adapter_version=None if row[7] is None else int(row[7]),
    )


def _update(row: Any) -> UpdateRecord:
    return UpdateRecord(
        round_id=int(row[0]),
        device_id=str(row[1]),
        nonce=bytes(row[2]),
        header=str(row[3]),
        blob=bytes(row[4]),
        received_at=float(row[5]),
    )


def _round(row: Any) -> RoundRecord:
    return RoundRecord(
        id=int(row[0]),
        spec=str(row[1]),
        state=RoundState(row[2]),
        created_at=float(row[3]),
        deadline=float(row[4]),
        closed_at=None if row[5] is None else float(row[5]),
        failure=None if row[6] is None else str(row[6]),
    )


def _release(row: Any) -> ReleaseRecord:
    return ReleaseRecord(
        version=int(row[0]),
        round_id=int(row[1]),
        payload=bytes(row[2]),
        signature=bytes(row[3]),
        created_at=float(row[4]),
    )
