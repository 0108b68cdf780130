"""The exporter subprocess against simulated QEMUs over real unix sockets."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from qmpsim import DiskSpec, SimVM
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.scrape import Metrics

#: The second disk of VM "good": RBD as QEMU names a -blockdev rbd node (a json: filename).
RBD_FILENAME = (
    'json:{"driver": "raw", "file": {"driver": "rbd", "pool": "vms", "image": "good-data", '
    '"server": [{"host": "192.0.2.22", "port": "6789"}, {"host": "192.0.2.21", "port": "6789"}]}}'
)
#: The mount table of `fleet_config`: images on an NFS export, the rest on the root disk.
FLEET_MOUNTINFO = (
    "22 1 8:3 / / rw,relatime shared:1 - ext4 /dev/sda3 rw\n"
    "40 22 0:40 / /var/lib/images rw,relatime shared:2 - nfs4 filer1:/export/vms rw,vers=4.2\n"
)
#: The backend of each disk of `fleet` under `fleet_config`.
EXPECTED_BACKENDS = {
    ("good", "virtio-disk0"): "nbd://192.0.2.10:10809",
    ("good", "scsi0-0-0-0"): "rbd://192.0.2.21:6789,192.0.2.22:6789/vms",
    ("stopper", "virtio-disk0"): "iscsi://192.0.2.30:3260/iqn.2026-01.example:array1",
    ("stopper", "scsi0-0-0-0"): "nfs://filer1/export/vms",
    ("ondrive", "virtio-disk0"): "nfs://filer1/export/vms",
    ("ondrive", "scsi0-0-0-0"): "san-a",
    ("upstream", "virtio-disk0"): "nbd+unix:/run/nbd0.sock",
    ("upstream", "scsi0-0-0-0"): "block:/dev/sda",
}


def retry_disk(id: str, type: str = "virtio-blk", **kw: Any) -> DiskSpec:
    args: dict[str, Any] = {
        "werror": "retry",
        "rerror": "retry",
        "retry_interval_ms": 1000,
        "retry_timeout_ms": 10000,
    }
    args.update(kw)
    return DiskSpec(id=id, type=type, in_flight=0, **args)


def fleet(d: Path) -> list[SimVM]:
    return [
        SimVM(
            str(d / "good.qmp"),
            name="good",
            disks=[
                retry_disk("virtio-disk0", filename="nbd://192.0.2.10:10809/good-root"),
                retry_disk("scsi0-0-0-0", "scsi-hd", filename=RBD_FILENAME),
            ],
        ),
        SimVM(
            str(d / "stopper.qmp"),
            name="stopper",
            disks=[
                DiskSpec(
                    id="virtio-disk0",
                    werror="stop",
                    rerror="stop",
                    in_flight=0,
                    filename="iscsi://192.0.2.30:3260/iqn.2026-01.example:array1/1",
                ),
                DiskSpec(
                    id="scsi0-0-0-0",
                    type="scsi-hd",
                    werror="stop",
                    rerror="report",
                    in_flight=0,
                    filename="/var/lib/images/stopper-data.qcow2",
                ),
            ],
        ),
        SimVM(
            str(d / "ondrive.qmp"),
            name="ondrive",
            disks=[
                retry_disk("virtio-disk0", policy_on="drive", filename="/var/lib/images/ondrive.qcow2"),
                retry_disk("scsi0-0-0-0", "scsi-hd", policy_on="drive", filename="/dev/mapper/mpatha"),
            ],
        ),
        SimVM(
            str(d / "upstream.qmp"),
            name="upstream",
            retry_feature=False,
            disks=[
                DiskSpec(
                    id="virtio-disk0",
                    werror="stop",
                    rerror="stop",
                    in_flight=0,
                    naming="blockdev",
                    node_name="nbd0",
                    filename="nbd+unix://?socket=/run/nbd0.sock",
                ),
                DiskSpec(id="scsi0-0-0-0", type="scsi-hd", in_flight=0, filename="/srv/local/upstream.img"),
            ],
        ),
    ]


EXPECTED_VIOLATIONS = {
    ("good", "virtio-disk0"): set(),
    ("good", "scsi0-0-0-0"): set(),
    ("stopper", "virtio-disk0"): {"werror_not_retry", "rerror_not_retry"},
    ("stopper", "scsi0-0-0-0"): {"werror_not_retry", "rerror_not_retry"},
    ("ondrive", "virtio-disk0"): {"policy_not_visible"},
    ("ondrive", "scsi0-0-0-0"): {"policy_not_visible"},
    ("upstream", "virtio-disk0"): {"werror_not_retry", "rerror_not_retry", "retry_unsupported"},
    ("upstream", "scsi0-0-0-0"): {"policy_not_visible", "retry_unsupported"},
}


@contextlib.asynccontextmanager
async def running(vms: Iterable[SimVM]) -> AsyncIterator[list[SimVM]]:
    """Start simulated VMs; kill them whatever happens."""
    started = list(vms)
    try:
        for vm in started:
            await vm.start()
        yield started
    finally:
        for vm in started:
            await vm.kill()


def fleet_config(d: Path) -> dict[str, Any]:
    """The exporter config used with `fleet`: every socket in ``d``, non-zero timeouts required,
    the fleet's mount table (written into ``d``: the same backends on every machine) and one
    operator rule naming the multipath map's SAN."""
    (d / "mountinfo").write_text(FLEET_MOUNTINFO)
    return {
        "qmp": {"globs": [str(d / "*.qmp")], **FAST},
        "policy": {"require_nonzero_timeout": True},
        "mounts": {"file": str(d / "mountinfo")},
        "backends": [{"match": "block:/dev/mapper/mpath*", "name": "san-a"}],
    }


