"""Configuration: command-line flags merged over an optional YAML file.

Every problem is reported as a `ConfigError` that names the file (or flag) and the key, so the
CLI can print one line and exit 2 instead of a traceback.  Flags win over the file, like the
Prometheus exporters do.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.model import collectors
from exporter.model.alerts import (
    DEFAULT_FRACTIONS,
    FRACTION_ALERTS,
    RUNBOOK_BASE_URL,
    runbook_base_url_problem,
)
from exporter.model.backend import MAX_BACKEND, BackendRule
from exporter.model.policy import POLICY_OPERATIONS, PolicyConfig

DEFAULT_PORT = 9738
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
DEFAULT_SOCKET_GLOB = "/run/qemu-iohang-exporter/*.qmp"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")
#: Default cap of one hang journal file (``hang.journal_max_bytes``): ~290 bytes a record.
DEFAULT_JOURNAL_MAX_BYTES = 16 * 1024 * 1024
#: Smallest cap accepted: a few hundred records.
MIN_JOURNAL_MAX_BYTES = 64 * 1024


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator (`origin: key: problem`)."""

    def __init__(self, origin: str, key: str, problem: str) -> None:
        super().__init__(f"{origin}: {key}: {problem}")
        self.origin = origin
        self.key = key
        self.problem = problem


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
    has a p99 of up to ~1.6 s (docs/performance.md), so 5 s is well beyond a busy loop; the 10 s window is shorter than
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


# --- validation helpers -------------------------------------------------------------------


class _Reader:
    """Reads typed values out of a YAML mapping, raising ConfigError with the dotted key."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.origin, key, problem)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(_join(key, str(k)), "keys must be strings")
            if k not in allowed:
                raise self.fail(_join(key, k), f"unknown key (expected one of {sorted(allowed)})")
        return value

    def string(self, value: Any, key: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {list(choices)}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of strings, got {_kind(value)}")
        return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))

    def seconds(self, value: Any, key: str, *, minimum: float = 0.0, strict: bool = True) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(key, f"expected a number of seconds, got {_kind(value)}")
        if value < minimum or (strict and value == minimum):
            op = ">" if strict else ">="
            raise self.fail(key, f"must be {op} {minimum:g}, got {value:g}")
        return float(value)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_kind(value)}")
        return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    return f"{type(value).__name__} {value!r}"


def validate_listen_address(origin: str, key: str, value: str) -> tuple[str, int]:
    """Split ``host:port`` (``:port`` = all interfaces, ``[::1]:port`` for IPv6)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(origin, key, f"{value!r} is not host:port (e.g. ':{DEFAULT_PORT}')")
    host = host.strip("[]")
    return host, int(port_s)


def validate_telemetry_path(origin: str, key: str, value: str) -> str:
    if not value.startswith("/") or value == "/":
        raise ConfigError(origin, key, f"{value!r} must be an absolute path other than '/'")
    return value


# --- loading ------------------------------------------------------------------------------


