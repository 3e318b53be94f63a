"""The demo model's dialogue corpus, shipped in ``data/dialogues.jsonl`` (see :mod:`corpus_gen`)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import ModelError
from agent.generation import Role

CORPUS_PATH = Path(__file__).parent / "data" / "dialogues.jsonl"


class Split(str, Enum):
    TRAIN = "train"
    VAL = "val"


class Turn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str = Field(min_length=1, max_length=2000)


class Dialogue(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=100)
    split: Split
    messages: tuple[Turn, ...] = Field(min_length=2)


def load_dialogues(path: Path = CORPUS_PATH) -> tuple[Dialogue, ...]:
    """Every dialogue of the corpus file, validated."""
    dialogues: list[Dialogue] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelError(f"cannot read the demo corpus {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            dialogues.append(Dialogue.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ModelError(f"{path}:{number}: not a valid dialogue: {exc}") from exc
    return tuple(dialogues)


def split(dialogues: tuple[Dialogue, ...], which: Split) -> tuple[Dialogue, ...]:
    return tuple(d for d in dialogues if d.split is which)


def texts(dialogues: tuple[Dialogue, ...]) -> list[str]:
    """Every message's text, in order (the tokenizer's training input)."""
    return [turn.content for d in dialogues for turn in d.messages]
