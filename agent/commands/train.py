"""``agent train``: one private training run (the daemon starts it; it also runs by hand).

    agent train [--adapter personal|fleet] [--round-spec FILE] [--init-b FILE] [--max-steps N] [--out DIR]

Charges the privacy ledger before the first step, trains a LoRA adapter with DP-SGD on the consented
conversations, and writes the adapter GGUF (and, for the fleet adapter, the update for the fleet
client) atomically under ``<state_dir>/adapters/`` or ``--out``. Prints the result as JSON.

Exit codes: 0 completed, or stopped by SIGTERM with a checkpoint (the next run resumes it);
77 the privacy budget refuses the run; 75 too few conversations; 65 the result failed the export
guard (its charge stands); 78 configuration errors.

torch, peft and opacus are imported inside :func:`execute`, never when the daemon builds its parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "one private (DP-SGD) LoRA training run; charges the privacy budget first"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help="agent config file (default: $PPCHAT_CONFIG or /etc/ppchat/agent.toml when it exists)",
    )
    parser.add_argument(
        "--adapter",
        choices=("personal", "fleet"),
        default="personal",
        help="personal: A and B trained, stays on the device (default); fleet: FFA-LoRA for a round",
    )
    parser.add_argument(
        "--round-spec", type=Path, default=None, help="the round announcement (JSON), for --adapter fleet"
    )
    parser.add_argument(
        "--init-b",
        type=Path,
        default=None,
        help="fleet: the B matrices to start from: the fleet's global adapter (GGUF) for this round's seed",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="at most this many DP-SGD steps")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the adapter and result (default <state_dir>/adapters)",
    )


def execute(args: argparse.Namespace) -> int:
    from agent.train.process import StopSignal

    stop = StopSignal()
    stop.install()  # first: a SIGTERM during the slow imports and planning is honoured too

    from agent.commands.common import load
    from agent.errors import ConfigError
    from agent.store import SqliteStore
    from agent.train.dataset import StoreSource
    from agent.train.kinds import AdapterKind
    from agent.train.trainer import TrainRequest, load_round_spec, train

    cfg = load(args)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError("--max-steps must be at least 1")
    adapter = AdapterKind(args.adapter)
    rnd = load_round_spec(args.round_spec) if args.round_spec is not None else None
    request = TrainRequest(
        adapter=adapter, round=rnd, init_b=args.init_b, max_steps=args.max_steps, out_dir=args.out
    )
    store = SqliteStore(cfg.store_path, train_consent_default=cfg.store.train_consent_default)
    try:
        result = train(cfg, request, source=StoreSource(store), stop=stop)
    finally:
        store.close()
    print(result.model_dump_json(indent=1), file=sys.stdout, flush=True)
    return 0
