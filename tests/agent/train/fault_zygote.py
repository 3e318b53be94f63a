"""The SIGKILL fault harness (run by test_faults.py in its own process).

It imports the trainer once (torch, peft, opacus: no torch op runs here), then for each run forks a
child that trains, kills it with SIGKILL after a random delay (or lets it finish), and checks the
state it left behind:

- the ledger reads (never torn) and holds, for every step a child reported training, a run charged
  for at least that many steps (children report each step, fsynced, after taking it);
- every window of the ledger stays within the budget;
- the adapter file, if present, reads as a whole GGUF adapter (the old or the new one, never torn);
- the checkpoint, if present, reads.

Run 0 is never killed: it times a whole run, and later runs are killed at a uniformly random point
of up to 1.2 times that. Each run's clock is 31 days after the previous one, so each fresh run has
the budget to itself; a killed run's checkpoint is resumed by the next run under its original
charge and data window.
Writes one JSON line per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

DAY = 86400.0


def check(cfg: Any, progress: Path) -> list[str]:
    from agent.errors import AgentError
    from agent.train.checkpoint import load_checkpoint
    from agent.train.export import read_lora_gguf
    from agent.train.ledger import PrivacyLedger, historic_window_spend

    problems: list[str] = []
    try:
        state = PrivacyLedger(cfg.ledger_path).read()
    except AgentError as exc:
        return [f"ledger unreadable: {exc}"]
    trained: dict[str, int] = {}
    if progress.exists():
        for line in progress.read_text().splitlines():
            rid, done = line.split()
            trained[rid] = max(trained.get(rid, 0), int(done))
    for run_id, steps in trained.items():
        run = state.run(run_id)
        if run is None:
            problems.append(f"run {run_id} trained {steps} steps but is not in the ledger")
        elif run.mechanism.steps < steps:
            problems.append(f"run {run_id} trained {steps} steps, charged for {run.mechanism.steps}")
    budget = cfg.privacy.budget
    for run in state.runs:
        spend = historic_window_spend(
            state, budget=budget, end=run.charged_at, accountants=cfg.privacy.accountants
        )
        if spend.epsilon > budget.epsilon:
            problems.append(f"window ending {run.charged_at} spends {spend.epsilon} > {budget.epsilon}")
    adapter = cfg.adapters_dir / "personal.gguf"
    if adapter.exists():
        try:
            read_lora_gguf(adapter)
        except AgentError as exc:
            problems.append(f"adapter torn: {exc}")
    try:
        load_checkpoint(cfg.train_dir / "personal")
    except AgentError as exc:
        problems.append(f"checkpoint torn: {exc}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, required=True, help="config data as JSON")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-kill-s", type=float, default=8.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    # What the trainer imports lazily, imported once here (no torch op runs before the forks).
    import gguf  # noqa: F401
    import opacus  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from agent.config import parse_config
    from agent.errors import AgentError
    from agent.train.dataset import ListSource
    from agent.train.trainer import TrainRequest, train
    from tests.agent.train.conftest import private_conversations

    cfg = parse_config(json.loads(args.config.read_text()))
    rng = random.Random(args.seed)
    base = time.time() - args.runs * 31 * DAY
    conversations = []
    for i in range(args.runs):
        conversations += private_conversations(48, seed=100 + i, start=base + i * 31 * DAY - DAY)
    source = ListSource(conversations)
    progress = args.out.with_name("progress.log")
    full_run = args.max_kill_s
    with args.out.open("w") as out:
        for i in range(args.runs):
            now = base + i * 31 * DAY
            # Run 0 completes and times a whole run; the kills then land anywhere in one.
            kill_after = 3600.0 if i == 0 else rng.uniform(0.0, min(args.max_kill_s, 1.2 * full_run))
            started = time.monotonic()
            pid = os.fork()
            if pid == 0:  # the child: one training run
                code = 99
                try:
                    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

                    def on_step(run_id: str, steps: int, fd: int = fd) -> None:
                        os.write(fd, f"{run_id} {steps}\n".encode())
                        os.fsync(fd)

                    def clock(now: float = now) -> float:
                        return now

                    train(cfg, TrainRequest(), source=source, clock=clock, on_step=on_step)
                    code = 0
                except AgentError as exc:
                    code = exc.exit_code
                finally:
                    os._exit(code)
            deadline = time.monotonic() + kill_after
            status: int | None = None
            while time.monotonic() < deadline:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                    break
                time.sleep(0.02)
            if i == 0:
                full_run = time.monotonic() - started
            killed = status is None
            if status is None:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
            problems = check(cfg, progress)
            from agent.train.ledger import PrivacyLedger

            runs = PrivacyLedger(cfg.ledger_path).read().runs if not problems else ()
            record = {
                "run": i,
                "kill_after": round(kill_after, 2),
                "killed": killed,
                "exit": None if killed else os.waitstatus_to_exitcode(status),
                "problems": problems,
                "ledger_runs": len(runs),
                "statuses": [r.status.value for r in runs],
                "adapter": (cfg.adapters_dir / "personal.gguf").exists(),
            }
            out.write(json.dumps(record) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
