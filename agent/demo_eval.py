"""``python -m agent.demo_eval``: a device's held-out loss without and with a global fleet adapter.

For the round demo (agent/demo_round.py), run as a SUBPROCESS like the trainer: it imports torch and
peft, which the daemon never does. It reads the device's consented conversations locally, keeps the
held-out share (the trainer never trains on it), and prints one JSON line:
``{"examples": N, "base": loss with B = 0, "global": loss with the release's B}``. Nothing is sent.

    python -m agent.demo_eval --config agent.toml --global-b <state>/adapters/global/1.b.ppcf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from agent.config import load_config


def evaluate(config_path: Path, global_b: Path) -> dict[str, float | int | None]:
    from agent.daemon import _demo_model_path
    from agent.store import SqliteStore
    from agent.train.dataset import StoreSource, build_dataset
    from agent.train.kinds import AdapterKind
    from agent.train.lora import LoraSettings, attach_lora, load_base_model
    from agent.train.tokenizer import ChatTokenizer, LlamaVocab
    from agent.train.trainer import mean_loss
    from agent.train.update import read_fleet_delta

    cfg = load_config(config_path)
    gguf_path = cfg.model.path or _demo_model_path()
    tok = ChatTokenizer(LlamaVocab(gguf_path), template_override=cfg.model.chat_template)
    store = SqliteStore(cfg.store_path, train_consent_default=cfg.store.train_consent_default)
    try:
        data = build_dataset(
            StoreSource(store),
            tok,
            created_after=0.0,
            created_until=time.time() + 1.0,
            system_prompt=cfg.model.system_prompt,
            max_seq_len=cfg.train.max_seq_len,
            holdout_fraction=cfg.train.holdout_fraction,
        )
    finally:
        store.close()
    examples = data.holdout or data.train
    header, b = read_fleet_delta(global_b)
    model, info = load_base_model(gguf_path=gguf_path, base_weights_dir=cfg.train.base_weights_dir)
    settings = LoraSettings(
        kind=AdapterKind.FLEET,
        rank=header.rank,
        alpha=header.alpha,
        target_modules=tuple(header.target_modules),
        ffa_seed=header.ffa_seed,
    )
    peft_model, _ = attach_lora(model, info, settings, init_b=b)
    with peft_model.disable_adapter():
        base = mean_loss(peft_model, examples)
    adapted = mean_loss(peft_model, examples)
    return {"examples": len(examples), "base": base, "global": adapted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.demo_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--global-b", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.config, args.global_b)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
