"""The base model and its LoRA adapters (torch + transformers + peft: the training process only).

- :func:`load_base_model` loads the weights from the device's GGUF (transformers dequantizes it and,
  for llama, undoes llama.cpp's q/k rope permutation) or from an f16 transformers copy, frozen.
- :func:`attach_lora` adds a peft LoRA adapter (rank, alpha, target modules; no dropout, no bias):
  the **personal** adapter trains A and B; the **fleet** adapter is FFA-LoRA: A comes from the round's
  seed (:func:`agent.train.ffa.frozen_a`, identical on every device) and is frozen, only B trains, and
  B may start from the fleet's current global B.
- :func:`adapter_pairs` / :func:`b_matrices` give the adapter in GGUF orientation (base GGUF tensor
  names, llama q/k B rows permuted as llama.cpp stores them) for export and for the fleet update.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from agent.errors import AdapterError, ModelError
from agent.train.export import (
    LoraAdapterFile,
    LoraPair,
    gguf_tensor_name,
    rope_heads_for,
    rope_permute_rows,
    rope_unpermute_rows,
)
from agent.train.ffa import frozen_a
from agent.train.kinds import AdapterKind
from agent.train.update import B_SUFFIX

ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    """GGUF/transformers architecture name (``llama``, ``qwen2``)."""
    n_blocks: int
    n_head: int
    n_head_kv: int
    vocab_size: int


@dataclass(frozen=True)
class LoraSettings:
    kind: AdapterKind
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    ffa_seed: int | None = None
    """Fleet adapters: the round's seed for the frozen A matrices."""


@dataclass(frozen=True)
class LoraTarget:
    """One adapted linear layer: its peft module name and its base weight's GGUF name."""

    module: str
    gguf_name: str
    in_features: int
    out_features: int


def load_base_model(*, gguf_path: Path | None, base_weights_dir: Path | None) -> tuple[Any, ModelInfo]:
    """The frozen base model in float32, from an f16 transformers copy if given, else the GGUF."""
    from transformers import AutoModelForCausalLM

    try:
        if base_weights_dir is not None:
            model = AutoModelForCausalLM.from_pretrained(str(base_weights_dir), dtype=torch.float32)
        elif gguf_path is not None:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        else:
            raise ModelError("no base weights: set model.path (GGUF) or train.base_weights_dir")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load the base weights for training: {exc}") from None
    base: Any = model
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    cfg = model.config
    arch = str(cfg.model_type)
    info = ModelInfo(
        architecture=arch,
        n_blocks=int(cfg.num_hidden_layers),
        n_head=int(cfg.num_attention_heads),
        n_head_kv=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        vocab_size=int(cfg.vocab_size),
    )
    return model, info


def attach_lora(
    model: Any,
    info: ModelInfo,
    settings: LoraSettings,
    *,
    init_b: Mapping[str, NDArray[np.float32]] | None = None,
) -> tuple[Any, list[LoraTarget]]:
    """Wrap ``model`` with a LoRA adapter per ``settings``; returns the peft model and its targets.

    ``init_b`` (fleet only): B matrices to start from, by ``<gguf name>.lora_b`` in GGUF orientation."""
    from peft import LoraConfig, get_peft_model

    if settings.kind is AdapterKind.FLEET and settings.ffa_seed is None:
        raise AdapterError("a fleet adapter needs the round's FFA seed")
    if init_b is not None and settings.kind is not AdapterKind.FLEET:
        raise AdapterError("only the fleet adapter starts from given B matrices")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    targets = lora_targets(peft_model, info)
    if not targets:
        raise AdapterError(f"no module matches target_modules {list(settings.target_modules)}")
    modules = dict(peft_model.named_modules())
    if init_b is not None:
        expected = {t.gguf_name + B_SUFFIX for t in targets}
        if set(init_b) != expected:
            raise AdapterError("the initial B matrices do not match this model's LoRA targets")
    with torch.no_grad():
        for t in targets:
            layer = modules[t.module]
            a = layer.lora_A[ADAPTER_NAME].weight
            b = layer.lora_B[ADAPTER_NAME].weight
            if settings.kind is AdapterKind.FLEET:
                assert settings.ffa_seed is not None
                fa = frozen_a(
                    seed=settings.ffa_seed, name=t.gguf_name, rank=settings.rank, in_features=t.in_features
                )
                a.copy_(torch.from_numpy(fa))
                a.requires_grad_(False)
                if init_b is not None:
                    b0 = np.asarray(init_b[t.gguf_name + B_SUFFIX], dtype=np.float32)
                    if b0.shape != tuple(b.shape):
                        raise AdapterError(
                            f"initial B for {t.gguf_name} has shape {b0.shape}, not {tuple(b.shape)}"
                        )
                    heads = rope_heads_for(
                        architecture=info.architecture,
                        gguf_name=t.gguf_name,
                        n_head=info.n_head,
                        n_head_kv=info.n_head_kv,
                    )
                    if heads is not None:
                        b0 = rope_unpermute_rows(b0, heads)
                    b.copy_(torch.from_numpy(np.ascontiguousarray(b0)))
    return peft_model, targets


