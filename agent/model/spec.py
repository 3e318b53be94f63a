"""What the demo model is: vocabulary, chat format and hyperparameters, as data.

Everything here feeds the build key (:mod:`agent.model.demo`): change a number and the cached
model is rebuilt.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
"""Ends every turn; llama.cpp treats it as end of generation (``tokenizer.ggml.eot_token_id``)."""

ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TOKENS: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, END)

# Jinja, as llama-cpp-python and transformers render it. It emits the BOS token itself because
# llama-cpp-python formats chat prompts without adding one. Turns are
# ``<|role|>content<|end|>`` with nothing in between: the vocabulary adds no space prefix, so the
# tokens of a rendered conversation are exactly the concatenation the model was trained on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('demo model: unsupported role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class VocabSpec(BaseModel):
    """SentencePiece BPE training settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(default=1024, ge=300, le=32000)
    character_coverage: float = Field(default=1.0, gt=0.0, le=1.0)


class ModelSpec(BaseModel):
    """A Llama-architecture transformer (sizes as in ``LlamaConfig``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(default=256, ge=64)
    intermediate_size: int = Field(default=512, ge=64)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    num_kv_heads: int = Field(default=2, ge=1)
    context_length: int = Field(default=1024, ge=64)
    rope_theta: float = Field(default=10000.0, gt=0.0)
    rms_norm_eps: float = Field(default=1e-5, gt=0.0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class TrainSpec(BaseModel):
    """The training run: fixed steps (not a time budget) so the result is deterministic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 1234
    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0.0)
    min_learning_rate: float = Field(default=3e-4, ge=0.0)
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    max_seq_len: int = Field(default=384, ge=16)
    threads: int = Field(default=2, ge=1)


class DemoSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "ppchat-demo"
    vocab: VocabSpec = VocabSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()


DEFAULT_SPEC = DemoSpec()
