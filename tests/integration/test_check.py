"""``qemu-iohang-check`` as a subprocess against simulated QEMUs over real unix sockets, domain
XML fixtures, and a running exporter; its table, its JSON and its exit status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from qmpsim import DiskSpec, SimVM
from tests.integration.test_exporter_sim import retry_disk, running
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO
from tests.support.waits import wait_for

XML = REPO / "tests" / "fixtures" / "libvirt-xml"


def check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def acheck(*args: str) -> subprocess.CompletedProcess[str]:
    """`check` without blocking the event loop the simulated VMs run on."""
    return await asyncio.to_thread(check, *args)


def rows(r: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == r.returncode and doc["compliant"] == (r.returncode == 0)
    out: list[dict[str, Any]] = doc["rows"]
    return out


def retry(id: str, timeout_ms: int = 10_000, **kw: Any) -> DiskSpec:
    return retry_disk(id, retry_timeout_ms=timeout_ms, **kw)


def good(d: Path) -> SimVM:
    return SimVM(
        str(d / "good.qmp"), name="good", disks=[retry("virtio-disk0"), retry("scsi0-0-0-0", type="scsi-hd")]
    )


def bad(d: Path) -> SimVM:
    return SimVM(
        str(d / "bad.qmp"),
        name="bad",
        disks=[retry("virtio-disk0"), retry("virtio-disk1", policy_on="drive")],
    )


async def test_qmp_sockets_compliant_then_violating(short_tmp: Path) -> None:
    async with running([good(short_tmp), bad(short_tmp)]):
        r = await acheck(f"--qmp.socket={short_tmp / 'good.qmp'}")
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == [
            "VM",
            "DEVICE",
            "WERROR/RERROR",
            "RETRY_INTERVAL",
            "RETRY_TIMEOUT",
            "VERDICT",
            "RULE",
        ]
        assert lines[1].split() == ["good", "scsi0-0-0-0", "retry/retry", "1s", "10s", "ok", "-"]
        assert lines[2].split() == ["good", "virtio-disk0", "retry/retry", "1s", "10s", "ok", "-"]

        r = await acheck(f"--qmp.glob={short_tmp / '*.qmp'}", "--output=json")
        assert r.returncode == 1, r.stdout + r.stderr
        by = {(x["vm"], x["device"]): x for x in rows(r)}
        assert set(by) == {
            ("good", "virtio-disk0"),
            ("good", "scsi0-0-0-0"),
            ("bad", "virtio-disk0"),
            ("bad", "virtio-disk1"),
        }
        assert by[("bad", "virtio-disk1")]["verdict"] == "violation"
        assert by[("bad", "virtio-disk1")]["rules"] == ["policy_not_visible"]
        assert by[("bad", "virtio-disk1")]["werror"] == "auto"
        assert by[("bad", "virtio-disk0")]["verdict"] == "ok"

        # The same policy options as the exporter: a 5 s maximum makes the 10 s timeouts violate.
        cfg = short_tmp / "policy.yml"
        cfg.write_text(yaml.safe_dump({"policy": {"max_timeout_seconds": 5}}))
        r = await acheck(f"--config.file={cfg}", f"--qmp.socket={short_tmp / 'good.qmp'}")
        assert r.returncode == 1
        assert "timeout_above_max" in r.stdout and "Lower retry_timeout to at most 5 s" in r.stdout


async def test_paused_on_io_error_is_not_compliant(short_tmp: Path) -> None:
    vm = SimVM(
        str(short_tmp / "p.qmp"), name="p", disks=[DiskSpec(id="virtio-disk0", werror="stop", in_flight=0)]
    )
    async with running([vm]):
        vm.link_down("virtio-disk0", in_flight=1, operations=("write",))

        async def paused() -> bool:
            return vm.status == "io-error"

        await wait_for(paused, 10, "the VM paused on io-error")
        r = await acheck(f"--qmp.socket={short_tmp / 'p.qmp'}", "--output=json")
        assert r.returncode == 1
        assert [x["verdict"] for x in rows(r)] == ["violation+io-error"]


async def test_socket_held_by_the_exporter_then_read_through_it(short_tmp: Path) -> None:
    hang = SimVM(str(short_tmp / "hang.qmp"), name="hang", disks=[retry("virtio-disk0", 120_000)])
    async with (
        running([good(short_tmp), hang]),
        ExporterProcess(short_tmp, {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}) as exp,
    ):

        async def both_up() -> bool:
            r = await acheck(f"--exporter.url={exp.url}", "--output=json")
            return r.returncode == 0 and len(rows(r)) == 3

        await wait_for(both_up, 15, "the exporter to see both VMs")
        # One client per QMP monitor: the exporter has it, the check gets no greeting.
        r = await acheck(f"--qmp.socket={short_tmp / 'good.qmp'}", "--timeout=1")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "no QMP greeting" in r.stdout and "--exporter.url" in r.stdout
        hang.link_down("virtio-disk0", in_flight=1, operations=("write",))

        async def hanging() -> subprocess.CompletedProcess[str] | None:
            r = await acheck(f"--exporter.url={exp.url}/")
            return r if r.returncode == 1 else None

        r = await wait_for(hanging, 15, "check to report the hang")
        line = next(x for x in r.stdout.splitlines() if x.startswith("hang "))
        assert line.split() == ["hang", "virtio-disk0", "retry/retry", "1s", "120s", "hanging", "-"]


def test_xml_files_running_and_not() -> None:
    r = check("--xml", str(XML / "inactive-retry.xml"), str(XML / "openeuler-retry.xml"), "--output=json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted((x["vm"], x["device"]) for x in rows(r)) == [
        ("dest-retry", "sdb"), ("dest-retry", "vda"), ("oe-retry", "scsi0-0-0-0"), ("oe-retry", "virtio-disk1")
    ]  # fmt: skip
    r = check("--xml", str(XML / "inactive-no-retry.xml"), "--output=json")
    assert r.returncode == 1
    assert [(x["device"], x["werror"], x["rerror"], x["rules"]) for x in rows(r)] == [
        ("vda", "stop", "stop", ["werror_not_retry", "rerror_not_retry"]),
        ("vdb", "enospc", "report", ["werror_not_retry", "rerror_not_retry"]),
    ]
    r = check("--xml", str(XML / "override.xml"))
    assert r.returncode == 1 and "ua-disk1" in r.stdout and "rerror_not_retry" in r.stdout


def test_exit_2_on_bad_usage_or_nothing_read(tmp_path: Path) -> None:
    broken = tmp_path / "broken.xml"
    broken.write_text("<domain><name>x</name>")
    for args in (
        ["--bogus"],
        ["--output=yaml", "--xml", str(XML / "inactive-retry.xml")],
        ["--exporter.url=ftp://example"],
        ["--libvirt.uri=xen:///system"],
        ["--timeout=0", "--xml", str(XML / "inactive-retry.xml")],
        ["--xml", str(broken)],
        ["--xml", str(tmp_path / "missing.xml")],
        [f"--qmp.socket={tmp_path / 'nothing.qmp'}"],
        [f"--qmp.glob={tmp_path / '*.qmp'}"],
    ):
        r = check(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("qemu-iohang-check: "), (args, r.stderr)
    # Something read, something not: not proven compliant.
    r = check("--xml", str(XML / "inactive-retry.xml"), str(broken))
    assert r.returncode == 1 and "not well-formed" in r.stderr
    # No source at all: the config's sockets/globs, like the exporter.
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"qmp": {"globs": [str(tmp_path / "*.qmp")]}}))
    r = check(f"--config.file={cfg}")
    assert r.returncode == 2 and "no socket matches" in r.stderr
