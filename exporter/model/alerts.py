"""What the Prometheus rules and the exporter's push path must agree on, defined once.

``alerts/generate.py`` builds the rules from these values and texts, and
``exporter/alerting/push.py`` pushes the same alerts with them, so the two paths cannot drift: the
same thresholds, names, severities, summaries, descriptions and runbook links.  Standard library
only: the generator runs with a plain ``python3`` (plus PyYAML).

The annotation texts are Prometheus alert templates (Go ``text/template``).  The push path renders
them itself with :func:`render_template`, which implements exactly the part the texts use:
``{{ $labels.NAME }}``, ``{{ $value | humanizeDuration }}`` and
``{{ $value | humanizePercentage }}``, formatted the way Prometheus formats them.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Mapping
from typing import Final

__all__ = [
    "ALERT_APPROACHING_TIMEOUT",
    "ALERT_HANG",
    "ALERT_NEAR_TIMEOUT",
    "HANG_MIN_RETRY_INTERVALS",
    "HANG_MIN_SECONDS",
    "HANG_TIMEOUT_CRITICAL_RATIO",
    "HANG_TIMEOUT_WARNING_RATIO",
    "RUNBOOK_BASE_URL",
    "WHERE",
    "hang_alert_threshold",
    "hang_annotations",
    "humanize_duration",
    "humanize_percentage",
    "render_template",
    "runbook_base_url_problem",
    "runbook_url",
    "timeout_fraction_annotations",
]

ALERT_HANG: Final[str] = "QemuDiskIOHang"
ALERT_APPROACHING_TIMEOUT: Final[str] = "QemuIOHangApproachingTimeout"
ALERT_NEAR_TIMEOUT: Final[str] = "QemuIOHangNearTimeout"

# QemuDiskIOHang fires once a hang has lasted HANG_MIN_SECONDS *and* HANG_MIN_RETRY_INTERVALS x
# the disk's retry_interval (i.e. the larger of the two; seconds alone for disks without a
# retry_interval, e.g. a VM paused on a werror=stop error).  A storage blip shows as a hang of
# its length plus about one retry spacing plus hang.recovery_margin_seconds (a 1 s blip with the
# default 1 s interval: ~3 s), so it never gets there; see alerts/README.md for the choice.
HANG_MIN_SECONDS: Final[float] = 30
HANG_MIN_RETRY_INTERVALS: Final[float] = 3
# A hang on a disk with a non-zero retry_timeout: fraction of the timeout already spent.
# These alerts fire at once (no minimum duration): with a short retry_timeout every second counts.
HANG_TIMEOUT_WARNING_RATIO: Final[float] = 0.5
HANG_TIMEOUT_CRITICAL_RATIO: Final[float] = 0.8

# Where the runbook lives; each alert links to "<base>#<alertname lower-cased>".  The default is
# the runbook's path in this repository (relative to its root, where every anchor is tested to
# exist); the generator's --runbook-base-url and the exporter's alerting.runbook_base_url take the
# address docs/runbooks.md is published at (a wiki, a Git server's web view).
RUNBOOK_BASE_URL: Final[str] = "docs/runbooks.md"

#: Where an alert happens, in its description.
WHERE: Final[str] = "{{ $labels.vm }}/{{ $labels.device }} on {{ $labels.instance }}"


def hang_alert_threshold(
    retry_interval_s: float | None,
    min_seconds: float = HANG_MIN_SECONDS,
    min_retry_intervals: float = HANG_MIN_RETRY_INTERVALS,
) -> float:
    """Age (seconds) at which a hang fires QemuDiskIOHang: ``max(min_seconds, min_retry_intervals
    x retry_interval)``; ``None`` (no retry_interval known, as for a disk without the series) gives
    the seconds alone."""
    if retry_interval_s is None:
        return float(min_seconds)
    return float(max(min_seconds, min_retry_intervals * retry_interval_s))


def runbook_url(base: str, alertname: str) -> str:
    return f"{base}#{alertname.lower()}"


def runbook_base_url_problem(value: str) -> str | None:
    """Why ``value`` cannot be a runbook base (None: it can).  An http(s) address or a path
    (the default is a path in this repository); ``#<alert>`` is appended, so no fragment."""
    if not value or value != value.strip() or any(c.isspace() or ord(c) < 32 for c in value):
        return f"{value!r} is not a URL or path (empty, or contains whitespace)"
    u = urllib.parse.urlsplit(value)
    if u.fragment or "#" in value:
        return f"{value!r} has a fragment ('#...'): each alert appends '#<alert name lower-cased>'"
    if u.scheme:
        if u.scheme not in ("http", "https") or not u.hostname:
            return f"{value!r} is neither an http(s) URL with a host nor a path"
    elif u.netloc:
        return f"{value!r} has no scheme (write http:// or https://)"
    return None


