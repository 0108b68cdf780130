"""Issue "Reliability and security": faults survived, nothing lost, nobody let in.

Each test puts one fault on one socket beside a healthy simulated VM and checks, on the
exporter subprocess's /metrics and log: no crash, no stall (the neighbour keeps updating,
scrapes stay fast), a correct ``qemu_qmp_up``, the failure counted under a bounded reason, one
log line per state change (not one per retry), counters never decreasing (`Invariants`).

Covered elsewhere, not repeated here: the exporter restarted mid-hang
(tests/sim/test_hangs.py::test_restart_mid_hang_keeps_its_start) and a broken config
file (tests/unit/test_config.py::test_bad_config_names_file_and_key and
test_cli_bad_config_file_one_line_exit_2).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from qmpsim import DiskSpec, HungServer, SimVM
from tests.sim.common import (
    Invariants,
    config,
    good_keeps_updating,
    good_vm,
    state_changes,
    wait_good_up,
    wait_value,
)
from tests.sim.servers import FakeConn, FakeQMP, io_error_event
from tests.support.binaries import find_binary, skip_or_fail
from tests.support.config import FAULT_FAST
from tests.support.exporter import ExporterProcess
from tests.support.procs import rss_kib, status_field
from tests.support.scrape import Metrics
from tests.support.waits import wait_for

CONNECT_ERRORS = "qemu_exporter_qmp_connect_errors_total"
COMMAND_ERRORS = "qemu_exporter_qmp_command_errors_total"
DISCONNECTS = "qemu_exporter_qmp_disconnects_total"
ATTEMPTS = "qemu_exporter_qmp_connect_attempts_total"
REASONS = {"refused", "not_found", "permission", "timeout", "protocol", "other"}
COMMAND_REASONS = {"timeout", "error", "disconnected"}


def up(m: Metrics, vm: str) -> float | None:
    return m.value("qemu_qmp_up", vm=vm)


def bounded_labels(m: Metrics) -> None:
    assert m.label_values(CONNECT_ERRORS, "reason") <= REASONS
    assert m.label_values(COMMAND_ERRORS, "reason") <= COMMAND_REASONS
    assert m.sum("qemu_exporter_internal_errors_total") == 0


def retry_disk(in_flight: int = 0, timeout_ms: int = 60000) -> DiskSpec:
    return DiskSpec(
        id="virtio-disk0",
        werror="retry",
        rerror="retry",
        retry_interval_ms=200,
        retry_timeout_ms=timeout_ms,
        in_flight=in_flight,
    )


# -- QEMU killed, socket re-created ------------------------------------------------------------


async def test_qemu_killed_mid_hang(short_tmp: Path) -> None:
    """SIGKILL while a disk hangs: down, not_found counted, hang ends as vm_gone, one line each."""
    sock = str(short_tmp / "victim.qmp")
    good, victim = good_vm(short_tmp), SimVM(sock, name="victim", disks=[retry_disk()])
    await good.start()
    await victim.start()
    try:
        async with ExporterProcess(short_tmp, config(short_tmp, sock)) as exp:
            await wait_good_up(exp)
            await exp.wait_metrics(
                lambda m: up(m, "victim") == 1 and bool(m.find("qemu_block_io_hang", vm="victim"))
            )
            async with Invariants(exp):
                victim.link_down("virtio-disk0", in_flight=2, operations=("write",))
                m = await exp.wait_metrics(
                    lambda m: m.value("qemu_block_io_hang", vm="victim", device="virtio-disk0") == 1
                )
                gone = m.value("qemu_block_io_hang_completed_duration_seconds_count", outcome="vm_gone")
                await victim.kill()
                m = await exp.wait_metrics(
                    lambda m: (
                        up(m, "victim") == 0 and m.sum(CONNECT_ERRORS, vm="victim", reason="not_found") >= 3
                    ),
                    what="victim down, retried",
                )
                assert (
                    m.value("qemu_block_io_hang_completed_duration_seconds_count", outcome="vm_gone")
                    == (gone or 0) + 1
                )
                assert m.find("qemu_block_io_hang", vm="victim") == []
                assert m.sum(DISCONNECTS, vm="victim") == 1
                bounded_labels(m)
                await good_keeps_updating(exp)
            changes = state_changes(exp, "victim")
            assert changes == [
                "QMP session established",
                "QMP session ended",
                "QMP connect failed:not_found",
            ], changes
    finally:
        await good.kill()
        await victim.kill()


async def test_socket_recreated_by_new_qemu(short_tmp: Path) -> None:
    """The socket is deleted and at once re-created by a new QEMU of the same name (mid-hang):
    the session comes back with the new disk list, the old hang ends, counters carry on."""
    sock = str(short_tmp / "phoenix.qmp")
    good, old = good_vm(short_tmp), SimVM(sock, name="phoenix", disks=[retry_disk()])
    await good.start()
    await old.start()
    new: SimVM | None = None
    try:
        async with ExporterProcess(short_tmp, config(short_tmp, sock)) as exp:
            await wait_good_up(exp)
            await exp.wait_metrics(lambda m: up(m, "phoenix") == 1)
            async with Invariants(exp):
                old.link_down("virtio-disk0", in_flight=1, operations=("write",))
                m = await exp.wait_metrics(
                    lambda m: m.value("qemu_block_io_hang", vm="phoenix", device="virtio-disk0") == 1
                )
                errors_before = m.sum("qemu_block_io_error_events_total", vm="phoenix")
                await old.kill()
                new = SimVM(
                    sock,
                    name="phoenix",
                    disks=[
                        retry_disk(),
                        DiskSpec(id="virtio-disk1", werror="retry", rerror="retry", in_flight=0),
                    ],
                )
                await new.start()
                m = await exp.wait_metrics(
                    lambda m: (
                        up(m, "phoenix") == 1 and len(m.find("qemu_block_device_info", vm="phoenix")) == 2
                    ),
                    timeout=5,
                    what="the new QEMU",
                )
                assert m.sum(DISCONNECTS, vm="phoenix") == 1
                assert m.sum("qemu_block_io_error_events_total", vm="phoenix") >= errors_before
                # The old process's hang cannot go on in the new one.
                m = await exp.wait_metrics(
                    lambda m: m.value("qemu_block_io_hang", vm="phoenix", device="virtio-disk0") == 0,
                    timeout=5,
                )
                bounded_labels(m)
                await good_keeps_updating(exp)
            changes = state_changes(exp, "phoenix")
            assert changes.count("QMP session established") == 2, changes
            assert changes.count("QMP session ended") == 1, changes
    finally:
        await good.kill()
        await old.kill()
        if new is not None:
            await new.kill()


# -- connection-level faults -----------------------------------------------------------------


async def test_server_never_greets(short_tmp: Path) -> None:
    sock = str(short_tmp / "mute.qmp")
    good = good_vm(short_tmp)
    await good.start()
    try:
        async with HungServer(sock) as hung, ExporterProcess(short_tmp, config(short_tmp, sock)) as exp:
            await wait_good_up(exp)
            async with Invariants(exp):
                m = await wait_value(exp, CONNECT_ERRORS, 3, vm="mute", reason="timeout")
                assert up(m, "mute") == 0
                assert m.sum(ATTEMPTS, vm="mute") >= 3
                assert hung.connections >= 3
                bounded_labels(m)
                await good_keeps_updating(exp)
            assert state_changes(exp, "mute") == ["QMP connect failed:timeout"]
    finally:
        await good.kill()


class GarbageGreeting(FakeQMP):
    async def greet(self, conn: FakeConn) -> None:
        await conn.send_raw(b'{"QMP": {"version": tru\r\n')


class HugeGreeting(FakeQMP):
    async def greet(self, conn: FakeConn) -> None:
        await conn.send_raw(b'{"QMP": {"x": "' + b"A" * (11 * 1024 * 1024) + b'"}}\r\n')


async def test_malformed_and_oversized_greetings(short_tmp: Path) -> None:
    """Garbage instead of a greeting, and an 11 MB greeting line (above qemu.qmp's 10 MB read
    limit): protocol errors, one line each, no memory blow-up."""
    s1, s2 = str(short_tmp / "garbage.qmp"), str(short_tmp / "huge.qmp")
    good = good_vm(short_tmp)
    await good.start()
    try:
        async with (
            GarbageGreeting(s1, "garbage"),
            HugeGreeting(s2, "huge"),
            ExporterProcess(short_tmp, config(short_tmp, s1, s2)) as exp,
        ):
            await wait_good_up(exp)
            async with Invariants(exp):
                await wait_value(exp, CONNECT_ERRORS, 3, vm="garbage", reason="protocol")
                m = await wait_value(exp, CONNECT_ERRORS, 3, vm="huge", reason="protocol")
                assert up(m, "garbage") == 0 and up(m, "huge") == 0
                bounded_labels(m)
                await good_keeps_updating(exp)
            assert state_changes(exp, "garbage") == ["QMP connect failed:protocol"]
            assert state_changes(exp, "huge") == ["QMP connect failed:protocol"]
            assert exp.proc is not None
            rss_kb = rss_kib(exp.proc.pid)
            assert rss_kb < 300 * 1024, rss_kb
    finally:
        await good.kill()


# -- faults inside a session -----------------------------------------------------------------


class FirstSessionFault(FakeQMP):
    """Healthy, except that the first connection misbehaves once it is being watched."""

    fault: str = ""

    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        cmd = str(msg.get("execute"))
        watching = conn.n == 1 and conn.commands.count("query-blockstats") >= 1 and cmd == "query-status"
        if not watching:
            await self.answer(conn, msg, cmd)
        elif self.fault == "garbage":
            await conn.send_raw(b"{'return': nope}\r\n")
        elif self.fault == "slow":
            await asyncio.sleep(2.5)  # command_timeout_seconds is 1
            await self.answer(conn, msg, cmd)
        elif self.fault == "silent":
            pass  # stops answering mid-session, connection left open
        elif self.fault == "huge":
            await conn.send(io_error_event(1, 0) | {"data": {"x": "B" * (11 * 1024 * 1024)}})
        elif self.fault == "error":
            await conn.send({"id": msg.get("id"), "error": "not a mapping"})


def faulty(kind: str, path: str, name: str) -> FirstSessionFault:
    srv = FirstSessionFault(path, name)
    srv.fault = kind
    return srv


async def test_faults_mid_session(short_tmp: Path) -> None:
    """Four VMs whose first session goes wrong at the first poll: a malformed JSON reply, a reply
    slower than command_timeout_seconds, silence, an 11 MB event line.  Each session is dropped
    (command error counted with a bounded reason, one disconnect), the next one works."""
    # kind -> (command error reason counted for the poll, log line of the session's end).
    # A protocol error kills qemu.qmp's reader: the session ends as a disconnect, the pending
    # query-status is cancelled with it (not counted as a command error).
    kinds = {
        "garbage": (None, "QMP session ended"),
        "huge": (None, "QMP session ended"),
        "slow": ("timeout", "QMP session lost"),
        "silent": ("timeout", "QMP session lost"),
    }
    paths = {k: str(short_tmp / f"{k}.qmp") for k in kinds}
    servers = [faulty(k, p, k) for k, p in paths.items()]
    good = good_vm(short_tmp)
    await good.start()
    for s in servers:
        await s.start()
    try:
        async with ExporterProcess(short_tmp, config(short_tmp, *paths.values())) as exp:
            await wait_good_up(exp)
            async with Invariants(exp):
                m = await exp.wait_metrics(
                    lambda m: all(
                        up(m, k) == 1 and m.sum(DISCONNECTS, vm=k) == 1 and s.connections == 2
                        for k, s in zip(kinds, servers, strict=True)
                    ),
                    what="every VM dropped once and back",
                )
                for kind, (reason, _line) in kinds.items():
                    want = {("query-status", reason): 1.0} if reason else {}
                    got = {
                        (s.labels["command"], s.labels["reason"]): s.value
                        for s in m.find(COMMAND_ERRORS, vm=kind)
                    }
                    assert got == want, (kind, got)
                    assert m.sum(CONNECT_ERRORS, vm=kind) == 0
                bounded_labels(m)
                await good_keeps_updating(exp)
            for kind, (_reason, line) in kinds.items():
                assert state_changes(exp, kind) == [
                    "QMP session established",
                    line,
                    "QMP session established",
                ], (kind, state_changes(exp, kind))
    finally:
        await good.kill()
        for s in servers:
            await s.stop()


# -- event flood while the connection drops --------------------------------------------------

FLOOD = 200_000


class FloodThenDrop(FakeQMP):
    """Once watched, the first connection writes FLOOD BLOCK_IO_ERROR events in one go and
    closes: everything written before the close must be counted."""

    async def after_established(self, conn: FakeConn) -> None:
        if conn.n != 1:
            return
        line = json.dumps(io_error_event(1_700_000_000, 0)).encode() + b"\r\n"
        await conn.send_raw(line * FLOOD)
        conn.writer.close()


async def test_event_flood_while_connection_drops(short_tmp: Path) -> None:
    sock = str(short_tmp / "flood.qmp")
    good = good_vm(short_tmp)
    await good.start()
    try:
        # Polling fast means commands are pending while the flood is read: a command timeout
        # must not cut the session (and the unread events) short.
        cfg = config(short_tmp, sock, poll_interval_seconds=0.02)
        async with FloodThenDrop(sock, "flood"), ExporterProcess(short_tmp, cfg) as exp:
            await wait_good_up(exp)
            async with Invariants(exp):
                m = await exp.wait_metrics(
                    lambda m: m.sum(DISCONNECTS, vm="flood") >= 1 and up(m, "flood") == 1,
                    what="flood dropped and back",
                )
                assert m.sum("qemu_exporter_qmp_events_total", vm="flood", event="BLOCK_IO_ERROR") == FLOOD
                assert (
                    m.value(
                        "qemu_block_io_error_events_total",
                        vm="flood",
                        device="virtio-disk0",
                        operation="write",
                        action="retry",
                    )
                    == FLOOD
                )
                assert m.sum("qemu_exporter_io_error_events_unmatched_total", vm="flood") == 0
                hang = m.value("qemu_block_io_hang", vm="flood", device="virtio-disk0")
                assert hang in (0, 1)
                bounded_labels(m)
                await good_keeps_updating(exp)
            assert state_changes(exp, "flood") == [
                "QMP session established",
                "QMP session ended",
                "QMP session established",
            ], state_changes(exp, "flood")
    finally:
        await good.kill()


# -- SIGTERM during a scrape -----------------------------------------------------------------


class Scraper:
    """Scrapes in a loop until the exporter goes away; records how each scrape ended."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.ended: str | None = None

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            while True:
                try:
                    async with s.get(self.url) as r:
                        await r.read()
                        assert r.status == 200, r.status
                        self.ok += 1
                except (aiohttp.ClientError, OSError) as exc:  # cut short by the shutdown: fine
                    self.ended = type(exc).__name__
                    return


