"""Reproduce why the exporter must not subscribe to libvirt's IO-error events (libvirt 9.0).

Runs a report-policy domain whose NBD storage fails for a few seconds twice on a private lab
libvirtd: first with only a QEMU monitor event subscriber, then with a
``VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON`` subscriber added, and prints per phase the errors
injected, the monitor events delivered and libvirtd's CPU time.  On libvirt 9.0 the second phase
costs libvirtd ~10 ms of CPU per error, and once it also lost monitor events and left the daemon
unresponsive (the lab kills a wedged daemon at teardown).  ``tests/fixtures/libvirt-9.0/README.md`` has the numbers.

    .venv/bin/python -m tests.libvirt.probe_io_error_event   # as root; ~1 min
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import libvirt
import libvirt_qemu
import libvirtaio

from tests.libvirt.lab import DiskOptions, Libvirtd, LibvirtLab, lab_workdir, running_libvirtd
from tests.support.procs import cpu_seconds

FAIL_SECONDS = 8.0  # a measurement window, not a wait for anything


async def probe(lab: LibvirtLab, daemon: Libvirtd) -> None:
    libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    counts = {"monitor": 0, "io_error_reason": 0}

    def bump(key: str) -> Any:
        return lambda *_args: counts.__setitem__(key, counts[key] + 1)

    conn = await asyncio.to_thread(libvirt.open, daemon.uri)
    libvirt_qemu.qemuMonitorEventRegister(conn, None, None, bump("monitor"), None)
    dom = await asyncio.to_thread(lab.domain, DiskOptions(error_policy="report"), hint="probe")
    for phase in ("monitor events only", "+ IO_ERROR_REASON subscriber"):
        if phase.startswith("+"):
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, bump("io_error_reason"), None
            )
        pid = daemon.pid
        assert pid is not None
        counts["monitor"] = 0
        errors0, cpu0, t0 = dom.storage.injected_errors(), cpu_seconds(pid), time.monotonic()
        dom.fail_storage()
        await asyncio.sleep(FAIL_SECONDS)
        dom.restore_storage()
        elapsed = time.monotonic() - t0
        errors, cpu = dom.storage.injected_errors() - errors0, cpu_seconds(pid) - cpu0
        answers = await asyncio.to_thread(daemon.responsive, 20.0)
        print(
            f"{phase}: {errors} errors injected in {elapsed:.1f} s, {counts['monitor']} monitor events, "
            f"{counts['io_error_reason']} IO_ERROR_REASON events, libvirtd CPU {cpu:.2f} s "
            f"({cpu / max(errors, 1) * 1e6:.0f} us per error), answers virsh afterwards: {answers}",
            flush=True,
        )


def main() -> None:
    with (
        lab_workdir("qih-probed-") as daemon_dir,
        running_libvirtd(daemon_dir, private=True) as daemon,
        lab_workdir("qih-probe-") as workdir,
        contextlib.ExitStack() as stack,
    ):
        asyncio.run(probe(LibvirtLab(daemon, workdir, stack), daemon))


if __name__ == "__main__":
    main()