# --- annotations (Prometheus templates) -------------------------------------------------------


def hang_annotations() -> tuple[str, str]:
    """(summary, description) of QemuDiskIOHang; ``$value`` is the hang's age in seconds."""
    return (
        "Disk IO is hanging: QEMU is retrying failed requests",
        f"IO on {WHERE} has been hanging for {{{{ $value | humanizeDuration }}}}: QEMU is "
        "holding and retrying the failed requests (retry policy), or the VM is paused on the "
        "error, so the guest's IO to this disk is blocked. The storage behind the disk is "
        "unreachable or returning errors.",
    )


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g}"


def timeout_fraction_annotations(alertname: str, ratio: float) -> tuple[str, str]:
    """(summary, description) of QemuIOHangApproachingTimeout / QemuIOHangNearTimeout at the
    threshold ``ratio``; ``$value`` is the share of retry_timeout spent."""
    summary = f"Disk IO hang has used {_pct(ratio)}% of its retry_timeout"
    if alertname == ALERT_APPROACHING_TIMEOUT:
        return summary, (
            f"IO on {WHERE} has been hanging (QEMU retrying failed requests) for "
            "{{ $value | humanizePercentage }} of the disk's retry_timeout. When the timeout "
            "passes, the guest gets IO errors. Restore the storage now."
        )
    if alertname == ALERT_NEAR_TIMEOUT:
        return summary, (
            f"IO on {WHERE} has been hanging for {{{{ $value | humanizePercentage }}}} of the "
            "disk's retry_timeout; the guest will see IO errors very soon."
        )
    raise ValueError(f"not a timeout-fraction alert: {alertname}")


# --- rendering (the push path) ----------------------------------------------------------------


def _go_g4(v: float) -> str:
    """Go's ``fmt.Sprintf("%.4g", v)`` (Python's ``%.4g`` agrees for finite values)."""
    return f"{v:.4g}"


def humanize_duration(v: float) -> str:
    """Prometheus' ``humanizeDuration`` template function."""
    if math.isnan(v) or math.isinf(v):
        return _go_g4(v)
    if v == 0:
        return f"{_go_g4(v)}s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        d = int(v)
        seconds, minutes, hours, days = d % 60, (d // 60) % 60, (d // 3600) % 24, d // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_go_g4(v)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix = p
        v *= 1000
    return f"{_go_g4(v)}{prefix}s"


def humanize_percentage(v: float) -> str:
    """Prometheus' ``humanizePercentage`` template function."""
    return f"{_go_g4(v * 100)}%"


_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_FUNCS = {"humanizeDuration": humanize_duration, "humanizePercentage": humanize_percentage}


def render_template(text: str, labels: Mapping[str, str], value: float) -> str:
    """Expand the template subset the annotation texts use (see the module docstring).  Any other
    action is an error: a new text must not silently render differently from Prometheus."""

    def action(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr.startswith("$labels."):
            return labels.get(expr.removeprefix("$labels."), "")
        pipe = [p.strip() for p in expr.split("|")]
        if len(pipe) == 2 and pipe[0] == "$value" and pipe[1] in _FUNCS:
            return _FUNCS[pipe[1]](value)
        raise ValueError(f"template action not supported by the push path: {{{{ {expr} }}}}")

    return _ACTION.sub(action, text)


#: severity (the key of ``alerting.fractions``) -> alert name of the rule with that threshold.
FRACTION_ALERTS: Final[Mapping[str, str]] = {
    "warning": ALERT_APPROACHING_TIMEOUT,
    "critical": ALERT_NEAR_TIMEOUT,
}
#: The rules' thresholds.
DEFAULT_FRACTIONS: Final[Mapping[str, float]] = {
    "warning": HANG_TIMEOUT_WARNING_RATIO,
    "critical": HANG_TIMEOUT_CRITICAL_RATIO,
}
