"""``qemu-iohang-check --libvirt.uri`` against a real libvirtd running a domain on Debian's
QEMU (no retry policy there: a domain with ``error_policy='stop'`` is the violation to find),
and ``--xml`` on the same domain's definition as ``virsh dumpxml --inactive`` writes it."""

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
        [sys.executable, "-m", "exporter.check", "--output=json", *args],
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