def all_disks_seen(m: Metrics) -> bool:
    return len(m.find("qemu_block_retry_policy_ok")) == len(EXPECTED_VIOLATIONS)


async def test_policy_verdicts_for_a_mixed_fleet(short_tmp: Path) -> None:
    async with running(fleet(short_tmp)), ExporterProcess(short_tmp, fleet_config(short_tmp)) as exp:
        m = await exp.wait_metrics(all_disks_seen, what="every disk")
        for (vm, dev), rules in EXPECTED_VIOLATIONS.items():
            assert m.value("qemu_block_retry_policy_ok", vm=vm, device=dev) == (0 if rules else 1), (
                vm,
                dev,
            )
            got = m.label_values("qemu_block_retry_policy_violation", "rule", vm=vm, device=dev)
            assert got == rules, (vm, dev, got)
        info = {(s.labels["vm"], s.labels["device"]): s.labels for s in m.find("qemu_block_device_info")}
        assert info[("good", "virtio-disk0")]["qdev_type"] == "virtio-blk"
        assert info[("good", "virtio-disk0")]["drive"] == "drive-virtio-disk0"
        assert info[("good", "scsi0-0-0-0")]["qdev_type"] == "scsi-hd"
        assert info[("ondrive", "virtio-disk0")]["werror"] == "auto"
        assert info[("upstream", "virtio-disk0")]["drive"] == ""
        assert info[("upstream", "virtio-disk0")]["node_name"] == "nbd0"
        assert (
            info[("stopper", "scsi0-0-0-0")]["werror"],
            info[("stopper", "scsi0-0-0-0")]["rerror"],
        ) == (
            "stop",
            "report",
        )
        assert m.value("qemu_block_retry_timeout_seconds", vm="good", device="virtio-disk0") == 10.0
        assert m.value("qemu_block_retry_interval_seconds", vm="good", device="virtio-disk0") == 1.0
        # -drive policy: the device shows its defaults (domain.md §2).
        assert m.value("qemu_block_retry_interval_seconds", vm="ondrive", device="virtio-disk0") == 1.0
        assert m.value("qemu_block_retry_timeout_seconds", vm="ondrive", device="virtio-disk0") == 0.0
        assert m.find("qemu_block_retry_timeout_seconds", vm="upstream") == []
        assert m.value("qemu_vm_retry_feature", vm="good") == 1
        assert m.value("qemu_vm_retry_feature", vm="upstream") == 0
        backends = {key: labels["backend"] for key, labels in info.items()}
        assert backends == EXPECTED_BACKENDS
        per_backend = {s.labels["backend"]: s.value for s in m.find("qemu_storage_backend_disks")}
        assert per_backend == {b: float(list(EXPECTED_BACKENDS.values()).count(b)) for b in per_backend}
        assert set(per_backend) == set(EXPECTED_BACKENDS.values())
        assert all(s.value == 0 for s in m.find("qemu_storage_backend_hanging_disks"))
        assert m.value("qemu_vm_status", vm="good", status="running") == 1
        assert m.label_values("qemu_vm_info", "qemu_version", vm="upstream") == {"7.2.22"}
        assert m.value("qemu_exporter_vms") == 4


