"""The chat socket on the real engine: round trips, streaming, cancel, concurrency, bad clients."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.config import SocketConfig
from agent.errors import ConfigError
from agent.protocol import CancelledEvent, DeltaEvent, DoneEvent, ErrorCode, ErrorEvent, PongEvent
from agent.socket_server import SocketInUse, SocketServer, remove_stale_socket
from tests.agent.chat_support import GREEDY, LONG_REPLY, ChatSocket, last, running_chat_socket


async def test_round_trip_streams_in_order(chat_socket: ChatSocket) -> None:
    client = await chat_socket.client()
    events = await client.chat("1", "What can you do?", options=GREEDY)
    done = last(events)
    deltas = [e for e in events[:-1] if isinstance(e, DeltaEvent)]
    assert len(deltas) == len(events) - 1 >= 1
    assert "".join(d.text for d in deltas) == done.text
    assert done.id == "1" and done.finish_reason.value in ("stop", "length")
    assert done.usage.completion_tokens >= 1 and done.timings.total_s > 0
    assert done.conversation_id
    # the same conversation continues, on the same connection
    again = last(await client.chat("2", "Thanks", conversation_id=done.conversation_id, options=GREEDY))
    assert again.conversation_id == done.conversation_id
    turns = await chat_socket.store.turns(done.conversation_id)
    assert len(turns) == 4
    await client.close()


async def test_socket_file_mode_and_removal(chat_engine: Any, short_tmp: Path) -> None:
    async with running_chat_socket(chat_engine, short_tmp) as running:
        st = os.lstat(running.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert not running.path.exists()


async def test_ping_and_non_streaming(chat_socket: ChatSocket) -> None:
    client = await chat_socket.client()
    await client.send({"id": "p", "type": "ping"})
    assert await client.event() == PongEvent(id="p")
    events = await client.chat("n", "hello", stream=False, options=GREEDY)
    assert len(events) == 1 and last(events).text
    await client.close()


async def test_messages_request_is_stateless(chat_socket: ChatSocket) -> None:
    client = await chat_socket.client()
    await client.send(
        {"id": "m", "type": "chat", "messages": [{"role": "user", "content": "hi"}], "options": GREEDY}
    )
    done = last(await client.until_end("m"))
    assert done.conversation_id is None
    assert await chat_socket.store.count_conversations() == 0
    await client.close()


async def test_cancel_stops_the_reply(chat_socket: ChatSocket) -> None:
    client = await chat_socket.client()
    await client.send(
        {"id": "long", "type": "chat", "text": "go", "options": {**LONG_REPLY, "max_tokens": 600}}
    )
    first = await client.event()
    assert isinstance(first, DeltaEvent) and first.id == "long"
    await client.send({"id": "c", "type": "cancel", "target": "long"})
    await client.send({"id": "c2", "type": "cancel", "target": "nothing"})
    acks: list[CancelledEvent] = []
    done: DoneEvent | None = None
    while done is None or len(acks) < 2:
        ev = await client.event()
        if isinstance(ev, CancelledEvent):
            acks.append(ev)
        elif isinstance(ev, DoneEvent):
            done = ev
    assert {(a.id, a.found) for a in acks} == {("c", True), ("c2", False)}
    assert done.finish_reason.value == "cancelled" and done.usage.completion_tokens < 600
    # The connection goes on serving.
    assert last(await client.chat("after", "hello", options={**GREEDY, "max_tokens": 4})).id == "after"
    await client.close()


async def test_several_requests_in_flight_on_one_connection(chat_engine: Any, short_tmp: Path) -> None:
    async with running_chat_socket(
        chat_engine, short_tmp, socket=SocketConfig(max_pending_per_connection=2)
    ) as cs:
        client = await cs.client()
        opts = {**LONG_REPLY, "max_tokens": 40}
        lines = [
            {"id": "a", "type": "chat", "text": "request a", "options": opts},
            {"id": "b", "type": "chat", "text": "request b", "options": opts},
            {"id": "c", "type": "chat", "text": "request c", "options": opts},  # over the limit
            {"id": "a", "type": "chat", "text": "again", "options": opts},  # a is still in flight
        ]
        await client.send_line(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        events = []
        dones: dict[str, DoneEvent] = {}
        while set(dones) != {"a", "b"}:
            ev = await client.event()
            events.append(ev)
            if isinstance(ev, DoneEvent):
                dones[ev.id] = ev
        errors = {(e.id, e.code) for e in events if isinstance(e, ErrorEvent)}
        assert errors == {("c", ErrorCode.TOO_MANY_REQUESTS), ("a", ErrorCode.DUPLICATE_ID)}
        for rid, done in dones.items():
            assert "".join(e.text for e in events if isinstance(e, DeltaEvent) and e.id == rid) == done.text
        await client.close()


async def test_concurrent_conversations_on_separate_connections(chat_socket: ChatSocket) -> None:
    async def converse(name: str) -> tuple[str, list[str]]:
        client = await chat_socket.client()
        first = last(await client.chat(f"{name}1", f"Hello, I am {name}", options=GREEDY))
        assert first.conversation_id is not None
        second = last(
            await client.chat(f"{name}2", "Who am I?", conversation_id=first.conversation_id, options=GREEDY)
        )
        await client.close()
        assert second.usage.prompt_tokens > first.usage.prompt_tokens
        return first.conversation_id, [first.text, second.text]

    results = await asyncio.gather(*(converse(n) for n in ("ann", "bob", "cyd")))
    assert len({cid for cid, _ in results}) == 3
    for cid, replies in results:
        turns = await chat_socket.store.turns(cid)
        assert [t.content for t in turns if t.role.value == "assistant"] == replies


BAD_LINES = [
    (b"this is not json\n", ErrorCode.BAD_JSON, None),
    (b"[1, 2, 3]\n", ErrorCode.BAD_JSON, None),
    (b'{"id": "x1", "type": "dance"}\n', ErrorCode.UNKNOWN_TYPE, "x1"),
    (b'{"id": "x2"}\n', ErrorCode.UNKNOWN_TYPE, "x2"),
    (b'{"id": "x3", "type": "chat"}\n', ErrorCode.BAD_REQUEST, "x3"),
    (b'{"type": "chat", "text": "hi"}\n', ErrorCode.BAD_REQUEST, None),
    (
        b'{"id": "x4", "type": "chat", "text": "hi", "options": {"max_tokens": -1}}\n',
        ErrorCode.BAD_REQUEST,
        "x4",
    ),
    (b'{"id": "x5", "type": "chat", "text": "hi", "surprise": 1}\n', ErrorCode.BAD_REQUEST, "x5"),
    (b'{"id": "x6", "type": "cancel"}\n', ErrorCode.BAD_REQUEST, "x6"),
    (b'{"v": 2, "id": "x7", "type": "ping"}\n', ErrorCode.UNSUPPORTED_VERSION, "x7"),
    (
        b'{"id": "x8", "type": "chat", "messages": [{"role": "robot", "content": "x"}]}\n',
        ErrorCode.BAD_REQUEST,
        "x8",
    ),
    (b"\xff\xfe not utf-8\n", ErrorCode.BAD_JSON, None),
    (b"[" * 100_000 + b"\n", ErrorCode.BAD_JSON, None),
]


@pytest.mark.parametrize(
    ("line", "code", "request_id"), BAD_LINES, ids=[c.value + str(i) for i, (_, c, _) in enumerate(BAD_LINES)]
)
async def test_bad_input_gets_an_error_and_the_connection_stays(
    chat_socket: ChatSocket, line: bytes, code: ErrorCode, request_id: str | None
) -> None:
    client = await chat_socket.client()
    await client.send_line(line)
    ev = await client.event()
    assert isinstance(ev, ErrorEvent) and ev.code is code and ev.id == request_id, ev
    await client.send({"id": "alive", "type": "ping"})
    assert await client.event() == PongEvent(id="alive")
    await client.close()


async def test_line_too_long_closes_only_that_connection(chat_engine: Any, short_tmp: Path) -> None:
    async with running_chat_socket(chat_engine, short_tmp, socket=SocketConfig(max_line_bytes=4096)) as cs:
        other = await cs.client()
        await other.send(
            {"id": "o", "type": "chat", "text": "hello", "options": {**LONG_REPLY, "max_tokens": 60}}
        )
        bad = await cs.client()
        await bad.send_line(b'{"id": "big", "type": "chat", "text": "' + b"a" * 5000 + b'"}\n')
        ev = await bad.event()
        assert isinstance(ev, ErrorEvent) and ev.code is ErrorCode.LINE_TOO_LONG
        assert await bad.closed_by_peer()
        # exactly at the limit is fine
        ok = await cs.client()
        body = b'{"id": "p", "type": "ping", "v": 1}'
        await ok.send_line(body + b" " * (4096 - len(body)) + b"\n")
        assert await ok.event() == PongEvent(id="p")
        assert last(await other.until_end("o")).finish_reason.value in ("length", "stop")
        for c in (other, bad, ok):
            await c.close()


async def test_too_many_connections(chat_engine: Any, short_tmp: Path) -> None:
    async with running_chat_socket(chat_engine, short_tmp, socket=SocketConfig(max_connections=2)) as cs:
        a, b = await cs.client(), await cs.client()
        for c in (a, b):
            await c.send({"id": "p", "type": "ping"})
            assert isinstance(await c.event(), PongEvent)
        extra = await cs.client()
        ev = await extra.event()
        assert isinstance(ev, ErrorEvent) and ev.code is ErrorCode.TOO_MANY_CONNECTIONS and ev.id is None
        assert await extra.closed_by_peer()
        await a.close()
        for _ in range(100):
            if cs.server.connections < 2:
                break
            await asyncio.sleep(0.02)
        again = await cs.client()
        await again.send({"id": "p", "type": "ping"})
        assert isinstance(await again.event(), PongEvent)
        for c in (b, extra, again):
            await c.close()


async def test_client_that_disconnects_cancels_its_generation(chat_socket: ChatSocket) -> None:
    client = await chat_socket.client()
    await client.send(
        {"id": "gone", "type": "chat", "text": "go", "options": {**LONG_REPLY, "max_tokens": 700}}
    )
    assert isinstance(await client.event(), DeltaEvent)
    client.writer.transport.abort()
    final = await chat_socket.handler.wait_finished("gone")
    assert isinstance(final, DoneEvent)
    assert final.finish_reason.value == "cancelled" and final.usage.completion_tokens < 700
    assert chat_socket.server.requests_in_flight == 0


async def test_half_closed_client_still_gets_its_reply(chat_socket: ChatSocket) -> None:
    client = await chat_socket.client()
    await client.send_line(
        json.dumps({"id": "h", "type": "chat", "text": "hello", "options": GREEDY}).encode()
    )
    client.writer.write_eof()  # no newline, then shutdown(SHUT_WR): like `printf ... | socat`
    events = await client.until_end("h")
    assert last(events).text
    assert await client.closed_by_peer()
    await client.close()


async def test_slow_reader_is_disconnected_and_others_are_undisturbed(
    chat_engine: Any, short_tmp: Path
) -> None:
    async with running_chat_socket(chat_engine, short_tmp, socket=SocketConfig(write_timeout_s=0.1)) as cs:
        path = str(cs.path)

        def flood(request_id: str, seed: int) -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            options = {**LONG_REPLY, "max_tokens": 900, "seed": seed}
            s.sendall(
                json.dumps({"id": request_id, "type": "chat", "text": "go", "options": options}).encode()
            )
            s.sendall(b"\n")
            s.setblocking(False)
            ping = b"".join(json.dumps({"id": f"p{i}", "type": "ping"}).encode() + b"\n" for i in range(200))
            try:
                for _ in range(2000):
                    s.send(ping)
            except BlockingIOError:
                pass
            return s

        slow = await asyncio.to_thread(flood, "slow", 3)
        try:
            final = await cs.handler.wait_finished("slow", timeout=60)
            for _ in range(200):
                if cs.server.connections == 0:
                    break
                await asyncio.sleep(0.05)
            assert cs.server.connections == 0  # the reader that stopped reading is gone
        finally:
            slow.close()
        # The reply was cancelled when its reader was dropped, unless the tiny model (2,500 tokens/s)
        # ended its turn first (test_client_that_disconnects_cancels_its_generation pins the cancel).
        assert isinstance(final, DoneEvent)
        assert final.finish_reason.value in ("cancelled", "stop"), final
        other = await cs.client()
        assert last(await other.chat("o", "hello", options=GREEDY)).text
        await other.close()


async def test_peer_credentials_are_logged(chat_socket: ChatSocket, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.socket_server")
    client = await chat_socket.client()
    await client.send({"id": "p", "type": "ping"})
    await client.event()
    await client.close()
    assert f"uid={os.getuid()},gid={os.getgid()},pid={os.getpid()}" in caplog.text


async def test_idle_connection_is_closed(chat_engine: Any, short_tmp: Path) -> None:
    async with running_chat_socket(chat_engine, short_tmp, socket=SocketConfig(idle_timeout_s=0.2)) as cs:
        client = await cs.client()
        assert await client.closed_by_peer(timeout=5)
        await client.close()


def test_stale_socket_is_removed_and_a_live_one_refused(short_tmp: Path) -> None:
    path = short_tmp / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: nobody answers
    remove_stale_socket(path)
    assert not path.exists()

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(SocketInUse):
            remove_stale_socket(path)
        assert path.exists()
    finally:
        live.close()

    path.unlink()
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        remove_stale_socket(path)
    assert path.read_text() == "precious"


async def test_server_starts_over_a_stale_socket(chat_engine: Any, short_tmp: Path) -> None:
    path = short_tmp / "run" / "agent.sock"
    path.parent.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    async with running_chat_socket(chat_engine, short_tmp) as cs:
        client = await cs.client()
        await client.send({"id": "p", "type": "ping"})
        assert isinstance(await client.event(), PongEvent)
        await client.close()


async def test_shutdown_cancels_in_flight_and_refuses_new(chat_engine: Any, short_tmp: Path) -> None:
    async with running_chat_socket(chat_engine, short_tmp) as cs:
        client = await cs.client()
        await client.send(
            {"id": "l", "type": "chat", "text": "go", "options": {**LONG_REPLY, "max_tokens": 800}}
        )
        assert isinstance(await client.event(), DeltaEvent)
        await cs.server.shutdown(grace_s=5.0)
        events = await client.until_end("l")
        final = events[-1]
        assert (isinstance(final, DoneEvent) and final.finish_reason.value in ("cancelled", "stop")) or (
            isinstance(final, ErrorEvent) and final.code is ErrorCode.SHUTTING_DOWN
        )
        assert await client.closed_by_peer()
        assert not cs.path.exists()
        await client.close()


async def test_a_bug_in_the_handler_stops_the_server(short_tmp: Path) -> None:
    """Not a client's doing: the failure reaches serve() (the supervisor), it is not swallowed."""

    class Broken:
        async def handle(self, request: Any, *, source: Any, cancel: Any, client: str) -> Any:
            raise RuntimeError("bug")
            yield  # pragma: no cover

    server = SocketServer(Broken(), SocketConfig(), short_tmp / "b.sock")
    serving = asyncio.create_task(server.serve())
    for _ in range(100):
        if (short_tmp / "b.sock").exists():
            break
        await asyncio.sleep(0.01)
    _reader, writer = await asyncio.open_unix_connection(str(short_tmp / "b.sock"))
    writer.write(b'{"id": "x", "type": "chat", "text": "hi"}\n')
    with pytest.raises(RuntimeError, match="bug"):
        await asyncio.wait_for(serving, 10)
    assert not (short_tmp / "b.sock").exists()
    writer.close()


