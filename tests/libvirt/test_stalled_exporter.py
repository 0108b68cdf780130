"""A stalled exporter in libvirt mode (issue 26): one hang per disk, and the missed interval shown.

Two domains on a real libvirtd fail their storage continuously, their errors reaching libvirtd
as openEuler QEMU's ``retry`` events (`tests.libvirt.lab.retry_emulator`: Debian's QEMU has no
retry policy), hundreds a second each.  The exporter is then stopped (SIGSTOP) for longer than
libvirtd's keepalive lets a silent client live: libvirtd queues the events for it, then drops
the connection, and the events of the stall are lost to it.  After SIGCONT the exporter
reconnects and the domains are still failing.

Before, the first tick after SIGCONT took the stall for silence: every disk's one continuous
hang was counted as a ``recovered`` hang that never happened and a new one.  Now the stall is a
blind interval (the heartbeat shows it), so each disk keeps one hang, still open, from its first
error; and the stall and the dropped connection are counted and shown.

The lab's libvirtd gives a silent client up after ~6 s (``keepalive_interval = 2``,
``keepalive_count = 2`` in its private libvirtd.conf) instead of the default ~30 s (5 x (5 + 1)),
so that a 10 s stall shows what a 35 s one does with the defaults (docs/libvirt.md has both
measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.libvirt.lab import DiskOptions, Libvirtd, LibvirtLab, lab_workdir, retry_emulator, running_libvirtd
from tests.libvirt.test_libvirt_source import exporter_config, wait_metrics, watched
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics

pytestmark = pytest.mark.libvirt

#: libvirtd's keepalive (interval, count): it drops a client silent for ~2 x (2 + 1) = 6 s.
KEEPALIVE = (2, 2)
#: How long the exporter stays stopped: beyond the keepalive, so that the connection drops.
STALL_SECONDS = 10.0
DEVICE = "ua-boot"


@pytest.fixture(scope="module")
def quick_libvirtd() -> Iterator[Libvirtd]:
    """A private libvirtd of this module's own, with the short keepalive."""
    with (
        lab_workdir("qih-lvka-") as workdir,
        running_libvirtd(workdir, private=True, keepalive=KEEPALIVE) as d,
    ):
        yield d


def _errors(m: Metrics, vm: str) -> float:
    return m.sum("qemu_block_io_error_events_total", vm=vm, device=DEVICE, action="retry")


async def test_a_stalled_exporter_keeps_one_hang_per_disk_and_shows_what_it_missed(
    quick_libvirtd: Libvirtd, short_tmp: Path
) -> None:
    uri = quick_libvirtd.uri
    with lab_workdir("qih-lvst-") as workdir, contextlib.ExitStack() as stack:
        lab = LibvirtLab(quick_libvirtd, workdir, stack)
        emulator = retry_emulator(quick_libvirtd.workdir)
        doms = [
            lab.domain(DiskOptions(error_policy="report"), hint="stall", emulator=emulator, pause_us=0)
            for _ in range(2)
        ]
        names = [d.name for d in doms]
        async with ExporterProcess(short_tmp, exporter_config(short_tmp, uri)) as exp:
            await wait_metrics(exp, lambda m: all(watched(m, d) for d in doms), "the domains watched")
            for dom in doms:
                dom.fail_storage()
            m = await wait_metrics(
                exp,
                lambda m: all(
                    m.sum("qemu_block_io_hang", vm=n, device=DEVICE) == 1 and _errors(m, n) >= 100
                    for n in names
                ),
                "both disks hanging, retry events flowing",
            )
            starts = {
                n: m.value("qemu_block_io_hang_start_timestamp_seconds", vm=n, device=DEVICE) for n in names
            }
            assert exp.proc is not None
            os.kill(exp.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(STALL_SECONDS)  # the stimulus: how long it stays stopped
            finally:
                os.kill(exp.proc.pid, signal.SIGCONT)
            before = {n: _errors(m, n) for n in names}

            def reconnected_and_fed_again(m: Metrics) -> bool:
                return (
                    m.sum("qemu_exporter_blind_intervals_total", source="libvirt") == 1
                    and m.sum("qemu_libvirt_up", uri=uri) == 1
                    and all(_errors(m, n) > before[n] + 200 for n in names)
                )

            m = await wait_metrics(
                exp, reconnected_and_fed_again, "libvirtd dropped the connection; reconnected", timeout=30
            )
            for n in names:
                assert m.sum("qemu_block_io_hang", vm=n, device=DEVICE) == 1, n
                assert m.value("qemu_block_io_hang_start_timestamp_seconds", vm=n, device=DEVICE) == starts[n]
                assert m.sum("qemu_block_io_hangs_total", vm=n, device=DEVICE) == 0, n  # nothing "recovered"
                assert (m.value("qemu_exporter_vm_blind_intervals_total", vm=n) or 0) >= 1, n
            loop = m.sum("qemu_exporter_blind_seconds_total", source="event_loop")
            assert m.sum("qemu_exporter_blind_intervals_total", source="event_loop") == 1
            assert STALL_SECONDS - 1 <= loop <= STALL_SECONDS + 3, loop
            async with aiohttp.ClientSession() as s, s.get(exp.url + "/api/v1/status") as r:
                status = await r.json()
            assert {b["source"] for b in status["blind"]["recent"]} == {"event_loop", "libvirt"}
            assert status["summary"]["disks_hanging"] == 2

            for dom in doms:
                dom.restore_storage()
            m = await wait_metrics(
                exp,
                lambda m: all(
                    m.sum("qemu_block_io_hangs_total", vm=n, device=DEVICE, outcome="recovered") == 1
                    for n in names
                ),
                "each disk's one hang recovered",
            )
            for n in names:
                assert m.sum("qemu_block_io_hangs_total", vm=n, device=DEVICE) == 1, n
            print(
                f"stall {STALL_SECONDS:g} s: event loop blind {loop:.1f} s, libvirt connection blind "
                f"{m.sum('qemu_exporter_blind_seconds_total', source='libvirt'):.1f} s; "
                f"events counted {[int(_errors(m, n)) for n in names]}"
            )
