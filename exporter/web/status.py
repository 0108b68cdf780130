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
from exporter.hang.machine import DiskHangTracker
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


#: Why a VM is down (`_down_reason`, `exporter.qmp.failures.connect_error_reason`), for people.
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


def _down_reason(vm: VMState, connections: Mapping[str, ConnectionState]) -> str:
    """Why a VM has no live session, in a word an operator can act on."""
    if vm.source == "libvirt":
        conn = connections.get(vm.socket)
        if conn is not None and not conn.up:
            return "libvirt_down"
        return "not_running"
    if vm.last_connect_error:
        return vm.last_connect_error
    return "session_ended" if vm.disconnects else "connecting"


def advance_hangs(vms: Sequence[VMState], hangs: HangTracking, now: float) -> None:
    """Bring hang tracking up to ``now``, as a scrape does: the blind intervals first (before
    any silence is inferred), then every hanging or failing disk up to what was read of its VM,
    so that silence may end a hang.  This changes hang tracking (a hang may end here), which is
    why the status snapshot does it first, in one place, and reads only afterwards."""
    hangs.apply_blind()
    for vm in vms:
        trackers = hangs.trackers.get(vm.key, {})
        for dev in vm.disks:
            t = trackers.get(dev)
            if t is not None and t.active:
                t.advance(vm.read_through(now))


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
    """Advance hang tracking to ``now`` (`advance_hangs`), then the snapshot of every watched
    VM at ``now`` (same clock as QEMU's event timestamps).

    Linear in disks plus recent hangs.  ``details``: include ``vms``, every VM with every disk
    (what scripts and ``qemu-iohang-check`` read); the HTML page does without, which halves the
    work at 1000 VMs.  ``incidents``: the storage incidents of the last 24 h from the hang
    journal (`exporter.hang.incidents`), shown only when the journal is on."""
    advance_hangs(vms, hangs, now)
    conns = {c.uri: c for c in connections}
    sections = _Sections(policy, now, conns, _timed_out_at(hangs), details)
    for name, _key, vm in sorted((v.vm, v.key, v) for v in vms):
        sections.add_vm(name, vm, hangs.trackers.get(vm.key, {}))
    sections.hanging.sort(
        key=lambda h: (-(h["fraction"] or 0.0), -h["elapsed_seconds"], h["vm"], h["device"])
    )
    recent = _recent_hangs(hangs, now)
    blind_part = (blind or BlindSpots(0.0)).status()
    return {
        "schema": SCHEMA,
        "exporter_version": __version__,
        "generated_at": now,
        "policy": _policy(policy),
        "summary": _summary(sections, len(vms), recent, blind_part),
        # Backends with hanging or failing disks, worst first: one failing storage system shows
        # as one row, however many VMs it takes down.
        "backends": _backends(vms, hangs),
        "hanging": sections.hanging,
        "failing": sections.failing,
        "paused": sections.paused,
        "violations": sections.violations,
        "down": sections.down,
        "connections": _connections(conns.values()),
        "compliant": _compliant(sections),
        "recent_hangs": recent,
        **({"incidents": incidents} if incidents is not None else {}),
        # When the exporter could not see events (it did not run, a session or connection was
        # down): event counts are lower bounds across these (exporter.runtime.blind).
        "blind": blind_part,
        **({"vms": sections.fleet} if details else {}),
    }


class _Sections:
    """The per-VM and per-disk sections of the snapshot, filled in one pass over the fleet
    (one pass: at 1000 VMs the snapshot is built on every page load).  Reads hang tracking,
    never advances it (`advance_hangs` did)."""

    def __init__(
        self,
        policy: PolicyConfig,
        now: float,
        conns: Mapping[str, ConnectionState],
        timed_out_at: Mapping[tuple[str, str], float],
        details: bool,
    ) -> None:
        self.policy, self.now, self.conns = policy, now, conns
        self.timed_out_at, self.details = timed_out_at, details
        self.hanging: list[dict[str, Any]] = []
        self.failing: list[dict[str, Any]] = []
        self.paused: list[dict[str, Any]] = []
        self.violations: list[dict[str, Any]] = []
        self.down: list[dict[str, Any]] = []
        self.fleet: list[dict[str, Any]] = []
        self.by_policy: dict[tuple[Any, ...], int] = {}
        self.compliant_vms: list[dict[str, Any]] = []
        self.n_disks = self.n_ok = self.n_up = 0

    def add_vm(self, name: str, vm: VMState, trackers: Mapping[str, DiskHangTracker]) -> None:
        vm_ok = vm.up
        if vm.up:
            self.n_up += 1
        else:
            self.down.append(_down_row(name, vm, self.conns))
        if vm.status == "io-error":
            self.paused.append({"vm": name, "status": vm.status})
            vm_ok = False
        disks_out: list[dict[str, Any]] = []
        for dev in sorted(vm.disks):
            disk_ok = self._add_disk(name, vm, dev, trackers.get(dev), disks_out)
            vm_ok = vm_ok and disk_ok
        if self.details:
            self.fleet.append(_vm_row(name, vm, disks_out))
        if vm_ok:
            self.compliant_vms.append({"vm": name, "devices": sorted(vm.disks)})

    def _add_disk(
        self,
        name: str,
        vm: VMState,
        dev: str,
        t: DiskHangTracker | None,
        disks_out: list[dict[str, Any]],
    ) -> bool:
        """Files one disk under the sections it belongs to; False if it makes its VM not ok."""
        disk: Disk = vm.disks[dev]
        self.n_disks += 1
        p = disk.policy
        rules = [r.value for r in disk.verdict.violations]
        is_hanging = t is not None and t.hanging
        is_failing = t is not None and t.failing
        if self.details:
            disks_out.append(_disk_row(dev, disk, rules, is_hanging, is_failing))
        if rules:
            self.violations.append(_violation_row(name, dev, p, rules, self.policy))
        else:
            self.n_ok += 1
            sig = (p.werror, p.rerror, p.retry_interval_ms, p.retry_timeout_ms)
            self.by_policy[sig] = self.by_policy.get(sig, 0) + 1
        if t is not None and is_hanging:
            self.hanging.append(_hanging_row(name, dev, disk, t, self.now))
        elif t is not None and is_failing:
            since = self.timed_out_at.get((vm.key, dev))
            self.failing.append(_failing_row(name, dev, disk, t, since))
        return not rules and not is_hanging and not is_failing


