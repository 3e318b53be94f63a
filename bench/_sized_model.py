"""A random-weight Llama GGUF with the body of a 0.5B-class model, for benchmarks whose ratio depends on
how long one token takes.

The demo model decodes about 5,000 tokens/s here: a per-token cost the agent adds (a queue hop, a
detokenization, a socket write) weighs 250 times more against it than against the smallest model a
board really runs (Qwen2.5-0.5B at Q4_K_M: some 10 to 30 tokens/s on a Pi 5). This model has that
model's body (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4,864) on the demo vocabulary, with
random weights (N(0, 0.02)): it costs what such a model costs per token and says nothing sensible.
Built once (15 s here), quantized to Q4_K_M (250 MB), cached in ``~/.cache/ppchat/bench-model``.

    python -m bench._sized_model      # build (or find) it and print its path
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from agent.model import spec as s

SHAPE = s.ModelSpec(
    hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, context_length=2048
)
SEED = 5
NAME = "ppchat-bench-0.5b-shaped-random"


def _tensors(vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    m = SHAPE
    kv = m.num_kv_heads * m.head_dim

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    out = {
        "model.embed_tokens.weight": w(vocab_size, m.hidden_size),
        "model.norm.weight": np.ones(m.hidden_size, dtype=np.float32),
        "lm_head.weight": w(vocab_size, m.hidden_size),
    }
    for i in range(m.num_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = np.ones(m.hidden_size, dtype=np.float32)
        out[f"{p}.post_attention_layernorm.weight"] = np.ones(m.hidden_size, dtype=np.float32)
        out[f"{p}.self_attn.q_proj.weight"] = w(m.hidden_size, m.hidden_size)
        out[f"{p}.self_attn.k_proj.weight"] = w(kv, m.hidden_size)
        out[f"{p}.self_attn.v_proj.weight"] = w(kv, m.hidden_size)
        out[f"{p}.self_attn.o_proj.weight"] = w(m.hidden_size, m.hidden_size)
        out[f"{p}.mlp.gate_proj.weight"] = w(m.intermediate_size, m.hidden_size)
        out[f"{p}.mlp.up_proj.weight"] = w(m.intermediate_size, m.hidden_size)
        out[f"{p}.mlp.down_proj.weight"] = w(m.hidden_size, m.intermediate_size)
    return out


def ensure_sized_model() -> Path:
    """The Q4_K_M file (built on first use)."""
    from agent.model.demo import FILE_NAMES, default_cache_dir, ensure_demo_model
    from agent.model.export import write_gguf
    from agent.model.quantize import FileType, quantize
    from agent.model.vocab import Vocab

    demo = ensure_demo_model()
    demo_dir = Path(demo.q4_k_m).parent
    directory = default_cache_dir() / "bench-model" / demo_dir.name  # keyed by the demo's vocabulary
    target = directory / f"{NAME}-q4_k_m.gguf"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    vocab = Vocab((demo_dir / FILE_NAMES.tokenizer).read_bytes())
    print(f"[bench model] building {target.name} (random weights, 0.5B-class body) ...", flush=True)
    f16 = directory / f".{NAME}-f16.{os.getpid()}.gguf"
    partial = directory / f".{target.name}.{os.getpid()}.tmp"
    try:
        tensors = _tensors(len(vocab), np.random.default_rng(SEED))
        write_gguf(f16, name=NAME, model=SHAPE, vocab=vocab, tensors=tensors)
        del tensors
        quantize(f16, partial, FileType.MOSTLY_Q4_K_M, threads=os.cpu_count() or 2)
        os.replace(partial, target)
    finally:
        f16.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    print(ensure_sized_model())
    sys.exit(0)
