#!/usr/bin/env python3
"""Generate the Grafana dashboards of qemu-iohang-exporter (Grafana 11, schemaVersion 41).

    .venv/bin/python dashboards/generate.py           # rewrite dashboards/grafana/*.json
    .venv/bin/python dashboards/generate.py --check   # exit 1 when the committed JSON is stale

Built with Grafana's typed library ``grafana-foundation-sdk`` (the exact version pinned in
pyproject.toml, extra ``test``; ``scripts/setup.sh`` installs it in .venv).  The file reads top
down: a few panel helpers, then each dashboard as rows of panels, placed left to right on
Grafana's 24-column grid by the library.  Queries use only the metrics of docs/metrics.md;
``tests/prometheus`` checks that, that every query parses, and that the committed JSON is this
script's output; ``tests/prometheus`` runs every query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

try:
    from grafana_foundation_sdk.builders import common as c
    from grafana_foundation_sdk.builders import dashboard as d
    from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
    from grafana_foundation_sdk.cog import variants
    from grafana_foundation_sdk.cog.builder import Builder
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat
except ImportError as e:
    sys.exit(f"{e}: run scripts/setup.sh, then .venv/bin/python dashboards/generate.py")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from generated_files import write_or_check

OUT_DIR = Path(__file__).resolve().parent / "grafana"
OVERVIEW_UID = "qemu-iohang-overview"
VM_UID = "qemu-iohang-vm"
TAGS = ["qemu", "qemu-iohang"]
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label matchers every query carries; the per-VM dashboard adds vm and device.
HOST = 'job=~"$job",instance=~"$instance"'
VM = HOST + ',vm=~"$vm"'
DISK = VM + ',device=~"$device"'
RI = "$__rate_interval"

Panel = Builder[dm.Panel]
Query = Builder[variants.Dataquery]
Variable = Builder[dm.VariableModel]


# --- queries ------------------------------------------------------------------------------------


def needs(collector: str) -> str:
    """What a panel's description says when its series are behind an opt-in collector
    (`exporter.model.collectors`): the default page leaves them out, and the panel is empty."""
    return f" Needs the exporter's --collector.{collector} (off by default; docs/metrics.md#collectors)."


def q(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    """A range query (time series)."""
    query = prometheus.Dataquery().datasource(DS).expr(expr).ref_id(ref).range()
    return query.legend_format(legend) if legend else query


def instant(expr: str, ref: str = "A") -> prometheus.Dataquery:
    """An instant query shown as a table (one row per series, labels as columns)."""
    return (
        prometheus.Dataquery().datasource(DS).expr(expr).ref_id(ref).instant().format(PromQueryFormat.TABLE)
    )


# --- panels -------------------------------------------------------------------------------------


def steps(*pairs: tuple[float | None, str]) -> d.ThresholdsConfig:
    """Threshold colours: (None, base colour), (from value, colour), ..."""
    return (
        d.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=col) for v, col in pairs])
    )


def value_text(texts: dict[str, tuple[str, str]]) -> list[dm.ValueMapping]:
    """Value mapping: value -> (text, colour)."""
    return [
        dm.ValueMap(
            options={
                v: dm.ValueMappingResult(text=t, color=col, index=i)
                for i, (v, (t, col)) in enumerate(texts.items())
            }
        )
    ]


GREEN = steps((None, "green"))
BLUE = steps((None, "blue"))
RED_IF_ANY = steps((None, "green"), (1, "red"))
ORANGE_IF_ANY = steps((None, "green"), (1, "orange"))


def big_number(
    title: str,
    expr: str,
    description: str,
    colours: d.ThresholdsConfig,
    *,
    w: int = 4,
    legend: str = "",
    mappings: list[dm.ValueMapping] | None = None,
) -> stat.Panel:
    """A stat panel: one number (or text) on a background coloured by thresholds."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .span(w)
        .height(4)
        .with_target(q(expr, legend))
        .unit("none")
        .thresholds(colours)
        .mappings(mappings or [])
        .color_scheme(d.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .reduce_options(c.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .text_mode(cm.BigValueTextMode.AUTO)
        .justify_mode(cm.BigValueJustifyMode.AUTO)
        .orientation(cm.VizOrientation.AUTO)
    )


def graph(
    title: str,
    targets: list[Query],
    description: str,
    *,
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    stack: bool = False,
    bars: bool = False,
) -> timeseries.Panel:
    """A time series panel; legend as a table with max and last value."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .span(w)
        .height(h)
        .targets(targets)
        .unit(unit)
        .draw_style(cm.GraphDrawStyle.BARS if bars else cm.GraphDrawStyle.LINE)
        .fill_opacity(30 if stack or bars else 10)
        .stacking(
            c.StackingConfig().mode(cm.StackingMode.NORMAL if stack else cm.StackingMode.NONE).group("A")
        )
        .show_points(cm.VisibilityMode.NEVER)
        .line_width(1)
        .color_scheme(d.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
        .legend(
            c.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .calcs(["max", "lastNotNull"])
        )
        .tooltip(c.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )
    return panel if unit == "s" else panel.min(0)  # seconds may go negative (time left to timeout)


VM_LINK = dm.DynamicConfigValue(
    id_val="links",
    value=[
        {
            "title": "VM drill-down",
            "url": f"/d/{VM_UID}/qemu-iohang-vm?${{datasource:queryparam}}&${{job:queryparam}}"
            "&var-instance=${__data.fields.instance}&var-vm=${__data.fields.vm}&${__url_time_range}",
        }
    ],
)


def grid(
    title: str,
    targets: list[Query],
    description: str,
    *,
    w: int = 12,
    h: int = 8,
    hide: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    units: dict[str, str] | None = None,
    vm_link: bool = False,
) -> table.Panel:
    """A table of instant queries, merged into one row per series when there are several;
    ``hide``/``rename`` columns, ``units`` per column, ``vm_link``: the vm column opens the VM
    dashboard."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .span(w)
        .height(h)
        .targets(targets)
        .filterable(True)
        .show_header(True)
        .cell_height(cm.TableCellHeight.SM)
    )
    if len(targets) > 1:
        panel = panel.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    hidden = dict.fromkeys(("Time", "__name__", "job", *hide), True)
    panel = panel.with_transformation(
        dm.DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": hidden, "renameByName": rename or {}, "indexByName": {}},
        )
    )
    for column, unit in (units or {}).items():
        panel = panel.override_by_name(column, [dm.DynamicConfigValue(id_val="unit", value=unit)])
    return panel.override_by_name("vm", [VM_LINK]) if vm_link else panel


