"""MQTT chat test support: a running door, and talking to it as a user's script would
(``mosquitto_pub`` / ``mosquitto_sub``)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from agent.config import MqttChatConfig
from agent.frontdoor import ChatHandler
from agent.mqtt_chat import MqttChatDoor, decode_mqtt_event
from agent.protocol import Event
from tests.mosquitto import MosquittoBroker

TIMEOUT = 15.0


@dataclass(frozen=True)
class Received:
    topic: str
    correlation_data: str
    payload: str

    def event(self) -> tuple[str | int | None, Event]:
        return decode_mqtt_event(self.payload)


class Sub:
    """``mosquitto_sub`` on one topic filter, started and subscribed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, broker: MosquittoBroker, topic: str, *, v5: bool = False) -> Sub:
        args = ["-h", broker.host, "-p", str(broker.port), "-t", topic, "-q", "1", "-d"]
        args += ["-F", "MSG\t%t\t%D\t%p"] + (["-V", "5"] if v5 else [])
        proc = await asyncio.create_subprocess_exec(  # stdbuf: line-buffered even into a pipe
            "stdbuf",
            "-oL",
            "mosquitto_sub",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        sub = cls(proc)
        try:
            while True:  # -d prints "Subscribed" once the SUBACK is in: publishing before would race
                line = await sub._line()
                if line.startswith("Subscribed"):
                    return sub
        except BaseException:
            await sub.close()
            raise

    async def _line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
        assert raw, "mosquitto_sub ended"
        return raw.decode().rstrip("\n")

    async def next(self) -> Received:
        while True:
            line = await self._line()
            if line.startswith("MSG\t"):
                _, topic, corr, payload = line.split("\t", 3)
                return Received(topic, corr, payload)

    async def until_final(self) -> list[Received]:
        """Messages up to the first that is not a delta (done, error, pong, cancelled)."""
        out = []
        while True:
            msg = await self.next()
            out.append(msg)
            if json.loads(msg.payload)["type"] != "delta":
                return out

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()


async def pub(broker: MosquittoBroker, topic: str, payload: str | bytes | None, *extra: str) -> None:
    """``mosquitto_pub`` at QoS 1; the payload goes through stdin (``None``: an empty message)."""
    data = payload.encode() if isinstance(payload, str) else payload
    source = ["-n"] if data is None else ["-s"]
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *["-h", broker.host, "-p", str(broker.port), "-t", topic, "-q", "1", *source, *extra],
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(data), TIMEOUT)
    assert proc.returncode == 0, err.decode()


def chat(rid: str, text: str, reply_to: str | None, **more: Any) -> str:
    obj: dict[str, Any] = {"v": 1, "id": rid, "type": "chat", "text": text, **more}
    if reply_to is not None:
        obj["reply_to"] = reply_to
    return json.dumps(obj)


async def start_door(
    handler: ChatHandler, broker: MosquittoBroker, prefix: str, **settings: Any
) -> tuple[MqttChatDoor, asyncio.Task[None]]:
    config = MqttChatConfig(enabled=True, host=broker.host, port=broker.port, topic_prefix=prefix, **settings)
    door = MqttChatDoor(config, handler, device_name="test-device")
    task = asyncio.create_task(door.run())
    await asyncio.wait_for(door.wait_connected(), TIMEOUT)
    return door, task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
