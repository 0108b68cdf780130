#!/usr/bin/env python3
"""Generate the Prometheus rules of qemu-iohang-exporter.

Writes
  alerts/qemu-iohang.rules.yml           recording + alerting rules (plain Prometheus rule file)
  deploy/kubernetes/prometheusrule.yml   the same groups as a prometheus-operator PrometheusRule

Tune the rules by editing the constants in the "TUNABLES" block below, or, for the hang
thresholds and the runbook base that the exporter's push path uses too, in
``exporter/model/alerts.py`` (or pass --selector / --runbook-base-url for a one-off build), then run
``python3 alerts/generate.py`` and commit the output.  ``tests/prometheus`` fails when the committed files differ from this script's output.
Needs only Python 3.11 and PyYAML.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
from generated_files import write_or_check  # noqa: E402

# Shared with the exporter's push path (standard library only).
from exporter.model.alerts import (  # noqa: E402
    ALERT_APPROACHING_TIMEOUT,
    ALERT_HANG,
    ALERT_NEAR_TIMEOUT,
    HANG_MIN_RETRY_INTERVALS,
    HANG_MIN_SECONDS,
    HANG_TIMEOUT_CRITICAL_RATIO,
    HANG_TIMEOUT_WARNING_RATIO,
    RUNBOOK_BASE_URL,
    WHERE,
    hang_annotations,
    runbook_base_url_problem,
    runbook_url,
    timeout_fraction_annotations,
)

RULES_FILE = ROOT / "alerts" / "qemu-iohang.rules.yml"
PROMETHEUS_RULE_FILE = ROOT / "deploy" / "kubernetes" / "prometheusrule.yml"

# --- TUNABLES -------------------------------------------------------------------------------
# Label matchers selecting the exporter's series (the scrape job).  Every expression uses it.
SELECTOR = 'job="qemu-iohang"'
# QemuDiskIOHang's minimum age (HANG_MIN_SECONDS, HANG_MIN_RETRY_INTERVALS x retry_interval),
# the 50 %/80 % shares of retry_timeout (HANG_TIMEOUT_WARNING_RATIO, HANG_TIMEOUT_CRITICAL_RATIO)
# and the runbook base (RUNBOOK_BASE_URL, default docs/runbooks.md; --runbook-base-url) are in
# exporter/model/alerts.py, imported above: the exporter's push path (exporter/alerting/push.py) posts
# the same alerts with them, so tune them there and both paths follow.
# A hang on a disk that never times out (retry_timeout=0, or no retry feature): seconds.
HANG_NO_TIMEOUT_SECONDS = 300
# Window in which a timed-out hang keeps the QemuIOHangTimedOut alert firing.
TIMED_OUT_WINDOW = "15m"
# A disk that does not satisfy the retry policy, for this long (avoids hotplug flaps).
POLICY_VIOLATION_FOR = "15m"
# A VM paused on an IO error (werror/rerror=stop), for this long (lets libvirt resume it).
VM_IO_ERROR_FOR = "1m"
# QMP session down for this long.
QMP_DOWN_FOR = "5m"
# QemuIOHangExporterBlind: fires while the exporter was blind (did not run, or a session or
# connection was down) at any time within this window: its event counts are lower bounds.
BLIND_WINDOW = "15m"
# Exporter scrape failing / no exporter target at all, for this long.
EXPORTER_DOWN_FOR = "5m"
EXPORTER_ABSENT_FOR = "15m"
# Rate window of the recording rules.
RATE_WINDOW = "5m"
# QemuStorageBackendOutage (one host) / QemuStorageBackendOutageFleet (sum by backend over every
# exporter): a storage backend counts as failing when at least BACKEND_OUTAGE_MIN_DISKS of its
# disks hang or fail at once, or at least BACKEND_OUTAGE_MIN_SHARE of them (and at least two
# disks: one disk is the per-disk alerts' business), for BACKEND_OUTAGE_FOR -- as long as
# QemuDiskIOHang's minimum, so that a storage blip does not page either.
BACKEND_OUTAGE_MIN_DISKS = 3
BACKEND_OUTAGE_MIN_SHARE = 0.5
BACKEND_OUTAGE_FOR = "30s"
# The per-disk alerts a backend outage explains (inhibited on disks of that backend).
BACKEND_EXPLAINED_ALERTS = (
    "QemuDiskIOHang",
    "QemuIOHangApproachingTimeout",
    "QemuIOHangNearTimeout",
    "QemuIOHangWithoutTimeout",
)
# ----------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL), stable key order."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def _human_seconds(seconds: int) -> str:
    if seconds % 60 == 0:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"


def recording_rules(sel: str) -> list[dict[str, Any]]:
    w = RATE_WINDOW
    return [
        {
            "record": "instance:qemu_exporter_vms:sum",
            "expr": f"sum by (job, instance) (qemu_exporter_vms{{{sel}}})",
        },
        {
            "record": "instance:qemu_qmp_up:sum",
            "expr": f"sum by (job, instance) (qemu_qmp_up{{{sel}}})",
        },
        {
            "record": "instance:qemu_qmp_down:count",
            "expr": f"count by (job, instance) (qemu_qmp_up{{{sel}}} == 0)",
        },
        {
            "record": "instance:qemu_block_devices:count",
            "expr": f"count by (job, instance) (qemu_block_device_info{{{sel}}})",
        },
        {
            "record": "instance:qemu_block_io_hang:sum",
            "expr": f"sum by (job, instance) (qemu_block_io_hang{{{sel}}})",
        },
        {
            "record": "instance:qemu_block_io_failing:sum",
            "expr": f"sum by (job, instance) (qemu_block_io_failing{{{sel}}})",
        },
        {
            "record": "instance:qemu_vm_io_error:sum",
            "expr": f'sum by (job, instance) (qemu_vm_status{{{sel},status="io-error"}})',
        },
        {
            "record": "job:qemu_block_retry_policy_ok:sum",
            "expr": f"sum by (job) (qemu_block_retry_policy_ok{{{sel}}})",
        },
        {
            "record": "job:qemu_block_retry_policy_not_ok:count",
            "expr": f"count by (job) (qemu_block_retry_policy_ok{{{sel}}} == 0)",
        },
        {
            "record": "job_rule:qemu_block_retry_policy_violation:sum",
            "expr": f"sum by (job, rule) (qemu_block_retry_policy_violation{{{sel}}})",
        },
        {
            "record": f"job_outcome:qemu_block_io_hangs:rate{w}",
            "expr": f"sum by (job, outcome) (rate(qemu_block_io_hangs_total{{{sel}}}[{w}]))",
        },
        {
            "record": f"job_operation_action:qemu_block_io_error_events:rate{w}",
            "expr": (
                f"sum by (job, operation, action) (rate(qemu_block_io_error_events_total{{{sel}}}[{w}]))"
            ),
        },
        # Disk-seconds of hanging per second: the rate of qemu_block_io_hang_seconds_total, read
        # from the 0/1 gauge of the default page (the counter is an opt-in collector's).
        {
            "record": f"instance:qemu_block_io_hang_seconds:rate{w}",
            "expr": f"sum by (job, instance) (avg_over_time(qemu_block_io_hang{{{sel}}}[{w}]))",
        },
        # The blast radius: disks hanging or failing, and VMs affected, per storage backend over
        # every host (a hanging disk is not failing: a timed-out hang ends when failing starts).
        {
            "record": "job_backend:qemu_storage_backend_disks:sum",
            "expr": f"sum by (job, backend) (qemu_storage_backend_disks{{{sel}}})",
        },
        {
            "record": "job_backend:qemu_storage_backend_affected_disks:sum",
            "expr": (
                f"sum by (job, backend) (\n  qemu_storage_backend_hanging_disks{{{sel}}}\n"
                f"  + qemu_storage_backend_failing_disks{{{sel}}}\n)\n"
            ),
        },
        {
            "record": "job_backend:qemu_storage_backend_affected_vms:sum",
            "expr": f"sum by (job, backend) (qemu_storage_backend_affected_vms{{{sel}}})",
        },
        {
            "record": "job_backend:qemu_storage_backend_affected_hosts:count",
            "expr": (
                f"count by (job, backend) (\n  qemu_storage_backend_hanging_disks{{{sel}}}\n"
                f"  + qemu_storage_backend_failing_disks{{{sel}}}\n  > 0\n)\n"
            ),
        },
        *fleet_rules(sel),
    ]


def fleet_rules(sel: str) -> list[dict[str, Any]]:
    """The whole fleet in one series each (docs/fleet.md): the host views above added up, so
    that a fleet overview reads a few series instead of every host's.  Sums by job only: the
    agents' external labels and any target label other than instance are left out."""
    w = RATE_WINDOW
    totals = [
        ("instance:qemu_exporter_vms:sum", "job:qemu_exporter_vms:sum"),
        ("instance:qemu_qmp_down:count", "job:qemu_qmp_down:count"),
        ("instance:qemu_block_devices:count", "job:qemu_block_devices:count"),
        ("instance:qemu_block_io_hang:sum", "job:qemu_block_io_hang:sum"),
        ("instance:qemu_block_io_failing:sum", "job:qemu_block_io_failing:sum"),
        ("instance:qemu_vm_io_error:sum", "job:qemu_vm_io_error:sum"),
        (f"instance:qemu_block_io_hang_seconds:rate{w}", f"job:qemu_block_io_hang_seconds:rate{w}"),
    ]
    return [
        # Exporters scraped successfully / configured: a host whose exporter is down or whose
        # agent stopped writing is missing from every other fleet view.
        {"record": "job:up:sum", "expr": f"sum by (job) (up{{{sel}}})"},
        {"record": "job:up:count", "expr": f"count by (job) (up{{{sel}}})"},
        *({"record": record, "expr": f"sum by (job) ({source}{{{sel}}})"} for source, record in totals),
    ]


