"""A stalled exporter on QMP sockets (issue 26): one hang per disk, every event, the stall shown.

Simulated openEuler QEMUs (the retry policy exists in no installable QEMU) keep failing every
disk while the exporter is stopped (SIGSTOP) for longer than ``health.max_loop_lag_seconds``.
QEMU keeps the events for its stopped client, so after SIGCONT the exporter reads them late:
every one is counted, each disk's continuous hang stays one hang from its first error, and the
stall is counted and listed as a blind interval of the event loop.  (The libvirt path, where
libvirtd drops the connection meanwhile: tests/libvirt/test_stalled_exporter.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from qmpsim import DiskSpec, SimVM
from tests.support.config import FAST, exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics

STALL_SECONDS = 8.0  # beyond health.max_loop_lag_seconds (5 s): counted as blind
DISKS = ("virtio-disk0", "virtio-disk1")


def _disk(id: str) -> DiskSpec:
    return DiskSpec(
        id=id, werror="retry", rerror="retry", retry_interval_ms=100, retry_timeout_ms=0, in_flight=0
    )


async def test_a_stalled_exporter_counts_every_event_and_keeps_one_hang_per_disk(short_tmp: Path) -> None:
    vms = [
        SimVM(str(short_tmp / f"st{i}.qmp"), name=f"st{i}", disks=[_disk(d) for d in DISKS]) for i in range(3)
    ]
    for vm in vms:
        await vm.start()
    cfg = exporter_config(globs=[short_tmp / "*.qmp"], intervals=FAST)
    cfg["hang"] = {"recovery_margin_seconds": 1.0}
    try:
        async with ExporterProcess(short_tmp, cfg) as exp:
            await exp.wait_metrics(lambda m: len(m.find("qemu_block_io_hang")) == 6, what="6 disks")
            for vm in vms:
                for d in DISKS:
                    vm.link_down(d, in_flight=2, operations=("write",))
            m = await exp.wait_metrics(lambda m: m.sum("qemu_block_io_hang") == 6, what="6 disks hanging")
            starts = {
                (s.labels["vm"], s.labels["device"]): s.value
                for s in m.find("qemu_block_io_hang_start_timestamp_seconds")
            }
            assert exp.proc is not None
            os.kill(exp.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(STALL_SECONDS)  # the stimulus: how long it stays stopped
            finally:
                os.kill(exp.proc.pid, signal.SIGCONT)
            await exp.wait_metrics(
                lambda m: m.sum("qemu_exporter_blind_intervals_total", source="event_loop") == 1,
                what="the stall counted",
            )
            for vm in vms:
                for d in DISKS:
                    vm.link_up(d)
            sent = {vm.name: vm.event_count("BLOCK_IO_ERROR", socket=vm.socket_path) for vm in vms}

            def settled(m: Metrics) -> bool:
                return all(m.sum("qemu_block_io_error_events_total", vm=n) == sent[n] for n in sent)

            m = await exp.wait_metrics(settled, timeout=20, what="every event QEMU queued counted")
            blind = m.sum("qemu_exporter_blind_seconds_total", source="event_loop")
            assert STALL_SECONDS - 1 <= blind <= STALL_SECONDS + 2, blind
            assert m.sum("qemu_exporter_blind_intervals_total", source="qmp") == 0  # no session dropped
            m = await exp.wait_metrics(
                lambda m: m.sum("qemu_block_io_hangs_total", outcome="recovered") == 6,
                timeout=10,
                what="each disk's one hang recovered",
            )
            assert m.sum("qemu_block_io_hangs_total") == 6
            recent = (await exp.status())["recent_hangs"]
            assert {(r["vm"], r["device"]): r["start"] for r in recent} == starts  # one each, from its start
            assert all(r["duration_seconds"] >= STALL_SECONDS for r in recent)
            print(f"stall {STALL_SECONDS:g} s: {sum(sent.values())} events, all counted; blind {blind:.1f} s")
    finally:
        for vm in vms:
            await vm.kill()
