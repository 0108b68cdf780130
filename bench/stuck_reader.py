"""What a QMP client that stays connected but stops reading costs QEMU (docs/reliability.md).

A real QEMU (Debian ``qemu-system-x86``) boots the IO-loop guest from an nbdkit disk that fails
every request (``werror=report,rerror=report``: one ``BLOCK_IO_ERROR`` per failed request), so
it emits events continuously.  A raw QMP client negotiates capabilities and then reads nothing
for ``--stall`` seconds: QEMU's RSS (``/proc/PID/status``) and the bytes waiting unread in the
client's kernel socket buffer (``FIONREAD``, what `exporter.runtime.liveness` looks at) are sampled every
second.  Then the client reads everything QEMU queued (events counted, bytes per event), and
finally disconnects; RSS is sampled after each step.  A reading client over the same period is
the baseline.  Not run in CI; one JSON line per sample, a summary at the end.

    .venv/bin/python bench/stuck_reader.py --stall 30
    .venv/bin/python bench/stuck_reader.py --stall 30 --exporter   # the exporter, SIGSTOPped
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent.parent.absolute()))

from tests.guest.bootsector import guest_status, write_disk_image
from tests.qemu.lab import nbd_disk_args
from tests.support.exporter import ExporterProcess
from tests.support.procs import rss_kib
from tests.support.qemu import FailingStorage, run_failing_storage, run_vm
from tests.support.scrape import Metrics
from tests.support.waits import wait_until


def fionread(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def qmp_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    f = s.makefile("rb")
    f.readline()  # greeting
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    while b'"return"' not in f.readline():
        pass
    return s


def drain(sock: socket.socket, idle: float = 1.0) -> tuple[int, int]:
    """Read until QEMU has sent nothing for ``idle`` s: (events, bytes)."""
    sock.settimeout(idle)
    data = bytearray()
    with contextlib.suppress(TimeoutError):
        while chunk := sock.recv(1 << 20):
            data += chunk
    return data.count(b'"event"'), len(data)


async def stopped_exporter(
    work: Path, mon: Path, qemu_pid: int, storage: FailingStorage, stall: float
) -> dict[str, Any]:
    """The exporter watches ``mon`` and is SIGSTOPped for ``stall`` seconds."""
    (work / "exporter").mkdir()
    exp = ExporterProcess(work / "exporter", {"qmp": {"sockets": [str(mon)]}, "log": {"level": "info"}})
    await exp.start()
    try:
        assert exp.proc is not None

        def events(m: Metrics) -> float:
            return m.sum("qemu_exporter_qmp_events_total")

        await exp.wait_metrics(lambda m: events(m) > 0, timeout=30, what="exporter counting events")
        before = events(await exp.scrape())
        start_rss = rss_kib(qemu_pid)
        os.kill(exp.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < stall:
            await asyncio.sleep(1.0)
            print(json.dumps({"t": round(elapsed + 1, 1), "qemu_rss_kib": rss_kib(qemu_pid)}), flush=True)
        stalled_rss = rss_kib(qemu_pid)
        storage.recover()  # no new events: what the exporter reads next was queued
        os.kill(exp.proc.pid, signal.SIGCONT)
        async with aiohttp.ClientSession() as s, s.get(exp.url + "/healthz") as r:
            healthz = f"{r.status} {(await r.text()).strip()}"
        last, settled = -1.0, 0
        while settled < 3:  # the count stops moving: caught up
            await asyncio.sleep(0.5)
            now = events(await exp.scrape())
            settled = settled + 1 if now == last else 0
            last = now
        queued = int(last - before)
        m = await exp.scrape()
        return {
            "client": "exporter, SIGSTOPped",
            "stall_seconds": stall,
            "events_queued": queued,
            "events_per_second": round(queued / stall),
            "qemu_rss_kib": {
                "stall_start": start_rss,
                "stall_end": stalled_rss,
                "after_catch_up": rss_kib(qemu_pid),
            },
            "rss_growth_per_event_bytes": round((stalled_rss - start_rss) * 1024 / max(queued, 1)),
            "healthz_after_sigcont": healthz,
            "event_loop_lag_seconds_after": m.value("qemu_exporter_event_loop_lag_seconds"),
        }
    finally:
        exp.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stall", type=float, default=30.0, help="seconds the client reads nothing")
    ap.add_argument("--pause-us", type=int, default=1000, help="guest pause between IO rounds")
    ap.add_argument(
        "--exporter",
        action="store_true",
        help="the stuck client is the exporter itself, SIGSTOPped (instead of a raw client)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qih-sr-", dir="/tmp") as tmp:
        work = Path(tmp)
        image = write_disk_image(work / "disk.img", pause_us=args.pause_us)
        with (
            run_failing_storage(work, image) as storage,
            run_vm(work, nbd_disk_args(storage, "disk0", "werror=report,rerror=report")) as vm,
        ):
            pid = vm.proc.pid
            assert vm.mon2 is not None
            # The guest must boot from working storage; then every request fails.
            wait_until(lambda: "W" in guest_status(vm.debug_output()), 30, "the guest's IO loop")
            storage.fail()
            # Baseline: a client that reads everything, for the same time.
            reader = qmp_connect(vm.mon2)
            reader.settimeout(0.2)
            t0, r0, n = time.monotonic(), rss_kib(pid), 0
            while time.monotonic() - t0 < args.stall:
                with contextlib.suppress(TimeoutError):
                    n += reader.recv(1 << 20).count(b'"event"')
            base = {"phase": "reading", "seconds": args.stall, "events": n, "rss_kib": [r0, rss_kib(pid)]}
            print(json.dumps(base), flush=True)
            reader.close()
            if args.exporter:
                summary = asyncio.run(stopped_exporter(work, vm.mon2, pid, storage, args.stall))
                print(json.dumps({**summary, "baseline": base}), flush=True)
                return
            # The stuck client.
            stuck = qmp_connect(vm.mon2)
            start_rss, t0 = rss_kib(pid), time.monotonic()
            samples = []
            while (elapsed := time.monotonic() - t0) < args.stall:
                time.sleep(1.0)
                s = {
                    "t": round(elapsed + 1, 1),
                    "qemu_rss_kib": rss_kib(pid),
                    "fionread": fionread(stuck),
                }
                samples.append(s)
                print(json.dumps(s), flush=True)
            stalled_rss = rss_kib(pid)
            storage.recover()  # no new events: the drain below reads only what was queued
            events, nbytes = drain(stuck)
            drained_rss = rss_kib(pid)
            stuck.close()
            time.sleep(1.0)
            closed_rss = rss_kib(pid)
            summary = {
                "stall_seconds": args.stall,
                "events_queued": events,
                "events_per_second": round(events / args.stall),
                "bytes_queued": nbytes,
                "bytes_per_event_on_wire": round(nbytes / max(events, 1)),
                "qemu_rss_kib": {
                    "stall_start": start_rss,
                    "stall_end": stalled_rss,
                    "after_drain": drained_rss,
                    "after_close": closed_rss,
                },
                "rss_growth_per_event_bytes": round((stalled_rss - start_rss) * 1024 / max(events, 1)),
                "max_fionread": max(s["fionread"] for s in samples),
                "baseline": base,
            }
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    # SIGTERM unwinds the context managers (QEMU and nbdkit are stopped), like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
