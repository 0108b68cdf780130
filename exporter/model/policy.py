"""Retry-policy verification: pure, no I/O.

A disk is protected against storage link loss only when QEMU holds its failing IO (``retry``)
instead of passing the error to the guest.  QMP shows the policy only as qdev properties read
with ``qom-get``; what each reading means is in ``shared/docs/domain.md`` section 2.  Every
failing rule is reported separately so an operator knows *what* to fix, not just that
something is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: The error policies that can be required to be ``retry``: writes and reads.
POLICY_OPERATIONS = ("werror", "rerror")


class Rule(StrEnum):
    """Why a disk is not compliant.  Values are the ``rule`` label: a closed set."""

    WERROR_NOT_RETRY = "werror_not_retry"
    RERROR_NOT_RETRY = "rerror_not_retry"
    # werror/rerror "auto": the policy (if any) sits on -drive, invisible to QMP, and QEMU
    # then ignores the -drive retry_interval (seen on openEuler 8.2).
    POLICY_NOT_VISIBLE = "policy_not_visible"
    # Upstream QEMU: no retry action at all.
    RETRY_UNSUPPORTED = "retry_unsupported"
    TIMEOUT_ZERO = "timeout_zero"
    TIMEOUT_ABOVE_MAX = "timeout_above_max"


ALL_RULES: tuple[Rule, ...] = tuple(Rule)


@dataclass(frozen=True)
class DiskPolicy:
    """The error policy of one disk as read over QMP.

    ``retry_interval_ms``/``retry_timeout_ms`` are None when QEMU has no such properties.
    ``retry_feature`` is None when the source cannot tell whether QEMU has the retry policy
    (libvirt's XML shows it only where a disk uses it).
    """

    werror: str
    rerror: str
    retry_interval_ms: int | None
    retry_timeout_ms: int | None
    retry_feature: bool | None


@dataclass(frozen=True)
class PolicyVerdict:
    violations: tuple[Rule, ...]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class PolicyConfig:
    """What a compliant disk looks like: ``policy:`` of the config file."""

    required: tuple[str, ...] = POLICY_OPERATIONS
    max_timeout_seconds: float | None = None
    require_nonzero_timeout: bool = False


def verify(policy: DiskPolicy, required: PolicyConfig) -> PolicyVerdict:
    """Check one disk against the configured requirements; returns every failing rule."""
    found: list[Rule] = []
    if policy.retry_feature is False:
        found.append(Rule.RETRY_UNSUPPORTED)
    values = {"werror": policy.werror, "rerror": policy.rerror}
    not_retry = {"werror": Rule.WERROR_NOT_RETRY, "rerror": Rule.RERROR_NOT_RETRY}
    invisible = False
    for op in required.required:
        value = values[op]
        if value == "retry":
            continue
        if value == "auto":
            invisible = True
        else:
            found.append(not_retry[op])
    if invisible:
        found.append(Rule.POLICY_NOT_VISIBLE)

    # Timeout rules only mean something where the retry policy can act.
    retrying = policy.retry_feature is not False and any(values[op] == "retry" for op in required.required)
    timeout_ms = policy.retry_timeout_ms
    if retrying and timeout_ms is not None:
        if timeout_ms == 0 and required.require_nonzero_timeout:
            found.append(Rule.TIMEOUT_ZERO)
        maximum = required.max_timeout_seconds
        # timeout 0 means "never": above any maximum.
        if maximum is not None and (timeout_ms == 0 or timeout_ms / 1000.0 > maximum):
            found.append(Rule.TIMEOUT_ABOVE_MAX)
    return PolicyVerdict(tuple(sorted(set(found), key=ALL_RULES.index)))
