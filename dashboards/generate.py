#!/usr/bin/env python3
"""Generate the Grafana dashboards of qemu-iohang-exporter (Grafana 11, schemaVersion 39).

    python3 dashboards/generate.py           # rewrite dashboards/grafana/*.json
    python3 dashboards/generate.py --check   # exit 1 when the committed JSON is stale

Plain Python dicts, no dependency beyond the standard library.  Queries use only the metrics of
docs/metrics.md; ``tests/artefacts`` checks that and that every query parses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "grafana"
SCHEMA_VERSION = 39
OVERVIEW_UID = "qemu-iohang-overview"
VM_UID = "qemu-iohang-vm"
TAGS = ["qemu", "qemu-iohang"]
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label matchers every query carries; per-VM dashboards add vm and device.
HOST = 'job=~"$job",instance=~"$instance"'
VM = HOST + ',vm=~"$vm"'
DISK = VM + ',device=~"$device"'
RI = "$__rate_interval"


# --- building blocks --------------------------------------------------------------------------


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "refId": ref, "range": True}
    if legend:
        t["legendFormat"] = legend
    t.update(extra)
    return t


def instant(expr: str, ref: str = "A", legend: str = "") -> dict[str, Any]:
    return target(expr, legend, ref, range=False, instant=True, format="table")


class Layout:
    """Places panels left to right on a 24-column grid and hands out panel ids."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def newline(self) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0

    def id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def row(lay: Layout, title: str) -> dict[str, Any]:
    lay.newline()
    return {
        "type": "row",
        "id": lay.id(),
        "title": title,
        "collapsed": False,
        "gridPos": lay.place(24, 1),
        "panels": [],
    }


def stat(
    lay: Layout,
    title: str,
    expr: str,
    description: str,
    *,
    w: int = 4,
    thresholds: list[tuple[float | None, str]] | None = None,
    unit: str = "none",
    mappings: list[dict[str, Any]] | None = None,
    legend: str = "",
) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "id": lay.id(),
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": lay.place(w, 4),
        "targets": [target(expr, legend)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "mappings": mappings or [],
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def timeseries(
    lay: Layout,
    title: str,
    targets: list[dict[str, Any]],
    description: str,
    *,
    w: int = 12,
    h: int = 8,
    unit: str = "short",
    stack: bool = False,
    draw: str = "line",
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "id": lay.id(),
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                **({} if unit == "s" else {"min": 0}),
                "custom": {
                    "drawStyle": draw,
                    "fillOpacity": 30 if stack or draw == "bars" else 10,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "showPoints": "never",
                    "lineWidth": 1,
                },
                "color": {"mode": "palette-classic"},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def table(
    lay: Layout,
    title: str,
    targets: list[dict[str, Any]],
    description: str,
    *,
    w: int = 12,
    h: int = 8,
    hide: list[str] | None = None,
    rename: dict[str, str] | None = None,
    units: dict[str, str] | None = None,
    vm_link: bool = False,
) -> dict[str, Any]:
    transformations: list[dict[str, Any]] = []
    if len(targets) > 1:
        transformations.append({"id": "merge", "options": {}})
    excluded = {"Time": True, "__name__": True, "job": True}
    excluded.update({k: True for k in hide or []})
    transformations.append(
        {
            "id": "organize",
            "options": {
                "excludeByName": excluded,
                "renameByName": rename or {},
                "indexByName": {},
            },
        }
    )
    overrides: list[dict[str, Any]] = []
    for field, unit in (units or {}).items():
        overrides.append(
            {"matcher": {"id": "byName", "options": field}, "properties": [{"id": "unit", "value": unit}]}
        )
    if vm_link:
        overrides.append(
            {
                "matcher": {"id": "byName", "options": "vm"},
                "properties": [
                    {
                        "id": "links",
                        "value": [
                            {
                                "title": "VM drill-down",
                                "url": f"/d/{VM_UID}/qemu-iohang-vm?${{datasource:queryparam}}&${{job:queryparam}}"
                                "&var-instance=${__data.fields.instance}&var-vm=${__data.fields.vm}"
                                "&${__url_time_range}",
                            }
                        ],
                    }
                ],
            }
        )
    return {
        "type": "table",
        "id": lay.id(),
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": targets,
        "transformations": transformations,
        "fieldConfig": {"defaults": {"custom": {"filterable": True}}, "overrides": overrides},
        "options": {"showHeader": True, "cellHeight": "sm"},
    }


def state_timeline(
    lay: Layout, title: str, targets: list[dict[str, Any]], description: str, *, w: int = 24, h: int = 8
) -> dict[str, Any]:
    return {
        "type": "state-timeline",
        "id": lay.id(),
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": {
                    "mode": "absolute",
                    "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}],
                },
                "mappings": [
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "ok", "color": "green", "index": 0},
                            "1": {"text": "hanging / failing", "color": "red", "index": 1},
                        },
                    }
                ],
            },
            "overrides": [],
        },
        "options": {"mergeValues": True, "showValue": "never", "rowHeight": 0.8},
    }


