"""A plain asyncio QMP client that keeps the raw bytes of every line it receives.

Used to compare a real QEMU with the simulator byte for byte where that matters (framing, key
order) and by shape elsewhere.  It is a management-side client (it may send ``stop``/``cont``),
unlike the exporter's read-only one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT = 10.0


@dataclass(frozen=True)
class Line:
    """One line received from the server: its bytes (terminator included) and parsed JSON."""

    raw: bytes
    obj: Any

    def keys(self) -> list[str]:
        """Top-level keys in the order they were sent."""
        return list(json.loads(self.raw, object_pairs_hook=lambda kv: [k for k, _ in kv]))


class RawQMP:
    """One connection to a QMP socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.events: list[Line] = []

    async def read_line(self, timeout: float = TIMEOUT) -> Line:
        raw = await asyncio.wait_for(self._reader.readline(), timeout)
        if not raw:
            raise ConnectionError("QMP server closed the connection")
        return Line(raw, json.loads(raw))

    async def send_raw(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def reply(self, timeout: float = TIMEOUT) -> Line:
        """The next ``return``/``error`` line; events read on the way go to ``events``."""
        while True:
            line = await self.read_line(timeout)
            if isinstance(line.obj, dict) and "event" in line.obj:
                self.events.append(line)
                continue
            return line

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, id: Any = None) -> Line:
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        if id is not None:
            msg["id"] = id
        await self.send_raw(json.dumps(msg).encode() + b"\n")
        return await self.reply()

    async def wait_event(self, name: str, timeout: float = TIMEOUT) -> Line:
        """The first received event called ``name`` (reading more lines until it comes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for ev in self.events:
                if ev.obj["event"] == name:
                    return ev
            line = await self.read_line(max(0.01, deadline - loop.time()))
            if isinstance(line.obj, dict) and "event" in line.obj:
                self.events.append(line)
            else:
                raise AssertionError(f"unexpected line while waiting for {name}: {line.raw!r}")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_qmp(path: Path | str, timeout: float = TIMEOUT) -> AsyncIterator[tuple[RawQMP, Line]]:
    """Connect (retrying until the socket listens) and read the greeting; no negotiation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
    client = RawQMP(reader, writer)
    try:
        greeting = await client.read_line(timeout)
        yield client, greeting
    finally:
        await client.close()
