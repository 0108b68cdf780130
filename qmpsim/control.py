"""HTTP control API of a running fleet (aiohttp), for tests, the demo and the benchmark."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .fleet import Fleet
from .spec import DiskSpec, SimConfigError
from .vm import SimVM

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _vm_summary(fleet: Fleet, name: str) -> dict[str, Any]:
    vc = fleet.configs.get(name)
    vm = fleet.vms.get(name)
    if vm is None:
        return {
            "name": name,
            "socket": vc.socket if vc else None,
            "hung": True,
            "status": "hung",
        }
    return {
        "name": name,
        "socket": vm.socket_path,
        "hung": False,
        "status": vm.status if vm.started else "exited",
        "retry_feature": vm.retry_feature,
        "disks": sorted(vm.disks),
        "block_io_errors": vm.event_count("BLOCK_IO_ERROR"),
        "block_io_errors_delivered": vm.delivered_count("BLOCK_IO_ERROR"),
        "events": vm.event_count(None),
    }


def _disk_detail(vm: SimVM) -> list[dict[str, Any]]:
    return [
        {
            "id": d.id,
            "type": d.spec.type,
            "link_up": d.link_up,
            "werror": d.eff_werror,
            "rerror": d.eff_rerror,
            "retry_interval_ms": d.dev_interval,
            "retry_timeout_ms": d.dev_timeout,
            "policy_on": d.spec.policy_on,
            "node_name": d.node_name,
            "device": d.device,
            "in_flight": {op: g.n for op, g in d.groups.items()},
        }
        for d in vm.disks.values()
    ]


def make_app(fleet: Fleet) -> web.Application:
    """Routes: see qmpsim/README.md."""
    routes = web.RouteTableDef()

    def get_vm(request: web.Request) -> SimVM:
        name = request.match_info["vm"]
        vm = fleet.vms.get(name)
        if vm is None:
            raise web.HTTPNotFound(text=f"no simulated VM {name!r}\n")
        return vm

    async def body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON\n") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object\n")
        return data

    @routes.get("/vms")
    async def list_vms(request: web.Request) -> web.StreamResponse:
        return web.json_response([_vm_summary(fleet, vc.name) for vc in fleet.config.vms])

    @routes.get("/events")
    async def events(request: web.Request) -> web.StreamResponse:
        totals: dict[str, int] = {}
        for vm in fleet.vms.values():
            for row in vm.event_counts():
                totals[row["event"]] = totals.get(row["event"], 0) + row["count"]
        return web.json_response(totals)

    @routes.get("/vms/{vm}")
    async def show_vm(request: web.Request) -> web.StreamResponse:
        name = request.match_info["vm"]
        if name not in fleet.configs:
            raise web.HTTPNotFound(text=f"no simulated VM {name!r}\n")
        out = _vm_summary(fleet, name)
        vm = fleet.vms.get(name)
        if vm is not None:
            out["disks"] = _disk_detail(vm)
            out["event_counts"] = vm.event_counts()
        return web.json_response(out)

    @routes.post("/vms/{vm}/disks/{disk}/link")
    async def link(request: web.Request) -> web.StreamResponse:
        vm = get_vm(request)
        disk = request.match_info["disk"]
        data = await body(request)
        if disk not in vm.disks:
            raise web.HTTPNotFound(text=f"no disk {disk!r}\n")
        up = data.get("up")
        if not isinstance(up, bool):
            raise web.HTTPBadRequest(text="'up' must be true or false\n")
        try:
            if up:
                vm.link_up(disk)
            else:
                vm.link_down(disk, data.get("in_flight"), data.get("operations"))
        except (SimConfigError, TypeError) as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from None
        return web.json_response({"ok": True})

    @routes.post("/link")
    async def link_all(request: web.Request) -> web.StreamResponse:
        data = await body(request)
        up = data.get("up")
        if not isinstance(up, bool):
            raise web.HTTPBadRequest(text="'up' must be true or false\n")
        n = 0
        for vm in fleet.vms.values():
            if not vm.started:
                continue
            for disk in list(vm.disks):
                if up:
                    vm.link_up(disk)
                else:
                    vm.link_down(disk, data.get("in_flight"), data.get("operations"))
                n += 1
        return web.json_response({"ok": True, "disks": n})

    @routes.post("/vms/{vm}/kill")
    async def kill(request: web.Request) -> web.StreamResponse:
        await get_vm(request).kill()
        return web.json_response({"ok": True})

    @routes.post("/vms/{vm}/shutdown")
    async def shutdown(request: web.Request) -> web.StreamResponse:
        await get_vm(request).shutdown()
        return web.json_response({"ok": True})

    @routes.post("/vms/{vm}/start")
    async def start(request: web.Request) -> web.StreamResponse:
        await get_vm(request).start()
        return web.json_response({"ok": True})

    @routes.post("/vms/{vm}/disks")
    async def plug(request: web.Request) -> web.StreamResponse:
        vm = get_vm(request)
        data = await body(request)
        try:
            vm.hot_plug(DiskSpec.from_dict(data))
        except (SimConfigError, TypeError) as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from None
        return web.json_response({"ok": True})

    @routes.delete("/vms/{vm}/disks/{disk}")
    async def unplug(request: web.Request) -> web.StreamResponse:
        vm = get_vm(request)
        disk = request.match_info["disk"]
        if disk not in vm.disks:
            raise web.HTTPNotFound(text=f"no disk {disk!r}\n")
        vm.hot_unplug(disk)
        return web.json_response({"ok": True})

    app = web.Application()
    app.add_routes(routes)
    return app


async def start_control(fleet: Fleet, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the control API; returns the runner and the bound port (``port=0``: any)."""
    runner = web.AppRunner(make_app(fleet), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    bound = port
    if server is not None:
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            bound = int(sockets[0].getsockname()[1])
    return runner, bound