async def test_killed_vm_loses_its_series_and_gets_them_back(short_tmp: Path) -> None:
    sock = str(short_tmp / "vm1.qmp")
    vm = SimVM(sock, name="vm1", disks=[retry_disk("virtio-disk0")])
    await vm.start()
    cfg = {"qmp": {"sockets": [sock], "globs": [str(short_tmp / "*.qmp")], **FAST}}
    async with ExporterProcess(short_tmp, cfg) as exp:
        await exp.wait_metrics(
            lambda m: m.value("qemu_qmp_up", vm="vm1") == 1 and m.find("qemu_block_device_info")
        )
        await vm.kill()
        m = await exp.wait_metrics(
            lambda m: m.value("qemu_qmp_up", vm="vm1") == 0, timeout=5, what="qmp_up 0"
        )
        stale = [
            s
            for s in m.samples
            if s.labels.get("vm") == "vm1" and not s.name.startswith(("qemu_qmp_up", "qemu_exporter_"))
        ]
        assert stale == []
        vm2 = SimVM(sock, name="vm1", disks=[retry_disk("virtio-disk0"), retry_disk("virtio-disk1")])
        await vm2.start()
        try:
            m = await exp.wait_metrics(
                lambda m: (
                    m.value("qemu_qmp_up", vm="vm1") == 1
                    and len(m.find("qemu_block_device_info", vm="vm1")) == 2
                ),
                timeout=5,
                what="the restarted VM",
            )
            assert (m.value("qemu_exporter_qmp_disconnects_total", vm="vm1") or 0) >= 1
        finally:
            await vm2.kill()


async def test_vanished_glob_socket_takes_all_series(short_tmp: Path) -> None:
    a = SimVM(str(short_tmp / "a.qmp"), name="a", disks=[retry_disk("virtio-disk0")])
    b = SimVM(str(short_tmp / "b.qmp"), name="b", disks=[retry_disk("virtio-disk0")])
    await a.start()
    await b.start()
    try:
        cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}
        async with ExporterProcess(short_tmp, cfg) as exp:
            await exp.wait_metrics(
                lambda m: m.value("qemu_qmp_up", vm="a") == 1 and m.value("qemu_qmp_up", vm="b") == 1
            )
            await a.shutdown()
            m = await exp.wait_metrics(
                lambda m: not m.find("qemu_qmp_up", vm="a"), timeout=5, what="a to vanish"
            )
            assert not [s for s in m.samples if s.labels.get("vm") == "a"]
            assert m.value("qemu_qmp_up", vm="b") == 1
            assert m.value("qemu_exporter_vms") == 1
    finally:
        await a.kill()
        await b.kill()


async def test_io_error_events_are_counted_per_disk_operation_action(short_tmp: Path) -> None:
    vm = SimVM(
        str(short_tmp / "vm.qmp"),
        name="vm",
        disks=[
            retry_disk("virtio-disk0", retry_interval_ms=100, retry_timeout_ms=500),
            DiskSpec(id="scsi0-0-0-0", type="scsi-hd", werror="report", rerror="report", in_flight=0),
        ],
    )
    await vm.start()
    try:
        async with ExporterProcess(short_tmp, {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}) as exp:
            await exp.wait_metrics(lambda m: len(m.find("qemu_block_device_info")) == 2)
            vm.link_down("virtio-disk0", in_flight=3, operations=("write", "read"))
            vm.link_down("scsi0-0-0-0", in_flight=2, operations=("write",))
            await exp.wait_metrics(
                lambda m: (
                    (
                        m.value(
                            "qemu_block_io_error_events_total",
                            vm="vm",
                            device="virtio-disk0",
                            operation="write",
                            action="report",
                        )
                        or 0
                    )
                    > 0
                ),
                what="the retry disk to time out",
            )
            vm.link_up("virtio-disk0")
            vm.link_up("scsi0-0-0-0")

            def settled(m: Metrics) -> bool:
                return all(
                    m.value(
                        "qemu_block_io_error_events_total",
                        vm="vm",
                        device=c["device"],
                        operation=c["operation"],
                        action=c["action"],
                    )
                    == c["count"]
                    for c in vm.event_counts()
                    if c["event"] == "BLOCK_IO_ERROR"
                )

            m = await exp.wait_metrics(settled, what="exporter counts == simulator counts")
            assert m.value(
                "qemu_block_io_error_events_total",
                vm="vm",
                device="virtio-disk0",
                operation="read",
                action="retry",
            )
            assert m.value(
                "qemu_block_io_error_events_total",
                vm="vm",
                device="scsi0-0-0-0",
                operation="write",
                action="report",
            )
            assert m.value("qemu_exporter_io_error_events_unmatched_total", vm="vm") == 0
            total = m.sum("qemu_block_io_error_events_total")
            assert total == vm.event_count("BLOCK_IO_ERROR")
            assert m.value("qemu_exporter_qmp_events_total", vm="vm", event="BLOCK_IO_ERROR") == total
    finally:
        await vm.kill()


