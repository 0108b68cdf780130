"""The fleet's status as plain data: what the status page (`exporter.web.status_page`) shows and
``/api/v1/status`` returns, and what ``qemu-iohang-check --exporter.url`` reads.

Built from the same in-memory model a scrape reads (`VMState`, hang tracking), so the page can
never disagree with ``/metrics``, and it never waits on QEMU.  The snapshot is JSON-ready
(dicts, lists, str, float, bool, None) so one structure serves the HTML and the API; problems
are listed first and separately, because a person opening the page wants "what is wrong" before
"what is fine".

The schema (``schema: 1``) is documented in the README; fields are only added, never renamed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from exporter import __version__
from exporter.hang.blast import backend_counts
from exporter.hang.tracking import RECENT_WINDOW_S, HangTracking
from exporter.model.policy import DiskPolicy, PolicyConfig, Rule
from exporter.model.state import ConnectionState, Disk, VMState
from exporter.runtime.blind import BlindSpots

SCHEMA = 1

#: What to change for each rule, one sentence each (``{max}``: the configured maximum timeout).
RULE_FIXES: dict[Rule, str] = {
    Rule.WERROR_NOT_RETRY: (
        "Set werror=retry on the disk's -device (libvirt: error_policy='retry' on <driver>) so "
        "failing writes are retried instead of reaching the guest."
    ),
    Rule.RERROR_NOT_RETRY: (
        "Set rerror=retry on the disk's -device (libvirt: rerror_policy='retry' on <driver>) so "
        "failing reads are retried instead of reaching the guest."
    ),
    Rule.POLICY_NOT_VISIBLE: (
        "Give werror/rerror and retry_interval/retry_timeout on -device, not -drive: on -drive "
        "they are invisible to QMP and QEMU ignores the -drive retry_interval."
    ),
    Rule.RETRY_UNSUPPORTED: (
        "Run this VM on a QEMU with the retry policy (openEuler QEMU): this one cannot retry "
        "failing IO at all."
    ),
    Rule.TIMEOUT_ZERO: (
        "Set a non-zero retry_timeout: 0 retries forever, so a dead storage link hangs the guest "
        "with no error ever reaching it."
    ),
    Rule.TIMEOUT_ABOVE_MAX: "Lower retry_timeout to at most {max} s (0 means never time out).",
}


#: Why a VM is down (`_down_reason`, `exporter.qmp_watch.connect_error_reason`), for people.
REASON_TEXT = {
    "not_found": "socket file missing",
    "refused": "connection refused (QEMU gone?)",
    "permission": "permission denied on the socket",
    "timeout": "no QMP greeting (another client holds the monitor?)",
    "protocol": "QMP protocol error",
    "fd_limit": "not watched: the exporter's open-file limit is reached (raise LimitNOFILE)",
    "other": "connect failed",
    "lost": "QMP session failed while reading",
    "connecting": "connecting",
    "session_ended": "QMP session ended, reconnecting",
    "libvirt_down": "libvirt connection down",
    "not_running": "not running",
}


def rule_fix(rule: Rule | str, policy: PolicyConfig) -> str:
    """The one sentence telling an operator what to change for ``rule``."""
    text = RULE_FIXES[Rule(rule)]
    maximum = policy.max_timeout_seconds
    return text.format(max=f"{maximum:g}" if maximum is not None else "the configured maximum")


@functools.lru_cache(maxsize=4096)
def policy_fields(policy: DiskPolicy) -> Mapping[str, Any]:
    """A disk's policy as the status and the check command show it (milliseconds as QEMU has
    them; None where this QEMU has no such property).  Cached: a fleet has few distinct
    policies, and the result is only ever copied (``**``), never changed."""
    return {
        "werror": policy.werror,
        "rerror": policy.rerror,
        "retry_interval_ms": policy.retry_interval_ms,
        "retry_timeout_ms": policy.retry_timeout_ms,
    }


def _down_reason(vm: VMState, connections: dict[str, ConnectionState]) -> str:
    """Why a VM has no live session, in a word an operator can act on."""
    if vm.source == "libvirt":
        conn = connections.get(vm.socket)
        if conn is not None and not conn.up:
            return "libvirt_down"
        return "not_running"
    if vm.last_connect_error:
        return vm.last_connect_error
    return "session_ended" if vm.disconnects else "connecting"


def build_status(
    vms: Sequence[VMState],
    hangs: HangTracking,
    policy: PolicyConfig,
    now: float,
    connections: Iterable[ConnectionState] = (),
    *,
    details: bool = True,
    incidents: list[dict[str, Any]] | None = None,
    blind: BlindSpots | None = None,
) -> dict[str, Any]:
    """The snapshot of every watched VM at ``now`` (same clock as QEMU's event timestamps).

    Linear in disks plus recent hangs.  ``details``: include ``vms``, every VM with every disk
    (what scripts and ``qemu-iohang-check`` read); the HTML page does without, which halves the
    work at 1000 VMs.  ``incidents``: the storage incidents of the last 24 h from the hang
    journal (`exporter.hang.incidents`), shown only when the journal is on."""
    conns = {c.uri: c for c in connections}
    hangs.apply_blind()  # before any silence is inferred below
    hanging: list[dict[str, Any]] = []
    failing: list[dict[str, Any]] = []
    paused: list[dict[str, Any]] = []
    violations: list[dict[str, Any]] = []
    down: list[dict[str, Any]] = []
    fleet: list[dict[str, Any]] = []
    by_policy: dict[tuple[Any, ...], int] = {}
    compliant_vms: list[dict[str, Any]] = []
    n_disks = n_ok = n_up = 0

    # Failing disks: since the end of their latest timed-out hang, when it is still kept.
    timed_out_at: dict[tuple[str, str], float] = {}
    for (key, dev), ring in hangs.recent.items():
        for r in reversed(ring):
            if r.hang.outcome == "timed_out":
                timed_out_at[(key, dev)] = r.hang.end
                break

    for name, _key, vm in sorted((v.vm, v.key, v) for v in vms):
        trackers = hangs.trackers.get(vm.key, {})
        disks_out: list[dict[str, Any]] = []
        vm_ok = vm.up
        if vm.up:
            n_up += 1
        else:
            down.append(
                {
                    "vm": name,
                    "source": vm.source,
                    "socket": vm.socket,
                    "reason": _down_reason(vm, conns),
                    "connect_errors": dict(vm.connect_errors),
                }
            )
        if vm.status == "io-error":
            paused.append({"vm": name, "status": vm.status})
            vm_ok = False
        for dev in sorted(vm.disks):
            disk: Disk = vm.disks[dev]
            n_disks += 1
            p = disk.policy
            rules = [r.value for r in disk.verdict.violations]
            t = trackers.get(dev)
            is_hanging = is_failing = False
            if t is not None:
                if t.active:  # as a scrape does: silence up to what was read may end a hang
                    t.advance(vm.read_through(now))
                is_hanging, is_failing = t.hanging, t.failing
            if details:
                disks_out.append(
                    {
                        "device": dev,
                        "type": disk.qdev_type,
                        "backend": disk.backend,
                        **policy_fields(p),
                        "compliant": not rules,
                        "rules": rules,
                        "hanging": is_hanging,
                        "failing": is_failing,
                    }
                )
            if rules:
                vm_ok = False
                violations.append(
                    {
                        "vm": name,
                        "device": dev,
                        **policy_fields(p),
                        "rules": [{"rule": r, "fix": rule_fix(r, policy)} for r in rules],
                    }
                )
            else:
                n_ok += 1
                sig = (p.werror, p.rerror, p.retry_interval_ms, p.retry_timeout_ms)
                by_policy[sig] = by_policy.get(sig, 0) + 1
            if t is not None and is_hanging:
                vm_ok = False
                start = t.hang_start or now
                timeout = t.retry_timeout_s
                elapsed = t.duration(now)
                hanging.append(
                    {
                        "vm": name,
                        "device": dev,
                        "backend": disk.backend,
                        "since": start,
                        "elapsed_seconds": elapsed,
                        "retry_interval_seconds": t.retry_interval_s,
                        "retry_timeout_seconds": timeout,
                        "deadline": t.deadline,
                        "fraction": min(1.0, elapsed / timeout) if timeout > 0 else None,
                        "paused": t.paused,
                    }
                )
            elif t is not None and is_failing:
                vm_ok = False
                failing.append(
                    {
                        "vm": name,
                        "device": dev,
                        "backend": disk.backend,
                        "since": timed_out_at.get((vm.key, dev)),
                        "retry_timeout_seconds": t.retry_timeout_s,
                    }
                )
        if details:
            fleet.append(
                {
                    "vm": name,
                    "key": vm.key,
                    "source": vm.source,
                    "socket": vm.socket,
                    "uuid": vm.uuid,
                    "up": vm.up,
                    "status": vm.status,
                    "qemu_version": vm.qemu_version,
                    "retry_feature": vm.retry_feature,
                    "blind_intervals": vm.blind_intervals,
                    "blind_seconds": vm.blind_seconds,
                    "disks": disks_out,
                }
            )
        if vm_ok:
            compliant_vms.append({"vm": name, "devices": sorted(vm.disks)})

    hanging.sort(key=lambda h: (-(h["fraction"] or 0.0), -h["elapsed_seconds"], h["vm"], h["device"]))
    cutoff = now - RECENT_WINDOW_S
    recent: list[dict[str, Any]] = sorted(
        (
            {
                "vm": r.vm,
                "device": r.device,
                "start": r.hang.start,
                "end": r.hang.end,
                "duration_seconds": max(0.0, r.hang.duration),
                "outcome": r.hang.outcome.value,
            }
            for ring in hangs.recent.values()
            for r in ring
            if r.hang.end >= cutoff
        ),
        key=lambda h: -float(h["end"]),
    )
    blind_part = (blind or BlindSpots(0.0)).status()
    return {
        "schema": SCHEMA,
        "exporter_version": __version__,
        "generated_at": now,
        "policy": {
            "required": list(policy.required),
            "max_timeout_seconds": policy.max_timeout_seconds,
            "require_nonzero_timeout": policy.require_nonzero_timeout,
        },
        "summary": {
            "vms": len(vms),
            "vms_up": n_up,
            "vms_down": len(down),
            "vms_paused_io_error": len(paused),
            "vms_compliant": len(compliant_vms),
            "disks": n_disks,
            "disks_compliant": n_ok,
            "disks_violating": len(violations),
            "disks_hanging": len(hanging),
            "disks_failing": len(failing),
            "recent_hangs": len(recent),
            "blind_intervals": blind_part["intervals"],
            "blind_seconds": blind_part["seconds"],
        },
        # Backends with hanging or failing disks, worst first: one failing storage system shows
        # as one row, however many VMs it takes down.
        "backends": sorted(
            (
                {
                    "backend": name,
                    "disks": b.disks,
                    "hanging": b.hanging,
                    "failing": b.failing,
                    "vms_affected": b.vms,
                }
                for name, b in backend_counts(vms, hangs.trackers).items()
                if b.hanging or b.failing
            ),
            key=lambda b: (-(b["hanging"] + b["failing"]), b["backend"]),
        ),
        "hanging": hanging,
        "failing": failing,
        "paused": paused,
        "violations": violations,
        "down": down,
        "connections": [
            {"uri": c.uri, "up": c.up, "connect_errors": dict(c.connect_errors)} for c in conns.values()
        ],
        "compliant": {
            "by_policy": [
                {"werror": w, "rerror": r, "retry_interval_ms": i, "retry_timeout_ms": t, "disks": n}
                for (w, r, i, t), n in sorted(by_policy.items(), key=lambda kv: -kv[1])
            ],
            "vms": compliant_vms,
        },
        "recent_hangs": recent,
        **({"incidents": incidents} if incidents is not None else {}),
        # When the exporter could not see events (it did not run, a session or connection was
        # down): event counts are lower bounds across these (exporter.runtime.blind).
        "blind": blind_part,
        **({"vms": fleet} if details else {}),
    }