async def test_sigterm_during_scrapes(short_tmp: Path) -> None:
    """SIGTERM while 20 clients scrape in a loop: exit 0 within seconds, every in-flight scrape
    answered or cut (none left hanging), no traceback.

    No VM is watched here on purpose: this isolates the HTTP side (SIGTERM with many watchers:
    tests/sim/test_regressions.py)."""
    (short_tmp / "none").mkdir()
    cfg = {"qmp": {"globs": [str(short_tmp / "none" / "*.qmp")], **FAULT_FAST}}
    exp = ExporterProcess(short_tmp, cfg)
    await exp.start()
    try:
        await sigterm_while_scraping(exp)
    finally:
        exp.stop()


async def sigterm_while_scraping(exp: ExporterProcess) -> None:
    scrapers = [Scraper(exp.url + "/metrics") for _ in range(20)]
    tasks = [asyncio.create_task(sc.run()) for sc in scrapers]

    async def scraping() -> bool:
        return sum(sc.ok for sc in scrapers) >= 100

    await wait_for(scraping, 10, "scrapes in flight")
    assert exp.proc is not None
    t0 = time.monotonic()
    exp.proc.send_signal(signal.SIGTERM)
    try:
        rc = await asyncio.to_thread(exp.proc.wait, 10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit 10 s after SIGTERM:\n{exp.log()[-3000:]}") from None
    took = time.monotonic() - t0
    await asyncio.wait_for(asyncio.gather(*tasks), 10)  # no scrape left hanging
    assert all(sc.ended for sc in scrapers)
    assert rc == 0, exp.log()[-3000:]
    assert took < 5, took
    assert "shutting down" in exp.log()
    assert "Traceback" not in exp.log(), exp.log()[-3000:]


# -- permission denied -----------------------------------------------------------------------

NOBODY = 65534


class UnprivilegedExporter(ExporterProcess):
    """The exporter run as nobody:nogroup (``setpriv``), so file permissions apply to it: root
    has CAP_DAC_OVERRIDE, for which chmod 000 on a socket denies nothing."""

    def argv(self) -> list[str]:
        setpriv = find_binary("setpriv") or "setpriv"
        drop = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
        return [setpriv, *drop, *self.command()]

    def env(self) -> dict[str, str]:
        return dict(super().env(), PYTHONDONTWRITEBYTECODE="1")  # nobody cannot write them


async def test_permission_denied_on_socket(short_tmp: Path) -> None:
    if os.geteuid() != 0 or not find_binary("setpriv"):
        skip_or_fail("needs root and setpriv to run the exporter as another user")
    sock = str(short_tmp / "locked.qmp")
    good, locked = good_vm(short_tmp), SimVM(sock, name="locked", disks=[retry_disk()])
    await good.start()
    await locked.start()
    os.chmod(short_tmp, 0o755)
    os.chmod(good.socket_path, 0o777)  # connecting to a unix socket needs write permission
    os.chmod(sock, 0)
    # As root the mode is no obstacle, which is why the exporter runs as nobody below.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
    try:
        async with UnprivilegedExporter(short_tmp, config(short_tmp, sock)) as exp:
            assert exp.proc is not None
            assert {int(uid) for uid in status_field(exp.proc.pid, "Uid")} == {NOBODY}
            await wait_good_up(exp)
            async with Invariants(exp):
                m = await wait_value(exp, CONNECT_ERRORS, 3, vm="locked", reason="permission")
                assert up(m, "locked") == 0
                bounded_labels(m)
                await good_keeps_updating(exp)
                os.chmod(sock, 0o777)
                await exp.wait_metrics(lambda m: up(m, "locked") == 1, what="locked after chmod 777")
            assert state_changes(exp, "locked") == [
                "QMP connect failed:permission",
                "QMP session established",
            ]
    finally:
        await good.kill()
        await locked.kill()
