"""The exporter's settings: one frozen dataclass per section of the config file, with the
defaults the exporter runs with when a section or key is absent.  What everyone else imports;
the YAML is read by `exporter.config.parse`."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from exporter.config.reader import DEFAULT_PORT
from exporter.model import collectors
from exporter.model.alerts import DEFAULT_FRACTIONS, RUNBOOK_BASE_URL
from exporter.model.backend import BackendRule
from exporter.model.policy import PolicyConfig

DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
DEFAULT_SOCKET_GLOB = "/run/qemu-iohang-exporter/*.qmp"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")
#: Default cap of one hang journal file (``hang.journal_max_bytes``): ~290 bytes a record.
DEFAULT_JOURNAL_MAX_BYTES = 16 * 1024 * 1024
#: Smallest cap accepted: a few hundred records.
MIN_JOURNAL_MAX_BYTES = 64 * 1024


def static_labels(table: Mapping[str, Mapping[str, str]], key: str) -> dict[str, str]:
    """The static labels ``table`` (``qmp.labels`` by socket, ``libvirt.labels`` by URI) gives
    ``key``: every matching glob pattern's, then the exact entry's, which wins."""
    labels: dict[str, str] = {}
    for pattern, lbls in table.items():
        if pattern != key and fnmatch.fnmatchcase(key, pattern):
            labels.update(lbls)
    labels.update(table.get(key, {}))
    return labels


@dataclass(frozen=True)
class QMPConfig:
    sockets: tuple[str, ...] = ()
    globs: tuple[str, ...] = ()
    # Static labels per socket path or glob pattern, added to every series of matching VMs.
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    discovery_interval_seconds: float = 1.0
    command_timeout_seconds: float = 5.0
    connect_timeout_seconds: float = 5.0
    poll_interval_seconds: float = 5.0
    refresh_interval_seconds: float = 60.0
    backoff_initial_seconds: float = 0.25
    backoff_max_seconds: float = 10.0


@dataclass(frozen=True)
class LibvirtConfig:
    """Watch every running domain of these libvirt URIs (`exporter.libvirt.source`)."""

    uris: tuple[str, ...] = ()
    # Static labels per URI, added to every series of that URI's domains.
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    # A libvirt call (they block) that takes longer is abandoned and the connection re-opened.
    call_timeout_seconds: float = 10.0
    # Full re-listing of running domains, a safety net behind the lifecycle events.
    relist_interval_seconds: float = 30.0
    # Block statistics of every domain (one getAllDomainStats call).
    poll_interval_seconds: float = 5.0
    # Reconnect backoff: doubles up to the max, with jitter.
    backoff_initial_seconds: float = 0.25
    backoff_max_seconds: float = 10.0


@dataclass(frozen=True)
class HangConfig:
    state_file: str | None = None
    # Extra silence, beyond the expected spacing of retries, before a hang counts as recovered.
    recovery_margin_seconds: float = 1.0
    # Every completed hang as a JSON line (`exporter.hang.journal`); None: no journal.
    journal_file: str | None = None
    # Size of the journal file before it is rotated to journal_file + ".1".
    journal_max_bytes: int = DEFAULT_JOURNAL_MAX_BYTES


@dataclass(frozen=True)
class MountsConfig:
    """Where the mount table comes from, for the backend of disks that are local files
    (`exporter.model.backend`): the exporter's own by default; ``/proc/1/mountinfo`` for an
    exporter in a container of its own that shares the host's PID namespace."""

    file: str = "/proc/self/mountinfo"
    refresh_interval_seconds: float = 60.0


@dataclass(frozen=True)
class CollectorsConfig:
    """Which metric collectors are on (`exporter.model.collectors`): the defaults unless
    ``disable_defaults``, then each switch in order (the file's, then the flags')."""

    switches: tuple[tuple[str, bool], ...] = ()
    disable_defaults: bool = False

    @property
    def enabled(self) -> frozenset[str]:
        return collectors.resolve(dict(self.switches), self.disable_defaults)


@dataclass(frozen=True)
class AlertingConfig:
    """``alerting:`` of the config file.  Disabled (nothing runs) without Alertmanager URLs."""

    #: Alertmanager base URLs (``http://am:9093``, optionally with a path prefix and user:password).
    alertmanager_urls: tuple[str, ...] = ()
    #: The ``instance`` / ``job`` labels Prometheus puts on this exporter's series.
    instance: str = ""
    job: str = "qemu-iohang"
    #: Prometheus' ``global.external_labels`` (added to every alert Prometheus sends).
    external_labels: Mapping[str, str] = field(default_factory=dict)
    #: severity -> share of retry_timeout; keys from FRACTION_ALERTS (omit one to not push it).
    fractions: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    #: Push QemuDiskIOHang (once a hang has lasted the rule's minimum).
    hang_alert: bool = True
    resend_interval_seconds: float = 30.0
    timeout_seconds: float = 2.0
    backoff_initial_seconds: float = 0.25
    backoff_max_seconds: float = 10.0
    max_pending: int = 10000
    #: ``generatorURL`` of the pushed alerts; default ``http://<instance>/metrics``.
    generator_url: str = ""
    #: Each alert's ``runbook_url`` is ``<base>#<alert name lower-cased>``, like the rules'
    #: (alerts/generate.py --runbook-base-url); default the rules' default.
    runbook_base_url: str = RUNBOOK_BASE_URL

    @property
    def enabled(self) -> bool:
        return bool(self.alertmanager_urls)

    def effective_generator_url(self) -> str:
        if self.generator_url:
            return self.generator_url
        return f"http://{self.instance}/metrics" if self.instance else ""


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of /healthz and of the systemd watchdog (``health:`` in the config file).

    Defaults: in an event storm at 1000 VMs a scrape, which takes several turns of the loop,
    has a p99 of up to ~1.6 s (docs/performance-history.md), so 5 s is well beyond a busy loop; the 10 s window is shorter than
    the 20 s that the three failed probes (10 s apart) span, after which the shipped DaemonSet
    restarts the pod: one passing spike makes the pod unready for a moment, no restart."""

    max_loop_lag_seconds: float = 5.0
    loop_lag_window_seconds: float = 10.0
    reader_stall_seconds: float = 10.0


@dataclass(frozen=True)
class Config:
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    telemetry_path: str = "/metrics"
    log_level: str = "info"
    log_format: str = "logfmt"
    qmp: QMPConfig = field(default_factory=QMPConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    hang: HangConfig = field(default_factory=HangConfig)
    alerting: AlertingConfig = field(default_factory=AlertingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    #: Operator rules naming disks' storage backends, tried in order before the derivation.
    backends: tuple[BackendRule, ...] = ()
    mounts: MountsConfig = field(default_factory=MountsConfig)
    collectors: CollectorsConfig = field(default_factory=CollectorsConfig)
    origin: str = "defaults"

    def socket_patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Explicit sockets and globs; the default glob applies only when neither is set."""
        if not self.qmp.sockets and not self.qmp.globs:
            return (), (DEFAULT_SOCKET_GLOB,)
        return self.qmp.sockets, self.qmp.globs
