"""Deployment files: systemd unit, sysusers/tmpfiles, example config, container, Kubernetes,
Prometheus and Alertmanager examples, the fleet's agent / central / Alertmanager cluster files."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.prometheus.artefacts import ROOT, RULES_FILE
from tests.support import fleet
from tests.support.binaries import alertmanager_binary, require_binary

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "qemu-iohang-exporter.service"
SYSUSERS = DEPLOY / "systemd" / "qemu-iohang-exporter.sysusers"
TMPFILES = DEPLOY / "systemd" / "qemu-iohang-exporter.tmpfiles"
CONFIG = DEPLOY / "config.example.yml"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
K8S = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
EXEC_START = "/usr/local/bin/qemu-iohang-exporter --config.file=/etc/qemu-iohang-exporter/config.yml"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit -> section -> key -> values (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            section = m.group(1)
            out.setdefault(section, {})
            continue
        assert section is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


# --- systemd ----------------------------------------------------------------------------------

REQUIRED_SERVICE = {
    "User": "qemu-iohang-exporter",
    "ExecStart": EXEC_START,
    "ProtectSystem": "strict",
    "NoNewPrivileges": "yes",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "CapabilityBoundingSet": "",
    "ReadWritePaths": "/var/lib/qemu-iohang-exporter",
    "StateDirectory": "qemu-iohang-exporter",
    "SupplementaryGroups": "qemu-iohang",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    # Liveness (issue 17): READY=1 and WATCHDOG=1 from the exporter, restarted when they stop.
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30s",
    "Restart": "on-failure",
}


def test_unit_hardening_keys() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    for key, value in REQUIRED_SERVICE.items():
        assert svc.get(key, [None])[-1] == value, f"{key}={svc.get(key)} (want {value!r})"
    assert "@system-service" in svc["SystemCallFilter"]
    assert svc["User"] != ["root"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # The same unit through configparser (no duplicate sections, no stray syntax).
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    assert cp["Service"]["ProtectSystem"] == "strict"


def test_parse_unit_rejects_garbage() -> None:
    with pytest.raises(AssertionError):
        parse_unit("[Service]\nProtectSystem strict\n")


def _verify_errors(unit: Path, analyze: str) -> list[str]:
    r = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    # The exporter is not installed here: the only tolerated complaint is its missing binary.
    return [ln for ln in lines if "/usr/local/bin/qemu-iohang-exporter is not executable" not in ln]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    assert _verify_errors(UNIT, analyze) == []
    # And the check can fail: a misspelt hardening key is reported.
    bad = tmp_path / UNIT.name
    bad.write_text(UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes"))
    assert any("ProtectHom" in ln for ln in _verify_errors(bad, analyze))


def test_systemd_analyze_security_exposure() -> None:
    analyze = require_binary("systemd-analyze")
    r = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not ("--offline" in r.stderr and "unrecognized" in r.stderr), "needs systemd >= 252 (Debian 12)"
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    sysusers = require_binary("systemd-sysusers")
    tmpfiles = require_binary("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    (tmp_path / "run").mkdir()
    for cmd, src in (
        ([sysusers, f"--root={tmp_path}", "-"], SYSUSERS),
        ([tmpfiles, f"--root={tmp_path}", "--create", "-"], TMPFILES),
    ):
        r = subprocess.run(cmd, input=src.read_text(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    groups = {ln.split(":")[0]: ln.split(":") for ln in (tmp_path / "etc/group").read_text().splitlines()}
    assert "qemu-iohang-exporter" in groups["qemu-iohang"][3].split(",")
    # The fixed GID containers are given (deploy/kubernetes/daemonset.yml supplementalGroups).
    assert groups["qemu-iohang"][2] == "687"
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (tmp_path / "etc/passwd").read_text().splitlines()}
    user = passwd["qemu-iohang-exporter"]
    assert user[2] != "0" and user[6].endswith("nologin")
    st = (tmp_path / "run" / "qemu-iohang-exporter").stat()
    assert oct(st.st_mode & 0o7777) == "0o2770"
    assert st.st_gid == int(groups["qemu-iohang"][2])


# --- example config ---------------------------------------------------------------------------


def test_example_config_shape() -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    assert set(cfg) == {"web", "qmp", "policy", "hang", "log", "collectors"}
    assert cfg["collectors"] == {"disable_defaults": False, "blockstats": False}
    # The state file and the hang journal in the unit's StateDirectory (its only writable path).
    assert {k: os.path.dirname(v) for k, v in cfg["hang"].items()} == {
        "state_file": "/var/lib/qemu-iohang-exporter",
        "journal_file": "/var/lib/qemu-iohang-exporter",
    }
    assert cfg["web"]["listen_address"] == ":9738"
    assert cfg["qmp"]["globs"] == ["/run/qemu-iohang-exporter/*.qmp"]
    assert all(isinstance(v, dict) for v in cfg["qmp"]["labels"].values())
    assert cfg["policy"] == {
        "required": ["werror", "rerror"],
        "max_timeout_seconds": None,
        "require_nonzero_timeout": False,
    }
    assert cfg["log"]["level"] == "info"


@pytest.mark.parametrize("path", [CONFIG, K8S / "configmap.yml"], ids=["config.example.yml", "configmap"])
def test_example_config_loads_in_exporter(path: Path, tmp_path: Path) -> None:
    import exporter.config as config

    if path.name == "configmap.yml":
        text = yaml.safe_load(path.read_text())["data"]["config.yml"]
        path = tmp_path / "config.yml"
        path.write_text(text)
    cfg = config.load_file(str(path))
    assert cfg.telemetry_path == "/metrics"
    with pytest.raises(config.ConfigError):
        bad = tmp_path / "bad.yml"
        bad.write_text(path.read_text().replace("level: info", "level: loud"))
        config.load_file(str(bad))


# --- container ----------------------------------------------------------------------------------


def test_containerfile() -> None:
    lines = [
        ln.strip()
        for ln in CONTAINERFILE.read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms and all(ln.split()[1] == "python:3.11-slim" for ln in froms)
    assert any(re.match(r"RUN pip install .* '\.\[libvirt\]'$", ln) for ln in lines)  # --libvirt.uri works
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in {"0", "root"}
    assert "EXPOSE 9738" in lines
    # Every COPY source from the build context exists in the repository.
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"


# --- Kubernetes -------------------------------------------------------------------------------


def _k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kubernetes_kinds() -> None:
    docs = _k8s_docs()
    assert set(docs) == {
        "Kustomization",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
    }
    listed = set(docs["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yml")} - {"kustomization.yml"}


def test_daemonset_hardening() -> None:
    ds = _k8s_docs()["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    (c,) = spec["containers"]
    for container in [c, *spec["initContainers"]]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] != "tmp")
    assert c["ports"][0]["containerPort"] == 9738
    host = {v["name"]: v for v in spec["volumes"] if "hostPath" in v}
    assert [v["hostPath"]["path"] for v in host.values()] == ["/run/qemu-iohang-exporter"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[next(iter(host))] == "/run/qemu-iohang-exporter"
    assert "--config.file=/etc/qemu-iohang-exporter/config.yml" in c["args"]
    cm_vol = next(v for v in spec["volumes"] if "configMap" in v)
    assert mounts[cm_vol["name"]] == "/etc/qemu-iohang-exporter"


def test_daemonset_probes_use_healthz() -> None:
    """Liveness means the exporter reads QEMU (issue 17), not that its port accepts TCP."""
    (c,) = _k8s_docs()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in c["ports"]}
    for kind in ("livenessProbe", "readinessProbe"):
        probe = c[kind]
        assert probe["httpGet"]["path"] == "/healthz" and probe["httpGet"]["port"] in ports, kind
        assert probe.get("httpGet", {}).get("scheme", "HTTP") == "HTTP"  # HTTPS only with TLS
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    live = c["livenessProbe"]
    # A wedged exporter is restarted within ~30 s; one passing lag spike (503 for the 10 s
    # window of health.loop_lag_window_seconds) is not enough to restart it.
    assert live["periodSeconds"] * live["failureThreshold"] <= 30
    assert live["periodSeconds"] * (live["failureThreshold"] - 1) > 10


def test_service_and_servicemonitor_match() -> None:
    docs = _k8s_docs()
    svc, sm, ds = docs["Service"], docs["ServiceMonitor"], docs["DaemonSet"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names
    # jobLabel makes job="qemu-iohang", which the alert rules select.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "qemu-iohang"
    assert 'job="qemu-iohang"' in RULES_FILE.read_text()


# --- Prometheus / Alertmanager ---------------------------------------------------------------


@pytest.mark.promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    shutil.copy(PROMETHEUS, tmp_path / "prometheus.yml")
    shutil.copy(RULES_FILE, tmp_path / RULES_FILE.name)
    r = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert all(t.endswith(":9738") for t in jobs["qemu-iohang"]["static_configs"][0]["targets"])


def test_amtool_check_config() -> None:
    amtool = require_binary("amtool")
    r = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_libvirt_overlay() -> None:
    """deploy/kubernetes/libvirt/: the base DaemonSet plus the node's libvirt socket and
    --libvirt.uri, with arguments the exporter accepts."""
    from exporter.cli import build_parser, resolve

    overlay = K8S / "libvirt"
    kust = yaml.safe_load((overlay / "kustomization.yml").read_text())
    assert kust["resources"] == ["../"]
    (patch_ref,) = kust["patches"]
    patch = yaml.safe_load((overlay / patch_ref["path"]).read_text())
    assert (
        patch["kind"] == "DaemonSet"
        and patch["metadata"]["name"] == _k8s_docs()["DaemonSet"]["metadata"]["name"]
    )
    spec = patch["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    args = [a for a in c["args"] if not a.startswith("--config.file=")]  # the node's file
    config = resolve(build_parser().parse_args(args))
    assert config.libvirt.uris == ("qemu:///system",)
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == "/run/libvirt" and mount["readOnly"] is True
    (vol,) = spec["volumes"]
    assert vol["name"] == mount["name"] and vol["hostPath"]["path"] == "/run/libvirt"


def test_systemd_libvirt_dropin() -> None:
    """The libvirt drop-in replaces ExecStart with one that adds --libvirt.uri."""
    from exporter.cli import build_parser, resolve

    text = (DEPLOY / "systemd" / "libvirt.conf").read_text()
    starts = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecStart=")]
    assert starts[0] == ""  # resets the unit's ExecStart
    argv = [a for a in starts[1].split()[1:] if not a.startswith("--config.file=")]
    assert resolve(build_parser().parse_args(argv)).libvirt.uris == ("qemu:///system",)
    assert "SupplementaryGroups=libvirt" in text


# --- the fleet: agents, central Prometheus, Alertmanager cluster (docs/fleet.md) ---------------


@pytest.mark.promtool
def test_promtool_check_fleet_configs(tmp_path: Path) -> None:
    """The agent's config is valid in agent mode (where rules and alerting are refused), the
    central one with the shipped rules beside it."""
    promtool = require_binary("promtool")
    shutil.copy(RULES_FILE, tmp_path / RULES_FILE.name)
    for src, args, found in (
        (fleet.AGENT_CONFIG, ["--agent"], None),
        (fleet.CENTRAL_CONFIG, [], "1 rule files found"),
    ):
        shutil.copy(src, tmp_path / src.name)
        r = subprocess.run(
            [promtool, "check", "config", *args, str(tmp_path / src.name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert found is None or found in r.stdout
    # And the check can fail: rules in an agent's config.
    bad = yaml.safe_load(fleet.AGENT_CONFIG.read_text()) | {"rule_files": [RULES_FILE.name]}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    r = subprocess.run(
        [promtool, "check", "config", "--agent", str(tmp_path / "bad.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0


@pytest.mark.parametrize(
    ("path", "binary", "needed"),
    [
        (fleet.AGENT_ARGS, "prometheus", {"--enable-feature=agent", "--storage.agent.path"}),
        (fleet.CENTRAL_ARGS, "prometheus", {"--web.enable-remote-write-receiver"}),
        (fleet.ALERTMANAGER_CLUSTER_ARGS, "alertmanager", {"--cluster.listen-address", "--cluster.peer"}),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_debian_default_args(path: Path, binary: str, needed: set[str]) -> None:
    """Each /etc/default file passes the flags its role needs, and the installed binary knows
    every one of them (a misspelt flag stops the daemon at start)."""
    args = fleet.default_args(path)
    assert needed <= {a if a == "--enable-feature=agent" else fleet.flag_name(a) for a in args}
    exe = alertmanager_binary() if binary == "alertmanager" else require_binary("prometheus")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    known = set(re.findall(r"^\s+(--[a-z][a-z0-9.-]*)", r.stdout + r.stderr, re.M))
    assert {"--config.file", "--web.listen-address"} <= known
    assert {fleet.flag_name(a) for a in args} - known == set()


def _commented_command(path: Path) -> str:
    """The shell command a shipped file gives in its comments (the ``printf`` line, with its
    continuation)."""
    lines = [ln.strip().removeprefix("#").strip() for ln in path.read_text().splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("printf "))
    cmd = lines[start]
    while cmd.endswith("\\"):
        start += 1
        cmd = cmd[:-1] + lines[start]
    return cmd


def _hostname() -> str:
    return subprocess.run(["hostname", "-f"], capture_output=True, text=True, check=True).stdout.strip()


def test_agent_targets_command(tmp_path: Path) -> None:
    """The command agent.yml gives writes the targets file the agent reads: this host's
    exporter, its instance the host's name (as the exporter's alerting.instance command)."""
    agent = yaml.safe_load(fleet.AGENT_CONFIG.read_text())
    (job,) = agent["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    (path,) = sd["files"]
    cmd = _commented_command(fleet.AGENT_CONFIG)
    assert cmd.endswith(f"> {path}")
    out = tmp_path / "targets.yml"
    subprocess.run(["sh", "-c", cmd.replace(path, str(out))], check=True, timeout=30)
    assert yaml.safe_load(out.read_text()) == [
        {"targets": ["localhost:9738"], "labels": {"instance": _hostname()}}
    ]
    # The test support writes the same form, for several hosts.
    fleet.write_targets(out, [("localhost:9738", _hostname()), ("hv2:9738", "hv2")])
    assert yaml.safe_load(out.read_text())[0] == {
        "targets": ["localhost:9738"],
        "labels": {"instance": _hostname()},
    }


def test_fleet_exporter_config_needs_the_host(tmp_path: Path) -> None:
    """As shipped, the fleet host's exporter config stops naming alerting.instance (the host's
    name is the one thing it cannot know); with the line its command appends, it starts."""
    import exporter.config as config

    with pytest.raises(config.ConfigError, match=r"alerting\.instance"):
        config.load_file(str(fleet.EXPORTER_FLEET_CONFIG))
    cmd = _commented_command(fleet.EXPORTER_FLEET_CONFIG)
    target = "/etc/qemu-iohang-exporter/config.yml"
    assert cmd.endswith(f">> {target}")
    copy = tmp_path / "config.yml"
    shutil.copy(fleet.EXPORTER_FLEET_CONFIG, copy)
    subprocess.run(["sh", "-c", cmd.replace(target, str(copy))], check=True, timeout=30)
    cfg = config.load_file(str(copy))
    assert cfg.alerting.enabled and cfg.alerting.instance == _hostname()
    assert cfg.hang.state_file
    example = yaml.safe_load(CONFIG.read_text())
    assert cfg.telemetry_path == "/metrics"
    fleet_cfg = yaml.safe_load(copy.read_text())
    assert fleet_cfg["web"] == {"listen_address": example["web"]["listen_address"]}
    assert fleet_cfg["qmp"]["globs"] == example["qmp"]["globs"]


def test_fleet_files_agree() -> None:
    """What must be equal across the fleet files is: the job and the agent's external labels
    are those the exporter's push path sends (one alert, not two, in Alertmanager); every
    Alertmanager the central Prometheus sends to is a cluster peer and gets the exporters'
    pushes too; the agent writes where the central Prometheus receives."""
    agent = yaml.safe_load(fleet.AGENT_CONFIG.read_text())
    central = yaml.safe_load(fleet.CENTRAL_CONFIG.read_text())
    exp = yaml.safe_load(fleet.EXPORTER_FLEET_CONFIG.read_text())["alerting"]
    (job,) = agent["scrape_configs"]
    assert job["job_name"] == exp["job"] == "qemu-iohang"
    assert agent["global"]["external_labels"] == exp["external_labels"]
    assert "external_labels" not in central["global"]  # they would reach every alert sent
    assert "rule_files" not in agent and "alerting" not in agent
    assert central["rule_files"] == [RULES_FILE.name]
    assert all(j["job_name"] != "qemu-iohang" for j in central["scrape_configs"])
    (rw,) = agent["remote_write"]
    url = urllib.parse.urlsplit(rw["url"])
    assert url.path == "/api/v1/write" and url.port == 9090
    assert "--web.enable-remote-write-receiver" in fleet.default_args(fleet.CENTRAL_ARGS)
    (ams,) = central["alerting"]["alertmanagers"]
    (static,) = ams["static_configs"]
    am_hosts = {t.rsplit(":", 1)[0] for t in static["targets"]}
    assert len(am_hosts) >= 2
    assert {urllib.parse.urlsplit(u).hostname for u in exp["alertmanager_urls"]} == am_hosts
    peers = fleet.flag_values(fleet.default_args(fleet.ALERTMANAGER_CLUSTER_ARGS), "--cluster.peer")
    assert {p.rsplit(":", 1)[0] for p in peers} == am_hosts
