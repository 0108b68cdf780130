"""Liveness end to end: the exporter subprocess talking to a test ``NOTIFY_SOCKET`` (a unix
datagram socket bound here, as systemd's is), stopped with SIGSTOP and continued, and QMP peers
that flood it; plus the stall detector on a real QMP session whose reader stops.

Blocking the loop honestly: SIGSTOP stops the whole process, so nothing can answer while it
lasts; but the monotonic clock runs on, and after SIGCONT the heartbeat reports the stop as
lag, /healthz says 503 for the window, then 200 again.  A /healthz request sent during the stop
is answered after it, with the 503.  No test-only code path exists in the exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter.config import Config, HealthConfig, QMPConfig
from exporter.model.state import VMState
from exporter.qmp_watch import VMWatcher
from exporter.runtime.liveness import Liveness, fionread, qmp_readers
from tests.sim.servers import EOL, FakeConn, FakeQMP, io_error_event
from tests.support.exporter import ExporterProcess
from tests.support.waits import wait_for

WATCHDOG_USEC = 400_000  # pings every 0.2 s
MISSING = {"qmp": {"sockets": ["/nonexistent/none.qmp"], "discovery_interval_seconds": 0.2}}


class NotifyListener:
    """A unix datagram socket standing in for systemd's notify socket.

    Read continuously by a task, as systemd does: a datagram socket queues only
    ``net.unix.max_dgram_qlen`` (10) messages, and the exporter drops a notification rather
    than block its loop on a full queue."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []  # (monotonic time received, datagram)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = (await loop.sock_recv(self.sock, 4096)).decode()
            self.messages.append((time.monotonic(), msg))
            self._queue.put_nowait(msg)

    async def _recv(self, timeout: float) -> str | None:
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    async def wait(self, predicate: Any, timeout: float, what: str) -> str:
        """The next datagram for which ``predicate`` holds (others are kept, skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = await self._recv(left)
            if msg is not None and predicate(msg):
                return msg
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {self.messages}")

    async def during(self, seconds: float) -> list[str]:
        """Every datagram received in the next ``seconds``."""
        out: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = await self._recv(left)
            if msg is not None:
                out.append(msg)
        return out

    def drain(self) -> list[str]:
        """What was received and not yet waited for."""
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close()


def _state(pid: int) -> str:
    # /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces, the state follows the last ')'.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


async def _stopped(pid: int) -> bool:
    return _state(pid) in ("T", "t")


async def _healthz(exp: ExporterProcess) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(exp.url + "/healthz") as r:
        return r.status, await r.text()


async def test_ready_then_watchdog_pings_stop_while_stopped_and_resume(short_tmp: Path) -> None:
    rx = NotifyListener(str(short_tmp / "notify"))
    cfg = {**MISSING, "health": {"max_loop_lag_seconds": 1.0, "loop_lag_window_seconds": 3.0}}
    env = {"NOTIFY_SOCKET": str(short_tmp / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        async with ExporterProcess(short_tmp, cfg, env=env) as exp:
            assert exp.proc is not None
            pid = exp.proc.pid
            await rx.wait(lambda m: "READY=1" in m.split("\n"), 10, "READY=1")
            for _ in range(5):
                await rx.wait(lambda m: m == "WATCHDOG=1", 2, "periodic WATCHDOG=1")
            pings = [t for t, m in rx.messages if m == "WATCHDOG=1"]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert all(0.1 < g < 1.0 for g in gaps), gaps  # every WATCHDOG_USEC/2 = 0.2 s

            # Stopped: not one ping, however long it lasts.  (2 s is the stimulus, 10 periods.)
            os.kill(pid, signal.SIGSTOP)
            await wait_for(lambda: _stopped(pid), 5, "exporter stopped")
            # Datagrams sent before the stop took effect: read them all, then forget them.
            await wait_for(lambda: _async(fionread(rx.sock.fileno()) == 0), 5, "notify queue read")
            rx.drain()
            stopped_at = time.monotonic()
            async with aiohttp.ClientSession() as s:
                probe = asyncio.ensure_future(s.get(exp.url + "/healthz"))  # a probe during the stop
                assert await rx.during(2.0) == []
                os.kill(pid, signal.SIGCONT)
                async with await probe as r:
                    status, body = r.status, await r.text()
            # The probe sent during the stop is answered after it: the stop was loop lag.
            assert status == 503 and body.startswith("event loop lagged "), (status, body)
            assert body.count("\n") == 1
            await rx.wait(lambda m: m == "WATCHDOG=1", 3, "WATCHDOG=1 after SIGCONT")
            unhealthy = [m for t, m in rx.messages if t >= stopped_at and m.startswith("STATUS=unhealthy")]
            assert unhealthy and "event loop lagging" in unhealthy[0]
            m = await exp.scrape()
            lag = m.value("qemu_exporter_event_loop_lag_seconds")
            assert lag is not None and lag >= 1.5, lag
            # /healthz remembers the lag for the window (3 s), then is healthy again.
            await wait_for(lambda: _is_ok(exp), 10, "/healthz 200 again")
            ended = time.monotonic()
            assert ended - stopped_at >= 2.0 + 1.0  # not at once: the window held it at 503

            exp.stop()
            assert exp.proc.returncode == 0
            await rx.wait(lambda m: m == "STOPPING=1", 5, "STOPPING=1")
    finally:
        await rx.close()


async def _is_ok(exp: ExporterProcess) -> bool:
    status, body = await _healthz(exp)
    return status == 200 and body == "ok\n"


async def test_abstract_notify_socket(short_tmp: Path) -> None:
    name = f"qih-test-notify-{os.getpid()}-{short_tmp.name}"
    rx = NotifyListener(b"\0" + name.encode())
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        async with ExporterProcess(short_tmp, MISSING, env=env) as exp:
            await rx.wait(lambda m: "READY=1" in m.split("\n"), 10, "READY=1")
            await rx.wait(lambda m: m == "WATCHDOG=1", 3, "WATCHDOG=1")
            exp.stop()
            await rx.wait(lambda m: m == "STOPPING=1", 5, "STOPPING=1")
    finally:
        await rx.close()


async def test_no_watchdog_pings_without_watchdog_usec(short_tmp: Path) -> None:
    rx = NotifyListener(str(short_tmp / "notify"))
    try:
        async with ExporterProcess(short_tmp, MISSING, env={"NOTIFY_SOCKET": str(short_tmp / "notify")}):
            await rx.wait(lambda m: "READY=1" in m.split("\n"), 10, "READY=1")
            assert "WATCHDOG=1" not in await rx.during(1.0)
    finally:
        await rx.close()


# --- stalled readers --------------------------------------------------------------------------


class Flooder(FakeQMP):
    """A healthy one-disk VM that, once watched, writes BLOCK_IO_ERROR events as fast as the
    connection takes them (``limit`` events, or until stopped)."""

    def __init__(self, path: str, name: str, limit: int | None = None) -> None:
        super().__init__(path, name)
        self.limit = limit
        self.sent = 0

    async def after_established(self, conn: FakeConn) -> None:
        line = json.dumps(io_error_event(1_700_000_000)).encode() + EOL
        batch = line * 500
        with contextlib.suppress(ConnectionError):  # the exporter hung up: the test is over
            while self.limit is None or self.sent < self.limit:
                n = 500 if self.limit is None else min(500, self.limit - self.sent)
                await conn.send_raw(batch if n == 500 else line * n)
                self.sent += n


async def test_stalled_reader_is_reported_through_the_qmp_hook(short_tmp: Path) -> None:
    """A real `VMWatcher` session flooded by a peer; its transport stops reading (as asyncio's
    flow control does when it pauses a reader and nothing resumes it).  The loop runs on, the
    kernel buffer fills, no line is read: the detector names the VM; reading resumes: healthy.
    (The pause reaches into the reader's and qemu.qmp's private state: from outside the process a
    reader cannot be stopped while its loop runs, which is the point of the detector.)"""
    path = str(short_tmp / "flood.qmp")
    cfg = Config(qmp=QMPConfig(sockets=(path,), poll_interval_seconds=600, command_timeout_seconds=600))
    vm = VMState.qmp(path)
    w = VMWatcher(vm, cfg, clock=time.time)
    live = Liveness(HealthConfig(5.0, 10.0, reader_stall_seconds=0.5), lambda: qmp_readers([w]))
    async with Flooder(path, "flood") as srv:
        w.start()
        run = asyncio.create_task(live.run())
        try:
            await wait_for(lambda: _async(srv.sent > 5000 and sum(vm.events.values()) > 5000), 10, "flooding")
            assert live.problem() is None  # flooded and keeping up: bytes wait, lines progress
            client = w.client
            assert client is not None and client.fileno() is not None
            client._writer.transport.pause_reading()  # type: ignore[union-attr]
            # In a flood the reader may have paused the transport itself (its backlog is
            # full); it would resume it once the backlog is handled.  Make the pause stick.
            client._paused = False
            stalled = await wait_for(lambda: _async(live.problem()), 10, "stall reported")
            assert stalled.startswith("QMP reader stalled: vm=flood has "), stalled
            assert fionread(client.fileno() or -1) > 0
            assert live.problem_now() == stalled  # the watchdog would withhold its pings
            client._writer.transport.resume_reading()  # type: ignore[union-attr]
            await wait_for(lambda: _async(live.problem() is None), 10, "healthy again")
            assert vm.connect_attempts == 1  # the same session throughout
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            await w.stop()


async def _async(value: Any) -> Any:
    return value


@pytest.mark.parametrize("events", [100_000])
async def test_a_flood_the_exporter_keeps_up_with_is_not_a_stall(short_tmp: Path, events: int) -> None:
    """Bytes wait in the socket during the flood (the peer writes faster than one reader
    handles events), but the reader progresses: /healthz stays
    200 (reader_stall_seconds 0.5 s, checked every 50 ms), and every event is counted."""
    path = str(short_tmp / "flood.qmp")
    cfg = {
        "qmp": {"sockets": [path], "poll_interval_seconds": 0.5},
        "health": {"reader_stall_seconds": 0.5},
    }
    async with Flooder(path, "flood", limit=events) as srv, ExporterProcess(short_tmp, cfg) as exp:
        bad: list[str] = []

        async def counted() -> bool:
            status, body = await _healthz(exp)
            if status != 200:
                bad.append(body)
            m = await exp.scrape()
            return (
                m.value("qemu_exporter_qmp_events_total", vm="flood", event="BLOCK_IO_ERROR") or 0
            ) >= events

        await wait_for(counted, 60, "every event counted")
        assert srv.sent == events
        assert bad == [], bad
