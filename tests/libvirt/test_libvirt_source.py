"""The libvirt source against a real libvirtd: domains on Debian's QEMU, NBD storage that fails on
demand, the exporter as a subprocess with ``libvirt.uri`` and nothing changed on any domain.

Independent witnesses: ``virsh qemu-monitor-event`` (another libvirt client) counts the
BLOCK_IO_ERRORs, ``virsh domstate`` the run state, and the domain log the taints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.libvirt.lab import DiskOptions, LabDomain, LibvirtLab
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO
from tests.support.scrape import Metrics
from tests.support.waits import wait_for

pytestmark = pytest.mark.libvirt


def exporter_config(tmp: Path, uri: str) -> dict[str, Any]:
    return {
        "libvirt": {"uri": uri, "call_timeout_seconds": 10, "relist_interval_seconds": 30},
        # An empty glob: only libvirt is watched.
        "qmp": {"globs": [str(tmp / "*.qmp")], "poll_interval_seconds": 1, "backoff_max_seconds": 1},
        "hang": {"state_file": str(tmp / "hangs.json"), "recovery_margin_seconds": 1},
    }


_witness_loop = threading.Lock()
_witness_started: list[bool] = []


def _libvirt_event_loop() -> None:
    """libvirt's default event loop in a daemon thread of the test process (once)."""
    import libvirt

    with _witness_loop:
        if _witness_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, daemon=True).start()
        _witness_started.append(True)


@contextmanager
def io_error_witness(dom: LabDomain) -> Iterator[list[dict[str, Any]]]:
    """The domain's BLOCK_IO_ERRORs as a second, independent libvirt client receives them.
    Registered before this returns, so no event of the test can be missed."""
    import libvirt
    import libvirt_qemu

    _libvirt_event_loop()
    conn = libvirt.open(dom.libvirtd.uri)
    seen: list[dict[str, Any]] = []

    def on_event(_c: Any, _d: Any, _event: str, _s: int, _us: int, details: str, _o: Any) -> None:
        seen.append(json.loads(details))

    target = conn.lookupByName(dom.name)
    callback = libvirt_qemu.qemuMonitorEventRegister(conn, target, "BLOCK_IO_ERROR", on_event, None)
    try:
        yield seen
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_qemu.qemuMonitorEventDeregister(conn, callback)
        conn.close()


async def wait_metrics(exp: ExporterProcess, check: Any, what: str, timeout: float = 20.0) -> Metrics:
    try:
        return await exp.wait_metrics(check, timeout=timeout, what=what)
    except AssertionError:
        m = await exp.scrape()
        lines = [
            ln
            for ln in m.text.splitlines()
            if "io_error" in ln or "hang" in ln or "_up" in ln or "status" in ln
        ]
        raise AssertionError(
            f"{what}: timed out; now:\n" + "\n".join(lines) + "\nlog:\n" + exp.log()[-3000:]
        ) from None


def watched(m: Metrics, dom: LabDomain, device: str = "ua-boot") -> bool:
    return (
        m.sum("qemu_qmp_up", vm=dom.name) == 1
        and bool(m.find("qemu_block_device_info", vm=dom.name, device=device))
        and bool(m.find("qemu_block_read_operations_total", vm=dom.name, device=device))
    )


