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

What a stalled or slow subscriber costs libvirtd (issue 26, docs/libvirt.md):

    .venv/bin/python -m bench.libvirt_cost --domains 2 --modes libvirt --policy retry --stall 35
    .venv/bin/python -m bench.libvirt_cost --domains 2 --modes libvirt --policy retry --stall 12 --keepalive 2,2
    .venv/bin/python -m bench.libvirt_cost --domains 4 --modes libvirt --policy retry --cpu-quota 0.08

* ``--policy retry``: libvirtd receives the errors as openEuler QEMU's ``retry`` events
  (`tests.libvirt.lab.retry_emulator`), and logs its "unknown action" warning for each, as with
  the real thing; ``report`` (default) as Debian's QEMU sends them.
* ``--stall S``: after the window, the exporter is stopped (SIGSTOP) for S seconds while the
  storage keeps failing: libvirtd's RSS before, when it drops the client (``virt-admin
  client-list``: its keepalive) and after; KB of libvirtd memory per event queued for the
  stopped client; the events emitted during the stall and how many the exporter counted; hangs
  per disk (one continuous outage: none may end); the blind intervals it shows.
* ``--keepalive I,C``: the lab's libvirtd.conf ``keepalive_interval``, ``keepalive_count``
  (libvirtd drops a silent client after about I x (C + 1) s; default 5,5: 30 s).
* ``--cpu-quota C``: the exporter in a cgroup limited to C cores (cgroup v2 ``cpu.max`` or v1
  ``cpu.cfs_quota_us``; removed afterwards) from before the storage fails: whether it keeps up
  (counted / emitted, and whether every event is counted once the storm is over), its RSS (the
  inbox coalesces per disk while behind), and libvirtd's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.libvirt.lab import (
    DiskOptions,
    LabDomain,
    Libvirtd,
    LibvirtLab,
    lab_workdir,
    retry_emulator,
    running_libvirtd,
)
from tests.support.exporter import ExporterProcess
from tests.support.procs import cpu_seconds, rss_kib
from tests.support.scrape import Metrics


def add_domain(lab: LibvirtLab, sockets: Path, emulator: Path | None) -> tuple[LabDomain, Path]:
    socket = sockets / f"vm{len(lab.domains)}.qmp"
    dom = lab.domain(
        DiskOptions(error_policy="report"), hint="cost", pause_us=0, qmp_monitor=socket, emulator=emulator
    )
    return dom, socket


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


