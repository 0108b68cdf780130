"""Per-backend aggregates of the hang state: the blast radius of a failing storage backend.

One broken VM and a failing storage system look alike disk by disk; counted by backend
(`exporter.model.backend`) they do not: when an NFS server or a Ceph pool fails, every disk on
it hangs at once.  `exporter.metrics` shows these counts per backend (``backend_metrics``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
