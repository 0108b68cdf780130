"""What libvirt reports, in the model's words: pure, no I/O, no libvirt binding.

The libvirt source and ``qemu-iohang-check --libvirt.uri`` must describe a domain exactly as
QMP mode describes a VM (same run-state words, same disk identities, same backends), so that
alerts and dashboards read both sources alike.  The translation lives here, apart from the
connection that fetches the data (`exporter.libvirt.source`, `exporter.libvirt.calls`), so it
can be read and tested without a libvirtd.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from exporter.config import Config
from exporter.libvirt.domxml import Domain
from exporter.model.disk_source import source_from_libvirt
from exporter.model.events import BlockIOError, BlockIOErrorRun, VMEvent, decode
from exporter.model.policy import verify
from exporter.model.state import BlockStats, Disk, VMState, uint64
from exporter.storage import BackendResolver

# libvirt constants, spelled out so this module imports without the binding (tests, mypy).
_STATE_RUNNING, _STATE_BLOCKED, _STATE_PAUSED = 1, 2, 3
_STATE_SHUTDOWN, _STATE_SHUTOFF, _STATE_CRASHED, _STATE_PMSUSPENDED = 4, 5, 6, 7
_PAUSED_IOERROR = 5

#: A coalesced run as the source holds it: (count, first timestamp, largest gap); None: one event.
Span = tuple[int, float, float] | None


def run_state(state: int, reason: int) -> str:
    """libvirt's (state, reason) in QMP ``query-status`` words, so alerts and dashboards read
    both sources alike."""
    if state in (_STATE_RUNNING, _STATE_BLOCKED):
        return "running"
    if state == _STATE_PAUSED:
        return "io-error" if reason == _PAUSED_IOERROR else "paused"
    if state in (_STATE_SHUTDOWN, _STATE_SHUTOFF):
        return "shutdown"
    if state == _STATE_CRASHED:
        return "guest-panicked"
    if state == _STATE_PMSUSPENDED:
        return "suspended"
    return ""


def paused_on_io_error(stats: Mapping[str, Any] | None) -> bool:
    """Whether ``getAllDomainStats``' state fields say the domain is paused on an IO error
    (only then are its disk errors worth one more call)."""
    if not stats:
        return False
    return stats.get("state.state") == _STATE_PAUSED and stats.get("state.reason") == _PAUSED_IOERROR


def blockstats_by_target(stats: Mapping[str, Any]) -> dict[str, BlockStats]:
    """``getAllDomainStats`` block fields (``block.N.name``, ``block.N.rd.reqs``...) by target
    (``vda``).  libvirt has no failed-operation counters; those stay 0."""

    def i(key: str) -> int:
        return uint64(stats, key)

    out: dict[str, BlockStats] = {}
    for n in range(min(i("block.count"), 4096)):
        p = f"block.{n}."
        name = stats.get(p + "name")
        if not isinstance(name, str) or name in out:
            continue  # backing-chain entries repeat the name; the first is the top image
        out[name] = BlockStats(
            read_bytes=i(p + "rd.bytes"),
            written_bytes=i(p + "wr.bytes"),
            read_ops=i(p + "rd.reqs"),
            write_ops=i(p + "wr.reqs"),
            flush_ops=i(p + "fl.reqs"),
            read_time_s=i(p + "rd.times") / 1e9,
            write_time_s=i(p + "wr.times") / 1e9,
            flush_time_s=i(p + "fl.times") / 1e9,
        )
    return out


def model_disks(domain: Domain, config: Config, backends: BackendResolver | None = None) -> dict[str, Disk]:
    """The parsed domain's disks as the model's `Disk`: the alias is the QEMU device id (the
    ``device`` label), the node names libvirt gives the chain identify it in events, the
    ``<source>`` its storage backend."""
    disks: dict[str, Disk] = {}
    resolver = backends or BackendResolver(config)
    for d in domain.disks:
        s = d.source
        source = source_from_libvirt(s.kind, s.protocol, s.hosts, s.name, s.path, s.pool)
        policy = d.policy()
        nodes = tuple(n for i in d.indexes for n in (f"libvirt-{i}-format", f"libvirt-{i}-storage"))
        qom = f"/machine/peripheral/{d.alias}"
        disks[d.alias] = Disk(
            device=d.alias,
            drive=f"drive-{d.alias}",  # libvirt without -blockdev names the drive so
            node_name=nodes[0] if nodes else "",
            qdev=f"{qom}/virtio-backend" if d.kind == "virtio-blk" else d.alias,
            qom_path=qom,
            qdev_type=d.kind,
            policy=policy,
            verdict=verify(policy, config.policy),
            other_nodes=nodes[1:],
            backend=resolver.backend(source),
        )
    return disks


def qemu_version(v: int) -> str:
    """``virConnectGetVersion``'s major * 1,000,000 + minor * 1,000 + micro."""
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}" if v > 0 else ""


def event_data(details: Any) -> Any:
    """The event data libvirt forwards: QEMU's JSON text (or already a dict)."""
    if isinstance(details, str):
        try:
            return json.loads(details)
        except ValueError:
            return None
    return details


def typed_event(name: str, data: Any, time: float | None, span: Span, vm: VMState) -> VMEvent:
    """The model's event for what libvirt forwarded: one event, or a coalesced run."""
    typed = decode(name, data, time, vm.match_disk)
    if span is None or type(typed) is not BlockIOError or time is None:
        return typed
    count, first, max_gap = span
    return BlockIOErrorRun(time, typed.device, typed.operation, typed.action, count, first, max_gap)
