"""The chat daemon never loads the training stack: torch, peft, opacus and transformers load only in
the training process (``agent train``) and the demo-model builder."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "peft", "opacus", "transformers", "sentencepiece")

# Everything `agent run` may import, the fleet client and release installer included.
DAEMON_MODULES = (
    "agent.cli",
    "agent.commands.run",
    "agent.commands.chat",
    "agent.commands.status",
    "agent.daemon",
    "agent.chat",
    "agent.engine.llama_backend",
    "agent.socket_server",
    "agent.wyoming_door",
    "agent.mqtt_chat",
    "agent.fleet_client",
    "agent.fleet_adapter",
    "agent.scheduler",
    "agent.trainer_control",
    "agent.diagnostic",
    "agent.train.ledger",
)


def test_the_daemon_import_closure_has_no_training_stack() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {DAEMON_MODULES!r}: importlib.import_module(m)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