def loop_thread_cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s main thread, which runs the asyncio loop (the rest is libvirt's
    event thread, and short-lived call threads)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cpu_quota(pid: int, cores: float) -> Iterator[None]:
    """Run ``pid`` (every thread) limited to ``cores`` of CPU: a cgroup of its own (v2
    ``cpu.max``, or v1's ``cpu`` controller), removed afterwards.  Needs root."""
    period = 100_000
    quota = max(1000, round(cores * period))
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/cpu")
    group = root / f"qih-bench-{os.getpid()}"
    group.mkdir()
    try:
        if v2:
            (group / "cpu.max").write_text(f"{quota} {period}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        with contextlib.suppress(OSError):  # back to the root group, if it still runs
            (root / "cgroup.procs").write_text(str(pid))
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def libvirtd_clients(libvirtd: Libvirtd) -> set[str]:
    """Ids of the clients connected to ``libvirtd`` (``virt-admin client-list``)."""
    uri = "libvirtd:///system"
    if libvirtd.private:
        uri += f"?socket={libvirtd.root / 'run' / 'libvirt-admin-sock'}"
    out = subprocess.run(
        ["virt-admin", "-q", "-c", uri, "client-list", "libvirtd"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    return {line.split()[0] for line in out.splitlines() if line.strip() and line.split()[0].isdigit()}


async def stall(
    exp: ExporterProcess, doms: list[LabDomain], libvirtd: Libvirtd, seconds: float
) -> dict[str, float]:
    """Stop the exporter ``seconds`` while the storage keeps failing (class docstring)."""
    assert exp.proc is not None and libvirtd.pid is not None
    lv = libvirtd.pid
    m0 = await exp.scrape()
    mine = libvirtd_clients(libvirtd)  # the exporter's connection (nothing else runs now)
    rss0, i0, c0 = rss_kib(lv), injected(doms), errors(m0)
    dropped: tuple[float, int, int] | None = None  # (after s, libvirtd RSS, events emitted)
    peak = rss0
    os.kill(exp.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.5)  # sampling period of the observation
            rss = rss_kib(lv)
            peak = max(peak, rss)
            if dropped is None and not (libvirtd_clients(libvirtd) & mine):
                dropped = (time.monotonic() - t0, rss, injected(doms) - i0)
        i_stall = injected(doms) - i0
    finally:
        os.kill(exp.proc.pid, signal.SIGCONT)
    uri = libvirtd.uri
    await exp.wait_metrics(
        lambda m: m.sum("qemu_libvirt_up", uri=uri) == 1 and errors(m) > c0 + 100,
        timeout=60,
        what="the exporter back and counting",
    )
    await asyncio.sleep(5.0)  # the storm goes on: libvirtd's memory after the stall
    rss_after, m1, i1 = rss_kib(lv), await exp.scrape(), injected(doms)
    drop_s, rss_drop, queued = dropped if dropped is not None else (float("nan"), peak, i_stall)
    return {
        "stall s": seconds,
        "libvirtd dropped the client after s": drop_s,
        "events emitted during the stall": i_stall,
        "events queued until the drop": queued,
        "libvirtd RSS before, MiB": rss0 / 1024,
        "libvirtd RSS at the drop, MiB": rss_drop / 1024,
        "libvirtd RSS peak, MiB": peak / 1024,
        "libvirtd RSS 5 s after, MiB": rss_after / 1024,
        "libvirtd KB per queued event": (rss_drop - rss0) * 1.024 / max(1, queued),
        "counted / emitted over stall and recovery": (errors(m1) - c0) / max(1, i1 - i0),
        "hangs ended during the outage (must be 0)": m1.sum("qemu_block_io_hangs_total"),
        "disks hanging": m1.sum("qemu_block_io_hang"),
        "blind s, event loop": m1.sum("qemu_exporter_blind_seconds_total", source="event_loop"),
        "blind s, libvirt": m1.sum("qemu_exporter_blind_seconds_total", source="libvirt"),
    }


async def measure(
    mode: str,
    config: dict[str, Any],
    workdir: Path,
    doms: list[LabDomain],
    libvirtd: Libvirtd,
    args: argparse.Namespace,
) -> dict[str, float]:
    seconds, rest = args.seconds, args.rest_seconds
    libvirtd_pid = libvirtd.pid
    assert libvirtd_pid is not None
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
        pid = exp.proc.pid
        r0, rw0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(rest)  # at rest: polls, not events
        rest_cpu = (cpu_seconds(pid) - r0) / (time.monotonic() - rw0)
        quota = cpu_quota(pid, args.cpu_quota) if args.cpu_quota else contextlib.nullcontext()
        with quota:
            for dom in doms:
                dom.fail_storage()

            async def snapshot() -> tuple[float, float, float, float, int, float, int, float]:
                """Events counted; exporter, libvirtd, QEMU CPU s; errors injected; time; RSS;
                the exporter's loop thread's CPU s."""
                counted = errors(await exp.scrape())
                return (
                    counted,
                    cpu_seconds(pid),
                    cpu_seconds(libvirtd_pid),
                    qemu_cpu(qemus),
                    injected(doms),
                    time.monotonic(),
                    rss_kib(pid),
                    loop_thread_cpu(pid),
                )

            await asyncio.sleep(1.0)  # ramp: every guest is failing IO in a loop
            m0, c0, l0, q0, i0, w0, _, t0 = await snapshot()
            lv_rss0 = rss_kib(libvirtd_pid)
            await asyncio.sleep(seconds)  # the measurement window itself
            m1, c1, l1, q1, i1, w1, exp_rss, t1 = await snapshot()
            lv_rss1 = rss_kib(libvirtd_pid)
            stalled = await stall(exp, doms, libvirtd, args.stall) if args.stall and mode == "libvirt" else {}
            for dom in doms:
                dom.restore_storage()
            emitted = injected(doms)
            # Every event counted in the end?  (What the exporter lags behind is still to come;
            # a stall's dropped connection loses events: then only the share is of interest.)
            with contextlib.suppress(AssertionError):
                await exp.wait_metrics(lambda m: errors(m) >= emitted, timeout=20 if stalled else 60)
            m_end = await exp.scrape()
        wall = w1 - w0
        result = {
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
            "of which the loop thread": (t1 - t0) / max(1.0, m1 - m0) * 1e6,
            "of which the other threads (libvirt's event thread)": ((c1 - c0) - (t1 - t0))
            / max(1.0, m1 - m0)
            * 1e6,
            "libvirtd µs/event": (l1 - l0) / max(1.0, m1 - m0) * 1e6,
            "exporter RSS at the window's end, MiB": exp_rss / 1024,
            "libvirtd RSS growth over the window, MiB": (lv_rss1 - lv_rss0) / 1024,
            "counted / emitted in the end": errors(m_end) / max(1, emitted),
            "libvirt connection drops": m_end.sum("qemu_exporter_blind_intervals_total", source="libvirt"),
        }
        return result | stalled


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
    ap.add_argument(
        "--policy", choices=("report", "retry"), default="report", help="the action libvirtd sees"
    )
    ap.add_argument("--stall", type=float, default=0.0, help="stop the exporter this long (libvirt mode)")
    ap.add_argument("--keepalive", help="the lab libvirtd's keepalive_interval,keepalive_count")
    ap.add_argument("--cpu-quota", type=float, default=0.0, help="cores the exporter may use")
    args = ap.parse_args()
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.domains]
    modes = args.modes.split(",")
    keepalive = None
    if args.keepalive:
        interval, count = args.keepalive.split(",")
        keepalive = (int(interval), int(count))
    columns: list[tuple[str, dict[str, float]]] = []
    with (
        lab_workdir("qib-lvd-") as ldir,
        running_libvirtd(ldir, private=True, keepalive=keepalive) as libvirtd,
        lab_workdir("qib-lvc-") as workdir,
        contextlib.ExitStack() as stack,
    ):
        sockets = workdir / "sockets"
        sockets.mkdir()
        sockets.chmod(0o777)  # QEMU (libvirt-qemu) creates the second monitors here
        lab = LibvirtLab(libvirtd, workdir, stack)
        emulator = retry_emulator(ldir) if args.policy == "retry" else None
        doms: list[LabDomain] = []
        qmp = {"poll_interval_seconds": 5}
        configs: dict[str, dict[str, Any]] = {
            "libvirt": {"libvirt": {"uri": libvirtd.uri}, "qmp": {"globs": [str(workdir / "none" / "*.qmp")], **qmp}},
            "qmp": {"qmp": {"globs": [str(sockets / "*.qmp")], **qmp}},
        }  # fmt: skip
        for n in counts:
            while len(doms) < n:
                doms.append(add_domain(lab, sockets, emulator)[0])
            for mode in modes:
                result = await measure(mode, configs[mode], workdir, doms, libvirtd, args)
                columns.append((f"{n} domains, {mode}", result))
                print(f"{n} domains, {mode}: {result}", file=sys.stderr, flush=True)
    extra = f", exporter limited to {args.cpu_quota:g} core" if args.cpu_quota else ""
    print(
        f"{args.policy} events, storage failing for {args.seconds:g} s{extra}; "
        f"keepalive {args.keepalive or '5,5 (default)'}; load average {os.getloadavg()[0]:.2f}"
    )
    keys = list(dict.fromkeys(k for _, r in columns for k in r))
    print("| measure | " + " | ".join(title for title, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{r[key]:.3g}" if key in r else "—" for _, r in columns) + " |")


if __name__ == "__main__":
    asyncio.run(main())
