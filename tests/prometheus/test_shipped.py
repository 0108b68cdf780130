"""Shipped files work as shipped: no placeholders, and what depends on the site (image, socket
group) either has a working default or stops with a message saying what to set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import exporter
from tests.prometheus.artefacts import ROOT
from tests.support.binaries import skip_or_fail

K8S = ROOT / "deploy" / "kubernetes"
DAEMONSET = K8S / "daemonset.yml"
KUSTOMIZATION = K8S / "kustomization.yml"
SYSUSERS = ROOT / "deploy" / "systemd" / "qemu-iohang-exporter.sysusers"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
IMAGE = f"localhost/qemu-iohang-exporter:{exporter.__version__}"

#: What an operator installs or applies as it is (documentation may show examples; these may not).
SHIPPED = sorted(
    p
    for p in [
        *(ROOT / "deploy").rglob("*"),
        *(ROOT / "dashboards").rglob("*"),
        ROOT / "alerts" / "generate.py",
        ROOT / "alerts" / "qemu-iohang.rules.yml",
    ]
    if p.is_file() and "__pycache__" not in p.parts
)

PLACEHOLDERS = re.compile(
    r"""
      \bexample\.(?:com|org|net)\b | \.example(?![.\w])  # reserved example domains
    | \bCHANGE[-_ ]?ME\b | \bREPLACE[-_ ]?ME\b | \bTODO\b | \bFIXME\b | \bXXX\b
    | \bReplace\s+\d+                                    # "Replace 990 with your nodes' value"
    | <your[-_ a-z]*> | \byour[-_](?:registry|domain|gid|host)\b
    | github\.com/qemu-iohang-exporter/                  # an invented home of this project
    | \bimage:\s*\S+:latest\b                            # an image nobody built with that tag
    | supplementalGroups:\s*\[\s*(?:1234|990|1000|0)\s*\]
    """,
    re.X | re.I,
)


def _placeholders(text: str) -> list[str]:
    return [m.group(0) for m in PLACEHOLDERS.finditer(text)]


def test_placeholder_patterns_catch_the_old_ones() -> None:
    for sample in (
        "targets: [hypervisor1.example.com:9738]",
        "https://wiki.example/runbooks.md",
        "# TODO: set this",
        "value: CHANGE-ME",
        "# Replace 990 with your nodes' value",
        "supplementalGroups: [990]",
        "image: qemu-iohang-exporter:latest",
        "https://github.com/qemu-iohang-exporter/qemu-iohang-exporter/blob/main/docs/runbooks.md",
        "registry: <your-registry>",
    ):
        assert _placeholders(sample), sample
    assert _placeholders("action: replace\nimage: localhost/qemu-iohang-exporter:0.1.0") == []


def test_shipped_files_list() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED}
    assert {
        "deploy/kubernetes/daemonset.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/container/Containerfile",
        "alerts/generate.py",
        "alerts/qemu-iohang.rules.yml",
        "dashboards/grafana/qemu-iohang-overview.json",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_placeholders(path: Path) -> None:
    found = _placeholders(path.read_text(errors="replace"))
    assert found == [], f"{path.relative_to(ROOT)}: placeholders {found}"


# --- Kubernetes: image -------------------------------------------------------------------------


def _daemonset_pod() -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    return pod


def test_image_is_the_documented_build() -> None:
    """The image every container uses is the one the documented build command makes."""
    pod = _daemonset_pod()
    images = {c["image"] for c in [*pod["initContainers"], *pod["containers"]]}
    assert images == {IMAGE}
    build = f"podman build -f deploy/container/Containerfile -t {IMAGE} ."
    assert build in CONTAINERFILE.read_text()
    assert build in DEPLOY_DOC.read_text()
    assert build in DAEMONSET.read_text()
    kust = yaml.safe_load(KUSTOMIZATION.read_text())
    (entry,) = kust["images"]
    name, tag = IMAGE.rsplit(":", 1)
    assert entry == {"name": name, "newName": name, "newTag": tag}


# --- Kubernetes: the socket group ----------------------------------------------------------------


def _sysusers_gid() -> int:
    for line in SYSUSERS.read_text().splitlines():
        f = line.split()
        if f[:2] == ["g", "qemu-iohang"]:
            return int(f[2])
    raise AssertionError("no 'g qemu-iohang GID' line in the sysusers snippet")


def test_supplemental_group_is_the_shipped_gid() -> None:
    gid = _sysusers_gid()
    assert 100 <= gid < 1000  # a system group
    assert _daemonset_pod()["securityContext"]["supplementalGroups"] == [gid]


def _check_script() -> list[str]:
    (init,) = _daemonset_pod()["initContainers"]
    cmd: list[str] = init["command"]
    assert cmd[:2] == ["python3", "-c"] and cmd[3] == "/run/qemu-iohang-exporter"
    return cmd


def _run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    script = _check_script()[2]
    return subprocess.run(
        [sys.executable, "-c", script, str(directory)], capture_output=True, text=True, timeout=30
    )


def test_socket_dir_check_passes_for_the_pods_group(tmp_path: Path) -> None:
    d = tmp_path / "qmp"
    d.mkdir(mode=0o2770)
    os.chown(d, -1, os.getegid())
    r = _run_check(d)
    assert r.returncode == 0, r.stderr


def test_socket_dir_check_says_what_to_set(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (chown to a group this process is not in)")
    foreign = max({os.getegid(), *os.getgroups()}) + 4321
    d = tmp_path / "qmp"
    d.mkdir()
    d.chmod(0o2770)
    os.chown(d, os.geteuid() + 4321, foreign)  # like root:qemu-iohang for the pod's user
    # Root is exempt from permissions, not from the check: it compares owner and groups.
    r = _run_check(d)
    assert r.returncode == 1
    assert f"supplementalGroups to [{foreign}]" in r.stderr, r.stderr
    assert "deploy/kubernetes/daemonset.yml" in r.stderr
