"""``agent privacy [--json]``: the device's privacy budget, what was spent and when, what remains,
and what has left the device.

The spend is recomputed from the ledger's recorded runs with opacus's accountants (imported here, in
this short-lived process only), composed over the budget's rolling window.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

HELP = "show the privacy budget, what training spent and when, and what left the device"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help="agent config file (default: $PPCHAT_CONFIG or /etc/ppchat/agent.toml when it exists)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def report_data(report: Any) -> dict[str, Any]:
    """The JSON form of :class:`agent.train.ledger.PrivacyReport`."""
    data: dict[str, Any] = report.model_dump(mode="json")
    data["spent_epsilon"] = report.spent.epsilon
    return data


def _text(report: Any) -> str:
    b = report.budget
    name = b.preset.value if b.preset is not None else "custom"
    lines = [
        f"budget     {name}: epsilon {b.epsilon:g}, delta {b.delta:g} per {b.period_days:g} days",
        f"spent      epsilon {report.spent.epsilon:.4g} in the last {b.period_days:g} days"
        + (f" ({report.spent.accountant.value} accountant)" if report.spent.accountant else ""),
        f"remaining  epsilon {report.remaining:.4g}",
        f"runs       {len(report.runs_in_window)} in the window, {report.runs_total} recorded",
    ]
    for r in report.runs_in_window:
        m = r.mechanism
        lines.append(
            f"  {_when(r.charged_at)}  {r.adapter.value:<8} {r.status.value:<9} epsilon {r.epsilon_run:.4g}"
            f"  (noise {m.noise_multiplier:.3g}, q {m.sample_rate:.3g}, {r.steps_done}/{m.steps} steps)"
        )
    if report.egress:
        lines.append(f"left the device ({len(report.egress)}):")
        for e in report.egress:
            lines.append(
                f"  {_when(e.at)}  round {e.round_id}: {e.what}, {e.bytes} bytes,"
                f" norm bound {e.norm_bound:g}, epsilon {e.epsilon:.4g}"
            )
    else:
        lines.append("left the device: nothing")
    lines.append(f"ledger     {report.ledger_path}")
    return "\n".join(lines)


def execute(args: argparse.Namespace) -> int:
    from agent.commands.common import load
    from agent.train.ledger import PrivacyLedger

    cfg = load(args)
    ledger = PrivacyLedger(cfg.ledger_path)
    report = ledger.report(budget=cfg.privacy.budget, accountants=cfg.privacy.accountants)
    if args.json:
        print(json.dumps(report_data(report), indent=1))
    else:
        print(_text(report))
    sys.stdout.flush()
    return 0
