"""Adapter export: llama.cpp with the exported GGUF gives the peft model's logits; the file layout,
the rope permutation, the FFA generator and the export guard."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.errors import AdapterError
from agent.generation import ChatMessage, Role
from agent.train.export import (
    LoraAdapterFile,
    LoraPair,
    check_trained,
    read_lora_gguf,
    rope_permute_rows,
    rope_unpermute_rows,
    write_lora_gguf,
)
from agent.train.ffa import frozen_a
from agent.train.kinds import AdapterKind
from agent.train.lora import (
    LoraSettings,
    adapter_file,
    attach_lora,
    b_matrices,
    load_base_model,
    lora_weights,
)

ALL_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def prompt(demo: Any) -> list[int]:
    from agent.train.tokenizer import ChatTokenizer, LlamaVocab

    vocab = LlamaVocab(demo.f16)
    try:
        return ChatTokenizer(vocab).prompt_tokens(
            [
                ChatMessage(role=Role.SYSTEM, content="You are ppchat."),
                ChatMessage(role=Role.USER, content="Where do my conversations stay?"),
            ]
        )
    finally:
        vocab.close()


def _llama_logits(model_path: Path, tokens: list[int], lora: Path | None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
        lora_path=None if lora is None else str(lora),
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def model_files(demo: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GGUF per supported architecture: the demo model (llama) and a random tiny qwen2."""
    from tests.agent.train.qwen2_model import build_qwen2_gguf

    qwen2 = build_qwen2_gguf(demo.f16, tmp_path_factory.mktemp("qwen2") / "qwen2-test.gguf")
    return {"llama": demo.f16, "qwen2": qwen2}


@pytest.mark.parametrize(
    ("arch", "kind"),
    [("llama", AdapterKind.PERSONAL), ("llama", AdapterKind.FLEET), ("qwen2", AdapterKind.PERSONAL)],
)
def test_llama_cpp_with_the_exported_adapter_matches_peft(
    model_files: dict[str, Path], prompt: list[int], tmp_path: Path, arch: str, kind: AdapterKind
) -> None:
    model_path = model_files[arch]
    model, info = load_base_model(gguf_path=model_path, base_weights_dir=None)
    assert info.architecture == arch
    settings = LoraSettings(
        kind=kind,
        rank=4,
        alpha=8.0,
        target_modules=ALL_ATTENTION,
        ffa_seed=11 if kind is AdapterKind.FLEET else None,
    )
    torch.manual_seed(0)
    peft_model, targets = attach_lora(model, info, settings)
    with torch.no_grad():
        base = peft_model(input_ids=torch.tensor([prompt])).logits[0].numpy()
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
        tuned = peft_model(input_ids=torch.tensor([prompt])).logits[0].numpy()
    weights = lora_weights(peft_model, targets)
    path = tmp_path / "adapter.gguf"
    write_lora_gguf(path, adapter_file(weights, targets, info, alpha=8.0, name="test"))

    llama_base = _llama_logits(model_path, prompt, None)
    llama_tuned = _llama_logits(model_path, prompt, path)
    effect = np.abs(tuned - base).max()
    assert effect > 1.0  # the adapter matters ...
    # ... and llama.cpp applies it as peft does (f16/f32 weights: small rounding differences only).
    assert np.abs(llama_base - base).max() < 0.02
    tolerance = 0.02 + 0.01 * effect
    assert np.abs(llama_tuned - tuned).max() < tolerance
    # The same next token wherever peft's choice is not a near-tie that rounding may flip.
    top2 = np.sort(tuned, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert clear.sum() >= len(prompt) // 2
    assert (llama_tuned.argmax(-1) == tuned.argmax(-1))[clear].all()

    if arch == "llama":
        # Negative control: without llama's q/k rope permutation of B the logits are off.
        wrong = adapter_file(weights, targets, info, alpha=8.0, name="wrong")
        unpermuted = {}
        for name, pair in wrong.pairs.items():
            heads = {"attn_q": info.n_head, "attn_k": info.n_head_kv}.get(name.split(".")[2])
            b = rope_unpermute_rows(pair.b, heads) if heads else pair.b
            unpermuted[name] = LoraPair(a=pair.a, b=b)
        bad_path = tmp_path / "wrong.gguf"
        write_lora_gguf(bad_path, LoraAdapterFile("llama", 8.0, unpermuted))
        assert np.abs(_llama_logits(model_path, prompt, bad_path) - tuned).max() > 0.1 * effect


def test_fleet_init_b_round_trips(demo: Any) -> None:
    model, info = load_base_model(gguf_path=demo.f16, base_weights_dir=None)
    settings = LoraSettings(
        kind=AdapterKind.FLEET, rank=4, alpha=8.0, target_modules=ALL_ATTENTION, ffa_seed=3
    )
    _, targets = attach_lora(model, info, settings)
    rng = np.random.default_rng(0)
    init = {f"{t.gguf_name}.lora_b": rng.normal(size=(t.out_features, 4)).astype(np.float32) for t in targets}
    model2, _ = load_base_model(gguf_path=demo.f16, base_weights_dir=None)
    peft2, targets2 = attach_lora(model2, info, settings, init_b=init)
    again = b_matrices(lora_weights(peft2, targets2), targets2, info)
    assert all(np.array_equal(again[k], init[k]) for k in init)
    trainable = [n for n, p in peft2.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)  # A is frozen
    model3, _ = load_base_model(gguf_path=demo.f16, base_weights_dir=None)
    with pytest.raises(AdapterError):
        attach_lora(model3, info, settings, init_b={"nope.lora_b": np.zeros((1, 4), np.float32)})


def test_write_read_round_trip_and_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pairs = {
        "blk.0.attn_q.weight": LoraPair(
            a=rng.normal(size=(2, 8)).astype(np.float32), b=rng.normal(size=(8, 2)).astype(np.float32)
        )
    }
    path = tmp_path / "a.gguf"
    write_lora_gguf(path, LoraAdapterFile("llama", 4.0, pairs, name="x"))
    back = read_lora_gguf(path)
    assert back.architecture == "llama" and back.alpha == 4.0 and back.name == "x"
    assert np.array_equal(back.pairs["blk.0.attn_q.weight"].a, pairs["blk.0.attn_q.weight"].a)
    assert np.array_equal(back.pairs["blk.0.attn_q.weight"].b, pairs["blk.0.attn_q.weight"].b)
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # no temporary left behind
    bad = {
        "blk.0.attn_q.weight": LoraPair(
            a=pairs["blk.0.attn_q.weight"].a, b=np.full((8, 2), np.nan, np.float32)
        )
    }
    with pytest.raises(AdapterError, match="non-finite"):
        write_lora_gguf(tmp_path / "b.gguf", LoraAdapterFile("llama", 4.0, bad))
    with pytest.raises(AdapterError, match="not supported"):
        write_lora_gguf(tmp_path / "c.gguf", LoraAdapterFile("gpt2", 4.0, pairs))
    with pytest.raises(AdapterError):
        LoraPair(a=np.zeros((2, 8), np.float32), b=np.zeros((8, 3), np.float32))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(AdapterError):
        read_lora_gguf(tmp_path / "junk.gguf")


def test_rope_permutation_is_llama_cpps_and_transformers_undoes_it() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    for heads in (1, 2, 4, 8):
        permuted = rope_permute_rows(w, heads)
        assert np.array_equal(rope_unpermute_rows(permuted, heads), w)
        undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads)  # type: ignore[no-untyped-call]
        assert np.array_equal(undone, w)
    with pytest.raises(AdapterError):
        rope_permute_rows(np.zeros((6, 2), np.float32), 4)


