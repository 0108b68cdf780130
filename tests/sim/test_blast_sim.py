"""Per-backend aggregates under the openEuler retry policy (which no installable QEMU has):
simulated VMs whose disks sit on two NBD servers and a Ceph pool; the Ceph pool fails.

Its disks hang (retried) and, past their 2 s ``retry_timeout``, fail (errors reach the guest):
``qemu_storage_backend_hanging_disks`` then ``..._failing_disks`` count them, and the VMs they
belong to, under the pool's backend only.  Real unix sockets, the exporter as a subprocess.
"""

from __future__ import annotations

from pathlib import Path

from qmpsim import DiskSpec, SimVM
from tests.sim.test_exporter_sim import running
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics

POOL = "rbd://10.0.0.1:6789,10.0.0.2:6789/vms"
NBD1 = "nbd://10.0.1.1:10809"
NBD2 = "nbd://10.0.1.2:10809"


def rbd(image: str) -> str:
    return f"rbd:vms/{image}:id=admin:key=NOTINALABEL:mon_host=10.0.0.2\\;10.0.0.1"


def disk(id: str, filename: str, type: str = "virtio-blk") -> DiskSpec:
    return DiskSpec(
        id=id,
        type=type,
        werror="retry",
        rerror="retry",
        retry_interval_ms=500,
        retry_timeout_ms=2000,
        in_flight=1,
        filename=filename,
    )


def per_backend(m: Metrics, family: str) -> dict[str, float]:
    return {s.labels["backend"]: s.value for s in m.find(family)}


async def test_a_failing_pool_counts_under_its_backend_only(short_tmp: Path) -> None:
    vms = [
        SimVM(
            str(short_tmp / "web1.qmp"),
            name="web1",
            disks=[disk("virtio-disk0", "nbd://10.0.1.1:10809/web1"), disk("virtio-disk1", rbd("web1-data"))],
        ),
        SimVM(
            str(short_tmp / "web2.qmp"),
            name="web2",
            disks=[disk("virtio-disk0", "nbd://10.0.1.2:10809/web2"), disk("virtio-disk1", rbd("web2-data"))],
        ),
        SimVM(
            str(short_tmp / "db.qmp"),
            name="db",
            disks=[
                disk("virtio-disk0", "nbd://10.0.1.1:10809/db"),
                disk("scsi0-0-0-0", rbd("db-a"), "scsi-hd"),
                disk("scsi0-0-0-1", rbd("db-b"), "scsi-hd"),
            ],
        ),
    ]
    config = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}
    async with running(vms) as started, ExporterProcess(short_tmp, config) as exp:
        m = await exp.wait_metrics(
            lambda m: len(m.find("qemu_block_device_info")) == 7, timeout=15, what="every disk"
        )
        assert per_backend(m, "qemu_storage_backend_disks") == {POOL: 4, NBD1: 2, NBD2: 1}
        assert "NOTINALABEL" not in m.text

        for vm in started:
            for d in vm.disks.values():
                if d.spec.filename and d.spec.filename.startswith("rbd:"):
                    vm.link_down(d.spec.id)
        m = await exp.wait_metrics(
            lambda m: per_backend(m, "qemu_storage_backend_hanging_disks").get(POOL) == 4,
            timeout=10,
            what="the pool's four disks hanging",
        )
        assert per_backend(m, "qemu_storage_backend_hanging_disks") == {POOL: 4, NBD1: 0, NBD2: 0}
        assert per_backend(m, "qemu_storage_backend_affected_vms") == {POOL: 3, NBD1: 0, NBD2: 0}

        # Past the 2 s retry_timeout the guests get the errors: failing, still on the pool only.
        m = await exp.wait_metrics(
            lambda m: per_backend(m, "qemu_storage_backend_failing_disks").get(POOL) == 4,
            timeout=10,
            what="the pool's four disks failing after their timeout",
        )
        assert per_backend(m, "qemu_storage_backend_failing_disks") == {POOL: 4, NBD1: 0, NBD2: 0}
        assert per_backend(m, "qemu_storage_backend_hanging_disks") == {POOL: 0, NBD1: 0, NBD2: 0}
        assert per_backend(m, "qemu_storage_backend_affected_vms") == {POOL: 3, NBD1: 0, NBD2: 0}