# --- template variables -----------------------------------------------------------------------


def datasource_var() -> dict[str, Any]:
    return {
        "type": "datasource",
        "name": "datasource",
        "label": "Data source",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
    }


def query_var(name: str, label: str, query: str, *, multi: bool = True) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {},
        "hide": 0,
        "regex": "",
    }


def host_vars() -> list[dict[str, Any]]:
    return [
        datasource_var(),
        query_var("job", "Job", "label_values(qemu_qmp_up, job)"),
        query_var("instance", "Instance", 'label_values(qemu_qmp_up{job=~"$job"}, instance)'),
    ]


def dashboard(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], panels: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": ["qemu-iohang"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "title": "qemu-iohang",
            }
        ],
        "templating": {"list": variables},
        "panels": panels,
    }


# --- the overview -----------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    lay = Layout()
    red_if_any = [(None, "green"), (1, "red")]
    p: list[dict[str, Any]] = []
    p.append(row(lay, "Fleet"))
    p.append(
        stat(
            lay,
            "VMs watched",
            f"sum(qemu_exporter_vms{{{HOST}}})",
            "QMP sockets the exporters watch.",
            thresholds=[(None, "blue")],
        )
    )
    p.append(
        stat(
            lay,
            "QMP down",
            f"count(qemu_qmp_up{{{HOST}}} == 0) or vector(0)",
            "VMs whose QMP socket does not answer: their disks are not monitored.",
            thresholds=[(None, "green"), (1, "orange")],
        )
    )
    p.append(
        stat(
            lay,
            "Disks non-compliant",
            f"count(qemu_block_retry_policy_ok{{{HOST}}} == 0) or vector(0)",
            "Disks that do not satisfy the configured retry policy.",
            thresholds=[(None, "green"), (1, "orange")],
        )
    )
    p.append(
        stat(
            lay,
            "Disks hanging now",
            f"sum(qemu_block_io_hang{{{HOST}}}) or vector(0)",
            "Disks whose IO is being retried (or whose VM is paused on its error).",
            thresholds=red_if_any,
        )
    )
    p.append(
        stat(
            lay,
            "Disks failing now",
            f"sum(qemu_block_io_failing{{{HOST}}}) or vector(0)",
            "Disks whose IO errors reach the guest (after a retry timeout).",
            thresholds=red_if_any,
        )
    )
    p.append(
        stat(
            lay,
            "VMs paused on IO error",
            f'sum(qemu_vm_status{{{HOST},status="io-error"}}) or vector(0)',
            "VMs in run state io-error (werror/rerror=stop).",
            thresholds=red_if_any,
        )
    )
    p.append(
        stat(
            lay,
            "Disks",
            f"count(qemu_block_device_info{{{HOST}}}) or vector(0)",
            "Disk devices (virtio-blk, scsi-hd) seen over QMP.",
            thresholds=[(None, "blue")],
        )
    )
    p.append(
        stat(
            lay,
            "Disks compliant",
            f"sum(qemu_block_retry_policy_ok{{{HOST}}}) or vector(0)",
            "Disks that satisfy the configured retry policy.",
            thresholds=[(None, "green")],
        )
    )
    p.append(
        stat(
            lay,
            "QMP up",
            f"sum(qemu_qmp_up{{{HOST}}}) or vector(0)",
            "VMs whose QMP session is established and answering.",
            thresholds=[(None, "green")],
        )
    )
    p.append(
        stat(
            lay,
            "VMs with retry feature",
            f"sum(qemu_vm_retry_feature{{{HOST}}}) or vector(0)",
            "VMs whose QEMU supports werror/rerror=retry.",
            thresholds=[(None, "blue")],
        )
    )
    p.append(
        stat(
            lay,
            "Exporters up",
            f"sum(up{{{HOST}}})",
            "Exporter targets scraped successfully.",
            thresholds=[(None, "blue")],
        )
    )
    p.append(
        stat(
            lay,
            "Timed-out hangs (range)",
            f'sum(increase(qemu_block_io_hangs_total{{{HOST},outcome="timed_out"}}[$__range])) or vector(0)',
            "Hangs that ended with IO errors reaching the guest, in the selected time range.",
            thresholds=red_if_any,
        )
    )

    p.append(row(lay, "Hangs"))
    p.append(
        table(
            lay,
            "Disks hanging now",
            [
                instant(f"qemu_block_io_hang_duration_seconds{{{HOST}}} > 0", "A"),
                instant(f"qemu_block_io_hang_deadline_timestamp_seconds{{{HOST}}} - time()", "B"),
                instant(
                    f"qemu_block_retry_timeout_seconds{{{HOST}}}\nand on (job, instance, vm, device) (qemu_block_io_hang{{{HOST}}} == 1)",
                    "C",
                ),
            ],
            "Current hangs; time left is until QEMU gives up and reports the error to the guest (empty: the disk never times out).",
            w=24,
            h=7,
            rename={
                "Value #A": "hanging for",
                "Value #B": "time left to timeout",
                "Value #C": "retry_timeout",
            },
            units={"hanging for": "s", "time left to timeout": "s", "retry_timeout": "s"},
            vm_link=True,
        )
    )
    p.append(
        timeseries(
            lay,
            "Disks hanging / failing",
            [
                target(f"sum by (instance) (qemu_block_io_hang{{{HOST}}})", "hanging {{instance}}", "A"),
                target(f"sum by (instance) (qemu_block_io_failing{{{HOST}}})", "failing {{instance}}", "B"),
            ],
            "Disks hanging (IO retried) and failing (errors reach the guest), per host.",
        )
    )
    p.append(
        timeseries(
            lay,
            "Completed hangs by outcome",
            [
                target(
                    f"sum by (outcome) (increase(qemu_block_io_hangs_total{{{HOST}}}[{RI}]))", "{{outcome}}"
                )
            ],
            "Hangs that ended: recovered (storage came back), timed_out (guest saw errors), vm_gone.",
            unit="short",
            stack=True,
            draw="bars",
        )
    )
    p.append(
        timeseries(
            lay,
            "Completed hang duration (p50 / p90)",
            [
                target(
                    f"histogram_quantile(0.5, sum by (le, outcome) (rate(qemu_block_io_hang_completed_duration_seconds_bucket{{{HOST}}}[{RI}])))",
                    "p50 {{outcome}}",
                    "A",
                ),
                target(
                    f"histogram_quantile(0.9, sum by (le, outcome) (rate(qemu_block_io_hang_completed_duration_seconds_bucket{{{HOST}}}[{RI}])))",
                    "p90 {{outcome}}",
                    "B",
                ),
            ],
            "How long completed hangs lasted, host-wide histogram.",
            unit="s",
        )
    )
    p.append(
        timeseries(
            lay,
            "Time spent hanging",
            [
                target(
                    f"sum by (instance) (rate(qemu_block_io_hang_seconds_total{{{HOST}}}[{RI}]))",
                    "{{instance}}",
                )
            ],
            "Disk-seconds of hanging IO per second, per host (2 = two disks hanging the whole time).",
            unit="short",
        )
    )

    p.append(row(lay, "IO errors"))
    p.append(
        timeseries(
            lay,
            "IO error events by action",
            [
                target(
                    f"sum by (action, operation) (rate(qemu_block_io_error_events_total{{{HOST}}}[{RI}]))",
                    "{{operation}} {{action}}",
                )
            ],
            "BLOCK_IO_ERROR events per second: retry = attempt held and retried, report = error passed to the guest, stop = VM paused, ignore = guest sees success.",
            unit="ops",
            stack=True,
        )
    )
    p.append(
        timeseries(
            lay,
            "Failed operations reported by QEMU",
            [
                target(
                    f"sum by (instance) (rate(qemu_block_failed_read_operations_total{{{HOST}}}[{RI}]))",
                    "read {{instance}}",
                    "A",
                ),
                target(
                    f"sum by (instance) (rate(qemu_block_failed_write_operations_total{{{HOST}}}[{RI}]))",
                    "write {{instance}}",
                    "B",
                ),
                target(
                    f"sum by (instance) (rate(qemu_block_failed_flush_operations_total{{{HOST}}}[{RI}]))",
                    "flush {{instance}}",
                    "C",
                ),
            ],
            "failed_*_operations of query-blockstats (virtio-blk counts only final reports, scsi-hd every attempt).",
            unit="ops",
        )
    )

    p.append(row(lay, "Retry policy"))
    p.append(
        timeseries(
            lay,
            "Non-compliant disks by rule",
            [target(f"sum by (rule) (qemu_block_retry_policy_violation{{{HOST}}})", "{{rule}}")],
            "Disks failing each retry-policy rule (a disk can fail several).",
            w=8,
            stack=True,
        )
    )
    p.append(
        table(
            lay,
            "Non-compliant disks",
            [instant(f"qemu_block_retry_policy_violation{{{HOST}}} == 1")],
            "Every disk that violates the retry policy, and why (rule). See docs/runbooks.md#qemudiskretrypolicyviolation.",
            w=16,
            hide=["Value"],
            vm_link=True,
        )
    )
    p.append(
        table(
            lay,
            "VMs whose QMP socket does not answer",
            [instant(f"qemu_qmp_up{{{HOST}}} == 0")],
            "Sockets present but not answering: stale socket, permissions, or a hung QEMU.",
            w=24,
            h=6,
            hide=["Value"],
        )
    )
    return dashboard(
        OVERVIEW_UID,
        "QEMU IO hangs / overview",
        "Fleet view of qemu-iohang-exporter: VMs watched, disk retry policy compliance, disks hanging now, hangs and IO errors over time.",
        host_vars(),
        p,
    )


