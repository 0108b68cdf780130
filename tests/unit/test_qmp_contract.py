"""The contract between `exporter.qmp.readonly` and qemu.qmp's internals.

`ReadOnlyQMPClient` is the one module that uses qemu.qmp's private parts (why, with the
numbers, in its docstrings): when the library establishes a session (``_establish_session``,
after ``_do_connect`` made ``_reader``/``_writer`` with asyncio's streams) it puts its own
protocol (`_Stream`, an ``asyncio.BufferedProtocol``) between the transport and asyncio's
StreamReaderProtocol, which it feeds until the reader task starts; then it handles the data in
the transport's callback.  It replaces the reader's per-message bottom half
(``_bh_recv_message``, run in a loop by ``_bh_loop_forever`` in the reader task) with one that
takes over what the StreamReader still holds and then only steps in for a backlog, a message
for the library (routed to ``_on_message``) and the end of the stream (``EOFError``, as the
library's).  It writes commands to ``_writer`` itself.  pyproject.toml pins qemu.qmp below
0.1; these tests are what to run before allowing a newer one (or another Python: the transport
must take a BufferedProtocol through ``set_protocol``).
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

import pytest
from qemu.qmp import QMPClient, Runstate
from qemu.qmp.protocol import AsyncProtocol

from exporter.qmp.readonly import READ_CHUNK, ReadOnlyQMPClient, _Stream
from exporter.runtime.fairness import ScrapeFirst
from tests.sim.servers import EOL, FakeConn, FakeQMP, io_error_event


def test_the_internals_used_are_there() -> None:
    for name in (
        "_bh_recv_message",
        "_bh_loop_forever",
        "_bh_disconnect",
        "_on_message",
        "_cb_inbound",
        "_cb_outbound",
        "_establish_session",
    ):
        assert callable(getattr(QMPClient, name, None)), name
    # The reader task runs the bottom half we override, in a loop, for the session's life.
    source = inspect.getsource(AsyncProtocol._establish_session)
    assert "self._bh_loop_forever(self._bh_recv_message" in source
    assert "readbuflen" in inspect.signature(QMPClient.__init__).parameters
    # The session is established on the connection _do_connect made (the stream is installed
    # there, before the greeting is read).
    connect = inspect.getsource(AsyncProtocol.connect)
    assert connect.index("self._do_connect(") < connect.index("self._establish_session()")
    assert "self._reader, self._writer = await connect" in inspect.getsource(AsyncProtocol._do_connect)


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
            assert isinstance(client._writer.transport.get_protocol(), _Stream)
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


def _lines(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + EOL for e in events)


class _EventsWithTheNegotiation(FakeQMP):
    """Events (and half of one) in the same write as the capabilities reply: the library reads
    the reply from the StreamReader, which then holds the rest; more comes later, or the end."""

    close_at_once = False

    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        if msg.get("execute") != "qmp_capabilities":
            await self.answer(conn, msg, str(msg.get("execute")))
            return
        cut = json.dumps(io_error_event(1_700_000_003)).encode() + EOL
        reply = json.dumps({"return": {}, "id": msg.get("id")}).encode() + EOL
        events = _lines(*(io_error_event(1_700_000_000 + k) for k in range(3)))
        await conn.send_raw(reply + events + (b"" if self.close_at_once else cut[:50]))
        if self.close_at_once:
            conn.close()
            return
        await asyncio.sleep(0.05)
        await conn.send_raw(cut[50:] + _lines(io_error_event(1_700_000_004)))


@pytest.mark.parametrize("close_at_once", [False, True])
async def test_what_follows_the_negotiation_is_read_first(short_tmp: Path, close_at_once: bool) -> None:
    """In order, and connect() returns even when the stream ended with the negotiation (with
    qemu.qmp's own reader it failed: the reader ended the session before connect() checked it,
    and the events went with the failed connect)."""
    sock = str(short_tmp / "early.qmp")
    seconds: list[int] = []
    n = 3 if close_at_once else 5
    all_in = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        seconds.append(event["timestamp"]["seconds"])
        if len(seconds) == n:
            all_in.set()

    srv = _EventsWithTheNegotiation(sock, "early")
    srv.close_at_once = close_at_once
    async with srv:
        client = ReadOnlyQMPClient("t", on_event=on_event)
        await client.connect(sock)
        try:
            async with asyncio.timeout(10):
                await all_in.wait()
                while close_at_once and client.runstate == Runstate.RUNNING:
                    await client.runstate_changed()  # the end came with the negotiation: noticed
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
    assert seconds == [1_700_000_000 + k for k in range(n)]


class _Burst(FakeQMP):
    burst = 2000

    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        if msg.get("execute") == "query-name":  # the trigger: a burst, then the reply
            await conn.send_raw(_lines(*(io_error_event(1_700_000_000, k) for k in range(self.burst))))
        await self.answer(conn, msg, str(msg.get("execute")))


async def test_a_backlog_waits_while_a_scrape_is_served(short_tmp: Path) -> None:
    """More than a chunk arrived at once: the reader handles it a chunk per turn of the loop,
    and not at all while a scrape is served (`exporter.runtime.fairness`); then all of it, in order."""
    sock = str(short_tmp / "burst.qmp")
    events: list[int] = []
    scrape = ScrapeFirst()
    async with _Burst(sock, "burst"):
        client = ReadOnlyQMPClient(
            "t", on_event=lambda e: events.append(e["timestamp"]["microseconds"]), scrape_first=scrape
        )
        await client.connect(sock)
        try:
            scrape.scrape_started()
            reply = client.query("query-name")
            await asyncio.sleep(0.3)
            assert len(events) < 100  # at most what a first small read handled directly
            assert not reply.done()  # behind the burst
            assert client.read_through(math.inf) < math.inf
            scrape.scrape_done()
            async with asyncio.timeout(10):
                assert await reply == {"name": "burst"}
            assert events == list(range(_Burst.burst))
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


class _Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def data_received(self, data: bytes) -> None:
        self.calls.append(("data", data))

    def eof_received(self) -> bool:
        self.calls.append(("eof", None))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append(("lost", exc))


def test_the_stream_feeds_the_stream_reader_until_attached() -> None:
    """`_Stream` alone: before `attach` asyncio's protocol gets everything; the end of the
    stream before `attach` is reported by it; after `detach` nothing is handed on."""
    from exporter.qmp import readonly as qmp_readonly

    inner = _Inner()
    stream = _Stream(inner)
    buf = stream.get_buffer(-1)
    buf[:5] = b"hello"
    stream.buffer_updated(5)
    assert stream.eof_received() is True
    assert inner.calls == [("data", b"hello"), ("eof", None)]
    got: list[object] = []
    assert stream.attach(got.append, got.append) is True  # ended already: the client is told
    assert got == []

    inner, got = _Inner(), []
    stream = _Stream(inner)
    assert stream.attach(got.append, got.append) is False
    qmp_readonly._READ_VIEW[:3] = b"abc"
    stream.buffer_updated(3)
    stream.eof_received()
    assert got == [3, None] and inner.calls == [("eof", None)]  # the StreamReader sees the end too
    stream.detach()
    stream.buffer_updated(3)
    stream.connection_lost(None)
    assert got == [3, None] and inner.calls == [("eof", None), ("lost", None)]


async def test_a_reader_that_is_not_behind_reads_during_a_scrape(short_tmp: Path) -> None:
    """A new hang's first event must not wait for a scrape: handled by the reader task at its
    turn (not in the transport's callback, where it would delay the scrape's own I/O)."""
    sock = str(short_tmp / "one.qmp")
    events: list[int] = []
    scrape = ScrapeFirst()
    srv = _Burst(sock, "one")
    srv.burst = 1
    async with srv:
        client = ReadOnlyQMPClient(
            "t", on_event=lambda e: events.append(e["timestamp"]["microseconds"]), scrape_first=scrape
        )
        await client.connect(sock)
        try:
            scrape.scrape_started()
            async with asyncio.timeout(1):
                assert await client.query("query-name") == {"name": "one"}
            assert events == [0] and scrape.active()
        finally:
            scrape.scrape_done()
            with contextlib.suppress(Exception):
                await client.disconnect()
