"""CPU per event of the exporter's event path alone, without sockets: decode, count, hang tracking.

    python -m bench.event_path [--events 100000] [--profile] [--source qmp|libvirt]

Feeds QEMU 7.2-shaped ``BLOCK_IO_ERROR`` lines (4 disks, 20,000 events/s of QEMU time) through
``orjson.loads`` and `VMWatcher`'s event entry point (what the reader calls for each event),
with hang tracking as the only sink, and prints CPU µs/event (``time.process_time``), with
``orjson.loads`` alone for comparison.  ``--profile`` prints cProfile's top functions instead.
The fleet benchmark (``bench.fleet``) measures the whole exporter; this isolates the part that
is ours per event (docs/performance.md, "Event storms").

``--source libvirt``: the same events as libvirt forwards them (QEMU's data as JSON text, the
callback's arguments), through the libvirt source's hand-over (`EventInbox.put_event`, what
libvirt's event thread does) and its loop side (`LibvirtSource._on_item`) for a domain read from
the real libvirt 9.0 fixture; the two halves timed apart (bench/libvirt_cost.py measures them
with libvirtd, issue 26).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import tracemalloc

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


def libvirt_path(n: int, profile: bool) -> None:
    """``--source libvirt`` (module docstring)."""
    import asyncio
    import json
    from pathlib import Path

    from exporter.libvirt.inbox import EventInbox
    from exporter.libvirt.source import LibvirtSource

    xml = (Path(__file__).parent.parent / "tests/fixtures/libvirt-9.0/dumpxml-report.xml").read_text()
    uuid = "11111111-2222-3333-4444-555555555555"
    node = "libvirt-1-format"
    details = [
        json.dumps(
            {
                "device": "",
                "node-name": node,
                "reason": "Input/output error",
                "operation": op,
                "action": "retry",
            },
            separators=(",", ":"),
        )
        for op in ("write", "read")
    ]
    t0 = int(time.time())
    args = [(t0 + k // 20_000, (k % 20_000) * 50, details[k % 2]) for k in range(n)]

    async def run() -> None:
        hangs = HangTracking(2.0)
        source = LibvirtSource("qemu:///bench", Config(), SinkGroup(hangs), time.time)
        handled: list[object] = []
        inbox = EventInbox(asyncio.get_running_loop(), handled.append, time.time, 1.0)
        inbox.COALESCE_AFTER = n + 1  # one item per event: the loop side's cost per event
        source._apply_xml(uuid, xml, "7.2.0", None)  # the domain read, as on a connection
        session = source._session_id
        c0 = time.process_time()
        for sec, us, det in args:  # libvirt's event thread: its callback, then the hand-over
            inbox.put_event(session, uuid, "BLOCK_IO_ERROR", sec, us, det)
        c1 = time.process_time()
        items = [item for _pos, item in inbox._items]
        on_item = source._on_item

        def loop_side() -> None:
            for item in items:
                on_item(item)

        if profile:
            prof = cProfile.Profile()
            prof.runcall(loop_side)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            return
        c2 = time.process_time()
        loop_side()
        c3 = time.process_time()
        vm = source.domains[uuid].vm
        assert sum(vm.io_errors.values()) == n, vm.io_errors
        print(f"libvirt hand-over (the event thread's part): {1e6 * (c1 - c0) / n:.2f} us/event")
        print(f"libvirt loop side (decode, count, hangs):    {1e6 * (c3 - c2) / n:.2f} us/event")
        items.clear()
        inbox._items.clear()
        for coalesce_after in (n + 1, EventInbox.COALESCE_AFTER):  # one item each; coalesced
            tracemalloc.start()
            backlog = EventInbox(asyncio.get_running_loop(), handled.append, time.time, 1.0)
            backlog.COALESCE_AFTER = coalesce_after
            for sec, us, det in args:  # the loop never gets to it: all of it waits
                backlog.put_event(session, uuid, "BLOCK_IO_ERROR", sec, us, det)
            size, _peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            how = "one item per event" if coalesce_after > n else "coalesced per disk"
            print(f"{n} events waiting, {how}: {backlog.waiting} entries, {size / 1024:.0f} KiB")

    asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.event_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--source", choices=("qmp", "libvirt"), default="qmp")
    args = p.parse_args()
    if args.source == "libvirt":
        libvirt_path(args.events, args.profile)
        return
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
