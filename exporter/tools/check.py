"""``qemu-iohang-check``: is every disk on this host (or in these domain files) running the
retry policy, and is any hanging right now?  One command, one answer, an exit status.

For operators before a live migration or after a change (the destination must carry the same
IO-hang configuration as the source), and for automation.  Sources, any number of each:

* ``--qmp.socket`` / ``--qmp.glob``: running QEMUs, read once with exactly the exporter's
  read-only QMP code (`VMWatcher.read_once`);
* ``--libvirt.uri``: every running domain's live XML, parsed as the exporter's libvirt source
  does (`exporter.libvirt.domxml`); a read-only connection, nothing changed or tainted;
* ``--xml FILE``: domain XML files, running or not (a migration destination's definition, with
  or without its ``<uuid>``), or files of bare ``<disk>`` elements as openEuler's documentation
  gives them (a VM named after the file);
* ``--exporter.url``: a running exporter's ``/api/v1/status``.  A QMP socket serves one client
  at a time, so on a host where the exporter watches the sockets this is how to ask.

Every disk is verified against the policy of ``--config.file`` (same section and defaults as
the exporter), whichever source it came from.

Exit status: 0 every disk complies and none hangs; 1 a disk violates the policy, hangs or fails
now, a VM is paused on io-error, or a VM/source could not be read while others could (not
proven compliant); 2 bad usage, or nothing could be read at all.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import sys
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.cli import LIBVIRT_MISSING, OneLineParser
from exporter.config import Config, ConfigError, load_file, validate_libvirt_uri
from exporter.libvirt.calls import quiet_libvirt_errors
from exporter.libvirt.domxml import Domain, parse_definition, parse_domain
from exporter.libvirt.translate import model_disks
from exporter.model.policy import DiskPolicy, PolicyConfig, verify
from exporter.model.state import Disk, VMState
from exporter.qmp.discovery import unmatched_reason
from exporter.qmp_watch import VMWatcher
from exporter.tools.api_client import api_url, get_json, safe_url
from exporter.web.status import REASON_TEXT, rule_fix

PROG = "qemu-iohang-check"

#: QMP sockets read at once (each is a short session; QEMUs answer in parallel).
QMP_CONCURRENCY = 16


@dataclass
class Row:
    """One disk (or one VM that could not be read, ``device`` "-") in the answer."""

    vm: str
    source: str  # qmp:<socket>, libvirt:<uri>, xml:<file>, exporter:<url>
    device: str
    uuid: str = ""  # "" where the source has none (a domain file not defined yet, bare disks)
    werror: str = ""
    rerror: str = ""
    retry_interval_ms: int | None = None
    retry_timeout_ms: int | None = None
    rules: list[str] = field(default_factory=list)
    hanging: bool = False
    failing: bool = False
    paused_io_error: bool = False
    error: str = ""  # why the VM could not be read

    @property
    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append("unreadable")
        if self.rules:
            out.append("violation")
        if self.hanging:
            out.append("hanging")
        if self.failing:
            out.append("failing")
        if self.paused_io_error:
            out.append("io-error")
        return out

    @property
    def verdict(self) -> str:
        return "+".join(self.problems) or "ok"

    def as_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "uuid": self.uuid,
            "source": self.source,
            "device": self.device,
            "werror": self.werror,
            "rerror": self.rerror,
            "retry_interval_ms": self.retry_interval_ms,
            "retry_timeout_ms": self.retry_timeout_ms,
            "verdict": self.verdict,
            "rules": self.rules,
            "hanging": self.hanging,
            "failing": self.failing,
            "paused_io_error": self.paused_io_error,
            "error": self.error,
        }


@dataclass
class Answer:
    rows: list[Row] = field(default_factory=list)
    #: Sources that gave nothing at all: (source, why).
    errors: list[tuple[str, str]] = field(default_factory=list)
    vms_read: int = 0
    #: Sources that answered but hold no VM: said on stderr (else "nothing could be read" would
    #: not say why), yet no failure (an empty host is not a non-compliant one).
    empty: list[tuple[str, str]] = field(default_factory=list)
    #: False when no source was given and the exporter's default sockets/globs were read.
    sources_given: bool = True

    def exit_code(self) -> int:
        if self.vms_read == 0:
            return 2
        return 1 if self.errors or any(r.problems for r in self.rows) else 0


def _disk_rows(vm: str, source: str, disks: Sequence[Disk], io_error: bool, uuid: str = "") -> list[Row]:
    rows = [
        Row(
            vm=vm,
            uuid=uuid,
            source=source,
            device=d.device,
            werror=d.policy.werror,
            rerror=d.policy.rerror,
            retry_interval_ms=d.policy.retry_interval_ms,
            retry_timeout_ms=d.policy.retry_timeout_ms,
            rules=[r.value for r in d.verdict.violations],
            paused_io_error=io_error,
        )
        for d in sorted(disks, key=lambda d: d.device)
    ]
    return rows or [Row(vm=vm, uuid=uuid, source=source, device="-", paused_io_error=io_error)]


def _domain_rows(domain: Domain, source: str, config: Config, io_error: bool) -> list[Row]:
    """A parsed domain's disks, and an unreadable row for each disk its XML gives a value QEMU
    would refuse: a typo in ``error_policy`` must not leave the file looking compliant."""
    disks = list(model_disks(domain, config).values())
    bad = [
        Row(
            vm=domain.name, uuid=domain.uuid, source=source, device=s.alias or s.target or "?", error=s.reason
        )
        for s in domain.skipped
    ]
    if bad and not disks:
        return bad
    return sorted(_disk_rows(domain.name, source, disks, io_error, domain.uuid) + bad, key=lambda r: r.device)


# --- sources ------------------------------------------------------------------------------


async def read_qmp(paths: Sequence[str], config: Config) -> list[Row]:
    slots = asyncio.Semaphore(QMP_CONCURRENCY)

    async def one(path: str) -> list[Row]:
        vm = VMState.qmp(path)
        async with slots:
            reason = await VMWatcher(vm, config, clock=time.time).read_once()
        source = f"qmp:{path}"
        if reason is not None:
            text = REASON_TEXT.get(reason, reason)
            if reason == "timeout":
                text += "; where an exporter watches it, use --exporter.url"
            return [Row(vm=vm.vm, source=source, device="-", error=text)]
        return _disk_rows(vm.vm, source, list(vm.disks.values()), vm.status == "io-error", vm.uuid)

    return [row for rows in await asyncio.gather(*(one(p) for p in paths)) for row in rows]


def read_libvirt(uri: str, config: Config) -> list[Row]:
    """Every running domain of ``uri``, from its live XML, over a read-only connection."""
    import libvirt

    quiet_libvirt_errors()  # the error is reported once, as "--libvirt.uri URI: ..."
    conn = libvirt.openReadOnly(uri)
    try:
        rows: list[Row] = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                domain = parse_domain(dom.XMLDesc(0), inactive=True)
            except ValueError as exc:
                rows.append(Row(vm=str(dom.name()), source=f"libvirt:{uri}", device="-", error=str(exc)))
                continue
            state, reason = dom.state()
            io_error = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
            rows += _domain_rows(domain, f"libvirt:{uri}", config, io_error)
        return rows
    finally:
        conn.close()


def read_xml(path: str, config: Config) -> list[Row]:
    """A domain XML file: live (with aliases), a definition that is not running (perhaps not
    even defined: no ``<uuid>``), or bare ``<disk>`` elements, named after the file."""
    with open(path, "rb") as f:
        domain = parse_definition(f.read(), name=Path(path).stem)
    return _domain_rows(domain, f"xml:{path}", config, False)


def status_url(url: str) -> str:
    return api_url(url, "/api/v1/status")


def read_exporter(url: str, policy: PolicyConfig, ca_file: str | None, timeout: float) -> list[Row]:
    """A running exporter's view (its ``/api/v1/status``), re-verified against our policy.
    Basic auth credentials may be given in the URL (``https://user:pass@host:9738``)."""
    doc = get_json(url, "/api/v1/status", ca_file, timeout)
    if not isinstance(doc, dict) or doc.get("schema") != 1 or not isinstance(doc.get("vms"), list):
        raise ValueError("not an exporter status document (schema 1)")
    rows: list[Row] = []
    source = f"exporter:{status_url(url)}"
    for vm in doc["vms"]:
        name = str(vm.get("vm", "?"))
        uuid = str(vm.get("uuid") or "")
        if not vm.get("up"):
            reason = next((d["reason"] for d in doc.get("down", []) if d.get("vm") == name), "down")
            rows.append(
                Row(vm=name, uuid=uuid, source=source, device="-", error=REASON_TEXT.get(reason, reason))
            )
            continue
        io_error = vm.get("status") == "io-error"
        vm_rows = []
        for d in vm.get("disks", []):
            w, r = str(d.get("werror")), str(d.get("rerror"))
            feature = vm.get("retry_feature")
            if feature is None and "retry" in (w, r):
                feature = True  # as libvirt_xml.Disk.policy: QEMU accepted "retry"
            p = DiskPolicy(w, r, d.get("retry_interval_ms"), d.get("retry_timeout_ms"), feature)
            vm_rows.append(
                Row(
                    vm=name,
                    uuid=uuid,
                    source=source,
                    device=str(d.get("device")),
                    werror=w,
                    rerror=r,
                    retry_interval_ms=p.retry_interval_ms,
                    retry_timeout_ms=p.retry_timeout_ms,
                    rules=[x.value for x in verify(p, policy).violations],
                    hanging=bool(d.get("hanging")),
                    failing=bool(d.get("failing")),
                    paused_io_error=io_error,
                )
            )
        rows += vm_rows or [Row(vm=name, uuid=uuid, source=source, device="-", paused_io_error=io_error)]
    return rows


# --- output -------------------------------------------------------------------------------


def _ms(v: int | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:g}s" if v else "0 (never)"


def _n(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def table(answer: Answer, policy: PolicyConfig) -> str:
    head = ("VM", "DEVICE", "WERROR/RERROR", "RETRY_INTERVAL", "RETRY_TIMEOUT", "VERDICT", "RULE")
    lines = [
        (
            r.vm,
            r.device,
            f"{r.werror}/{r.rerror}" if r.werror or r.rerror else "-",
            _ms(r.retry_interval_ms) if not r.error else "-",
            _ms(r.retry_timeout_ms) if not r.error else "-",
            r.verdict,
            ",".join(r.rules) or (r.error if r.error else "-"),
        )
        for r in answer.rows
    ]
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *lines]]
    rules = sorted({rule for r in answer.rows for rule in r.rules})
    if rules:
        out.append("")
        out += [f"{rule}: {rule_fix(rule, policy)}" for rule in rules]
    vms = {(r.vm, r.source) for r in answer.rows}
    bad = sum(1 for r in answer.rows if r.problems)
    out.append("")
    out.append(
        f"{_n(len(answer.rows), 'row')} on {_n(len(vms), 'VM')}: {len(answer.rows) - bad} ok, "
        f"{bad} with problems" + (f"; {_n(len(answer.errors), 'source')} unreadable" if answer.errors else "")
    )
    return "\n".join(out) + "\n"


