"""``qemu-iohang-check --libvirt.uri`` against a real libvirtd running a domain on Debian's
QEMU (no retry policy there: a domain with ``error_policy='stop'`` is the violation to find),
and ``--xml`` on the same domain's definition as ``virsh dumpxml --inactive`` writes it, and on
the file a domain is defined from before ``virsh define`` gives it a uuid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt.lab import DiskOptions, LibvirtLab
from tests.support.procs import REPO

pytestmark = pytest.mark.libvirt


def check(*args: str) -> tuple[int, list[dict[str, Any]]]:
    r = subprocess.run(
        [sys.executable, "-m", "exporter.tools.check", "--output=json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)["rows"]


def test_check_reads_running_domains_and_their_definitions(libvirt_lab: LibvirtLab, tmp_path: Path) -> None:
    dom = libvirt_lab.domain(DiskOptions(error_policy="stop"), wait_booted=False)
    code, rows = check(f"--libvirt.uri={libvirt_lab.libvirtd.uri}")
    assert code == 1
    mine = [(r["device"], r["werror"], r["rerror"], r["rules"]) for r in rows if r["vm"] == dom.name]
    assert mine == [("ua-boot", "stop", "stop", ["werror_not_retry", "rerror_not_retry"])]

    xml = tmp_path / "dest.xml"
    xml.write_text(dom.virsh("dumpxml", "--inactive", dom.name))
    code, rows = check("--xml", str(xml))
    assert code == 1
    assert [(r["vm"], r["device"], r["werror"], r["rules"]) for r in rows] == [
        (dom.name, "ua-boot", "stop", ["werror_not_retry", "rerror_not_retry"])
    ]


#: openEuler's retry policy as the seed gives it (2 s / 10 s), through ``<qemu:override>``: Debian's
#: libvirt knows no ``error_policy='retry'``, and an override is accepted at define (QEMU, which
#: would refuse ``retry``, only sees it at start; this domain is never started).
SEED_RETRY_OVERRIDE = (
    ("werror", "string", "retry"),
    ("rerror", "string", "retry"),
    ("retry_interval", "unsigned", "2000"),
    ("retry_timeout", "unsigned", "10000"),
)


def test_check_a_definition_before_and_after_virsh_define(libvirt_lab: LibvirtLab, tmp_path: Path) -> None:
    """The file a domain is defined from has no <uuid> (libvirt assigns one): the check gives
    the same answer on it as on ``virsh dumpxml --inactive`` of the defined domain."""
    disk = DiskOptions(error_policy=None, override=SEED_RETRY_OVERRIDE)
    dom = libvirt_lab.domain(disk, second_disk=True, start=False)
    assert "<uuid>" not in dom.xml and not dom.is_active()
    before = tmp_path / "before.xml"
    before.write_text(dom.xml)
    after = tmp_path / "after.xml"
    after.write_text(dom.virsh("dumpxml", "--inactive", dom.name))
    uuid = dom.uuid()
    assert f"<uuid>{uuid}</uuid>" in after.read_text()
    for path, expected_uuid in ((before, ""), (after, uuid)):
        code, rows = check("--xml", str(path))
        assert code == 1, (path, rows)
        got = [
            (r["vm"], r["uuid"], r["device"], r["werror"], r["rerror"], r["retry_interval_ms"],
             r["retry_timeout_ms"], r["verdict"])
            for r in rows
        ]  # fmt: skip
        assert got == [
            (dom.name, expected_uuid, "ua-boot", "retry", "retry", 2000, 10000, "ok"),
            (dom.name, expected_uuid, "vdb", "enospc", "report", None, None, "violation"),
        ], path
