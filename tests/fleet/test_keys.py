from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.enrollment import EnrollmentToken
from fleet.errors import KeyStoreError, TokenError
from fleet.keys import PUBLIC_FILE, SECRET_FILE, Identity, PublicKeys, Role, load_public
from fleet.topics import validate_device_id


def test_save_and_load(tmp_path: Path) -> None:
    identity = Identity.generate(Role.DEVICE)
    identity.save(tmp_path / "keys")
    assert (tmp_path / "keys" / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    loaded = Identity.load(tmp_path / "keys", role=Role.DEVICE)
    assert loaded.public == identity.public
    assert bytes(loaded.signing_key) == bytes(identity.signing_key)
    assert load_public(tmp_path / "keys" / PUBLIC_FILE, role=Role.DEVICE) == identity.public
    assert Identity.load_or_generate(tmp_path / "keys", role=Role.DEVICE).id == identity.id
    assert "signing_seed" not in repr(loaded)


def test_ids_derive_from_the_signing_key() -> None:
    a, b = Identity.generate(Role.DEVICE), Identity.generate(Role.DEVICE)
    assert a.id != b.id
    assert a.id.startswith("dev-") and validate_device_id(a.id) == a.id
    assert Identity.generate(Role.COORDINATOR).id.startswith("coord-")
    forged = {**a.public.to_json(), "id": b.id}
    with pytest.raises(KeyStoreError, match="claim"):
        PublicKeys.from_json(forged)


def test_secret_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    Identity.generate(Role.DEVICE).save(tmp_path)
    os.chmod(tmp_path / SECRET_FILE, 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        Identity.load(tmp_path, role=Role.DEVICE)


def test_symlinked_and_missing_key_files_are_refused(tmp_path: Path) -> None:
    Identity.generate(Role.DEVICE).save(tmp_path / "real")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / SECRET_FILE).symlink_to(tmp_path / "real" / SECRET_FILE)
    with pytest.raises(KeyStoreError):
        Identity.load(tmp_path / "link", role=Role.DEVICE)
    with pytest.raises(KeyStoreError, match="does not exist"):
        Identity.load(tmp_path / "none", role=Role.DEVICE)


@pytest.mark.parametrize("content", [b"", b"{}", b"not json", b'{"kind": "ppchat-identity"}', b"x" * 5000])
def test_corrupt_key_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / SECRET_FILE
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError):
        Identity.load(tmp_path, role=Role.DEVICE)


def test_role_is_checked(tmp_path: Path) -> None:
    Identity.generate(Role.COORDINATOR).save(tmp_path)
    with pytest.raises(KeyStoreError, match="coordinator identity"):
        Identity.load(tmp_path, role=Role.DEVICE)
    with pytest.raises(KeyStoreError):
        load_public(tmp_path / PUBLIC_FILE, role=Role.DEVICE)


def test_enrollment_token(coordinator: Identity, device: Identity, other_device: Identity) -> None:
    token = EnrollmentToken.generate(coordinator.public)
    text = str(token)
    assert token.secret.hex() not in repr(token)
    parsed = EnrollmentToken.parse(text)
    assert parsed == token
    proof = parsed.proof(device.public)
    assert token.check_proof(proof, device.public)
    assert not token.check_proof(proof, other_device.public)
    assert not EnrollmentToken.generate(coordinator.public).check_proof(proof, device.public)
    assert token.pins(coordinator.public)
    assert not token.pins(Identity.generate(Role.COORDINATOR).public)


@pytest.mark.parametrize("text", ["", "ppe1", "ppe2.abcdefghijkl." + "A" * 43 + "." + "B" * 22, "ppe1.a.b.c"])
def test_malformed_tokens(text: str) -> None:
    with pytest.raises(TokenError):
        EnrollmentToken.parse(text)
