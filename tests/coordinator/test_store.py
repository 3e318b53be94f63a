"""The coordinator's SQLite store: schema, permissions, transactions, uniqueness, resume."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.errors import Conflict, EnrollmentError, NotFound, StoreError
from coordinator.store import SCHEMA_VERSION, DeviceStatus, RoundState, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "coordinator.sqlite3")
    yield s
    s.close()


def _device(store: Store, name: str = "pi-1") -> None:
    store.add_device(f"dev-{name}", name=name, signing_pk=b"s" * 32, encryption_pk=b"e" * 32, now=1.0)


def test_file_private_wal_and_versioned(store: Store) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.schema_version == SCHEMA_VERSION
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_devices(store: Store) -> None:
    _device(store)
    with pytest.raises(EnrollmentError):
        _device(store)
    assert [d.name for d in store.devices()] == ["pi-1"]
    assert store.set_device_status("pi-1", DeviceStatus.REVOKED).status is DeviceStatus.REVOKED
    assert store.device("dev-pi-1").status is DeviceStatus.REVOKED
    store.touch_device("dev-pi-1", now=5.0, adapter_version=3)
    store.touch_device("dev-pi-1", now=4.0)
    record = store.device("dev-pi-1")
    assert record.last_seen == 5.0 and record.adapter_version == 3
    with pytest.raises(NotFound):
        store.device("nope")
    with pytest.raises(NotFound):
        store.set_device_status("nope", DeviceStatus.ACTIVE)


def test_tokens_are_one_time(store: Store) -> None:
    store.add_token("tok-1", device_name="pi-1", secret_box=b"sealed", now=0.0, ttl_s=60)
    token = store.find_token("tok-1")
    assert token is not None and token.expires_at == 60.0 and token.used_at is None
    store.use_token("tok-1", device_id="dev-pi-1", now=1.0)
    with pytest.raises(Conflict):
        store.use_token("tok-1", device_id="dev-pi-2", now=2.0)
    used = store.find_token("tok-1")
    assert used is not None and used.device_id == "dev-pi-1"
    assert store.find_token("unknown") is None
    _device(store, "pi-2")
    with pytest.raises(EnrollmentError, match="already enrolled"):
        store.add_token("tok-2", device_name="pi-2", secret_box=b"x", now=0.0, ttl_s=60)


def test_transaction_rolls_back_everything(store: Store) -> None:
    store.add_token("tok-1", device_name="pi-1", secret_box=b"sealed", now=0.0, ttl_s=60)
    with pytest.raises(EnrollmentError), store.transaction():
        store.use_token("tok-1", device_id="dev-pi-1", now=1.0)
        raise EnrollmentError("something later failed")
    unused = store.find_token("tok-1")
    assert unused is not None and unused.used_at is None


def test_rounds_updates_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with Store(path) as store:
        _device(store)
        _device(store, "pi-2")
        rnd = store.create_round(lambda rid: f'{{"round": {rid}}}', created_at=10.0, deadline=70.0)
        assert rnd.id == 1 and rnd.spec == '{"round": 1}' and rnd.state is RoundState.OPEN
        store.add_update(1, "dev-pi-1", nonce=b"n1", header="{}", blob=b"sealed", received_at=11.0)
        with pytest.raises(Conflict):
            store.add_update(1, "dev-pi-1", nonce=b"n2", header="{}", blob=b"again", received_at=12.0)
        with pytest.raises(Conflict):
            store.add_update(1, "dev-pi-2", nonce=b"n1", header="{}", blob=b"replay", received_at=12.0)
        store.add_refusal(round_id=1, device_id="dev-pi-2", reason="replayed", detail="nonce", at=12.0)
    with Store(path) as store:  # a restarted coordinator
        [unfinished] = store.unfinished_rounds()
        assert unfinished.id == 1
        assert [u.blob for u in store.updates(1)] == [b"sealed"]
        assert store.update_count(1) == 1 and store.has_update(1, "dev-pi-1") and store.nonce_seen(b"n1")
        assert [r.reason for r in store.refusals(1)] == ["replayed"]
        store.transition_round(1, source=RoundState.OPEN, target=RoundState.AGGREGATING, now=20.0)
        with pytest.raises(Conflict):
            store.transition_round(1, source=RoundState.OPEN, target=RoundState.FAILED)
        with store.transaction():
            store.add_release(1, round_id=1, payload=b"release", signature=b"sig", created_at=21.0)
            store.save_server_state(b"state", release_version=1)
            store.transition_round(1, source=RoundState.AGGREGATING, target=RoundState.RELEASED, now=21.0)
        assert store.unfinished_rounds() == []
        assert store.round(1).closed_at == 20.0
        latest = store.latest_release()
        assert latest is not None and latest.version == 1
        assert store.next_release_version() == 2
        assert store.load_server_state() == (1, b"state")
        assert store.release_for_round(1) is not None
        assert [r.id for r in store.rounds()] == [1]
        with pytest.raises(NotFound):
            store.round(7)


def test_update_for_unknown_device_is_a_conflict(store: Store) -> None:
    store.create_round(lambda rid: "{}", created_at=0.0, deadline=1.0)
    with pytest.raises(Conflict):
        store.add_update(1, "ghost", nonce=b"n", header="{}", blob=b"", received_at=0.0)


def test_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        Store(tmp_path / "file" / "c.sqlite3")
