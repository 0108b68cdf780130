"""Blast radius on real QEMUs: two storage systems (two nbdkit servers), one fails.

* storage A (nbdkit ``A.sock``): the boot disks of VMs ``a1`` and ``a2``;
* storage B (nbdkit ``B.sock``): the boot disk of VM ``b1`` and a data disk of ``a1``;
* a local image file on each of ``a1`` and ``b1``.

Every disk uses ``werror=stop,rerror=stop`` (upstream QEMU has no retry: domain.md §5), so a
failing disk pauses its VM and is shown hanging.  When A fails, only A's disks may count as
hanging under A's backend -- ``a1``'s disk on B included, although ``a1`` is paused -- and B and
the local files show none.  A real Prometheus, with the committed rules file, scrapes the
exporter: ``QemuStorageBackendOutage`` (2 of A's 2 disks on this host) and its fleet variant
fire for A only, ``QemuDiskOnFailingBackend`` marks exactly A's two disks, and the blast-radius
dashboard queries show A's disks and VMs.  After A returns (and management sends ``cont``)
everything clears.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.prometheus.artefacts import RULES_FILE, dashboard_exprs, dashboard_files
from tests.prometheus.test_pipeline import _substitute
from tests.qemu.lab import Lab, plain_qmp, wait_guest
from tests.support.binaries import require_binary
from tests.support.exporter import ExporterProcess
from tests.support.prometheus import Prometheus
from tests.support.qemu import FailingStorage, QemuVM, blank_image
from tests.support.scrape import Metrics
from tests.support.waits import wait_for

pytestmark = pytest.mark.qemu

JOB = "qemu-iohang"
POLICY = "werror=stop,rerror=stop"


def _disk(node: str, device: str, blockdev: str, boot: bool = False) -> list[str]:
    boot_arg = ",bootindex=0" if boot else ""
    return [
        "-blockdev",
        f"{blockdev},node-name={node}",
        "-device",
        f"virtio-blk-pci,drive={node},id={device},{POLICY}{boot_arg}",
    ]


def _nbd(storage: FailingStorage) -> str:
    return f"driver=nbd,server.type=unix,server.path={storage.socket}"


def _file(path: Path) -> str:
    return f"driver=file,filename={path}"


def _backends(m: Metrics) -> dict[tuple[str, str], str]:
    return {
        (s.labels["vm"], s.labels["device"]): s.labels["backend"] for s in m.find("qemu_block_device_info")
    }


def _per_backend(m: Metrics, family: str) -> dict[str, float]:
    return {s.labels["backend"]: s.value for s in m.find(family)}


def _mount_of(path: Path) -> tuple[str, str]:
    """(source, fstype) of the filesystem ``path`` is on, as util-linux's findmnt tells: an
    account of the mount table independent of the exporter's."""
    findmnt = require_binary("findmnt")
    out = subprocess.run(
        [findmnt, "-n", "-o", "SOURCE,FSTYPE", "--target", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], out[1]


async def test_one_failing_storage_hangs_only_its_backend(lab: Lab) -> None:
    a = lab.storage("A")
    b = lab.storage("B")
    local = lab.workdir / "local"
    local.mkdir()
    a1 = lab.vm(
        [
            *_disk("nbd0", "virtio-disk0", _nbd(a), boot=True),
            *_disk("nbd1", "virtio-disk1", _nbd(b)),
            *_disk("file0", "virtio-disk2", _file(blank_image(local / "a1-data.img"))),
        ],
        name="a1",
        subdir="a1",
    )
    a2 = lab.vm(_disk("nbd0", "virtio-disk0", _nbd(a), boot=True), name="a2", subdir="a2")
    b1 = lab.vm(
        [
            *_disk("nbd0", "virtio-disk0", _nbd(b), boot=True),
            *_disk("file0", "virtio-disk1", _file(blank_image(local / "b1-data.img"))),
        ],
        name="b1",
        subdir="b1",
    )
    vms = {"a1": a1, "a2": a2, "b1": b1}
    exp = await lab.exporter(*(vm.qmp for vm in vms.values()))

    # --- the backends, before anything fails ----------------------------------------------
    m = await exp.wait_metrics(
        lambda m: len(m.find("qemu_block_device_info")) == 6, timeout=20, what="all six disks"
    )
    backend_a, backend_b = f"nbd+unix:{a.socket}", f"nbd+unix:{b.socket}"
    got = _backends(m)
    assert got[("a1", "virtio-disk0")] == got[("a2", "virtio-disk0")] == backend_a
    assert got[("a1", "virtio-disk1")] == got[("b1", "virtio-disk0")] == backend_b
    local_backend = got[("a1", "virtio-disk2")]
    assert got[("b1", "virtio-disk1")] == local_backend
    assert local_backend not in (backend_a, backend_b, "unknown")
    source, fstype = _mount_of(local)
    if source.startswith("/dev/"):
        assert local_backend.startswith(("block:/dev/", "lvm:", "zfs:")), (local_backend, source)
    else:
        assert fstype in local_backend or source in local_backend or fstype in ("nfs", "nfs4"), (
            local_backend,
            source,
            fstype,
        )
    assert _per_backend(m, "qemu_storage_backend_disks") == {backend_a: 2, backend_b: 2, local_backend: 2}
    for vm in vms.values():
        await wait_guest(vm, lambda s: "WRWR" in s, what="guest doing IO")

    # --- a real Prometheus with the committed rules ----------------------------------------
    prom = Prometheus(
        lab.workdir / "prom",
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": ["qemu-iohang.rules.yml"],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{exp.port}"]}]}],
        },
        {"qemu-iohang.rules.yml": RULES_FILE.read_text()},
    )
    async with prom:
        await _fail_and_recover(exp, prom, a, vms, backend_a, backend_b, local_backend)