def timeline(title: str, targets: list[Query], description: str) -> statetimeline.Panel:
    """One bar per series over time: green 0 (ok), red 1 (hanging / failing)."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .span(24)
        .height(8)
        .targets(targets)
        .color_scheme(d.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .thresholds(RED_IF_ANY)
        .mappings(value_text({"0": ("ok", "green"), "1": ("hanging / failing", "red")}))
        .merge_values(True)
        .show_value(cm.VisibilityMode.NEVER)
        .row_height(0.8)
    )


# --- dashboards ---------------------------------------------------------------------------------


def query_var(name: str, label: str, query: str, *, multi: bool = True, all_: bool = True) -> d.QueryVariable:
    return (
        d.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query({"query": query, "refId": f"{name}-var"})
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(all_)
        .all_value(".*")
    )


HOST_VARS: list[Variable] = [
    d.DatasourceVariable("datasource").label("Data source").type("prometheus"),
    query_var("job", "Job", "label_values(qemu_qmp_up, job)"),
    query_var("instance", "Instance", 'label_values(qemu_qmp_up{job=~"$job"}, instance)'),
]


def dashboard(
    uid: str,
    title: str,
    description: str,
    variables: list[Variable],
    rows: dict[str, list[Panel]],
) -> d.Dashboard:
    """A dashboard of rows (title -> panels), linked to the other qemu-iohang dashboards.  The
    library places each row's panels left to right, starting a new line when one is full: the
    widths of a line must add up to 24 (tests/prometheus checks that no panel overflows)."""
    dash = (
        d.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .timezone("browser")
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .annotation(
            d.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .built_in(1)
            .type("dashboard")
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
        )
        .variables(variables)
        .link(
            d.DashboardLink("qemu-iohang")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["qemu-iohang"])
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for row_title, panels in rows.items():
        dash = dash.with_row(d.Row(row_title))
        for panel in panels:
            dash = dash.with_panel(panel)
    return dash


def overview() -> d.Dashboard:
    fleet: list[Panel] = [
        big_number(
            "VMs watched", f"sum(qemu_exporter_vms{{{HOST}}})", "QMP sockets the exporters watch.", BLUE
        ),
        big_number(
            "QMP down",
            f"count(qemu_qmp_up{{{HOST}}} == 0) or vector(0)",
            "VMs whose QMP socket does not answer: their disks are not monitored.",
            ORANGE_IF_ANY,
        ),
        big_number(
            "Disks non-compliant",
            f"count(qemu_block_retry_policy_ok{{{HOST}}} == 0) or vector(0)",
            "Disks that do not satisfy the configured retry policy.",
            ORANGE_IF_ANY,
        ),
        big_number(
            "Disks hanging now",
            f"sum(qemu_block_io_hang{{{HOST}}}) or vector(0)",
            "Disks whose IO is being retried (or whose VM is paused on its error).",
            RED_IF_ANY,
        ),
        big_number(
            "Disks failing now",
            f"sum(qemu_block_io_failing{{{HOST}}}) or vector(0)",
            "Disks whose IO errors reach the guest (after a retry timeout).",
            RED_IF_ANY,
        ),
        big_number(
            "VMs paused on IO error",
            f'sum(qemu_vm_status{{{HOST},status="io-error"}}) or vector(0)',
            "VMs in run state io-error (werror/rerror=stop).",
            RED_IF_ANY,
        ),
        big_number(
            "Disks",
            f"count(qemu_block_device_info{{{HOST}}}) or vector(0)",
            "Disk devices (virtio-blk, scsi-hd) seen over QMP.",
            BLUE,
        ),
        big_number(
            "Disks compliant",
            f"sum(qemu_block_retry_policy_ok{{{HOST}}}) or vector(0)",
            "Disks that satisfy the configured retry policy.",
            GREEN,
        ),
        big_number(
            "QMP up",
            f"sum(qemu_qmp_up{{{HOST}}}) or vector(0)",
            "VMs whose QMP session is established and answering.",
            GREEN,
        ),
        big_number(
            "VMs with retry feature",
            f"sum(qemu_vm_retry_feature{{{HOST}}}) or vector(0)",
            "VMs whose QEMU supports werror/rerror=retry." + needs("feature"),
            BLUE,
        ),
        big_number("Exporters up", f"sum(up{{{HOST}}})", "Exporter targets scraped successfully.", BLUE),
        big_number(
            "Timed-out hangs (range)",
            f'sum(increase(qemu_block_io_hangs_total{{{HOST},outcome="timed_out"}}[$__range])) or vector(0)',
            "Hangs that ended with IO errors reaching the guest, in the selected time range.",
            RED_IF_ANY,
        ),
    ]
    hangs: list[Panel] = [
        grid(
            "Disks hanging now",
            [
                instant(f"qemu_block_io_hang_duration_seconds{{{HOST}}} > 0", "A"),
                instant(f"qemu_block_io_hang_deadline_timestamp_seconds{{{HOST}}} - time()", "B"),
                instant(
                    f"qemu_block_retry_timeout_seconds{{{HOST}}}\n"
                    f"and on (job, instance, vm, device) (qemu_block_io_hang{{{HOST}}} == 1)",
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
        ),
        graph(
            "Disks hanging / failing",
            [
                q(f"sum by (instance) (qemu_block_io_hang{{{HOST}}})", "hanging {{instance}}", "A"),
                q(f"sum by (instance) (qemu_block_io_failing{{{HOST}}})", "failing {{instance}}", "B"),
            ],
            "Disks hanging (IO retried) and failing (errors reach the guest), per host.",
        ),
        graph(
            "Completed hangs by outcome",
            [q(f"sum by (outcome) (increase(qemu_block_io_hangs_total{{{HOST}}}[{RI}]))", "{{outcome}}")],
            "Hangs that ended: recovered (storage came back), timed_out (guest saw errors), vm_gone.",
            stack=True,
            bars=True,
        ),
        graph(
            "Completed hang duration (p50 / p90)",
            [
                q(
                    f"histogram_quantile(0.5, sum by (le, outcome) (rate(qemu_block_io_hang_completed_duration_seconds_bucket{{{HOST}}}[{RI}])))",
                    "p50 {{outcome}}",
                    "A",
                ),
                q(
                    f"histogram_quantile(0.9, sum by (le, outcome) (rate(qemu_block_io_hang_completed_duration_seconds_bucket{{{HOST}}}[{RI}])))",
                    "p90 {{outcome}}",
                    "B",
                ),
            ],
            "How long completed hangs lasted, host-wide histogram.",
            unit="s",
        ),
        graph(
            "Time spent hanging",
            [
                q(
                    f"sum by (instance) (avg_over_time(qemu_block_io_hang{{{HOST}}}[{RI}]))",
                    "{{instance}}",
                )
            ],
            "Disks hanging on average over the interval, per host: disk-seconds of hanging IO per second (2 = two disks hanging the whole time).",
        ),
    ]
    # Which storage fails, and what it takes down: summed by backend over the selected hosts
    # (all of them: the fleet-wide blast radius of each storage system).
    affected = f"qemu_storage_backend_hanging_disks{{{HOST}}} + qemu_storage_backend_failing_disks{{{HOST}}}"
    blast: list[Panel] = [
        graph(
            "Disks hanging or failing, by storage backend",
            [q(f"sum by (backend) ({affected})", "{{backend}}")],
            "Disks of each storage backend (NBD server, Ceph pool, iSCSI target, NFS export...) whose IO hangs or fails, summed over the selected hosts: one backend with many disks at once is a storage outage, not a VM problem. See docs/runbooks.md#qemustoragebackendoutage.",
        ),
        graph(
            "VMs affected, by storage backend",
            [q(f"sum by (backend) (qemu_storage_backend_affected_vms{{{HOST}}})", "{{backend}}")],
            "VMs with at least one hanging or failing disk on each storage backend, summed over the selected hosts.",
        ),
        grid(
            "Storage backends now",
            [
                instant(f"sum by (backend) (qemu_storage_backend_disks{{{HOST}}})", "A"),
                instant(f"sum by (backend) ({affected})", "B"),
                instant(f"sum by (backend) (qemu_storage_backend_affected_vms{{{HOST}}})", "C"),
                instant(
                    f"sum by (backend) ({affected})\n/ sum by (backend) (qemu_storage_backend_disks{{{HOST}}})",
                    "D",
                ),
            ],
            "Every storage backend of the selected hosts: its disks, how many hang or fail now, the VMs they belong to, and the share of the backend's disks affected.",
            w=24,
            h=7,
            rename={
                "Value #A": "disks",
                "Value #B": "hanging or failing",
                "Value #C": "VMs affected",
                "Value #D": "share affected",
            },
            units={"share affected": "percentunit"},
        ),
    ]
    io_errors: list[Panel] = [
        graph(
            "IO error events by action",
            [
                q(
                    f"sum by (action, operation) (rate(qemu_block_io_error_events_total{{{HOST}}}[{RI}]))",
                    "{{operation}} {{action}}",
                )
            ],
            "BLOCK_IO_ERROR events per second: retry = attempt held and retried, report = error passed to the guest, stop = VM paused, ignore = guest sees success.",
            unit="ops",
            stack=True,
        ),
        graph(
            "Failed operations reported by QEMU",
            [
                q(
                    f"sum by (instance) (rate(qemu_block_failed_{op}_operations_total{{{HOST}}}[{RI}]))",
                    f"{op} {{{{instance}}}}",
                    ref,
                )
                for op, ref in (("read", "A"), ("write", "B"), ("flush", "C"))
            ],
            "failed_*_operations of query-blockstats (virtio-blk counts only final reports, scsi-hd every attempt)."
            + needs("blockstats"),
            unit="ops",
        ),
    ]
    policy: list[Panel] = [
        graph(
            "Non-compliant disks by rule",
            [q(f"sum by (rule) (qemu_block_retry_policy_violation{{{HOST}}})", "{{rule}}")],
            "Disks failing each retry-policy rule (a disk can fail several).",
            w=8,
            stack=True,
        ),
        grid(
            "Non-compliant disks",
            [instant(f"qemu_block_retry_policy_violation{{{HOST}}} == 1")],
            "Every disk that violates the retry policy, and why (rule). See docs/runbooks.md#qemudiskretrypolicyviolation.",
            w=16,
            hide=("Value",),
            vm_link=True,
        ),
        grid(
            "VMs whose QMP socket does not answer",
            [instant(f"qemu_qmp_up{{{HOST}}} == 0")],
            "Sockets present but not answering: stale socket, permissions, or a hung QEMU.",
            w=24,
            h=6,
            hide=("Value",),
        ),
    ]
    exporter: list[Panel] = [
        graph(
            "Exporter CPU",
            [q(f"rate(process_cpu_seconds_total{{{HOST}}}[{RI}])", "{{instance}}")],
            "CPU of each exporter process, in cores.  A host-wide storage outage is tens of thousands of BLOCK_IO_ERROR events a second: ~0.7 core at 75,000 events/s for 1000 VMs x 4 disks (docs/performance.md).",
            w=6,
        ),
        graph(
            "Exporter memory",
            [q(f"process_resident_memory_bytes{{{HOST}}}", "{{instance}}")],
            "Resident memory of each exporter process.  It grows with the fleet and with what it holds while it is behind in a storm.",
            unit="bytes",
            w=6,
        ),
        graph(
            "QMP events handled",
            [q(f"sum by (instance) (rate(qemu_exporter_qmp_events_total{{{HOST}}}[{RI}]))", "{{instance}}")],
            "QMP events each exporter reads per second, all VMs and event names together." + needs("session"),
            unit="ops",
            w=6,
        ),
        graph(
            "Event loop lag",
            [q(f"qemu_exporter_event_loop_lag_seconds{{{HOST}}}", "{{instance}}")],
            "Largest lateness of the exporter's heartbeat in the recent window: how long no QMP socket was read.  Milliseconds normally; above health.max_loop_lag_seconds (5 s) /healthz answers 503.",
            unit="s",
            w=6,
        ),
    ]
    return dashboard(
        OVERVIEW_UID,
        "QEMU IO hangs / overview",
        "Fleet view of qemu-iohang-exporter: VMs watched, disk retry policy compliance, disks hanging now and by storage backend, hangs and IO errors over time.",
        HOST_VARS,
        {
            "Fleet": fleet,
            "Blast radius": blast,
            "Hangs": hangs,
            "IO errors": io_errors,
            "Retry policy": policy,
            "Exporter": exporter,
        },
    )


def rate_by_device(metric: str) -> str:
    return f"sum by (device) (rate({metric}{{{DISK}}}[{RI}]))"


def by_operation(expr: Callable[[str], str]) -> list[Query]:
    """One query per operation: read (A), write (B), flush (C)."""
    return [
        q(expr(op), f"{{{{device}}}} {op}", ref)
        for op, ref in (("read", "A"), ("write", "B"), ("flush", "C"))
    ]


def vm_dashboard() -> d.Dashboard:
    vm: list[Panel] = [
        big_number(
            "QMP",
            f"max(qemu_qmp_up{{{VM}}})",
            "QMP session of the VM.",
            steps((None, "red"), (1, "green")),
            mappings=value_text({"0": ("down", "red"), "1": ("up", "green")}),
        ),
        big_number(
            "Run state",
            f"max by (status) (qemu_vm_status{{{VM}}} == 1)",
            "QEMU run state (query-status).",
            BLUE,
            w=6,
            legend="{{status}}",
        ),
        big_number(
            "Retry feature",
            f"max(qemu_vm_retry_feature{{{VM}}})",
            "Whether this QEMU supports werror/rerror=retry." + needs("feature"),
            steps((None, "orange"), (1, "green")),
            mappings=value_text({"0": ("no", "orange"), "1": ("yes", "green")}),
        ),
        big_number(
            "Disks hanging",
            f"sum(qemu_block_io_hang{{{DISK}}}) or vector(0)",
            "Disks of the VM whose IO hangs now.",
            RED_IF_ANY,
        ),
        big_number(
            "Disks non-compliant",
            f"count(qemu_block_retry_policy_ok{{{DISK}}} == 0) or vector(0)",
            "Disks of the VM that violate the retry policy.",
            ORANGE_IF_ANY,
            w=6,
        ),
    ]
    disks: list[Panel] = [
        grid(
            "Disks",
            [
                instant(f"qemu_block_device_info{{{DISK}}}", "A"),
                instant(f"qemu_block_retry_interval_seconds{{{DISK}}}", "B"),
                instant(f"qemu_block_retry_timeout_seconds{{{DISK}}}", "C"),
                instant(f"qemu_block_retry_policy_ok{{{DISK}}}", "D"),
            ],
            "Error policy of each disk as read over QMP (qom-get). retry_timeout 0 = never times out.",
            w=16,
            hide=("Value #A",),
            rename={"Value #B": "retry_interval", "Value #C": "retry_timeout", "Value #D": "policy ok"},
            units={"retry_interval": "s", "retry_timeout": "s"},
        ),
        grid(
            "Policy violations",
            [instant(f"qemu_block_retry_policy_violation{{{DISK}}} == 1")],
            "Failing retry-policy rules per disk.",
            w=8,
            hide=("Value", "instance"),
        ),
    ]
    hangs: list[Panel] = [
        timeline(
            "Hang timeline per disk",
            [
                q(f"max by (device) (qemu_block_io_hang{{{DISK}}})", "{{device}} hang", "A"),
                q(f"max by (device) (qemu_block_io_failing{{{DISK}}})", "{{device}} failing", "B"),
            ],
            "Red: IO hanging (retried) or failing (errors to the guest).",
        ),
        graph(
            "Hang duration and time left",
            [
                q(
                    f"max by (device) (qemu_block_io_hang_duration_seconds{{{DISK}}})",
                    "{{device}} hanging for",
                    "A",
                ),
                q(
                    f"max by (device) (qemu_block_io_hang_deadline_timestamp_seconds{{{DISK}}} - time())",
                    "{{device}} time left",
                    "B",
                ),
            ],
            "Age of the current hang, and time until QEMU reports the error to the guest.",
            unit="s",
        ),
        graph(
            "IO error events by action",
            [
                q(
                    f"sum by (device, operation, action) (rate(qemu_block_io_error_events_total{{{DISK}}}[{RI}]))",
                    "{{device}} {{operation}} {{action}}",
                )
            ],
            "BLOCK_IO_ERROR events per second.",
            unit="ops",
        ),
        graph(
            "Completed hangs by outcome",
            [
                q(
                    f"sum by (device, outcome) (increase(qemu_block_io_hangs_total{{{DISK}}}[{RI}]))",
                    "{{device}} {{outcome}}",
                )
            ],
            "Hangs that ended, per disk and outcome.",
            stack=True,
            bars=True,
        ),
    ]
    blockstats: list[Panel] = [
        graph(
            "Throughput",
            [
                q(rate_by_device("qemu_block_read_bytes_total"), "{{device}} read", "A"),
                q(rate_by_device("qemu_block_written_bytes_total"), "{{device}} write", "B"),
            ],
            "Bytes per second (query-blockstats)." + needs("blockstats"),
            unit="Bps",
        ),
        graph(
            "IOPS",
            by_operation(lambda op: rate_by_device(f"qemu_block_{op}_operations_total")),
            "Operations per second. Stalls at 0 during a hang; resumes when the storage returns."
            + needs("blockstats"),
            unit="iops",
        ),
        graph(
            "Average latency",
            by_operation(
                lambda op: (
                    rate_by_device(f"qemu_block_{op}_time_seconds_total")
                    + "\n/ "
                    + rate_by_device(f"qemu_block_{op}_operations_total")
                )
            ),
            "Time per completed operation (total time / operations)." + needs("blockstats"),
            unit="s",
        ),
        graph(
            "Failed operations",
            by_operation(lambda op: rate_by_device(f"qemu_block_failed_{op}_operations_total")),
            "failed_*_operations (virtio-blk counts only final reports, scsi-hd every attempt)."
            + needs("blockstats"),
            unit="ops",
        ),
        graph(
            "Idle time",
            [q(f"max by (device) (qemu_block_idle_seconds{{{DISK}}})", "{{device}}")],
            "Time since the last IO on the disk (idle_time_ns)." + needs("blockstats"),
            unit="s",
            w=24,
            h=6,
        ),
    ]
    variables = [
        *HOST_VARS,
        query_var(
            "vm",
            "VM",
            'label_values(qemu_qmp_up{job=~"$job",instance=~"$instance"}, vm)',
            multi=False,
            all_=False,
        ),
        query_var(
            "device",
            "Device",
            'label_values(qemu_block_device_info{job=~"$job",instance=~"$instance",vm=~"$vm"}, device)',
        ),
    ]
    return dashboard(
        VM_UID,
        "QEMU IO hangs / VM",
        "One VM: disks and their error policy, hang timeline per disk, block statistics.",
        variables,
        {
            "VM": vm,
            "Disks and policy": disks,
            "Hangs": hangs,
            "Block statistics (--collector.blockstats)": blockstats,
        },
    )


DASHBOARDS: dict[str, Callable[[], d.Dashboard]] = {
    "qemu-iohang-overview.json": overview,
    "qemu-iohang-vm.json": vm_dashboard,
}


def render(name: str) -> str:
    """The JSON of one dashboard; panel ids numbered in order."""
    built = DASHBOARDS[name]().build()
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return json.dumps(built, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate the Grafana dashboards.")
    ap.add_argument("--check", action="store_true", help="exit 1 when a committed file is stale")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    outputs = {args.out_dir / name: render(name) for name in DASHBOARDS}
    return write_or_check(outputs, check=args.check, generator=".venv/bin/python dashboards/generate.py")


if __name__ == "__main__":
    sys.exit(main())
