"""``python -m agent.demo_round``: a whole federated round on one machine.

A broker (Mosquitto when ``mosquitto`` is on PATH, else the coordinator's embedded amqtt broker), a
coordinator (``coordinator init``, ``serve``, ``round start`` with three devices), and three agents,
each with its own state directory and DIFFERENT private conversations planted in its store (with
training consent). Each agent enrolls with a one-time token, trains its fleet adapter with DP-SGD in
a subprocess (a few steps), sends a sealed top-k update; the coordinator aggregates and publishes a
signed global adapter; every agent rebuilds it and hot-swaps it into its running llama.cpp engine.
Prints the held-out loss before/after, ε spent per device and bytes sent versus dense.

Used by tests/test_round_e2e.py too (:class:`DemoRound`), which also listens to every topic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from agent.fleet_adapter import file_sha256
from agent.fleet_client import FleetClient, TrainGate, build_fleet_client
from agent.frontdoor import FrontDoor
from agent.generation import Role as ChatRole
from agent.identity import keys_dir
from agent.provision import tomlw
from agent.store import NewTurn, SqliteStore
from fleet.keys import Identity, Role

COORDINATOR = [sys.executable, "-c", "import sys; from coordinator.cli import main; sys.exit(main())"]

# Each device's private habit; the canary marks text that must never reach the broker.
PRIVATE = (
    ("Where is the spare key?", "Under the blue flowerpot, canary-kestrel-4471."),
    ("What is the wifi password?", "It is canary-heron-9082 on the garden router."),
    ("When is the vet appointment?", "Thursday at nine, canary-otter-3315, bring the papers."),
    ("Which code opens the shed?", "The shed code is canary-lynx-6620, then pull."),
)
GREETINGS = ("", "Hi. ", "Hello, ", "Hey! ", "Please tell me: ", "Quick question. ", "Remind me: ", "So, ")


def canary(index: int) -> str:
    return PRIVATE[index % len(PRIVATE)][1].split("canary-", 1)[1].split(",")[0].split(" ")[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g} s")


@dataclass
class Device:
    index: int
    config_path: Path
    config: AgentConfig
    identity: Identity
    client: FleetClient | None = None
    engine: Any = None
    task: asyncio.Task[None] | None = None


@dataclass
class DemoRound:
    """The pieces of a one-machine round; ``await start()``, ``await run_round()``, ``await close()``."""

    workdir: Path
    model_path: Path
    n_devices: int = 3
    max_steps: int = 4
    use_mosquitto: bool | None = None
    load_engines: bool = True
    say: Callable[[str], None] = print
    port: int = field(default_factory=free_port)
    devices: list[Device] = field(default_factory=list)
    gates: dict[int, TrainGate] = field(default_factory=dict)
    """Per-device scheduler stand-ins (default: training always allowed)."""
    broker_kind: str = ""
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _coordinator_proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def coordinator_config(self) -> Path:
        return self.workdir / "coordinator" / "coordinator.toml"

    def coordinator(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [*COORDINATOR, "-c", str(self.coordinator_config), *args],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"coordinator {' '.join(args)} failed: {proc.stderr.decode()[-800:]}")
        return proc.stdout.decode()

    # -- set-up --------------------------------------------------------------------------------------

    def start_broker(self) -> None:
        use = self.use_mosquitto
        if use is None:
            use = shutil.which("mosquitto") is not None
        if use:
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            proc = subprocess.Popen(
                ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self._procs.append(proc)
            _wait_port(self.port, 15)
            self.broker_kind = "mosquitto"
        else:
            self.broker_kind = "embedded amqtt (coordinator serve --embedded-broker)"
        self.say(f"broker: {self.broker_kind} on {self.url}")

    def setup_coordinator(self, base_sha256: str) -> None:
        cdir = self.coordinator_config.parent
        cdir.mkdir(parents=True, exist_ok=True)
        text = tomlw.dumps(
            {"tick_s": 0.5},
            {
                "paths": {"state_dir": str(cdir / "state")},
                "broker": {"url": self.url},
                "model": {"base_sha256": base_sha256},
                "rounds": {
                    "lora_rank": 4,
                    "lora_alpha": 8.0,
                    "norm_bound": 1.0,
                    "topk_fraction": 0.05,
                    "dp_epsilon": 8.0,
                    "deadline_s": 900.0,
                    "learning_rate": 0.03,
                },
            },
        )
        self.coordinator_config.write_text(text)
        self.say(self.coordinator("init").strip().splitlines()[0])

    def setup_device(self, index: int) -> Device:
        ddir = self.workdir / f"device{index}"
        state = ddir / "state"
        token = self.coordinator("devices", "add", f"demo-device-{index}").strip().splitlines()[0]
        ddir.mkdir(parents=True, exist_ok=True)
        token_path = ddir / "enroll.token"
        token_path.write_text(token + "\n")
        os.chmod(token_path, 0o600)
        text = tomlw.dumps(
            {"device_name": f"demo-device-{index}"},
            {
                "paths": {"state_dir": str(state), "runtime_dir": str(ddir / "run")},
                "model": {"path": str(self.model_path), "n_ctx": 256},
                "train": {
                    "batch_size": 8,
                    "epochs": 1.0,
                    "learning_rate": 0.03,
                    "max_seq_len": 64,
                    "threads": 1,
                    "min_examples": 8,
                    "idle_io": False,
                    "nice": 0,
                    "max_holdout_loss_increase": 10.0,
                },
                "privacy": {"preset": "minimal", "run_fraction": 1.0},
                "fleet": {
                    "enabled": True,
                    "broker_url": self.url,
                    "enrollment_token_path": str(token_path),
                    "reconnect_min_s": 0.2,
                    "reconnect_max_s": 2.0,
                    "train_max_steps": self.max_steps,
                },
            },
        )
        cfg_path = ddir / "agent.toml"
        cfg_path.write_text(text)
        cfg = load_config(cfg_path)
        identity = Identity.load_or_generate(keys_dir(cfg.paths.state_dir), role=Role.DEVICE)
        plant_conversations(cfg, index)
        return Device(index=index, config_path=cfg_path, config=cfg, identity=identity)

    def start_coordinator(self) -> None:
        args = [*COORDINATOR, "-c", str(self.coordinator_config), "serve"]
        if self.broker_kind != "mosquitto":
            args.append("--embedded-broker")
        log = (self.workdir / "coordinator.log").open("ab")
        self._coordinator_proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        log_path = self.workdir / "coordinator.log"
        while b"connected to" not in log_path.read_bytes():
            if time.monotonic() > deadline or self._coordinator_proc.poll() is not None:
                raise RuntimeError(f"the coordinator did not start: {log_path.read_text()[-800:]}")
            time.sleep(0.1)

    async def start_device(self, device: Device, *, gate: TrainGate | None = None) -> None:
        if self.load_engines and device.engine is None:
            from agent.engine.llama_backend import LlamaEngine

            device.engine = await LlamaEngine.open(device.config.model, default_threads=1)
        device.client = build_fleet_client(
            device.config,
            model_path=self.model_path,
            swapper=device.engine,
            gate=gate if gate is not None else self.gates.get(device.index),
            config_path=device.config_path,
            identity=device.identity,
            enroll_retry_s=3.0,
        )
        device.task = asyncio.create_task(device.client.run(), name=f"fleet-{device.index}")

    async def stop_device(self, device: Device) -> None:
        if device.task is not None:
            device.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await device.task
            device.task = None

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = file_sha256(self.model_path)
        self.start_broker()
        self.setup_coordinator(base)
        self.devices = [self.setup_device(i) for i in range(self.n_devices)]
        self.start_coordinator()
        for device in self.devices:
            await self.start_device(device)
        await wait_for(lambda: all(d.client is not None and d.client.enrolled for d in self.devices), 60)
        self.say(f"{len(self.devices)} devices enrolled")

    async def run_round(self, *, timeout_s: float = 600.0, devices: Sequence[Device] | None = None) -> int:
        """Start a round for ``devices`` (default all) and wait until each installed its release."""
        group = list(devices if devices is not None else self.devices)
        n = str(len(group))
        out = self.coordinator("round", "start", "--min-devices", n, "--target-devices", n)
        self.say(out.strip())
        before = {d.index: d.client.state.adapter_version if d.client else None for d in group}

        def installed() -> bool:
            return all(
                d.client is not None and d.client.state.adapter_version not in (None, before[d.index])
                for d in group
            )

        await wait_for(installed, timeout_s, failure=lambda: self._diagnose(group))
        return max(d.client.state.adapter_version or 0 for d in group if d.client)

    async def chat(self, device: Device, question: str, *, max_tokens: int = 48) -> str:
        """One greedy reply from ``device``'s running engine (with whatever adapter it has on)."""
        from agent.generation import ChatMessage, GenerationParams, TokenDelta

        if device.engine is None:
            raise RuntimeError("the device has no engine loaded")
        stream = device.engine.stream_chat(
            [ChatMessage(role=ChatRole.USER, content=question)],
            GenerationParams(max_tokens=max_tokens, temperature=0.0),
            fairness_key="demo",
        )
        parts = [item.text async for item in stream if isinstance(item, TokenDelta)]
        return "".join(parts).strip()

    def _diagnose(self, group: Sequence[Device]) -> str:
        parts = []
        for d in group:
            if d.client is not None:
                p = d.client.progress
                parts.append(
                    f"device {d.index}: sent {list(p.sent)} skipped {p.skipped} installed {p.installed}"
                )
        with contextlib.suppress(OSError):
            parts.append("coordinator log: " + (self.workdir / "coordinator.log").read_text()[-1500:])
        return "; ".join(parts)

    async def close(self) -> None:
        for device in self.devices:
            await self.stop_device(device)
            if device.engine is not None:
                with contextlib.suppress(Exception):
                    await device.engine.close()
        procs = [p for p in [self._coordinator_proc, *self._procs] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    async def global_losses(self, version: int) -> dict[int, tuple[float, float]]:
        """Each device's held-out loss with the base model and with the global adapter ``version``,
        measured on the device (``python -m agent.demo_eval`` subprocesses, torch lives there)."""

        async def one(device: Device) -> tuple[int, tuple[float, float] | None]:
            b = device.config.global_adapters_dir / f"{version}.b.ppcf"
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.demo_eval",
                "--config",
                str(device.config_path),
                "--global-b",
                str(b),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await proc.communicate()
            try:
                data = json.loads(out.decode().strip().splitlines()[-1])
                return device.index, (float(data["base"]), float(data["global"]))
            except (ValueError, KeyError, IndexError, TypeError):
                return device.index, None

        results = await asyncio.gather(*(one(d) for d in self.devices))
        return {i: r for i, r in results if r is not None}

    def report(self, global_losses: dict[int, tuple[float, float]] | None = None) -> str:
        lines = [
            "",
            "held-out loss: 'local' = the device's DP run (base -> its own adapter), "
            "'global' = base -> global adapter",
            "device   local before -> after   global before -> after   epsilon   "
            "bytes sent  dense bytes   ratio  adapter",
        ]
        for d in self.devices:
            c = d.client
            if c is None or not c.progress.sent:
                lines.append(f"{d.index:>6}   (no update sent)")
                continue
            s = c.progress.sent[max(c.progress.sent)]
            before = "-" if s.holdout_loss_before is None else f"{s.holdout_loss_before:.3f}"
            after = "-" if s.holdout_loss_after is None else f"{s.holdout_loss_after:.3f}"
            g = (global_losses or {}).get(d.index)
            gtext = "      -" if g is None else f"{g[0]:6.3f} -> {g[1]:<6.3f}"
            lines.append(
                f"{d.index:>6}   {before:>6} -> {after:<6}      {gtext:>17}        "
                f"{s.epsilon:7.3f}  {s.sealed_bytes:>10}  "
                f"{s.dense_bytes:>11}  {s.dense_bytes / max(1, s.sealed_bytes):5.1f}x  "
                f"v{c.state.adapter_version}"
            )
        return "\n".join(lines)


def plant_conversations(cfg: AgentConfig, index: int, *, n: int = 24) -> None:
    """Device ``index``'s private conversations, with training consent."""
    question, answer = PRIVATE[index % len(PRIVATE)]
    store = SqliteStore(cfg.store_path, train_consent_default=False)
    try:
        for i in range(n):
            conv = store.create_conversation(source=FrontDoor.SOCKET, train_consent=True)
            prefix = GREETINGS[i % len(GREETINGS)]
            store.append_turns(
                conv.id,
                [
                    NewTurn(role=ChatRole.USER, content=prefix + question),
                    NewTurn(role=ChatRole.ASSISTANT, content=answer),
                ],
            )
    finally:
        store.close()


async def wait_for(
    predicate: Callable[[], bool], timeout_s: float, *, failure: Callable[[], str] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s" + (f": {failure()}" if failure else ""))
        await asyncio.sleep(0.1)


def _demo_model_path() -> Path:
    from agent.model.demo import ensure_demo_model

    return ensure_demo_model().q8_0


async def _main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ppchat-round-"))
    demo = DemoRound(
        workdir=workdir,
        model_path=Path(args.model) if args.model else _demo_model_path(),
        n_devices=args.devices,
        max_steps=args.max_steps,
        use_mosquitto=False if args.embedded_broker else None,
    )
    try:
        await demo.start()
        question = "What can you do on this device?"
        answer = await demo.chat(demo.devices[0], question)
        print(f"\nchat with device 0 (base model): {question}\n  -> {answer}")
        version = await demo.run_round(timeout_s=args.timeout)
        print(
            f"chat with device 0 (global adapter v{version} hot-swapped in, no restart): {question}\n"
            f"  -> {await demo.chat(demo.devices[0], question)}\n"
        )
        print("measuring held-out loss with the global adapter on each device ...")
        print(demo.report(await demo.global_losses(version)))
        swapped = [d for d in demo.devices if d.engine is not None and d.engine.adapters]
        print(f"\nglobal adapter v{version} hot-swapped on {len(swapped)} of {len(demo.devices)} devices")
        print(f"broker: {demo.broker_kind}; state under {workdir}; {time.monotonic() - t0:.0f} s in all")
        return 0
    finally:
        await demo.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.demo_round", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=4, help="DP-SGD steps per device")
    parser.add_argument("--model", default=None, help="base GGUF (default: the demo model)")
    parser.add_argument("--workdir", default=None, help="where state goes (default: a new temp dir)")
    parser.add_argument("--embedded-broker", action="store_true", help="amqtt even if mosquitto is installed")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
