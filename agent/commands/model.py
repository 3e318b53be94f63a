"""``agent model``: the demo model and GGUF inspection.

agent model build-demo [--force] [--cache-dir DIR]   build (or find) the cached demo model
agent model info PATH [--json] [--all]               a GGUF file's metadata and tensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELP = "build the demo GGUF model (cached), or show a GGUF file's metadata"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser(
        "build-demo",
        help="build the demo model (f16, Q8_0, Q4_K_M GGUF) unless it is cached",
        description="Build the small demo model deterministically and cache it; print its files.",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default: $PPCHAT_CACHE_DIR or ~/.cache/ppchat)",
    )
    build.add_argument("--json", action="store_true", help="print the paths as JSON")
    info = sub.add_parser("info", help="print a GGUF file's metadata", description="Read a GGUF header.")
    info.add_argument("path", type=Path, help="the GGUF file")
    info.add_argument("--json", action="store_true", help="print JSON (arrays shortened unless --all)")
    info.add_argument("--all", action="store_true", help="print whole arrays and the tensor table")


def execute(args: argparse.Namespace) -> int:
    if args.model_command == "build-demo":
        return _build_demo(args)
    return _info(args)


def _build_demo(args: argparse.Namespace) -> int:
    from agent.model.demo import ensure_demo_model

    started = time.monotonic()
    model = ensure_demo_model(args.cache_dir, force=args.force)
    elapsed = time.monotonic() - started
    manifest = model.load_manifest()
    if args.json:
        paths = {
            "dir": str(model.dir),
            "f16": str(model.f16),
            "q8_0": str(model.q8_0),
            "q4_k_m": str(model.q4_k_m),
            "manifest": str(model.manifest),
        }
        print(json.dumps({"key": model.key, "paths": paths, "manifest": manifest.model_dump(mode="json")}))
        return 0
    print(f"demo model {manifest.name} (key {model.key}) in {model.dir}")
    for name, entry in manifest.files.items():
        print(f"  {name:28} {entry.size:>10} bytes  sha256 {entry.sha256}")
    t = manifest.train
    print(
        f"training: {t.steps} steps, {t.seconds:.0f} s; loss {t.first_loss:.3f} -> "
        f"train {t.train_loss:.3f}, validation {t.val_loss:.3f}"
    )
    print(f"build time {manifest.build_seconds:.0f} s; this command took {elapsed:.1f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from agent.model.info import read_gguf_info, summarize

    info = read_gguf_info(args.path)
    if args.json:
        metadata = {
            k: (v if args.all or not isinstance(v, list) else summarize(v)) for k, v in info.metadata.items()
        }
        document: dict[str, object] = {
            "path": str(args.path),
            "version": info.version,
            "file_type": info.file_type,
            "tensor_count": len(info.tensors),
            "metadata": metadata,
        }
        if args.all:
            document["tensors"] = [
                {"name": t.name, "shape": list(t.shape), "type": t.ggml_type} for t in info.tensors
            ]
        json.dump(document, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.path}: GGUF v{info.version}, {len(info.tensors)} tensors, file type {info.file_type}")
    for key, value in info.metadata.items():
        text = summarize(value, max_items=1 << 30, max_chars=1 << 30) if args.all else summarize(value)
        print(f"  {key} = {text}")
    if args.all:
        for t in info.tensors:
            print(f"  tensor {t.name} {list(t.shape)} type {t.ggml_type}")
    return 0
