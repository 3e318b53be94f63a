"""The local chat socket: an asyncio Unix stream server speaking JSON lines (docs/protocol.md).

Each connection may have several chat requests in flight (at most ``max_pending_per_connection``);
their events are tagged with the request's id and written as they come. Nothing a client does can
stop the daemon or slow another client:

- bad input (not JSON, unknown type, missing field) gets an ``error`` event, the connection stays;
- a line over ``max_line_bytes`` gets ``line_too_long`` and the connection closes;
- a connection over ``max_connections`` gets ``too_many_connections`` and is closed;
- writes never block generation: events go to the transport's buffer, and a client that leaves it
  above the high-water mark for ``write_timeout_s`` (or lets it grow past a hard cap) is disconnected
  and its generations cancelled;
- a client that goes away cancels its generations (checked by the engine between tokens).

The socket is created mode ``socket.mode`` (0660), a stale socket is removed before binding (only if
nobody answers on it) and the socket is removed on exit. Peers are logged with SO_PEERCRED.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import SocketConfig
from agent.errors import AgentError, ConfigError, ProtocolError
from agent.frontdoor import ChatHandler, FrontDoor
from agent.protocol import (
    CancelledEvent,
    CancelRequest,
    ChatRequest,
    ErrorCode,
    Event,
    PingRequest,
    PongEvent,
    encode_event,
    error_event,
    parse_request,
    request_id_of,
)

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 64 * 1024
"""Above this many buffered bytes a client counts as not reading (the write timeout runs)."""
WRITE_HARD_CAP = 8 * 1024 * 1024
"""A client with this much unread output is disconnected at once."""
CANCEL_GRACE_S = 10.0
"""How long a cancelled generation of a departed client may take to stop before its task is cancelled."""
DIR_MODE = 0o755


class SocketInUse(AgentError):
    """Another process answers on the configured socket path."""

    exit_code = 75  # EX_TEMPFAIL


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"uid={self.uid},gid={self.gid},pid={self.pid}"


def peer_cred(sock: Any) -> PeerCred | None:
    """The connecting process's credentials (Linux SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def remove_stale_socket(path: Path) -> None:
    """Remove ``path`` when it is a socket nobody answers on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"socket path {path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed a stale socket at %s", path)
        return
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise SocketInUse(f"socket {path} exists and cannot be probed: {exc}") from None
    finally:
        probe.close()
    raise SocketInUse(f"another process is listening on {path}; is the agent already running?")


def _peer_hung_up(sock: Any) -> bool:
    """After EOF: True when the peer closed completely (POLLHUP), False when it only shut down writing."""
    try:
        fd = sock.fileno()
    except (AttributeError, OSError):
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return any(mask & (select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))


class _InFlight:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancel = threading.Event()
        self.task: asyncio.Task[None] | None = None


class _Connection:
    def __init__(
        self,
        server: SocketServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cred: PeerCred | None,
        number: int,
    ) -> None:
        self.server = server
        self.config = server.config
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.cred = cred
        self.name = f"socket:{cred}" if cred else f"socket:#{number}"
        self.inflight: dict[str, _InFlight] = {}
        self.closed = False
        self._drain_task: asyncio.Task[None] | None = None
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    # ---- writing: never blocks the generation -----------------------------------------------------

    def send(self, event: Event) -> None:
        if self.closed or self.transport.is_closing():
            return
        self.transport.write(encode_event(event))
        buffered = self.transport.get_write_buffer_size()
        if buffered > WRITE_HARD_CAP:
            self.abort(f"{buffered} bytes of unread output")
        elif buffered > WRITE_HIGH_WATER and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._wait_drained())

    async def _wait_drained(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), self.config.write_timeout_s)
        except asyncio.TimeoutError:
            self.abort(f"did not read its replies for {self.config.write_timeout_s:g} s")
        except (ConnectionError, OSError):
            self.abort("went away")
        finally:
            self._drain_task = None

    async def writable(self) -> None:
        """Wait while the client is behind on reading (so that its requests stop being read too)."""
        task = self._drain_task
        if task is not None:
            await asyncio.shield(task)

    def abort(self, reason: str) -> None:
        """Close now and cancel everything in flight (slow or vanished client, protocol violation)."""
        if not self.closed:
            log.info("%s: disconnecting: %s", self.name, reason)
        self.cancel_all()
        self.closed = True
        self.transport.abort()

    def cancel_all(self) -> None:
        for inflight in self.inflight.values():
            inflight.cancel.set()

    # ---- reading ----------------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("%s: connected", self.name)
        try:
            await self._read_loop()
            # The client finished sending (EOF, half-close): finish what it asked for, then close.
            await self._wait_inflight()
        finally:
            self.cancel_all()
            await self._stop_inflight()
            self.closed = True
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            log.info("%s: closed", self.name)

    async def _wait_inflight(self) -> None:
        tasks = [i.task for i in self.inflight.values() if i.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _stop_inflight(self) -> None:
        """Cancelled generations end within a token; give them a moment, then stop them hard."""
        tasks = [i.task for i in self.inflight.values() if i.task is not None and not i.task.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _read_loop(self) -> None:
        while not self.closed:
            await self.writable()
            if self.closed:
                return
            try:
                line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.config.idle_timeout_s)
            except asyncio.TimeoutError:
                if self.inflight:
                    continue
                log.info("%s: idle for %g s, closing", self.name, self.config.idle_timeout_s)
                return
            except asyncio.LimitOverrunError:
                self.send(
                    error_event(
                        None,
                        ErrorCode.LINE_TOO_LONG,
                        f"a request line may hold at most {self.config.max_line_bytes} bytes",
                    )
                )
                self.cancel_all()
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    self._dispatch(exc.partial)  # a last line without its newline
                if _peer_hung_up(self.writer.get_extra_info("socket")):
                    self.abort("went away")
                return
            except (ConnectionError, OSError):
                self.abort("went away")
                return
            if line.strip():
                self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            self.send(error_event(self._id_of(line), ErrorCode(exc.code), exc.message))
            return
        if isinstance(request, PingRequest):
            self.send(PongEvent(id=request.id))
        elif isinstance(request, CancelRequest):
            target = self.inflight.get(request.target)
            if target is not None:
                target.cancel.set()
            self.send(CancelledEvent(id=request.id, target=request.target, found=target is not None))
        else:
            self._start_chat(request)

    @staticmethod
    def _id_of(line: bytes) -> str | None:
        try:
            return request_id_of(json.loads(line))
        except (ValueError, RecursionError):
            return None

    def _start_chat(self, request: ChatRequest) -> None:
        if request.id in self.inflight:
            self.send(
                error_event(request.id, ErrorCode.DUPLICATE_ID, f"request {request.id!r} is still in flight")
            )
            return
        if len(self.inflight) >= self.config.max_pending_per_connection:
            self.send(
                error_event(
                    request.id,
                    ErrorCode.TOO_MANY_REQUESTS,
                    f"at most {self.config.max_pending_per_connection} requests in flight per connection",
                )
            )
            return
        if self.server.shutting_down:
            self.send(error_event(request.id, ErrorCode.SHUTTING_DOWN, "the agent is shutting down"))
            return
        inflight = _InFlight(request.id)
        self.inflight[request.id] = inflight
        inflight.task = self.server.spawn(
            self._chat(request, inflight), name=f"chat {self.name} {request.id}"
        )

    async def _chat(self, request: ChatRequest, inflight: _InFlight) -> None:
        events = self.server.handler.handle(
            request, source=FrontDoor.SOCKET, cancel=inflight.cancel, client=self.name
        )
        finished = False
        try:
            async for event in events:
                self.send(event)
                finished = event.type.value != "delta"
        except asyncio.CancelledError:
            if not finished:
                self.send(error_event(request.id, ErrorCode.SHUTTING_DOWN, "the agent is shutting down"))
            raise
        finally:
            self.inflight.pop(request.id, None)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


class SocketServer:
    """The Unix socket front door. :meth:`serve` runs until cancelled or :meth:`shutdown`."""

    def __init__(self, handler: ChatHandler, config: SocketConfig, path: Path) -> None:
        self.handler = handler
        self.config = config
        self.path = Path(path)
        self.shutting_down = False
        self._connections: set[_Connection] = set()
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._chat_tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._failure: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def requests_in_flight(self) -> int:
        return len(self._chat_tasks)

    async def start(self) -> None:
        """Bind and listen (removing a stale socket first)."""
        self._failure = asyncio.get_running_loop().create_future()
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=DIR_MODE)
        remove_stale_socket(self.path)
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(self.path), limit=self.config.max_line_bytes
            )
            os.chmod(self.path, self.config.mode)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        self._inode = os.lstat(self.path).st_ino
        log.info("listening on %s (mode %o)", self.path, self.config.mode)

    async def serve(self) -> None:
        """Start (unless started) and serve until :meth:`shutdown`, cancellation, or a bug in one of
        its tasks (raised here, for the supervisor)."""
        if self._server is None:
            await self.start()
        assert self._failure is not None
        stopped = asyncio.ensure_future(self._stopped.wait())
        waiters: list[asyncio.Future[Any]] = [self._failure, stopped]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if self._failure.done():
                self._failure.result()
        finally:
            stopped.cancel()
            await self.shutdown(grace_s=0.0)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """A chat task of this server; an unexpected exception in it stops the server."""
        return self._track(asyncio.create_task(coro, name=name), self._chat_tasks)

    def _track(self, task: asyncio.Task[None], group: set[asyncio.Task[None]]) -> asyncio.Task[None]:
        group.add(task)
        task.add_done_callback(group.discard)
        task.add_done_callback(self._check_task)
        return task

    def _check_task(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._failure is not None and not self._failure.done():
            log.error("socket server task %r failed", task.get_name(), exc_info=exc)
            self._failure.set_exception(exc)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cred = peer_cred(writer.get_extra_info("socket"))
        self._count += 1
        if self.shutting_down or len(self._connections) >= self.config.max_connections:
            code, message = (
                (ErrorCode.SHUTTING_DOWN, "the agent is shutting down")
                if self.shutting_down
                else (ErrorCode.TOO_MANY_CONNECTIONS, f"at most {self.config.max_connections} connections")
            )
            log.warning("refusing a connection from %s: %s", cred, code.value)
            writer.write(encode_event(error_event(None, code, message)))
            writer.close()
            return
        conn = _Connection(self, reader, writer, cred, self._count)
        self._connections.add(conn)
        task = self._track(asyncio.create_task(conn.run(), name=conn.name), self._conn_tasks)
        task.add_done_callback(lambda _: self._connections.discard(conn))
        # Wait without re-raising: a failure reaches serve() through _check_task.
        await asyncio.wait([task])

    async def shutdown(self, *, grace_s: float = 5.0) -> None:
        """Stop accepting; cancel in-flight replies, each client getting its ``done`` (finish_reason
        ``cancelled``) or, after ``grace_s``, an ``error`` ``shutting_down``; close; remove the socket."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.cancel_all()
        if self._chat_tasks and grace_s > 0:
            await asyncio.wait(list(self._chat_tasks), timeout=grace_s)
        for group in (self._chat_tasks, self._conn_tasks):
            tasks = list(group)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        self._remove_socket()
        self._stopped.set()

    def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
                log.info("removed %s", self.path)
        self._inode = None
