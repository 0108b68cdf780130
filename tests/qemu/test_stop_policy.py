"""``werror=stop,rerror=stop`` on a real QEMU: the VM pauses in ``io-error`` when the storage
fails, and runs again when the management layer sends ``cont`` after the storage came back.

The test plays the management layer with a plain QMP client (the exporter's client is
read-only and could never send ``cont``).  It runs in two layouts:

* ``exporter-on-qmp``: the exporter watches ``-qmp``; management uses the second monitor.
* ``libvirt``: management holds ``-qmp`` the way libvirt does, and the exporter watches the
  extra ``-mon`` socket that ``<qemu:commandline>`` adds (docs/libvirt.md).

While paused on the error the disk is shown hanging; after ``cont`` the hang ends
``recovered`` with the duration of the outage.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from qemu.qmp import QMPClient

from tests.qemu.lab import Lab, io_error_counts, nbd_disk_args, plain_qmp, wait_guest, watching_disk
from tests.support.config import REAL_QEMU, exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics
from tests.support.waits import wait_for

pytestmark = pytest.mark.qemu

VM = "stopvm"
DEVICE = "virtio-disk0"
OUTAGE = 1.5  # seconds the storage stays down once the VM is paused


async def _recovered(exp: ExporterProcess, timeout: float, what: str) -> Metrics:
    """Wait until the disk's one hang ended ``recovered`` and it hangs no more."""
    return await exp.wait_metrics(
        lambda m: (
            m.value("qemu_block_io_hangs_total", vm=VM, device=DEVICE, outcome="recovered") == 1
            and m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 0
        ),
        timeout=timeout,
        what=what,
    )


def _stop_events(m: Metrics) -> int:
    return sum(n for (_op, action), n in io_error_counts(m, VM, DEVICE).items() if action == "stop")


