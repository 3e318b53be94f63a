"""The units in systemd/: ``systemd-analyze verify`` and ``security --offline=true`` on every one.

``verify`` checks that ExecStart= binaries exist and are executable, so the units are checked as
installed in a temporary root (``--root``) holding this machine's own systemd units (for the
targets ours name), stub executables at the install paths (``/opt/ppchat/.venv/bin/...``) and
``/bin/rm``. The Jetson drop-ins are checked on top of the agent and train units.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agent.provision import units
from agent.provision.config_files import RUNTIME_DIR, STATE_DIR
from tests.scripts.provision_support import REPO, STUB, make_os_root

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)

SYSTEMD = REPO / "systemd"
UNITS = sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".path"))
DROPINS = sorted(str(p.relative_to(SYSTEMD / "jetson")) for p in (SYSTEMD / "jetson").rglob("*.conf"))


def _root(base: Path, *, jetson: bool) -> Path:
    root = make_os_root(base)
    venv_bin = root / "opt/ppchat/.venv/bin"
    venv_bin.mkdir(parents=True)
    for exe in ("agent", "python", "coordinator"):
        (venv_bin / exe).write_text(STUB)
        (venv_bin / exe).chmod(0o755)
    unit_dir = root / units.UNIT_DIR
    unit_dir.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, unit_dir / name)
    if jetson:
        for name in DROPINS:
            (unit_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SYSTEMD / "jetson" / name, unit_dir / name)
    return root


@pytest.fixture(scope="module")
def plain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _root(tmp_path_factory.mktemp("units") / "root", jetson=False)


@pytest.fixture(scope="module")
def jetson_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _root(tmp_path_factory.mktemp("units-jetson") / "root", jetson=True)


def test_the_units_and_drop_ins_are_the_expected_ones() -> None:
    assert UNITS == [
        "ppchat-agent.service",
        "ppchat-coordinator.service",
        "ppchat-train.path",
        "ppchat-train.service",
    ]
    assert list(units.CUDA_DROPINS) == DROPINS


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(plain_root: Path, unit: str) -> None:
    units.verify(plain_root, [unit])


@pytest.mark.parametrize("unit", ["ppchat-agent.service", "ppchat-train.service"])
def test_systemd_analyze_verify_with_the_jetson_drop_ins(jetson_root: Path, unit: str) -> None:
    units.verify(jetson_root, [unit])


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    root = _root(tmp_path / "root", jetson=False)
    (root / "opt/ppchat/.venv/bin/agent").unlink()
    with pytest.raises(Exception, match="is not executable"):
        units.verify(root, ["ppchat-agent.service"])


@pytest.mark.parametrize(
    ("unit", "jetson"),
    [
        ("ppchat-agent.service", False),
        ("ppchat-agent.service", True),
        ("ppchat-train.service", False),
        ("ppchat-coordinator.service", False),
    ],
    ids=["agent", "agent-jetson", "train", "coordinator"],
)
def test_exposure_is_at_most_2(plain_root: Path, jetson_root: Path, unit: str, jetson: bool) -> None:
    score = units.exposure(jetson_root if jetson else plain_root, unit)
    print(f"\n{unit}{' (+ Jetson drop-in)' if jetson else ''}: exposure {score}")
    assert score <= units.MAX_EXPOSURE


def _settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        found = re.fullmatch(r"([A-Za-z]+)=(.*)", line.strip())
        if found:
            settings.setdefault(found.group(1), []).append(found.group(2))
    return settings


def test_the_agent_unit_has_the_settings_the_design_asks_for() -> None:
    s = _settings("ppchat-agent.service")
    expected = {
        "Type": "notify", "Restart": "on-failure", "User": "ppchat", "Group": "ppchat", "UMask": "0077",
        "RuntimeDirectory": "ppchat", "StateDirectory": "ppchat", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "CapabilityBoundingSet": "", "SystemCallArchitectures": "native", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "ProtectClock": "yes", "ProtectHostname": "yes", "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "no",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }  # fmt: skip
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert s["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert s["WatchdogSec"] and s["ExecStart"] == [
        "/opt/ppchat/.venv/bin/agent run --config /etc/ppchat/agent.toml"
    ]
    # The directories systemd makes are the ones the provisioned config names.
    assert (
        f"/run/{s['RuntimeDirectory'][0]}" == RUNTIME_DIR
        and f"/var/lib/{s['StateDirectory'][0]}" == STATE_DIR
    )


def test_the_trainer_runs_at_the_lowest_priority_under_a_memory_ceiling() -> None:
    s = _settings("ppchat-train.service")
    for key, value in {
        "Nice": "19", "CPUSchedulingPolicy": "idle", "CPUWeight": "idle", "IOSchedulingClass": "idle",
        "OOMScoreAdjust": "800", "PrivateNetwork": "yes", "User": "ppchat",
    }.items():  # fmt: skip
        assert s.get(key) == [value], key
    assert s["MemoryMax"] and s["MemoryHigh"]
    assert s["ExecStart"] == [
        "/opt/ppchat/.venv/bin/agent train --config /etc/ppchat/agent.toml $PPCHAT_TRAIN_ARGS"
    ]
    agent = _settings("ppchat-agent.service")
    assert int(agent["OOMScoreAdjust"][0]) < int(s["OOMScoreAdjust"][0])
