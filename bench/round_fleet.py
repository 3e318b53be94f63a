"""The wall time of a round with 1,000 simulated devices publishing sealed updates through a real
Mosquitto on loopback, to a real ``coordinator serve`` process.

    python -m bench.round_fleet [--devices 1000] [--topk 0.05]

The coordinator is set up with its CLI (``init``, ``round start``); the devices are enrolled straight
into its store (MQTT enrollment is tested elsewhere). Each simulated device has its own MQTT
connection (client id = device id, persistent session, QoS 1, as a device's), all driven by one
thread polling their sockets. Once the signed round announcement arrives, every device seals a
demo-sized update (the demo model's rank-8 B matrices: 12,288 values, top-k, int8, zstd, sealed);
that device-side work is not timed. Then every device publishes at once, and the clock runs from the
first publication to the signed global adapter arriving on the releases topic.

Baseline, side by side: the same sealed updates handed to the coordinator's own receive path
(:meth:`RoundManager.receive` in batches, then :meth:`RoundManager.close`) in this process, without
the broker: the round's time over that baseline is what MQTT, the broker and the service loop cost.

The broker runs with the fleet broker template's queue settings (``fleet.acl``): the test of those
is that no update is dropped when 1,000 arrive at once. Exit 1 when any update is missing from the
round (the product's requirement); the figures are reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.provision import tomlw
from bench.aggregate import FixedClock, enroll_all, open_round, seal_all, service_rate
from coordinator.config import RoundDefaults, load_config
from coordinator.store import RoundState, Store
from fleet.acl import BrokerSettings
from fleet.keys import Identity, Role
from fleet.messages import RoundSpec
from fleet.sealing import open_signed
from fleet.topics import TopicKind, TopicLayout

COORDINATOR = [sys.executable, "-c", "import sys; from coordinator.cli import main; sys.exit(main())"]
BASE_SHA = "ab" * 32


def raise_fd_limit(needed: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


class Fleet:
    """N paho clients driven by one thread: ``select.poll`` over their sockets."""

    def __init__(self, host: str, port: int, ids: Sequence[str]) -> None:
        self.clients: list[mqtt.Client] = []
        for device_id in ids:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=device_id,
                clean_session=False,
                protocol=MQTTProtocolVersion.MQTTv311,
            )
            client.max_inflight_messages_set(20)
            self.clients.append(client)
        self.host, self.port = host, port

    def connect(self, timeout_s: float) -> None:
        for client in self.clients:
            client.connect(self.host, self.port, keepalive=300)
        self.drive(lambda: all(c.is_connected() for c in self.clients), timeout_s)

    def drive(self, done: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the simulated fleet did not finish in time")
            poller = select.poll()
            by_fd: dict[int, mqtt.Client] = {}
            for client in self.clients:
                sock = client.socket()
                if sock is None:
                    continue
                fd = sock.fileno()
                by_fd[fd] = client
                poller.register(fd, select.POLLIN | (select.POLLOUT if client.want_write() else 0))
            for fd, events in poller.poll(50):
                client = by_fd[fd]
                if events & select.POLLIN:
                    client.loop_read()
                if events & select.POLLOUT:
                    client.loop_write()
            for client in self.clients:
                client.loop_misc()

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
        for client in self.clients:
            client.loop_write()


def baseline(spec: RoundSpec, coordinator: Identity, devices: list[Identity], sealed: list[bytes]) -> float:
    """Wall seconds for the coordinator's receive path and close, in process, no broker."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "baseline.sqlite3")
        clock = FixedClock()
        clock.current = spec.announced_at
        defaults = RoundDefaults(
            min_devices=len(devices),
            target_devices=len(devices),
            topk_fraction=spec.codec.topk_fraction,
            lora_rank=spec.lora.rank,
            deadline_s=3600,
        )
        rounds, local = open_round(
            store,
            coordinator,
            devices,
            clock=clock,
            defaults=defaults,
            base_model_sha256=BASE_SHA,
            ffa_seed=spec.lora.ffa_seed,
        )
        rate, _ = service_rate(
            [(d.id, p) for d, p in zip(devices, sealed, strict=True)], store, rounds, local.round_id
        )
        store.close()
        return rate.wall_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--topk", type=float, default=0.05)
    args = parser.parse_args(argv)
    from tests.mosquitto import MosquittoBroker, MosquittoOptions

    n = args.devices
    raise_fd_limit(2 * n + 256)
    template = BrokerSettings()
    with tempfile.TemporaryDirectory(prefix="ppchat-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = MosquittoBroker(
            tmp / "broker",
            MosquittoOptions(persistence=True, max_queued_messages=template.max_queued_messages),
        )
        broker.start()
        topics = TopicLayout()
        config = tmp / "coordinator.toml"
        config.write_text(
            tomlw.dumps(
                {"tick_s": 0.2},
                {
                    "paths": {"state_dir": str(tmp / "state")},
                    "broker": {"url": broker.url},
                    "model": {"base_sha256": BASE_SHA},
                    "rounds": {"lora_rank": 8, "topk_fraction": args.topk, "deadline_s": 3600.0},
                },
            )
        )

        def cli(*words: str) -> str:
            out = subprocess.run(
                [*COORDINATOR, "-c", str(config), *words], capture_output=True, check=True, timeout=120
            )
            return out.stdout.decode()

        cli("init")
        cfg = load_config(config)
        coordinator_identity = Identity.load(cfg.keys_dir, role=Role.COORDINATOR)
        coordinator_pk = coordinator_identity.public
        devices = [Identity.generate(Role.DEVICE) for _ in range(n)]
        with Store(cfg.store_path) as store:
            enroll_all(store, devices, now=time.time())
        cli("round", "start", "--min-devices", str(n), "--target-devices", str(n))

        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-watcher", clean_session=True)
        got: dict[str, tuple[float, bytes]] = {}

        def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
            kind = topics.parse(m.topic).kind
            if m.payload and kind.value not in got:
                got[kind.value] = (time.perf_counter(), bytes(m.payload))

        watcher.on_message = on_message
        watcher.connect(broker.host, broker.port)
        watcher.subscribe([(topics.build(TopicKind.ROUNDS), 1), (topics.build(TopicKind.RELEASES), 1)])
        watcher.loop_start()

        log_path = tmp / "coordinator.log"
        with log_path.open("wb") as log:
            coordinator = subprocess.Popen([*COORDINATOR, "-c", str(config), "serve"], stdout=log, stderr=log)
        fleet: Fleet | None = None
        try:
            deadline = time.monotonic() + 60
            while TopicKind.ROUNDS.value not in got:
                if time.monotonic() > deadline or coordinator.poll() is not None:
                    raise SystemExit(f"no round announcement: {log_path.read_text()[-1500:]}")
                time.sleep(0.05)
            spec = open_signed(got[TopicKind.ROUNDS.value][1], RoundSpec, signer=coordinator_pk)
            t_conn = time.perf_counter()
            fleet = Fleet(broker.host, broker.port, [d.id for d in devices])
            fleet.connect(timeout_s=120)
            connect_s = time.perf_counter() - t_conn
            sealed = [payload for _, payload in seal_all(spec, devices, coordinator_identity)]
            cpu0 = _cpu_s(coordinator.pid)

            t0 = time.perf_counter()
            infos = [
                c.publish(topics.build(TopicKind.UPDATE, d.id), payload, qos=1)
                for c, d, payload in zip(fleet.clients, devices, sealed, strict=True)
            ]
            fleet.drive(lambda: all(i.is_published() for i in infos), timeout_s=600)
            published_s = time.perf_counter() - t0
            # Wait for the release; give up when the count of received updates stops growing.
            last, last_change = -1, time.monotonic()
            while TopicKind.RELEASES.value not in got and coordinator.poll() is None:
                time.sleep(0.01)
                if time.monotonic() - last_change > 5.0:
                    received = json.loads(cli("round", "status", "--json"))["received"]
                    if received == last:
                        break  # stalled: updates were lost on the way
                    last, last_change = received, time.monotonic()
            round_s = got[TopicKind.RELEASES.value][0] - t0 if TopicKind.RELEASES.value in got else None
            coordinator_cpu_s = _cpu_s(coordinator.pid) - cpu0
            view = json.loads(cli("round", "status", "--json"))
        finally:
            if fleet is not None:
                fleet.close()
            coordinator.send_signal(signal.SIGTERM)
            coordinator.wait(timeout=30)
            watcher.loop_stop()
            broker.stop()
        base_s = baseline(spec, coordinator_identity, devices, sealed)

    size = sum(len(p) for p in sealed) / len(sealed)
    print(
        f"{n} devices, one MQTT connection each (connected in {connect_s:.1f} s); sealed update {size:.0f} B"
    )
    print(f"all {n} publications acknowledged by the broker in {published_s:.2f} s ({n / published_s:.0f}/s)")
    print(
        f"round state {view['state']}: {view['received']}/{n} updates received, "
        f"refused {view['refused'] or 'none'}"
    )
    if round_s is None:
        print("no release arrived")
        return 1
    print(
        f"round wall time, first publication -> signed release on the broker: {round_s:.2f} s "
        f"(coordinator process CPU {coordinator_cpu_s:.2f} s)"
    )
    print(f"baseline, the same updates through RoundManager.receive/close in process: {base_s:.2f} s")
    print(f"round / baseline: {round_s / base_s:.2f}")
    return 0 if view["received"] == n and view["state"] == RoundState.RELEASED.value else 1


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


if __name__ == "__main__":
    sys.exit(main())
