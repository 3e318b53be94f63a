"""DP-SGD step time ÷ the same step without DP, on the demo model (target ≤ 1.5).

    python -m bench.dp_step [--batch 16] [--seq 64] [--steps 40] [--rank 8] [--threads N]

One process, one model, the same batches: a plain LoRA step (per-example losses averaged, backward,
Adam) against opacus's DP step (per-example clipping + noise) with ghost clipping and with hooks
(per-example gradients), for the personal adapter (A and B trained) and the fleet adapter (B only).
Steps alternate between the variants so that machine load hits them alike; the ratio of the fastest
step of each (robust to load spikes on a shared machine) is the figure, the ratio of medians is shown
beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

TARGET = 1.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from agent.model.demo import ensure_demo_model
    from agent.train.kinds import AdapterKind
    from agent.train.lora import LoraSettings, attach_lora, load_base_model
    from agent.train.trainer import example_losses

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = ensure_demo_model()
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(3, 1000, (args.batch, args.seq), generator=g)
        attention = torch.ones_like(ids)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        targets[:, args.seq // 2 :] = True
        return ids, attention, targets

    def setup(kind: AdapterKind, mode: str | None) -> Any:
        from opacus import PrivacyEngine

        model, info = load_base_model(gguf_path=demo.f16, base_weights_dir=None)
        settings = LoraSettings(
            kind=kind,
            rank=args.rank,
            alpha=2.0 * args.rank,
            target_modules=("q_proj", "v_proj"),
            ffa_seed=1 if kind is AdapterKind.FLEET else None,
        )
        peft_model, _ = attach_lora(model, info, settings)
        peft_model.train()
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
        if mode is None:

            def plain_step(b: tuple[torch.Tensor, ...]) -> None:
                loss: Any = example_losses(peft_model, *b).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return plain_step
        data = torch.utils.data.TensorDataset(torch.zeros(64, 1))
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch)
        engine = PrivacyEngine(accountant="prv")
        common = {
            "module": peft_model,
            "optimizer": opt,
            "data_loader": loader,
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
        }
        if mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            m, o, _c, _l = engine.make_private(
                **common, grad_sample_mode="ghost", criterion=torch.nn.CrossEntropyLoss()
            )

            def ghost_step(b: tuple[torch.Tensor, ...]) -> None:
                loss: Any = DPTensorFastGradientClipping(m, o, example_losses(m, *b), "mean")
                loss.backward()
                o.step()
                o.zero_grad(set_to_none=True)

            return ghost_step
        m, o, _l = engine.make_private(**common, grad_sample_mode="hooks")

        def hooks_step(b: tuple[torch.Tensor, ...]) -> None:
            loss: Any = example_losses(m, *b).mean()
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)

        return hooks_step

    print(
        f"demo model {demo.f16.name}; batch {args.batch} x {args.seq} tokens; LoRA rank {args.rank} on q,v; "
        f"torch threads {torch.get_num_threads()}"
    )
    for kind in (AdapterKind.PERSONAL, AdapterKind.FLEET):
        variants = {
            name: setup(kind, mode)
            for name, mode in (("plain", None), ("ghost", "ghost"), ("hooks", "hooks"))
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        batches = [batch() for _ in range(args.steps + 1)]
        for step in variants.values():  # warm-up
            step(batches[0])
        for b in batches[1:]:
            for name, step in variants.items():
                t0 = time.perf_counter()
                step(b)
                times[name].append(time.perf_counter() - t0)
        best = {name: min(ts) for name, ts in times.items()}
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name in ("ghost", "hooks"):
            ratio = best[name] / best["plain"]
            verdict = "meets" if ratio <= TARGET else "misses"
            print(
                f"{kind.value:<8} DP ({name:<5}) {best[name] * 1000:7.1f} ms"
                f" / plain {best['plain'] * 1000:7.1f} ms"
                f" = {ratio:4.2f}  (target <= {TARGET}: {verdict}; medians {med[name] / med['plain']:4.2f})"
            )


if __name__ == "__main__":
    main()
