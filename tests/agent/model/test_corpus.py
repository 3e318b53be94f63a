"""The shipped dialogue corpus: regenerable, valid, with a held-out split."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ModelError
from agent.model import corpus, corpus_gen


def test_committed_corpus_is_what_the_generator_writes() -> None:
    assert corpus.CORPUS_PATH.read_bytes() == corpus_gen.render(corpus_gen.generate())


def test_corpus_has_a_few_hundred_dialogues_and_an_unseen_validation_split() -> None:
    dialogues = corpus.load_dialogues()
    train = corpus.split(dialogues, corpus.Split.TRAIN)
    val = corpus.split(dialogues, corpus.Split.VAL)
    assert 300 <= len(dialogues) <= 1000
    assert 30 <= len(val) < len(train) // 4
    train_questions = {t.content for d in train for t in d.messages if t.role.value == "user"}
    val_questions = {t.content for d in val for t in d.messages if t.role.value == "user"}
    assert not train_questions & val_questions
    assert len({d.id for d in dialogues}) == len(dialogues)


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '{"id": "x", "split": "train", "messages": []}',
        '{"id": "x", "split": "test", "messages": [{"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b"}]}',
        '{"id": "x", "split": "train", "messages": [{"role": "tool", "content": "a"}, '
        '{"role": "assistant", "content": "b"}]}',
    ],
)
def test_a_bad_corpus_line_is_a_model_error_naming_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "dialogues.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ModelError, match=r"dialogues\.jsonl:1"):
        corpus.load_dialogues(path)
