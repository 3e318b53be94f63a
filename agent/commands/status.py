"""``agent status [--json] [--verify]``: the field diagnostic, the one command a technician runs.

It reads the daemon's status snapshot (``<runtime_dir>/status.json``) and checks that its process is
alive and its socket answers, asks systemd about the service when systemd runs the machine, reads the
board's sensors live (so it works with the daemon down), and the privacy ledger and fleet state
read-only. See :mod:`agent.diagnostic` and docs/operations.md ("agent status").
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.diagnostic import FieldReport

HELP = "the field diagnostic: service, board, model, doors, fleet, privacy, power (exit 0/1/2)"

EPILOG = """\
exit status:
  0  healthy
  1  degraded: running, but something needs a look (under-voltage, throttling, privacy budget
     exhausted, fleet broker disconnected while enabled, a front door down, a stale status
     snapshot, ...); the reasons are printed (JSON: "reasons")
  2  not running: no live daemon and no answer on the socket

--json prints one object for fleet scripts, "schema_version": 1 (docs/operations.md).
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help="agent config file (default: $PPCHAT_CONFIG or /etc/ppchat/agent.toml when it exists)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (schema_version 1)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="hash the model file now (SHA-256) instead of trusting the daemon's hash taken at load",
    )


def _socket_answers(path: Path) -> bool:
    from agent.client import AgentClient
    from agent.errors import AgentError

    try:
        with AgentClient.connect(path, timeout=2.0) as client:
            client.ping()
    except (AgentError, OSError):
        return False
    return True


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s}s" if minutes else f"{s}s"


def _yes(value: bool | None, *, yes: str = "YES", no: str = "no") -> str:
    return "unknown" if value is None else (yes if value else no)


def _mib(n: float | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.1f} MiB"


