"""The fleet broker's security against a real Mosquitto started with the shipped configuration.

The broker runs ``fleet.acl.broker_config`` (what ``deploy/mosquitto/ppchat-fleet.conf`` holds) on a
loopback port, with a password file whose lines ``fleet.acl.password_entry`` wrote and the ACL of
``fleet.acl.AclPolicy``. Clients are paho-mqtt, as the agent and coordinator are.

"Not delivered" is shown without sleeping: after the forbidden message, an allowed one is sent the
same way, and once that one has arrived the forbidden one would have arrived first.
"""

from __future__ import annotations

import os
import pwd
import queue
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fleet.acl import (
    COORDINATOR_ACCESS,
    DEVICE_ACCESS,
    AclPolicy,
    BrokerSettings,
    TlsFiles,
    broker_config,
    check_password,
    device_topic_pattern,
    password_entry,
)
from fleet.keys import Identity, Role
from fleet.topics import TopicKind, TopicLayout
from tests.mosquitto import MOSQUITTO_PASSWD, MosquittoBroker, mosquitto_available

TIMEOUT = 10.0
LAYOUT = TopicLayout()
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")


class FleetBroker(MosquittoBroker):
    """A Mosquitto whose config is the fleet broker's, plus test-only logging and user lines."""

    def __init__(self, directory: Path, accounts: dict[str, str], *, tls: TlsFiles | None = None) -> None:
        super().__init__(directory)
        self.accounts = accounts
        self.tls = tls

    def write_config(self) -> Path:
        self.password_path = self.directory / "passwd"
        self.password_path.write_text("".join(password_entry(u, p) + "\n" for u, p in self.accounts.items()))
        self.password_path.chmod(0o600)
        self.acl_path = self.directory / "acl"
        self.acl_path.write_text(AclPolicy().text())
        settings = BrokerSettings(
            port=self.port,
            bind_address=self.host,
            tls=self.tls,
            password_file=self.password_path,
            acl_file=self.acl_path,
            persistence_dir=self.data_dir,
        )
        self.data_dir.mkdir(exist_ok=True)
        extra = [f"log_dest file {self.log_path}", "log_type all"]
        if os.geteuid() == 0:  # Mosquitto would drop to the 'mosquitto' user, which cannot read our files
            extra.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        self.conf_path.write_text(broker_config(settings) + "\n".join(extra) + "\n")
        return self.conf_path


@dataclass
class Accounts:
    coordinator: str
    a: str
    b: str
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def accounts() -> Accounts:
    a, b = (Identity.generate(Role.DEVICE).id for _ in range(2))
    return Accounts("coordinator", a, b, {"coordinator": "coord-secret", a: "a-secret", b: "b-secret"})


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, accounts: Accounts) -> Iterator[FleetBroker]:
    running = FleetBroker(tmp_path_factory.mktemp("fleet-broker"), accounts.passwords)
    running.start()
    try:
        yield running
    finally:
        running.stop()


class Client:
    """A paho client that connects synchronously and queues what it receives."""

    def __init__(
        self,
        broker: MosquittoBroker,
        username: str | None,
        password: str | None,
        *,
        tls_ca: Path | None = None,
    ) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.reason: ReasonCode | None = None
        self.granted: list[int] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"t-{username}-{os.urandom(3).hex()}",
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *_args: self._connected.set()  # refused without a CONNACK
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(TIMEOUT):
            self.close()
            raise TimeoutError("no CONNACK")

    def _on_connect(self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        self.reason = reason
        self._connected.set()

    def _on_subscribe(self, _c: object, _u: object, _m: object, codes: list[ReasonCode], _p: object) -> None:
        self.granted = [int(code.value) for code in codes]
        self._subscribed.set()

    @property
    def accepted(self) -> bool:
        return self.reason is not None and not self.reason.is_failure

    def subscribe(self, *filters: str) -> list[int]:
        self._subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self._subscribed.wait(TIMEOUT), "no SUBACK"
        return self.granted

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def next(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=TIMEOUT)

    def drained(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Connect = Callable[..., "Client"]


@pytest.fixture
def connect(broker: FleetBroker, accounts: Accounts) -> Iterator[Connect]:
    opened: list[Client] = []

    def _connect(username: str | None, password: str | None = None) -> Client:
        if username is not None and password is None:
            password = accounts.passwords[username]
        client = Client(broker, username, password)
        opened.append(client)
        return client

    yield _connect
    for client in opened:
        client.close()


# -- the ACL, as text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_topic_kind_has_an_access_decision(kind: TopicKind) -> None:
    assert kind in DEVICE_ACCESS and kind in COORDINATOR_ACCESS
    text = AclPolicy().text()
    device = DEVICE_ACCESS[kind]
    if device is not None:
        assert f"pattern {device.value} {device_topic_pattern(LAYOUT, kind)}\n" in text
    if kind.per_device:  # the pattern is exactly the layout's topic with %u for the id
        assert device_topic_pattern(LAYOUT, kind).replace("%u", "dev-1") == LAYOUT.build(kind, "dev-1")


def test_password_entries_match_mosquitto_passwd(tmp_path: Path) -> None:
    ours = password_entry("dev-x", "pässword")
    assert check_password(ours, "pässword") and not check_password(ours, "password")
    theirs = tmp_path / "passwd"
    theirs.write_text("")
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(theirs), "dev-x", "pässword"], check=True, timeout=30)
    assert check_password(theirs.read_text(), "pässword")


def test_shipped_files_are_the_generated_ones() -> None:
    assert (REPO / "deploy/mosquitto/ppchat-fleet.conf").read_text() == broker_config()
    assert (REPO / "deploy/mosquitto/acl").read_text() == AclPolicy().text()


