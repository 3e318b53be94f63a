"""``coordinator``: enrolls devices, runs rounds, aggregates and publishes signed adapters.

    coordinator init                          keys (state_dir/keys, 0600) and the store
    coordinator devices add NAME              print a one-time enrollment token for device NAME
    coordinator enroll-token NAME             the same
    coordinator devices list [--json]         enrolled devices
    coordinator devices revoke NAME           refuse NAME's updates from now on
    coordinator serve [--embedded-broker]     the MQTT service (systemd runs this)
    coordinator round start [options]         open a round (the running service announces it)
    coordinator round status [ID] [--json]    one round (default: the latest)
    coordinator round watch [ID]              live progress until the round is released or fails
    coordinator rounds list [--json]          recent rounds

The config file is ``--config``, else ``$PPCHAT_COORDINATOR_CONFIG``, else
``/etc/ppchat/coordinator.toml`` when it exists, else the defaults. Exit codes come from the error
classes (:mod:`coordinator.errors`); ``serve`` exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator import __version__
from coordinator.config import CoordinatorConfig, load_config
from coordinator.errors import ConfigError, CoordinatorError, NotInitialized

if TYPE_CHECKING:
    from coordinator.store import Store
    from fleet.keys import Identity
    from fleet.messages import RoundSpec

log = logging.getLogger("coordinator")

EMBEDDED_BROKER_HELP = (
    "run an embedded MQTT 3.1.1 broker (amqtt) on the configured broker address, for demos. Caveat, "
    "measured with amqtt 0.12.1: it keeps retained messages but did not deliver QoS 1 messages queued "
    "for a persistent session while the client was offline (Mosquitto did). Use it only where devices "
    "stay connected; use Mosquitto or another full broker in production."
)


# -- shared helpers ----------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    return load_config(args.config)


def _identity(config: CoordinatorConfig) -> Identity:
    from fleet.errors import KeyStoreError
    from fleet.keys import Identity, Role

    if not (config.keys_dir / "identity.key").exists():
        raise NotInitialized(f"no coordinator keys in {config.keys_dir}: run 'coordinator init'")
    try:
        return Identity.load(config.keys_dir, role=Role.COORDINATOR)
    except KeyStoreError as exc:
        raise ConfigError(str(exc)) from exc


def _store(config: CoordinatorConfig) -> Store:
    from coordinator.store import Store

    if not config.store_path.exists():
        raise NotInitialized(f"no store at {config.store_path}: run 'coordinator init'")
    return Store(config.store_path)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


# -- init, enrollment, devices -------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from coordinator.store import Store
    from fleet.errors import KeyStoreError
    from fleet.keys import Identity, Role

    config = _config(args)
    config.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    existed = (config.keys_dir / "identity.key").exists()
    try:
        identity = Identity.load_or_generate(config.keys_dir, role=Role.COORDINATOR)
    except (KeyStoreError, OSError) as exc:
        raise ConfigError(f"cannot create the coordinator keys in {config.keys_dir}: {exc}") from exc
    Store(config.store_path).close()
    print(f"coordinator {identity.id} ({'existing' if existed else 'new'} keys)")
    print(f"fingerprint  {identity.public.fingerprint}")
    print(f"public keys  {config.keys_dir / 'identity.pub'}")
    print(f"store        {config.store_path}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from coordinator.devices import issue_token
    from fleet.sealing import SystemClock

    config = _config(args)
    identity = _identity(config)
    with _store(config) as store:
        token = issue_token(
            store, identity, args.name, now=SystemClock().now(), ttl=timedelta(hours=args.ttl_hours)
        )
    print(str(token))
    print(
        f"one-time token for {args.name!r}, valid {args.ttl_hours:g} h: on the device run "
        "'agent enroll --token TOKEN'",
        file=sys.stderr,
    )
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    config = _config(args)
    with _store(config) as store:
        devices = store.devices()
    if args.json:
        _print_json(
            [
                {
                    "name": d.name,
                    "id": d.id,
                    "status": d.status.value,
                    "enrolled_at": d.enrolled_at,
                    "last_seen": d.last_seen,
                    "adapter_version": d.adapter_version,
                }
                for d in devices
            ]
        )
        return 0
    if not devices:
        print("no devices enrolled (coordinator devices add NAME)")
        return 0
    print(f"{'NAME':<20} {'STATUS':<8} {'ADAPTER':>7}  {'LAST SEEN':<23}  ID")
    for d in devices:
        version = "-" if d.adapter_version is None else str(d.adapter_version)
        print(f"{d.name:<20} {d.status.value:<8} {version:>7}  {_when(d.last_seen):<23}  {d.id}")
    return 0


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    from coordinator.store import DeviceStatus

    config = _config(args)
    with _store(config) as store:
        record = store.set_device_status(args.name, DeviceStatus.REVOKED)
    print(f"revoked {record.name} ({record.id}): its updates are refused from now on")
    return 0


# -- rounds --------------------------------------------------------------------------------------------


def _last_spec(store: Store) -> RoundSpec | None:
    from coordinator.rounds import spec_from_record

    record = store.latest_round()
    return None if record is None else spec_from_record(record)


def cmd_round_start(args: argparse.Namespace) -> int:
    import secrets

    from coordinator.rounds import RoundManager, RoundPlan
    from fleet.codec import Quantization
    from fleet.sealing import SystemClock

    config = _config(args)
    identity = _identity(config)
    with _store(config) as store:
        last = _last_spec(store)
        base = args.base_sha256 or config.model.base_sha256 or (last.base_model_sha256 if last else None)
        if base is None:
            raise ConfigError("no base model: give --base-sha256 or set model.base_sha256 in the config")
        seed = args.seed
        if seed is None:
            seed = config.rounds.ffa_seed
        if seed is None:
            seed = last.lora.ffa_seed if last else secrets.randbits(63)
        plan = RoundPlan.from_defaults(
            config.rounds,
            base_model_sha256=base,
            ffa_seed=seed,
            min_devices=args.min_devices,
            target_devices=args.target_devices,
            deadline_s=args.deadline,
            local_epochs=args.local_epochs,
            learning_rate=args.lr,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            target_modules=tuple(args.target_modules.split(",")) if args.target_modules else None,
            norm_bound=args.norm_bound,
            topk_fraction=args.topk_fraction,
            quantization=Quantization(args.quantization) if args.quantization else None,
            dp_epsilon=args.dp_epsilon,
            dp_delta=args.dp_delta,
        )
        manager = RoundManager(
            store,
            identity,
            clock=SystemClock(),
            aggregation=config.aggregation,
            max_update_bytes=config.rounds.max_update_bytes,
        )
        spec = manager.start_round(plan)
    if args.json:
        _print_json(spec.header())
    else:
        print(
            f"round {spec.round_id} open: {spec.min_devices}-{spec.target_devices} devices, "
            f"deadline {spec.deadline.isoformat()}; 'coordinator serve' announces it"
        )
    return 0


def _round_view(store: Store, round_id: int | None) -> dict[str, Any]:
    from coordinator.errors import NotFound
    from coordinator.rounds import spec_from_record

    record = store.latest_round() if round_id is None else store.round(round_id)
    if record is None:
        raise NotFound("no rounds yet (coordinator round start)")
    spec = spec_from_record(record)
    refusals: dict[str, int] = {}
    for refusal in store.refusals(record.id):
        refusals[refusal.reason] = refusals.get(refusal.reason, 0) + 1
    release = store.release_for_round(record.id)
    return {
        "round_id": record.id,
        "state": record.state.value,
        "received": store.update_count(record.id),
        "min_devices": spec.min_devices,
        "target_devices": spec.target_devices,
        "created_at": record.created_at,
        "deadline": record.deadline,
        "closed_at": record.closed_at,
        "failure": record.failure,
        "refused": refusals,
        "release_version": None if release is None else release.version,
        "lora": spec.lora.model_dump(mode="json"),
        "norm_bound": spec.norm_bound,
        "topk_fraction": spec.codec.topk_fraction,
        "dp_epsilon": spec.privacy.epsilon,
    }


def _round_line(view: dict[str, Any], now: float) -> str:
    parts = [
        f"round {view['round_id']}: {view['state']}",
        f"{view['received']}/{view['target_devices']} updates (min {view['min_devices']})",
    ]
    if view["state"] == "open":
        left = view["deadline"] - now
        parts.append(f"deadline in {left:.0f} s" if left > 0 else "deadline passed")
    if view["refused"]:
        parts.append("refused " + ", ".join(f"{k} {v}" for k, v in sorted(view["refused"].items())))
    if view["release_version"] is not None:
        parts.append(f"release v{view['release_version']}")
    if view["failure"]:
        parts.append(f"failed: {view['failure']}")
    return "  ".join(parts)


def cmd_round_status(args: argparse.Namespace) -> int:
    config = _config(args)
    with _store(config) as store:
        view = _round_view(store, args.round_id)
    if args.json:
        _print_json(view)
    else:
        print(_round_line(view, time.time()))
    return 0


def cmd_round_watch(args: argparse.Namespace, *, sleep: Callable[[float], None] = time.sleep) -> int:
    """Redraw the round's progress until it is released (exit 0) or fails (exit 1)."""
    config = _config(args)
    tty = sys.stdout.isatty()
    last = ""
    with _store(config) as store:
        round_id = args.round_id
        while True:
            view = _round_view(store, round_id)
            round_id = view["round_id"]
            line = _round_line(view, time.time())
            if line != last:
                if tty:
                    sys.stdout.write("\r\x1b[K" + line)
                else:
                    sys.stdout.write(line + "\n")
                sys.stdout.flush()
                last = line
            if view["state"] in ("released", "failed"):
                if tty:
                    sys.stdout.write("\n")
                return 0 if view["state"] == "released" else 1
            sleep(args.interval)