async def test_hot_plug_and_unplug(short_tmp: Path) -> None:
    vm = SimVM(
        str(short_tmp / "vm.qmp"),
        name="vm",
        disks=[retry_disk("virtio-disk0"), retry_disk("scsi0-0-0-0", "scsi-hd")],
    )
    await vm.start()
    try:
        async with ExporterProcess(short_tmp, {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}) as exp:
            await exp.wait_metrics(lambda m: len(m.find("qemu_block_device_info")) == 2)
            vm.hot_unplug("scsi0-0-0-0")
            m = await exp.wait_metrics(
                lambda m: len(m.find("qemu_block_device_info")) == 1, timeout=3, what="unplug"
            )
            assert m.find("qemu_block_retry_policy_ok", device="scsi0-0-0-0") == []
            # Hot plug emits no event; a disk added without the policy is caught at the next refresh.
            vm.hot_plug(DiskSpec(id="virtio-disk1", werror="report", rerror="report", in_flight=0))
            m = await exp.wait_metrics(
                lambda m: m.find("qemu_block_device_info", device="virtio-disk1"), timeout=5, what="plug"
            )
            assert m.value("qemu_block_retry_policy_ok", device="virtio-disk1") == 0
    finally:
        await vm.kill()


async def test_errors_of_a_disk_plugged_since_the_last_refresh_are_attributed(short_tmp: Path) -> None:
    vm = SimVM(str(short_tmp / "vm.qmp"), name="vm", disks=[retry_disk("virtio-disk0")])
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST, "refresh_interval_seconds": 60.0}}
    async with running([vm]), ExporterProcess(short_tmp, cfg) as exp:
        await exp.wait_metrics(lambda m: len(m.find("qemu_block_device_info")) == 1)
        # A disk that fails right after being plugged, long before the periodic refresh
        # (60 s here): its errors are held, the list re-read, and every event attributed.
        vm.hot_plug(DiskSpec(id="scsi0-0-0-1", type="scsi-hd", werror="report", rerror="report", in_flight=0))
        vm.link_down("scsi0-0-0-1", in_flight=1, operations=("write",))
        await exp.wait_metrics(lambda m: m.find("qemu_block_device_info", device="scsi0-0-0-1"), timeout=5)
        vm.link_up("scsi0-0-0-1")

        def counted(m: Metrics) -> bool:
            sent = vm.event_count("BLOCK_IO_ERROR", device="scsi0-0-0-1", socket=vm.socket_path)
            got = m.value(
                "qemu_block_io_error_events_total", device="scsi0-0-0-1", operation="write", action="report"
            )
            return sent > 0 and got == sent

        m = await exp.wait_metrics(counted, timeout=5, what="every event of the new disk")
        assert m.value("qemu_exporter_io_error_events_unmatched_total", vm="vm") == 0


async def test_static_labels_per_socket(short_tmp: Path) -> None:
    a = SimVM(str(short_tmp / "a.qmp"), name="a", disks=[retry_disk("virtio-disk0")])
    b = SimVM(str(short_tmp / "b.qmp"), name="b", disks=[retry_disk("virtio-disk0")])
    await a.start()
    await b.start()
    try:
        cfg = {
            "qmp": {
                "globs": [str(short_tmp / "*.qmp")],
                "labels": {
                    str(short_tmp / "*.qmp"): {"tenant": "blue"},
                    str(short_tmp / "b.qmp"): {"tenant": "red", "az": "z1"},
                },
                **FAST,
            }
        }
        async with ExporterProcess(short_tmp, cfg) as exp:
            m = await exp.wait_metrics(lambda m: len(m.find("qemu_block_device_info")) == 2)
            # Every per-VM series carries every configured label name (empty = not set).
            assert m.find("qemu_block_retry_policy_ok", vm="a")[0].labels == {
                "vm": "a",
                "device": "virtio-disk0",
                "tenant": "blue",
                "az": "",
            }
            assert m.find("qemu_qmp_up", vm="b")[0].labels == {"vm": "b", "tenant": "red", "az": "z1"}
    finally:
        await a.kill()
        await b.kill()


async def test_a_clean_shutdown_ends_sessions_without_warnings(short_tmp: Path) -> None:
    """Sessions the exporter ends itself (SIGTERM) are no warning: at 1000 VMs that was 1000
    'QMP session ended' warnings per restart.  A session QEMU ends still warns."""
    cfg = fleet_config(short_tmp)
    cfg["log"] = {"level": "info"}
    async with running(fleet(short_tmp)) as vms:
        exp = ExporterProcess(short_tmp, cfg)
        await exp.start()
        try:
            await exp.wait_metrics(all_disks_seen, what="every disk")
            await vms[0].kill()  # QEMU going away is worth a warning
            await exp.wait_metrics(lambda m: m.value("qemu_qmp_up", vm="good") in (None, 0), what="good gone")
        finally:
            assert exp.stop(signal.SIGTERM) == 0
    ended = [line for line in exp.log().splitlines() if 'msg="QMP session ended"' in line]
    assert len(ended) == 1 and "level=warn" in ended[0] and "vm=good " in ended[0], ended
    assert "shutting down" in exp.log()
