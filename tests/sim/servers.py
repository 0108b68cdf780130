"""Purpose-built misbehaving QMP servers (asyncio unix servers) for the fault suite.

`FakeQMP` speaks just enough QMP for the exporter to establish a session on a VM with one
virtio-blk disk (``virtio-disk0``, retry policy).  Each fault subclasses it and overrides one
hook: `greet` (what is sent on accept), `on_command` (how a command is answered: normally,
late, never, with garbage, by closing) or `after_established` (what happens once the exporter
watches: an event flood, a 10 MB line, silence).  Connections are numbered from 1 so a fault
can hit the first session only and let the exporter recover on the next one.

`watching` runs a real `VMWatcher` in this process against such a server: the watcher's public
seam (a QMP socket in, `VMState` and the sink out), for tests that feed it events or commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from exporter.config import Config, QMPConfig
from exporter.model.sink import EventSink
from exporter.model.state import VMState
from exporter.qmp_watch import VMWatcher
from tests.support.waits import wait_for

EOL = b"\r\n"
DISK_QDEV = "/machine/peripheral/virtio-disk0/virtio-backend"
DISK_NODE = "#block123"


def greeting() -> dict[str, Any]:
    return {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": "fake"},
            "capabilities": [],
        }
    }


def io_error_event(seconds: int, micro: int = 0, action: str = "retry") -> dict[str, Any]:
    return {
        "timestamp": {"seconds": seconds, "microseconds": micro},
        "event": "BLOCK_IO_ERROR",
        "data": {
            "device": "drive-virtio-disk0",
            "node-name": DISK_NODE,
            "operation": "write",
            "action": action,
            "reason": "Input/output error",
        },
    }


class FakeConn:
    """One accepted client."""

    def __init__(self, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.n = n
        self.reader = reader
        self.writer = writer
        self.commands: list[str] = []

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, obj: Any) -> None:
        await self.send_raw(json.dumps(obj).encode() + EOL)

    async def reply(self, msg: dict[str, Any], value: Any) -> None:
        out: dict[str, Any] = {"return": value}
        if "id" in msg:
            out["id"] = msg["id"]
        await self.send(out)

    async def error(self, msg: dict[str, Any], cls: str, desc: str) -> None:
        out: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
        if "id" in msg:
            out["id"] = msg["id"]
        await self.send(out)

    def close(self) -> None:
        self.writer.close()


class FakeQMP:
    """A scriptable QMP server; the default behaviour is a healthy one-disk VM."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self.connections = 0  # accepted so far
        self.established = 0  # sessions that reached query-blockstats
        self.conns: list[FakeConn] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- hooks ---------------------------------------------------------------------------

    async def greet(self, conn: FakeConn) -> None:
        await conn.send(greeting())

    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        cmd = str(msg.get("execute"))
        await self.answer(conn, msg, cmd)

    async def after_established(self, conn: FakeConn) -> None:
        """Runs (as a task) after the first query-blockstats answer of each connection."""

    # -- the healthy VM ------------------------------------------------------------------

    def value(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "qmp_capabilities":
            return {}
        if cmd == "query-name":
            return {"name": self.name}
        if cmd == "query-uuid":
            return {"UUID": "00000000-0000-0000-0000-000000000000"}
        if cmd == "query-version":
            return {"qemu": {"major": 8, "minor": 2, "micro": 0}, "package": "fake"}
        if cmd == "query-status":
            return {"status": "running", "singlestep": False, "running": True}
        if cmd == "device-list-properties":
            return [{"name": "retry_interval", "type": "BlockdevRetryInterval"}]
        if cmd == "query-block":
            return [
                {
                    "device": "drive-virtio-disk0",
                    "qdev": DISK_QDEV,
                    "locked": False,
                    "removable": False,
                    "type": "unknown",
                    "inserted": {"node-name": DISK_NODE, "drv": "raw", "ro": False},
                }
            ]
        if cmd == "qom-get":
            return {
                "type": "virtio-blk-pci",
                "werror": "retry",
                "rerror": "retry",
                "retry_interval": 1000,
                "retry_timeout": 10000,
            }.get(str(args.get("property")))
        if cmd == "query-blockstats":
            return [{"device": "drive-virtio-disk0", "qdev": DISK_QDEV, "stats": {"wr_operations": 1}}]
        return None

    async def answer(self, conn: FakeConn, msg: dict[str, Any], cmd: str) -> None:
        args = msg.get("arguments") if isinstance(msg.get("arguments"), dict) else {}
        assert isinstance(args, dict)
        value = self.value(cmd, args)
        if value is None:
            await conn.error(msg, "CommandNotFound", f"The command {cmd} has not been found")
            return
        await conn.reply(msg, value)
        if cmd == "query-blockstats" and conn.commands.count("query-blockstats") == 1:
            self.established += 1
            self._spawn(self.after_established(conn))

    # -- plumbing ------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> FakeQMP:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=64 * 1024 * 1024)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = FakeConn(self.connections, reader, writer)
        self.conns.append(conn)
        try:
            await self.greet(conn)
            decoder = json.JSONDecoder()
            buf = ""
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data.decode(errors="replace")
                while True:  # QMP is a JSON stream, not lines: the client sends no newline
                    buf = buf.lstrip(" \t\r\n")
                    try:
                        msg, end = decoder.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:]
                    if isinstance(msg, dict):
                        conn.commands.append(str(msg.get("execute")))
                        await self.on_command(conn, msg)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.conns.remove(conn)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.conns):
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> FakeQMP:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class Sends(FakeQMP):
    """A healthy one-disk VM that sends ``events`` once watched.  `watched` is the connection
    being watched: ``await srv.watched.send(event)`` sends more."""

    def __init__(self, path: str, name: str, events: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(path, name)
        self.events = list(events)
        self.watched: FakeConn | None = None

    async def after_established(self, conn: FakeConn) -> None:
        self.watched = conn
        for ev in self.events:
            await conn.send(ev)


@contextlib.asynccontextmanager
async def watching(srv: FakeQMP, sink: EventSink | None = None, **qmp: Any) -> AsyncIterator[VMWatcher]:
    """``srv`` serving, and a `VMWatcher` of this process watching it (``qmp``: `QMPConfig`
    fields over short defaults); entered once the first session is established, the watcher
    stopped and the server closed on exit."""
    fast: dict[str, Any] = {
        "poll_interval_seconds": 0.2,
        "command_timeout_seconds": 2,
        "backoff_initial_seconds": 0.01,
        "backoff_max_seconds": 0.05,
    }
    watcher = VMWatcher(
        VMState.qmp(srv.path), Config(qmp=QMPConfig(**(fast | qmp))), sink=sink, clock=time.time
    )
    async with srv:
        watcher.start()
        try:

            async def established() -> bool:
                return watcher.vm.up and srv.established >= 1

            await wait_for(established, 10, f"a session with {srv.name}")
            yield watcher
        finally:
            await watcher.stop()