async def test_policy_state_and_stop_hang_through_libvirt(libvirt_lab: LibvirtLab, short_tmp: Path) -> None:
    dom = libvirt_lab.domain(DiskOptions(error_policy="stop"), hint="stop", second_disk=True)
    async with ExporterProcess(short_tmp, exporter_config(short_tmp, libvirt_lab.libvirtd.uri)) as exp:
        m = await wait_metrics(exp, lambda m: watched(m, dom), "the domain watched")
        assert m.sum("qemu_libvirt_up", uri=libvirt_lab.libvirtd.uri) == 1
        info = m.find("qemu_block_device_info", vm=dom.name, device="ua-boot")[0].labels
        assert (info["werror"], info["rerror"], info["qdev_type"]) == ("stop", "stop", "virtio-blk")
        assert m.label_values("qemu_block_retry_policy_violation", "rule", vm=dom.name, device="ua-boot") == {
            "werror_not_retry",
            "rerror_not_retry",
        }
        # The local file disk has no policy at all: QEMU's defaults, enospc / report.
        vdb = m.find("qemu_block_device_info", vm=dom.name, device="virtio-disk1")[0].labels
        assert (vdb["werror"], vdb["rerror"]) == ("enospc", "report")
        # Storage backends from the live XML's <source>: the NBD server, and the local file's
        # filesystem (whatever it is mounted from, never the NBD server or "unknown").
        nbd_backend = f"nbd://127.0.0.1:{dom.storage.port}"
        assert info["backend"] == nbd_backend
        assert vdb["backend"] not in (nbd_backend, "unknown", "")
        assert m.value("qemu_vm_status", vm=dom.name, status="running") == 1
        assert m.value("qemu_vm_info", vm=dom.name, uuid=dom.uuid(), socket=libvirt_lab.libvirtd.uri) == 1
        # What a Prometheus asks for: OpenMetrics, libvirt's own families included, strictly parsed.
        from prometheus_client.openmetrics.parser import text_string_to_metric_families

        from bench.prometheus import PROMETHEUS_3_ACCEPT

        async with (
            aiohttp.ClientSession() as s,
            s.get(exp.url + "/metrics", headers={"Accept": PROMETHEUS_3_ACCEPT}) as r,
        ):
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        assert families["qemu_libvirt_up"].samples[0].value == 1

        with io_error_witness(dom) as witnessed:
            dom.fail_storage()
            dom.wait_state("paused", "I/O error")
            m = await wait_metrics(
                exp,
                lambda m: (
                    m.sum("qemu_block_io_hang", vm=dom.name, device="ua-boot") == 1
                    and m.value("qemu_vm_status", vm=dom.name, status="io-error") == 1
                ),
                "the stop-policy hang",
            )
            hanging = {s.labels["backend"]: s.value for s in m.find("qemu_storage_backend_hanging_disks")}
            assert hanging == {nbd_backend: 1, vdb["backend"]: 0}
            start = m.value("qemu_block_io_hang_start_timestamp_seconds", vm=dom.name, device="ua-boot")
            assert start is not None and abs(start - time.time()) < 60
            # Resumed while the storage still fails: the request fails again, QEMU pauses again.
            dom.resume()
            dom.wait_state("paused", "I/O error")
            await wait_metrics(
                exp,
                lambda m: (
                    m.sum("qemu_block_io_error_events_total", vm=dom.name, device="ua-boot", action="stop")
                    == len(witnessed)
                    >= 2
                ),
                f"every stop error counted, as the witness saw them ({witnessed})",
            )
            dom.restore_storage()
            dom.resume()
            dom.wait_io()
            m = await wait_metrics(
                exp,
                lambda m: (
                    m.sum("qemu_block_io_hangs_total", vm=dom.name, device="ua-boot", outcome="recovered")
                    == 1
                    and m.sum("qemu_block_io_hang", vm=dom.name, device="ua-boot") == 0
                ),
                "the hang ended by virsh resume",
            )
            assert m.sum("qemu_block_io_error_events_total", vm=dom.name, device="ua-boot") == len(witnessed)
            assert m.sum("qemu_block_io_hang_seconds_total", vm=dom.name, device="ua-boot") > 0
    assert dom.taints() == set(), dom.taint_lines()


