"""What the exporter says at start-up about the sockets it looks for, as a new user sees it: with
nothing there yet it must not log only "listening" (issue #28), and it says so once, not per scan."""

from __future__ import annotations

import signal
from pathlib import Path

from qmpsim import SimVM
from tests.sim.test_exporter_sim import retry_disk, running
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.waits import wait_for

NOTHING_YET = 'msg="no QMP socket found yet: watching for them"'
WATCHING = 'msg="watching QMP sockets"'


def lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


async def test_nothing_there_yet_is_said_once_then_each_socket_as_it_appears(short_tmp: Path) -> None:
    run = short_tmp / "run"  # does not exist yet, as /run/qemu-iohang-exporter on a fresh host
    pattern, missing = str(run / "*.qmp"), str(short_tmp / "db1.qmp")
    cfg = {"qmp": {"globs": [pattern], "sockets": [missing], **FAST}, "log": {"level": "info"}}
    exp = ExporterProcess(short_tmp, cfg)
    await exp.start()
    try:
        # The configured socket's connection attempts outlast several discovery scans (0.2 s).
        await exp.wait_metrics(
            lambda m: (
                (m.value("qemu_exporter_qmp_connect_errors_total", vm="db1", reason="not_found") or 0) >= 5
            ),
            what="five failed connects to the missing socket",
        )
        run.mkdir()
        async with running([SimVM(str(run / "a.qmp"), name="a", disks=[retry_disk("virtio-disk0")])]):
            await exp.wait_metrics(lambda m: m.value("qemu_qmp_up", vm="a") == 1, what="vm a up")
    finally:
        assert exp.stop(signal.SIGTERM) == 0
    log = exp.log()
    [first] = lines(log, NOTHING_YET)
    assert f'globs={pattern} sockets={missing} reason="{run} does not exist"' in first, first
    assert lines(log, WATCHING) == []
    assert len(lines(log, f'msg="QMP socket missing: watching for it" socket={missing}')) == 1
    assert len(lines(log, f'msg="QMP socket found" socket={run / "a.qmp"}')) == 1
    assert lines(log, f'msg="QMP socket found" socket={missing}') == []


async def test_sockets_already_there_are_counted_once(short_tmp: Path) -> None:
    pattern = str(short_tmp / "*.qmp")
    cfg = {"qmp": {"globs": [pattern], **FAST}, "log": {"level": "info"}}
    vm = SimVM(str(short_tmp / "a.qmp"), name="a", disks=[retry_disk("virtio-disk0")])
    async with running([vm]), ExporterProcess(short_tmp, cfg) as exp:
        await exp.wait_metrics(lambda m: m.value("qemu_qmp_up", vm="a") == 1, what="vm a up")
        log = exp.log()
    [line] = lines(log, WATCHING)
    assert f'globs={pattern} sockets="" found=1' in line, line
    assert lines(log, NOTHING_YET) == []


async def test_default_glob_is_named(short_tmp: Path) -> None:
    """No socket or glob configured: the line names the default glob (whether or not this
    machine has sockets there)."""
    async with ExporterProcess(short_tmp, {"log": {"level": "info"}}) as exp:

        async def announced() -> list[str]:
            return lines(exp.log(), NOTHING_YET) + lines(exp.log(), WATCHING)

        [line] = await wait_for(announced, 10, "the discovery line")
    assert (NOTHING_YET in line or WATCHING in line) and "globs=/run/qemu-iohang-exporter/*.qmp " in line, (
        line
    )


async def test_libvirt_down_is_logged_once_in_the_log_format(short_tmp: Path) -> None:
    """libvirt-python prints ``libvirt: XML-RPC error : ...`` on stderr for every failed call
    unless told not to: one raw line per reconnect attempt between the logfmt lines."""
    uri = f"qemu+unix:///system?socket={short_tmp / 'no-libvirt-sock'}"
    cfg = {
        "libvirt": {"uri": uri},
        "qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST},
        "log": {"level": "info"},
    }
    exp = ExporterProcess(short_tmp, cfg)
    await exp.start()
    try:
        await exp.wait_metrics(
            lambda m: m.sum("qemu_exporter_libvirt_connect_errors_total", uri=uri) >= 3,
            what="three failed libvirt connects",
        )
    finally:
        assert exp.stop(signal.SIGTERM) == 0
    log = exp.log().splitlines()
    assert [line for line in log if not line.startswith("ts=")] == []
    assert len([line for line in log if 'msg="libvirt connect failed"' in line]) == 1
