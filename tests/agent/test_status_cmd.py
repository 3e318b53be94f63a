"""``agent status``, the field diagnostic: a real daemon on the demo model, not running, and a board
on a weak supply (a fake sysfs tree); plus the pure parts (systemctl parsing, the verdict, journal
fields)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.diagnostic import (
    SCHEMA_VERSION,
    FieldReport,
    Health,
    assess,
    build_report,
    file_sha256,
    parse_systemctl_show,
    read_fleet,
    service_state,
)
from agent.fleet_adapter import FleetState, save_state
from agent.journal import StructuredJournalHandler, component_of, journal_wanted, syslog_priority
from tests.agent.daemon_support import DaemonProcess, daemon_config, run_agent, running_daemon, write_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"
SECTIONS = (
    "service",
    "board",
    "model",
    "doors",
    "fleet",
    "privacy",
    "scheduler",
    "power",
    "temperature",
    "memory",
    "disk",
    "versions",
)
TEXT_ROWS = (
    "daemon",
    "service",
    "board",
    "model",
    "quantization",
    "sha256",
    "load time",
    "last reply",
    "socket",
    "door wyoming",
    "door mqtt_chat",
    "fleet",
    "privacy",
    "scheduler",
    "power",
    "under-voltage",
    "throttling",
    "temperature",
    "memory",
    "disk",
    "versions",
)


@pytest.fixture(scope="module")
def daemon(demo_model: Any) -> Iterator[DaemonProcess]:
    directory = Path(tempfile.mkdtemp(prefix="ppc-st-", dir="/tmp"))
    try:
        with running_daemon(directory, daemon_config(directory, demo_model.q4_k_m)) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _status(config: Path, *args: str) -> tuple[int, Any]:
    result = run_agent("status", "--json", "--config", str(config), *args)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def _wait_for(config: Path, ready: Any, timeout: float = 30.0) -> tuple[int, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, info = _status(config)
        if ready(info) or time.monotonic() > deadline:
            return code, info
        time.sleep(0.5)


def test_status_of_a_running_daemon_answers_every_question(daemon: DaemonProcess, demo_model: Any) -> None:
    chat = run_agent("chat", "--config", str(daemon.config_path), "--max-tokens", "8", "hello")
    assert chat.returncode == 0, chat.stderr
    code, info = _wait_for(
        daemon.config_path,
        lambda i: i["model"]["sha256"] is not None and i["model"]["last_tokens_per_s"] is not None,
    )
    assert info["schema_version"] == SCHEMA_VERSION
    FieldReport.model_validate(info)  # the documented schema
    assert code == info["exit_code"] == 0, info["reasons"]
    assert info["health"] == "healthy" and info["running"] and info["pid"] == daemon.process.pid
    for section in SECTIONS:
        assert section in info
    model = info["model"]
    assert model["loaded"] and model["path"] == str(demo_model.q4_k_m)
    assert model["file_type"].upper().startswith("Q4_K")
    assert model["sha256"] == file_sha256(Path(demo_model.q4_k_m)) and model["sha256_source"] == "daemon"
    assert model["load_s"] > 0 and model["last_tokens_per_s"] > 0 and model["size_bytes"] > 0
    doors = {d["name"]: d for d in info["doors"]}
    assert doors["socket"]["state"] == "listening"
    assert doors["wyoming"]["state"] == doors["mqtt_chat"]["state"] == "disabled"
    assert info["fleet"] == {**info["fleet"], "enabled": False}
    assert info["privacy"]["remaining_epsilon"] == info["privacy"]["epsilon"]
    assert info["privacy"]["exhausted"] is False
    assert info["scheduler"]["summary"]
    assert info["service"]["manager"] in ("systemd", "none")
    assert info["board"]["profile"] and info["board"]["reasons"]
    assert info["power"]["source"] in ("mains", "battery", "unknown")
    assert info["memory"]["total_mb"] > 0 and info["memory"]["daemon_rss_mb"] > 0
    assert info["disk"]["free_bytes"] > 0
    versions = info["versions"]
    assert versions["ppchat"] and versions["llama_cpp"] and versions["python"].startswith("3.")

    verified = run_agent("status", "--json", "--verify", "--config", str(daemon.config_path))
    again = json.loads(verified.stdout)["model"]
    assert again["sha256_source"] == "verified" and again["sha256"] == model["sha256"]

    text = run_agent("status", "--config", str(daemon.config_path))
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.startswith("ppchat agent on ppchat-device: HEALTHY (exit 0)")
    labels = {line[2:18].strip() for line in text.stdout.splitlines() if line.startswith("  ")}
    for row in TEXT_ROWS:
        assert row in labels, (row, text.stdout)
    assert model["sha256"] in text.stdout and "tokens/s" in text.stdout
    assert len(text.stdout.splitlines()) <= 40  # one screen


def test_not_running_exits_2_and_still_reads_the_board(short_tmp: Path) -> None:
    config = write_config(short_tmp / "agent.toml", daemon_config(short_tmp, None))
    code, info = _status(config)
    assert code == 2 and info["health"] == "not_running" and info["running"] is False
    assert info["reasons"] and info["board"]["profile"] and info["versions"]["python"]
    assert info["model"]["error"] and info["scheduler"]["summary"].startswith("unknown")
    text = run_agent("status", "--config", str(config))
    assert text.returncode == 2 and "NOT RUNNING" in text.stdout and "not running" in text.stdout


def test_a_pi5_on_a_weak_supply_is_degraded(short_tmp: Path) -> None:
    sections = daemon_config(short_tmp, None, hardware={"root_dir": FIXTURES / "pi5-weak-supply"})
    with running_daemon(short_tmp, sections, extra_args=("--no-model",)) as d:
        code, info = _status(d.config_path)
        text = run_agent("status", "--config", str(d.config_path))
    assert code == 1 and info["health"] == "degraded"
    assert info["board"]["profile"] == "raspberry-pi-5"
    assert info["power"]["under_voltage_now"] is True and info["power"]["throttled_now"] is True
    assert any("under-voltage now" in r for r in info["reasons"])
    assert any(r.startswith("throttled now") for r in info["reasons"])
    assert text.returncode == 1 and "DEGRADED" in text.stdout and "under-voltage now" in text.stdout


# -- pure parts -----------------------------------------------------------------------------------------


def _report(tmp: Path, **config: Any) -> FieldReport:
    cfg = parse_config({"paths": {"state_dir": str(tmp / "s"), "runtime_dir": str(tmp / "r")}, **config})
    return build_report(cfg, snap=None, alive=False, socket_answers=True, service=service_state())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"privacy": {"exhausted": True}}, "privacy budget exhausted"),
        ({"fleet": {"enabled": True, "broker": "mqtt://b:1883", "connected": False}}, "not connected"),
        ({"snapshot_age_s": 1000.0, "pid": 1, "state": "ready"}, "stale"),
        ({"doors": ({"name": "wyoming", "enabled": True, "state": "down"},)}, "wyoming is down"),
    ],
)
def test_what_degrades(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    base = _report(tmp_path).model_dump(mode="json")
    data = {**base, "pid": 1, "state": "ready"}
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    health, reasons, _ = assess(FieldReport.model_validate(data))
    assert health is Health.DEGRADED and any(reason in r for r in reasons), reasons


def test_fleet_state_is_read_from_its_file_and_the_snapshot(tmp_path: Path) -> None:
    cfg = parse_config(
        {"paths": {"state_dir": str(tmp_path)}, "fleet": {"enabled": True, "broker_url": "mqtt://h:1883"}}
    )
    save_state(cfg.fleet_dir / "state.json", FleetState(enrolled=True, last_round=7, adapter_version=3))
    info = read_fleet(cfg, {"fleet": {"connected": True}})
    assert (info.connected, info.enrolled, info.last_round, info.adapter_version) == (True, True, 7, 3)
    assert read_fleet(cfg, None).connected is None


def test_systemctl_show_is_parsed() -> None:
    info = parse_systemctl_show(
        "ActiveState=active\nSubState=running\nNRestarts=2\n"
        "ExecMainStartTimestamp=Thu 2026-12-03 10:00:00 UTC\n"
    )
    assert (info.manager, info.active_state, info.sub_state, info.restarts) == (
        "systemd",
        "active",
        "running",
        2,
    )
    assert info.started == "Thu 2026-12-03 10:00:00 UTC"
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> str:
        calls.append(argv)
        return "ActiveState=failed\nSubState=failed\nNRestarts=5\n"

    if shutil.which("systemctl"):
        assert service_state(runner=runner, pid1_is_systemd=True).active_state == "failed"
        assert calls[0][:3] == ["systemctl", "show", "ppchat-agent.service"]
    assert service_state(runner=runner, pid1_is_systemd=False).note is not None


def test_journal_records_carry_the_structured_fields() -> None:
    sent: list[dict[str, str]] = []
    handler = StructuredJournalHandler(lambda **fields: sent.append(fields), device="kitchen-pi")
    logger = logging.getLogger("agent.fleet_client")
    logger.addHandler(handler)
    try:
        logger.warning("broker %s unreachable", "b:8883")
    finally:
        logger.removeHandler(handler)
    (fields,) = sent
    assert fields["MESSAGE"] == "broker b:8883 unreachable" and fields["PRIORITY"] == "4"
    assert fields["PPCHAT_COMPONENT"] == "fleet_client" and fields["PPCHAT_DEVICE"] == "kitchen-pi"
    assert fields["SYSLOG_IDENTIFIER"] == "ppchat-agent" and fields["CODE_LINE"].isdigit()
    assert component_of("agent.engine.llama_backend") == "engine" and syslog_priority(logging.DEBUG) == 7
    assert journal_wanted(None, {"INVOCATION_ID": "x"}) and not journal_wanted(None, {})
    assert not journal_wanted(False, {"JOURNAL_STREAM": "1:2"})