async def test_report_policy_errors_counted_exactly(libvirt_lab: LibvirtLab, short_tmp: Path) -> None:
    dom = libvirt_lab.domain(DiskOptions(error_policy="report"), hint="report")
    async with ExporterProcess(short_tmp, exporter_config(short_tmp, libvirt_lab.libvirtd.uri)) as exp:
        await wait_metrics(exp, lambda m: watched(m, dom), "the domain watched")
        with io_error_witness(dom) as witnessed:
            dom.fail_storage()
            dom.wait_injected_errors(20)
            dom.restore_storage()
            dom.wait_io()
            assert dom.domstate()[0] == "running"  # report: the guest sees errors, runs on

            def settled(m: Metrics) -> bool:
                got = m.sum(
                    "qemu_block_io_error_events_total", vm=dom.name, device="ua-boot", action="report"
                )
                return got == len(witnessed) >= 20

            m = await wait_metrics(exp, settled, "every report error counted, as the witness saw them")
        assert m.sum("qemu_block_io_error_events_unmatched_total", vm=dom.name) == 0
        assert m.sum("qemu_block_io_hang", vm=dom.name, device="ua-boot") == 0  # report is no hang
    assert dom.taints() == set(), dom.taint_lines()


async def test_domains_started_and_destroyed_are_followed(libvirt_lab: LibvirtLab, short_tmp: Path) -> None:
    first = libvirt_lab.domain(DiskOptions(error_policy="report"), hint="first")
    async with ExporterProcess(short_tmp, exporter_config(short_tmp, libvirt_lab.libvirtd.uri)) as exp:
        await wait_metrics(exp, lambda m: watched(m, first), "the first domain watched")
        second = libvirt_lab.domain(DiskOptions(error_policy="stop", alias=None), hint="second", start=False)
        t0 = time.monotonic()
        libvirt_lab.start(second, wait_booted=False)
        await wait_metrics(
            exp, lambda m: watched(m, second, "virtio-disk0"), "the started domain watched", timeout=10
        )
        appeared = time.monotonic() - t0
        first.destroy()  # returns once QEMU is gone: from then on it must leave within 2 s
        t0 = time.monotonic()
        await wait_metrics(
            exp, lambda m: not m.find("qemu_qmp_up", vm=first.name), "the destroyed domain gone"
        )
        gone = time.monotonic() - t0
        print(f"started domain visible after {appeared:.2f} s, destroyed domain gone after {gone:.2f} s")
        assert appeared < 2.0 and gone < 2.0
    assert second.taints() == set(), second.taint_lines()


async def test_a_hot_plugged_disk_is_watched_at_once(libvirt_lab: LibvirtLab, short_tmp: Path) -> None:
    """QEMU announces no plug, libvirt does (DEVICE_ADDED): the new disk and its policy show
    without waiting for the periodic re-listing (30 s here)."""
    dom = libvirt_lab.domain(DiskOptions(error_policy="report"), hint="plug")
    image = libvirt_lab.workdir / f"{dom.name}-plugged.img"
    with image.open("wb") as f:
        f.truncate(1 << 20)
    image.chmod(0o666)
    async with ExporterProcess(short_tmp, exporter_config(short_tmp, libvirt_lab.libvirtd.uri)) as exp:
        await wait_metrics(exp, lambda m: watched(m, dom), "the domain watched")
        dom.virsh("attach-disk", dom.name, str(image), "vdc", "--targetbus", "virtio", "--live")
        t0 = time.monotonic()
        m = await wait_metrics(
            exp,
            lambda m: bool(m.find("qemu_block_device_info", vm=dom.name, device="virtio-disk2")),
            "the new disk",
        )
        assert time.monotonic() - t0 < 5
        info = m.find("qemu_block_device_info", vm=dom.name, device="virtio-disk2")[0].labels
        assert (info["werror"], info["rerror"]) == ("enospc", "report")