def _timed_out_at(hangs: HangTracking) -> dict[tuple[str, str], float]:
    """Failing disks: since the end of their latest timed-out hang, when it is still kept."""
    timed_out_at: dict[tuple[str, str], float] = {}
    for (key, dev), ring in hangs.recent.items():
        for r in reversed(ring):
            if r.hang.outcome == "timed_out":
                timed_out_at[(key, dev)] = r.hang.end
                break
    return timed_out_at


def _down_row(name: str, vm: VMState, conns: Mapping[str, ConnectionState]) -> dict[str, Any]:
    return {
        "vm": name,
        "source": vm.source,
        "socket": vm.socket,
        "reason": _down_reason(vm, conns),
        "connect_errors": dict(vm.connect_errors),
    }


def _disk_row(dev: str, disk: Disk, rules: list[str], hanging: bool, failing: bool) -> dict[str, Any]:
    return {
        "device": dev,
        "type": disk.qdev_type,
        "backend": disk.backend,
        **policy_fields(disk.policy),
        "compliant": not rules,
        "rules": rules,
        "hanging": hanging,
        "failing": failing,
    }


def _violation_row(
    name: str, dev: str, p: DiskPolicy, rules: list[str], policy: PolicyConfig
) -> dict[str, Any]:
    return {
        "vm": name,
        "device": dev,
        **policy_fields(p),
        "rules": [{"rule": r, "fix": rule_fix(r, policy)} for r in rules],
    }


def _hanging_row(name: str, dev: str, disk: Disk, t: DiskHangTracker, now: float) -> dict[str, Any]:
    start = t.hang_start or now
    timeout = t.retry_timeout_s
    elapsed = t.duration(now)
    return {
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


def _failing_row(name: str, dev: str, disk: Disk, t: DiskHangTracker, since: float | None) -> dict[str, Any]:
    return {
        "vm": name,
        "device": dev,
        "backend": disk.backend,
        "since": since,
        "retry_timeout_seconds": t.retry_timeout_s,
    }


def _vm_row(name: str, vm: VMState, disks_out: list[dict[str, Any]]) -> dict[str, Any]:
    return {
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


def _recent_hangs(hangs: HangTracking, now: float) -> list[dict[str, Any]]:
    cutoff = now - RECENT_WINDOW_S
    return sorted(
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


def _policy(policy: PolicyConfig) -> dict[str, Any]:
    return {
        "required": list(policy.required),
        "max_timeout_seconds": policy.max_timeout_seconds,
        "require_nonzero_timeout": policy.require_nonzero_timeout,
    }


def _summary(
    s: _Sections, n_vms: int, recent: list[dict[str, Any]], blind_part: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "vms": n_vms,
        "vms_up": s.n_up,
        "vms_down": len(s.down),
        "vms_paused_io_error": len(s.paused),
        "vms_compliant": len(s.compliant_vms),
        "disks": s.n_disks,
        "disks_compliant": s.n_ok,
        "disks_violating": len(s.violations),
        "disks_hanging": len(s.hanging),
        "disks_failing": len(s.failing),
        "recent_hangs": len(recent),
        "blind_intervals": blind_part["intervals"],
        "blind_seconds": blind_part["seconds"],
    }


def _backends(vms: Sequence[VMState], hangs: HangTracking) -> list[dict[str, Any]]:
    return sorted(
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
    )


def _connections(conns: Iterable[ConnectionState]) -> list[dict[str, Any]]:
    return [{"uri": c.uri, "up": c.up, "connect_errors": dict(c.connect_errors)} for c in conns]


def _compliant(s: _Sections) -> dict[str, Any]:
    return {
        "by_policy": [
            {"werror": w, "rerror": r, "retry_interval_ms": i, "retry_timeout_ms": t, "disks": n}
            for (w, r, i, t), n in sorted(s.by_policy.items(), key=lambda kv: -kv[1])
        ],
        "vms": s.compliant_vms,
    }