# -- against the broker ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password"),
    [(None, None), ("dev-stranger", "whatever"), ("coordinator", "wrong"), ("", "")],
    ids=["anonymous", "unknown-user", "wrong-password", "empty-username"],
)
def test_unknown_clients_cannot_connect(connect: Connect, username: str | None, password: str | None) -> None:
    client = connect(username, password)
    assert not client.accepted, f"{username!r} was let in"


def test_coordinator_receives_a_devices_update_and_status(connect: Connect, accounts: Accounts) -> None:
    coord, a = connect(accounts.coordinator), connect(accounts.a)
    assert coord.accepted and a.accepted
    coord.subscribe(LAYOUT.filter(TopicKind.UPDATE), LAYOUT.filter(TopicKind.STATUS))
    a.publish(LAYOUT.build(TopicKind.UPDATE, accounts.a), b"sealed-update")
    a.publish(LAYOUT.build(TopicKind.STATUS, accounts.a), b"online")
    assert coord.next() == (LAYOUT.build(TopicKind.UPDATE, accounts.a), b"sealed-update")
    assert coord.next() == (LAYOUT.build(TopicKind.STATUS, accounts.a), b"online")


@pytest.mark.parametrize("kind", [TopicKind.UPDATE, TopicKind.STATUS, TopicKind.TELEMETRY, TopicKind.ENROLL])
def test_a_device_cannot_publish_as_another(connect: Connect, accounts: Accounts, kind: TopicKind) -> None:
    coord, a = connect(accounts.coordinator), connect(accounts.a)
    coord.subscribe(LAYOUT.filter(kind))
    a.publish(LAYOUT.build(kind, accounts.b), b"forged")  # as B: dropped by the broker
    a.publish(LAYOUT.build(kind, accounts.a), b"marker")  # its own: delivered
    assert coord.next() == (LAYOUT.build(kind, accounts.a), b"marker")
    assert coord.drained() == []


def test_a_device_cannot_read_another_devices_topics(connect: Connect, accounts: Accounts) -> None:
    coord, a, b = (connect(x) for x in (accounts.coordinator, accounts.a, accounts.b))
    granted = b.subscribe(
        LAYOUT.build(TopicKind.UPDATE, accounts.a),
        LAYOUT.filter(TopicKind.UPDATE),
        "#",
        LAYOUT.filter(TopicKind.STATUS),
    )
    b.subscribe(LAYOUT.build(TopicKind.ROUNDS))
    coord.subscribe(LAYOUT.filter(TopicKind.UPDATE))
    a.publish(LAYOUT.build(TopicKind.UPDATE, accounts.a), b"a-update")
    a.publish(LAYOUT.build(TopicKind.STATUS, accounts.a), b"a-status")
    assert coord.next()[1] == b"a-update"  # the broker has routed A's update
    coord.publish(LAYOUT.build(TopicKind.ROUNDS), b"round-1")  # B may read this: the marker
    assert b.next() == (LAYOUT.build(TopicKind.ROUNDS), b"round-1")
    assert b.drained() == [], f"B received another device's messages (SUBACK codes {granted})"


def test_devices_read_rounds_releases_and_only_their_own_enrollment_reply(
    connect: Connect, accounts: Accounts
) -> None:
    coord, a, b = (connect(x) for x in (accounts.coordinator, accounts.a, accounts.b))
    for device, own in ((a, accounts.a), (b, accounts.b)):
        device.subscribe(
            LAYOUT.build(TopicKind.ROUNDS),
            LAYOUT.build(TopicKind.RELEASES),
            LAYOUT.build(TopicKind.ENROLLED, own),
        )
    b.subscribe(LAYOUT.build(TopicKind.ENROLLED, accounts.a))  # not B's to read
    coord.publish(LAYOUT.build(TopicKind.ENROLLED, accounts.a), b"welcome-a")
    coord.publish(LAYOUT.build(TopicKind.ROUNDS), b"round")
    coord.publish(LAYOUT.build(TopicKind.RELEASES), b"release")
    assert [a.next()[1] for _ in range(3)] == [b"welcome-a", b"round", b"release"]
    assert [b.next()[1] for _ in range(2)] == [b"round", b"release"]
    assert b.drained() == []


@pytest.mark.parametrize("kind", [TopicKind.ROUNDS, TopicKind.RELEASES, TopicKind.ENROLLED])
def test_a_device_cannot_speak_for_the_coordinator(
    connect: Connect, accounts: Accounts, kind: TopicKind
) -> None:
    coord, a, b = (connect(x) for x in (accounts.coordinator, accounts.a, accounts.b))
    topic = LAYOUT.build(kind, accounts.b) if kind.per_device else LAYOUT.build(kind)
    b.subscribe(topic)
    a.publish(topic, b"spoofed")
    coord.publish(topic, b"genuine")
    assert b.next() == (topic, b"genuine")
    assert b.drained() == []


# -- TLS ------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=ppchat test CA", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)  # fmt: skip
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")


def test_tls_listener(tmp_path: Path, tls_files: TlsFiles, accounts: Accounts) -> None:
    broker = FleetBroker(tmp_path, accounts.passwords, tls=tls_files)
    with broker:
        device = Client(broker, accounts.a, accounts.passwords[accounts.a], tls_ca=tls_files.cafile)
        try:
            assert device.accepted
        finally:
            device.close()
        wrong = Client(broker, accounts.a, "nope", tls_ca=tls_files.cafile)
        try:
            assert not wrong.accepted
        finally:
            wrong.close()
        plain = Client(broker, accounts.a, accounts.passwords[accounts.a])  # no TLS: no CONNACK
        try:
            assert plain.reason is None and not plain.accepted
        finally:
            plain.close()