def _gib(n: float | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def render(r: FieldReport, *, now: float | None = None) -> str:
    """The text report: one line per question, aligned, one screen."""
    now = time.time() if now is None else now
    lines: list[str] = []

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<16}{value}")

    head = {"healthy": "HEALTHY", "degraded": "DEGRADED", "not_running": "NOT RUNNING"}[r.health.value]
    lines.append(f"ppchat agent on {r.device_name}: {head} (exit {r.exit_code})")
    for reason in r.reasons:
        lines.append(f"  ! {reason}")
    for note in r.notes:
        lines.append(f"  - {note}")
    if r.running:
        daemon = f"{r.state or 'running'}, pid {r.pid if r.pid is not None else '?'}"
        if r.uptime_s is not None:
            daemon += f", uptime {_duration(r.uptime_s)}"
        if r.snapshot_age_s is not None:
            daemon += f", snapshot {r.snapshot_age_s:.0f} s old"
    else:
        daemon = "not running"
    row("daemon", daemon)
    s = r.service
    if s.manager == "systemd" and s.active_state is not None:
        started = f", since {s.started}" if s.started else ""
        row("service", f"{s.unit} {s.active_state}/{s.sub_state}, {s.restarts} restarts{started}")
    else:
        row("service", s.note or "unknown")
    b = r.board
    if b.profile is None:
        row("board", f"unknown ({b.error})" if b.error else "unknown")
    else:
        how = "set in the config" if b.overridden else "; ".join(b.reasons)
        row("board", f"{b.profile} ({b.title}): {how}")
        ev = b.evidence
        seen = [str(ev[k]) for k in ("model", "tegra_release", "cpu_model") if ev.get(k)]
        if ev.get("memory_mb"):
            seen.append(f"{ev['memory_mb']:,} MB RAM")
        if seen:
            row("", "evidence: " + ", ".join(seen))
        for w in b.warnings:
            row("", f"warning: {w}")
    m = r.model
    if m.path is None:
        row("model", m.error or "not configured")
    else:
        size = f", {_mib(m.size_bytes)}" if m.size_bytes is not None else ""
        row("model", f"{m.path}{size}" + ("" if m.loaded else " (not loaded)"))
        arch = f", {m.architecture}" if m.architecture else ""
        params = f", {m.n_params:,} parameters" if m.n_params else ""
        row("quantization", f"{m.file_type or 'unknown'}{arch}{params}")
        if m.sha256:
            pinned = ""
            if m.sha256_pinned:
                pinned = (
                    ", matches the config" if m.sha256 == m.sha256_pinned else ", DIFFERS FROM THE CONFIG"
                )
            row("sha256", f"{m.sha256} ({m.sha256_source}{pinned})")
        else:
            row("sha256", "unknown (not hashed yet; --verify hashes it now)")
        if m.load_s is not None:
            row("load time", f"{m.load_s:.2f} s, context {m.n_ctx} tokens")
        if m.last_tokens_per_s is not None and m.last_reply_at is not None:
            ago = _duration(max(0.0, now - m.last_reply_at))
            row("last reply", f"{m.last_tokens_per_s:.1f} tokens/s ({ago} ago)")
        else:
            row("last reply", "none yet" if r.running else "unknown")
        if m.error:
            row("", m.error)
    if r.conversations is not None:
        row("conversations", f"{r.conversations} stored; replies since start: {r.replies}")
    for d in r.doors:
        detail = f" ({d.detail})" if d.detail else ""
        state = d.state.upper() if d.state == "down" else d.state
        row(f"door {d.name}" if d.name != "socket" else "socket", f"{state}{detail}")
    f = r.fleet
    if not f.enabled:
        row("fleet", "not configured")
    else:
        conn = {True: "connected", False: "DISCONNECTED", None: "connection unknown"}[f.connected]
        enrolled = "enrolled" if f.enrolled else "NOT enrolled"
        row("fleet", f"{f.broker}: {conn}, {enrolled}")
        rnd = f"round {f.last_round}" if f.last_round else "none yet"
        ver = f"v{f.adapter_version}" if f.adapter_version is not None else "none (base model)"
        row("", f"last round {rnd}; global adapter {ver}")
    p = r.privacy
    if p.error:
        row("privacy", f"unknown: {p.error}")
    elif p.spent_epsilon is not None and p.remaining_epsilon is not None:
        row(
            "privacy",
            f"epsilon spent <= {p.spent_epsilon:.3g}, left {p.remaining_epsilon:.3g} of {p.epsilon:g}"
            f" per {p.period_days:g} days ({p.preset}; {p.runs_in_window} runs in window)"
            + (" EXHAUSTED" if p.exhausted else ""),
        )
    row("scheduler", r.scheduler.summary)
    pw = r.power
    flags = ", ".join(pw.throttling_flags) if pw.throttling_flags else "none"
    battery = f" ({pw.battery_percent:.0f} %)" if pw.battery_percent is not None else ""
    row(
        "power",
        f"{pw.source}{battery}, input {pw.input_power_w:.1f} W" if pw.input_power_w else pw.source + battery,
    )
    row(
        "under-voltage",
        f"now {_yes(pw.under_voltage_now)}, since boot {_yes(pw.under_voltage_since_boot)}",
    )
    row("throttling", "unknown (no firmware flags)" if pw.throttled_now is None else f"flags: {flags}")
    t = r.temperature
    if t.max_c is None:
        row("temperature", "unknown (no thermal zones)")
    else:
        zones = ", ".join(f"{k} {v:.0f}" for k, v in sorted(t.zones.items()))
        row("temperature", f"max {t.max_c:.0f} °C (soft limit {t.soft_limit_c:g}): {zones}")
    mem = r.memory
    rss = f"; daemon {mem.daemon_rss_mb:.0f} MiB" if mem.daemon_rss_mb is not None else ""
    if mem.total_mb is not None and mem.available_mb is not None:
        row("memory", f"{mem.available_mb:,} of {mem.total_mb:,} MB available{rss}")
    else:
        row("memory", "unknown" + rss)
    disk = r.disk
    if disk.free_bytes is not None and disk.used_percent is not None:
        row(
            "disk",
            f"{_gib(disk.free_bytes)} free of {_gib(disk.total_bytes)}"
            f" ({disk.used_percent:.0f} % used) at {disk.path}",
        )
    else:
        row("disk", f"unknown ({disk.path})")
    v = r.versions
    row(
        "versions",
        f"ppchat {v.ppchat}, llama-cpp-python {v.llama_cpp or 'not installed'}, Python {v.python}",
    )
    row(
        "generated",
        datetime.datetime.fromtimestamp(r.generated_at, tz=datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%SZ"
        ),
    )
    return "\n".join(lines)


def execute(args: argparse.Namespace) -> int:
    from agent.commands.common import load
    from agent.diagnostic import build_report, pid_of_snapshot_alive
    from agent.status import read_snapshot

    config = load(args)
    snap = read_snapshot(config.status_path)
    alive = pid_of_snapshot_alive(snap)
    answers = _socket_answers(config.socket_path) if config.socket.enabled else False
    report = build_report(config, snap=snap, alive=alive, socket_answers=answers, verify=bool(args.verify))
    if args.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        print(render(report))
    return report.exit_code
