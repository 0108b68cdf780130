"""What watching through libvirt costs, next to a second QMP monitor, on the same domains.

N domains (Debian QEMU under a real, private libvirtd: tests/libvirt/lab.py) boot the IO-loop
guest from NBD storage with ``error_policy='report'`` and a second QMP monitor each.  The
exporter runs twice, once per mode, and the benchmark reports for each:

* connect s: exporter start until every domain shows ``qemu_qmp_up 1``;
* then every domain's storage fails for ``--seconds``: events/s the exporter counted, the
  exporter's CPU and libvirtd's CPU (utime+stime from /proc, in cores) over that window.

libvirtd handles every event on its own monitor in both modes; in libvirt mode it also forwards
each one to the exporter.  The difference between the two libvirtd columns is the price of the
forwarding.

    .venv/bin/python -m bench.libvirt_cost --domains 4 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from tests.libvirt.lab import DiskOptions, LabDomain, LibvirtLab, lab_workdir, running_libvirtd
from tests.support.exporter import ExporterProcess
from tests.support.procs import cpu_seconds
from tests.support.scrape import Metrics


def add_domain(lab: LibvirtLab, sockets: Path) -> tuple[LabDomain, Path]:
    socket = sockets / f"vm{len(lab.domains)}.qmp"
    return lab.domain(DiskOptions(error_policy="report"), hint="cost", pause_us=0, qmp_monitor=socket), socket


def errors(m: Metrics) -> float:
    return m.sum("qemu_block_io_error_events_total")


async def measure(
    mode: str, config: dict[str, Any], workdir: Path, doms: list[LabDomain], libvirtd_pid: int, seconds: float
) -> dict[str, float]:
    d = workdir / mode
    d.mkdir()
    t0 = time.monotonic()
    async with ExporterProcess(d, config) as exp:
        await exp.wait_metrics(
            lambda m: (
                all(m.value("qemu_qmp_up", vm=dom.name) == 1 for dom in doms)
                and len(m.find("qemu_block_read_operations_total")) >= len(doms)
            ),
            timeout=60,
            what="every domain watched",
        )
        connect = time.monotonic() - t0
        assert exp.proc is not None
        for dom in doms:
            dom.fail_storage()
        await asyncio.sleep(1.0)  # ramp: every guest is failing IO in a loop
        m0, c0, l0, w0 = (
            errors(await exp.scrape()),
            cpu_seconds(exp.proc.pid),
            cpu_seconds(libvirtd_pid),
            time.monotonic(),
        )
        await asyncio.sleep(seconds)  # the measurement window itself
        m1, c1, l1, w1 = (
            errors(await exp.scrape()),
            cpu_seconds(exp.proc.pid),
            cpu_seconds(libvirtd_pid),
            time.monotonic(),
        )
        for dom in doms:
            dom.restore_storage()
        wall = w1 - w0
        return {
            "connect s": connect,
            "events/s": (m1 - m0) / wall,
            "exporter CPU": (c1 - c0) / wall,
            "libvirtd CPU": (l1 - l0) / wall,
            "exporter µs/event": (c1 - c0) / max(1.0, m1 - m0) * 1e6,
        }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with (
        lab_workdir("qib-lvd-") as ldir,
        running_libvirtd(ldir, private=True) as libvirtd,
        lab_workdir("qib-lvc-") as workdir,
        contextlib.ExitStack() as stack,
    ):
        sockets = workdir / "sockets"
        sockets.mkdir()
        sockets.chmod(0o777)  # QEMU (libvirt-qemu) creates the second monitors here
        lab = LibvirtLab(libvirtd, workdir, stack)
        doms = [add_domain(lab, sockets)[0] for _ in range(args.domains)]
        pid = libvirtd.pid
        assert pid is not None
        qmp = {"poll_interval_seconds": 5}
        results = {
            "libvirt": await measure(
                "libvirt", {"libvirt": {"uri": libvirtd.uri}, "qmp": {"globs": [str(workdir / "none" / "*.qmp")], **qmp}},
                workdir, doms, pid, args.seconds,
            ),
            "qmp": await measure(
                "qmp", {"qmp": {"globs": [str(sockets / "*.qmp")], **qmp}}, workdir, doms, pid, args.seconds
            ),
        }  # fmt: skip
    print(f"{args.domains} domains, report policy, storage failing for {args.seconds:g} s")
    print("| measure | libvirt mode | second QMP monitor |\n|---|---|---|")
    for key in results["libvirt"]:
        print(f"| {key} | {results['libvirt'][key]:.3g} | {results['qmp'][key]:.3g} |")


if __name__ == "__main__":
    asyncio.run(main())