async def _fail_and_recover(
    exp: ExporterProcess,
    prom: Prometheus,
    a: FailingStorage,
    vms: dict[str, QemuVM],
    backend_a: str,
    backend_b: str,
    local_backend: str,
) -> None:
    # --- storage A fails ---------------------------------------------------------------------
    a.fail()
    m = await exp.wait_metrics(
        lambda m: _per_backend(m, "qemu_storage_backend_hanging_disks").get(backend_a) == 2,
        timeout=20,
        what="both of A's disks hanging",
    )
    assert _per_backend(m, "qemu_storage_backend_hanging_disks") == {
        backend_a: 2,
        backend_b: 0,
        local_backend: 0,
    }
    assert _per_backend(m, "qemu_storage_backend_affected_vms") == {
        backend_a: 2,
        backend_b: 0,
        local_backend: 0,
    }
    assert _per_backend(m, "qemu_storage_backend_failing_disks") == {
        backend_a: 0,
        backend_b: 0,
        local_backend: 0,
    }
    # a1 is paused on A's error, yet its disk on B is not hanging: B did not fail.
    assert m.value("qemu_vm_status", vm="a1", status="io-error") == 1
    assert m.value("qemu_block_io_hang", vm="a1", device="virtio-disk1") == 0
    assert m.value("qemu_block_io_hang", vm="a1", device="virtio-disk0") == 1
    assert m.value("qemu_vm_status", vm="b1", status="running") == 1

    # The outage alerts fire after their 30 s, for A only.
    async def outage_firing() -> list[dict[str, Any]] | None:
        alerts = await prom.query('ALERTS{alertname=~"QemuStorageBackendOutage(Fleet)?",alertstate="firing"}')
        return alerts if len(alerts) == 2 else None

    firing = await wait_for(outage_firing, timeout=60, what="the storage outage alerts firing")
    assert {(x["metric"]["alertname"], x["metric"]["backend"]) for x in firing} == {
        ("QemuStorageBackendOutage", backend_a),
        ("QemuStorageBackendOutageFleet", backend_a),
    }
    # Nothing about B or the local disks, pending or firing.
    others = await prom.query(f'ALERTS{{alertname=~"QemuStorageBackend.*",backend!="{backend_a}"}}')
    assert others == []

    async def explained() -> list[dict[str, Any]] | None:
        found = await prom.query('ALERTS{alertname="QemuDiskOnFailingBackend",alertstate="firing"}')
        return found if len(found) == 2 else None

    marked = await wait_for(explained, timeout=10, what="the disks the outage explains")
    assert {(x["metric"]["vm"], x["metric"]["device"], x["metric"]["backend"]) for x in marked} == {
        ("a1", "virtio-disk0", backend_a),
        ("a2", "virtio-disk0", backend_a),
    }

    # The blast-radius dashboard queries, against this Prometheus.
    values = {"job": JOB, "instance": ".*"}
    exprs = {
        where.split("panel ", 1)[1]: _substitute(e, values)
        for f in dashboard_files()
        for where, e in dashboard_exprs(f)
        if "qemu_storage_backend" in e
    }
    by_title = {
        "'Disks hanging or failing, by storage backend' ref A": {
            backend_a: 2,
            backend_b: 0,
            local_backend: 0,
        },
        "'VMs affected, by storage backend' ref A": {backend_a: 2, backend_b: 0, local_backend: 0},
        "'Storage backends now' ref A": {backend_a: 2, backend_b: 2, local_backend: 2},
        "'Storage backends now' ref D": {backend_a: 1, backend_b: 0, local_backend: 0},
    }
    assert set(by_title) <= set(exprs), sorted(exprs)
    for where, expected in by_title.items():
        result = await prom.query(exprs[where])
        assert {r["metric"]["backend"]: float(r["value"][1]) for r in result} == expected, where

    # --- storage A returns; management resumes the paused VMs ----------------------------------
    a.recover()
    for name in ("a1", "a2"):
        mon2 = vms[name].mon2
        assert mon2 is not None
        async with plain_qmp(mon2) as mgmt:
            await mgmt.execute("cont")
    m = await exp.wait_metrics(
        lambda m: not any(_per_backend(m, "qemu_storage_backend_hanging_disks").values()),
        timeout=20,
        what="no disk hanging after A returned",
    )
    assert not any(_per_backend(m, "qemu_storage_backend_affected_vms").values())

    async def resolved() -> bool:
        return not await prom.query(
            'ALERTS{alertname=~"QemuStorageBackendOutage(Fleet)?|QemuDiskOnFailingBackend"}'
        )

    await wait_for(resolved, timeout=15, what="the outage alerts resolved")
