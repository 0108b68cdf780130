"""A simulated QEMU VM: QMP commands, events and the openEuler retry state machine."""

from __future__ import annotations

import asyncio
import json
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .disk import Disk, Group
from .monitor import EOL, Connection, EventKey, Monitor, QMPError
from .qemu_data import device_properties_72
from .spec import DEFAULT_RETRY_INTERVAL_MS, DEFAULT_RETRY_TIMEOUT_MS, DiskSpec, SimConfigError

RETRY_VERSION = ((8, 2, 0), "qemu-8.2.0-openEuler")
UPSTREAM_VERSION = ((7, 2, 22), "Debian 1:7.2+dfsg-7+deb12u18+b3")

#: a looping guest resubmits a failed (reported) request after this think time: ~20/s
DEFAULT_THINK_S = 0.05

_TYPENAME = {"virtio-blk": "virtio-blk-pci", "scsi-hd": "scsi-hd"}

# command -> (required args, optional args)
_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "qmp_capabilities": ((), ("enable",)),
    "query-name": ((), ()),
    "query-uuid": ((), ()),
    "query-version": ((), ()),
    "query-status": ((), ()),
    "query-block": ((), ()),
    "query-blockstats": ((), ("query-nodes", "flat")),
    "query-commands": ((), ()),
    "qom-get": (("path", "property"), ()),
    "qom-list": (("path",), ()),
    "device-list-properties": (("typename",), ()),
    "cont": ((), ()),
    "stop": ((), ()),
    "system_reset": ((), ()),
    "quit": ((), ()),
    "device_del": (("id",), ()),
}


def _retry_props() -> list[dict[str, Any]]:
    return [
        {"default-value": DEFAULT_RETRY_INTERVAL_MS, "name": "retry_interval",
         "type": "BlockdevRetryInterval"},
        {"default-value": DEFAULT_RETRY_TIMEOUT_MS, "name": "retry_timeout",
         "type": "BlockdevRetryTimeout"},
    ]  # fmt: skip


