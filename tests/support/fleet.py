"""The two-tier fleet layout of ``deploy/`` (docs/fleet.md), as tests and benchmarks run it.

Every config here is a shipped file read from ``deploy/`` and given only what a run on loopback
must change: addresses, ports, paths, and intervals shortened so that a test takes seconds
instead of minutes.  Each substitution names the key it replaces and fails when the shipped
file has no such key: a change to ``deploy/`` that the tests would no longer exercise breaks
them instead of passing unnoticed.

    write_targets(d / "targets.yml", [("127.0.0.1:9738", "hv1")])
    agent_config(d / "targets.yml", "http://127.0.0.1:9090/api/v1/write")
    Prometheus(d, cfg, extra_args=prometheus_args(AGENT_ARGS))      # agent mode, as shipped
"""

from __future__ import annotations

import shlex
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import REPO

DEPLOY = REPO / "deploy"
AGENT_CONFIG = DEPLOY / "prometheus" / "agent.yml"
AGENT_ARGS = DEPLOY / "prometheus" / "agent.default"
CENTRAL_CONFIG = DEPLOY / "prometheus" / "central.yml"
CENTRAL_ARGS = DEPLOY / "prometheus" / "central.default"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_CLUSTER_ARGS = DEPLOY / "alertmanager" / "cluster.default"
EXPORTER_FLEET_CONFIG = DEPLOY / "config.fleet.example.yml"
RULES_FILE = REPO / "alerts" / "qemu-iohang.rules.yml"
#: The scrape job the rules select.
JOB = "qemu-iohang"

#: Flags the process wrappers set themselves: files, storage and listening address.
LOCAL_FLAGS = frozenset(
    {"--config.file", "--storage.path", "--storage.tsdb.path", "--storage.agent.path", "--web.listen-address"}
)


def _load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _set(node: Any, path: Sequence[str], value: Any) -> None:
    """``node[path...] = value``; the key must be in the shipped file already."""
    for key in path[:-1]:
        assert key in node, f"shipped file has no {'.'.join(path)}"
        node = node[key]
    assert path[-1] in node, f"shipped file has no {'.'.join(path)}"
    node[path[-1]] = value


def _one(items: Any, what: str) -> Any:
    assert isinstance(items, list) and len(items) == 1, f"shipped file: expected one {what}, got {items!r}"
    return items[0]