def cmd_rounds_list(args: argparse.Namespace) -> int:
    config = _config(args)
    with _store(config) as store:
        views = [_round_view(store, record.id) for record in store.rounds(limit=args.limit)]
    if args.json:
        _print_json(views)
        return 0
    if not views:
        print("no rounds yet (coordinator round start)")
    now = time.time()
    for view in views:
        print(_round_line(view, now))
    return 0


# -- serve ---------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    config = _config(args)
    identity = _identity(config)
    store = _store(config)

    async def serve() -> None:
        import contextlib

        from coordinator.mqtt import PahoBroker
        from coordinator.service import Service, embedded_broker
        from fleet.sealing import SystemClock

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with contextlib.AsyncExitStack() as stack:
            if args.embedded_broker:
                await stack.enter_async_context(embedded_broker(config.broker.host, config.broker.port))
            service = Service(
                config=config,
                store=store,
                identity=identity,
                broker=PahoBroker(config.broker),
                clock=SystemClock(),
            )
            await service.run(stop)

    try:
        asyncio.run(serve())
    finally:
        store.close()
    return 0


# -- the parser ----------------------------------------------------------------------------------------


def _round_start_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--min-devices", type=int, help="fail the round with fewer updates than this")
    add("--target-devices", type=int, help="close the round as soon as this many updates arrived")
    add("--deadline", type=float, metavar="SECONDS", help="seconds from now until the round closes")
    add("--local-epochs", type=int)
    add("--lr", type=float, help="devices' learning rate")
    add("--lora-rank", type=int)
    add("--lora-alpha", type=float)
    add("--target-modules", metavar="A,B", help="LoRA target modules, comma-separated")
    add("--seed", type=int, help="frozen-A seed (default: the previous round's)")
    add("--norm-bound", type=float, help="L2 bound every update is clipped to")
    add("--topk-fraction", type=float, help="fraction of B entries a device sends")
    add("--quantization", choices=["int8", "fp16"])
    add("--dp-epsilon", type=float, help="privacy target epsilon for this round's training")
    add("--dp-delta", type=float)
    add("--base-sha256", help="SHA-256 of the base GGUF every device runs (default: config or last round)")
    add("--json", action="store_true")


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="ppchat fleet coordinator")
    parser.add_argument("--version", action="version", version=f"ppchat {__version__}")
    parser.add_argument("--config", "-c", type=Path, default=None, help="coordinator config file (TOML)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(parent: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(handler=handler)
        return cmd

    command(sub, "init", cmd_init, "create the coordinator's keys and store (idempotent)")
    token = command(sub, "enroll-token", cmd_token, "print a one-time enrollment token for a device")
    token.add_argument("name")
    token.add_argument("--ttl-hours", type=float, default=168.0)

    devices = sub.add_parser("devices", help="enrolled devices").add_subparsers(dest="devices_command")
    devices.required = True
    add = command(devices, "add", cmd_token, "print a one-time enrollment token for device NAME")
    add.add_argument("name")
    add.add_argument("--ttl-hours", type=float, default=168.0)
    listing = command(devices, "list", cmd_devices_list, "list enrolled devices")
    listing.add_argument("--json", action="store_true")
    revoke = command(devices, "revoke", cmd_devices_revoke, "refuse a device's updates from now on")
    revoke.add_argument("name")

    serve = command(sub, "serve", cmd_serve, "run the MQTT service (SIGTERM exits 0)")
    serve.add_argument("--embedded-broker", action="store_true", help=EMBEDDED_BROKER_HELP)

    round_cmd = sub.add_parser("round", help="start and follow a round").add_subparsers(dest="round_command")
    round_cmd.required = True
    start = command(round_cmd, "start", cmd_round_start, "open a round; 'coordinator serve' announces it")
    _round_start_options(start)
    status = command(round_cmd, "status", cmd_round_status, "a round's state and progress")
    status.add_argument("round_id", nargs="?", type=int, metavar="ID", help="default: the latest round")
    status.add_argument("--json", action="store_true")
    watch = command(round_cmd, "watch", cmd_round_watch, "follow a round live until it is released or fails")
    watch.add_argument("round_id", nargs="?", type=int, metavar="ID", help="default: the latest round")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")

    rounds = sub.add_parser("rounds", help="past and current rounds").add_subparsers(dest="rounds_command")
    rounds.required = True
    rlist = command(rounds, "list", cmd_rounds_list, "recent rounds, newest first")
    rlist.add_argument("--limit", type=int, default=20)
    rlist.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if not args.verbose and args.command != "serve":
            logging.getLogger().setLevel(logging.WARNING)
        elif not args.verbose:
            logging.getLogger().setLevel(_config(args).logging.level.value.upper())
        result: int = args.handler(args)
        return result
    except CoordinatorError as exc:
        name = " ".join(filter(None, [args.command, getattr(args, f"{args.command}_command", None)]))
        print(f"coordinator {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. piped into head
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
