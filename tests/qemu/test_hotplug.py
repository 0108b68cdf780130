"""Disks hot-plugged into (and unplugged from) a running QEMU (scsi-hd on virtio-scsi: SCSI
hot-plug and unplug complete at once, no guest cooperation needed)."""

from __future__ import annotations

import pytest

from tests.qemu.lab import Lab, io_error_counts, plain_qmp
from tests.support.qemu import blank_image

pytestmark = pytest.mark.qemu

VM = "hpvm"
DEVICE = "hp0"


async def test_hotplugged_disk_is_found_and_unplugged_disk_dropped(lab: Lab) -> None:
    image = blank_image(lab.workdir / "hp.img")
    vm = lab.vm(["-device", "virtio-scsi-pci,id=scsi0"], name=VM, debugcon=False)
    assert vm.mon2 is not None
    async with plain_qmp(vm.mon2, "mgmt") as mgmt:
        # QEMU 7.2 sends no event for device_add: the periodic refresh finds the disk.
        exp = await lab.exporter(vm.qmp, refresh_interval_seconds=1.0)
        await exp.wait_metrics(lambda m: m.value("qemu_qmp_up", vm=VM) == 1, timeout=15, what="session")
        await mgmt.execute("blockdev-add", {"driver": "file", "filename": str(image), "node-name": "n-hp"})
        await mgmt.execute(
            "device_add",
            {"driver": "scsi-hd", "bus": "scsi0.0", "drive": "n-hp", "id": DEVICE, "werror": "stop"},
        )
        m = await exp.wait_metrics(
            lambda m: bool(m.find("qemu_block_device_info", vm=VM, device=DEVICE)),
            timeout=10,
            what="the hot-plugged disk",
        )
        (info,) = m.find("qemu_block_device_info", vm=VM, device=DEVICE)
        assert (info.labels["werror"], info.labels["rerror"], info.labels["node_name"]) == (
            "stop",
            "auto",
            "n-hp",
        )
        rules = {
            s.labels["rule"] for s in m.find("qemu_block_retry_policy_violation", device=DEVICE) if s.value
        }
        assert rules == {"retry_unsupported", "werror_not_retry", "policy_not_visible"}

        await mgmt.execute("device_del", {"id": DEVICE})  # DEVICE_DELETED: re-read at once
        m = await exp.wait_metrics(
            lambda m: not m.find("qemu_block_device_info", vm=VM, device=DEVICE),
            timeout=10,
            what="the unplugged disk to go",
        )
        assert not [s for s in m.samples if s.labels.get("device") == DEVICE]


async def test_error_on_a_disk_plugged_since_the_last_refresh_is_not_lost(lab: Lab) -> None:
    """Prelaunch (``-S``) VM: a failing scsi-hd is added, then ``cont``: SeaBIOS reads it at once
    and the VM stops on the error, long before the exporter's periodic disk refresh.  The event
    must still count for the disk once the refresh it triggers has found it (regression test:
    such events used to be dropped as unmatched, so the paused VM's disk never showed a hang)."""
    storage = lab.storage()
    vm = lab.vm(["-S", "-device", "virtio-scsi-pci,id=scsi0"], name=VM)
    assert vm.mon2 is not None
    async with plain_qmp(vm.mon2, "mgmt") as mgmt:
        exp = await lab.exporter(vm.qmp, refresh_interval_seconds=60.0)
        await exp.wait_metrics(lambda m: m.value("qemu_qmp_up", vm=VM) == 1, timeout=15, what="session")
        nbd = {"type": "unix", "path": str(storage.socket)}
        await mgmt.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "server": nbd})
        await mgmt.execute(
            "device_add",
            {"driver": "scsi-hd", "bus": "scsi0.0", "drive": "nbd0", "id": DEVICE}
            | {"werror": "stop", "rerror": "stop", "bootindex": 0},
        )
        storage.fail()
        await mgmt.execute("cont")
        await exp.wait_metrics(
            lambda m: (
                bool(m.find("qemu_block_device_info", vm=VM, device=DEVICE))
                and m.value("qemu_vm_status", vm=VM, status="io-error") == 1
            ),
            timeout=15,
            what="the disk found (refresh after the unmatched event), VM paused on its error",
        )
        assert (await mgmt.execute("query-status"))["status"] == "io-error"  # type: ignore[index]
        # The one BLOCK_IO_ERROR (read, stop) QEMU sent must count for the disk, and the paused
        # VM's disk must be shown hanging.
        await exp.wait_metrics(
            lambda m: (
                io_error_counts(m, VM, DEVICE) == {("read", "stop"): 1}
                and m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 1
            ),
            timeout=5,
            what="the error attributed to the hot-plugged disk",
        )
