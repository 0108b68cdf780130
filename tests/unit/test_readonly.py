"""The exporter can only ever send read-only QMP commands."""

from __future__ import annotations

import ast
import contextlib
import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecInterruptedError, ExecuteError, Runstate

from exporter.qmp.readonly import ALLOWED_COMMANDS, ForbiddenCommand, ReadOnlyQMPClient, check_allowed
from tests.sim.servers import FakeConn, FakeQMP, watching
from tests.support.procs import REPO
from tests.support.qemu import run_qemu
from tests.support.waits import wait_for

FORBIDDEN = [
    "cont",
    "stop",
    "quit",
    "system_reset",
    "system_powerdown",
    "device_del",
    "device_add",
    "block-job-cancel",
    "drive-mirror",
    "blockdev-del",
    "human-monitor-command",
    "migrate",
    "block_resize",
    "qom-set",
    "x-blockdev-change",
    "",
    "QUERY-STATUS",
]


@pytest.mark.parametrize("command", sorted(ALLOWED_COMMANDS))
def test_allowed(command: str) -> None:
    check_allowed({"execute": command})


@pytest.mark.parametrize("command", FORBIDDEN)
def test_forbidden(command: str) -> None:
    with pytest.raises(ForbiddenCommand):
        check_allowed({"execute": command})


def test_oob_and_malformed_messages_are_forbidden() -> None:
    for msg in (
        {"exec-oob": "query-status"},
        {"execute": "query-status", "exec-oob": "cont"},
        {},
        {"execute": 1},
    ):
        with pytest.raises(ForbiddenCommand):
            check_allowed(msg)


def test_allowlist_is_query_only() -> None:
    for c in ALLOWED_COMMANDS:
        assert c == "qmp_capabilities" or c.startswith(
            ("query-", "qom-get", "qom-list", "device-list-properties")
        )


def test_every_command_the_exporter_sends_is_allowlisted() -> None:
    """Static check: every literal command name passed to the watcher's _cmd() is allowed."""
    src = (REPO / "exporter" / "qmp_watch.py").read_text()
    found = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_cmd":
            arg = node.args[1]
            assert isinstance(arg, ast.Constant), f"non-literal command at line {node.lineno}"
            found.add(arg.value)
    assert found and found <= ALLOWED_COMMANDS, found - ALLOWED_COMMANDS


async def test_forbidden_commands_never_reach_a_real_qemu(short_tmp: Path) -> None:
    sock = short_tmp / "vm.qmp"
    with run_qemu(short_tmp, sock, []) as proc:
        client = ReadOnlyQMPClient("t")
        await client.connect(str(sock))
        try:
            assert (await client.execute("query-status"))["status"] == "running"  # type: ignore[index]
            with pytest.raises(ForbiddenCommand):
                await client.execute("stop")
            with pytest.raises(ForbiddenCommand):
                await client.execute("quit")
            assert (await client.execute("query-status"))["status"] == "running"  # type: ignore[index]
            # Bypassing execute() still cannot send it: the outbound hook drops the session.
            with pytest.raises((ForbiddenCommand, ExecInterruptedError)):
                await client._raw({"execute": "stop"})
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
        assert proc.poll() is None  # QEMU still alive: "quit" never arrived
        client2 = ReadOnlyQMPClient("t2")
        await client2.connect(str(sock))
        assert (await client2.execute("query-status"))["status"] == "running"  # type: ignore[index]
        await client2.disconnect()


async def test_query_path_checks_and_routes_on_a_real_qemu(short_tmp: Path) -> None:
    """`query` (the watcher's path) refuses what `execute` refuses, before writing anything,
    and routes replies and errors to the right caller, beside the library's own path."""
    sock = short_tmp / "vm.qmp"
    with run_qemu(short_tmp, sock, []) as proc:
        client = ReadOnlyQMPClient("t")
        await client.connect(str(sock))
        try:
            status, version = client.query("query-status"), client.query("query-version")
            missing = client.query("qom-get", {"path": "/machine/peripheral/nope", "property": "type"})
            for command in ("stop", "quit", "system_reset", "qom-set"):
                with pytest.raises(ForbiddenCommand):
                    client.query(command)
            assert (await status)["status"] == "running"  # type: ignore[index]
            assert (await version)["qemu"]["major"] >= 7  # type: ignore[index]
            with pytest.raises(ExecuteError) as err:
                await missing
            assert err.value.error_class == "DeviceNotFound"
            assert (await client.execute("query-status"))["status"] == "running"  # type: ignore[index]
            assert client.lines_received == 4  # the reader task's: greeting and capabilities come before
        finally:
            await client.disconnect()
        assert proc.poll() is None  # QEMU still alive: "quit" never arrived


class _HangsUpOnQueryName(FakeQMP):
    async def on_command(self, conn: FakeConn, msg: dict[str, Any]) -> None:
        if msg.get("execute") == "query-name":
            conn.close()
        else:
            await self.answer(conn, msg, str(msg.get("execute")))


async def test_query_pending_when_qemu_hangs_up_fails_with_exec_interrupted(short_tmp: Path) -> None:
    sock = str(short_tmp / "hangup.qmp")
    async with _HangsUpOnQueryName(sock, "hangup"):
        client = ReadOnlyQMPClient("t")
        await client.connect(sock)
        try:
            status, name = client.query("query-status"), client.query("query-name")
            assert (await status)["status"] == "running"  # type: ignore[index]
            with pytest.raises(ExecInterruptedError):
                await name
            assert client.runstate == Runstate.DISCONNECTING  # the library tore the session down
            with pytest.raises(ExecInterruptedError):
                client.query("query-status")  # nothing is written to a dead session
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def test_commands_leave_no_cyclic_garbage(short_tmp: Path) -> None:
    """Every command of every VM goes through one path in the watcher: a reference cycle there
    is ~90,000 objects for the cyclic GC to find when 1000 VMs connect
    (docs/performance-history.md).
    Measured over 50 polls of a watch session (query-status and query-blockstats each)."""
    srv = FakeQMP(str(short_tmp / "gc.qmp"), "gc")

    def polls() -> int:
        return sum(conn.commands.count("query-blockstats") for conn in srv.conns)

    def more_polls(n: int) -> Callable[[], Awaitable[bool]]:
        target = polls() + n

        async def polled() -> bool:
            return polls() >= target

        return polled

    async with watching(srv, poll_interval_seconds=0.01):
        await wait_for(more_polls(5), 10, "the first polls")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await wait_for(more_polls(50), 10, "50 polls", step=0.01)
            gc.collect()
            garbage = [type(o).__qualname__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert garbage == []