def _job(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    jobs = [j for j in cfg.get("scrape_configs", []) if j["job_name"] == name]
    job: dict[str, Any] = _one(jobs, f"scrape job {name}")
    return job


# --- Debian's /etc/default files -------------------------------------------------------------


def default_args(path: Path) -> list[str]:
    """The ``ARGS`` of a Debian ``/etc/default`` file as the unit's ``$ARGS`` passes them
    (systemd drops the quotes and splits on whitespace)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("ARGS=")]
    value = shlex.split(_one(lines, f"ARGS= line in {path.name}").partition("=")[2])
    return str(_one(value, "quoted ARGS value")).split()


def flag_name(arg: str) -> str:
    return arg.partition("=")[0]


def flag_values(args: Sequence[str], name: str) -> list[str]:
    return [a.partition("=")[2] for a in args if flag_name(a) == name]


def prometheus_args(path: Path) -> list[str]:
    """The shipped flags of a Prometheus (``agent.default``, ``central.default``) but those the
    wrapper sets for a loopback run (files, storage, address)."""
    return [a for a in default_args(path) if flag_name(a) not in LOCAL_FLAGS]


def alertmanager_cluster_args(
    listen: str, peers: Sequence[str], peer_timeout: str | None = None
) -> list[str]:
    """The shipped cluster flags (``cluster.default``) with this peer's gossip address and the
    peers' on loopback; ``peer_timeout`` shortens how long a peer waits for the one before it."""
    args = [a for a in default_args(ALERTMANAGER_CLUSTER_ARGS) if flag_name(a) not in LOCAL_FLAGS]
    assert flag_values(args, "--cluster.listen-address"), "cluster.default: no --cluster.listen-address"
    assert len(flag_values(args, "--cluster.peer")) == len(peers), "cluster.default lists another peer count"
    rest = [a for a in args if flag_name(a) not in {"--cluster.listen-address", "--cluster.peer"}]
    out = [f"--cluster.listen-address={listen}", *(f"--cluster.peer={p}" for p in peers), *rest]
    if peer_timeout is not None:
        out.append(f"--cluster.peer-timeout={peer_timeout}")
    return out


# --- configs -----------------------------------------------------------------------------------


def agent_external_labels() -> dict[str, str]:
    labels: dict[str, str] = _load(AGENT_CONFIG)["global"]["external_labels"]
    return labels


def agent_config(
    targets_file: Path,
    remote_write_url: str,
    scrape_interval: str = "1s",
    batch_send_deadline: str = "1s",
) -> dict[str, Any]:
    """``deploy/prometheus/agent.yml`` reading its targets from ``targets_file`` (`write_targets`)
    and remote-writing to ``remote_write_url``."""
    cfg = _load(AGENT_CONFIG)
    _set(cfg, ("global", "scrape_interval"), scrape_interval)
    _set(cfg, ("global", "scrape_timeout"), scrape_interval)
    sd = _one(_job(cfg, JOB)["file_sd_configs"], "file_sd_configs entry")
    _one(sd["files"], "targets file")
    _set(sd, ("files",), [str(targets_file)])
    rw = _one(cfg["remote_write"], "remote_write block")
    _set(rw, ("url",), remote_write_url)
    _set(rw, ("queue_config", "batch_send_deadline"), batch_send_deadline)
    return cfg


def write_targets(path: Path, hosts: Sequence[tuple[str, str]]) -> None:
    """The agent's targets file for ``hosts`` (address, instance), in the form the command in
    agent.yml writes for one host: one entry per host (an agent per rack)."""
    path.write_text(
        "".join(
            f'- targets: ["{address}"]\n  labels: {{instance: "{instance}"}}\n' for address, instance in hosts
        )
    )


def central_config(
    alertmanagers: Sequence[str], self_address: str, evaluation_interval: str = "1s"
) -> dict[str, Any]:
    """``deploy/prometheus/central.yml`` sending to ``alertmanagers`` (host:port) and scraping
    itself at ``self_address``."""
    cfg = _load(CENTRAL_CONFIG)
    _set(cfg, ("global", "evaluation_interval"), evaluation_interval)
    am = _one(cfg["alerting"]["alertmanagers"], "alertmanagers entry")
    _set(_one(am["static_configs"], "alertmanagers static_configs"), ("targets",), list(alertmanagers))
    _set(_one(_job(cfg, "prometheus")["static_configs"], "self-scrape target"), ("targets",), [self_address])
    return cfg


def central_rule_files() -> dict[str, str]:
    """The central config's rule file(s), by the name it loads them under: the shipped rules."""
    name = _one(_load(CENTRAL_CONFIG)["rule_files"], "rule file")
    assert name == RULES_FILE.name, name
    return {name: RULES_FILE.read_text()}


def _shorten(route: dict[str, Any], group_wait: str, group_interval: str) -> None:
    if route.get("group_wait", "0s") != "0s":
        route["group_wait"] = group_wait
    if "group_interval" in route:
        route["group_interval"] = group_interval
    for child in route.get("routes", []):
        _shorten(child, group_wait, group_interval)


def alertmanager_config(
    webhook_url: str, group_wait: str = "1s", group_interval: str = "2s"
) -> dict[str, Any]:
    """``deploy/alertmanager/alertmanager.yml`` with every webhook on ``webhook_url`` (the path
    kept: ``/page``, ``/alerts``), and its group waits (but the immediate ones) and intervals
    shortened.  Routes, grouping, repeat intervals and inhibitions stay as shipped."""
    cfg = _load(ALERTMANAGER_CONFIG)
    _shorten(cfg["route"], group_wait, group_interval)
    hooks = [h for r in cfg["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks, "alertmanager.yml: no webhook receiver"
    for hook in hooks:
        hook["url"] = webhook_url + urllib.parse.urlsplit(hook["url"]).path
    return cfg


def exporter_fleet_config(
    socket_glob: Path,
    state_file: Path,
    alertmanager_urls: Sequence[str],
    instance: str,
    qmp_intervals: dict[str, Any],
) -> dict[str, Any]:
    """``deploy/config.fleet.example.yml`` for one simulated host: its sockets, its state file,
    the loopback Alertmanagers, and the instance the agent gives it (added per host, as the file
    says); ``qmp_intervals`` (a `tests.support.config` preset) added.  ``web.listen_address``
    is the wrapper's."""
    cfg = _load(EXPORTER_FLEET_CONFIG)
    _set(cfg, ("qmp", "globs"), [str(socket_glob)])
    cfg["qmp"].update(qmp_intervals)
    _set(cfg, ("hang", "state_file"), str(state_file))
    _set(cfg, ("alerting", "alertmanager_urls"), list(alertmanager_urls))
    assert "instance" not in cfg["alerting"], "the shipped file names no host"
    cfg["alerting"]["instance"] = instance
    return cfg
