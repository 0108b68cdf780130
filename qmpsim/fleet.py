"""Fleet files (YAML) and the fleet runner: many SimVMs, storage-fault schedules, hung sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .monitor import HungServer
from .spec import DiskSpec, SimConfigError
from .vm import SimVM


class FleetError(Exception):
    """A bad fleet file; the message names the file and the key."""


@dataclass
class ScheduleEntry:
    at: float
    disk: str
    link: str
    in_flight: int | None = None
    operations: tuple[str, ...] | None = None
    repeat_every: float | None = None


@dataclass
class VMConfig:
    name: str
    socket: str
    retry_feature: bool = True
    disks: list[DiskSpec] = field(default_factory=list)
    schedule: list[ScheduleEntry] = field(default_factory=list)
    hung: bool = False
    uuid: str | None = None
    extra_sockets: list[str] = field(default_factory=list)


@dataclass
class FleetConfig:
    socket_dir: str
    vms: list[VMConfig]


_VM_KEYS = {"name", "socket", "retry_feature", "disks", "schedule", "hung", "uuid", "extra_sockets"}
_SCHED_KEYS = {"at", "disk", "link", "in_flight", "operations", "repeat_every"}


def _num(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FleetError(f"{where}: must be a number")
    if value < 0 or (positive and value == 0):
        raise FleetError(f"{where}: must be {'> 0' if positive else '>= 0'}")
    return float(value)


def parse_fleet(data: Any, source: str = "<fleet>") -> FleetConfig:
    """Validate a fleet mapping; errors are :class:`FleetError` naming ``source`` and key."""
    if not isinstance(data, dict):
        raise FleetError(f"{source}: top level must be a mapping with 'socket_dir' and 'vms'")
    unknown = sorted(set(data) - {"socket_dir", "vms"})
    if unknown:
        raise FleetError(f"{source}: {unknown[0]}: unknown key")
    socket_dir = data.get("socket_dir")
    if not isinstance(socket_dir, str) or not socket_dir:
        raise FleetError(f"{source}: socket_dir: required string")
    vms_raw = data.get("vms")
    if not isinstance(vms_raw, list) or not vms_raw:
        raise FleetError(f"{source}: vms: required non-empty list")
    vms: list[VMConfig] = []
    names: set[str] = set()
    sockets: set[str] = set()
    for i, raw in enumerate(vms_raw):
        where = f"{source}: vms[{i}]"
        if not isinstance(raw, dict):
            raise FleetError(f"{where}: must be a mapping")
        unknown = sorted(set(raw) - _VM_KEYS)
        if unknown:
            raise FleetError(f"{where}.{unknown[0]}: unknown key")
        name = raw.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise FleetError(f"{where}.name: required string without '/'")
        if name in names:
            raise FleetError(f"{where}.name: duplicate VM name {name!r}")
        names.add(name)
        sock = raw.get("socket", os.path.join(socket_dir, f"{name}.qmp"))
        if not isinstance(sock, str) or len(sock.encode()) >= 108:
            raise FleetError(f"{where}.socket: must be a unix socket path under 108 bytes")
        if sock in sockets:
            raise FleetError(f"{where}.socket: duplicate socket {sock!r}")
        sockets.add(sock)
        extra = raw.get("extra_sockets", [])
        if not isinstance(extra, list) or not all(isinstance(s, str) for s in extra):
            raise FleetError(f"{where}.extra_sockets: must be a list of paths")
        retry_feature = raw.get("retry_feature", True)
        if not isinstance(retry_feature, bool):
            raise FleetError(f"{where}.retry_feature: must be true or false")
        hung = raw.get("hung", False)
        if not isinstance(hung, bool):
            raise FleetError(f"{where}.hung: must be true or false")
        disks_raw = raw.get("disks", [])
        if not isinstance(disks_raw, list):
            raise FleetError(f"{where}.disks: must be a list")
        disks: list[DiskSpec] = []
        for j, draw in enumerate(disks_raw):
            dwhere = f"{where}.disks[{j}]"
            if not isinstance(draw, dict):
                raise FleetError(f"{dwhere}: must be a mapping")
            try:
                spec = DiskSpec.from_dict(draw)
                spec.validate(retry_feature)
            except (SimConfigError, TypeError) as e:
                raise FleetError(f"{dwhere}: {e}") from None
            if any(d.id == spec.id for d in disks):
                raise FleetError(f"{dwhere}.id: duplicate disk id {spec.id!r}")
            disks.append(spec)
        sched_raw = raw.get("schedule", [])
        if not isinstance(sched_raw, list):
            raise FleetError(f"{where}.schedule: must be a list")
        schedule: list[ScheduleEntry] = []
        for k, sraw in enumerate(sched_raw):
            swhere = f"{where}.schedule[{k}]"
            if not isinstance(sraw, dict):
                raise FleetError(f"{swhere}: must be a mapping")
            unknown = sorted(set(sraw) - _SCHED_KEYS)
            if unknown:
                raise FleetError(f"{swhere}.{unknown[0]}: unknown key")
            at = _num(sraw.get("at"), f"{swhere}.at")
            disk = sraw.get("disk")
            if not any(d.id == disk for d in disks):
                raise FleetError(f"{swhere}.disk: no disk {disk!r} in this VM")
            link = sraw.get("link")
            if link not in ("down", "up"):
                raise FleetError(f"{swhere}.link: must be 'down' or 'up'")
            in_flight = sraw.get("in_flight")
            if in_flight is not None and (
                isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 0
            ):
                raise FleetError(f"{swhere}.in_flight: must be an integer >= 0")
            ops = sraw.get("operations")
            if ops is not None:
                ops = (ops,) if isinstance(ops, str) else tuple(ops)
                if not ops or any(o not in ("read", "write") for o in ops):
                    raise FleetError(f"{swhere}.operations: must be read and/or write")
            repeat = sraw.get("repeat_every")
            rep = None if repeat is None else _num(repeat, f"{swhere}.repeat_every", True)
            schedule.append(ScheduleEntry(at, str(disk), link, in_flight, ops, rep))
        uuid = raw.get("uuid")
        if uuid is not None and not isinstance(uuid, str):
            raise FleetError(f"{where}.uuid: must be a string")
        vms.append(VMConfig(name, sock, retry_feature, disks, schedule, hung, uuid, list(extra)))
    return FleetConfig(socket_dir, vms)


def load_fleet(path: str) -> FleetConfig:
    """Read and validate a fleet YAML file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise FleetError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise FleetError(f"{path}:{line} invalid YAML") from None
    return parse_fleet(data, path)


