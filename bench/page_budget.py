"""What each collector costs a fleet's metrics backend: samples per disk, per VM and per host.

    python -m bench.page_budget --vms 1000 --disks 4

A healthy, compliant simulated fleet (every disk ``werror=rerror=retry``, a 30 s timeout) is
watched by one exporter per page: the default page, the full page (every collector), and each
collector alone (``--collector.disable-defaults --collector.NAME``).  Each page is scraped as
Prometheus asks for it (OpenMetrics, gzip) once every VM is up and polled, and its samples are
sorted by what they belong to: a ``device`` label is a disk's, a ``vm`` label without one a
VM's, neither the host's.  Printed as a table (docs/metrics.md) and, with ``--json``, as JSON.

The budget (issue 25): at most 10 samples per disk on the default page at 1000 VMs x 4 disks,
the per-VM series included, and at most 200 host-wide samples.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.fleet import FleetSpec, fleet_exporter, running_fleet
from bench.prometheus import PROMETHEUS_3_ACCEPT
from exporter.model import collectors
from exporter.model.collectors import COLLECTORS, DEFAULT_COLLECTORS
from tests.support.scrape import parse_series
from tests.support.waits import wait_until

#: Budget of the default page (issue 25).
MAX_SAMPLES_PER_DISK = 10.0
MAX_HOST_SAMPLES = 200


@dataclass
class Page:
    name: str
    samples: int
    per_disk: float  # samples with a device label, per disk
    per_vm: float  # samples with a vm label and no device label, per VM
    host: int  # samples with neither
    total_per_disk: float  # every sample, per disk
    bytes: int
    gzip_bytes: int
    scrape_ms: float  # median of 5, OpenMetrics + gzip, as Prometheus asks


def classify(text: str) -> tuple[int, int, int]:
    """(disk, vm, host) sample counts of an exposition page."""
    disk = vm = host = 0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        _name, labels = parse_series(line.rpartition(" ")[0])
        names = {k for k, _v in labels}
        if "device" in names:
            disk += 1
        elif "vm" in names:
            vm += 1
        else:
            host += 1
    return disk, vm, host


def scrape(port: int) -> tuple[str, int, float]:
    """The page as Prometheus gets it: (text, gzip size, seconds to the last byte)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        t0 = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Accept": PROMETHEUS_3_ACCEPT, "Accept-Encoding": "gzip"})
        r = conn.getresponse()
        body = r.read()
        took = time.perf_counter() - t0
        assert r.status == 200, body[:200]
    finally:
        conn.close()
    return gzip.decompress(body).decode(), len(body), took


def measure(name: str, switches: dict[str, bool], spec: FleetSpec, workdir: Path) -> Page:
    exp = fleet_exporter(workdir, {"collectors": switches})
    with exp:
        # Every VM identified and polled once (its blockstats, where they are shown), so that
        # nothing is still to come on a healthy fleet.
        wait_until(lambda: polled(exp.port, spec), 180, "every VM identified", step=0.5)
        if "blockstats" in collectors.resolve(
            {k: v for k, v in switches.items() if k != "disable_defaults"},
            switches.get("disable_defaults", False),
        ):
            want = spec.vms * spec.disks
            wait_until(
                lambda: scrape(exp.port)[0].count("qemu_block_read_bytes_total{") == want, 60, "blockstats"
            )
        times, text, gz = [], "", 0
        for _ in range(5):
            text, gz, took = scrape(exp.port)
            times.append(took)
    disk, vm, host = classify(text)
    n_disks = spec.vms * spec.disks
    samples = disk + vm + host
    return Page(
        name,
        samples,
        round(disk / n_disks, 3),
        round(vm / spec.vms, 3),
        host,
        round(samples / n_disks, 3),
        len(text.encode()),
        gz,
        round(sorted(times)[2] * 1000, 1),
    )


def polled(port: int, spec: FleetSpec) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/api/v1/status")
        status = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    vms = status["vms"]
    return len(vms) == spec.vms and all(
        vm["up"] and vm["status"] and len(vm["disks"]) == spec.disks for vm in vms
    )


def pages(only: list[str] | None) -> dict[str, dict[str, bool]]:
    out: dict[str, dict[str, bool]] = {
        "default": {},
        "full": dict.fromkeys(COLLECTORS, True),
    }
    for name in COLLECTORS:
        out[name] = {"disable_defaults": True, name: True}
    return {k: v for k, v in out.items() if only is None or k in only}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.page_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=100)
    p.add_argument("--disks", type=int, default=4)
    p.add_argument("--fleets", type=int, default=2, help="qmpsim processes the fleet is split over")
    p.add_argument("--pages", help="comma-separated: default, full, or collector names (default: all)")
    p.add_argument("--json", dest="json_path", help="also write the results here")
    args = p.parse_args(argv)
    spec = FleetSpec(args.vms, args.disks, interval_ms=1000, timeout_ms=30_000, fleets=args.fleets)
    results = []
    with tempfile.TemporaryDirectory(prefix="qih-budget-") as tmp:
        workdir = Path(tmp)
        with running_fleet(spec, workdir) as fleets:
            assert fleets
            for name, switches in pages(args.pages.split(",") if args.pages else None).items():
                page = measure(name, switches, spec, workdir)
                results.append(page)
                print(
                    f"{name:<10} samples {page.samples:>7}  per disk {page.per_disk:>6}  per VM {page.per_vm:>6}"
                    f"  host {page.host:>4}  all/disk {page.total_per_disk:>6}  {page.bytes / 1024:>8.1f} KiB"
                    f"  gzip {page.gzip_bytes / 1024:>7.1f} KiB  scrape {page.scrape_ms:>6} ms",
                    flush=True,
                )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps([asdict(r) for r in results], indent=1))
    default = next((r for r in results if r.name == "default"), None)
    if default is not None:
        ok = default.total_per_disk <= MAX_SAMPLES_PER_DISK and default.host <= MAX_HOST_SAMPLES
        print(
            f"budget: default page {default.total_per_disk} samples per disk (max {MAX_SAMPLES_PER_DISK:g}),"
            f" {default.host} host-wide (max {MAX_HOST_SAMPLES}): {'ok' if ok else 'OVER'}"
        )
        print(f"default collectors: {', '.join(sorted(DEFAULT_COLLECTORS))}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
