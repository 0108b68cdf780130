"""Event-loop lag and /healthz during an event storm: do the health defaults stay quiet when the
exporter is merely busy?  (docs/reliability.md; not run in CI.)

N simulated VMs (retry policy, 200 ms interval, ``--in-flight`` failing writes per disk) lose
their storage together for ``--storm-seconds``; meanwhile ``/healthz`` and
``qemu_exporter_event_loop_lag_seconds`` are read every 0.5 s.  Reports the largest lag seen,
every non-200 answer, and the events counted.  The simulators run in this process: the storm
is as fast as one core can emit it.

    .venv/bin/python bench/storm_lag.py --vms 200 --storm-seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent.parent.absolute()))

from bench.soak import make_vm
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics


def events(m: Metrics) -> int:
    return int(m.sum("qemu_exporter_qmp_events_total", event="BLOCK_IO_ERROR"))


async def run(args: argparse.Namespace, d: Path) -> dict[str, object]:
    vms = [make_vm(d, i, args.disks) for i in range(args.vms)]
    for vm in vms:
        await vm.start()
    cfg = {"qmp": {"sockets": [vm.socket_path for vm in vms]}, "log": {"level": "info"}}
    async with ExporterProcess(d, cfg) as exp:
        await exp.wait_metrics(lambda m: m.sum("qemu_qmp_up") == args.vms, timeout=120, what="every VM up")
        before = events(await exp.scrape())
        for vm in vms:
            for disk in vm.disks:
                vm.link_down(disk, in_flight=args.in_flight, operations=("write",))
        t0 = time.monotonic()
        max_lag, not_ok, probes = 0.0, [], 0
        async with aiohttp.ClientSession() as s:
            while time.monotonic() - t0 < args.storm_seconds:
                await asyncio.sleep(0.5)  # the probing rate, not synchronisation
                async with s.get(exp.url + "/healthz") as r:
                    probes += 1
                    if r.status != 200:
                        not_ok.append(f"{r.status} {(await r.text()).strip()}")
                m = await exp.scrape()
                max_lag = max(max_lag, m.value("qemu_exporter_event_loop_lag_seconds") or 0.0)
        counted = events(await exp.scrape()) - before
        for vm in vms:
            for disk in vm.disks:
                vm.link_up(disk)
    for vm in vms:
        await vm.kill()
    return {
        "vms": args.vms,
        "disks_per_vm": args.disks,
        "in_flight": args.in_flight,
        "storm_seconds": args.storm_seconds,
        "events_counted_in_storm": counted,
        "events_per_second": round(counted / args.storm_seconds),
        "max_event_loop_lag_seconds": round(max_lag, 3),
        "healthz_probes": probes,
        "healthz_not_ok": not_ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--disks", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=2)
    ap.add_argument("--storm-seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qih-lag-", dir="/tmp") as d:
        print(json.dumps(asyncio.run(run(args, Path(d)))), flush=True)


if __name__ == "__main__":
    main()
