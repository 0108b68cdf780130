"""No leaks: 1,000 connect/disconnect cycles leave the exporter's file descriptors and memory
where they started.

The server greets, answers and hangs up, over and over: odd connections right after the
capabilities handshake (the exporter's identification is cut short), even ones right after the
session is established (event consumer, poller and disconnect watcher tasks created and torn
down).  The exporter runs with the smallest sensible backoff (0.01 s).  Measured from /proc
after a warm-up of 100 cycles and again after 1,000 more: open fds must be equal (±2 for a
connection in flight at the moment of sampling), RSS may grow by at most 8 MiB (allocator
arenas and the log handler's buffers settle during the first thousands of cycles; a leak of
one task or one qemu.qmp client per cycle is far more than that).  The exporter's own counters
confirm the cycles happened and nothing was an internal error.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from tests.sim.common import config
from tests.sim.servers import FakeConn, FakeQMP, io_error_event
from tests.support.exporter import ExporterProcess
from tests.support.procs import open_fds, rss_kib
from tests.support.waits import wait_for

WARMUP, CYCLES = 100, 1000
RSS_TOLERANCE_KIB = 8 * 1024
FD_TOLERANCE = 2


class HangsUp(FakeQMP):
    async def answer(self, conn: FakeConn, msg: dict[str, Any], cmd: str) -> None:
        await super().answer(conn, msg, cmd)
        if (conn.n % 2 == 1 and cmd == "qmp_capabilities") or (conn.n % 2 == 0 and cmd == "query-blockstats"):
            conn.close()


def sample(pid: int) -> tuple[int, int]:
    return rss_kib(pid), open_fds(pid)


def steady(pid: int) -> tuple[int, int]:
    """Median of a few samples: one may catch a connection being set up."""
    rows = [sample(pid) for _ in range(5)]
    return int(statistics.median(r[0] for r in rows)), int(statistics.median(r[1] for r in rows))


async def test_thousand_connect_disconnect_cycles_leak_nothing(short_tmp: Path) -> None:
    sock = str(short_tmp / "churn.qmp")
    cfg = config(short_tmp, sock, backoff_initial_seconds=0.01, backoff_max_seconds=0.01)
    cfg["qmp"]["sockets"] = [sock]  # no neighbour: the fds counted are the churn's only
    cfg["log"] = {"level": "warn"}
    async with HangsUp(sock, "churn") as srv, ExporterProcess(short_tmp, cfg) as exp:
        assert exp.proc is not None
        pid = exp.proc.pid

        async def reached(n: int) -> bool:
            return srv.connections >= n

        await wait_for(lambda: reached(WARMUP), 30, f"{WARMUP} cycles")
        rss0, fds0 = steady(pid)
        m0 = await exp.scrape()
        await wait_for(lambda: reached(WARMUP + CYCLES), 120, f"{CYCLES} more cycles")
        rss1, fds1 = steady(pid)
        m1 = await exp.scrape()
        print(f"leak check: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB over {CYCLES} cycles")
        assert abs(fds1 - fds0) <= FD_TOLERANCE, (fds0, fds1)
        assert rss1 - rss0 <= RSS_TOLERANCE_KIB, (rss0, rss1)
        attempts = m1.sum("qemu_exporter_qmp_connect_attempts_total") - m0.sum(
            "qemu_exporter_qmp_connect_attempts_total"
        )
        disconnects = m1.sum("qemu_exporter_qmp_disconnects_total") - m0.sum(
            "qemu_exporter_qmp_disconnects_total"
        )
        assert attempts >= CYCLES * 0.9, attempts
        assert disconnects >= CYCLES * 0.4, disconnects
        assert m1.sum("qemu_exporter_internal_errors_total") == 0
        assert "Traceback" not in exp.log()


class FloodNoDrop(FakeQMP):
    """Once watched, 100,000 BLOCK_IO_ERROR events on one long session."""

    async def after_established(self, conn: FakeConn) -> None:
        line = (json.dumps(io_error_event(1_700_000_000)) + "\r\n").encode()
        for _ in range(10):
            await conn.send_raw(line * 10_000)


async def test_long_session_memory_does_not_grow_with_events(short_tmp: Path) -> None:
    """Memory does not grow with the events of one session.  (Found by the soak: qemu.qmp's
    default EventListener kept every event for the session's life, +180 MB per 100,000
    events; fixed in b4af0a2.)"""
    sock = str(short_tmp / "chatty.qmp")
    cfg = config(short_tmp, sock)
    cfg["qmp"]["sockets"] = [sock]
    cfg["log"] = {"level": "warn"}
    async with FloodNoDrop(sock, "chatty"), ExporterProcess(short_tmp, cfg) as exp:
        await exp.wait_metrics(lambda m: m.value("qemu_qmp_up", vm="chatty") == 1)
        assert exp.proc is not None
        rss0, _ = sample(exp.proc.pid)
        m = await exp.wait_metrics(
            lambda m: m.sum("qemu_exporter_qmp_events_total", vm="chatty") == 100_000, timeout=30
        )
        rss1, _ = sample(exp.proc.pid)
        print(f"100,000 events: RSS {rss0} -> {rss1} KiB")
        assert rss1 - rss0 < 20 * 1024, f"RSS {rss0} -> {rss1} KiB after 100,000 events"
        assert m.value("qemu_qmp_up", vm="chatty") == 1
        assert m.sum("qemu_exporter_qmp_disconnects_total", vm="chatty") == 0
