"""``qemu_block_io_error_events_total`` counts exactly the BLOCK_IO_ERROR events QEMU sends.

A guest loops writes and reads on its boot disk (virtio-blk or scsi-hd,
``werror=report,rerror=report``)
served by nbdkit.  The storage fails for a while, then comes back.  An independent plain QMP
client on a second monitor counts the events QEMU emitted; once the guest does IO successfully
again no more events can come, and the exporter's counters must equal that count exactly, per
operation and action.  With ``report`` the errors reach the guest: the disk is shown failing
(``qemu_block_io_failing``) during the outage, never hanging.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.qemu.lab import (
    Lab,
    ends_recovered,
    io_error_counts,
    nbd_disk_args,
    plain_qmp,
    wait_guest,
    watching_disk,
)
from tests.support.waits import wait_for

pytestmark = pytest.mark.qemu

VM = "countvm"


@pytest.mark.parametrize(("kind", "device"), [("virtio-blk", "virtio-disk0"), ("scsi-hd", "scsi0-0-0-0")])
async def test_error_events_counted_exactly(lab: Lab, kind: str, device: str) -> None:
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, device, "werror=report,rerror=report", kind), name=VM)
    assert vm.mon2 is not None
    exp = await lab.exporter(vm.qmp)
    await watching_disk(exp, VM, device)
    await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")

    async with plain_qmp(vm.mon2, "observer") as observer:
        observer.events.clear()
        storage.fail()
        await wait_guest(vm, lambda s: s.count("w") >= 20 and s.count("r") >= 20, what="guest IO failing")
        # report policy: the errors reach the guest, so the disk is failing, not hanging.
        m = await exp.wait_metrics(
            lambda m: m.value("qemu_block_io_failing", vm=VM, device=device) == 1,
            timeout=10,
            what="disk shown failing",
        )
        assert m.value("qemu_block_io_hang", vm=VM, device=device) == 0
        storage.recover()
        await wait_guest(vm, ends_recovered, what="guest IO recovered")

        # A command round trip: every event QEMU sent before the reply is in the listener now.
        await observer.execute("query-status")
        sent: Counter[tuple[str, str]] = Counter()
        for event in observer.events.clear():
            if event["event"] == "BLOCK_IO_ERROR":
                data = event["data"]
                assert data["node-name"] == "nbd0" and data["device"] == "", data
                sent[(data["operation"], data["action"])] += 1

    assert set(sent) == {("write", "report"), ("read", "report")}, sent
    assert min(sent.values()) >= 20, sent

    async def settled() -> bool:
        got = io_error_counts(await exp.scrape(), VM, device)
        assert got == sent, f"exporter {dict(got)} != QEMU {dict(sent)}"
        return True

    await wait_for(settled, timeout=10, what="exporter counts to settle")
    m = await exp.scrape()
    assert io_error_counts(m, VM, device) == sent  # and they stay there
    assert m.value("qemu_exporter_io_error_events_unmatched_total", vm=VM) in (None, 0)
    assert m.value("qemu_vm_status", vm=VM, status="running") == 1
    # query-blockstats saw the failures too (polled, so wait for the next poll).
    await exp.wait_metrics(
        lambda m: (
            (m.value("qemu_block_failed_write_operations_total", vm=VM, device=device) or 0) > 0
            and (m.value("qemu_block_failed_read_operations_total", vm=VM, device=device) or 0) > 0
        ),
        timeout=10,
        what="failed operations in blockstats",
    )
    m = await exp.wait_metrics(
        lambda m: m.value("qemu_block_io_failing", vm=VM, device=device) == 0,
        timeout=10,
        what="disk no longer failing once IO succeeds",
    )
    assert m.value("qemu_block_io_hang", vm=VM, device=device) == 0
    assert m.sum("qemu_block_io_hangs_total", vm=VM, device=device) == 0
