"""Capture what libvirt-python really delivers, into ``tests/fixtures/libvirt-9.0/``.

Run once per libvirt version (as root, on a machine where the lab works)::

    .venv/bin/python -m tests.libvirt.capture [--out DIR]

It starts (or reuses) libvirtd through the lab, runs real domains on failing NBD storage and
records, as JSON: the live ``dumpxml`` of a stop-policy, a report-policy and a ``<qemu:override>``
domain; every ``libvirt_qemu.qemuMonitorEventRegister(conn, None, None, cb, None)`` callback
(all QEMU events, all domains) with its raw arguments; lifecycle events;
``getAllDomainStats(STATE | BLOCK)``; ``dom.state()`` on an io-error pause; and what happens to
the connection and its callbacks when libvirtd is SIGKILLed and started again, or stops
answering (SIGSTOP).  The event loop is libvirt's asyncio integration (``libvirtaio``); blocking
libvirt calls and ``virsh`` run in threads so callbacks keep flowing, as in the exporter.

The README next to the fixtures interprets these files; re-read it after a re-capture.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import libvirtaio

from tests.libvirt.lab import DiskOptions, LabDomain, Libvirtd, LibvirtLab, lab_workdir, running_libvirtd
from tests.support.waits import wait_for

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "libvirt-9.0"
#: Events of one kind kept verbatim per domain (a report-policy storm sends hundreds).
KEEP_PER_KIND = 6


def _constant_names(prefix: str) -> dict[int, str]:
    return {
        getattr(libvirt, n): n
        for n in dir(libvirt)
        if n.startswith(prefix) and isinstance(getattr(libvirt, n), int)
    }


LIFECYCLE_NAMES = {
    getattr(libvirt, f"VIR_DOMAIN_EVENT_{n}"): f"VIR_DOMAIN_EVENT_{n}"
    for n in (
        "DEFINED",
        "UNDEFINED",
        "STARTED",
        "SUSPENDED",
        "RESUMED",
        "STOPPED",
        "SHUTDOWN",
        "PMSUSPENDED",
        "CRASHED",
    )
}


def lifecycle_detail_name(event: int, detail: int) -> str:
    """``VIR_DOMAIN_EVENT_SUSPENDED_IOERROR`` for (3, 2)."""
    prefix = LIFECYCLE_NAMES.get(event, "?") + "_"
    for name in dir(libvirt):
        if name.startswith(prefix) and getattr(libvirt, name) == detail:
            return name
    return "?"


STATE_NAMES = {
    getattr(libvirt, n): n
    for n in (
        "VIR_DOMAIN_NOSTATE",
        "VIR_DOMAIN_RUNNING",
        "VIR_DOMAIN_BLOCKED",
        "VIR_DOMAIN_PAUSED",
        "VIR_DOMAIN_SHUTDOWN",
        "VIR_DOMAIN_SHUTOFF",
        "VIR_DOMAIN_CRASHED",
        "VIR_DOMAIN_PMSUSPENDED",
    )
}


def state_name(state: int, reason: int) -> tuple[str, str]:
    """("VIR_DOMAIN_PAUSED", "VIR_DOMAIN_PAUSED_IOERROR") for [3, 5]."""
    base = STATE_NAMES.get(state, "?")
    reason_prefix = base + "_"
    reason_name = next(
        (n for n in dir(libvirt) if n.startswith(reason_prefix) and getattr(libvirt, n) == reason), "?"
    )
    return base, reason_name


def _err(exc: libvirt.libvirtError) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "code": exc.get_error_code(),
        "domain": exc.get_error_domain(),
        "message": exc.get_error_message(),
    }


class Recorder:
    """Every callback libvirt-python makes, with its raw arguments and when it arrived."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.records: list[dict[str, Any]] = []
        self.phase = "setup"
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def _add(self, kind: str, domain: str, what: str, record: dict[str, Any]) -> None:
        key = (self.phase, kind, f"{domain}:{what}")
        self.counts[key] += 1
        if self.counts[key] <= KEEP_PER_KIND:
            self.records.append(
                {
                    "t": self.now(),
                    "phase": self.phase,
                    "kind": kind,
                    "thread": threading.current_thread().name,
                    **record,
                }
            )

    def monitor(
        self, conn: Any, dom: Any, event: Any, seconds: Any, micros: Any, details: Any, opaque: Any
    ) -> None:
        received = time.time()
        qemu_time = seconds + micros / 1e6 if isinstance(seconds, int) and isinstance(micros, int) else None
        self._add(
            "qemu_monitor_event",
            dom.name(),
            str(event),
            {
                "arg_types": [type(a).__name__ for a in (conn, dom, event, seconds, micros, details, opaque)],
                "conn_id": id(conn),
                "dom": {"name": dom.name(), "uuid": dom.UUIDString(), "id": dom.ID()},
                "event": event,
                "seconds": seconds,
                "micros": micros,
                "details": details,
                "details_parsed": json.loads(details) if isinstance(details, str) else None,
                "opaque": opaque,
                "received_minus_qemu_ms": None
                if qemu_time is None
                else round((received - qemu_time) * 1000, 3),
            },
        )

    def lifecycle(self, conn: Any, dom: Any, event: Any, detail: Any, opaque: Any) -> None:
        self._add(
            "lifecycle",
            dom.name(),
            f"{event}/{detail}",
            {
                "arg_types": [type(a).__name__ for a in (conn, dom, event, detail, opaque)],
                "conn_id": id(conn),
                "dom": {"name": dom.name(), "uuid": dom.UUIDString(), "id": dom.ID()},
                "event": event,
                "detail": detail,
                "event_name": LIFECYCLE_NAMES.get(event, "?"),
                "detail_name": lifecycle_detail_name(event, detail),
                "opaque": opaque,
            },
        )

    def close(self, conn: Any, reason: Any, opaque: Any) -> None:
        self._add(
            "close",
            "-",
            str(reason),
            {
                "arg_types": [type(a).__name__ for a in (conn, reason, opaque)],
                "conn_id": id(conn),
                "reason": reason,
                "reason_name": _constant_names("VIR_CONNECT_CLOSE_REASON_").get(reason, "?"),
                "opaque": opaque,
            },
        )

    def find(
        self, kind: str, pred: Callable[[dict[str, Any]], bool] = lambda r: True
    ) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind and pred(r)]

    async def wait(
        self, kind: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0, what: str = ""
    ) -> dict[str, Any]:
        async def found() -> dict[str, Any] | None:
            records = self.find(kind, lambda r: r["phase"] == self.phase and pred(r))
            return records[0] if records else None

        return await wait_for(found, timeout, f"{kind} {what} in phase {self.phase}", step=0.02)