def generate_fleet(
    n: int,
    disks: int,
    socket_dir: str,
    interval_ms: int = 1000,
    timeout_ms: int = 10000,
    in_flight: int = 1,
) -> FleetConfig:
    """``n`` compliant VMs, each with ``disks`` virtio-blk disks, werror/rerror=retry."""
    vms = []
    for i in range(n):
        name = f"vm{i:04d}"
        specs = [
            DiskSpec(
                id=f"virtio-disk{j}",
                werror="retry",
                rerror="retry",
                retry_interval_ms=interval_ms,
                retry_timeout_ms=timeout_ms,
                in_flight=in_flight,
            )
            for j in range(disks)
        ]
        vms.append(VMConfig(name, os.path.join(socket_dir, f"{name}.qmp"), True, specs))
    return FleetConfig(socket_dir, vms)


class Fleet:
    """Runs a :class:`FleetConfig` in the current event loop."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.vms: dict[str, SimVM] = {}
        self.hung: dict[str, HungServer] = {}
        self.configs = {vm.name: vm for vm in config.vms}
        self._tasks: list[asyncio.Task[None]] = []
        for vc in config.vms:
            if vc.hung:
                self.hung[vc.name] = HungServer(vc.socket)
            else:
                self.vms[vc.name] = SimVM(
                    vc.socket,
                    name=vc.name,
                    uuid=vc.uuid,
                    retry_feature=vc.retry_feature,
                    disks=vc.disks,
                    extra_sockets=vc.extra_sockets,
                )

    async def start(self) -> None:
        os.makedirs(self.config.socket_dir, exist_ok=True)
        for hs in self.hung.values():
            await hs.start()
        for vm in self.vms.values():
            await vm.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for vc in self.config.vms:
            sim = self.vms.get(vc.name)
            if sim is None:
                continue
            for entry in vc.schedule:
                self._tasks.append(asyncio.create_task(self._run_schedule(sim, entry, t0)))

    async def _run_schedule(self, vm: SimVM, entry: ScheduleEntry, t0: float) -> None:
        loop = asyncio.get_running_loop()
        when = t0 + entry.at
        while True:
            await asyncio.sleep(max(0.0, when - loop.time()))
            if vm.started and entry.disk in vm.disks:
                if entry.link == "down":
                    vm.link_down(entry.disk, entry.in_flight, entry.operations)
                else:
                    vm.link_up(entry.disk)
            if entry.repeat_every is None:
                return
            when += entry.repeat_every

    async def stop(self, graceful: bool = True) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for vm in self.vms.values():
            if graceful:
                await vm.shutdown()
            else:
                await vm.kill()
        for hs in self.hung.values():
            await hs.stop()
