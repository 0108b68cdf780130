"""What watching through libvirt costs, next to a second QMP monitor, on the same domains.

N domains (Debian QEMU under a real, private libvirtd: tests/libvirt/lab.py) boot the IO-loop
guest from NBD storage with ``error_policy='report'`` and a second QMP monitor each.  The
exporter runs twice, once per mode, and the benchmark reports for each:

* connect s: exporter start until every domain shows ``qemu_qmp_up 1``;
* the exporter's CPU at rest (``--rest-seconds``: polls, no events);
* then every domain's storage fails for ``--seconds``: events/s the exporter counted, the
  exporter's CPU and libvirtd's CPU (utime+stime from /proc, in cores) over that window.

libvirtd handles every event on its own monitor in both modes; in libvirt mode it also forwards
each one to the exporter.  The difference between the two libvirtd columns is the price of the
forwarding.  Also over the window: the events QEMU emitted (the requests nbdkit failed: one
``BLOCK_IO_ERROR`` each with the report policy), the share of them the exporter counted, and
the QEMU processes' CPU (the TCG guests that make the events compete for the same cores).

    .venv/bin/python -m bench.libvirt_cost --domains 4 --seconds 10
    .venv/bin/python -m bench.libvirt_cost --sweep 4,8,16 --modes libvirt   # storm rates

``--sweep`` measures at each number of domains in turn, starting the next ones in between
(one libvirtd throughout): where the events counted stop growing with the events emitted is
what the path delivers on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
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


def injected(doms: list[LabDomain]) -> int:
    return sum(dom.storage.injected_errors() for dom in doms)


def qemu_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


async def measure(
    mode: str,
    config: dict[str, Any],
    workdir: Path,
    doms: list[LabDomain],
    libvirtd_pid: int,
    seconds: float,
    rest: float,
) -> dict[str, float]:
    d = workdir / f"{mode}-{len(doms)}"
    d.mkdir()
    qemus = [pid for dom in doms if (pid := dom.qemu_pid()) is not None]
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
        r0, rw0 = cpu_seconds(exp.proc.pid), time.monotonic()
        await asyncio.sleep(rest)  # at rest: polls, not events
        rest_cpu = (cpu_seconds(exp.proc.pid) - r0) / (time.monotonic() - rw0)
        for dom in doms:
            dom.fail_storage()
        pid = exp.proc.pid

        async def snapshot() -> tuple[float, float, float, float, int, float]:
            """Events counted; exporter, libvirtd and QEMU CPU seconds; errors injected; time."""
            counted = errors(await exp.scrape())
            return (
                counted,
                cpu_seconds(pid),
                cpu_seconds(libvirtd_pid),
                qemu_cpu(qemus),
                injected(doms),
                time.monotonic(),
            )

        await asyncio.sleep(1.0)  # ramp: every guest is failing IO in a loop
        m0, c0, l0, q0, i0, w0 = await snapshot()
        await asyncio.sleep(seconds)  # the measurement window itself
        m1, c1, l1, q1, i1, w1 = await snapshot()
        for dom in doms:
            dom.restore_storage()
        wall = w1 - w0
        return {
            "connect s": connect,
            "events/s": (m1 - m0) / wall,
            "emitted events/s (nbdkit)": (i1 - i0) / wall,
            "counted / emitted": (m1 - m0) / max(1, i1 - i0),
            "exporter CPU": (c1 - c0) / wall,
            "libvirtd CPU": (l1 - l0) / wall,
            "QEMU CPU (all domains)": (q1 - q0) / wall,
            "exporter CPU at rest": rest_cpu,
            "exporter µs/event": (c1 - c0) / max(1.0, m1 - m0) * 1e6,
            "exporter µs/event above rest": ((c1 - c0) - rest_cpu * wall) / max(1.0, m1 - m0) * 1e6,
            "libvirtd µs/event": (l1 - l0) / max(1.0, m1 - m0) * 1e6,
        }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--rest-seconds", type=float, default=5.0, help="exporter CPU at rest, before the storage fails"
    )
    ap.add_argument(
        "--sweep", help="comma-separated numbers of domains, measured in turn (instead of --domains)"
    )
    ap.add_argument(
        "--modes", default="libvirt,qmp", help="libvirt (events through libvirtd), qmp (second monitor)"
    )
    args = ap.parse_args()
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.domains]
    modes = args.modes.split(",")
    columns: list[tuple[str, dict[str, float]]] = []
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
        doms: list[LabDomain] = []
        pid = libvirtd.pid
        assert pid is not None
        qmp = {"poll_interval_seconds": 5}
        configs: dict[str, dict[str, Any]] = {
            "libvirt": {"libvirt": {"uri": libvirtd.uri}, "qmp": {"globs": [str(workdir / "none" / "*.qmp")], **qmp}},
            "qmp": {"qmp": {"globs": [str(sockets / "*.qmp")], **qmp}},
        }  # fmt: skip
        for n in counts:
            while len(doms) < n:
                doms.append(add_domain(lab, sockets)[0])
            for mode in modes:
                result = await measure(
                    mode, configs[mode], workdir, doms, pid, args.seconds, args.rest_seconds
                )
                columns.append((f"{n} domains, {mode}", result))
                print(f"{n} domains, {mode}: {result}", file=sys.stderr, flush=True)
    print(f"report policy, storage failing for {args.seconds:g} s; load average {os.getloadavg()[0]:.2f}")
    print("| measure | " + " | ".join(title for title, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for key in columns[0][1]:
        print(f"| {key} | " + " | ".join(f"{r[key]:.3g}" for _, r in columns) + " |")


if __name__ == "__main__":
    asyncio.run(main())
