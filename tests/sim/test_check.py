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
from tests.sim.test_exporter_sim import retry_disk, running
from tests.support.config import FAST
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO
from tests.support.waits import wait_for

XML = REPO / "tests" / "fixtures" / "libvirt-xml"


def check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.tools.check", *args],
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


async def test_an_exporter_watching_nothing_or_not_there_says_so(short_tmp: Path) -> None:
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}
    async with ExporterProcess(short_tmp, cfg) as exp:
        r = await acheck(f"--exporter.url={exp.url}")
        url = exp.url
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"qemu-iohang-check: --exporter.url {url}/api/v1/status: the exporter watches no VM (yet)",
        "qemu-iohang-check: nothing could be read",
    ]
    # Stopped: the socket error itself, not urllib's "<urlopen error ...>" wrapping.
    r = await acheck(f"--exporter.url={url}")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == (
        f"qemu-iohang-check: --exporter.url {url}/api/v1/status: [Errno 111] Connection refused"
    )
    # Beside a source that was read, an empty one is said but is no failure.
    r = await acheck(f"--exporter.url={url}", "--xml", str(XML / "seed-disks.xml"))
    assert r.returncode == 1  # an unreachable exporter is one
    async with ExporterProcess(short_tmp, cfg) as exp:
        r = await acheck(f"--exporter.url={exp.url}", "--xml", str(XML / "seed-disks.xml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the exporter watches no VM (yet)" in r.stderr


def test_libvirt_unreachable_said_once(short_tmp: Path) -> None:
    """Not twice: libvirt-python also prints ``libvirt: XML-RPC error : ...`` unless told not to."""
    sock = short_tmp / "no-libvirt-sock"
    uri = f"qemu+unix:///system?socket={sock}"
    r = check(f"--libvirt.uri={uri}")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"qemu-iohang-check: --libvirt.uri {uri}: Failed to connect socket to '{sock}': No such file or directory",
        "qemu-iohang-check: nothing could be read",
    ]


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


def test_seed_xml_verbatim_bare_disks_and_a_domain_without_uuid(tmp_path: Path) -> None:
    """openEuler's documented <disk> examples (verbatim in the fixtures), on their own and in a
    domain file written before `virsh define` (no <uuid>) beside a disk without the policy."""
    r = check("--xml", str(XML / "seed-disks.xml"), "--output=json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(x["vm"], x["uuid"], x["device"], x["werror"], x["rerror"], x["retry_interval_ms"],
             x["retry_timeout_ms"], x["verdict"]) for x in rows(r)] == [
        ("seed-disks", "", "sdb", "retry", "retry", 2000, 10000, "ok"),
        ("seed-disks", "", "vdb", "retry", "retry", 2000, 10000, "ok"),
    ]  # fmt: skip

    # One <disk> as the file's root element: the VM is named after the file.
    seed = (XML / "seed-disks.xml").read_text()
    one = tmp_path / "dest-vdb.xml"
    one.write_text(seed[seed.index("<disk type=") : seed.index("</disk>") + len("</disk>")] + "\n")
    r = check("--xml", str(one))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[1].split() == ["dest-vdb", "vdb", "retry/retry", "2s", "10s", "ok", "-"]

    r = check("--xml", str(XML / "seed-vm.xml"), "--output=json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == ""
    assert [(x["vm"], x["uuid"], x["device"], x["werror"], x["rerror"], x["verdict"], x["rules"])
            for x in rows(r)] == [
        ("seed-vm", "", "sdb", "retry", "retry", "ok", []),
        ("seed-vm", "", "vda", "enospc", "report", "violation", ["werror_not_retry", "rerror_not_retry"]),
        ("seed-vm", "", "vdb", "retry", "retry", "ok", []),
    ]  # fmt: skip
    r = check("--xml", str(XML / "seed-vm.xml"))
    table = [line.split() for line in r.stdout.splitlines()[1:4]]
    assert table == [
        ["seed-vm", "sdb", "retry/retry", "2s", "10s", "ok", "-"],
        ["seed-vm", "vda", "enospc/report", "-", "-", "violation", "werror_not_retry,rerror_not_retry"],
        ["seed-vm", "vdb", "retry/retry", "2s", "10s", "ok", "-"],
    ]


def test_a_disk_qemu_would_refuse_is_not_compliant(tmp_path: Path) -> None:
    """A typo in the policy must not leave the file looking compliant: the disk is unreadable."""
    seed = (XML / "seed-disks.xml").read_text()
    typo = tmp_path / "typo.xml"
    typo.write_text(seed.replace("rerror_policy='retry'", "rerror_policy='retyr'", 1))
    r = check("--xml", str(typo), "--output=json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert [(x["device"], x["verdict"], x["error"]) for x in rows(r)] == [
        ("sdb", "ok", ""),
        ("vdb", "unreadable", "rerror_policy='retyr' is not a libvirt error policy"),
    ]
    # Only the refused disk: read (exit 1, not "nothing could be read"), and not compliant.
    typo.write_text(seed[: seed.index("</disk>") + len("</disk>")].replace("'retry'", "'retyr'", 1))
    r = check("--xml", str(typo))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "unreadable" in r.stdout and "error_policy='retyr'" in r.stdout


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
    assert r.returncode == 2 and f"qmp.globs {tmp_path / '*.qmp'}: no socket matches\n" in r.stderr
    assert "(give --qmp.socket" in r.stderr  # no source given: say which
    # A glob whose directory is missing says so; with a source given, no list of flags.
    r = check(f"--qmp.glob={tmp_path / 'run' / '*.qmp'}")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"qemu-iohang-check: --qmp.glob {tmp_path / 'run' / '*.qmp'}: no socket matches ({tmp_path / 'run'} does not exist)",
        "qemu-iohang-check: nothing could be read",
    ]
