"""The real demo model through real llama.cpp: vocabulary, logits, quantizations, chat, manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from agent.model import corpus
from agent.model.demo import DemoModel, build_key
from agent.model.export import unpermute_rope, write_gguf
from agent.model.info import read_gguf_info
from agent.model.vocab import Vocab

llama_cpp = pytest.importorskip("llama_cpp")

# ggml tensor types
Q8_0, Q4_K, Q6_K, F16 = 8, 12, 14, 1


def _llama(path: Path, **kwargs: Any) -> Any:
    return llama_cpp.Llama(model_path=str(path), n_threads=2, verbose=False, seed=0, **kwargs)


@pytest.fixture(scope="module")
def vocab(demo_model: DemoModel) -> Vocab:
    return Vocab(demo_model.tokenizer.read_bytes())


@pytest.fixture(scope="module")
def vocab_only(demo_model: DemoModel) -> Iterator[Any]:
    llm = _llama(demo_model.f16, vocab_only=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def f16(demo_model: DemoModel) -> Iterator[Any]:
    llm = _llama(demo_model.f16, n_ctx=512, logits_all=True)
    yield llm
    llm.close()


def test_manifest_matches_the_files(demo_model: DemoModel) -> None:
    manifest = demo_model.verify()
    assert manifest.key == demo_model.key == build_key()
    for path in (demo_model.f16, demo_model.q8_0, demo_model.q4_k_m):
        assert path.name in manifest.files
    assert manifest.train.train_loss < manifest.train.first_loss / 3


def _corpus_lines() -> list[str]:
    return sorted(set(corpus.texts(corpus.load_dialogues())))


EXTRA_TEXTS = [
    "",
    " ",
    "  two  spaces  ",
    "line one\nline two\ttab",
    "Ünïcödé, 日本語 and an emoji 🙂",
    "<|end|> typed by a user is plain text",
    "12345 + 67890 = 80235",
    "CamelCase_snake-case.dotted/slash",
]


def test_llama_cpp_tokenizes_like_sentencepiece(vocab: Vocab, vocab_only: Any) -> None:
    for text in _corpus_lines() + EXTRA_TEXTS:
        ours = vocab.encode(text)
        theirs = vocab_only.tokenize(text.encode(), add_bos=False, special=False)
        assert theirs == ours, text
        assert vocab_only.detokenize(theirs).decode() == text


def test_the_chat_template_renders_the_training_tokens(
    demo_model: DemoModel, vocab: Vocab, vocab_only: Any
) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    info = read_gguf_info(demo_model.f16)
    template = info.metadata["tokenizer.chat_template"]
    assert isinstance(template, str)
    formatter = Jinja2ChatFormatter(
        template=template, eos_token="</s>", bos_token="<s>", add_generation_prompt=False
    )
    for dialogue in corpus.load_dialogues()[::25]:
        messages: list[Any] = [{"role": t.role.value, "content": t.content} for t in dialogue.messages]
        prompt = formatter(messages=messages).prompt
        # llama-cpp-python tokenizes chat prompts without adding BOS: the template must emit it.
        tokens = vocab_only.tokenize(prompt.encode(), add_bos=False, special=True)
        assert tokens == list(vocab.encode_dialogue(dialogue).ids)
    asking = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    prompt = asking(messages=[{"role": "user", "content": "Hi"}]).prompt
    assert prompt == "<s><|user|>Hi<|end|><|assistant|>"


def test_end_of_turn_ends_generation(vocab: Vocab, vocab_only: Any) -> None:
    model_vocab = llama_cpp.llama_model_get_vocab(vocab_only.model)
    assert llama_cpp.llama_vocab_is_eog(model_vocab, vocab.end_id)
    assert llama_cpp.llama_vocab_is_eog(model_vocab, vocab.eos_id)
    assert not llama_cpp.llama_vocab_is_eog(model_vocab, vocab.role_ids["assistant"])
    assert vocab_only.token_bos() == vocab.bos_id


def test_llama_cpp_logits_match_torch(demo_model: DemoModel, f16: Any) -> None:
    reference = load_file(str(demo_model.reference))
    tokens = [int(t) for t in reference["tokens"]]
    expected = reference["logits"]
    f16.reset()
    f16.eval(tokens)
    actual = np.asarray(f16.scores[: len(tokens)], dtype=np.float32)
    assert actual.shape == expected.shape
    diff = np.abs(actual - expected)
    # f16 activations and KV cache in ggml against float32 in torch: small, not zero (measured:
    # mean 0.0006, max 0.04 over 186 tokens; without the rope permutation the max is over 1).
    assert diff.max() < 0.15, diff.max()
    assert diff.mean() < 0.005, diff.mean()
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() > 0.99


def test_without_the_rope_permutation_the_logits_are_wrong(
    demo_model: DemoModel, vocab: Vocab, tmp_path: Path
) -> None:
    """The check above has teeth: the same weights written without the q/k permutation load fine
    in llama.cpp and give different logits."""
    manifest = demo_model.load_manifest()
    weights = load_file(str(demo_model.hf_dir / "model.safetensors"))
    heads = {
        "q_proj.weight": manifest.spec.model.num_heads,
        "k_proj.weight": manifest.spec.model.num_kv_heads,
    }
    unpermuted = dict(weights)
    for name, value in weights.items():
        n_head = heads.get(name.rsplit(".", 2)[-2] + ".weight")
        if n_head is not None:  # write_gguf permutes again: the file ends up with rotate-half rows
            unpermuted[name] = unpermute_rope(value, n_head=n_head)
    broken = tmp_path / "broken.gguf"
    write_gguf(broken, name="broken", model=manifest.spec.model, vocab=vocab, tensors=unpermuted)
    reference = load_file(str(demo_model.reference))
    tokens = [int(t) for t in reference["tokens"]]
    llm = _llama(broken, n_ctx=256, logits_all=True)
    try:
        llm.eval(tokens)
        actual = np.asarray(llm.scores[: len(tokens)])
    finally:
        llm.close()
    assert np.abs(actual - reference["logits"]).max() > 1.0


@pytest.mark.parametrize(
    ("attr", "file_type", "types"),
    [("q8_0", "MOSTLY_Q8_0", {Q8_0}), ("q4_k_m", "MOSTLY_Q4_K_M", {Q4_K, Q6_K})],
)
def test_quantized_files_load_and_say_what_they_are(
    demo_model: DemoModel, f16: Any, attr: str, file_type: str, types: set[int]
) -> None:
    path = getattr(demo_model, attr)
    info = read_gguf_info(path)
    assert info.file_type == file_type
    matrices = {t.ggml_type for t in info.tensors if len(t.shape) == 2}
    assert types <= matrices
    assert F16 not in matrices
    reference = load_file(str(demo_model.reference))
    tokens = [int(t) for t in reference["tokens"]][:64]
    llm = _llama(path, n_ctx=256, logits_all=True)
    try:
        assert llm.metadata["general.file_type"] == str(info.metadata["general.file_type"])
        llm.eval(tokens)
        quantized = np.asarray(llm.scores[: len(tokens)])
    finally:
        llm.close()
    expected = reference["logits"][:64]
    assert (quantized.argmax(-1) == expected.argmax(-1)).mean() > 0.8


QUESTIONS = [
    ("What are you?", ("ppchat", "assistant", "device")),
    ("Is my data private?", ("device",)),
    ("How do you learn?", ("train", "idle")),
    ("Hello!", ("help",)),
    ("Write me a poem about the sea.", ("small",)),
]


@pytest.mark.parametrize("attr", ["f16", "q4_k_m"])
def test_greedy_chat_replies_are_on_topic(demo_model: DemoModel, attr: str) -> None:
    llm = _llama(getattr(demo_model, attr), n_ctx=512)
    try:
        for question, words in QUESTIONS:
            reply = llm.create_chat_completion(
                messages=[{"role": "user", "content": question}], temperature=0.0, max_tokens=64
            )
            choice = reply["choices"][0]
            text = choice["message"]["content"]
            assert choice["finish_reason"] == "stop", text  # stopped at <|end|>
            assert text == text.strip() and "<|" not in text
            assert any(w.lower() in text.lower() for w in words), (question, text)
    finally:
        llm.close()


def test_a_later_turn_answers_its_own_question(demo_model: DemoModel) -> None:
    llm = _llama(demo_model.q8_0, n_ctx=1024)
    messages: list[Any] = [
        {"role": "system", "content": "You are ppchat, a private assistant running on this device."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! I am ppchat. How can I help you today?"},
        {"role": "user", "content": "Do you work offline?"},
        {
            "role": "assistant",
            "content": "Yes, I work offline. I need no internet connection to chat with you.",
        },
        {"role": "user", "content": "How do you learn?"},
    ]
    try:
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=64)
    finally:
        llm.close()
    # A tiny model: later turns answer their own question most of the time, not always.
    assert "train" in reply["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_transformers_loads_the_gguf_back_to_the_same_weights(demo_model: DemoModel) -> None:
    """The path the LoRA trainer takes: transformers reads the GGUF and undoes the rope permutation."""
    code = """
import sys, numpy as np, torch
from pathlib import Path
from safetensors.numpy import load_file
from transformers import LlamaForCausalLM
f16 = Path(sys.argv[1])
model = LlamaForCausalLM.from_pretrained(str(f16.parent), gguf_file=f16.name, dtype=torch.float32)
expected = load_file(sys.argv[2])
state = model.state_dict()
assert set(expected) == set(state), set(expected) ^ set(state)
for name, value in expected.items():
    got = state[name].numpy()
    assert np.array_equal(got, value.astype(np.float32)), name
"""
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(
        [sys.executable, "-c", code, str(demo_model.f16), str(demo_model.hf_dir / "model.safetensors")],
        check=True,
        env=env,
        timeout=240,
    )