async def test_libvirtd_restarted_mid_hang_keeps_the_hang(libvirt_lab: LibvirtLab, short_tmp: Path) -> None:
    dom = libvirt_lab.domain(DiskOptions(error_policy="stop"), hint="restart")
    libvirtd = libvirt_lab.libvirtd
    libvirtd.require_owned()
    async with ExporterProcess(short_tmp, exporter_config(short_tmp, libvirt_lab.libvirtd.uri)) as exp:
        await wait_metrics(exp, lambda m: watched(m, dom), "the domain watched")
        dom.fail_storage()
        dom.wait_state("paused", "I/O error")
        m = await wait_metrics(
            exp, lambda m: m.sum("qemu_block_io_hang", vm=dom.name, device="ua-boot") == 1, "the hang"
        )
        start = m.value("qemu_block_io_hang_start_timestamp_seconds", vm=dom.name, device="ua-boot")
        errors = m.sum("qemu_block_io_error_events_total", vm=dom.name, device="ua-boot")

        libvirtd.kill()
        await wait_metrics(
            exp,
            lambda m: (
                m.sum("qemu_libvirt_up", uri=libvirt_lab.libvirtd.uri) == 0
                and m.sum("qemu_qmp_up", vm=dom.name) == 0
            ),
            "libvirt seen down",
        )
        libvirtd.restart()
        m = await wait_metrics(
            exp,
            lambda m: (
                m.sum("qemu_libvirt_up", uri=libvirt_lab.libvirtd.uri) == 1
                and m.sum("qemu_block_io_hang", vm=dom.name, device="ua-boot") == 1
            ),
            "the hang seen again after the restart",
            timeout=30,
        )
        assert m.value("qemu_block_io_hang_start_timestamp_seconds", vm=dom.name, device="ua-boot") == start
        assert m.sum("qemu_block_io_error_events_total", vm=dom.name, device="ua-boot") == errors
        assert m.sum("qemu_block_io_hangs_total", vm=dom.name, device="ua-boot") == 0

        dom.restore_storage()
        dom.resume()
        m = await wait_metrics(
            exp,
            lambda m: (
                m.sum("qemu_block_io_hangs_total", vm=dom.name, device="ua-boot", outcome="recovered") == 1
            ),
            "one hang, recovered",
        )
        assert m.sum("qemu_block_io_hangs_total", vm=dom.name, device="ua-boot") == 1
        assert m.sum("qemu_exporter_libvirt_connect_errors_total", uri=libvirt_lab.libvirtd.uri) >= 0
    assert dom.taints() == set(), dom.taint_lines()


async def test_domain_already_paused_on_io_error_is_shown_hanging(
    libvirt_lab: LibvirtLab, short_tmp: Path
) -> None:
    """Stuck before the exporter started: the hang is shown from when it is first seen (the
    failed disk from libvirt's read-only diskErrors), and ends like any other."""
    dom = libvirt_lab.domain(DiskOptions(error_policy="stop"), hint="stuck")
    dom.fail_storage()
    dom.wait_state("paused", "I/O error")
    t_seen = time.time()
    async with ExporterProcess(short_tmp, exporter_config(short_tmp, libvirt_lab.libvirtd.uri)) as exp:
        m = await wait_metrics(
            exp,
            lambda m: m.sum("qemu_block_io_hang", vm=dom.name, device="ua-boot") == 1,
            "the hang shown",
        )
        start = m.value("qemu_block_io_hang_start_timestamp_seconds", vm=dom.name, device="ua-boot")
        assert start is not None and t_seen <= start <= time.time()
        assert m.sum("qemu_vm_status", vm=dom.name, status="io-error") == 1
        dom.restore_storage()
        dom.resume()
        await wait_metrics(
            exp,
            lambda m: (
                m.sum("qemu_block_io_hangs_total", vm=dom.name, device="ua-boot", outcome="recovered") == 1
            ),
            "the hang ended by virsh resume",
        )
    assert dom.taints() == set(), dom.taint_lines()


