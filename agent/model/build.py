"""Build the demo model into a directory (the heavy half of :mod:`agent.model.demo`).

Run as its own process by :func:`agent.model.demo.ensure_demo_model`, so that torch never enters
the caller::

    python -m agent.model.build --out DIR --key KEY

Steps: vocabulary (SentencePiece) -> training (torch) -> f16 GGUF (gguf) -> Q8_0 and Q4_K_M
(llama.cpp's quantizer) -> a transformers copy (safetensors) -> ``manifest.json``. Progress goes to
stderr, one line per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from agent.model import corpus
from agent.model import spec as s
from agent.model.demo import FILE_NAMES, Manifest, TrainFigures, file_entry, package_versions
from agent.model.export import write_gguf
from agent.model.quantize import FileType, quantize
from agent.model.vocab import Vocab, train_vocab
from fleet.files import write_atomic


def _progress(message: str) -> None:
    print(f"[demo model] {message}", file=sys.stderr, flush=True)


def _as_stored(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights as the f16 GGUF holds them: matrices float16, norms float32."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        array = np.asarray(value, dtype=np.float32)
        out[name] = array if array.ndim == 1 else array.astype(np.float16)
    return out


def _save_transformers_copy(out: Path, config: dict[str, object], stored: dict[str, np.ndarray]) -> None:
    """``hf/config.json`` + ``hf/model.safetensors`` with the GGUF's exact values."""
    hf = out / "hf"
    hf.mkdir()
    save_file(stored, str(hf / "model.safetensors"), metadata={"format": "pt"})
    write_atomic(hf / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())


def _probe_dialogue(dialogues: Sequence[corpus.Dialogue]) -> corpus.Dialogue:
    """The dialogue whose logits the build records: a multi-turn one with a system prompt."""
    return next(d for d in dialogues if d.messages[0].role.value == "system" and len(d.messages) >= 5)


def build(out: Path, *, key: str, demo: s.DemoSpec = s.DEFAULT_SPEC) -> Manifest:
    """Build every file of the demo model into the existing, empty directory ``out``."""
    started = time.monotonic()
    dialogues = corpus.load_dialogues()
    train_set = corpus.split(dialogues, corpus.Split.TRAIN)
    val_set = corpus.split(dialogues, corpus.Split.VAL)
    _progress(f"corpus: {len(train_set)} training and {len(val_set)} validation dialogues")

    vocab = Vocab(train_vocab(corpus.texts(train_set), demo.vocab))
    (out / FILE_NAMES.tokenizer).write_bytes(vocab.proto)
    _progress(f"vocabulary: {len(vocab)} pieces")

    from agent.model.train import reference_logits, train  # torch: imported here only

    result = train(
        model_spec=demo.model,
        train_spec=demo.train,
        vocab_size=len(vocab),
        bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
        train_data=[vocab.encode_dialogue(d) for d in train_set],
        val_data=[vocab.encode_dialogue(d) for d in val_set],
        progress=_progress,
    )

    f16 = out / FILE_NAMES.f16
    write_gguf(f16, name=demo.name, model=demo.model, vocab=vocab, tensors=result.tensors)
    _progress(f"wrote {f16.name}")
    quantize(f16, out / FILE_NAMES.q8_0, FileType.MOSTLY_Q8_0, threads=demo.train.threads)
    quantize(f16, out / FILE_NAMES.q4_k_m, FileType.MOSTLY_Q4_K_M, threads=demo.train.threads)
    _progress("quantized to Q8_0 and Q4_K_M")
    stored = _as_stored(result.tensors)
    _save_transformers_copy(out, result.config, stored)
    probe = vocab.encode_dialogue(_probe_dialogue(train_set)).ids
    logits = reference_logits(result.config, stored, probe)
    save_file(
        {"tokens": np.asarray(probe, dtype=np.int32), "logits": logits}, str(out / FILE_NAMES.reference)
    )
    _progress("wrote the transformers copy and the reference logits")

    names = [
        FILE_NAMES.f16,
        FILE_NAMES.q8_0,
        FILE_NAMES.q4_k_m,
        FILE_NAMES.tokenizer,
        FILE_NAMES.hf_config,
        FILE_NAMES.hf_weights,
        FILE_NAMES.reference,
    ]
    manifest = Manifest(
        name=demo.name,
        key=key,
        files={name: file_entry(out / name) for name in names},
        spec=demo,
        vocab_size=len(vocab),
        train=TrainFigures(
            first_loss=result.first_loss,
            train_loss=result.train_loss,
            val_loss=result.val_loss,
            steps=result.steps,
            tokens_seen=result.tokens_seen,
            seconds=round(result.seconds, 2),
        ),
        build_seconds=round(time.monotonic() - started, 2),
        versions=package_versions(),
    )
    write_atomic(out / FILE_NAMES.manifest, manifest.model_dump_json(indent=2).encode())
    _progress(f"built in {manifest.build_seconds:.0f} s")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the demo model into a directory")
    parser.add_argument("--out", type=Path, required=True, help="an existing, empty directory")
    parser.add_argument("--key", required=True, help="the build key recorded in the manifest")
    args = parser.parse_args(argv)
    build(args.out, key=args.key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
