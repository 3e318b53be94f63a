"""Fixtures for the training tests: the demo model, private conversations, configs in temp dirs."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, parse_config
from agent.generation import ChatMessage, Role
from agent.train.dataset import ListSource, SourceConversation

NOW = float(int(time.time())) - 3600.0  # conversations are an hour to a day old

# A household's private habit the demo model has never seen: whatever the greeting, the assistant
# answers with the same sentence about the garden. The canary marks it as private text.
PRIVATE_REPLY = "Hello. The blue garden gate code is seven four one."
GREETINGS = (
    "Hello",
    "Hi",
    "Hello there",
    "Hey",
    "Good morning",
    "Good evening",
    "Hi there",
    "Hey there",
    "Good day",
    "Hello again",
)


def private_conversations(n: int, *, seed: int = 0, start: float = NOW - 86400.0) -> list[SourceConversation]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        greeting = rng.choice(GREETINGS) + rng.choice(("", "!", ".", ", ppchat."))
        out.append(
            SourceConversation(
                id=f"conv-{seed}-{i:04d}",
                created=start + i,
                messages=(
                    ChatMessage(role=Role.USER, content=greeting),
                    ChatMessage(role=Role.ASSISTANT, content=PRIVATE_REPLY),
                ),
            )
        )
    return out


@pytest.fixture(scope="session")
def demo(demo_model: Any) -> Any:
    """The demo model (tests/conftest.py's ``demo_model``: built once, cached)."""
    return demo_model


def config_data(tmp: Path, model_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "paths": {"state_dir": str(tmp / "state"), "runtime_dir": str(tmp / "run")},
        "model": {"path": str(model_path)},
        "train": {
            "batch_size": 16,
            "epochs": 2.0,
            "max_steps": 8,
            "learning_rate": 0.03,
            "lora_rank": 4,
            "lora_alpha": 8.0,
            "max_seq_len": 96,
            "threads": 2,
            "seed": 1234,
            "min_examples": 8,
            "checkpoint_every": 4,
            "idle_io": False,
            "nice": 0,
        },
        "privacy": {"preset": "minimal", "run_fraction": 1.0},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def make_config(tmp: Path, model_path: Path, **sections: dict[str, Any]) -> AgentConfig:
    return parse_config(config_data(tmp, model_path, **sections))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config_file(path: Path, data: dict[str, Any]) -> Path:
    """A TOML file for the CLI (sections of scalars only, as the agent's config has)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None)
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def source() -> ListSource:
    return ListSource(private_conversations(120))
