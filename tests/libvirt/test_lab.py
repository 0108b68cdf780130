"""The libvirt lab itself works: real libvirtd, real QEMU, storage failing on demand.

What the libvirt event source's tests rely on, checked without the exporter: a stop-policy
domain pauses on an IO error and continues after ``virsh resume``; a report-policy domain keeps
running while its IO fails; libvirtd can crash and come back while domains keep running.
"""

from __future__ import annotations

from tests.libvirt.lab import DiskOptions, Libvirtd, LibvirtLab, pid_alive


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
