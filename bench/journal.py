"""What a host-wide outage's end costs the event loop with the hang journal on.

    python -m bench.journal [--vms 1000] [--disks 4] [--dir DIR] [--rounds 3]

1000 VMs x 4 disks (the real hang tracking and journal, in this process, no sockets) hang
together; then the storage returns and one tick of the hang tracking completes all 4000 hangs at
once, as it does after a real outage.  Measured, per round:

* ``tick``: the tick that completes the 4000 hangs, with the journal (each hang's record made
  and queued on the loop) and, for comparison, without it (the same tracking, no journal);
* ``loop lag``: the largest delay of a 1 ms heartbeat on the loop while the journal's thread
  serialises, writes and ``fsync``-s the batch (what the journal still takes from the loop: the
  GIL while it serialises);
* ``write``: the thread's wall time for the batch, and the bytes written;
* ``inline``: the same batch written synchronously on the loop instead (what the loop would be
  held for without the thread).

``--dir`` should be on the filesystem the journal lives on in production (``fsync`` cost);
the default is a temporary directory under /tmp.  Results: docs/incidents.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from exporter.hang.journal import HangJournal, JournalFiles
from exporter.hang.tracking import HangTracking
from exporter.model.events import BlockIOError
from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.state import Disk, VMState

T0 = 1_717_243_200.0


def fleet(vms: int, disks: int) -> list[VMState]:
    p = DiskPolicy("retry", "retry", 1000, 60_000, True)
    verdict = verify(p, PolicyConfig())
    out = []
    for i in range(vms):
        vm = VMState.qmp(f"/run/qemu-iohang-exporter/vm{i:04d}.qmp")
        vm.name, vm.uuid, vm.up, vm.status = (
            f"vm{i:04d}",
            f"00000000-0000-4000-8000-{i:012d}",
            True,
            "running",
        )
        vm.set_disks(
            {
                f"virtio-disk{j}": Disk(
                    f"virtio-disk{j}",
                    "",
                    f"node{j}",
                    f"/machine/peripheral/virtio-disk{j}/virtio-backend",
                    f"/machine/peripheral/virtio-disk{j}",
                    "virtio-blk",
                    p,
                    verdict,
                    backend="rbd://10.0.0.1:6789,10.0.0.2:6789/vms",
                )
                for j in range(disks)
            }
        )
        out.append(vm)
    return out


def outage(hangs: HangTracking, vms: list[VMState], journal: HangJournal | None) -> None:
    """Every disk fails for 10 s (one attempt a second), as the sources would feed it."""
    for vm in vms:
        hangs.on_disks(vm, T0)
        if journal is not None:
            journal.on_disks(vm, T0)
    for k in range(10):
        for vm in vms:
            for dev in vm.disks:
                hangs.on_event(vm, BlockIOError(T0 + k, dev, "write", "retry"))


async def heartbeat(stop: asyncio.Event, lags: list[tuple[float, float]], period: float = 0.001) -> None:
    """(when it slept, how late it woke) every ``period``."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(period)
        lags.append((t, loop.time() - t - period))


async def one_round(vms: list[VMState], d: Path) -> dict[str, float]:
    path = d / "hangs.jsonl"
    for p in (path, Path(str(path) + ".1")):
        p.unlink(missing_ok=True)
    n = sum(len(vm.disks) for vm in vms)

    # Without the journal: the tick's own cost.
    hangs = HangTracking(1.0)
    outage(hangs, vms, None)
    gc.collect()
    gc.freeze()
    t = time.perf_counter()
    hangs.tick(T0 + 30)
    tick_without = time.perf_counter() - t

    hangs = HangTracking(1.0)
    journal = HangJournal(str(path), 16 * 1024 * 1024, lambda: T0 + 30)
    hangs.on_completed = journal.completed
    outage(hangs, vms, journal)
    gc.collect()
    gc.freeze()  # as the exporter does with its long-lived objects (exporter.runtime.gc_tuning)
    beats: list[tuple[float, float]] = []
    stop = asyncio.Event()
    beat = asyncio.create_task(heartbeat(stop, beats))
    await asyncio.sleep(0.05)
    t = time.perf_counter()
    hangs.tick(T0 + 30)  # 4000 hangs complete: records queued, the write starts in a thread
    tick_with = time.perf_counter() - t
    after_tick = asyncio.get_running_loop().time()
    t = time.perf_counter()
    await journal.close()
    write = time.perf_counter() - t
    await asyncio.sleep(0.01)
    stop.set()
    await beat
    # The loop while the thread writes: heartbeats that went to sleep after the tick.
    lags = [lag for slept, lag in beats if slept >= after_tick]
    assert journal.written == n, (journal.written, n)
    size = path.stat().st_size

    # The same batch written on the loop.
    records = JournalFiles(str(path)).read().records
    path.unlink()
    t = time.perf_counter()
    JournalFiles(str(path)).append(records)
    inline = time.perf_counter() - t
    gc.unfreeze()
    return {
        "hangs": n,
        "tick_without_journal_ms": tick_without * 1000,
        "tick_with_journal_ms": tick_with * 1000,
        "write_thread_ms": write * 1000,
        "heartbeats_during_write": len(lags),
        "loop_lag_max_ms": max(lags, default=0.0) * 1000,
        "inline_write_ms": inline * 1000,
        "bytes": size,
    }


async def main_async(args: argparse.Namespace) -> None:
    vms = fleet(args.vms, args.disks)
    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-journal-"))
    rounds = [await one_round(vms, d) for _ in range(args.rounds)]
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(json.dumps({"dir": str(d), "rounds": rounds, "median": summary}, indent=2))
    if not args.dir:
        for p in d.iterdir():
            os.unlink(p)
        d.rmdir()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.journal", description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=1000)
    p.add_argument("--disks", type=int, default=4)
    p.add_argument("--dir", help="where to write the journal (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
