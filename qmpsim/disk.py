"""Per-disk state: effective policy, retry clock, request groups and lazy IO statistics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .spec import DEFAULT_RETRY_INTERVAL_MS, DEFAULT_RETRY_TIMEOUT_MS, DiskSpec

#: successful operations per second per in-flight request slot while the storage is healthy
HEALTHY_OPS_PER_SLOT = 50.0
BYTES_PER_OP = 4096
NS_PER_OP = 200_000

# key order of BlockDeviceStats as printed by QEMU 7.2 (tests/fixtures/qemu-7.2)
_STATS_KEYS = (
    "unmap_operations",
    "unmap_merged",
    "flush_total_time_ns",
    "wr_highest_offset",
    "wr_total_time_ns",
    "failed_wr_operations",
    "failed_rd_operations",
    "wr_merged",
    "wr_bytes",
    "timed_stats",
    "failed_unmap_operations",
    "failed_flush_operations",
    "account_invalid",
    "rd_total_time_ns",
    "invalid_unmap_operations",
    "flush_operations",
    "wr_operations",
    "unmap_bytes",
    "rd_merged",
    "rd_bytes",
    "unmap_total_time_ns",
    "invalid_flush_operations",
    "account_failed",
    "rd_operations",
    "invalid_wr_operations",
    "invalid_rd_operations",
)


def _zero_stats(account: bool) -> dict[str, Any]:
    stats: dict[str, Any] = dict.fromkeys(_STATS_KEYS, 0)
    stats["timed_stats"] = []
    stats["account_invalid"] = account
    stats["account_failed"] = account
    return stats


class Group:
    """``n`` identical guest requests of one operation on one disk, moving in lockstep.

    mode: ``healthy`` (IO succeeds, counters grow lazily), ``held`` (waiting for the retry
    timer or an immediate attempt), ``think`` (error reported to the guest, resubmitting after
    the think time), ``stopped`` (stop policy: waiting for ``cont``).
    """

    __slots__ = ("active_since", "disk", "handle", "mode", "n", "op", "pending")

    def __init__(self, disk: Disk, op: str, n: int) -> None:
        self.disk = disk
        self.op = op
        self.n = n
        self.mode = "healthy"
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self.active_since: float | None = None
        self.pending = False

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Disk:
    """Runtime state of one :class:`DiskSpec` in a VM."""

    def __init__(self, spec: DiskSpec, auto_node: str, auto_parent: str, retry_feature: bool):
        self.spec = spec
        self.retry_feature = retry_feature
        if spec.naming == "drive":
            self.device = spec.drive_id
            self.node_name = spec.node_name or auto_node
            self.parent_node = auto_parent
        else:
            self.device = ""
            self.node_name = spec.node_name or f"node-{spec.id}"
            self.parent_node = f"{self.node_name}-file"
        self.filename = spec.filename or f"/var/lib/qmpsim/{spec.id}.img"
        self.link_up = True
        self.err_start: float | None = None
        # effective policy (what acts) and what qom-get shows on the device
        if spec.policy_on == "drive":
            self.eff_werror, self.eff_rerror = spec.werror, spec.rerror
            self.dev_werror, self.dev_rerror = "auto", "auto"
            self.dev_interval, self.dev_timeout = (
                DEFAULT_RETRY_INTERVAL_MS,
                DEFAULT_RETRY_TIMEOUT_MS,
            )
        else:
            self.dev_werror, self.dev_rerror = spec.werror, spec.rerror
            self.dev_interval, self.dev_timeout = spec.retry_interval_ms, spec.retry_timeout_ms
            # device "auto" inherits the -drive defaults: werror=enospc, rerror=report
            self.eff_werror = "enospc" if spec.werror == "auto" else spec.werror
            self.eff_rerror = "report" if spec.rerror == "auto" else spec.rerror
        self.interval_s = self.dev_interval / 1000.0
        self.timeout_s = self.dev_timeout / 1000.0
        self.iostatus_enabled = self.eff_werror in ("enospc", "stop") or self.eff_rerror == "stop"
        self.io_status = "ok"
        self.ops: dict[str, float] = {"read": 0.0, "write": 0.0}
        self.failed: dict[str, int] = {"read": 0, "write": 0}
        self.last_io: float | None = None
        self.groups: dict[str, Group] = {}
        self._event_data: dict[tuple[str, str], str] = {}
        self.set_workload(spec.in_flight, spec.operations)

    # --- policy -----------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def is_virtio(self) -> bool:
        return self.spec.type == "virtio-blk"

    @property
    def qdev(self) -> str:
        """``qdev`` as shown by query-block / query-blockstats."""
        if self.is_virtio:
            return f"/machine/peripheral/{self.spec.id}/virtio-backend"
        return self.spec.id

    def policy(self, op: str) -> str:
        return self.eff_werror if op == "write" else self.eff_rerror

    def event_data(self, op: str, action: str) -> str:
        """The JSON ``data`` of a BLOCK_IO_ERROR (cached; key order as QEMU 7.2 prints it)."""
        key = (op, action)
        cached = self._event_data.get(key)
        if cached is None:
            data: dict[str, Any] = {"device": self.device}
            if self.iostatus_enabled:
                data["nospace"] = False
            data["node-name"] = self.node_name
            data["reason"] = "Input/output error"
            data["operation"] = op
            data["action"] = action
            cached = self._event_data[key] = json.dumps(data)
        return cached

    # --- workload and lazy counters ---------------------------------------------------
    def set_workload(self, in_flight: int, operations: tuple[str, ...] | list[str]) -> None:
        """Set how many requests per operation the guest keeps in flight (healthy groups)."""
        for op in ("read", "write"):
            n = in_flight if op in operations else 0
            group = self.groups.get(op)
            if group is None:
                if n:
                    self.groups[op] = Group(self, op, n)
            elif group.mode == "healthy":
                group.n = n

    def fold(self, group: Group, now: float) -> None:
        """Fold the lazily computed healthy operations of ``group`` into the counters."""
        if group.active_since is not None:
            elapsed = max(0.0, now - group.active_since)
            if elapsed and group.n:
                self.ops[group.op] += elapsed * HEALTHY_OPS_PER_SLOT * group.n
                self.last_io = now
            group.active_since = None

    def op_count(self, op: str, now: float) -> int:
        total = self.ops[op]
        group = self.groups.get(op)
        if group is not None and group.active_since is not None:
            total += max(0.0, now - group.active_since) * HEALTHY_OPS_PER_SLOT * group.n
        return int(total)

    def busy(self) -> bool:
        return any(g.n and (g.active_since is not None or g.mode != "healthy") for g in self.groups.values())

    def blockstats(self, now: float) -> dict[str, Any]:
        rd, wr = self.op_count("read", now), self.op_count("write", now)
        stats = _zero_stats(True)
        stats["wr_highest_offset"] = min(wr * BYTES_PER_OP, self.spec.size)
        stats["wr_total_time_ns"] = wr * NS_PER_OP
        stats["failed_wr_operations"] = self.failed["write"]
        stats["failed_rd_operations"] = self.failed["read"]
        stats["wr_bytes"] = wr * BYTES_PER_OP
        stats["rd_total_time_ns"] = rd * NS_PER_OP
        stats["wr_operations"] = wr
        stats["rd_bytes"] = rd * BYTES_PER_OP
        stats["rd_operations"] = rd
        if rd or wr or self.failed["read"] or self.failed["write"]:
            idle = self.busy() or self.last_io is None
            stats["idle_time_ns"] = 0 if idle or self.last_io is None else int((now - self.last_io) * 1e9)
        parent_stats = _zero_stats(False)
        parent_stats["wr_highest_offset"] = stats["wr_highest_offset"]
        parent_stats["wr_bytes"], parent_stats["wr_operations"] = stats["wr_bytes"], wr
        parent_stats["rd_bytes"], parent_stats["rd_operations"] = stats["rd_bytes"], rd
        return {
            "device": self.device,
            "parent": {
                "stats": parent_stats,
                "node-name": self.parent_node,
                "driver-specific": {
                    "discard-bytes-ok": 0,
                    "discard-nb-ok": 0,
                    "driver": "file",
                    "discard-nb-failed": 0,
                },
            },
            "stats": stats,
            "node-name": self.node_name,
            "qdev": self.qdev,
        }

    def query_block(self) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if self.iostatus_enabled:
            entry["io-status"] = self.io_status
        entry["device"] = self.device
        entry["locked"] = False
        entry["removable"] = False
        entry["inserted"] = {
            "iops_rd": 0,
            "detect_zeroes": "off",
            "image": {
                "virtual-size": self.spec.size,
                "filename": self.filename,
                "format": "raw",
                "actual-size": 0,
                "dirty-flag": False,
            },
            "iops_wr": 0,
            "ro": False,
            "node-name": self.node_name,
            "backing_file_depth": 0,
            "drv": "raw",
            "iops": 0,
            "bps_wr": 0,
            "write_threshold": 0,
            "encrypted": False,
            "bps": 0,
            "bps_rd": 0,
            "cache": {"no-flush": False, "direct": True, "writeback": True},
            "file": self.filename,
        }
        entry["qdev"] = self.qdev
        entry["type"] = "unknown"
        return entry