def test_frozen_a_is_a_fixed_function_of_seed_and_name() -> None:
    a = frozen_a(seed=42, name="blk.0.attn_q.weight", rank=4, in_features=256)
    assert a.shape == (4, 256) and a.dtype == np.float32
    # Pinned: the generator is a protocol between devices and the coordinator; changing it breaks rounds.
    assert hashlib.sha256(a.tobytes()).hexdigest()[:16] == "628169e1cc1048d6"
    bound = 1 / np.sqrt(256)
    assert np.abs(a).max() < bound and np.abs(a).max() > 0.95 * bound
    assert abs(float(a.std()) - bound / np.sqrt(3)) < 0.1 * bound
    assert np.array_equal(a, frozen_a(seed=42, name="blk.0.attn_q.weight", rank=4, in_features=256))
    assert not np.array_equal(a, frozen_a(seed=43, name="blk.0.attn_q.weight", rank=4, in_features=256))
    assert not np.array_equal(a, frozen_a(seed=42, name="blk.1.attn_q.weight", rank=4, in_features=256))
    with pytest.raises(ValueError):
        frozen_a(seed=-1, name="x", rank=1, in_features=1)


def _w(x: float) -> dict[str, np.ndarray]:
    return {"b": np.full((2, 2), x, np.float32)}


@pytest.mark.parametrize(
    ("before", "after", "loss_before", "loss_after", "ok", "reason"),
    [
        (_w(0.0), _w(0.1), 2.0, 1.5, True, "ok"),
        (_w(0.0), _w(0.0), 2.0, 1.5, False, "did not change"),
        (_w(0.0), {"b": np.array([[np.nan, 0], [0, 0]], np.float32)}, 2.0, 1.5, False, "non-finite"),
        (_w(0.0), _w(0.1), 2.0, 2.2, False, "rose"),
        (_w(0.0), _w(0.1), 2.0, 2.09, True, "ok"),
        (_w(0.0), _w(0.1), None, None, True, "ok"),
        (_w(0.0), _w(0.1), 2.0, float("nan"), False, "not finite"),
    ],
)
def test_export_guard(
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    loss_before: float | None,
    loss_after: float | None,
    ok: bool,
    reason: str,
) -> None:
    verdict = check_trained(
        before, after, holdout_before=loss_before, holdout_after=loss_after, max_increase=0.05
    )
    assert verdict.ok is ok
    assert reason in verdict.reason
