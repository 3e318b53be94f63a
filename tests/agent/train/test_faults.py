"""The ledger and the adapter under SIGKILL at random points (see fault_zygote.py)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.train.export import read_lora_gguf
from agent.train.ledger import PrivacyLedger
from tests.agent.train.conftest import config_data

RUNS = 20
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_random_points(tmp_path: Path, demo: Any) -> None:
    data = config_data(
        tmp_path,
        demo.f16,
        train={
            "max_steps": 3,
            "batch_size": 8,
            "max_seq_len": 64,
            "checkpoint_every": 1,
            "threads": 1,
            "holdout_fraction": 0.1,
        },
        privacy={"accountants": ["rdp"]},
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    out = tmp_path / "runs.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.agent.train.fault_zygote",
            "--config",
            str(config),
            "--runs",
            str(RUNS),
            "--seed",
            "7",
            "--max-kill-s",
            "30",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=880,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == RUNS
    assert [r["problems"] for r in records] == [[]] * RUNS
    # The kills landed in every phase: some runs died after their charge, some completed.
    assert sum(r["killed"] for r in records) >= RUNS // 3
    # Some run continued a killed run's checkpoint under its charge (no new charge, and it finished).
    assert any(
        not r["killed"] and r["ledger_runs"] == prev["ledger_runs"] and prev["killed"]
        for prev, r in itertools.pairwise(records)
    )
    final = PrivacyLedger(Path(data["paths"]["state_dir"]) / "privacy" / "ledger.json").read()
    statuses = {r.status.value for r in final.runs}
    assert "completed" in statuses
    assert statuses & {"charged", "stopped", "failed"} or any(r["killed"] for r in records)
    adapter = Path(data["paths"]["state_dir"]) / "adapters" / "personal.gguf"
    assert adapter.exists()
    read_lora_gguf(adapter)
