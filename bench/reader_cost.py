"""CPU per event of the QMP reader alone: ``ReadOnlyQMPClient`` with an ``on_event`` that counts.

    python -m bench.reader_cost [--connections 1000] [--rate 20000] [--seconds 10]

A writer subprocess (``--serve``) accepts ``--connections`` QMP connections on one socket,
greets and negotiates each, then writes ``BLOCK_IO_ERROR`` lines (QEMU 7.2's shape, ~230 B) at
``--rate`` events/s in total, one line per write, to the connections in turn: at 20,000/s over
1000 VMs each connection gets one event every 50 ms, so the reader wakes up for one or two
events at a time, as in the fleet benchmark's 200 ms storm.  This process runs the clients and
prints its own CPU (``getrusage``) per event counted over the window: the cost of reading
(epoll, ``recv``, the reader's wake-up, splitting, ``orjson.loads``) without the exporter's
model, hang tracking and scrapes.  Run it with the worktrees to compare on ``PYTHONPATH``
(docs/performance.md, "Event storms"; the reader before and after handling data in the
transport's callback: docs/performance-history.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import Runstate

from exporter.qmp.readonly import ReadOnlyQMPClient

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}\r\n'

EVENT = (
    b'{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "BLOCK_IO_ERROR", '
    b'"data": {"device": "", "nospace": false, "node-name": "node-virtio-disk0", '
    b'"reason": "Input/output error", "operation": "write", "action": "retry"}}\r\n'
)

#: How often the writer writes its share of the rate (s).
TICK = 0.005


async def serve(path: str, connections: int, rate: float, batch: int) -> None:
    """The writer: greet and negotiate; once ``connections`` are negotiated, write events,
    ``batch`` at a time."""
    writers: list[asyncio.StreamWriter] = []
    all_in = asyncio.Event()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await negotiate(reader, writer)

    async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        decoder, buf = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):  # commands come without an end of line
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break  # the rest of it comes with the next read
                buf = buf.lstrip()[end:]
                writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")
                if msg.get("execute") == "qmp_capabilities":
                    writers.append(writer)
                    if len(writers) == connections:
                        all_in.set()

    server = await asyncio.start_unix_server(session, path=path)
    async with server:
        await all_in.wait()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        turn = 0
        while True:
            await asyncio.sleep(TICK)
            due = int((loop.time() - t0) * rate)
            live = [w for w in writers if not w.is_closing()]
            if not live:
                continue
            for _ in range((due - sent) // batch):
                live[turn % len(live)].write(EVENT * batch)
                turn += 1
                sent += batch


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(args: argparse.Namespace, path: str) -> dict[str, Any]:
    events = 0

    def on_event(_event: dict[str, Any]) -> None:
        nonlocal events
        events += 1

    clients = [ReadOnlyQMPClient(f"c{i}", on_event=on_event) for i in range(args.connections)]
    try:
        for i in range(0, len(clients), 50):
            await asyncio.gather(*(c.connect(path) for c in clients[i : i + 50]))
        await asyncio.sleep(args.warmup)
        c0, e0, t0 = cpu(), events, time.monotonic()
        await asyncio.sleep(args.seconds)
        c1, e1, t1 = cpu(), events, time.monotonic()
        assert all(c.runstate == Runstate.RUNNING for c in clients)
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.disconnect()
    n = e1 - e0
    return {
        "module": sys.modules[ReadOnlyQMPClient.__module__].__file__,
        "batch": args.batch,
        "events_per_s": n / (t1 - t0),
        "cores": (c1 - c0) / (t1 - t0),
        "us_per_event": (c1 - c0) / n * 1e6 if n else float("nan"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qib-reader-") as tmp:
        path = str(Path(tmp) / "w.qmp")
        cmd = [sys.executable, "-m", "bench.reader_cost", "--serve", path]
        cmd += ["--connections", str(args.connections), "--rate", str(args.rate), "--batch", str(args.batch)]
        writer = subprocess.Popen(cmd)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            return asyncio.run(measure(args, path))
        finally:
            writer.kill()
            writer.wait()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reader_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--rate", type=float, default=20000.0, help="events/s over all connections")
    p.add_argument("--batch", type=int, default=1, help="events per write (qmpsim writes a VM's together)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of events before the window")
    p.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.connections, args.rate, args.batch))
        return 0
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
