"""Train the demo model with torch (the only module of the builder that imports torch).

A transformers ``LlamaForCausalLM`` is trained from scratch on the rendered corpus, the loss taken
on the assistant's tokens only, with fixed seeds and a fixed number of steps, so one machine gets
the same weights every time.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agent.model import spec as s
from agent.model.vocab import EncodedDialogue

IGNORE = -100


@dataclass(frozen=True)
class TrainResult:
    config: dict[str, object]
    """The ``LlamaConfig`` as a dict (``config.json``)."""
    tensors: dict[str, np.ndarray]
    """float32 weights by transformers name (no q/k permutation)."""
    train_loss: float
    val_loss: float
    first_loss: float
    steps: int
    tokens_seen: int
    seconds: float


def llama_config(model: s.ModelSpec, *, vocab_size: int, bos_id: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        max_position_embeddings=model.context_length,
        rms_norm_eps=model.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


def _batches(
    data: Sequence[EncodedDialogue], *, batch_size: int, rng: random.Random
) -> list[list[EncodedDialogue]]:
    """One epoch of batches: shuffled, then grouped by length within chunks to cut padding."""
    order = list(data)
    rng.shuffle(order)
    chunk = batch_size * 8
    batches: list[list[EncodedDialogue]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda e: len(e.ids))
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def _tensors(
    batch: Sequence[EncodedDialogue], *, pad_id: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    width = min(max(len(e.ids) for e in batch), max_len)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = min(len(e.ids), width)
        seq = torch.tensor(e.ids[:n], dtype=torch.long)
        ids[row, :n] = seq
        mask = torch.tensor(e.labels[:n], dtype=torch.bool)
        labels[row, :n] = torch.where(mask, seq, torch.full_like(seq, IGNORE))
    return ids, labels


def _lr(step: int, t: s.TrainSpec) -> float:
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_learning_rate + 0.5 * (t.learning_rate - t.min_learning_rate) * (
        1 + math.cos(math.pi * progress)
    )


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, data: Sequence[EncodedDialogue], *, pad_id: int, max_len: int) -> float:
    """Mean loss per assistant token."""
    model.train(False)
    total = 0.0
    count = 0
    ordered = sorted(data, key=lambda e: len(e.ids))
    for start in range(0, len(ordered), 32):
        ids, labels = _tensors(ordered[start : start + 32], pad_id=pad_id, max_len=max_len)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += float(loss)
        count += int((target != IGNORE).sum())
    model.train()
    return total / max(1, count)


def train(
    *,
    model_spec: s.ModelSpec,
    train_spec: s.TrainSpec,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    train_data: Sequence[EncodedDialogue],
    val_data: Sequence[EncodedDialogue],
    progress: Callable[[str], None],
) -> TrainResult:
    t = train_spec
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    rng = random.Random(t.seed)
    config = llama_config(model_spec, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    started = time.monotonic()
    first_loss = float("nan")
    recent: list[float] = []
    tokens = 0
    queue: list[list[EncodedDialogue]] = []
    for step in range(t.steps):
        if not queue:
            queue = _batches(train_data, batch_size=t.batch_size, rng=rng)
        batch = queue.pop()
        ids, labels = _tensors(batch, pad_id=eos_id, max_len=t.max_seq_len)
        for group in opt.param_groups:
            group["lr"] = _lr(step, t)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        tokens += int(ids.numel())
        if step == 0:
            first_loss = value
        recent = [*recent[-19:], value]
        if step % 50 == 0 or step == t.steps - 1:
            progress(
                f"step {step + 1}/{t.steps} loss {sum(recent) / len(recent):.3f} "
                f"({time.monotonic() - started:.0f} s)"
            )
    train_loss = evaluate(model, train_data, pad_id=eos_id, max_len=t.max_seq_len)
    val_loss = evaluate(model, val_data, pad_id=eos_id, max_len=t.max_seq_len)
    seconds = time.monotonic() - started
    progress(
        f"trained {t.steps} steps in {seconds:.0f} s: train loss {train_loss:.3f}, val loss {val_loss:.3f}"
    )
    tensors = {name: p.detach().to(torch.float32).numpy().copy() for name, p in model.state_dict().items()}
    return TrainResult(
        config=config.to_dict(),
        tensors=tensors,
        train_loss=train_loss,
        val_loss=val_loss,
        first_loss=first_loss,
        steps=t.steps,
        tokens_seen=tokens,
        seconds=seconds,
    )


@torch.no_grad()
def reference_logits(
    config: dict[str, object], tensors: dict[str, np.ndarray], ids: Sequence[int]
) -> np.ndarray:
    """float32 logits ``[len(ids), vocab]`` of the model with exactly these weights (the GGUF's values)."""
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    state = {name: torch.from_numpy(np.asarray(value, dtype=np.float32)) for name, value in tensors.items()}
    model.load_state_dict(state, strict=True)
    model.train(False)
    logits = model(input_ids=torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return np.asarray(logits.to(torch.float32).numpy(), dtype=np.float32).copy()