def lora_targets(peft_model: Any, info: ModelInfo) -> list[LoraTarget]:
    """The LoRA-wrapped linear layers, in module order."""
    out = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or ADAPTER_NAME not in getattr(module, "lora_A", {}):
            continue
        hf_name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
        gguf_name = gguf_tensor_name(
            architecture=info.architecture, n_blocks=info.n_blocks, hf_weight=hf_name + ".weight"
        )
        base = module.get_base_layer()
        out.append(
            LoraTarget(
                module=name,
                gguf_name=gguf_name,
                in_features=int(base.in_features),
                out_features=int(base.out_features),
            )
        )
    return out


def lora_weights(peft_model: Any, targets: list[LoraTarget]) -> dict[str, NDArray[np.float32]]:
    """A copy of the adapter's A and B (peft orientation), keyed ``<gguf name>.lora_a``/``.lora_b``."""
    modules = dict(peft_model.named_modules())
    out: dict[str, NDArray[np.float32]] = {}
    for t in targets:
        layer = modules[t.module]
        out[t.gguf_name + ".lora_a"] = layer.lora_A[ADAPTER_NAME].weight.detach().cpu().numpy().copy()
        out[t.gguf_name + B_SUFFIX] = layer.lora_B[ADAPTER_NAME].weight.detach().cpu().numpy().copy()
    return out


def load_lora_weights(peft_model: Any, targets: list[LoraTarget], weights: Mapping[str, Any]) -> None:
    """Set A and B from :func:`lora_weights`' layout (a checkpoint)."""
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for t in targets:
            layer = modules[t.module]
            for suffix, param in (
                (".lora_a", layer.lora_A[ADAPTER_NAME].weight),
                (B_SUFFIX, layer.lora_B[ADAPTER_NAME].weight),
            ):
                value = torch.as_tensor(np.asarray(weights[t.gguf_name + suffix]))
                if tuple(value.shape) != tuple(param.shape):
                    raise AdapterError(f"checkpoint tensor {t.gguf_name}{suffix} has the wrong shape")
                param.copy_(value)


def _to_gguf_b(b: NDArray[np.float32], info: ModelInfo, gguf_name: str) -> NDArray[np.float32]:
    heads = rope_heads_for(
        architecture=info.architecture, gguf_name=gguf_name, n_head=info.n_head, n_head_kv=info.n_head_kv
    )
    return rope_permute_rows(b, heads) if heads is not None else np.ascontiguousarray(b)


def adapter_file(
    weights: Mapping[str, NDArray[np.float32]],
    targets: list[LoraTarget],
    info: ModelInfo,
    *,
    alpha: float,
    name: str,
) -> LoraAdapterFile:
    """The adapter in GGUF orientation, ready for :func:`agent.train.export.write_lora_gguf`."""
    pairs = {}
    for t in targets:
        a = np.ascontiguousarray(weights[t.gguf_name + ".lora_a"], dtype=np.float32)
        b = _to_gguf_b(np.asarray(weights[t.gguf_name + B_SUFFIX], dtype=np.float32), info, t.gguf_name)
        pairs[t.gguf_name] = LoraPair(a=a, b=b)
    return LoraAdapterFile(architecture=info.architecture, alpha=alpha, pairs=pairs, name=name)


def b_matrices(
    weights: Mapping[str, NDArray[np.float32]], targets: list[LoraTarget], info: ModelInfo
) -> dict[str, NDArray[np.float32]]:
    """The B matrices in GGUF orientation, keyed ``<gguf name>.lora_b`` (the fleet's tensor names)."""
    return {
        t.gguf_name + B_SUFFIX: _to_gguf_b(np.asarray(weights[t.gguf_name + B_SUFFIX]), info, t.gguf_name)
        for t in targets
    }