def register_all(conn: libvirt.virConnect, rec: Recorder, tag: str) -> dict[str, int]:
    """The callbacks the exporter may use, on one connection; returns the callback ids.

    Not VIR_DOMAIN_EVENT_ID_IO_ERROR(_REASON): on libvirt 9.0 a subscriber to those wedges
    libvirtd when a network disk errors (see the README next to the fixtures).
    """
    conn.registerCloseCallback(rec.close, f"close-{tag}")
    return {
        "qemu_monitor": libvirt_qemu.qemuMonitorEventRegister(conn, None, None, rec.monitor, f"mon-{tag}"),
        "lifecycle": conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, rec.lifecycle, f"life-{tag}"
        ),
    }


def all_stats(conn: libvirt.virConnect, names: set[str]) -> list[dict[str, Any]]:
    started = time.monotonic()
    stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK)
    elapsed = round(time.monotonic() - started, 4)
    return [
        {"domain": dom.name(), "call_seconds": elapsed, "record_type": type(rec).__name__, "stats": rec}
        for dom, rec in stats
        if dom.name() in names
    ]


def dom_state(dom: libvirt.virDomain) -> dict[str, Any]:
    state = dom.state()
    return {
        "state()": state,
        "names": state_name(state[0], state[1]),
        "info()": dom.info(),
        "isActive()": dom.isActive(),
    }


