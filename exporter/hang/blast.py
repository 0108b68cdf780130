"""Per-backend aggregates of the hang state: the blast radius of a failing storage backend.

One broken VM and a failing storage system look alike disk by disk; counted by backend
(`exporter.model.backend`) they do not: when an NFS server or a Ceph pool fails, every disk on
it hangs at once.  These families carry only the ``backend`` label (no ``vm``), so that
``sum by (backend)`` over every host's exporter gives the fleet-wide picture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

from exporter.hang.machine import DiskHangTracker
from exporter.model.backend import UNKNOWN
from exporter.model.state import VMState


@dataclass
class BackendCounts:
    disks: int = 0
    hanging: int = 0
    failing: int = 0
    vms: int = 0  # VMs with a hanging or failing disk on the backend


def backend_counts(
    vms: Sequence[VMState], trackers: Mapping[str, Mapping[str, DiskHangTracker]]
) -> dict[str, BackendCounts]:
    """Per backend, the disks of ``vms`` and how many hang or fail, from their trackers'
    current state (advance them first).  A VM is affected on a backend when one of its disks
    there hangs or fails.  (The metrics and the status page both read this.)"""
    counts: dict[str, BackendCounts] = {}
    for vm in vms:
        devs = trackers.get(vm.key, {})
        affected: set[str] = set()
        for dev, disk in vm.disks.items():
            backend = disk.backend or UNKNOWN
            c = counts.get(backend)
            if c is None:
                c = counts[backend] = BackendCounts()
            c.disks += 1
            t = devs.get(dev)
            if t is None:
                continue
            c.hanging += t.hanging
            c.failing += t.failing
            if t.hanging or t.failing:
                affected.add(backend)
        for backend in affected:
            counts[backend].vms += 1
    return counts


def backend_families(
    vms: Sequence[VMState], trackers: Mapping[str, Mapping[str, DiskHangTracker]]
) -> list[GaugeMetricFamily]:
    """The four per-backend gauges for the disks of ``vms`` (the VMs whose session is up)."""
    counts = backend_counts(vms, trackers)
    families = [
        GaugeMetricFamily(
            "qemu_storage_backend_disks",
            "Disks on the storage backend (of VMs whose session is up).",
            labels=["backend"],
        ),
        GaugeMetricFamily(
            "qemu_storage_backend_hanging_disks",
            "Disks on the storage backend whose IO is hanging now.",
            labels=["backend"],
        ),
        GaugeMetricFamily(
            "qemu_storage_backend_failing_disks",
            "Disks on the storage backend whose IO errors reach the guest now (after a timeout).",
            labels=["backend"],
        ),
        GaugeMetricFamily(
            "qemu_storage_backend_affected_vms",
            "VMs with at least one hanging or failing disk on the storage backend.",
            labels=["backend"],
        ),
    ]
    disks, hanging, failing, affected_vms = families
    for backend in sorted(counts):
        c = counts[backend]
        disks.add_metric([backend], c.disks)
        hanging.add_metric([backend], c.hanging)
        failing.add_metric([backend], c.failing)
        affected_vms.add_metric([backend], c.vms)
    return families
