"""The contract between `exporter.qmp_readonly` and qemu.qmp's internals.

`ReadOnlyQMPClient` is the one module that uses qemu.qmp's private parts (why, with the
numbers, in its docstrings): it replaces the reader's per-message bottom half
(``_bh_recv_message``, run in a loop by ``_bh_loop_forever`` in the reader task) with one that
reads the connection's ``StreamReader`` (``_reader``) a chunk at a time, writes commands to
``_writer`` itself, routes what it does not own to ``_on_message``, and ends the reader with
``EOFError`` as the library's does.  pyproject.toml pins qemu.qmp below 0.1; these tests are
what to run before allowing a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, Runstate
from qemu.qmp.protocol import AsyncProtocol

from exporter.qmp_readonly import READ_CHUNK, ReadOnlyQMPClient
from tests.faults.servers import EOL, FakeConn, FakeQMP, io_error_event


def test_the_internals_used_are_there() -> None:
    for name in (
        "_bh_recv_message",
        "_bh_loop_forever",
        "_bh_disconnect",
        "_on_message",
        "_cb_inbound",
        "_cb_outbound",
    ):
        assert callable(getattr(QMPClient, name, None)), name
    # The reader task runs the bottom half we override, in a loop, for the session's life.
    source = inspect.getsource(AsyncProtocol._establish_session)
    assert "self._bh_loop_forever(self._bh_recv_message" in source
    assert "readbuflen" in inspect.signature(QMPClient.__init__).parameters


class _Scripted(FakeQMP):
    """After the first query-blockstats: many events in one write, one event cut in three
    writes, a line only the stdlib decoder takes (NaN), then QEMU's last line without its
    end of line, then the end of the stream."""

    burst = 2000

    async def after_established(self, conn: FakeConn) -> None:
        lines = [io_error_event(1_700_000_000, k) for k in range(self.burst)]
        await conn.send_raw(b"".join(json.dumps(e).encode() + EOL for e in lines))
        cut = json.dumps(io_error_event(1_700_000_001)).encode() + EOL
        for part in (cut[:7], cut[7:100], cut[100:]):
            await conn.send_raw(part)
            await asyncio.sleep(0.01)  # separate writes: the reader sees the line in pieces
        await conn.send_raw(
            b'{"event": "X_NAN", "data": {"v": NaN}, "timestamp": {"seconds": 1, "microseconds": 0}}\r\n'
        )
        await conn.send_raw(json.dumps(io_error_event(1_700_000_002)).encode())
        conn.close()


async def test_reader_reads_chunks_in_order_to_the_end_of_the_stream(short_tmp: Path) -> None:
    sock = str(short_tmp / "contract.qmp")
    events: list[dict[str, Any]] = []
    behind: list[bool] = []
    client: ReadOnlyQMPClient

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        # While the reader handles a chunk, its stream is not known to be read up to now.
        behind.append(client.read_through(math.inf) < math.inf)

    async with _Scripted(sock, "contract"):
        client = ReadOnlyQMPClient("t", on_event=on_event)
        await client.connect(sock)
        try:
            assert isinstance(client._reader, asyncio.StreamReader)
            assert isinstance(client._writer, asyncio.StreamWriter)
            # A reply the query path does not own takes the library's path.
            assert (await client.execute("query-status"))["status"] == "running"  # type: ignore[index]
            assert await client.query("query-blockstats")
            async with asyncio.timeout(10):
                while client.runstate == Runstate.RUNNING:
                    await client.runstate_changed()
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
    n = _Scripted.burst
    assert len(events) == n + 3
    assert [e["timestamp"]["microseconds"] for e in events[:n]] == list(range(n))
    assert events[n]["timestamp"]["seconds"] == 1_700_000_001  # cut in three writes
    assert events[n + 1]["event"] == "X_NAN" and math.isnan(events[n + 1]["data"]["v"])
    assert events[n + 2]["timestamp"]["seconds"] == 1_700_000_002  # no end of line, then EOF
    assert all(behind)
    assert n * 200 > READ_CHUNK * 10  # the burst spans many chunks


async def test_read_through_is_now_while_the_reader_waits(short_tmp: Path) -> None:
    sock = str(short_tmp / "idle.qmp")
    async with FakeQMP(sock, "idle"):
        client = ReadOnlyQMPClient("t")
        await client.connect(sock)
        try:
            await client.query("query-status")
            # The reader resolved the reply, finished its chunk and went back to its read (all
            # in one step of its task) before this task resumed.
            assert client._waiting
            now = time.time() + 1000
            assert client.read_through(now) == now
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