async def test_a_stopped_libvirtd_never_delays_a_scrape(libvirt_lab: LibvirtLab, short_tmp: Path) -> None:
    """libvirtd frozen (SIGSTOP): every libvirt call blocks.  Scrapes stay instant, the
    connection is given up after the call timeout, and it comes back when libvirtd does."""
    import os
    import signal

    dom = libvirt_lab.domain(DiskOptions(error_policy="report"), hint="frozen")
    libvirtd = libvirt_lab.libvirtd
    libvirtd.require_owned()
    config = exporter_config(short_tmp, libvirtd.uri)
    config["libvirt"]["call_timeout_seconds"] = 2
    async with ExporterProcess(short_tmp, config) as exp:
        await wait_metrics(exp, lambda m: watched(m, dom), "the domain watched")
        pid = libvirtd.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            worst = 0.0

            async def given_up() -> Metrics | None:
                nonlocal worst
                t0 = time.monotonic()
                m = await exp.scrape()
                worst = max(worst, time.monotonic() - t0)  # every scrape stays fast meanwhile
                return m if m.sum("qemu_libvirt_up", uri=libvirtd.uri) == 0 else None

            m = await wait_for(given_up, 20, "the frozen libvirtd to be given up", step=0.1)
            assert m.sum("qemu_qmp_up", vm=dom.name) == 0
            assert worst < 0.5, worst
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_metrics(
            exp,
            lambda m: m.sum("qemu_libvirt_up", uri=libvirtd.uri) == 1 and watched(m, dom),
            "libvirt back",
            timeout=30,
        )
        m = await exp.scrape()
        assert m.sum("qemu_exporter_libvirt_call_errors_total", uri=libvirtd.uri, reason="timeout") >= 1


async def test_a_vm_seen_through_libvirt_and_a_second_monitor_is_reported_once(
    libvirt_lab: LibvirtLab, short_tmp: Path
) -> None:
    short_tmp.chmod(0o755)
    sockets = short_tmp / "sockets"
    sockets.mkdir()
    sockets.chmod(0o777)  # QEMU (libvirt-qemu) creates its second monitor here
    dom = libvirt_lab.domain(DiskOptions(error_policy="stop"), hint="both", qmp_monitor=sockets / "both.qmp")
    config = exporter_config(short_tmp, libvirt_lab.libvirtd.uri)
    config["qmp"]["globs"] = [str(sockets / "*.qmp")]
    async with ExporterProcess(short_tmp, config) as exp:
        qmp_socket = str(sockets / "both.qmp")
        await wait_metrics(
            exp, lambda m: m.sum("qemu_libvirt_up", uri=libvirt_lab.libvirtd.uri) == 1, "libvirt up"
        )
        # libvirt may see the domain before its QMP session is up (then libvirt reports it, once);
        # once the session is up, it reports the VM, and libvirt no longer does.
        m = await wait_metrics(
            exp,
            lambda m: (
                watched(m, dom)
                and any(s.labels["socket"] == qmp_socket for s in m.find("qemu_vm_info", vm=dom.name))
            ),
            "the domain watched through its QMP session",
        )
        (info,) = m.find("qemu_vm_info", vm=dom.name)
        assert info.labels["socket"] == qmp_socket  # its QMP session reports it
        assert info.labels["uuid"] == dom.uuid()
        assert len(m.find("qemu_block_device_info", vm=dom.name, device="ua-boot")) == 1
        assert m.value("qemu_exporter_vms") == 1


async def test_libvirt_uri_without_binding_is_one_clear_line(short_tmp: Path) -> None:
    """Without libvirt-python, --libvirt.uri exits 2 with one line saying what to install
    (``sys.modules['libvirt'] = None`` makes the import fail as if it were not installed)."""
    import sys

    code = (
        "import sys; sys.modules['libvirt'] = None; from exporter.cli import main; "
        "sys.exit(main(['--libvirt.uri=qemu:///system']))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await proc.communicate()
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "pip install 'qemu-iohang-exporter[libvirt]'" in lines[0], lines
