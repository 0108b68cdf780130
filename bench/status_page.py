"""How long the status page (``/``) and ``/api/v1/status`` take at fleet scale.

    python -m bench.status_page --vms 1000 --disks 4

A simulated fleet (``qmpsim``, as `bench.fleet` starts it) and the exporter as a subprocess;
once every VM is connected, some disks lose their storage (hanging, retry_timeout 600 s) and
each page is fetched ``--requests`` times back to back over loopback HTTP.  The time measured
is the client's: request sent to last byte received, so it includes building the snapshot,
rendering and transferring the page (the exporter serves it inline on its event loop, so this
is also how long a scrape could wait behind it).

``--policy-max-timeout 60`` makes every disk (timeout 600 s) a policy violation: the worst case
for the page, one row with its fix per disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import FleetSpec, fleet_exporter, running_fleet, wait_connected
from tests.support.procs import http_get
from tests.support.waits import wait_until


def timed_get(port: int, path: str) -> tuple[float, int]:
    """(seconds from connecting to the last byte, bytes) of one GET."""
    t0 = time.perf_counter()
    body = http_get(port, path)
    return time.perf_counter() - t0, len(body)


def measure(port: int, path: str, n: int) -> dict[str, Any]:
    timed_get(port, path)  # first request: imports, caches
    times, size = [], 0
    for _ in range(n):
        took, size = timed_get(port, path)
        times.append(took)
    times.sort()
    return {
        "path": path,
        "requests": n,
        "p50_ms": round(statistics.median(times) * 1000, 1),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 1),
        "max_ms": round(times[-1] * 1000, 1),
        "bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--disks", type=int, default=4)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--hanging", type=int, default=50, help="VMs whose first disk loses its storage")
    ap.add_argument("--policy-max-timeout", type=float, default=None, help="policy.max_timeout_seconds")
    ap.add_argument("--fleets", type=int, default=2, help="qmpsim processes")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    spec = FleetSpec(vms=args.vms, disks=args.disks, fleets=args.fleets)
    with tempfile.TemporaryDirectory(prefix="qih-sp-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        with running_fleet(spec, workdir) as fleets:
            extra: dict[str, Any] = {}
            if args.policy_max_timeout is not None:
                extra["policy"] = {"max_timeout_seconds": args.policy_max_timeout}
            with fleet_exporter(workdir, extra) as exp:
                connect_s = wait_connected(exp, args.vms, timeout=300)
                names = spec.names()[: args.hanging]
                for i, name in enumerate(names):
                    fleets[i % len(fleets)].link(name, "virtio-disk0", up=False, in_flight=1)

                def all_hanging() -> bool:
                    st = json.loads(exp.get_sync("/api/v1/status"))
                    return int(st["summary"]["disks_hanging"]) >= len(names)

                wait_until(all_hanging, 60, f"{len(names)} disks hanging", step=0.5)
                summary = json.loads(exp.get_sync("/api/v1/status"))["summary"]
                results = [measure(exp.port, p, args.requests) for p in ("/", "/api/v1/status")]
    print(
        f"status page at {args.vms} VMs x {args.disks} disks (connected in {connect_s:.1f} s): "
        f"{summary['disks_hanging']} hanging, {summary['disks_violating']} violating"
    )
    print(f"{'path':<16} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bytes':>10}")
    for r in results:
        print(f"{r['path']:<16} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8} {r['bytes']:>10}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"vms": args.vms, "disks": args.disks, "summary": summary, "results": results}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