# --- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="One-shot check: does every disk run the QEMU retry policy, and does any hang now? "
        "Exit 0 compliant, 1 not (or not provably), 2 bad usage or nothing readable.",
    )
    p.add_argument(
        "--config.file", dest="config_file", metavar="PATH", help="the exporter's YAML config (policy)"
    )
    p.add_argument(
        "--qmp.socket",
        dest="sockets",
        action="append",
        default=[],
        metavar="PATH",
        help="a QMP socket (repeatable)",
    )
    p.add_argument(
        "--qmp.glob",
        dest="globs",
        action="append",
        default=[],
        metavar="PATTERN",
        help="QMP sockets matching a glob (repeatable; without any source: the config's, else "
        "/run/qemu-iohang-exporter/*.qmp)",
    )
    p.add_argument(
        "--libvirt.uri",
        dest="libvirt_uris",
        action="append",
        default=[],
        metavar="URI",
        help="every running domain of a libvirt URI, e.g. qemu:///system (read-only; needs the libvirt extra)",
    )
    p.add_argument(
        "--xml",
        dest="xml_files",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="domain XML files, running or not (e.g. a migration destination's definition, <uuid> "
        "optional), or files of bare <disk> elements (the VM is named after the file)",
    )
    p.add_argument(
        "--exporter.url",
        dest="exporter_urls",
        action="append",
        default=[],
        metavar="URL",
        help="a running exporter (reads its /api/v1/status; basic auth as https://user:pass@host:9738)",
    )
    p.add_argument("--exporter.ca-file", dest="ca_file", metavar="PATH", help="CA to trust for https")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="per connect/command/request (default: the config's qmp timeouts, 5 s)",
    )
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


