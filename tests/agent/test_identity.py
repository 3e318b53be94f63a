"""The device identity at first boot: made on the device, bound to it, regenerated on a cloned card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.identity import (
    BINDING_FILE,
    BROKER_PASSWORD_FILE,
    IdentityError,
    Machine,
    Outcome,
    describe,
    ensure_identity,
    main,
    read_hardware_serial,
    read_machine_id,
)
from fleet.acl import check_password
from fleet.keys import SECRET_FILE, Identity, Role

MID_A = "0123456789abcdef0123456789abcdef"
MID_B = "fedcba9876543210fedcba9876543210"


def machine(mid: str = MID_A, serial: str | None = "10000000a1b2c3d4") -> Machine:
    return Machine(machine_id=mid, hardware_serial=serial)


def test_first_boot_makes_keys_and_a_broker_password(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    report = ensure_identity(keys, machine())
    assert report.outcome is Outcome.CREATED and report.device_id.startswith("dev-")
    for name in (SECRET_FILE, BROKER_PASSWORD_FILE):
        assert (keys / name).stat().st_mode & 0o777 == 0o600
    assert keys.stat().st_mode & 0o777 == 0o700
    binding = json.loads((keys / BINDING_FILE).read_text())
    assert binding["machine_id"] == MID_A and binding["device_id"] == report.device_id
    again = ensure_identity(keys, machine())
    assert again.outcome is Outcome.KEPT and again.device_id == report.device_id


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (machine(MID_B), "machine-id"),
        (machine(MID_A, "10000000ffffffff"), "cloned card"),  # dd of the whole card: same machine-id
    ],
    ids=["new-machine-id", "same-machine-id-other-board"],
)
def test_a_cloned_card_regenerates_its_identity(tmp_path: Path, second: Machine, why: str) -> None:
    keys = tmp_path / "keys"
    first = ensure_identity(keys, machine())
    (keys / "enrollment.json").write_text("{}")  # the fleet client's record of the first enrollment
    old_password = (keys / BROKER_PASSWORD_FILE).read_text()
    report = ensure_identity(keys, second)
    assert report.outcome is Outcome.REGENERATED and why in report.reason
    assert report.previous_id == first.device_id and report.device_id != first.device_id
    assert Identity.load(keys, role=Role.DEVICE).id == report.device_id
    assert not (keys / "enrollment.json").exists(), "the old enrollment would pair with the new keys"
    assert (keys / BROKER_PASSWORD_FILE).read_text() != old_password
    assert "enroll again" in report.line()
    assert ensure_identity(keys, second).outcome is Outcome.KEPT


def test_keys_without_a_binding_are_replaced(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    Identity.generate(Role.DEVICE).save(keys)  # copied in from elsewhere
    assert ensure_identity(keys, machine()).outcome is Outcome.REGENERATED


def test_boards_without_a_serial_bind_to_the_machine_id(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    ensure_identity(keys, machine(serial=None))
    assert ensure_identity(keys, machine(serial=None)).outcome is Outcome.KEPT
    assert ensure_identity(keys, machine(MID_B, serial=None)).outcome is Outcome.REGENERATED


def test_badly_permitted_keys_are_refused_not_replaced(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = ensure_identity(keys, machine())
    (keys / SECRET_FILE).chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        ensure_identity(keys, machine())
    (keys / SECRET_FILE).chmod(0o600)
    assert ensure_identity(keys, machine()).device_id == first.device_id


@pytest.mark.parametrize("content", ["", "uninitialized\n", "not-hex"])
def test_an_unusable_machine_id_is_an_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text(content)
    with pytest.raises(IdentityError, match="no machine id"):
        read_machine_id(tmp_path)


def test_machine_identifiers_are_read_under_a_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text(MID_A + "\n")
    assert read_hardware_serial(tmp_path) is None
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/serial-number").write_bytes(b"10000000a1b2c3d4\0")
    assert Machine.read(tmp_path) == machine()
    (tmp_path / "proc/device-tree/serial-number").write_bytes(b"0000000000000000\0")
    assert read_hardware_serial(tmp_path) is None


def test_show_gives_the_broker_account_but_no_secret(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    report = ensure_identity(keys, machine())
    info = describe(keys)
    assert info["device_id"] == report.device_id == info["broker_username"]
    entry = str(info["broker_password_entry"])
    assert entry.startswith(f"{report.device_id}:$7$")
    assert check_password(entry, (keys / BROKER_PASSWORD_FILE).read_text().strip())
    assert (keys / BROKER_PASSWORD_FILE).read_text().strip() not in json.dumps(info)


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/machine-id").write_text(MID_A + "\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["ensure", "--config", str(config), "--root", str(root)]) == 0
    assert "created: first boot" in capsys.readouterr().out
    assert main(["show", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["machine_id"] == MID_A and shown["keys_dir"] == str(tmp_path / "state/keys")
    shutil.rmtree(root / "etc")
    assert main(["ensure", "--config", str(config), "--root", str(root)]) == 1