def read_yaml(path: str) -> Any:
    """Read a YAML document; a missing, unreadable or malformed file is a `ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", "not a text file") from None
    except OSError as exc:
        raise ConfigError(path, "(file)", exc.strerror or str(exc)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(syntax)"
        raise ConfigError(path, where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None


def load_file(path: str) -> Config:
    """Parse and validate a YAML config file."""
    return parse(read_yaml(path), origin=path)


def parse(doc: Any, origin: str) -> Config:
    r = _Reader(origin)
    top = r.mapping(
        doc,
        "",
        {
            "web",
            "qmp",
            "libvirt",
            "policy",
            "hang",
            "log",
            "alerting",
            "health",
            "backends",
            "mounts",
            "collectors",
        },
    )
    cfg = Config(origin=origin)

    web = r.mapping(top.get("web"), "web", {"listen_address", "telemetry_path"})
    if "listen_address" in web:
        addr = r.string(web["listen_address"], "web.listen_address")
        validate_listen_address(origin, "web.listen_address", addr)
        cfg = dataclasses.replace(cfg, listen_address=addr)
    if "telemetry_path" in web:
        tp = r.string(web["telemetry_path"], "web.telemetry_path")
        cfg = dataclasses.replace(
            cfg, telemetry_path=validate_telemetry_path(origin, "web.telemetry_path", tp)
        )

    log = r.mapping(top.get("log"), "log", {"level", "format"})
    if "level" in log:
        cfg = dataclasses.replace(cfg, log_level=r.string(log["level"], "log.level", LOG_LEVELS))
    if "format" in log:
        fmt = r.string(log["format"], "log.format", LOG_FORMATS)
        cfg = dataclasses.replace(cfg, log_format=fmt)

    cfg = dataclasses.replace(cfg, qmp=_parse_qmp(r, top.get("qmp")))
    cfg = dataclasses.replace(cfg, libvirt=_parse_libvirt(r, top.get("libvirt"), top.get("qmp"), cfg.qmp))
    cfg = dataclasses.replace(cfg, policy=_parse_policy(r, top.get("policy")))

    hc = _parse_hang(r, top.get("hang"))
    cfg = dataclasses.replace(cfg, alerting=_parse_alerting(r, top.get("alerting")))
    cfg = dataclasses.replace(cfg, health=_parse_health(r, top.get("health")))
    cfg = dataclasses.replace(cfg, backends=_parse_backends(r, top.get("backends")))
    cfg = dataclasses.replace(cfg, mounts=_parse_mounts(r, top.get("mounts")))
    cfg = dataclasses.replace(cfg, collectors=_parse_collectors(r, top.get("collectors")))
    return dataclasses.replace(cfg, hang=hc)


def _parse_hang(r: _Reader, value: Any) -> HangConfig:
    hang = r.mapping(
        value, "hang", {"state_file", "recovery_margin_seconds", "journal_file", "journal_max_bytes"}
    )
    hc = HangConfig()
    if "state_file" in hang:
        hc = dataclasses.replace(hc, state_file=r.string(hang["state_file"], "hang.state_file"))
    if "recovery_margin_seconds" in hang:
        margin = r.seconds(hang["recovery_margin_seconds"], "hang.recovery_margin_seconds")
        hc = dataclasses.replace(hc, recovery_margin_seconds=margin)
    if "journal_file" in hang:
        hc = dataclasses.replace(hc, journal_file=r.string(hang["journal_file"], "hang.journal_file"))
    if "journal_max_bytes" in hang:
        n = hang["journal_max_bytes"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise r.fail("hang.journal_max_bytes", f"expected a whole number of bytes, got {_kind(n)}")
        if n < MIN_JOURNAL_MAX_BYTES:
            raise r.fail(
                "hang.journal_max_bytes", f"must be at least {MIN_JOURNAL_MAX_BYTES} (64 KiB), got {n}"
            )
        hc = dataclasses.replace(hc, journal_max_bytes=n)
    return hc


def _parse_collectors(r: _Reader, value: Any) -> CollectorsConfig:
    """``collectors: {disable_defaults: false, blockstats: true, process: false}``: the flags
    ``--collector.disable-defaults``, ``--collector.NAME`` and ``--no-collector.NAME``."""
    section = r.mapping(value, "collectors", {"disable_defaults", *collectors.COLLECTORS})
    switches = tuple(
        (name, r.boolean(on, f"collectors.{name}"))
        for name, on in section.items()
        if name != "disable_defaults"
    )
    disable = r.boolean(section.get("disable_defaults", False), "collectors.disable_defaults")
    return CollectorsConfig(switches, disable)


def _parse_backends(r: _Reader, value: Any) -> tuple[BackendRule, ...]:
    """``backends: [{match: <glob>, name: <backend>}, {regex: <regex>, name: ...}]``: exactly one
    of ``match``/``regex`` per rule, matched against the whole source or derived backend."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise r.fail("backends", f"expected a list of {{match|regex, name}} rules, got {_kind(value)}")
    rules: list[BackendRule] = []
    for i, raw in enumerate(value):
        key = f"backends[{i}]"
        rule = r.mapping(raw, key, {"match", "regex", "name"})
        if not rule:
            raise r.fail(key, "expected a mapping with match or regex, and name")
        if ("match" in rule) == ("regex" in rule):
            raise r.fail(key, "give exactly one of match (a glob) and regex")
        if "name" not in rule:
            raise r.fail(f"{key}.name", "missing: the backend name for sources that match")
        name = r.string(rule["name"], f"{key}.name")
        if len(name) > MAX_BACKEND or not name.isprintable():
            raise r.fail(f"{key}.name", f"must be printable and at most {MAX_BACKEND} characters")
        if "match" in rule:
            glob = r.string(rule["match"], f"{key}.match")
            pattern = re.compile(fnmatch.translate(glob))
        else:
            text = r.string(rule["regex"], f"{key}.regex")
            try:
                pattern = re.compile(text)
            except re.error as exc:
                raise r.fail(f"{key}.regex", f"invalid regular expression: {exc}") from None
        try:  # a group the name refers to must exist: checked now, not at the first disk
            _check_template(pattern, name)
        except (re.error, IndexError) as exc:
            raise r.fail(f"{key}.name", f"refers to a group the pattern lacks: {exc}") from None
        rules.append(BackendRule(pattern=pattern, name=name))
    return tuple(rules)


