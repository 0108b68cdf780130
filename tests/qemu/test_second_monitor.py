"""The libvirt situation: libvirt holds ``-qmp``; the exporter must use its own monitor.

Pointed at the held socket the exporter cannot get a session (a QMP server serves one client)
and says so (`qemu_qmp_up` 0, connect errors with reason ``timeout``), without disturbing the
holder; on the extra ``-mon`` socket it watches the same VM normally.  When the holder lets go,
the exporter gets the session on its own.
"""

from __future__ import annotations

import pytest

from tests.qemu.lab import Lab, plain_qmp
from tests.support.qemu import blank_image

pytestmark = pytest.mark.qemu

VM = "libvirtvm"


async def test_exporter_on_held_socket_and_on_second_monitor(lab: Lab) -> None:
    image = blank_image(lab.workdir / "d.img")
    vm = lab.vm(
        [
            "-blockdev",
            f"driver=file,filename={image},node-name=n0",
            "-device",
            "virtio-blk-pci,drive=n0,id=disk0",
        ],
        name=VM,
        debugcon=False,
    )
    assert vm.mon2 is not None
    async with plain_qmp(vm.qmp, "libvirt") as libvirt:
        held = await lab.exporter(vm.qmp, connect_timeout_seconds=1.0, backoff_max_seconds=1.0)
        own = await lab.exporter(vm.mon2)
        await own.wait_metrics(
            lambda m: (
                m.value("qemu_qmp_up", vm=VM) == 1 and bool(m.find("qemu_block_device_info", device="disk0"))
            ),
            timeout=15,
            what="exporter on the second monitor",
        )
        m = await held.wait_metrics(
            lambda m: (
                (m.value("qemu_exporter_qmp_connect_errors_total", vm="vm", reason="timeout") or 0) >= 1
            ),
            timeout=15,
            what="connect timeouts on the held socket",
        )
        # No session: the VM is known only by its socket stem, and shown down.
        assert m.value("qemu_qmp_up", vm="vm") == 0
        assert not m.find("qemu_block_device_info")
        # The holder is undisturbed.
        assert (await libvirt.execute("query-status"))["status"] == "running"  # type: ignore[index]

    # libvirt let go (think: libvirtd restarted): the exporter gets the session.
    m = await held.wait_metrics(
        lambda m: m.value("qemu_qmp_up", vm=VM) == 1, timeout=15, what="session once the holder left"
    )
    assert m.label_values("qemu_block_device_info", "device", vm=VM) == {"disk0"}