@pytest.mark.parametrize("layout", ["exporter-on-qmp", "libvirt"])
async def test_stop_policy_pauses_and_cont_resumes(lab: Lab, layout: str) -> None:
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, DEVICE, "werror=stop,rerror=stop"), name=VM)
    assert vm.mon2 is not None
    mgmt_sock, watched = (vm.mon2, vm.qmp) if layout == "exporter-on-qmp" else (vm.qmp, vm.mon2)

    async with plain_qmp(mgmt_sock, "mgmt") as mgmt:
        if layout == "libvirt":
            # A QMP server accepts one client: with "libvirt" connected, a second client on the
            # same socket never even gets the greeting.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(QMPClient("intruder").connect(str(vm.qmp)), 1.0)
        exp = await lab.exporter(watched)
        m = await watching_disk(exp, VM, DEVICE)
        (info,) = m.find("qemu_vm_info", vm=VM)
        assert info.labels["socket"] == str(watched)
        (dev,) = m.find("qemu_block_device_info", vm=VM, device=DEVICE)
        assert (dev.labels["werror"], dev.labels["rerror"], dev.labels["node_name"]) == (
            "stop",
            "stop",
            "nbd0",
        )
        await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")

        mgmt.events.clear()
        t_fail = time.time()
        storage.fail()
        m = await exp.wait_metrics(
            lambda m: m.value("qemu_vm_status", vm=VM, status="io-error") == 1 and _stop_events(m) >= 1,
            timeout=15,
            what="VM paused on the IO error",
        )
        # The paused VM's disk is shown hanging; the outage lasts until its age passes OUTAGE.
        m = await exp.wait_metrics(
            lambda m: (
                m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 1
                and (m.value("qemu_block_io_hang_duration_seconds", vm=VM, device=DEVICE) or 0) >= OUTAGE
            ),
            timeout=15,
            what="the hang shown during the outage",
        )
        start = m.value("qemu_block_io_hang_start_timestamp_seconds", vm=VM, device=DEVICE)
        assert start is not None and t_fail - 0.1 <= start <= t_fail + 1.0, (start, t_fail)
        assert not m.find("qemu_block_io_hang_deadline_timestamp_seconds", vm=VM, device=DEVICE)
        assert m.value("qemu_vm_status", vm=VM, status="running") in (None, 0)
        assert (await mgmt.execute("query-status"))["status"] == "io-error"  # type: ignore[index]
        # One request in flight, one stop: exactly one event until the VM runs again.
        assert _stop_events(m) == 1, io_error_counts(m, VM, DEVICE)
        assert all(action == "stop" for _op, action in io_error_counts(m, VM, DEVICE))
        stalled_at = len(vm.debug_output())

        storage.recover()
        t_cont = time.time()
        await mgmt.execute("cont")
        m = await exp.wait_metrics(
            lambda m: m.value("qemu_vm_status", vm=VM, status="running") == 1,
            timeout=15,
            what="VM running again after cont",
        )
        assert m.value("qemu_vm_status", vm=VM, status="io-error") in (None, 0)
        # The guest's held request was retried and IO goes on.
        await wait_guest(vm, lambda _s: "WRWR" in vm.debug_output()[stalled_at:], what="guest IO after cont")
        m = await _recovered(exp, 10, "the hang to end recovered")
        assert _stop_events(m) == 1, io_error_counts(m, VM, DEVICE)
        assert m.value("qemu_qmp_up", vm=VM) == 1
        assert m.value("qemu_block_io_hangs_total", vm=VM, device=DEVICE, outcome="timed_out") == 0
        # vm_gone is shown once it happened (docs/metrics.md, IO hangs)
        assert m.value("qemu_block_io_hangs_total", vm=VM, device=DEVICE, outcome="vm_gone") is None
        assert m.value("qemu_block_io_failing", vm=VM, device=DEVICE) == 0

        # QEMU's own timestamps of the outage, as the management layer saw them.
        await mgmt.execute("query-status")  # every earlier event is in the listener now
        stamps = {}
        for event in mgmt.events.clear():
            ts = event["timestamp"]
            stamps.setdefault(event["event"], ts["seconds"] + ts["microseconds"] / 1e6)
        qemu_outage = stamps["RESUME"] - stamps["BLOCK_IO_ERROR"]
        outage = t_cont - t_fail

        duration = m.value("qemu_block_io_hang_seconds_total", vm=VM, device=DEVICE)
        completed = m.value("qemu_block_io_hang_completed_duration_seconds_sum", outcome="recovered")
        assert m.value("qemu_block_io_hang_completed_duration_seconds_count", outcome="recovered") == 1
        for d in (duration, completed):
            assert d is not None and abs(d - outage) <= 1.0, (d, outage)
            assert abs(d - qemu_outage) <= 0.05, (d, qemu_outage)  # from QEMU's event stamps


async def test_cont_before_the_storage_is_back_keeps_one_hang(lab: Lab) -> None:
    """``cont`` while the storage is still down: QEMU retries, fails and stops again.  That is
    the same outage: one hang, from the first error to the ``cont`` that worked."""
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, DEVICE, "werror=stop,rerror=stop"), name=VM)
    assert vm.mon2 is not None
    async with plain_qmp(vm.mon2, "mgmt") as mgmt:
        exp = await lab.exporter(vm.qmp)
        await watching_disk(exp, VM, DEVICE)
        await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")
        mgmt.events.clear()
        storage.fail()
        for stops in (1, 2, 3):
            m = await exp.wait_metrics(
                lambda m, n=stops: (
                    _stop_events(m) == n and m.value("qemu_vm_status", vm=VM, status="io-error") == 1
                ),
                timeout=15,
                what=f"stop #{stops}",
            )
            assert m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 1
            assert m.value("qemu_block_io_hangs_total", vm=VM, device=DEVICE, outcome="recovered") == 0
            if stops < 3:
                await mgmt.execute("cont")  # too early: the retried request fails again
        storage.recover()
        await mgmt.execute("cont")
        m = await exp.wait_metrics(
            lambda m: (
                m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 0
                and m.value("qemu_vm_status", vm=VM, status="running") == 1
            ),
            timeout=10,
            what="the hang to end",
        )
        await mgmt.execute("query-status")  # every earlier event is in the listener now
        events = mgmt.events.clear()

    assert m.value("qemu_block_io_hangs_total", vm=VM, device=DEVICE, outcome="recovered") == 1
    assert _stop_events(m) == 3
    stamps = [(e["event"], e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6) for e in events]
    first_error = next(t for name, t in stamps if name == "BLOCK_IO_ERROR")
    last_resume = [t for name, t in stamps if name == "RESUME"][-1]
    duration = m.value("qemu_block_io_hang_seconds_total", vm=VM, device=DEVICE)
    assert duration is not None and abs(duration - (last_resume - first_error)) <= 0.05, (duration, stamps)