def _check_template(pattern: re.Pattern[str], name: str) -> None:
    """Raise when ``name`` refers to a group ``pattern`` does not have: expand it against an
    empty match of a pattern with the same groups."""
    names = {i: n for n, i in pattern.groupindex.items()}
    probe = re.compile(
        "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1))
    )
    m = probe.fullmatch("")
    assert m is not None
    m.expand(name)


def _parse_mounts(r: _Reader, value: Any) -> MountsConfig:
    m = r.mapping(value, "mounts", {"file", "refresh_interval_seconds"})
    mc = MountsConfig()
    if "file" in m:
        mc = dataclasses.replace(mc, file=r.string(m["file"], "mounts.file"))
    if "refresh_interval_seconds" in m:
        every = r.seconds(m["refresh_interval_seconds"], "mounts.refresh_interval_seconds")
        mc = dataclasses.replace(mc, refresh_interval_seconds=every)
    return mc


_ALERTING_KEYS = {
    "alertmanager_urls",
    "instance",
    "job",
    "external_labels",
    "fractions",
    "hang_alert",
    "resend_interval_seconds",
    "timeout_seconds",
    "generator_url",
    "runbook_base_url",
}


def _parse_alerting(r: _Reader, value: Any) -> AlertingConfig:
    a = r.mapping(value, "alerting", _ALERTING_KEYS)
    ac = AlertingConfig()
    if "alertmanager_urls" in a:
        urls = r.strings(a["alertmanager_urls"], "alerting.alertmanager_urls")
        for i, url in enumerate(urls):
            u = urllib.parse.urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
                raise r.fail(f"alerting.alertmanager_urls[{i}]", f"{url!r} is not an http(s) base URL")
        ac = dataclasses.replace(ac, alertmanager_urls=urls)
    if "instance" in a:
        ac = dataclasses.replace(ac, instance=r.string(a["instance"], "alerting.instance"))
    if "job" in a:
        ac = dataclasses.replace(ac, job=r.string(a["job"], "alerting.job"))
    if "generator_url" in a:
        ac = dataclasses.replace(ac, generator_url=r.string(a["generator_url"], "alerting.generator_url"))
    if "runbook_base_url" in a:
        base = r.string(a["runbook_base_url"], "alerting.runbook_base_url")
        problem = runbook_base_url_problem(base)
        if problem is not None:
            raise r.fail("alerting.runbook_base_url", problem)
        ac = dataclasses.replace(ac, runbook_base_url=base)
    if "external_labels" in a:
        raw = a["external_labels"]
        labels = r.mapping(raw, "alerting.external_labels", set(raw) if isinstance(raw, dict) else set())
        for k, v in labels.items():
            check_label_name(r.origin, f"alerting.external_labels.{k}", k)
            labels[k] = r.string(v, f"alerting.external_labels.{k}")
        ac = dataclasses.replace(ac, external_labels=dict(labels))
    if "fractions" in a:
        fractions = r.mapping(a["fractions"], "alerting.fractions", set(FRACTION_ALERTS))
        for sev, f in fractions.items():
            if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1:
                raise r.fail(f"alerting.fractions.{sev}", f"expected a number in (0, 1), got {_kind(f)}")
        ac = dataclasses.replace(ac, fractions={k: float(v) for k, v in fractions.items()})
    if "hang_alert" in a:
        ac = dataclasses.replace(ac, hang_alert=r.boolean(a["hang_alert"], "alerting.hang_alert"))
    if "resend_interval_seconds" in a:
        resend = r.seconds(a["resend_interval_seconds"], "alerting.resend_interval_seconds")
        ac = dataclasses.replace(ac, resend_interval_seconds=resend)
    if "timeout_seconds" in a:
        timeout = r.seconds(a["timeout_seconds"], "alerting.timeout_seconds")
        ac = dataclasses.replace(ac, timeout_seconds=timeout)
    if ac.enabled and not ac.instance:
        raise r.fail(
            "alerting.instance",
            "required with alertmanager_urls: the instance label Prometheus gives this exporter (e.g. 'host:9738')",
        )
    return ac