async def gather(args: argparse.Namespace, config: Config) -> Answer:
    answer = Answer()
    timeout = config.qmp.command_timeout_seconds

    def add(rows: list[Row]) -> None:
        answer.rows.extend(rows)
        # A VM is read unless the VM itself was unreadable (device "-"); a bad disk is its row.
        answer.vms_read += len({r.vm for r in rows if not (r.error and r.device == "-")})

    sockets = list(dict.fromkeys(args.sockets))
    patterns = list(args.globs)
    any_source = sockets or patterns or args.libvirt_uris or args.xml_files or args.exporter_urls
    glob_origin = "--qmp.glob"
    if not any_source:  # like the exporter: its config's sockets and globs, else the default glob
        answer.sources_given = False
        default_sockets, default_globs = config.socket_patterns()
        sockets, patterns = list(default_sockets), list(default_globs)
        glob_origin = "qmp.globs" if config.qmp.globs else "default --qmp.glob"
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if not found:
            why = unmatched_reason(pattern)
            answer.errors.append(
                (f"{glob_origin} {pattern}", "no socket matches" + (f" ({why})" if why else ""))
            )
        sockets += [s for s in found if s not in sockets]
    if sockets:
        add(await read_qmp(sockets, config))
    for uri in args.libvirt_uris:
        try:
            async with asyncio.timeout(timeout * 4):
                rows = await asyncio.to_thread(read_libvirt, uri, config)
        except Exception as exc:  # libvirtError, timeout: one line, the other sources still count
            answer.errors.append((f"--libvirt.uri {uri}", str(exc) or type(exc).__name__))
            continue
        if not rows:
            answer.empty.append((f"--libvirt.uri {uri}", "no running domain"))
        add(rows)
    for path in args.xml_files:
        try:
            add(read_xml(path, config))
        except (OSError, ValueError) as exc:
            answer.errors.append((f"--xml {path}", str(exc)))
    for url in args.exporter_urls:
        source = f"--exporter.url {status_url_safe(url)}"
        try:
            rows = await asyncio.to_thread(read_exporter, url, config.policy, args.ca_file, timeout)
        except (OSError, ValueError) as exc:  # URLError is an OSError
            answer.errors.append((source, _error_text(exc)))
            continue
        if not rows:
            answer.empty.append((source, "the exporter watches no VM (yet)"))
        add(rows)
    return answer