async def test_vm_already_paused_on_io_error_when_the_exporter_starts(lab: Lab) -> None:
    """A VM stuck before the exporter ran (host reboot, exporter upgrade, no state file) is
    shown hanging from the moment it is first seen, and that hang ends like any other."""
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, DEVICE, "werror=stop,rerror=stop"), name=VM)
    assert vm.mon2 is not None
    async with plain_qmp(vm.mon2, "mgmt") as mgmt:
        await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")
        storage.fail()

        async def paused() -> bool:
            return (await mgmt.execute("query-status"))["status"] == "io-error"  # type: ignore[index,no-any-return]

        await wait_for(paused, 15, "the VM paused on the IO error")
        t_seen = time.time()
        exp = await lab.exporter(vm.qmp)
        m = await exp.wait_metrics(
            lambda m: m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 1,
            timeout=15,
            what="the stuck VM's hang shown",
        )
        assert m.value("qemu_vm_status", vm=VM, status="io-error") == 1
        start = m.value("qemu_block_io_hang_start_timestamp_seconds", vm=VM, device=DEVICE)
        assert start is not None and t_seen <= start <= time.time(), (start, t_seen)
        assert _stop_events(m) == 0  # the error happened before the exporter: no event seen

        storage.recover()
        await mgmt.execute("cont")
        m = await _recovered(exp, 15, "the hang to end recovered after cont")
        assert m.value("qemu_vm_status", vm=VM, status="running") == 1


async def test_exporter_restarted_mid_hang_keeps_one_hang(lab: Lab) -> None:
    """The exporter restarted (state file kept) in the middle of a real hang: one hang, its
    original start, its full length."""
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, DEVICE, "werror=stop,rerror=stop"), name=VM)
    assert vm.mon2 is not None
    config = {
        **exporter_config(vm.qmp, intervals=REAL_QEMU),
        "hang": {"state_file": str(lab.workdir / "hangs.json")},
    }

    async def exporter(n: int) -> ExporterProcess:
        d = lab.workdir / f"restart{n}"
        d.mkdir()
        exp = ExporterProcess(d, config)
        lab.exporters.append(exp)
        await exp.start()
        return exp

    async with plain_qmp(vm.mon2, "mgmt") as mgmt:
        first = await exporter(1)
        await watching_disk(first, VM, DEVICE)
        await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")
        mgmt.events.clear()
        storage.fail()
        m = await first.wait_metrics(
            lambda m: m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 1, timeout=15, what="the hang"
        )
        start = m.value("qemu_block_io_hang_start_timestamp_seconds", vm=VM, device=DEVICE)
        assert first.stop(signal.SIGTERM) == 0

        second = await exporter(2)
        m = await second.wait_metrics(
            lambda m: m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 1,
            timeout=15,
            what="the hang again",
        )
        assert m.value("qemu_block_io_hang_start_timestamp_seconds", vm=VM, device=DEVICE) == start
        storage.recover()
        await mgmt.execute("cont")
        m = await _recovered(second, 15, "one hang, recovered")
        await mgmt.execute("query-status")  # every earlier event is in the listener now
        stamps: dict[str, float] = {}
        for event in mgmt.events.clear():
            ts = event["timestamp"]
            stamps.setdefault(event["event"], ts["seconds"] + ts["microseconds"] / 1e6)
    assert m.value("qemu_block_io_hangs_total", vm=VM, device=DEVICE, outcome="timed_out") == 0
    assert m.value("qemu_block_io_hangs_total", vm=VM, device=DEVICE, outcome="vm_gone") is None
    duration = m.value("qemu_block_io_hang_seconds_total", vm=VM, device=DEVICE)
    assert start is not None and abs(start - stamps["BLOCK_IO_ERROR"]) <= 0.001
    assert duration is not None and abs(duration - (stamps["RESUME"] - stamps["BLOCK_IO_ERROR"])) <= 0.05