class SimVM:
    """One simulated QEMU process with its QMP socket(s).

    ``retry_feature``: openEuler QEMU with werror/rerror=retry (default version 8.2.0);
    without it the VM looks like upstream QEMU 7.2.22 and rejects ``retry``.
    """

    def __init__(
        self,
        socket_path: str,
        name: str | None = None,
        uuid: str | None = None,
        retry_feature: bool = True,
        disks: Iterable[DiskSpec] = (),
        extra_sockets: Sequence[str] = (),
        version: tuple[int, int, int] | None = None,
        package: str | None = None,
        think_time_s: float = DEFAULT_THINK_S,
    ) -> None:
        self.socket_path = socket_path
        self.name = name
        self.uuid = uuid or (
            str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"qmpsim:{name}"))
            if name
            else "00000000-0000-0000-0000-000000000000"
        )
        self.retry_feature = retry_feature
        default_version = RETRY_VERSION if retry_feature else UPSTREAM_VERSION
        self.version = version or default_version[0]
        self.package = package if package is not None else default_version[1]
        self.think_time_s = think_time_s
        self.status = "running"
        self.disks: dict[str, Disk] = {}
        self._node_counter = 131
        self._emitted: Counter[EventKey] = Counter()
        self.monitors = [Monitor(self, p) for p in (socket_path, *extra_sockets)]
        self.started = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_exit: Callable[[SimVM], None] | None = None
        for spec in disks:
            self._add_disk(spec)

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self.status == "running"

    async def start(self) -> None:
        """Listen on the QMP socket(s) (a stale socket file is removed first)."""
        if self.started:
            return
        self.status = "running"
        for mon in self.monitors:
            await mon.start()
        self.started = True
        self._resume_io()

    async def shutdown(self, reason: str = "host-signal") -> None:
        """Exit like QEMU on SIGTERM: SHUTDOWN event, then close and remove the socket(s)."""
        if not self.started:
            return
        self._emit("SHUTDOWN", json.dumps({"guest": False, "reason": reason}))
        await self._terminate(abort=False)

    async def kill(self) -> None:
        """Exit like QEMU on SIGKILL: connections reset, socket file removed, no event."""
        if self.started:
            await self._terminate(abort=True)

    async def _terminate(self, abort: bool) -> None:
        self.started = False
        self._freeze_io()
        self.status = "shutdown"
        for mon in self.monitors:
            await mon.close(abort=abort)
        if self.on_exit is not None:
            self.on_exit(self)

    async def __aenter__(self) -> SimVM:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    # ------------------------------------------------------------------ storage faults
    def disk(self, disk_id: str) -> Disk:
        try:
            return self.disks[disk_id]
        except KeyError:
            raise KeyError(f"VM {self.name or self.socket_path} has no disk {disk_id!r}") from None

    def link_down(
        self,
        disk_id: str,
        in_flight: int | None = None,
        operations: Sequence[str] | None = None,
    ) -> None:
        """The disk's storage starts failing every IO; the guest keeps ``in_flight`` requests
        per operation in flight (default: the DiskSpec workload)."""
        d = self.disk(disk_id)
        now = asyncio.get_running_loop().time()
        if in_flight is not None or operations is not None:
            for g in d.groups.values():
                d.fold(g, now)
            n = d.spec.in_flight if in_flight is None else in_flight
            ops = tuple(operations) if operations is not None else d.spec.operations
            for op in ops:
                if op not in ("read", "write"):
                    raise SimConfigError(f"operation must be 'read' or 'write', not {op!r}")
            d.set_workload(n, ops)
            if self.running and self.started:
                for g in d.groups.values():
                    if g.mode == "healthy":
                        g.active_since = now
        d.link_up = False
        for g in d.groups.values():
            if g.mode == "healthy" and g.n:
                self._submit(g, now)

    def link_up(self, disk_id: str) -> None:
        """The storage is back: the next attempt of every held request succeeds (silently)."""
        self.disk(disk_id).link_up = True

    def _submit(self, g: Group, now: float) -> None:
        """The healthy group's next IO will hit the (now failing) storage at once."""
        g.disk.fold(g, now)
        g.mode = "held"
        if self.running and self.started:
            g.handle = asyncio.get_running_loop().call_soon(self._attempt, g)
        else:
            g.pending = True

    def _attempt(self, g: Group) -> None:
        g.handle = None
        d = g.disk
        if not (self.running and self.started) or d.id not in self.disks:
            g.pending = True
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if d.link_up:
            d.ops[g.op] += g.n
            d.last_io = now
            d.err_start = None
            g.mode = "healthy"
            g.active_since = now
            return
        policy = d.policy(g.op)
        action = policy
        if policy == "retry":
            if d.err_start is None:
                d.err_start = now
            if d.timeout_s > 0 and now >= d.err_start + d.timeout_s:
                action = "report"
        elif policy == "enospc":
            action = "report"  # EIO, not ENOSPC
        self._emit(
            "BLOCK_IO_ERROR",
            d.event_data(g.op, action),
            g.n,
            device=d.id,
            action=action,
            operation=g.op,
        )
        if not d.is_virtio:
            d.failed[g.op] += g.n  # scsi-hd accounts every failed attempt
        d.last_io = now
        if action == "retry":
            g.handle = loop.call_at(now + d.interval_s, self._attempt, g)
        elif action == "report":
            if d.is_virtio:
                d.failed[g.op] += g.n
            g.mode = "think"
            g.handle = loop.call_at(now + self.think_time_s, self._attempt, g)
        elif action == "ignore":
            d.ops[g.op] += g.n
            g.mode = "think"
            g.handle = loop.call_at(now + self.think_time_s, self._attempt, g)
        else:  # stop
            g.mode = "stopped"
            g.pending = True
            if d.iostatus_enabled:
                d.io_status = "failed"
            self._vm_stop("io-error")

    def _freeze_io(self) -> None:
        now = asyncio.get_running_loop().time()
        for d in self.disks.values():
            for g in d.groups.values():
                if g.mode == "healthy":
                    d.fold(g, now)
                elif g.handle is not None:
                    g.cancel()
                    g.pending = True

    def _resume_io(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for d in self.disks.values():
            for g in d.groups.values():
                if g.mode == "healthy":
                    if d.link_up:
                        g.active_since = now
                    elif g.n:
                        self._submit(g, now)
                elif g.pending:
                    g.pending = False
                    g.mode = "held"
                    g.handle = loop.call_soon(self._attempt, g)

    def _vm_stop(self, status: str) -> None:
        if not self.running:
            return
        self.status = status
        self._freeze_io()
        self._emit("STOP")

    def _vm_cont(self) -> None:
        if self.running:
            return
        self.status = "running"
        for d in self.disks.values():
            # qmp_cont resets the iostatus of monitor-owned (-drive) backends only
            if d.spec.naming == "drive":
                d.io_status = "ok"
        self._emit("RESUME")
        self._resume_io()

    # ------------------------------------------------------------------ hotplug
    def _add_disk(self, spec: DiskSpec) -> Disk:
        spec.validate(self.retry_feature)
        if spec.id in self.disks:
            raise SimConfigError(f"Duplicate ID '{spec.id}' for device")
        node, parent = f"#block{self._node_counter:03d}", f"#block{self._node_counter + 1:03d}"
        self._node_counter += 17
        d = Disk(spec, node, parent, self.retry_feature)
        self.disks[spec.id] = d
        return d

    def hot_plug(self, spec: DiskSpec) -> None:
        """device_add: the disk appears (QEMU emits no event for it)."""
        d = self._add_disk(spec)
        if self.started and self.running:
            now = asyncio.get_running_loop().time()
            for g in d.groups.values():
                g.active_since = now

    def hot_unplug(self, disk_id: str) -> None:
        """device_del completed: DEVICE_DELETED event(s) like QEMU, the disk disappears."""
        d = self.disk(disk_id)
        for g in d.groups.values():
            g.cancel()
        del self.disks[disk_id]
        path = f"/machine/peripheral/{disk_id}"
        if d.is_virtio:
            self._emit("DEVICE_DELETED", json.dumps({"path": f"{path}/virtio-backend"}), device=disk_id)
        self._emit("DEVICE_DELETED", json.dumps({"device": disk_id, "path": path}), device=disk_id)

    # ------------------------------------------------------------------ events
    def _emit(
        self,
        name: str,
        data: str | None = None,
        n: int = 1,
        device: str | None = None,
        action: str | None = None,
        operation: str | None = None,
    ) -> None:
        t = time.time()
        sec = int(t)
        usec = int((t - sec) * 1_000_000)
        if data is None:
            line = f'{{"timestamp": {{"seconds": {sec}, "microseconds": {usec}}}, "event": "{name}"}}{EOL}'
        else:
            line = (
                f'{{"timestamp": {{"seconds": {sec}, "microseconds": {usec}}}, '
                f'"event": "{name}", "data": {data}}}{EOL}'
            )
        key: EventKey = (name, device, action, operation)
        self._emitted[key] += n
        for mon in self.monitors:
            mon.send_event(line, n, key)

    def event_count(
        self,
        event: str | None = "BLOCK_IO_ERROR",
        device: str | None = None,
        action: str | None = None,
        operation: str | None = None,
        socket: str | None = None,
    ) -> int:
        """Events emitted so far matching the filters (None = any).

        ``device`` is the disk's qdev id.  With ``socket`` (a monitor path), count only the
        events actually written to a negotiated client of that monitor.
        """
        counter = self._emitted
        if socket is not None:
            counter = next(m.delivered for m in self.monitors if m.path == socket)
        total = 0
        for (ev, dev, act, op), n in counter.items():
            if (
                (event is None or ev == event)
                and (device is None or dev == device)
                and (action is None or act == action)
                and (operation is None or op == operation)
            ):
                total += n
        return total

    def delivered_count(self, event: str = "BLOCK_IO_ERROR") -> int:
        """Events of this name written to negotiated clients, over every monitor: what a client
        connected since before the first of them must have received."""
        return sum(
            n for m in self.monitors for (ev, _dev, _act, _op), n in m.delivered.items() if ev == event
        )

    def event_counts(self) -> list[dict[str, Any]]:
        """All emitted-event counters, one dict per (event, device, action, operation)."""
        return [
            {"event": ev, "device": dev, "action": act, "operation": op, "count": n}
            for (ev, dev, act, op), n in sorted(
                self._emitted.items(), key=lambda kv: tuple(str(x) for x in kv[0])
            )
        ]

    # ------------------------------------------------------------------ QMP
    def greeting(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": self.package,
                },
                "capabilities": ["oob"],
            }
        }

    def dispatch(self, conn: Connection, obj: Any) -> None:
        if not isinstance(obj, dict):
            conn.send(_err("GenericError", "QMP input must be a JSON object"))
            return
        has_id = "id" in obj
        ident = obj.get("id")
        try:
            for key in obj:
                if key not in ("execute", "arguments", "id"):
                    raise QMPError("GenericError", f"QMP input member '{key}' is unexpected")
            if "execute" not in obj:
                raise QMPError("GenericError", "QMP input lacks member 'execute'")
            cmd = obj["execute"]
            if not isinstance(cmd, str):
                raise QMPError("GenericError", "QMP input member 'execute' must be a string")
            args = obj.get("arguments", {})
            if not isinstance(args, dict):
                raise QMPError("GenericError", "QMP input member 'arguments' must be an object")
            if not conn.negotiated:
                if cmd != "qmp_capabilities":
                    raise QMPError(
                        "CommandNotFound",
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )
            elif cmd == "qmp_capabilities":
                raise QMPError(
                    "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
                )
            spec = _ARGS.get(cmd)
            if spec is None:
                raise QMPError("CommandNotFound", f"The command {cmd} has not been found")
            required, optional = spec
            for name in required:
                if name not in args:
                    raise QMPError("GenericError", f"Parameter '{name}' is missing")
            for name in args:
                if name not in required and name not in optional:
                    raise QMPError("GenericError", f"Parameter '{name}' is unexpected")
            handler = getattr(self, "_cmd_" + cmd.replace("-", "_"))
            result = handler(conn, args)
        except QMPError as e:
            reply: dict[str, Any] = {}
            if has_id:
                reply["id"] = ident
            reply["error"] = {"class": e.cls, "desc": e.desc}
            conn.send(reply)
            return
        reply = {"return": result}
        if has_id:
            reply["id"] = ident
        conn.send(reply)
        if cmd == "quit":
            task = asyncio.ensure_future(self._terminate(abort=False))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _str_arg(args: dict[str, Any], name: str) -> str:
        value = args[name]
        if not isinstance(value, str):
            raise QMPError("GenericError", f"Invalid parameter type for '{name}', expected: string")
        return value

    def _cmd_qmp_capabilities(self, conn: Connection, args: dict[str, Any]) -> Any:
        for cap in args.get("enable", []):
            if cap != "oob":
                raise QMPError("GenericError", f"Parameter 'enable' does not accept value '{cap}'")
        conn.negotiated = True
        return {}

    def _cmd_query_name(self, conn: Connection, args: dict[str, Any]) -> Any:
        return {"name": self.name} if self.name else {}

    def _cmd_query_uuid(self, conn: Connection, args: dict[str, Any]) -> Any:
        return {"UUID": self.uuid}

    def _cmd_query_version(self, conn: Connection, args: dict[str, Any]) -> Any:
        return self.greeting()["QMP"]["version"]

    def _cmd_query_status(self, conn: Connection, args: dict[str, Any]) -> Any:
        return {"status": self.status, "singlestep": False, "running": self.running}

    def _cmd_query_block(self, conn: Connection, args: dict[str, Any]) -> Any:
        return [d.query_block() for d in self.disks.values()]

    def _cmd_query_blockstats(self, conn: Connection, args: dict[str, Any]) -> Any:
        now = asyncio.get_running_loop().time()
        return [d.blockstats(now) for d in self.disks.values()]

    def _cmd_query_commands(self, conn: Connection, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in _ARGS]

    def _resolve(self, path: str) -> tuple[Disk | None, str]:
        """QOM path -> (disk, QOM typename); (None, "") for the /machine/peripheral container."""
        prefix = "/machine/peripheral"
        if path.rstrip("/") == prefix:
            return None, ""
        if path.startswith(prefix + "/"):
            rest = path[len(prefix) + 1 :].split("/")
            d = self.disks.get(rest[0])
            if d is not None:
                if len(rest) == 1:
                    return d, _TYPENAME[d.spec.type]
                if len(rest) == 2 and rest[1] == "virtio-backend" and d.is_virtio:
                    return d, "virtio-blk-device"
        raise QMPError("DeviceNotFound", f"Device '{path}' not found")

    def _cmd_qom_get(self, conn: Connection, args: dict[str, Any]) -> Any:
        path, prop = self._str_arg(args, "path"), self._str_arg(args, "property")
        d, typename = self._resolve(path)
        if d is None:
            if prop == "type":
                return "container"
            raise QMPError("GenericError", f"Property 'container.{prop}' not found")
        values: dict[str, Any] = {
            "type": typename,
            "realized": True,
            "hotpluggable": True,
            "hotplugged": False,
            "drive": d.device or d.node_name,
            "werror": d.dev_werror,
            "rerror": d.dev_rerror,
        }
        if self.retry_feature:
            values["retry_interval"] = d.dev_interval
            values["retry_timeout"] = d.dev_timeout
        if prop not in values:
            raise QMPError("GenericError", f"Property '{typename}.{prop}' not found")
        return values[prop]

    def _cmd_qom_list(self, conn: Connection, args: dict[str, Any]) -> Any:
        path = self._str_arg(args, "path")
        d, typename = self._resolve(path)
        if d is None:
            out = [{"name": "type", "type": "string"}]
            scsi_done = False
            for disk in self.disks.values():
                if not disk.is_virtio and not scsi_done:
                    out.append({"name": "scsi0", "type": "child<virtio-scsi-pci>"})
                    scsi_done = True
                out.append({"name": disk.id, "type": f"child<{_TYPENAME[disk.spec.type]}>"})
            return out
        out = [
            {"name": "type", "type": "string"},
            {"name": "parent_bus", "type": "link<bus>"},
            {"name": "realized", "type": "bool"},
            {"name": "hotplugged", "type": "bool"},
            {"name": "hotpluggable", "type": "bool"},
            {"name": "drive", "type": "str"},
            {"name": "werror", "type": "BlockdevOnError"},
            {"name": "rerror", "type": "BlockdevOnError"},
        ]
        if self.retry_feature:
            out.append({"name": "retry_interval", "type": "BlockdevRetryInterval"})
            out.append({"name": "retry_timeout", "type": "BlockdevRetryTimeout"})
        if typename == "virtio-blk-pci":
            out.append({"name": "virtio-backend", "type": "child<virtio-blk-device>"})
        return out

    def _cmd_device_list_properties(self, conn: Connection, args: dict[str, Any]) -> Any:
        typename = self._str_arg(args, "typename")
        props = device_properties_72(typename)
        if props is None:
            raise QMPError("DeviceNotFound", f"Device '{typename}' not found")
        if self.retry_feature:
            at = next(i for i, p in enumerate(props) if p["name"] == "rerror") + 1
            props[at:at] = _retry_props()
            for p in props:
                if p["name"] in ("werror", "rerror"):
                    p["description"] = "Error handling policy, report/ignore/enospc/stop/retry/auto"
        return props

    def _cmd_cont(self, conn: Connection, args: dict[str, Any]) -> Any:
        self._vm_cont()
        return {}

    def _cmd_stop(self, conn: Connection, args: dict[str, Any]) -> Any:
        self._vm_stop("paused")
        return {}

    def _cmd_system_reset(self, conn: Connection, args: dict[str, Any]) -> Any:
        self._emit("RESET", json.dumps({"guest": False, "reason": "host-qmp-system-reset"}))
        return {}

    def _cmd_quit(self, conn: Connection, args: dict[str, Any]) -> Any:
        self._emit("SHUTDOWN", json.dumps({"guest": False, "reason": "host-qmp-quit"}))
        return {}

    def _cmd_device_del(self, conn: Connection, args: dict[str, Any]) -> Any:
        dev_id = self._str_arg(args, "id")
        if dev_id not in self.disks:
            raise QMPError("DeviceNotFound", f"Device '{dev_id}' not found")
        # the reply comes first, DEVICE_DELETED once the guest released the device
        asyncio.get_running_loop().call_later(0.01, self._unplug_if_present, dev_id)
        return {}

    def _unplug_if_present(self, dev_id: str) -> None:
        if dev_id in self.disks and self.started:
            self.hot_unplug(dev_id)


def _err(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