def outage_condition(affected: str, disks: str) -> str:
    """PromQL keeping the ``affected`` series (disks hanging or failing) of a backend that is
    out: at least BACKEND_OUTAGE_MIN_DISKS, or at least two and BACKEND_OUTAGE_MIN_SHARE of
    ``disks``.  The value stays the affected count."""
    return (
        f"(\n  {affected} >= {BACKEND_OUTAGE_MIN_DISKS}\n"
        f"  or\n"
        f"  ({affected} >= 2) >= {BACKEND_OUTAGE_MIN_SHARE:g} * {disks}\n)\n"
    )


def _alert(
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    runbook_base: str,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_ != "0m":
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": runbook_url(runbook_base, name),
    }
    return rule


def alerting_rules(sel: str, runbook_base: str) -> list[dict[str, Any]]:
    where = WHERE
    hang_share = (
        f"qemu_block_io_hang_duration_seconds{{{sel}}}\n  / (qemu_block_retry_timeout_seconds{{{sel}}} > 0)\n"
    )
    hanging = f"and (qemu_block_io_hang{{{sel}}} == 1)"

    host_affected = (
        f"(qemu_storage_backend_hanging_disks{{{sel}}} + qemu_storage_backend_failing_disks{{{sel}}})"
    )
    host_outage = outage_condition(host_affected, f"qemu_storage_backend_disks{{{sel}}}")
    fleet_outage = outage_condition(
        f"job_backend:qemu_storage_backend_affected_disks:sum{{{sel}}}",
        f"job_backend:qemu_storage_backend_disks:sum{{{sel}}}",
    )

    def approaching(ratio: float) -> str:
        return f"(\n  {hang_share.replace(chr(10) + '  ', chr(10) + '    ')}  >= {ratio:g}\n)\n{hanging}\n"

    return [
        _alert(
            ALERT_HANG,
            # The hang's age is the exporter's (from QEMU's first failed attempt, or from when
            # the exporter first saw a disk that already hung): nothing here needs an error event.
            f"(\n"
            f"  qemu_block_io_hang_duration_seconds{{{sel}}} >= {HANG_MIN_SECONDS}\n"
            f"  unless\n"
            f"  qemu_block_io_hang_duration_seconds{{{sel}}}\n"
            f"    < {HANG_MIN_RETRY_INTERVALS} * qemu_block_retry_interval_seconds{{{sel}}}\n"
            f")\n"
            f"{hanging}\n",
            "0m",
            "warning",
            *hang_annotations(),
            runbook_base,
        ),
        _alert(
            ALERT_APPROACHING_TIMEOUT,
            approaching(HANG_TIMEOUT_WARNING_RATIO),
            "0m",
            "warning",
            *timeout_fraction_annotations(ALERT_APPROACHING_TIMEOUT, HANG_TIMEOUT_WARNING_RATIO),
            runbook_base,
        ),
        _alert(
            ALERT_NEAR_TIMEOUT,
            approaching(HANG_TIMEOUT_CRITICAL_RATIO),
            "0m",
            "critical",
            *timeout_fraction_annotations(ALERT_NEAR_TIMEOUT, HANG_TIMEOUT_CRITICAL_RATIO),
            runbook_base,
        ),
        _alert(
            "QemuIOHangWithoutTimeout",
            f"(qemu_block_io_hang_duration_seconds{{{sel}}} > {HANG_NO_TIMEOUT_SECONDS})\n"
            f"unless (qemu_block_retry_timeout_seconds{{{sel}}} > 0)\n",
            "0m",
            "critical",
            f"Disk IO has been hanging for more than {_human_seconds(HANG_NO_TIMEOUT_SECONDS)} "
            "on a disk that never times out",
            f"IO on {where} has been hanging for {{{{ $value | humanizeDuration }}}}. The disk "
            "has no retry_timeout (0 = retry forever) or the VM is paused on the error, so the "
            "guest stays blocked until the storage returns or someone intervenes.",
            runbook_base,
        ),
        _alert(
            "QemuIOHangTimedOut",
            f"(qemu_block_io_failing{{{sel}}} == 1)\n"
            "or\n"
            "(\n"
            f"  sum without (outcome) (\n"
            f'    increase(qemu_block_io_hangs_total{{{sel},outcome="timed_out"}}[{TIMED_OUT_WINDOW}])\n'
            "  ) > 0\n"
            ")\n",
            "0m",
            "critical",
            "Disk IO hang timed out: the guest received IO errors",
            f"A hang on {where} outlasted its retry_timeout (or IO is still failing after one): "
            "QEMU reported the IO errors to the guest. Its filesystem may have gone read-only "
            "or the application may have failed.",
            runbook_base,
        ),
        _alert(
            "QemuStorageBackendOutage",
            host_outage,
            BACKEND_OUTAGE_FOR,
            "critical",
            "Storage backend {{ $labels.backend }} is failing on {{ $labels.instance }}",
            "{{ $value }} disks on storage backend {{ $labels.backend }} are hanging or failing "
            "at once on {{ $labels.instance }}: the storage, not the VMs, is the problem. Look at "
            "the storage system first; every VM with a disk on it is blocked.",
            runbook_base,
        ),
        _alert(
            "QemuStorageBackendOutageFleet",
            fleet_outage,
            BACKEND_OUTAGE_FOR,
            "critical",
            "Storage backend {{ $labels.backend }} is failing across the fleet",
            "{{ $value }} disks on storage backend {{ $labels.backend }} are hanging or failing "
            "at once, summed over every host: the storage, not the VMs, is the problem. Look at "
            "the storage system first.",
            runbook_base,
        ),
        _alert(
            "QemuDiskOnFailingBackend",
            # One series per disk a firing outage alert explains: the source of the Alertmanager
            # inhibition of that disk's own hang alerts (they carry no backend label to match
            # on).  Nothing is inhibited unless the outage itself fires (and pages).
            f"(\n  (qemu_block_io_hang{{{sel}}} == 1 or qemu_block_io_failing{{{sel}}} == 1)\n"
            f"  * on (job, instance, vm, device) group_left (backend) qemu_block_device_info{{{sel}}}\n"
            f")\n"
            f"and on (job, backend) (\n"
            f'  ALERTS{{{sel},alertname=~"QemuStorageBackendOutage|QemuStorageBackendOutageFleet",alertstate="firing"}}\n'
            f")\n",
            "0m",
            "info",
            "Disk hangs because its storage backend {{ $labels.backend }} is failing",
            f"{where} is hanging or failing because storage backend {{{{ $labels.backend }}}} is out "
            "(QemuStorageBackendOutage): its own hang alerts are inhibited.",
            runbook_base,
        ),
        _alert(
            "QemuDiskRetryPolicyViolation",
            f"qemu_block_retry_policy_violation{{{sel}}} == 1\n",
            POLICY_VIOLATION_FOR,
            "warning",
            "Disk does not have the required IO retry policy ({{ $labels.rule }})",
            f"{where} violates the retry policy rule {{{{ $labels.rule }}}}: a storage outage "
            "will pass IO errors to the guest (or hang it forever) instead of being retried.",
            runbook_base,
        ),
        _alert(
            "QemuVMPausedOnIOError",
            f'qemu_vm_status{{{sel},status="io-error"}} == 1\n',
            VM_IO_ERROR_FOR,
            "critical",
            "VM is paused on a disk IO error",
            "VM {{ $labels.vm }} on {{ $labels.instance }} is paused (run state io-error) "
            "because a disk with werror/rerror=stop failed. It stays paused until someone sends "
            "'cont' (virsh resume).",
            runbook_base,
        ),
        _alert(
            "QemuQMPDown",
            f"qemu_qmp_up{{{sel}}} == 0\n",
            QMP_DOWN_FOR,
            "warning",
            "Exporter cannot talk to a VM's QMP socket",
            "The QMP socket of VM {{ $labels.vm }} on {{ $labels.instance }} has not answered "
            f"for {QMP_DOWN_FOR}: its disks are not watched (no hang, policy or error data).",
            runbook_base,
        ),
        _alert(
            "QemuIOHangExporterBlind",
            f"sum by (job, instance, source) (\n"
            f"  increase(qemu_exporter_blind_seconds_total{{{sel}}}[{BLIND_WINDOW}])\n"
            f") > 0\n",
            "0m",
            "warning",
            "qemu-iohang-exporter could not see events for a while ({{ $labels.source }})",
            f"The exporter on {{{{ $labels.instance }}}} was blind for {{{{ $value | humanizeDuration }}}} "
            f"within {BLIND_WINDOW} (source {{{{ $labels.source }}}}: event_loop = it did not run, "
            "qmp = a VM's QMP session was down, libvirt = its libvirt connection was down). IO error "
            "counts of that time are lower bounds; hangs open across it were kept open.",
            runbook_base,
        ),
        _alert(
            "QemuIOHangExporterDown",
            f"up{{{sel}}} == 0\n",
            EXPORTER_DOWN_FOR,
            "warning",
            "qemu-iohang-exporter cannot be scraped",
            f"Prometheus has failed to scrape {{{{ $labels.instance }}}} for {EXPORTER_DOWN_FOR}: "
            "IO hangs and disk policies of the VMs on that host are not monitored.",
            runbook_base,
        ),
        _alert(
            "QemuIOHangExporterAbsent",
            f"absent(up{{{sel}}})\n",
            EXPORTER_ABSENT_FOR,
            "warning",
            "No qemu-iohang-exporter target is known to Prometheus",
            f"Prometheus has had no target matching {{{sel}}} for {EXPORTER_ABSENT_FOR}: "
            "the scrape configuration or service discovery lost the exporters, and no IO hang "
            "alert can fire.",
            runbook_base,
        ),
    ]


