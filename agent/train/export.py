"""LoRA adapters as llama.cpp GGUF files, and the guard that decides whether a result may be exported.

The layout is what llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp`` checks:

- metadata ``general.type = "adapter"``, ``general.architecture`` (the base model's), ``adapter.type =
  "lora"``, ``adapter.lora.alpha`` (float32; llama.cpp scales by ``alpha / rank``);
- for each adapted base weight ``W`` named ``N`` in the base GGUF (from the gguf package's tensor-name
  map, e.g. ``blk.0.attn_q.weight``), two tensors ``N.lora_a`` with numpy shape ``(rank, in)`` and
  ``N.lora_b`` with shape ``(out, rank)``, so that ``W + alpha/rank * B @ A`` is the adapted weight;
- for the llama architecture the base GGUF stores q and k with rows permuted for llama.cpp's rope
  (``convert_hf_to_gguf.py`` ``LlamaModel.permute``); the same row permutation applies to B (A is
  untouched), with the head count for q and the KV head count for k.

Everything here is numpy and gguf only (no torch), so the daemon or the fleet client can rebuild an
adapter from released B matrices. Files are written to a temporary name, fsynced and renamed: a
reader sees the old adapter or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.errors import AdapterError
from fleet.files import fsync_dir

FloatArray = NDArray[np.float32]
ROPE_PERMUTED_ARCHS = frozenset({"llama"})
"""Architectures whose q/k weights llama.cpp's converter permutes (transformers un-permutes them)."""
SUPPORTED_ARCHS = frozenset({"llama", "qwen2"})


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight in GGUF orientation: ``a`` is (rank, in), ``b`` is (out, rank)."""

    a: FloatArray
    b: FloatArray

    def __post_init__(self) -> None:
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise AdapterError(f"LoRA pair shapes do not fit: A {self.a.shape}, B {self.b.shape}")


@dataclass(frozen=True)
class LoraAdapterFile:
    architecture: str
    alpha: float
    pairs: dict[str, LoraPair]
    """Base tensor name (``blk.0.attn_q.weight``) to its pair."""
    name: str | None = None


# -- names and the rope permutation -------------------------------------------------------------------


def gguf_tensor_name(*, architecture: str, n_blocks: int, hf_weight: str) -> str:
    """The base GGUF name of a transformers weight, e.g. ``model.layers.0.self_attn.q_proj.weight``
    -> ``blk.0.attn_q.weight``, from the gguf package's tensor-name map."""
    import gguf

    arch = _gguf_arch(architecture)
    mapping = gguf.get_tensor_name_map(arch, n_blocks)
    name = mapping.get_name(hf_weight, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise AdapterError(f"no GGUF name for {hf_weight!r} in the {architecture} tensor map")
    return str(name)


def _gguf_arch(architecture: str) -> Any:
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == architecture:
            return arch
    raise AdapterError(f"unknown GGUF architecture {architecture!r}")


def rope_permute_rows(w: FloatArray, n_head: int) -> FloatArray:
    """llama.cpp's converter permutation of q/k rows (``LlamaModel.permute``), for B matrices."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise AdapterError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    return np.ascontiguousarray(
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def rope_unpermute_rows(w: FloatArray, n_head: int) -> FloatArray:
    """The inverse of :func:`rope_permute_rows` (what transformers does when it loads a GGUF)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise AdapterError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def rope_heads_for(*, architecture: str, gguf_name: str, n_head: int, n_head_kv: int) -> int | None:
    """The head count of the rope permutation a B matrix of ``gguf_name`` needs, or ``None``."""
    if architecture not in ROPE_PERMUTED_ARCHS:
        return None
    if ".attn_q." in gguf_name:
        return n_head
    if ".attn_k." in gguf_name:
        return n_head_kv
    return None


# -- writing and reading -------------------------------------------------------------------------------


def write_lora_gguf(path: Path, adapter: LoraAdapterFile) -> None:
    """Write ``adapter`` to ``path`` atomically (temporary file, fsync, rename, fsync the directory)."""
    import gguf

    if adapter.architecture not in SUPPORTED_ARCHS:
        raise AdapterError(f"exporting adapters for {adapter.architecture!r} is not supported")
    if not adapter.pairs:
        raise AdapterError("an adapter needs at least one tensor pair")
    if not (math.isfinite(adapter.alpha) and adapter.alpha > 0):
        raise AdapterError(f"alpha must be a positive number, not {adapter.alpha}")
    for base, pair in adapter.pairs.items():
        for part in (pair.a, pair.b):
            if not np.all(np.isfinite(part)):
                raise AdapterError(f"{base}: the adapter holds non-finite values")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, adapter.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        if adapter.name:
            writer.add_name(adapter.name)
        for base in sorted(adapter.pairs):
            pair = adapter.pairs[base]
            writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(pair.a, dtype=np.float32))
            writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(pair.b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def read_lora_gguf(path: Path) -> LoraAdapterFile:
    """Read an adapter written by :func:`write_lora_gguf` (or llama.cpp's converter, f32 tensors)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not a readable GGUF: {exc}") from None

    def field(key: str) -> object:
        f = reader.get_field(key)
        if f is None:
            raise AdapterError(f"{path}: missing {key}")
        return f.contents()

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise AdapterError(f"{path}: not a LoRA adapter")
    alpha = field("adapter.lora.alpha")
    arch = field("general.architecture")
    name_field = reader.get_field("general.name")
    if not isinstance(alpha, float) or not isinstance(arch, str):
        raise AdapterError(f"{path}: bad adapter metadata")
    halves: dict[str, dict[str, FloatArray]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b") or t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise AdapterError(f"{path}: unexpected tensor {t.name} ({t.tensor_type.name})")
        shape = tuple(int(d) for d in reversed(t.shape))
        halves.setdefault(base, {})[part] = np.array(t.data, dtype=np.float32).reshape(shape)
    pairs = {}
    for base, parts in halves.items():
        if set(parts) != {"lora_a", "lora_b"}:
            raise AdapterError(f"{path}: {base} lacks its A or B")
        pairs[base] = LoraPair(a=parts["lora_a"], b=parts["lora_b"])
    name = name_field.contents() if name_field is not None else None
    return LoraAdapterFile(
        architecture=arch, alpha=alpha, pairs=pairs, name=name if isinstance(name, str) else None
    )


# -- fleet adapters from B matrices ------------------------------------------------------------------


def base_in_features(model_path: Path, names: Sequence[str]) -> dict[str, int]:
    """Input sizes of base weights (by GGUF name) read from the model's GGUF header."""
    import gguf

    try:
        reader = gguf.GGUFReader(model_path)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{model_path}: not a readable GGUF: {exc}") from None
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    out = {}
    for name in names:
        if name not in shapes:
            raise AdapterError(f"{model_path} has no tensor {name}")
        out[name] = shapes[name][0]  # ggml's ne[0] is the input dimension
    return out


def build_ffa_adapter(
    *,
    architecture: str,
    alpha: float,
    ffa_seed: int,
    b_matrices: Mapping[str, FloatArray],
    in_features: Mapping[str, int],
    name: str | None = None,
) -> LoraAdapterFile:
    """A fleet (FFA-LoRA) adapter from B matrices keyed ``<base name>.lora_b`` (GGUF orientation, as
    in a release or a fleet update) and the round's seed, which gives every A
    (:func:`agent.train.ffa.frozen_a`). ``in_features`` maps base names to their input size."""
    from agent.train.ffa import frozen_a

    pairs = {}
    for key, b in b_matrices.items():
        base, _, part = key.rpartition(".")
        if part != "lora_b" or base not in in_features:
            raise AdapterError(f"unexpected B matrix name {key!r}")
        b32 = np.ascontiguousarray(b, dtype=np.float32)
        if b32.ndim != 2:
            raise AdapterError(f"{key}: a B matrix has two dimensions")
        a = frozen_a(seed=ffa_seed, name=base, rank=b32.shape[1], in_features=in_features[base])
        pairs[base] = LoraPair(a=a, b=b32)
    return LoraAdapterFile(architecture=architecture, alpha=alpha, pairs=pairs, name=name)


def ffa_b_matrices(adapter: LoraAdapterFile, *, ffa_seed: int) -> dict[str, FloatArray]:
    """The B matrices of a fleet adapter file, after checking that its A matrices are the ones
    ``ffa_seed`` gives (so that it belongs to rounds with this seed and rank)."""
    from agent.train.ffa import frozen_a

    out = {}
    for base, pair in adapter.pairs.items():
        rank, n_in = pair.a.shape
        if not np.array_equal(pair.a, frozen_a(seed=ffa_seed, name=base, rank=rank, in_features=n_in)):
            raise AdapterError(f"{base}: the adapter's A is not the one seed {ffa_seed} gives")
        out[f"{base}.lora_b"] = pair.b
    return out


# -- the export guard (opacus issue 820) -----------------------------------------------------------------


@dataclass(frozen=True)
class GuardVerdict:
    ok: bool
    reason: str
    max_abs_change: float
    holdout_before: float | None
    holdout_after: float | None


def check_trained(
    before: Mapping[str, FloatArray],
    after: Mapping[str, FloatArray],
    *,
    holdout_before: float | None,
    holdout_after: float | None,
    max_increase: float,
) -> GuardVerdict:
    """Whether trained weights may be exported: they changed, are finite, and the held-out loss did
    not rise by more than ``max_increase`` (a fraction). opacus + peft have silently corrupted or
    frozen LoRA weights before (opacus issue 820); this catches both."""
    if set(before) != set(after):
        return GuardVerdict(
            False, "the trained tensors are not the ones that were initialised", 0.0, None, None
        )
    change = 0.0
    for name, b in before.items():
        a = after[name]
        if a.shape != b.shape:
            return GuardVerdict(False, f"{name} changed shape", 0.0, holdout_before, holdout_after)
        if not np.all(np.isfinite(a)):
            return GuardVerdict(
                False, f"{name} holds non-finite values", math.inf, holdout_before, holdout_after
            )
        change = max(change, float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0)
    if change == 0.0:
        return GuardVerdict(False, "training did not change the weights", 0.0, holdout_before, holdout_after)
    if holdout_after is not None and not math.isfinite(holdout_after):
        return GuardVerdict(False, "the held-out loss is not finite", change, holdout_before, holdout_after)
    if holdout_before is not None and holdout_after is not None:
        bound = holdout_before * (1.0 + max_increase)
        if holdout_after > bound:
            return GuardVerdict(
                False,
                f"the held-out loss rose from {holdout_before:.4f} to {holdout_after:.4f} "
                f"(bound {bound:.4f})",
                change,
                holdout_before,
                holdout_after,
            )
    return GuardVerdict(True, "ok", change, holdout_before, holdout_after)
