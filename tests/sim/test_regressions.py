"""Regression tests of the exporter bugs the fault suite found: each failed before its fix
(docs/reliability.md, "Bugs found and fixed")."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from exporter.config import Config, QMPConfig
from exporter.model.state import VMState
from exporter.qmp_watch import VMWatcher
from qmpsim import SimVM
from tests.sim.common import Invariants, config, good_vm, state_changes, wait_good_up
from tests.sim.servers import FakeConn, FakeQMP, Sends, io_error_event, watching
from tests.sim.test_faults import retry_disk, sigterm_while_scraping, up
from tests.support.exporter import ExporterProcess
from tests.support.waits import wait_for


# 1. VMWatcher.stop() can hang forever: cancellation swallowed (Python 3.11 asyncio.wait_for).
async def test_watcher_stop_always_returns() -> None:
    cfg = Config(qmp=QMPConfig(backoff_initial_seconds=0.001, backoff_max_seconds=0.001))
    stuck = 0
    for i in range(200):
        w = VMWatcher(VMState.qmp(f"/tmp/qih-nonexistent-{i}.qmp"), cfg, clock=time.time)
        w.start()
        await asyncio.sleep((i % 10) / 1000)
        try:
            await asyncio.wait_for(asyncio.shield(w.stop()), 2)
        except TimeoutError:
            stuck += 1
            assert w._task is not None
            w._task.cancel()  # keep cancelling until it gives up, to clean up
            while not w._task.done():
                w._task.cancel()
                await asyncio.sleep(0.01)
    assert stuck == 0, f"{stuck} of 200 watchers ignored stop()"


async def test_sigterm_with_many_watchers_exits(short_tmp: Path) -> None:
    missing = [str(short_tmp / f"missing{i}.qmp") for i in range(100)]
    async with ExporterProcess(short_tmp, config(short_tmp, *missing)) as exp:
        await exp.wait_metrics(lambda m: m.sum("qemu_exporter_qmp_connect_attempts_total") >= 300)
        await sigterm_while_scraping(exp)


# 2. A session that never gets established logs "QMP session lost" on every retry.
class NeverAnswersQueryName(FakeQMP):
    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        if msg.get("execute") != "query-name":
            await self.answer(conn, msg, str(msg.get("execute")))


async def test_identify_timeout_logged_once(short_tmp: Path) -> None:
    sock = str(short_tmp / "mute2.qmp")
    async with (
        NeverAnswersQueryName(sock, "mute2") as srv,
        ExporterProcess(short_tmp, config(short_tmp, sock, command_timeout_seconds=0.3)) as exp,
    ):
        await exp.wait_metrics(
            lambda m: m.sum("qemu_exporter_qmp_command_errors_total", vm="mute2", reason="timeout") >= 4,
            what="4 attempts",
        )
        assert srv.connections >= 4
        assert len(state_changes(exp, "mute2")) == 1, state_changes(exp, "mute2")


# 3. A malformed reply (neither "return" nor a proper "error") is counted as an internal error
#    with a traceback on every retry instead of a command error.
class BadReplies(FakeQMP):
    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        if msg.get("execute") == "query-status" and "query-blockstats" in conn.commands:
            await conn.send({"id": msg.get("id"), "error": "not a mapping"})
        else:
            await self.answer(conn, msg, str(msg.get("execute")))


async def test_malformed_reply_is_a_command_error(short_tmp: Path) -> None:
    sock = str(short_tmp / "badreply.qmp")
    good = good_vm(short_tmp)
    await good.start()
    try:
        async with BadReplies(sock, "badreply"), ExporterProcess(short_tmp, config(short_tmp, sock)) as exp:
            await wait_good_up(exp)
            try:
                m = await exp.wait_metrics(
                    lambda m: (
                        m.sum("qemu_exporter_qmp_command_errors_total", vm="badreply", command="query-status")
                        >= 3
                    )
                )
            finally:
                print(exp.log()[-3000:])
            assert m.sum("qemu_exporter_internal_errors_total", vm="badreply") == 0
            assert m.sum("qemu_exporter_qmp_command_errors_total", vm="badreply", command="query-status") >= 3
            assert "Traceback" not in exp.log()
    finally:
        await good.kill()


# 4. A socket re-created with the same inode number (the common case) does not wake the watcher.
async def test_recreated_socket_wakes_watcher_even_with_same_inode(short_tmp: Path) -> None:
    sock = str(short_tmp / "phoenix.qmp")
    old = SimVM(sock, name="phoenix", disks=[retry_disk()])
    await old.start()
    new = SimVM(sock, name="phoenix", disks=[retry_disk()])
    try:
        cfg = config(short_tmp, sock, backoff_initial_seconds=5.0, backoff_max_seconds=10.0)
        async with ExporterProcess(short_tmp, cfg) as exp:
            await exp.wait_metrics(lambda m: up(m, "phoenix") == 1)
            ino = os.stat(sock).st_ino
            await old.kill()
            # ext4 usually hands the freed inode number to the next socket, but not always:
            # re-create until it does (each try takes milliseconds; discovery looks once a second).
            for _ in range(50):
                await new.start()
                if os.stat(sock).st_ino == ino:
                    break
                await new.kill()
            else:
                pytest.fail(f"the kernel never reused inode {ino} for {sock} in 50 tries")
            # backoff after a session is 2.5-5 s: only a wake-up brings it back within 2 s
            await exp.wait_metrics(
                lambda m: (
                    up(m, "phoenix") == 1 and m.sum("qemu_exporter_qmp_disconnects_total", vm="phoenix") >= 1
                ),
                timeout=2,
            )
    finally:
        await old.kill()
        await new.kill()


# 5. An event timestamp too large for a float (valid JSON) raises OverflowError in
#    the event time decoding: internal error, the session is torn down, and the exception
#    re-raised in _session's finally skips end_session()/disconnect.
class HugeTimestamp(FakeQMP):
    async def after_established(self, conn: FakeConn) -> None:
        if conn.n == 1:
            await conn.send(io_error_event(10**400))


async def test_huge_event_timestamp(short_tmp: Path) -> None:
    sock = str(short_tmp / "bigts.qmp")
    async with (
        HugeTimestamp(sock, "bigts"),
        ExporterProcess(short_tmp, config(short_tmp, sock)) as exp,
        Invariants(exp) as inv,
    ):
        m = await exp.wait_metrics(
            lambda m: (
                m.sum("qemu_exporter_qmp_events_total", vm="bigts", event="BLOCK_IO_ERROR") == 1
                and inv.scrapes >= 3
            )
        )
        assert m.sum("qemu_exporter_internal_errors_total", vm="bigts") == 0
        assert m.sum("qemu_exporter_qmp_disconnects_total", vm="bigts") == 0


# 6. A non-string event name (JSON array/object) raised TypeError in the watcher's event
#    handling (`name in _STATUS_EVENTS`): internal error, session torn down.
async def test_non_string_event_name(short_tmp: Path) -> None:
    odd = [{"event": [], "data": {}}, {"event": {"a": 1}}]
    async with watching(Sends(str(short_tmp / "odd.qmp"), "odd", odd)) as w:

        async def counted() -> bool:
            return w.vm.events["other"] == 2

        await wait_for(counted, 10, "both events counted as other")
        assert w.vm.internal_errors == 0
        assert w.vm.connect_attempts == 1  # the session survived them


# 7. Integers beyond float range (valid JSON; a hostile or broken peer) raise OverflowError.
def test_huge_ints_in_blockstats_and_timestamps() -> None:
    from exporter.model.events import event_time
    from exporter.qmp.replies import parse_blockstats

    assert parse_blockstats({"rd_total_time_ns": 10**400, "idle_time_ns": 10**400}) is not None
    assert event_time(10**400, 0) is None


# 8. A VM whose query-name answers a non-string name breaks EVERY scrape (HTTP 500): the name
#    becomes the `vm` label value and prometheus_client cannot escape a list.
class ListName(FakeQMP):
    def value(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "query-name":
            return {"name": ["evil"]}
        return super().value(cmd, args)


class BadVersion(FakeQMP):
    def value(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "query-version":
            return {"qemu": "8.2.0", "package": ""}
        return super().value(cmd, args)


async def test_wrongly_typed_identity_replies(short_tmp: Path) -> None:
    s1, s2 = str(short_tmp / "listname.qmp"), str(short_tmp / "badver.qmp")
    good = good_vm(short_tmp)
    await good.start()
    try:
        async with (
            ListName(s1, "x") as a,
            BadVersion(s2, "badver") as b,
            ExporterProcess(short_tmp, config(short_tmp, s1, s2)) as exp,
        ):
            await wait_good_up(exp)
            # Both sessions work; the bad values are replaced, never put into a label.
            m = await exp.wait_metrics(
                lambda m: (
                    m.value("qemu_qmp_up", vm="listname") == 1 and m.value("qemu_qmp_up", vm="badver") == 1
                )
            )
            assert m.label_values("qemu_vm_info", "qemu_version", vm="badver") == {"0.0.0"}
            assert m.sum("qemu_exporter_internal_errors_total") == 0
            assert a.connections == 1 and b.connections == 1
            assert "Traceback" not in exp.log()
    finally:
        await good.kill()
