"""The metric collectors an operator switches on and off, node_exporter style.

Every series the exporter exposes is paid for on every host of a fleet, in the Prometheus (or
Mimir, Thanos, VictoriaMetrics) that stores them all.  The default page holds what the shipped
alerts, the status page and the dashboards' default panels need (under 10 samples per healthy
disk); everything else sits behind a collector of its own, switched with
``--collector.NAME`` / ``--no-collector.NAME`` / ``--collector.disable-defaults`` or the
``collectors:`` section of the config file.  docs/metrics.md has the table of what each adds.

Pure data: imported by the configuration and the metrics alike, it imports nothing of the
exporter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CollectorInfo:
    name: str
    default: bool
    help: str


#: Every collector, in the order ``--help`` and docs/metrics.md list them.
COLLECTORS: dict[str, CollectorInfo] = {
    c.name: c
    for c in (
        CollectorInfo("vm", True, "per VM: QMP session (or libvirt) up, metadata, run state"),
        CollectorInfo("policy", True, "per disk: error policy, retry_interval/retry_timeout, policy verdict"),
        CollectorInfo(
            "hang", True, "per disk: hanging/failing now, duration, deadline, hangs by outcome, IO errors"
        ),
        CollectorInfo("backend", True, "per storage backend: disks, hanging/failing disks, affected VMs"),
        CollectorInfo("libvirt", True, "per libvirt connection: up, connect and call errors"),
        CollectorInfo(
            "process", True, "the exporter's own process and garbage collector (process_*, python_gc_*)"
        ),
        CollectorInfo(
            "blockstats",
            False,
            "per disk: query-blockstats bytes, operations, failures, times, idle (12 series)",
        ),
        CollectorInfo(
            "session", False, "per VM: the exporter's QMP connects, errors, commands and events received"
        ),
        CollectorInfo("hangtime", False, "per disk: seconds spent hanging, completed and current hangs"),
        CollectorInfo("feature", False, "per VM: whether its QEMU supports the retry policy"),
    )
}
DEFAULT_COLLECTORS = frozenset(name for name, c in COLLECTORS.items() if c.default)


class UnknownCollector(ValueError):
    """A collector name that does not exist; the message lists the names that do."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} is not a collector (one of {', '.join(COLLECTORS)})")
        self.name = name


def resolve(switches: Mapping[str, bool], disable_defaults: bool = False) -> frozenset[str]:
    """The enabled collectors: the defaults (none with ``disable_defaults``), then each switch
    (True on, False off).  Raises `UnknownCollector` for a name that is not one."""
    enabled = set() if disable_defaults else set(DEFAULT_COLLECTORS)
    for name, on in switches.items():
        if name not in COLLECTORS:
            raise UnknownCollector(name)
        if on:
            enabled.add(name)
        else:
            enabled.discard(name)
    return frozenset(enabled)
