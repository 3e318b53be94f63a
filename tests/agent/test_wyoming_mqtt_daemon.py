"""``agent run`` starts the Wyoming and MQTT doors when the config enables them, and stops them
cleanly on SIGTERM. ``--no-model``: this is about the wiring (the real model is in the e2e tests)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.handle import NotHandled
from wyoming.info import Describe, Info

from tests.agent.daemon_support import daemon_config, running_daemon
from tests.mosquitto import MosquittoBroker, free_port


@contextmanager
def mosquitto_sub(broker: MosquittoBroker, topic: str, count: int) -> Iterator[subprocess.Popen[str]]:
    """``mosquitto_sub -C count``, killed on the way out if it has not finished."""
    where = ["-h", broker.host, "-p", str(broker.port)]
    proc = subprocess.Popen(
        ["mosquitto_sub", *where, "-t", topic, "-q", "1", "-C", str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def wyoming_turn(port: int) -> tuple[Info, NotHandled]:
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=10, read_timeout=30) as client:
        await client.write_event(Describe().event())
        info = await client.read_event()
        await client.write_event(Transcript(text="hello", context={"conversation_id": "ha-1"}).event())
        reply = await client.read_event()
    assert info is not None and reply is not None
    return Info.from_event(info), NotHandled.from_event(reply)


def test_the_daemon_serves_both_doors_and_stops_them(
    short_tmp: Path, mosquitto_broker: MosquittoBroker
) -> None:
    port = free_port()
    prefix = f"ppchat/test/{uuid.uuid4().hex[:8]}"
    sections = daemon_config(
        short_tmp,
        None,
        wyoming={"enabled": True, "uri": f"tcp://127.0.0.1:{port}"},
        mqtt_chat={
            "enabled": True,
            "host": "127.0.0.1",
            "port": mosquitto_broker.port,
            "topic_prefix": prefix,
        },
    )
    # retained "online" (or live), then "offline"
    with mosquitto_sub(mosquitto_broker, f"{prefix}/status", 2) as status:
        with running_daemon(short_tmp, sections, extra_args=("--no-model",)) as daemon:
            info, reply = asyncio.run(wyoming_turn(port))
            assert info.handle[0].name == "ppchat" and info.handle[0].models[0].name == "none"
            assert reply.text == "the agent runs without a model"
            with mosquitto_sub(mosquitto_broker, f"{prefix}-client/r", 1) as replies:
                out = ""
                for i in range(50):  # until the subscriber is in (no ready signal without -d)
                    body = {"id": f"m{i}", "type": "chat", "text": "hi", "reply_to": f"{prefix}-client/r"}
                    topic = f"{prefix}/request"
                    pub = [
                        "mosquitto_pub",
                        "-p",
                        str(mosquitto_broker.port),
                        "-t",
                        topic,
                        "-m",
                        json.dumps(body),
                    ]
                    subprocess.run(pub, check=True, timeout=10)
                    try:
                        out, _ = replies.communicate(timeout=0.2)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            assert '"code":"engine_error"' in out and '"id":"m' in out, out
            assert daemon.stop() == 0, daemon.log()
        out, _ = status.communicate(timeout=10)
    assert out.split() == ["online", "offline"]
    log = daemon.log()
    assert "wyoming: serving on" in log and "mqtt_chat: connected" in log
    assert "Traceback" not in log and " ERROR " not in log
