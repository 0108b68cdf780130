"""A VM that goes away in the middle of an IO hang (stop policy, storage down).

* ``quit`` (clean exit: QEMU sends SHUTDOWN and removes its sockets), the exporter discovering
  sockets by glob: the hang ends ``vm_gone`` and every series of the VM disappears with its socket.
* SIGKILL (no event; the socket file stays, nothing listens), explicitly configured socket: the
  hang ends ``vm_gone`` as soon as connecting is refused, and only ``qemu_qmp_up 0`` is left.
"""

from __future__ import annotations

import pytest

from tests.qemu.lab import Lab, nbd_disk_args, plain_qmp, wait_guest, watching_disk
from tests.support.exporter import ExporterProcess
from tests.support.qemu import FailingStorage, QemuVM
from tests.support.scrape import Metrics

pytestmark = pytest.mark.qemu

VM = "gonevm"
DEVICE = "virtio-disk0"
PER_VM = ("qemu_vm_info", "qemu_vm_status", "qemu_block_device_info", "qemu_block_io_hang")


def _vm_gone_hangs(m: Metrics) -> float:
    return m.value("qemu_block_io_hang_completed_duration_seconds_count", outcome="vm_gone") or 0


async def _hang(storage: FailingStorage, exp: ExporterProcess, vm: QemuVM) -> None:
    """Guest doing IO, then the storage fails: the VM pauses and the disk hangs."""
    await watching_disk(exp, VM, DEVICE)
    await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")
    storage.fail()
    await exp.wait_metrics(
        lambda m: (
            m.value("qemu_block_io_hang", vm=VM, device=DEVICE) == 1
            and m.value("qemu_vm_status", vm=VM, status="io-error") == 1
        ),
        timeout=15,
        what="disk hanging, VM paused",
    )


async def test_quit_during_hang_glob_discovery(lab: Lab) -> None:
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, DEVICE, "werror=stop,rerror=stop"), name=VM)
    assert vm.mon2 is not None
    exp = await lab.exporter(globs=[str(lab.workdir / "*.qmp")])  # matches vm.qmp only
    async with plain_qmp(vm.mon2) as mgmt:
        await _hang(storage, exp, vm)
        await mgmt.execute("quit")
    m = await exp.wait_metrics(
        lambda m: not m.find("qemu_qmp_up") and _vm_gone_hangs(m) == 1,
        timeout=15,
        what="the VM's series gone, its hang counted vm_gone",
    )
    assert not vm.qmp.exists()
    assert m.value("qemu_exporter_vms") == 0
    for name in PER_VM:
        assert not m.find(name), name
    for outcome in ("recovered", "timed_out"):
        assert m.value("qemu_block_io_hang_completed_duration_seconds_count", outcome=outcome) == 0


async def test_killed_during_hang_explicit_socket(lab: Lab) -> None:
    storage = lab.storage()
    vm = lab.vm(nbd_disk_args(storage, DEVICE, "werror=stop,rerror=stop"), name=VM)
    exp = await lab.exporter(vm.qmp)
    await _hang(storage, exp, vm)
    vm.proc.kill()
    vm.proc.wait()
    m = await exp.wait_metrics(
        lambda m: m.value("qemu_qmp_up", vm=VM) == 0 and _vm_gone_hangs(m) == 1,
        timeout=15,
        what="QMP down, the hang counted vm_gone",
    )
    assert vm.qmp.exists()  # a killed QEMU leaves its socket file behind
    assert (m.value("qemu_exporter_qmp_connect_errors_total", vm=VM, reason="refused") or 0) >= 1
    for name in PER_VM:
        assert not m.find(name), name
