"""Write the trained model as a llama GGUF, laid out as llama.cpp's own converter writes it.

Tensor names come from gguf's tensor-name map; q and k projections get the converter's rope
permutation (transformers' rotate-half layout to llama.cpp's interleaved pairs: without it the file
loads and the logits are wrong); 1-D norms stay float32, matrices become float16.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

from agent.model import spec as s
from agent.model.vocab import Vocab

# Keys of the tensor map for the projections llama.cpp wants permuted.
_Q = "self_attn.q_proj.weight"
_K = "self_attn.k_proj.weight"


def permute_rope(weights: np.ndarray, *, n_head: int) -> np.ndarray:
    """Reorder the rows of a q/k projection from rotate-half pairs to adjacent pairs, per head."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute_rope(weights: np.ndarray, *, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rope`."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(tensors: Mapping[str, np.ndarray], model: s.ModelSpec) -> dict[str, np.ndarray]:
    """transformers-named float32 weights -> GGUF-named, permuted, typed arrays."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.num_layers)
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"no GGUF name for tensor {name}")
        data = np.asarray(array, dtype=np.float32)
        if name.endswith(_Q):
            data = permute_rope(data, n_head=model.num_heads)
        elif name.endswith(_K):
            data = permute_rope(data, n_head=model.num_kv_heads)
        out[new_name] = data if data.ndim == 1 else data.astype(np.float16)
    return out


def write_gguf(
    path: Path,
    *,
    name: str,
    model: s.ModelSpec,
    vocab: Vocab,
    tensors: Mapping[str, np.ndarray],
) -> None:
    """Write an f16 GGUF (``general.file_type`` MOSTLY_F16) at ``path``."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_description("ppchat's demo model: a tiny Llama trained on the project's own dialogue corpus")
    writer.add_context_length(model.context_length)
    writer.add_embedding_length(model.hidden_size)
    writer.add_block_count(model.num_layers)
    writer.add_feed_forward_length(model.intermediate_size)
    writer.add_head_count(model.num_heads)
    writer.add_head_count_kv(model.num_kv_heads)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_layer_norm_rms_eps(model.rms_norm_eps)
    writer.add_vocab_size(len(vocab))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.pieces())
    writer.add_token_scores(vocab.scores())
    writer.add_token_types([int(t) for t in vocab.token_types()])
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_eot_token_id(vocab.end_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(s.CHAT_TEMPLATE)

    for tensor_name, data in gguf_tensors(tensors, model).items():
        writer.add_tensor(tensor_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
