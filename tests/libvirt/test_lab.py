"""The libvirt lab itself works: real libvirtd, real QEMU, storage failing on demand.

What the libvirt event source's tests rely on, checked without the exporter: a stop-policy
domain pauses on an IO error and continues after ``virsh resume``; a report-policy domain keeps
running while its IO fails; libvirtd can crash and come back while domains keep running.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from tests.libvirt.lab import DiskOptions, Libvirtd, LibvirtLab, pid_alive
from tests.support.binaries import require_binary
from tests.support.waits import wait_until


def test_stop_policy_pauses_on_io_error_and_resumes(libvirt_lab: LibvirtLab) -> None:
    dom = libvirt_lab.domain(DiskOptions(error_policy="stop"))
    assert dom.domstate() == ("running", "booted")
    dom.fail_storage()
    dom.wait_state("paused", "I/O error")
    assert "vda" in dom.virsh("domblkerror", dom.name)
    dom.restore_storage()
    dom.resume()
    dom.wait_state("running", "unpaused")
    dom.wait_io()  # the held request was retried and the guest loops again
    assert dom.taints() == set()


def test_report_policy_keeps_running(libvirt_lab: LibvirtLab) -> None:
    dom = libvirt_lab.domain(DiskOptions(error_policy="report", alias="ua-rep"), second_disk=True)
    dom.fail_storage()
    # The guest gets the errors and keeps issuing IO: the storage keeps failing new requests.
    dom.wait_injected_errors(20)
    assert dom.domstate()[0] == "running"
    dom.restore_storage()
    dom.wait_io()
    assert "<alias name='ua-rep'/>" in dom.dumpxml()


def test_libvirtd_killed_and_restarted_while_domain_runs(libvirtd: Libvirtd, libvirt_lab: LibvirtLab) -> None:
    libvirtd.require_owned()
    dom = libvirt_lab.domain(DiskOptions(error_policy="stop"))
    qemu_pid, domid = dom.qemu_pid(), dom.domid()
    assert qemu_pid is not None and domid is not None
    libvirtd.kill()
    assert not libvirtd.responsive(timeout=5)
    assert pid_alive(qemu_pid)  # QEMU is not libvirtd's child
    libvirtd.restart()
    assert dom.domstate() == ("running", "booted")
    assert (dom.qemu_pid(), dom.domid()) == (qemu_pid, domid)
    dom.wait_io()

    # Mid-hang: the storage fails while libvirtd is down; QEMU pauses by itself.
    libvirtd.kill()
    dom.fail_storage()
    dom.wait_injected_errors(1)  # the guest was running and doing IO without libvirtd
    libvirtd.restart()
    # libvirtd reconnects to QEMU's monitor and reads the state it missed.
    dom.wait_state("paused", "I/O error", timeout=10)
    dom.restore_storage()
    dom.resume()
    dom.wait_state("running", "unpaused")
    dom.wait_io()


#: Run inside a mount namespace whose ``/run`` is a new, empty tmpfs: the lab must start a
#: daemon there, with nothing left behind by an earlier daemon, test run or person.
_FRESH_RUN_SCRIPT = """
import sys
from pathlib import Path
from tests.libvirt.lab import Libvirtd, lab_workdir
assert not Path("/run/libvirt").exists(), "the fresh /run is not empty"
with lab_workdir("qih-fresh-") as workdir:
    daemon = Libvirtd(workdir, private=True)
    try:
        daemon.start(timeout=120)
        print("responsive" if daemon.responsive() else "unresponsive")
    finally:
        daemon.stop()
"""


def test_lab_starts_where_no_libvirtd_ever_ran() -> None:
    """On a machine that has just booted, or where libvirtd never ran, ``/run/libvirt`` does not
    exist: the lab creates what it binds over instead of assuming a previous daemon left it."""
    unshare = require_binary("unshare")
    for name in ("libvirtd", "virtlogd", "virsh", "nsenter"):
        require_binary(name)
    repo = Path(__file__).resolve().parents[2]
    script = f"mount -t tmpfs -o mode=755 tmpfs /run && exec {shlex.quote(sys.executable)} -c {shlex.quote(_FRESH_RUN_SCRIPT)}"
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=repo, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, f"lab failed on a fresh /run ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert proc.stdout.split() == ["responsive"]


def test_the_retry_emulator_makes_libvirtd_hear_openeulers_retry_events(libvirt_lab: LibvirtLab) -> None:
    """`retry_emulator`: Debian's QEMU with a report-policy disk, whose errors libvirtd receives
    as openEuler QEMU's ``retry`` (domain.md §4.1): one per failed request, the domain running
    on, libvirtd warning about the action it does not know, as with the real thing."""
    from tests.libvirt.lab import retry_emulator
    from tests.libvirt.test_libvirt_source import io_error_witness

    emulator = retry_emulator(libvirt_lab.libvirtd.workdir)
    dom = libvirt_lab.domain(DiskOptions(error_policy="report"), emulator=emulator, pause_us=0)
    with io_error_witness(dom) as seen:
        dom.fail_storage()
        dom.wait_injected_errors(50)
        wait_until(lambda: len(seen) >= 50, 10, "50 events through libvirtd")
        assert dom.domstate()[0] == "running"
    assert {(e["action"], e["node-name"]) for e in seen} == {("retry", "libvirt-1-format")}
    assert "unknown disk io error action 'retry'" in libvirt_lab.libvirtd.log_tail(200_000)
    dom.restore_storage()
    dom.wait_io()