async def off_loop(fn: Callable[..., Any], *args: Any, timeout: float = 90.0) -> Any:
    """A blocking libvirt call or virsh run in a thread (callbacks keep flowing), bounded."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)


class Capture:
    def __init__(self, lab: LibvirtLab, libvirtd: Libvirtd, out: Path) -> None:
        self.lab = lab
        self.libvirtd = libvirtd
        self.out = out
        self.rec = Recorder()
        self.results: dict[str, Any] = {}

    def write(self, name: str, data: Any) -> None:
        path = self.out / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
        print(f"wrote {path}")

    async def run(self) -> None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # else libvirt prints to stderr
        rec = self.rec
        conn = await off_loop(libvirt.open, self.libvirtd.uri)
        ids = register_all(conn, rec, "conn1")
        self.results["callback_ids"] = ids

        # --- stop policy: start, io error pause, resume, destroy -------------------------
        rec.phase = "stop:define+start"
        stop = await off_loop(
            lambda: self.lab.domain(DiskOptions(error_policy="stop"), hint="stop", second_disk=True)
        )
        await rec.wait("lifecycle", lambda r: r["event_name"] == "VIR_DOMAIN_EVENT_STARTED")
        self.write("dumpxml-stop.xml", await off_loop(stop.dumpxml))
        dom = await off_loop(conn.lookupByName, stop.name)
        self.results["state_running"] = await off_loop(dom_state, dom)
        self.results["stats_running"] = await off_loop(all_stats, conn, {stop.name})

        rec.phase = "stop:storage fails"
        stop.fail_storage()
        await rec.wait("lifecycle", lambda r: r["detail_name"] == "VIR_DOMAIN_EVENT_SUSPENDED_IOERROR")
        await rec.wait("qemu_monitor_event", lambda r: r["event"] == "STOP")
        self.results["state_ioerror"] = await off_loop(dom_state, dom)
        self.results["stats_ioerror"] = await off_loop(all_stats, conn, {stop.name})
        self.results["domblkerror_ioerror"] = await off_loop(stop.virsh, "domblkerror", stop.name)
        self.results["diskErrors_ioerror"] = await off_loop(dom.diskErrors)

        rec.phase = "stop:restore+virsh resume"
        stop.restore_storage()
        await off_loop(stop.resume)
        await rec.wait("qemu_monitor_event", lambda r: r["event"] == "RESUME")
        await rec.wait("lifecycle", lambda r: r["event_name"] == "VIR_DOMAIN_EVENT_RESUMED")
        await off_loop(stop.wait_io)
        self.results["state_resumed"] = await off_loop(dom_state, dom)

        # --- report policy: errors to the guest, no pause --------------------------------
        rec.phase = "report:define+start"
        report = await off_loop(lambda: self.lab.domain(DiskOptions(error_policy="report"), hint="report"))
        self.write("dumpxml-report.xml", await off_loop(report.dumpxml))
        rec.phase = "report:storage fails"
        report.fail_storage()
        await off_loop(report.wait_injected_errors, 20)
        await rec.wait(
            "qemu_monitor_event", lambda r: r["event"] == "BLOCK_IO_ERROR" and r["dom"]["name"] == report.name
        )
        self.results["state_report_failing"] = await off_loop(
            dom_state, await off_loop(conn.lookupByName, report.name)
        )
        self.results["stats_report_failing"] = await off_loop(all_stats, conn, {report.name})
        report.restore_storage()
        await off_loop(report.wait_io)

        # --- <qemu:override>: werror/rerror values upstream QEMU 7.2 accepts ---------------
        rec.phase = "override:define+start"
        override = await off_loop(
            lambda: self.lab.domain(
                DiskOptions(
                    error_policy="stop",
                    override=(("werror", "string", "ignore"), ("rerror", "string", "report")),
                ),
                hint="override",
            )
        )
        self.write("dumpxml-override.xml", await off_loop(override.dumpxml))
        self.results["override_taints"] = override.taint_lines()
        self.results["override_qemu_cmdline_device"] = [
            line for line in override.log_text().splitlines() if "virtio-blk-pci" in line
        ]
        rec.phase = "override:destroy"
        await off_loop(override.destroy)
        await rec.wait("lifecycle", lambda r: r["event_name"] == "VIR_DOMAIN_EVENT_STOPPED")

        # --- destroy: what a domain going away looks like ---------------------------------
        rec.phase = "report:destroy"
        await off_loop(report.destroy)
        await rec.wait(
            "lifecycle",
            lambda r: r["event_name"] == "VIR_DOMAIN_EVENT_STOPPED" and r["dom"]["name"] == report.name,
        )
        rec.phase = "report:undefine"
        await off_loop(report.undefine)
        await rec.wait("lifecycle", lambda r: r["event_name"] == "VIR_DOMAIN_EVENT_UNDEFINED")

        # --- libvirtd SIGKILLed and restarted; a hang starts while it is down -----------------
        if self.libvirtd.owned:
            await self.restart_scenarios(conn, stop)
        else:
            self.results["restart"] = "skipped: libvirtd was not started by the capture"

        rec.phase = "stop:destroy"
        conn2 = self.results.pop("_conn2", conn)
        await off_loop(stop.destroy)
        await rec.wait("lifecycle", lambda r: r["event_name"] == "VIR_DOMAIN_EVENT_STOPPED")

        self.write(
            "monitor-events.json",
            {"records": rec.find("qemu_monitor_event"), "counts": self.counts("qemu_monitor_event")},
        )
        self.write(
            "lifecycle-events.json", {"records": rec.find("lifecycle"), "counts": self.counts("lifecycle")}
        )
        self.write("domain-stats.json", {k: v for k, v in self.results.items() if k.startswith("stats_")})
        self.write(
            "domain-state.json",
            {k: v for k, v in self.results.items() if k.startswith(("state_", "domblk", "diskErrors"))},
        )
        self.write(
            "override.json",
            {k: v for k, v in self.results.items() if k.startswith("override_")},
        )
        restart = self.results.get("restart")
        if isinstance(restart, dict):
            restart["close_callbacks"] = rec.find("close")
        self.write("reconnect.json", restart)
        self.write(
            "capture-info.json",
            {
                "libvirt_python": libvirt.getVersion(),
                "libvirt_python_module_version": _pkg_version(),
                "libvirtd": conn2.getLibVersion() if conn2.isAlive() else None,
                "qemu": conn2.getVersion() if conn2.isAlive() else None,
                "callback_ids": self.results["callback_ids"],
            },
        )

    def counts(self, kind: str) -> dict[str, int]:
        return {f"{phase} | {what}": n for (phase, k, what), n in self.rec.counts.items() if k == kind}

    async def restart_scenarios(self, conn: libvirt.virConnect, stop: LabDomain) -> None:
        rec = self.rec
        restart: dict[str, Any] = {}
        self.results["restart"] = restart

        rec.phase = "restart:SIGKILL libvirtd"
        killed_at = rec.now()
        pid = await off_loop(self.libvirtd.kill)
        restart["killed_pid"] = pid
        restart["killed_at"] = killed_at
        close = await rec.wait("close", lambda r: True, timeout=10)
        restart["close_callback_after_s"] = round(close["t"] - killed_at, 4)
        restart["conn1_isAlive_after_kill"] = conn.isAlive()
        try:
            await off_loop(conn.listAllDomains)
        except libvirt.libvirtError as exc:
            restart["call_on_dead_conn"] = _err(exc)
        try:
            await off_loop(libvirt.open, self.libvirtd.uri)
        except libvirt.libvirtError as exc:
            restart["open_while_down"] = _err(exc)

        rec.phase = "restart:storage fails while libvirtd is down"
        stop.fail_storage()
        await off_loop(stop.wait_injected_errors, 1)

        rec.phase = "restart:libvirtd started again"
        started = time.monotonic()
        await off_loop(self.libvirtd.restart)
        restart["restart_to_virsh_ok_s"] = round(time.monotonic() - started, 3)
        restart["conn1_isAlive_after_restart"] = conn.isAlive()
        try:
            await off_loop(conn.listAllDomains)
            restart["conn1_call_after_restart"] = "ok"
        except libvirt.libvirtError as exc:
            restart["conn1_call_after_restart"] = _err(exc)
        try:
            libvirt_qemu.qemuMonitorEventRegister(conn, None, None, rec.monitor, "mon-conn1-again")
            restart["conn1_reregister_after_restart"] = "ok"
        except libvirt.libvirtError as exc:
            restart["conn1_reregister_after_restart"] = _err(exc)
        conn2 = await off_loop(libvirt.open, self.libvirtd.uri)
        self.results["_conn2"] = conn2
        restart["conn2_callback_ids"] = register_all(conn2, rec, "conn2")
        dom = await off_loop(conn2.lookupByName, stop.name)
        restart["state_after_restart"] = await off_loop(dom_state, dom)
        restart["stats_after_restart"] = await off_loop(all_stats, conn2, {stop.name})

        rec.phase = "restart:restore+resume on conn2"
        stop.restore_storage()
        await off_loop(dom.resume)
        await rec.wait("qemu_monitor_event", lambda r: r["event"] == "RESUME")
        restart["events_before_resume_on_conn2"] = [
            {k: r[k] for k in ("kind", "event", "details", "event_name", "detail_name") if k in r}
            for r in rec.records
            if r["phase"] == "restart:libvirtd started again" and r["kind"] != "close"
        ]
        await off_loop(stop.wait_io)

        # --- libvirtd stops answering (SIGSTOP): what a blocking call and keepalive do ----------
        rec.phase = "restart:SIGSTOP libvirtd"
        conn2.setKeepAlive(1, 2)
        lvpid = self.libvirtd.pid
        assert lvpid is not None
        os.kill(lvpid, signal.SIGSTOP)
        stopped_at = rec.now()
        try:
            began = time.monotonic()
            try:
                await asyncio.wait_for(off_loop(conn2.listAllDomains), timeout=30)
                restart["call_while_sigstopped"] = "returned"
            except libvirt.libvirtError as exc:
                restart["call_while_sigstopped"] = _err(exc)
            except TimeoutError:
                restart["call_while_sigstopped"] = "still blocked after 30 s"
            restart["call_while_sigstopped_s"] = round(time.monotonic() - began, 3)
            with contextlib.suppress(TimeoutError):
                close = await rec.wait("close", lambda r: True, timeout=15)
                restart["keepalive_1s_x2_close_after_s"] = round(close["t"] - stopped_at, 3)
            restart["conn2_isAlive_while_sigstopped"] = conn2.isAlive()
        finally:
            os.kill(lvpid, signal.SIGCONT)
        conn3 = await off_loop(libvirt.open, self.libvirtd.uri)
        register_all(conn3, rec, "conn3")
        self.results["_conn2"] = conn3


def _pkg_version() -> str:
    from importlib.metadata import version

    return version("libvirt-python")


@contextlib.contextmanager
def _lab() -> Iterator[tuple[LibvirtLab, Libvirtd]]:
    with (
        lab_workdir("qih-capd-") as daemon_dir,
        running_libvirtd(daemon_dir) as daemon,
        lab_workdir("qih-cap-") as workdir,
        contextlib.ExitStack() as stack,
    ):
        yield LibvirtLab(daemon, workdir, stack), daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with _lab() as (lab, daemon):
        asyncio.run(Capture(lab, daemon, args.out).run())


if __name__ == "__main__":
    main()
