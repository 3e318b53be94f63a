"""A tiny random Qwen2 GGUF (f32) with the demo model's vocabulary, for the export tests.

Qwen2 differs from llama where it matters to adapters: q/k/v carry biases and llama.cpp does *not*
permute its q/k rows (NEOX rope). The weights are random; only the equivalence of logits matters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_qwen2_gguf(vocab_source: Path, out: Path, *, seed: int = 0) -> Path:
    import gguf
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    reader = gguf.GGUFReader(vocab_source)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    cfg = Qwen2Config(
        vocab_size=n_vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.shape[0] == cfg.hidden_size:
                continue  # norms stay at one
            p.normal_(0.0, 0.08)
    writer = gguf.GGUFWriter(out, "qwen2")
    writer.add_name("qwen2-test")
    writer.add_context_length(512)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)  # all f32
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        writer.add_tensor(name, np.ascontiguousarray(tensor.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
