"""Soak run: a few hundred simulated VMs, periodic IO-hang storms and QEMU restarts, against
the exporter subprocess; reports its memory and file descriptors over time and event loss.

Not run in CI.  Example (docs/reliability.md has a result):

    /tmp/venv/bin/python bench/soak.py --minutes 5 --vms 200

Every ``--storm-every`` seconds a random ``--storm-fraction`` of the VMs loses its storage for
``--storm-seconds`` (retry policy, 200 ms interval: a BLOCK_IO_ERROR per request per attempt),
and ``--restarts`` idle VMs are shut down and started again (connect/disconnect churn).  After
each storm, once the fleet is quiet, the BLOCK_IO_ERROR events each VM delivered to the
exporter's connection are compared with the exporter's ``qemu_exporter_qmp_events_total``:
any difference is event loss.  Sockets are configured explicitly so counters survive restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent.absolute()))

from qmpsim import DiskSpec, SimVM
from tests.support.exporter import ExporterProcess
from tests.support.procs import open_fds, rss_kib
from tests.support.scrape import Metrics
from tests.support.waits import wait_for


def make_vm(d: Path, i: int, disks: int) -> SimVM:
    specs = [
        DiskSpec(
            id=f"virtio-disk{j}",
            werror="retry",
            rerror="retry",
            retry_interval_ms=200,
            retry_timeout_ms=0,
            in_flight=0,
        )
        for j in range(disks)
    ]
    return SimVM(str(d / f"vm{i}.qmp"), name=f"vm{i}", disks=specs)


class Soak:
    def __init__(self, args: argparse.Namespace, d: Path) -> None:
        self.args = args
        self.d = d
        self.vms = [make_vm(d, i, args.disks) for i in range(args.vms)]
        self.delivered_before: dict[str, int] = {vm.name or "": 0 for vm in self.vms}  # old incarnations
        self.samples: list[dict[str, Any]] = []
        self.scrape_times: list[float] = []
        self.loss_checks: list[int] = []
        self.restarts = 0
        self.storms = 0

    def delivered(self, i: int) -> int:
        vm = self.vms[i]
        return self.delivered_before[vm.name or ""] + vm.event_count("BLOCK_IO_ERROR", socket=vm.socket_path)

    async def scrape(self, exp: ExporterProcess) -> Metrics:
        t0 = time.monotonic()
        m = await exp.scrape()
        self.scrape_times.append(time.monotonic() - t0)
        return m

    def sample(self, exp: ExporterProcess, t0: float, m: Metrics) -> None:
        assert exp.proc is not None
        rss, fds = rss_kib(exp.proc.pid), open_fds(exp.proc.pid)
        row = {
            "t": round(time.monotonic() - t0),
            "rss_kib": rss,
            "fds": fds,
            "up": int(m.sum("qemu_qmp_up")),
            "events": int(m.sum("qemu_exporter_qmp_events_total", event="BLOCK_IO_ERROR")),
            "internal_errors": int(m.sum("qemu_exporter_internal_errors_total")),
        }
        self.samples.append(row)
        print(json.dumps(row), flush=True)

    async def restart_some(self, idle: list[int]) -> None:
        for i in random.sample(idle, min(self.args.restarts, len(idle))):
            vm = self.vms[i]
            await vm.shutdown()  # SHUTDOWN flushed, socket removed
            self.delivered_before[vm.name or ""] += vm.event_count("BLOCK_IO_ERROR", socket=vm.socket_path)
            self.vms[i] = make_vm(self.d, i, self.args.disks)
            await self.vms[i].start()
            self.restarts += 1

    async def check_loss(self, exp: ExporterProcess) -> int:
        """Wait until the exporter has counted what every VM delivered; return the difference."""

        async def settled() -> Metrics | None:
            m = await self.scrape(exp)
            counted = {
                s.labels["vm"]: s.value
                for s in m.find("qemu_exporter_qmp_events_total", event="BLOCK_IO_ERROR")
            }
            ok = all(counted.get(vm.name or "", 0) == self.delivered(i) for i, vm in enumerate(self.vms))
            return m if ok else None

        try:
            await wait_for(settled, 30, "exporter counts = delivered")
            return 0
        except AssertionError:
            m = await self.scrape(exp)
            counted = {
                s.labels["vm"]: s.value
                for s in m.find("qemu_exporter_qmp_events_total", event="BLOCK_IO_ERROR")
            }
            return int(
                sum(abs(self.delivered(i) - counted.get(vm.name or "", 0)) for i, vm in enumerate(self.vms))
            )

    async def run(self) -> dict[str, Any]:
        a = self.args
        for vm in self.vms:
            await vm.start()
        cfg = {
            "qmp": {
                "sockets": [vm.socket_path for vm in self.vms],
                "discovery_interval_seconds": 1.0,
                "poll_interval_seconds": 2.0,
                "backoff_initial_seconds": 0.1,
                "backoff_max_seconds": 2.0,
            },
            "log": {"level": "info"},
        }
        async with ExporterProcess(self.d, cfg) as exp:
            await exp.wait_metrics(lambda m: m.sum("qemu_qmp_up") == a.vms, timeout=60, what="every VM up")
            t0 = time.monotonic()
            end = t0 + a.minutes * 60
            self.sample(exp, t0, await self.scrape(exp))
            while time.monotonic() < end:
                chosen = random.sample(range(a.vms), max(1, int(a.vms * a.storm_fraction)))
                for i in chosen:
                    for disk in self.vms[i].disks:
                        self.vms[i].link_down(disk, in_flight=2, operations=("write",))
                self.storms += 1
                storm_end = time.monotonic() + a.storm_seconds
                idle = [i for i in range(a.vms) if i not in set(chosen)]
                await self.restart_some(idle)
                while time.monotonic() < storm_end:
                    await asyncio.sleep(1.0)  # load period of the soak, not synchronisation
                    await self.scrape(exp)
                for i in chosen:
                    for disk in self.vms[i].disks:
                        self.vms[i].link_up(disk)
                self.loss_checks.append(await self.check_loss(exp))
                self.sample(exp, t0, await self.scrape(exp))
                rest = min(end, time.monotonic() + a.storm_every - a.storm_seconds) - time.monotonic()
                if rest > 0:
                    await asyncio.sleep(rest)  # quiet period between storms
            assert exp.proc is not None and exp.proc.poll() is None, "exporter died"
            log = exp.log()
        for vm in self.vms:
            await vm.kill()
        first, last = self.samples[0], self.samples[-1]
        times = sorted(self.scrape_times)
        return {
            "minutes": a.minutes,
            "vms": a.vms,
            "disks_per_vm": a.disks,
            "storms": self.storms,
            "restarts": self.restarts,
            "events_counted": last["events"],
            "event_loss": sum(self.loss_checks),
            "rss_kib_first": first["rss_kib"],
            "rss_kib_last": last["rss_kib"],
            "rss_kib_max": max(s["rss_kib"] for s in self.samples),
            "fds_first": first["fds"],
            "fds_last": last["fds"],
            "fds_max": max(s["fds"] for s in self.samples),
            "internal_errors": last["internal_errors"],
            "scrapes": len(times),
            "scrape_p50_s": round(statistics.median(times), 4),
            "scrape_max_s": round(times[-1], 4),
            "tracebacks_in_log": log.count("Traceback"),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--vms", type=int, default=300)
    p.add_argument("--disks", type=int, default=2)
    p.add_argument("--storm-every", type=float, default=30.0, help="seconds between storm starts")
    p.add_argument("--storm-seconds", type=float, default=10.0)
    p.add_argument("--storm-fraction", type=float, default=0.2)
    p.add_argument("--restarts", type=int, default=5, help="idle VMs restarted per storm")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    random.seed(args.seed)
    d = Path(tempfile.mkdtemp(prefix="qih-soak-", dir="/tmp"))
    try:
        result = asyncio.run(Soak(args, d).run())
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
