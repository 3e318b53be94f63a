"""The provisioning package's parts: the TOML writer, pinned downloads, the system user in an image."""

from __future__ import annotations

import hashlib
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.provision import tomlw, users
from agent.provision.errors import ChecksumMismatch, ProvisionError
from agent.provision.fetch import Fetched, fetch_verified
from agent.provision.runner import Command
from tests.scripts.provision_support import make_os_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# -- TOML ----------------------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@given(key=TEXT.filter(bool), text=TEXT, number=st.integers(-(2**63), 2**63 - 1), flag=st.booleans())
def test_toml_round_trips(key: str, text: str, number: int, flag: bool) -> None:
    doc = tomlw.dumps({"name": text}, {"t": {key: text, "n": number, "f": flag, "l": [text, "x"]}})
    assert tomllib.loads(doc) == {"name": text, "t": {key: text, "n": number, "f": flag, "l": [text, "x"]}}


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_toml_floats_round_trip(value: float) -> None:
    assert tomllib.loads(tomlw.dumps({"v": value}, {}))["v"] == value


# -- downloads pinned by SHA-256 -----------------------------------------------------------------------


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_verifies_and_is_idempotent(tmp_path: Path, blob: tuple[Path, str]) -> None:
    src, digest = blob
    dest = tmp_path / "dest" / "m.gguf"
    first = fetch_verified(src.as_uri(), digest, dest)
    assert first.outcome is Fetched.DOWNLOADED and dest.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert fetch_verified(src.as_uri(), digest, dest).outcome is Fetched.ALREADY_PRESENT


def test_fetch_refuses_a_mismatch_and_keeps_the_old_file(tmp_path: Path, blob: tuple[Path, str]) -> None:
    src, _ = blob
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"the previous model")
    with pytest.raises(ChecksumMismatch, match="refusing it"):
        fetch_verified(src.as_uri(), "1" * 64, dest)
    assert dest.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src"], "a partial download was left"


def test_fetch_limits_the_size_and_the_schemes(tmp_path: Path, blob: tuple[Path, str]) -> None:
    src, digest = blob
    with pytest.raises(ProvisionError, match="larger than"):
        fetch_verified(src.as_uri(), digest, tmp_path / "m.gguf", max_bytes=100)
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ProvisionError, match="only https://"):
        fetch_verified("ftp://example.net/m.gguf", digest, tmp_path / "m.gguf")
    with pytest.raises(ProvisionError, match="cannot fetch"):
        fetch_verified((tmp_path / "missing.gguf").as_uri(), digest, tmp_path / "m.gguf")


# -- the system user -----------------------------------------------------------------------------------


def test_user_in_an_image_is_added_once_with_free_system_ids(tmp_path: Path) -> None:
    root = make_os_root(tmp_path / "root")
    state = users.inspect(root, ("video", "render", "gpio"))
    assert state.group_missing and state.user_missing and state.join == ("video", "render")
    assert state.absent_groups == ("gpio",)
    users.apply_to_image(root, state)
    uid, gid = users.user_ids(root) or (None, None)
    assert uid == gid == 999  # the highest free system id, the same for the user and its group
    assert users.inspect(root, ("video", "render")).done
    assert users.group_members(root, "video") == ["ppchat"]
    assert "ppchat:!::" in (root / "etc/gshadow").read_text()
    before = {p: (root / "etc" / p).read_text() for p in ("passwd", "group", "shadow", "gshadow")}
    users.apply_to_image(root, users.inspect(root, ("video", "render")))
    assert before == {p: (root / "etc" / p).read_text() for p in before}


def test_user_commands_on_a_live_system() -> None:
    state = users.UserState(group_missing=True, user_missing=True, join=("video",), absent_groups=())
    texts = [c.text() for c in users.live_commands(state)]
    assert texts == [
        "groupadd --system ppchat",
        "useradd --system --gid ppchat --home-dir /var/lib/ppchat --no-create-home "
        "--shell /usr/sbin/nologin --comment 'ppchat agent' ppchat",
        "usermod --append --groups video ppchat",
    ]


def test_command_text_is_a_shell_line() -> None:
    cmd = Command(("pip", "install", "a b"), {"CMAKE_ARGS": "-DX=ON -DY=OFF"}, Path("/mnt/img"))
    assert cmd.text() == "CMAKE_ARGS='-DX=ON -DY=OFF' chroot /mnt/img pip install 'a b'"