def _parse_health(r: _Reader, value: Any) -> HealthConfig:
    keys = [f.name for f in dataclasses.fields(HealthConfig)]
    h = r.mapping(value, "health", set(keys))
    return HealthConfig(**{k: r.seconds(h[k], f"health.{k}") for k in keys if k in h})


_QMP_SECONDS = (
    "discovery_interval_seconds",
    "command_timeout_seconds",
    "connect_timeout_seconds",
    "poll_interval_seconds",
    "refresh_interval_seconds",
    "backoff_initial_seconds",
    "backoff_max_seconds",
)


def _parse_labels(r: _Reader, value: Any, section: str) -> dict[str, dict[str, str]]:
    """``{pattern: {label: value}}``: static labels per socket path or glob, or per libvirt URI."""
    labels: dict[str, dict[str, str]] = {}
    for pattern, lbls in r.mapping(value, section, set(value or {})).items():
        key = f"{section}.{pattern}"
        m = r.mapping(lbls, key, set(lbls or {}))
        labels[pattern] = {}
        for name, v in m.items():
            check_label_name(r.origin, f"{key}.{name}", name)
            labels[pattern][name] = r.string(str(v) if isinstance(v, int | float) else v, f"{key}.{name}")
    return labels


def _parse_qmp(r: _Reader, value: Any) -> QMPConfig:
    q = r.mapping(value, "qmp", {"sockets", "globs", "labels", *_QMP_SECONDS})
    labels = _parse_labels(r, q.get("labels"), "qmp.labels")
    kwargs: dict[str, Any] = {
        "sockets": r.strings(q.get("sockets"), "qmp.sockets"),
        "globs": r.strings(q.get("globs"), "qmp.globs"),
        "labels": labels,
    }
    for name in _QMP_SECONDS:
        if name in q:
            kwargs[name] = r.seconds(q[name], f"qmp.{name}")
    qc = QMPConfig(**kwargs)
    if qc.backoff_max_seconds < qc.backoff_initial_seconds:
        raise r.fail("qmp.backoff_max_seconds", "must be >= qmp.backoff_initial_seconds")
    return qc