async def test_misbehaving_clients_never_disturb_a_good_one(chat_engine: Any, short_tmp: Path) -> None:
    """While one client streams a reply, others send garbage, overlong lines, floods, vanish mid-reply
    and knock on a full server: the good client's reply arrives whole, and the server keeps serving."""
    config = SocketConfig(max_connections=4, max_line_bytes=4096, write_timeout_s=0.2)
    async with running_chat_socket(chat_engine, short_tmp, socket=config) as cs:
        good = await cs.client()
        request = {"id": "good", "type": "chat", "text": "go", "options": {**LONG_REPLY, "max_tokens": 300}}
        await good.send(request)

        async def garbage() -> None:
            c = await cs.client()
            for line in (b"{{{\n", b'{"id": 1}\n', b"\x00\x01\n", b'{"id": "g", "type": "chat"}\n'):
                await c.send_line(line)
                assert isinstance(await c.event(), ErrorEvent)
            await c.send_line(b"x" * 5000 + b"\n")
            assert isinstance(await c.event(), ErrorEvent)
            assert await c.closed_by_peer()

        async def vanisher() -> None:
            c = await cs.client()
            await c.send(
                {"id": "v", "type": "chat", "text": "go", "options": {**LONG_REPLY, "max_tokens": 300}}
            )
            c.writer.transport.abort()

        async def knocker() -> None:
            extra = [await cs.client() for _ in range(4)]
            refused = 0
            for c in extra:
                try:  # a refused connection gets its error at once; an accepted one stays silent
                    ev = await c.event(timeout=0.5)
                except (asyncio.TimeoutError, EOFError, ConnectionError):
                    continue
                refused += isinstance(ev, ErrorEvent) and ev.code is ErrorCode.TOO_MANY_CONNECTIONS
            assert refused >= 1
            for c in extra:
                await c.close()

        def flood() -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(cs.path))
            except OSError:
                return
            s.setblocking(False)
            ping = b'{"id": "f", "type": "ping"}\n' * 500
            try:
                for _ in range(500):
                    s.send(ping)
            except (BlockingIOError, ConnectionError):
                pass
            s.close()

        await asyncio.gather(garbage(), vanisher(), knocker(), asyncio.to_thread(flood))
        events = await good.until_end("good")
        done = last(events)
        assert done.finish_reason.value in ("length", "stop")
        assert "".join(e.text for e in events if isinstance(e, DeltaEvent)) == done.text
        # and the server still serves new clients
        for _ in range(100):
            if cs.server.connections <= 1:
                break
            await asyncio.sleep(0.05)
        fresh = await cs.client()
        assert last(await fresh.chat("after", "hello", options=GREEDY)).text
        await fresh.close()
        await good.close()
