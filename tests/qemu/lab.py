"""Helpers for end-to-end tests on a real QEMU: nbdkit storage that fails on demand, QEMU
guests doing continuous IO, the exporter as a subprocess, and plain QMP clients standing in for
the management layer (libvirt).

Every process is started through `Lab` (the ``lab`` fixture in conftest.py) and stopped at teardown, also when the test
fails.  Waiting always polls a condition against a deadline (`tests.support.waits`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from tests.guest.bootsector import guest_status, write_disk_image
from tests.support.config import REAL_QEMU, exporter_config
from tests.support.exporter import ExporterProcess
from tests.support.qemu import FailingStorage, QemuVM, run_failing_storage, run_vm
from tests.support.scrape import Metrics
from tests.support.waits import wait_for


class Lab:
    """Starts processes for one test and owns their cleanup."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir = workdir
        self._stack = stack
        self.exporters: list[ExporterProcess] = []

    def storage(self, name: str = "nbd", pause_us: int = 20_000) -> FailingStorage:
        """A boot disk image with the IO-loop guest, served by nbdkit with the error filter."""
        image = write_disk_image(self.workdir / f"{name}.img", pause_us=pause_us)
        return self._stack.enter_context(run_failing_storage(self.workdir, image, name))

    def vm(self, args: Sequence[str], *, subdir: str | None = None, **kwargs: Any) -> QemuVM:
        """A QEMU in the lab's directory, or in ``subdir`` of it (several VMs: each has its own
        ``vm.qmp``, second monitor and debug console)."""
        workdir = self.workdir
        if subdir is not None:
            workdir = workdir / subdir
            workdir.mkdir()
        return self._stack.enter_context(run_vm(workdir, args, **kwargs))

    async def exporter(self, *sockets: Path, **qmp: Any) -> ExporterProcess:
        """The exporter watching ``sockets`` (and/or ``globs=[...]``), with short intervals."""
        d = self.workdir / f"exporter{len(self.exporters)}"
        d.mkdir()
        exp = ExporterProcess(d, exporter_config(*sockets, intervals=REAL_QEMU, **qmp))
        self.exporters.append(exp)  # registered before start: a failed start is cleaned up too
        await exp.start()
        return exp


@contextlib.asynccontextmanager
async def plain_qmp(socket_path: Path, name: str = "mgmt") -> AsyncIterator[QMPClient]:
    """A plain (not read-only) QMP client: the management layer, or an independent observer."""
    client = QMPClient(name)
    await client.connect(str(socket_path))
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def wait_guest(vm: QemuVM, check: Any, timeout: float = 20.0, what: str = "guest output") -> str:
    """Poll the guest's status characters until ``check(status)`` holds."""

    async def probe() -> str | None:
        status = guest_status(vm.debug_output())
        return status if check(status) else None

    return await wait_for(probe, timeout, what)


async def watching_disk(exp: ExporterProcess, vm: str, device: str) -> Metrics:
    """Wait until the exporter's session with ``vm`` is up and it lists ``device``."""
    return await exp.wait_metrics(
        lambda m: (
            m.value("qemu_qmp_up", vm=vm) == 1 and bool(m.find("qemu_block_device_info", device=device))
        ),
        timeout=15,
        what="exporter watching the disk",
    )


def io_error_counts(m: Metrics, vm: str, device: str) -> Counter[tuple[str, str]]:
    """``qemu_block_io_error_events_total`` of one disk by (operation, action), zeros dropped."""
    counts: Counter[tuple[str, str]] = Counter()
    for s in m.find("qemu_block_io_error_events_total", vm=vm, device=device):
        if s.value:
            counts[(s.labels["operation"], s.labels["action"])] += int(s.value)
    return counts


def nbd_disk_args(
    storage: FailingStorage, device_id: str, policy: str, kind: str = "virtio-blk"
) -> list[str]:
    """The nbd-backed boot disk (node ``nbd0``, ``-blockdev``) on ``kind`` (virtio-blk or
    scsi-hd) with ``policy`` given on the device (e.g. ``werror=stop,rerror=stop``)."""
    args = ["-blockdev", storage.blockdev_arg("nbd0")]
    if kind == "virtio-blk":
        return [*args, "-device", f"virtio-blk-pci,drive=nbd0,id={device_id},{policy},bootindex=0"]
    return [
        *args,
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-device",
        f"scsi-hd,bus=scsi0.0,drive=nbd0,id={device_id},{policy},bootindex=0",
    ]


def ends_recovered(status: str, tail: str = "WRWR") -> bool:
    """The guest failed at some point and has since done ``tail`` successfully."""
    failed_at = max(status.rfind("w"), status.rfind("r"))
    return failed_at >= 0 and tail in status[failed_at:]
