"""A QMP monitor socket: one client at a time, QEMU's framing, batching writes per loop tick."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from typing import Any, Protocol

#: QEMU's monitor turns every "\n" of its output into "\r\n" (seen on 7.2: raw bytes)
EOL = "\r\n"
#: abort a client that does not read and lets this much output pile up
MAX_PENDING_OUTPUT = 64 * 1024 * 1024

EventKey = tuple[str, str | None, str | None, str | None]


class CommandHandler(Protocol):
    """What a monitor serves: the greeting, and the answer to each command (a `SimVM`).  The
    monitor knows nothing else of the VM, so the dependency runs one way: vm -> monitor."""

    def greeting(self) -> dict[str, Any]: ...

    def dispatch(self, conn: Connection, obj: Any) -> None: ...


class QMPError(Exception):
    """A QMP error reply: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _remove_stale(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Connection:
    """One negotiated (or negotiating) QMP client."""

    def __init__(self, monitor: Monitor, writer: asyncio.StreamWriter) -> None:
        self.monitor = monitor
        self.writer = writer
        self.negotiated = False
        self.closed = False
        self._out: list[str] = []
        self._flush_handle: asyncio.Handle | None = None
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def queue(self, text: str) -> None:
        if self.closed:
            return
        self._out.append(text)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if not self._out or self.closed:
            self._out.clear()
            return
        data = "".join(self._out).encode()
        self._out.clear()
        transport = self.writer.transport
        if transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            transport.abort()
            self.closed = True

    def send(self, obj: Any) -> None:
        self.queue(json.dumps(obj) + EOL)

    def feed(self, data: bytes) -> None:
        self._buf += data.decode("utf-8", errors="replace")
        while True:
            buf = self._buf.lstrip(" \t\r\n")
            if not buf:
                self._buf = ""
                return
            try:
                obj, end = self._decoder.raw_decode(buf)
            except json.JSONDecodeError:
                nl = buf.find("\n")
                if nl < 0:
                    self._buf = buf  # incomplete: wait for more input
                    return
                bad = buf[:nl].strip()
                self._buf = buf[nl + 1 :]
                word = bad.split()[0] if bad.split() else bad
                if word[:1].isalpha():
                    desc = f"JSON parse error, invalid keyword '{word.rstrip(',:}]')}'"
                else:
                    desc = f"JSON parse error, stray '{word[:1]}'"
                self.send({"error": {"class": "GenericError", "desc": desc}})
                continue
            self._buf = buf[end:]
            self.monitor.handler.dispatch(self, obj)
            if self.closed:
                return


class Monitor:
    """A ``-qmp unix:PATH,server=on,wait=off`` monitor of a :class:`SimVM`."""

    def __init__(self, handler: CommandHandler, path: str) -> None:
        self.handler = handler
        self.path = path
        self.conn: Connection | None = None
        self.delivered: Counter[EventKey] = Counter()
        self._server: asyncio.AbstractServer | None = None
        self._lock = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        _remove_stale(self.path)
        self._lock = asyncio.Lock()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    def send_event(self, line: str, n: int, key: EventKey) -> None:
        conn = self.conn
        if conn is not None and conn.negotiated and not conn.closed:
            conn.queue(line if n == 1 else line * n)
            self.delivered[key] += n

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn: Connection | None = None
        try:
            async with self._lock:  # a QEMU monitor serves one client at a time
                if writer.transport.is_closing():
                    return
                conn = Connection(self, writer)
                self.conn = conn
                conn.send(self.handler.greeting())
                while not conn.closed:
                    data = await reader.read(65536)
                    if not data:
                        break
                    conn.feed(data)
                conn.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            if conn is not None:
                conn.closed = True
                if self.conn is conn:
                    self.conn = None
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def close(self, abort: bool = False, remove: bool = True) -> None:
        """Stop listening and drop every connection (``abort``: without flushing)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if remove:
            _remove_stale(self.path)
        conn = self.conn
        if conn is not None and not abort:
            conn.flush()
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait_for(conn.writer.drain(), 2.0)
        for writer in list(self._writers):
            if abort:
                writer.transport.abort()
            else:
                writer.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self.conn = None


class HungServer:
    """A unix socket that accepts connections and never sends a byte."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> None:
        _remove_stale(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        _remove_stale(self.path)

    async def __aenter__(self) -> HungServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
