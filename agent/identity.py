"""The device's fleet identity, made on the device at first boot and never baked into an image.

    python -m agent.identity ensure [--config FILE]    ExecStartPre= of ppchat-agent.service
    python -m agent.identity show [--config FILE] [--json]

The keys (:mod:`fleet.keys`: ``identity.key`` 0600, ``identity.pub``) live in ``<state_dir>/keys/``
with the device's fleet-broker password (``broker-password``, 0600, 256 random bits; its username is
the device id) and ``binding.json`` beside them: what the keys were made on, the machine's
``/etc/machine-id`` and, where the board has one, its hardware serial number
(``/proc/device-tree/serial-number`` on a Pi or a Jetson). At every start of the agent,
:func:`ensure_identity` decides:

- no keys: generate them and the broker password (first boot), record the binding
  -> :attr:`Outcome.CREATED`;
- keys bound to this machine-id and serial: keep them -> :attr:`Outcome.KEPT`;
- keys bound to another machine-id or serial, or with no binding: the card was cloned from another
  device (or an image carried keys). The secret key is another device's, so every file in the keys
  directory (keys, broker password, binding, the fleet client's enrollment record) is deleted and a
  new identity is made -> :attr:`Outcome.REGENERATED`. The device must enroll again, with a new
  one-time token (the original device's token was used), and its new broker account be added.

Only a hash of the broker password leaves the device: ``show`` prints the Mosquitto password-file
line (``broker_password_entry``) that the broker's operator appends to its password file
(docs/operations.md, "Adding a device to the broker").

A card cloned byte for byte keeps the original's machine-id; the board serial is what tells the two
apart. Where the serial cannot be read (x86 PCs, where the DMI ids are root-only), the machine-id
alone binds the keys: clone those machines only from an image whose ``/etc/machine-id`` is empty
(``scripts/provision --image`` empties it), or run ``systemd-machine-id-setup`` on the clone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError
from fleet.acl import new_password, password_entry
from fleet.errors import KeyStoreError
from fleet.files import write_atomic, write_secret
from fleet.keys import PUBLIC_FILE, SECRET_FILE, Identity, Role

log = logging.getLogger(__name__)

KEYS_SUBDIR = "keys"
BINDING_FILE = "binding.json"
BROKER_PASSWORD_FILE = "broker-password"  # noqa: S105 (a file name)
MACHINE_ID = "etc/machine-id"
SERIAL_NUMBER = "proc/device-tree/serial-number"
_MACHINE_ID_RE = re.compile(r"[0-9a-f]{32}")
_SERIAL_RE = re.compile(r"[0-9A-Za-z._:-]{1,128}")


class IdentityError(AgentError):
    """The machine-id is unusable, or the keys directory cannot be read or written."""

    exit_code = 1


class Outcome(str, Enum):
    CREATED = "created"
    KEPT = "kept"
    REGENERATED = "regenerated"


class Binding(BaseModel):
    """What an identity was made on (``binding.json`` beside the keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(default="ppchat-identity-binding", pattern=r"^ppchat-identity-binding$")
    v: int = Field(default=1, ge=1, le=1)
    device_id: str
    machine_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    hardware_serial: str | None = None
    created_at: datetime


@dataclass(frozen=True)
class Machine:
    """This machine's identifiers, read under ``root``."""

    machine_id: str
    hardware_serial: str | None

    @classmethod
    def read(cls, root: Path = Path("/")) -> Machine:
        return cls(machine_id=read_machine_id(root), hardware_serial=read_hardware_serial(root))


@dataclass(frozen=True)
class IdentityReport:
    outcome: Outcome
    device_id: str
    fingerprint: str
    reason: str
    previous_id: str | None = None

    def line(self) -> str:
        text = (
            f"identity {self.device_id} (fingerprint {self.fingerprint}) {self.outcome.value}: {self.reason}"
        )
        if self.previous_id is not None:
            text += f"; previous identity {self.previous_id} discarded, enroll again with a new token"
        return text


def read_machine_id(root: Path = Path("/")) -> str:
    """``/etc/machine-id`` under ``root``: 32 lowercase hex digits, or :class:`IdentityError`."""
    path = root / MACHINE_ID
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    if _MACHINE_ID_RE.fullmatch(text) is None:
        raise IdentityError(
            f"{path} holds no machine id ({text[:40]!r}): systemd writes one at boot; "
            "an image must not be started before it has one"
        )
    return text


def read_hardware_serial(root: Path = Path("/")) -> str | None:
    """The board's serial number from the device tree (Pi, Jetson), or None when there is none."""
    try:
        raw = (root / SERIAL_NUMBER).read_bytes()[:256]
    except OSError:
        return None
    text = raw.rstrip(b"\0").decode("ascii", errors="replace").strip()
    if _SERIAL_RE.fullmatch(text) is None or set(text) <= {"0"}:
        return None
    return text


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / KEYS_SUBDIR


def _load_binding(directory: Path) -> Binding | None:
    path = directory / BINDING_FILE
    try:
        raw = path.read_bytes()[:4096]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return Binding.model_validate_json(raw)
    except ValidationError:
        return None  # a corrupt binding binds nothing: the keys are replaced


def _mismatch(binding: Binding | None, identity: Identity, machine: Machine) -> str | None:
    """Why the keys do not belong to this machine, or None when they do."""
    if binding is None:
        return "the keys have no binding to a machine (copied in from elsewhere?)"
    if binding.device_id != identity.id:
        return "the binding names another identity"
    if binding.machine_id != machine.machine_id:
        return (
            f"the keys were made on machine-id {binding.machine_id[:8]}..., "
            f"this is {machine.machine_id[:8]}..."
        )
    if binding.hardware_serial is not None and binding.hardware_serial != machine.hardware_serial:
        return (
            f"the keys were made on board serial {binding.hardware_serial}, this board is "
            f"{machine.hardware_serial or 'unknown'} (a cloned card)"
        )
    return None


def _wipe(directory: Path) -> None:
    """Delete every file of the keys directory (another device's secrets must not stay here)."""
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            raise IdentityError(f"unexpected directory {entry} in the keys directory; remove it by hand")
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def _create(directory: Path, machine: Machine, *, now: datetime) -> Identity:
    identity = Identity.generate(Role.DEVICE)
    try:
        identity.save(directory)
        write_secret(directory / BROKER_PASSWORD_FILE, (new_password() + "\n").encode())
        binding = Binding(
            device_id=identity.id,
            machine_id=machine.machine_id,
            hardware_serial=machine.hardware_serial,
            created_at=now,
        )
        write_atomic(directory / BINDING_FILE, (binding.model_dump_json(indent=1) + "\n").encode())
    except OSError as exc:
        raise IdentityError(f"cannot write the identity into {directory}: {exc.strerror}") from None
    return identity


def ensure_identity(directory: Path, machine: Machine, *, now: datetime | None = None) -> IdentityReport:
    """Make sure ``directory`` holds an identity bound to ``machine`` (see the module doc)."""
    directory = Path(directory)
    now = now or datetime.now(timezone.utc)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create {directory}: {exc.strerror}") from None
    if not (directory / SECRET_FILE).exists():
        stale = [p.name for p in directory.iterdir()]
        _wipe(directory)  # a public key or binding without its secret key is of no use
        identity = _create(directory, machine, now=now)
        reason = "first boot: new keys made on this device"
        if stale:
            reason += f" (removed {', '.join(sorted(stale))} left without a secret key)"
        return IdentityReport(Outcome.CREATED, identity.id, identity.public.fingerprint, reason)
    try:
        current = Identity.load(directory, role=Role.DEVICE)
    except KeyStoreError as exc:
        # Unreadable, corrupt or badly permitted keys are an operator's problem, not a clone: refuse.
        raise IdentityError(str(exc)) from None
    why = _mismatch(_load_binding(directory), current, machine)
    if why is None:
        return IdentityReport(Outcome.KEPT, current.id, current.public.fingerprint, "bound to this machine")
    _wipe(directory)
    identity = _create(directory, machine, now=now)
    log.warning("identity regenerated: %s", why)
    return IdentityReport(
        Outcome.REGENERATED, identity.id, identity.public.fingerprint, why, previous_id=current.id
    )


def describe(directory: Path) -> dict[str, object]:
    """What ``show`` prints: the identity's id, fingerprint and binding (no secrets)."""
    directory = Path(directory)
    if not (directory / PUBLIC_FILE).exists():
        return {"keys_dir": str(directory), "device_id": None}
    from fleet.keys import load_public

    try:
        public = load_public(directory / PUBLIC_FILE)
    except KeyStoreError as exc:
        raise IdentityError(str(exc)) from None
    binding = _load_binding(directory)
    entry: str | None = None
    try:
        password = (directory / BROKER_PASSWORD_FILE).read_text().strip()
    except OSError:
        password = ""
    if password:
        entry = password_entry(public.id, password)
    return {
        "keys_dir": str(directory),
        "device_id": public.id,
        "fingerprint": public.fingerprint,
        "machine_id": binding.machine_id if binding else None,
        "hardware_serial": binding.hardware_serial if binding else None,
        "created_at": binding.created_at.isoformat() if binding else None,
        "broker_username": public.id,
        "broker_password_entry": entry,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.identity", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("ensure", "show"))
    parser.add_argument("--config", "-c", type=Path, default=None, help="agent config file")
    parser.add_argument("--root", type=Path, default=Path("/"), help="where /etc and /proc are read")
    parser.add_argument("--json", action="store_true", help="show: print JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from agent.commands.common import load

    try:
        config = load(args)
        directory = keys_dir(config.paths.state_dir)
        if args.action == "ensure":
            report = ensure_identity(directory, Machine.read(args.root))
            print(report.line(), flush=True)
            return 0
        info = describe(directory)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for key, value in info.items():
                print(f"{key}: {value if value is not None else '-'}")
        return 0 if info["device_id"] is not None else 1
    except AgentError as exc:
        print(f"agent identity {args.action}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    os.umask(0o077)
    raise SystemExit(main())
