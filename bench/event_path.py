"""CPU per event of the exporter's event path alone, without sockets: decode, count, hang tracking.

    python -m bench.event_path [--events 100000] [--profile]

Feeds QEMU 7.2-shaped ``BLOCK_IO_ERROR`` lines (4 disks, 20,000 events/s of QEMU time) through
``orjson.loads`` and `VMWatcher`'s event entry point (what the reader calls for each event),
with hang tracking as the only sink, and prints CPU µs/event (``time.process_time``), with
``orjson.loads`` alone for comparison.  ``--profile`` prints cProfile's top functions instead.
The fleet benchmark (``bench.fleet``) measures the whole exporter; this isolates the part that
is ours per event (docs/performance.md, "Event storms").
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import orjson

from exporter.config import Config
from exporter.hang.tracking import HangTracking
from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.sink import SinkGroup
from exporter.model.state import Disk, VMState
from exporter.qmp_watch import VMWatcher


def lines(n: int, t0: float) -> list[bytes]:
    out = []
    for k in range(n):
        dev = f"virtio-disk{k % 4}"
        t = t0 + k * 0.00005
        s = int(t)
        us = int((t - s) * 1e6)
        out.append(
            f'{{"timestamp": {{"seconds": {s}, "microseconds": {us}}}, "event": "BLOCK_IO_ERROR", '
            f'"data": {{"device": "", "nospace": false, "node-name": "node-{dev}", '
            f'"reason": "Input/output error", "operation": "write", "action": "retry"}}}}\r'.encode()
        )
    return out


def watcher() -> VMWatcher:
    vm = VMState.qmp("/run/bench/vm0.qmp")
    disks = {}
    for j in range(4):
        p = DiskPolicy("retry", "retry", 100, 600_000, True)
        dev = f"virtio-disk{j}"
        qdev = f"/machine/peripheral/{dev}/virtio-backend"
        path = f"/machine/peripheral/{dev}"
        disks[dev] = Disk(dev, "", f"node-{dev}", qdev, path, "virtio-blk", p, verify(p, PolicyConfig()))
    vm.set_disks(disks)
    hangs = HangTracking(2.0)
    w = VMWatcher(vm, Config(), sink=SinkGroup(hangs), clock=time.time)
    hangs.on_disks(vm, time.time())
    w._release_events()  # as when the session is established: events are applied as they come
    return w


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.event_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    w = watcher()
    data = lines(args.events, time.time())
    loads, handle = orjson.loads, w._on_qmp_event

    def run() -> None:
        for line in data:
            handle(loads(line))

    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    c0 = time.process_time()
    run()
    c1 = time.process_time()
    for line in data:
        loads(line)
    c2 = time.process_time()
    n = args.events
    print(f"event path (orjson included): {1e6 * (c1 - c0) / n:.2f} us/event")
    print(f"orjson.loads alone:           {1e6 * (c2 - c1) / n:.2f} us/event")


if __name__ == "__main__":
    main()