# --- the per-VM drill-down --------------------------------------------------------------------


def vm_dashboard() -> dict[str, Any]:
    lay = Layout()
    p: list[dict[str, Any]] = []
    p.append(row(lay, "VM"))
    p.append(
        stat(
            lay,
            "QMP",
            f"max(qemu_qmp_up{{{VM}}})",
            "QMP session of the VM.",
            mappings=[
                {
                    "type": "value",
                    "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}},
                }
            ],
            thresholds=[(None, "red"), (1, "green")],
        )
    )
    p.append(
        stat(
            lay,
            "Run state",
            f"max by (status) (qemu_vm_status{{{VM}}} == 1)",
            "QEMU run state (query-status).",
            legend="{{status}}",
            w=6,
            thresholds=[(None, "blue")],
        )
    )
    p.append(
        stat(
            lay,
            "Retry feature",
            f"max(qemu_vm_retry_feature{{{VM}}})",
            "Whether this QEMU supports werror/rerror=retry.",
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "no", "color": "orange"},
                        "1": {"text": "yes", "color": "green"},
                    },
                }
            ],
            thresholds=[(None, "orange"), (1, "green")],
        )
    )
    p.append(
        stat(
            lay,
            "Disks hanging",
            f"sum(qemu_block_io_hang{{{DISK}}}) or vector(0)",
            "Disks of the VM whose IO hangs now.",
            thresholds=[(None, "green"), (1, "red")],
        )
    )
    p.append(
        stat(
            lay,
            "Disks non-compliant",
            f"count(qemu_block_retry_policy_ok{{{DISK}}} == 0) or vector(0)",
            "Disks of the VM that violate the retry policy.",
            w=6,
            thresholds=[(None, "green"), (1, "orange")],
        )
    )

    p.append(row(lay, "Disks and policy"))
    p.append(
        table(
            lay,
            "Disks",
            [
                instant(f"qemu_block_device_info{{{DISK}}}", "A"),
                instant(f"qemu_block_retry_interval_seconds{{{DISK}}}", "B"),
                instant(f"qemu_block_retry_timeout_seconds{{{DISK}}}", "C"),
                instant(f"qemu_block_retry_policy_ok{{{DISK}}}", "D"),
            ],
            "Error policy of each disk as read over QMP (qom-get). retry_timeout 0 = never times out.",
            w=16,
            hide=["Value #A"],
            rename={"Value #B": "retry_interval", "Value #C": "retry_timeout", "Value #D": "policy ok"},
            units={"retry_interval": "s", "retry_timeout": "s"},
        )
    )
    p.append(
        table(
            lay,
            "Policy violations",
            [instant(f"qemu_block_retry_policy_violation{{{DISK}}} == 1")],
            "Failing retry-policy rules per disk.",
            w=8,
            hide=["Value", "instance"],
        )
    )

    p.append(row(lay, "Hangs"))
    p.append(
        state_timeline(
            lay,
            "Hang timeline per disk",
            [
                target(f"max by (device) (qemu_block_io_hang{{{DISK}}})", "{{device}} hang", "A"),
                target(f"max by (device) (qemu_block_io_failing{{{DISK}}})", "{{device}} failing", "B"),
            ],
            "Red: IO hanging (retried) or failing (errors to the guest).",
        )
    )
    p.append(
        timeseries(
            lay,
            "Hang duration and time left",
            [
                target(
                    f"max by (device) (qemu_block_io_hang_duration_seconds{{{DISK}}})",
                    "{{device}} hanging for",
                    "A",
                ),
                target(
                    f"max by (device) (qemu_block_io_hang_deadline_timestamp_seconds{{{DISK}}} - time())",
                    "{{device}} time left",
                    "B",
                ),
            ],
            "Age of the current hang, and time until QEMU reports the error to the guest.",
            unit="s",
        )
    )
    p.append(
        timeseries(
            lay,
            "IO error events by action",
            [
                target(
                    f"sum by (device, operation, action) (rate(qemu_block_io_error_events_total{{{DISK}}}[{RI}]))",
                    "{{device}} {{operation}} {{action}}",
                )
            ],
            "BLOCK_IO_ERROR events per second.",
            unit="ops",
        )
    )
    p.append(
        timeseries(
            lay,
            "Completed hangs by outcome",
            [
                target(
                    f"sum by (device, outcome) (increase(qemu_block_io_hangs_total{{{DISK}}}[{RI}]))",
                    "{{device}} {{outcome}}",
                )
            ],
            "Hangs that ended, per disk and outcome.",
            draw="bars",
            stack=True,
        )
    )

    p.append(row(lay, "Block statistics"))
    p.append(
        timeseries(
            lay,
            "Throughput",
            [
                target(
                    f"sum by (device) (rate(qemu_block_read_bytes_total{{{DISK}}}[{RI}]))",
                    "{{device}} read",
                    "A",
                ),
                target(
                    f"sum by (device) (rate(qemu_block_written_bytes_total{{{DISK}}}[{RI}]))",
                    "{{device}} write",
                    "B",
                ),
            ],
            "Bytes per second (query-blockstats).",
            unit="Bps",
        )
    )
    p.append(
        timeseries(
            lay,
            "IOPS",
            [
                target(
                    f"sum by (device) (rate(qemu_block_read_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} read",
                    "A",
                ),
                target(
                    f"sum by (device) (rate(qemu_block_write_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} write",
                    "B",
                ),
                target(
                    f"sum by (device) (rate(qemu_block_flush_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} flush",
                    "C",
                ),
            ],
            "Operations per second. Stalls at 0 during a hang; resumes when the storage returns.",
            unit="iops",
        )
    )
    p.append(
        timeseries(
            lay,
            "Average latency",
            [
                target(
                    f"sum by (device) (rate(qemu_block_read_time_seconds_total{{{DISK}}}[{RI}]))\n/ sum by (device) (rate(qemu_block_read_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} read",
                    "A",
                ),
                target(
                    f"sum by (device) (rate(qemu_block_write_time_seconds_total{{{DISK}}}[{RI}]))\n/ sum by (device) (rate(qemu_block_write_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} write",
                    "B",
                ),
                target(
                    f"sum by (device) (rate(qemu_block_flush_time_seconds_total{{{DISK}}}[{RI}]))\n/ sum by (device) (rate(qemu_block_flush_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} flush",
                    "C",
                ),
            ],
            "Time per completed operation (total time / operations).",
            unit="s",
        )
    )
    p.append(
        timeseries(
            lay,
            "Failed operations",
            [
                target(
                    f"sum by (device) (rate(qemu_block_failed_read_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} read",
                    "A",
                ),
                target(
                    f"sum by (device) (rate(qemu_block_failed_write_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} write",
                    "B",
                ),
                target(
                    f"sum by (device) (rate(qemu_block_failed_flush_operations_total{{{DISK}}}[{RI}]))",
                    "{{device}} flush",
                    "C",
                ),
            ],
            "failed_*_operations (virtio-blk counts only final reports, scsi-hd every attempt).",
            unit="ops",
        )
    )
    p.append(
        timeseries(
            lay,
            "Idle time",
            [target(f"max by (device) (qemu_block_idle_seconds{{{DISK}}})", "{{device}}")],
            "Time since the last IO on the disk (idle_time_ns).",
            unit="s",
            w=24,
            h=6,
        )
    )
    variables = [
        *host_vars(),
        query_var(
            "vm", "VM", 'label_values(qemu_qmp_up{job=~"$job",instance=~"$instance"}, vm)', multi=False
        ),
        query_var(
            "device",
            "Device",
            'label_values(qemu_block_device_info{job=~"$job",instance=~"$instance",vm=~"$vm"}, device)',
        ),
    ]
    variables[3]["includeAll"] = False
    return dashboard(
        VM_UID,
        "QEMU IO hangs / VM",
        "One VM: disks and their error policy, hang timeline per disk, block statistics.",
        variables,
        p,
    )


DASHBOARDS = {
    "qemu-iohang-overview.json": overview,
    "qemu-iohang-vm.json": vm_dashboard,
}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate the Grafana dashboards.")
    ap.add_argument("--check", action="store_true", help="exit 1 when a committed file is stale")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    stale = False
    for name in DASHBOARDS:
        path = args.out_dir / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                print(f"{path} is out of date: run dashboards/generate.py", file=sys.stderr)
                stale = True
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