def _error_text(exc: Exception) -> str:
    """``[Errno 111] Connection refused``, not ``<urlopen error [Errno 111] Connection refused>``
    (an HTTPError already says ``HTTP Error 401: Unauthorized``)."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc)


def status_url_safe(url: str) -> str:
    """The URL without credentials, for messages."""
    return safe_url(url, "/api/v1/status")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_file(args.config_file) if args.config_file else Config()
        for uri in args.libvirt_uris:
            validate_libvirt_uri("flag", "--libvirt.uri", uri)
        for url in args.exporter_urls:
            try:
                status_url(url)
            except ValueError as exc:
                raise ConfigError("flag", "--exporter.url", str(exc)) from None
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.timeout is not None:
        if not args.timeout > 0:
            print(f"{PROG}: --timeout must be > 0", file=sys.stderr)
            return 2
        qmp = replace(config.qmp, connect_timeout_seconds=args.timeout, command_timeout_seconds=args.timeout)
        config = replace(config, qmp=qmp)
    if args.libvirt_uris:
        try:
            import libvirt  # noqa: F401
        except ImportError:
            print(f"{PROG}: {LIBVIRT_MISSING}", file=sys.stderr)
            return 2

    answer = asyncio.run(gather(args, config))
    code = answer.exit_code()
    for source, why in answer.errors + answer.empty:
        print(f"{PROG}: {source}: {why}", file=sys.stderr)
    if args.output == "json":
        doc = {
            "exit_code": code,
            "compliant": code == 0,
            "policy": {
                "required": list(config.policy.required),
                "max_timeout_seconds": config.policy.max_timeout_seconds,
                "require_nonzero_timeout": config.policy.require_nonzero_timeout,
            },
            "rows": [r.as_json() for r in answer.rows],
            "errors": [{"source": s, "error": e} for s, e in answer.errors],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif answer.rows:
        sys.stdout.write(table(answer, config.policy))
    if code == 2:
        hint = (
            ""
            if answer.sources_given
            else " (give --qmp.socket, --qmp.glob, --libvirt.uri, --xml or --exporter.url)"
        )
        print(f"{PROG}: nothing could be read{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
