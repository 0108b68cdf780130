"""QMP replies read into the model: query-block entries, qom-get properties, query-blockstats.

Pure functions, no I/O: the watcher sends the commands and hands the replies here.  Every value
is type-checked, because QEMU (or whatever answers on its socket) may send anything, and a label
value that is not a string would break every scrape of the host, not just one VM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.state import BlockStats, Disk, is_uint64, uint64

#: Disk types that never hold guest data worth protecting (removable media).
_SKIPPED_TYPES = ("ide-cd", "scsi-cd", "floppy", "usb-storage")

#: The qdev properties read of every new disk, and those openEuler's retry adds (domain.md §2).
POLICY_PROPERTIES = ("werror", "rerror")
RETRY_PROPERTIES = ("retry_interval", "retry_timeout")


def field(obj: object, key: str) -> object:
    return obj.get(key) if isinstance(obj, dict) else None


def device_from_qdev(qdev: str) -> tuple[str, str]:
    """(device id, QOM path) from query-block's ``qdev``.

    virtio-blk shows ``/machine/peripheral/<id>/virtio-backend``, scsi-hd the bare ``<id>``
    (domain.md §2); devices added without an id live under ``/machine/peripheral-anon``.
    """
    path = qdev
    if path.endswith("/virtio-backend"):
        path = path[: -len("/virtio-backend")]
    if not path.startswith("/"):
        return path, f"/machine/peripheral/{path}"
    if path.startswith("/machine/peripheral/"):
        return path[len("/machine/peripheral/") :], path
    return path.removeprefix("/machine/"), path


def qdev_kind(qom_type: str) -> str:
    if qom_type.startswith("virtio-blk"):
        return "virtio-blk"
    return qom_type


class BlockEntry(NamedTuple):
    """One query-block entry with a medium and a qdev: a disk of the VM."""

    device: str
    qom_path: str
    qdev: str
    drive: str
    node: str
    inserted: dict[str, Any]
    io_failed: bool


def block_entries(blocks: object) -> Iterator[BlockEntry]:
    """The disks in a query-block reply; entries without a medium or a qdev are skipped."""
    for entry in blocks if isinstance(blocks, list) else []:
        if not isinstance(entry, dict):
            continue
        qdev = entry.get("qdev")
        inserted = entry.get("inserted")
        if not isinstance(qdev, str) or not qdev or not isinstance(inserted, dict):
            continue
        device, qom_path = device_from_qdev(qdev)
        drive = entry.get("device") if isinstance(entry.get("device"), str) else ""
        node = inserted.get("node-name") if isinstance(inserted.get("node-name"), str) else ""
        yield BlockEntry(
            device, qom_path, qdev, str(drive), str(node), inserted, entry.get("io-status") == "failed"
        )


def is_skipped(qom_type: object) -> bool:
    """Removable media are no disks to watch."""
    return isinstance(qom_type, str) and qom_type.startswith(_SKIPPED_TYPES)


def disk(
    entry: BlockEntry,
    backend: str,
    qom_type: object,
    props: Mapping[str, object],
    retry_feature: bool,
    policy_config: PolicyConfig,
) -> Disk:
    """A disk from its query-block entry and its qom-get properties (``None``: not read)."""
    werror, rerror = props.get("werror"), props.get("rerror")
    interval = timeout = None
    if retry_feature:
        i, t = props.get("retry_interval"), props.get("retry_timeout")
        interval = i if is_uint64(i) else None
        timeout = t if is_uint64(t) else None
    policy = DiskPolicy(
        werror=werror if isinstance(werror, str) else "unknown",
        rerror=rerror if isinstance(rerror, str) else "unknown",
        retry_interval_ms=interval,
        retry_timeout_ms=timeout,
        retry_feature=retry_feature,
    )
    return Disk(
        device=entry.device,
        drive=entry.drive,
        node_name=entry.node,
        qdev=entry.qdev,
        qom_path=entry.qom_path,
        qdev_type=qdev_kind(qom_type) if isinstance(qom_type, str) else "unknown",
        policy=policy,
        verdict=verify(policy, policy_config),
        backend=backend,
    )


def parse_blockstats(stats: Mapping[str, Any]) -> BlockStats:
    def i(key: str) -> int:
        return uint64(stats, key)

    idle = stats.get("idle_time_ns")
    return BlockStats(
        read_bytes=i("rd_bytes"),
        written_bytes=i("wr_bytes"),
        read_ops=i("rd_operations"),
        write_ops=i("wr_operations"),
        flush_ops=i("flush_operations"),
        failed_read_ops=i("failed_rd_operations"),
        failed_write_ops=i("failed_wr_operations"),
        failed_flush_ops=i("failed_flush_operations"),
        read_time_s=i("rd_total_time_ns") / 1e9,
        write_time_s=i("wr_total_time_ns") / 1e9,
        flush_time_s=i("flush_total_time_ns") / 1e9,
        idle_s=idle / 1e9 if is_uint64(idle) else None,
    )


def blockstats(
    reply: object, match_disk: Callable[[Mapping[str, object]], str | None]
) -> Iterator[tuple[str, BlockStats]]:
    """The known disks' statistics in a query-blockstats reply."""
    for entry in reply if isinstance(reply, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
            continue
        # Same keys as query-block: the lookups kept for BLOCK_IO_ERROR serve here too.
        device = match_disk(
            {
                "node-name": entry.get("node-name"),
                "device": entry.get("device"),
                "qom-path": entry.get("qdev"),
            }
        )
        if device is not None:
            yield device, parse_blockstats(entry["stats"])
