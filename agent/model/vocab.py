"""The demo model's vocabulary: SentencePiece BPE with byte fallback plus chat-turn tokens.

The piece table is laid out as llama's: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then the chat tokens,
the 256 byte pieces ``<0x00>``..``<0xFF>`` and the learned pieces. No space prefix is added to text
(``add_dummy_prefix`` off here, ``tokenizer.ggml.add_space_prefix`` false in the GGUF), so
llama.cpp tokenizes a rendered chat prompt into exactly :meth:`Vocab.encode_dialogue`'s ids.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import sentencepiece as spm

from agent.model import spec as s
from agent.model.corpus import Dialogue


class TokenType(IntEnum):
    """As GGUF's ``tokenizer.ggml.token_type`` (and SentencePiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


def train_vocab(texts: Iterable[str], vocab: s.VocabSpec) -> bytes:
    """Train the SentencePiece model; returns its serialized proto. Deterministic."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab.vocab_size,
        character_coverage=vocab.character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=s.UNK,
        bos_piece=s.BOS,
        eos_piece=s.EOS,
        control_symbols=list(s.CHAT_TOKENS),
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


@dataclass(frozen=True)
class EncodedDialogue:
    ids: tuple[int, ...]
    labels: tuple[bool, ...]
    """True where the token is an assistant's (content or its ``<|end|>``): the loss is taken there."""


class Vocab:
    """A trained vocabulary: encoding for training and the tables for GGUF."""

    def __init__(self, proto: bytes) -> None:
        self.proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.bos_id = self.piece_id(s.BOS)
        self.eos_id = self.piece_id(s.EOS)
        self.unk_id = self.piece_id(s.UNK)
        self.end_id = self.piece_id(s.END)
        self.role_ids = {role: self.piece_id(tok) for role, tok in s.ROLE_TOKENS.items()}

    def __len__(self) -> int:
        return int(self._sp.get_piece_size())

    def piece_id(self, piece: str) -> int:
        pid = int(self._sp.piece_to_id(piece))
        if self._sp.id_to_piece(pid) != piece:
            raise ValueError(f"piece {piece!r} is not in the vocabulary")
        return pid

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._sp.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode(list(ids)))

    def encode_dialogue(self, dialogue: Dialogue) -> EncodedDialogue:
        """Tokens of the dialogue rendered with :data:`spec.CHAT_TEMPLATE`."""
        ids = [self.bos_id]
        labels = [False]
        for turn in dialogue.messages:
            body = [self.role_ids[turn.role.value], *self.encode(turn.content), self.end_id]
            is_reply = turn.role.value == "assistant"
            ids.extend(body)
            labels.extend([False] + [is_reply] * (len(body) - 1))
        return EncodedDialogue(tuple(ids), tuple(labels))

    def pieces(self) -> list[str]:
        return [str(self._sp.id_to_piece(i)) for i in range(len(self))]

    def scores(self) -> list[float]:
        return [float(self._sp.get_score(i)) for i in range(len(self))]

    def token_types(self) -> list[TokenType]:
        types: list[TokenType] = []
        for i in range(len(self)):
            if self._sp.is_unknown(i):
                types.append(TokenType.UNKNOWN)
            elif self._sp.is_control(i):
                types.append(TokenType.CONTROL)
            elif self._sp.is_byte(i):
                types.append(TokenType.BYTE)
            elif self._sp.is_unused(i):
                types.append(TokenType.UNUSED)
            else:
                types.append(TokenType.NORMAL)
        return types