def validate_libvirt_uri(origin: str, key: str, uri: str) -> str:
    """A libvirt connection URI of the QEMU driver (``qemu:///system``, ``qemu+ssh://h/system``)."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme.split("+")[0] != "qemu":
        raise ConfigError(origin, key, f"{uri!r} is not a libvirt QEMU URI (e.g. 'qemu:///system')")
    return uri


#: Settings the ``qmp:`` section gave the libvirt source too, before it had its own: a file that
#: sets only the ``qmp:`` one keeps its meaning (it is the libvirt default there).
_LIBVIRT_FROM_QMP = ("poll_interval_seconds", "backoff_initial_seconds", "backoff_max_seconds")


def _parse_libvirt(r: _Reader, value: Any, qmp_section: Any, qmp: QMPConfig) -> LibvirtConfig:
    lv = r.mapping(
        value,
        "libvirt",
        {"uri", "labels", "call_timeout_seconds", "relist_interval_seconds", *_LIBVIRT_FROM_QMP},
    )
    lc = LibvirtConfig()
    if "uri" in lv:
        raw = lv["uri"]
        uris = (r.string(raw, "libvirt.uri"),) if isinstance(raw, str) else r.strings(raw, "libvirt.uri")
        for i, uri in enumerate(uris):
            validate_libvirt_uri(
                r.origin, "libvirt.uri" if isinstance(raw, str) else f"libvirt.uri[{i}]", uri
            )
        lc = dataclasses.replace(lc, uris=tuple(dict.fromkeys(uris)))
    for pattern in qmp.labels:
        if any(pattern == uri or fnmatch.fnmatchcase(uri, pattern) for uri in lc.uris):
            raise r.fail(
                f"qmp.labels.{pattern}",
                f"labels of libvirt domains moved: rename to libvirt.labels.{pattern}",
            )
    lc = dataclasses.replace(lc, labels=_parse_labels(r, lv.get("labels"), "libvirt.labels"))
    seconds = {name: getattr(qmp, name) for name in _LIBVIRT_FROM_QMP if name in (qmp_section or {})}
    for name in ("call_timeout_seconds", "relist_interval_seconds", *_LIBVIRT_FROM_QMP):
        if name in lv:
            seconds[name] = r.seconds(lv[name], f"libvirt.{name}")
    lc = dataclasses.replace(lc, **seconds)
    if lc.backoff_max_seconds < lc.backoff_initial_seconds:
        raise r.fail("libvirt.backoff_max_seconds", "must be >= libvirt.backoff_initial_seconds")
    return lc


def _parse_policy(r: _Reader, value: Any) -> PolicyConfig:
    p = r.mapping(value, "policy", {"required", "max_timeout_seconds", "require_nonzero_timeout"})
    pc = PolicyConfig()
    if "required" in p:
        req = r.strings(p["required"], "policy.required")
        for i, op in enumerate(req):
            if op not in POLICY_OPERATIONS:
                raise r.fail(f"policy.required[{i}]", f"{op!r} is not one of {list(POLICY_OPERATIONS)}")
        pc = dataclasses.replace(pc, required=tuple(dict.fromkeys(req)))
    if p.get("max_timeout_seconds") is not None:
        mx = r.seconds(p["max_timeout_seconds"], "policy.max_timeout_seconds")
        pc = dataclasses.replace(pc, max_timeout_seconds=mx)
    if "require_nonzero_timeout" in p:
        nz = r.boolean(p["require_nonzero_timeout"], "policy.require_nonzero_timeout")
        pc = dataclasses.replace(pc, require_nonzero_timeout=nz)
    return pc


RESERVED_LABELS = frozenset(
    {
        "vm",
        "device",
        "backend",
        "drive",
        "node_name",
        "qdev_type",
        "werror",
        "rerror",
        "rule",
        "operation",
        "action",
        "outcome",
        "status",
        "uuid",
        "qemu_version",
        "socket",
        "reason",
        "command",
        "event",
        "le",
        "instance",
        "job",
    }
)


def check_label_name(origin: str, key: str, name: str) -> None:
    valid = name and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c == "_" for c in name)
    if not valid or not name.isascii() or name.startswith("__"):
        raise ConfigError(origin, key, f"{name!r} is not a valid Prometheus label name")
    if name in RESERVED_LABELS:
        raise ConfigError(origin, key, f"{name!r} is a label the exporter sets itself")
