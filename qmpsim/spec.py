"""Disk configuration of a simulated VM, validated like QEMU validates ``-device`` options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POLICIES = ("retry", "stop", "report", "ignore", "enospc", "auto")
DISK_TYPES = ("virtio-blk", "scsi-hd")
NAMINGS = ("drive", "blockdev")
POLICY_ON = ("device", "drive")
OPERATIONS = ("read", "write")

#: device defaults of the openEuler retry properties (ms)
DEFAULT_RETRY_INTERVAL_MS = 1000
DEFAULT_RETRY_TIMEOUT_MS = 0


class SimConfigError(ValueError):
    """An invalid simulator configuration (the message mirrors QEMU's where QEMU has one)."""


@dataclass
class DiskSpec:
    """One disk: a qdev device (virtio-blk-pci or scsi-hd) plus its block backend.

    ``werror``/``rerror``/``retry_*`` are given on the device (``policy_on="device"``) or on
    ``-drive`` (``policy_on="drive"``: qom-get then shows ``auto`` and the device defaults
    1000/0, and the drive's werror/rerror act with the device defaults, as seen on openEuler
    QEMU 8.2).  ``in_flight``/``operations`` describe the guest workload: that many requests
    per operation are continuously in flight (a looping guest).
    """

    id: str
    type: str = "virtio-blk"
    werror: str = "auto"
    rerror: str = "auto"
    retry_interval_ms: int = DEFAULT_RETRY_INTERVAL_MS
    retry_timeout_ms: int = DEFAULT_RETRY_TIMEOUT_MS
    naming: str = "drive"
    drive: str | None = None
    node_name: str | None = None
    policy_on: str = "device"
    in_flight: int = 1
    operations: tuple[str, ...] = ("write",)
    size: int = 1073741824
    filename: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, retry_feature: bool) -> None:
        """Raise :class:`SimConfigError` when QEMU would refuse this configuration."""
        if not self.id or "/" in self.id:
            raise SimConfigError(f"Invalid disk id {self.id!r}")
        if self.type not in DISK_TYPES:
            raise SimConfigError(
                f"Disk {self.id}: type must be one of {', '.join(DISK_TYPES)}, not {self.type!r}"
            )
        if self.naming not in NAMINGS:
            raise SimConfigError(f"Disk {self.id}: naming must be 'drive' or 'blockdev'")
        if self.policy_on not in POLICY_ON:
            raise SimConfigError(f"Disk {self.id}: policy_on must be 'device' or 'drive'")
        for name in ("werror", "rerror"):
            value = getattr(self, name)
            if value not in POLICIES or (value == "retry" and not retry_feature):
                raise SimConfigError(f"Parameter '{name}' does not accept value '{value}'")
        if self.rerror == "enospc":
            raise SimConfigError("rerror policy 'enospc' is not supported")
        if self.policy_on == "drive" and "auto" in (self.werror, self.rerror):
            raise SimConfigError(f"Disk {self.id}: a -drive policy cannot be 'auto'")
        for name in ("retry_interval_ms", "retry_timeout_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SimConfigError(f"Disk {self.id}: {name} must be an integer >= 0")
        if self.retry_interval_ms == 0:
            raise SimConfigError(f"Disk {self.id}: retry_interval_ms must be > 0")
        if not isinstance(self.in_flight, int) or self.in_flight < 0:
            raise SimConfigError(f"Disk {self.id}: in_flight must be an integer >= 0")
        self.operations = tuple(self.operations)
        for op in self.operations:
            if op not in OPERATIONS:
                raise SimConfigError(f"Disk {self.id}: operation must be 'read' or 'write'")

    @property
    def drive_id(self) -> str:
        """The ``-drive id=`` (query-block ``device``) of a ``drive``-named disk."""
        return self.drive or f"drive-{self.id}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskSpec:
        """Build from a fleet-file mapping; unknown keys raise :class:`SimConfigError`."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SimConfigError(f"unknown disk key '{unknown[0]}'")
        if "id" not in data:
            raise SimConfigError("disk lacks key 'id'")
        args = dict(data)
        if "operations" in args:
            ops = args["operations"]
            args["operations"] = (ops,) if isinstance(ops, str) else tuple(ops)
        return cls(**args)
