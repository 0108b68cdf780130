"""What one scrape costs the exporter to write, in-process (no sockets, no HTTP, GC off).

Builds N VMs x D disks in memory, registers the exporter's collector as `exporter.app` does,
and times `generate_text` / `generate_openmetrics` in four states: idle, every VM's blockstats
new (a poll round between scrapes), the first scrape of a storm (every disk starts hanging and
gets its first error counter), and later storm scrapes (every disk hanging, every counter
moved).  The fleet benchmark (`bench.fleet`) measures what a client sees; this one isolates the
renderer, so that two versions can be compared on a shared machine::

    python -m bench.render --vms 1000 --disks 4 --runs 15
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

from exporter.exposition.cache import ExporterCollector
from exporter.exposition.formats import Registry, generate_openmetrics, generate_text
from exporter.hang.tracking import HangTracking
from exporter.model.events import BlockIOError
from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.state import BlockStats, Disk, Part, VMState

NOW = 1_700_000_000.0


def fleet(n: int, d: int) -> list[VMState]:
    cfg = PolicyConfig(max_timeout_seconds=600, require_nonzero_timeout=True)
    policy = DiskPolicy(
        werror="retry", rerror="retry", retry_interval_ms=1000, retry_timeout_ms=60000, retry_feature=True
    )
    vms = []
    for i in range(n):
        vm = VMState.qmp(f"/run/bench/vm{i:04d}.qmp")
        vm.up, vm.name, vm.uuid, vm.qemu_version = True, f"vm{i:04d}", f"uuid-{i}", "8.2.0"
        vm.status, vm.retry_feature = "running", True
        disks = {}
        for j in range(d):
            dev = f"virtio-disk{j}"
            disks[dev] = Disk(
                dev,
                f"drive{j}",
                f"#block{j}",
                dev,
                "q",
                "virtio-blk",
                policy,
                verify(policy, cfg),
                backend="nbd://s:1/x",
            )
        vm.set_disks(disks)
        for dev in disks:
            vm.blockstats[dev] = BlockStats(read_bytes=i * 1000, read_ops=5, idle_s=0.5)
        vm.changed(Part.STATS)
        vm.events["QMP_CAPABILITIES"] += 1
        vm.changed(Part.COUNTERS)
        vms.append(vm)
    return vms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=1000)
    p.add_argument("--disks", type=int, default=4)
    p.add_argument("--runs", type=int, default=15, help="scrapes per state and format")
    args = p.parse_args(argv)

    vms = fleet(args.vms, args.disks)
    hangs = HangTracking(2.0)
    for vm in vms:
        hangs.on_disks(vm, NOW)
    clock = [NOW]
    registry = Registry()
    registry.register(ExporterCollector(lambda: vms, hangs=hangs, clock=lambda: clock[0]))
    encoders = {"text": generate_text, "openmetrics": generate_openmetrics}
    gc.disable()
    print(f"| state ({args.vms} VMs x {args.disks} disks) | format | p50 ms | max ms | MB |")
    print("|---|---|---|---|---|")

    def timed(state: str, step: Callable[[int], None], fmt: str, runs: int) -> None:
        durations, size = [], 0
        for k in range(runs):
            step(k)
            t = time.perf_counter()
            size = len(encoders[fmt](registry))
            durations.append((time.perf_counter() - t) * 1000)
        print(
            f"| {state} | {fmt} | {statistics.median(durations):.1f} | {max(durations):.1f} | {size / 1e6:.1f} |"
        )

    def idle(k: int) -> None:
        pass

    def polled(k: int) -> None:
        for vm in vms:
            vm.blockstats["virtio-disk0"] = BlockStats(read_bytes=k, read_ops=k, idle_s=0.1)
            vm.changed(Part.STATS)

    storm_t = [NOW + 1.0]

    def storm(k: int) -> None:
        ts = storm_t[0] = storm_t[0] + 1.0
        clock[0] = ts + 0.5
        for vm in vms:
            for j in range(args.disks):
                event = BlockIOError(ts, f"virtio-disk{j}", "write", "retry")
                vm.received_io_error(event)
                hangs.on_event(vm, event)

    timed("first scrape", idle, "text", 1)
    for fmt in encoders:
        timed("idle", idle, fmt, args.runs)
    timed("new blockstats, every VM", polled, "text", args.runs)
    timed("storm, first scrape", storm, "text", 1)
    for fmt in encoders:
        timed("storm, every disk hanging", storm, fmt, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
