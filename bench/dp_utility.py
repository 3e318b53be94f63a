"""What each privacy preset buys: one personal-adapter run per preset on the demo model.

    python -m bench.dp_utility [--conversations 120] [--lr 0.002] [--steps N]

Private data: ``--conversations`` synthetic household conversations that all answer greetings with
the same private sentence (tests/agent/train/conftest.py). Reported per preset: the run's ε and noise
multiplier, the held-out loss on the private data before and after (what the device learned), and
the loss on the demo corpus's validation dialogues before and after (what general ability it kept).
Each run spends the configured share (``privacy.run_fraction``, default 0.25) of the preset's budget.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=120)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's)")
    ap.add_argument("--steps", type=int, default=None, help="cap on steps (default: epochs decide)")
    ap.add_argument("--presets", default="minimal,moderate,high,maximum")
    args = ap.parse_args()

    from agent.config import parse_config
    from agent.generation import ChatMessage, Role
    from agent.model.demo import ensure_demo_model
    from agent.train.dataset import ListSource, SourceConversation, build_dataset
    from agent.train.lora import load_base_model
    from agent.train.tokenizer import ChatTokenizer, LlamaVocab
    from agent.train.trainer import TrainRequest, mean_loss, train
    from tests.agent.train.conftest import NOW, private_conversations

    demo = ensure_demo_model()
    corpus = Path(__file__).resolve().parents[1] / "agent" / "model" / "data" / "dialogues.jsonl"
    general = []
    for line in corpus.read_text().splitlines():
        d = json.loads(line)
        if d.get("split") == "val":
            msgs = tuple(ChatMessage(role=Role(m["role"]), content=m["content"]) for m in d["messages"])
            general.append(SourceConversation(id=d["id"], created=NOW, messages=msgs))
    vocab = LlamaVocab(demo.f16)
    tok = ChatTokenizer(vocab)
    general_examples = build_dataset(
        ListSource(general),
        tok,
        created_after=NOW - 1,
        created_until=NOW,
        system_prompt="You are ppchat, a helpful assistant running privately on this device.",
        max_seq_len=256,
        holdout_fraction=0.0,
    ).train
    base, _ = load_base_model(gguf_path=demo.f16, base_weights_dir=None)
    general_before = mean_loss(base, general_examples)
    print(
        f"demo model; {args.conversations} private conversations;"
        f" general val dialogues {len(general_examples)}"
    )
    print(
        "preset    eps/run  noise  steps  private loss before -> after   general loss before -> after  secs"
    )
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            train_cfg: dict[str, object] = {"threads": 2, "nice": 0, "idle_io": False}
            if args.lr is not None:
                train_cfg["learning_rate"] = args.lr
            if args.steps is not None:
                train_cfg["max_steps"] = args.steps
            cfg = parse_config(
                {
                    "paths": {"state_dir": f"{tmp}/state", "runtime_dir": f"{tmp}/run"},
                    "model": {"path": str(demo.f16)},
                    "train": train_cfg,
                    "privacy": {"preset": preset},
                }
            )
            t0 = time.monotonic()
            result = train(cfg, TrainRequest(), source=ListSource(private_conversations(args.conversations)))
            from agent.train.export import read_lora_gguf

            adapter = read_lora_gguf(Path(str(result.adapter_path)))
            model, info = load_base_model(gguf_path=demo.f16, base_weights_dir=None)
            general_after = _loss_with_adapter(model, info, adapter, general_examples, mean_loss)
            print(
                f"{preset:<9} {result.epsilon_run:7.4f} {result.noise_multiplier:6.3g} {result.steps_done:6d}"
                f"  {result.holdout_loss_before:8.3f} -> {result.holdout_loss_after:8.3f}"
                f"          {general_before:8.3f} -> {general_after:8.3f}   {time.monotonic() - t0:5.0f}"
            )
    vocab.close()


def _loss_with_adapter(
    model: object, info: object, adapter: object, examples: object, mean_loss: object
) -> float:
    """The loss with an exported adapter merged into the base weights (as llama.cpp applies it)."""
    import numpy as np
    import torch

    from agent.train.export import rope_heads_for, rope_unpermute_rows

    params = dict(model.named_parameters())  # type: ignore[attr-defined]
    names = {}
    for i in range(info.n_blocks):  # type: ignore[attr-defined]
        for short, gg in (
            ("q_proj", "attn_q"),
            ("k_proj", "attn_k"),
            ("v_proj", "attn_v"),
            ("o_proj", "attn_output"),
        ):
            names[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.self_attn.{short}.weight"
    with torch.no_grad():
        for gguf_name, pair in adapter.pairs.items():  # type: ignore[attr-defined]
            b = pair.b
            heads = rope_heads_for(
                architecture=info.architecture,  # type: ignore[attr-defined]
                gguf_name=gguf_name,
                n_head=info.n_head,  # type: ignore[attr-defined]
                n_head_kv=info.n_head_kv,  # type: ignore[attr-defined]
            )
            if heads is not None:
                b = rope_unpermute_rows(b, heads)
            scale = adapter.alpha / pair.a.shape[0]  # type: ignore[attr-defined]
            params[names[gguf_name]] += torch.from_numpy(np.ascontiguousarray(scale * (b @ pair.a)))
    return float(mean_loss(model, examples))  # type: ignore[operator]


if __name__ == "__main__":
    main()
