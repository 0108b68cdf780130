"""The config file's sections, parsed and validated into `exporter.config.settings`; flags
are merged over it by `exporter.cli`.  Flags win over the file, like the Prometheus exporters."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import urllib.parse
from typing import Any

from exporter.config.reader import (
    Reader,
    _kind,
    check_label_name,
    read_yaml,
    validate_libvirt_uri,
    validate_listen_address,
    validate_telemetry_path,
)
from exporter.config.settings import (
    LOG_FORMATS,
    LOG_LEVELS,
    MIN_JOURNAL_MAX_BYTES,
    AlertingConfig,
    CollectorsConfig,
    Config,
    HangConfig,
    HealthConfig,
    LibvirtConfig,
    MountsConfig,
    QMPConfig,
)
from exporter.model import collectors
from exporter.model.alerts import FRACTION_ALERTS, runbook_base_url_problem
from exporter.model.backend import MAX_BACKEND, BackendRule
from exporter.model.policy import POLICY_OPERATIONS, PolicyConfig


def load_file(path: str) -> Config:
    """Parse and validate a YAML config file."""
    return parse(read_yaml(path), origin=path)


def parse(doc: Any, origin: str) -> Config:
    r = Reader(origin)
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


def _parse_hang(r: Reader, value: Any) -> HangConfig:
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


def _parse_collectors(r: Reader, value: Any) -> CollectorsConfig:
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


def _parse_backends(r: Reader, value: Any) -> tuple[BackendRule, ...]:
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


def _parse_mounts(r: Reader, value: Any) -> MountsConfig:
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


def _parse_alerting(r: Reader, value: Any) -> AlertingConfig:
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


def _parse_health(r: Reader, value: Any) -> HealthConfig:
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


def _parse_labels(r: Reader, value: Any, section: str) -> dict[str, dict[str, str]]:
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


def _parse_qmp(r: Reader, value: Any) -> QMPConfig:
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


#: Settings the ``qmp:`` section gave the libvirt source too, before it had its own: a file that
#: sets only the ``qmp:`` one keeps its meaning (it is the libvirt default there).
_LIBVIRT_FROM_QMP = ("poll_interval_seconds", "backoff_initial_seconds", "backoff_max_seconds")


def _parse_libvirt(r: Reader, value: Any, qmp_section: Any, qmp: QMPConfig) -> LibvirtConfig:
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


def _parse_policy(r: Reader, value: Any) -> PolicyConfig:
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