def rule_groups(selector: str = SELECTOR, runbook_base: str = RUNBOOK_BASE_URL) -> dict[str, Any]:
    return {
        "groups": [
            {"name": "qemu-iohang.recording", "rules": recording_rules(selector)},
            {"name": "qemu-iohang.alerts", "rules": alerting_rules(selector, runbook_base)},
        ]
    }


HEADER = "# GENERATED by alerts/generate.py -- do not edit by hand; edit the TUNABLES there and rerun.\n"


def render_rules(selector: str = SELECTOR, runbook_base: str = RUNBOOK_BASE_URL) -> str:
    return HEADER + dump(rule_groups(selector, runbook_base))


def render_prometheus_rule(selector: str = SELECTOR, runbook_base: str = RUNBOOK_BASE_URL) -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "qemu-iohang-exporter",
            "namespace": "monitoring",
            "labels": {
                "app.kubernetes.io/name": "qemu-iohang-exporter",
                "app.kubernetes.io/component": "alerting-rules",
            },
        },
        "spec": rule_groups(selector, runbook_base),
    }
    return HEADER + dump(doc)


def _runbook_base(value: str) -> str:
    problem = runbook_base_url_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selector", default=SELECTOR, help=f"label matchers (default: {SELECTOR})")
    ap.add_argument(
        "--runbook-base-url",
        default=RUNBOOK_BASE_URL,
        type=_runbook_base,
        help="where docs/runbooks.md is published; each alert links to <base>#<alert name lower-cased> "
        f"(default: {RUNBOOK_BASE_URL}, its path in this repository)",
    )
    ap.add_argument("--rules-out", type=Path, default=RULES_FILE)
    ap.add_argument("--prometheus-rule-out", type=Path, default=PROMETHEUS_RULE_FILE)
    ap.add_argument("--check", action="store_true", help="exit 1 if the files on disk differ from the output")
    args = ap.parse_args(argv)
    outputs = {
        args.rules_out: render_rules(args.selector, args.runbook_base_url),
        args.prometheus_rule_out: render_prometheus_rule(args.selector, args.runbook_base_url),
    }
    return write_or_check(outputs, check=args.check, generator="alerts/generate.py")


if __name__ == "__main__":
    sys.exit(main())
