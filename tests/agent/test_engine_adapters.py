"""LoRA adapters attached, swapped and detached at runtime on the real demo model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from agent.config import ModelConfig
from agent.engine.llama_backend import LlamaEngine
from agent.errors import AdapterError
from agent.generation import ChatMessage, GenerationParams, Role, TokenDelta

MESSAGES = [
    ChatMessage(
        role=Role.SYSTEM, content="You are ppchat, a helpful assistant running privately on this device."
    ),
    ChatMessage(role=Role.USER, content="What can you do?"),
]


def _field_str(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def make_lora(
    base: Path,
    out: Path,
    *,
    seed: int,
    rank: int = 4,
    std: float = 0.3,
    targets: tuple[str, ...] = ("attn_q", "attn_v"),
    arch: str | None = None,
    wrong_shape: bool = False,
) -> Path:
    """A GGUF LoRA adapter for ``base``: ``blk.N.<target>.weight.lora_a`` (rank x n_in) and ``.lora_b``
    (n_out x rank) in numpy order, as llama.cpp's converter writes them."""
    reader = gguf.GGUFReader(base)
    base_arch = _field_str(reader, gguf.Keys.General.ARCHITECTURE)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, arch or base_arch)
    writer.add_string(gguf.Keys.General.TYPE, "adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    n = 0
    for tensor in reader.tensors:
        name = tensor.name
        if not any(name.endswith(f".{t}.weight") for t in targets):
            continue
        n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])
        a = (rng.standard_normal((rank, n_in + (1 if wrong_shape else 0))) * std).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * std).astype(np.float32)
        writer.add_tensor(f"{name}.lora_a", a)
        writer.add_tensor(f"{name}.lora_b", b)
        n += 1
    assert n > 0
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def model_path(demo_model: Any) -> Path:
    return Path(demo_model.q8_0)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine.load(ModelConfig(path=model_path, n_ctx=512, n_threads=2))
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def adapters(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    junk = d / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    return {
        "a": make_lora(model_path, d / "a.gguf", seed=1),
        "b": make_lora(model_path, d / "b.gguf", seed=2, targets=("attn_v", "ffn_down")),
        "wrong-shape": make_lora(model_path, d / "wrong-shape.gguf", seed=3, wrong_shape=True),
        "wrong-arch": make_lora(model_path, d / "wrong-arch.gguf", seed=4, arch="qwen2"),
        "junk": junk,
        "missing": d / "missing.gguf",
    }


async def greedy_text(engine: LlamaEngine) -> str:
    parts = []
    async for event in engine.stream_chat(
        MESSAGES, GenerationParams(max_tokens=16, temperature=0), fairness_key="t"
    ):
        if isinstance(event, TokenDelta):
            parts.append(event.text)
    return "".join(parts)


def max_diff(x: list[float], y: list[float]) -> float:
    return float(np.max(np.abs(np.asarray(x) - np.asarray(y))))


async def test_attach_swap_detach_changes_logits_and_restores_them_exactly(
    engine: LlamaEngine, adapters: dict[str, Path]
) -> None:
    base = await engine.logits(MESSAGES)
    base_text = await greedy_text(engine)

    await engine.set_adapters([(adapters["a"], 1.0)])
    assert engine.adapters == ((adapters["a"], 1.0),)
    with_a = await engine.logits(MESSAGES)
    assert max_diff(base, with_a) > 0.05

    await engine.set_adapters([(adapters["a"], 0.5)])  # same file, new scale: no reload
    half_a = await engine.logits(MESSAGES)
    assert max_diff(base, half_a) > 0 and max_diff(with_a, half_a) > 0

    await engine.set_adapters([(adapters["b"], 1.0), (adapters["a"], 0.3)])
    assert max_diff(with_a, await engine.logits(MESSAGES)) > 0.05

    await engine.set_adapters([])
    assert not engine.adapters
    assert await engine.logits(MESSAGES) == base
    assert await greedy_text(engine) == base_text


async def test_attach_changes_greedy_output(engine: LlamaEngine, adapters: dict[str, Path]) -> None:
    base_text = await greedy_text(engine)
    strong = make_lora(Path(engine.info.path), adapters["a"].parent / "strong.gguf", seed=5, std=1.0)
    await engine.set_adapters([(strong, 2.0)])
    try:
        assert await greedy_text(engine) != base_text
    finally:
        await engine.set_adapters([])
    assert await greedy_text(engine) == base_text


@pytest.mark.parametrize("bad", ["wrong-shape", "wrong-arch", "junk", "missing"])
async def test_bad_adapter_is_refused_and_the_old_ones_stay(
    engine: LlamaEngine, adapters: dict[str, Path], bad: str
) -> None:
    await engine.set_adapters([(adapters["a"], 1.0)])
    before = await engine.logits(MESSAGES)
    try:
        with pytest.raises(AdapterError, match=str(adapters[bad])):
            await engine.set_adapters([(adapters["b"], 1.0), (adapters[bad], 1.0)])
        assert engine.adapters == ((adapters["a"], 1.0),)
        assert await engine.logits(MESSAGES) == before
    finally:
        await engine.set_adapters([])
