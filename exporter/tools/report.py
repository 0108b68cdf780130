"""``qemu-iohang-report``: after a storage outage, which storage failed, from when to when, how
many disks and VMs hung, and which guests saw IO errors, for one host or a whole fleet.

    qemu-iohang-report --exporter.url http://hv1:9738 --exporter.url http://hv2:9738 [--since 24h]
    qemu-iohang-report --journal.file /var/lib/qemu-iohang-exporter/hangs.jsonl --output csv

Each exporter's hang records (``/api/v1/hangs``, over the same window for all) or a journal file
read directly (when the exporter is down, or on a copy) are merged and grouped into incidents by
the same code as ``/api/v1/incidents`` (`exporter.hang.incidents`): a storage backend shared by
several hosts (an NFS server, a Ceph pool) is one incident across the fleet.  Sources that
cannot be read are listed as such, and the report is still made from the others.

Output: a table for people, JSON (the incidents as the API has them, each guest with its
``host``), or CSV with one row per disk and incident for a ticket.  Exit status: 0 every source
read; 1 some could not be (the report lacks them); 2 bad usage, or nothing could be read.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import urllib.error
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from exporter import __version__
from exporter.cli import OneLineParser
from exporter.hang.incidents import (
    SCHEMA,
    HangRecord,
    Incident,
    Window,
    disk_key,
    group_incidents,
    parse_window,
    select,
)
from exporter.hang.journal import JournalFiles
from exporter.tools.api_client import api_url, get_json

PROG = "qemu-iohang-report"

#: Exporters read at once.
CONCURRENCY = 16


@dataclass
class Source:
    """One exporter or journal file, and what was read from it."""

    name: str  # host:port of an exporter, or the journal file's path
    records: list[HangRecord] = field(default_factory=list)
    error: str = ""


def read_exporter(
    url: str, window: Window, backend: str | None, ca_file: str | None, timeout: float
) -> Source:
    name = _host(url)
    query = {"since": f"{window.since:.6f}", "until": f"{window.until:.6f}"}
    if backend is not None:
        query["backend"] = backend
    try:
        doc = get_json(url, "/api/v1/hangs", ca_file, timeout, query)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("hangs"), list):
            raise ValueError("not an exporter's /api/v1/hangs (schema 1)")
        records = [HangRecord.from_json(h, host=name) for h in doc["hangs"]]
    except (OSError, ValueError, urllib.error.URLError) as exc:
        return Source(name, error=str(getattr(exc, "reason", None) or exc))
    return Source(name, records)


def read_journal(path: str, window: Window, backend: str | None) -> Source:
    try:
        with open(path, "rb"):  # a missing file is an error here, not an empty journal
            pass
        got = JournalFiles(path).read(window.holds)
    except OSError as exc:
        return Source(path, error=exc.strerror or str(exc))
    return Source(path, select(got.records, window, backend))


def _host(url: str) -> str:
    """``host:port`` of an exporter URL: how the report names it (never the credentials)."""
    return api_url(url, "").split("://", 1)[1].rstrip("/")


# --- output -------------------------------------------------------------------------------


def _utc(t: float, ms: bool = False) -> str:
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    return text + (f".{int(t * 1000) % 1000:03d}Z" if ms else "Z")


def _lasted(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def _columns(head: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]]


def table(incidents: list[Incident], sources: list[Source], window: Window) -> str:
    read = [s for s in sources if not s.error]
    out = [
        f"Storage incidents {_utc(window.since)} .. {_utc(window.until)}, "
        f"from {len(read)} of {len(sources)} source{'s' if len(sources) != 1 else ''}",
        "",
    ]
    if not incidents:
        out.append("No storage incidents: no disk hung in this window.")
    else:
        docs = [i.to_json() for i in incidents]
        out += _columns(
            ("BACKEND", "START", "END", "LASTED", "DISKS", "VMS", "RECOVERED", "TIMED_OUT", "VM_GONE"),
            [
                (
                    d["backend"],
                    _utc(d["start"]),
                    _utc(d["end"]),
                    _lasted(d["duration_seconds"]),
                    *(str(d[k]) for k in ("disks", "vms", "recovered", "timed_out", "vm_gone")),
                )
                for d in docs
            ],
        )
        guests = [(i, g) for i in incidents for g in i.guests_saw_errors()]
        out.append("")
        if guests:
            out.append(
                f"Guests that saw IO errors ({len(guests)}): check their filesystems or reboot them, only these."
            )
            out += _columns(
                ("HOST", "VM", "DEVICE", "AT", "BACKEND"),
                [(g.host or "-", g.vm, g.device, _utc(g.at, ms=True), i.backend) for i, g in guests],
            )
        else:
            out.append("No guest saw IO errors: every hang ended before its retry_timeout.")
    unread = [s for s in sources if s.error]
    if unread:
        out += ["", "Not read (the report lacks these):"]
        out += _columns(("SOURCE", "ERROR"), [(s.name, s.error) for s in unread])
    return "\n".join(out) + "\n"


CSV_HEAD = (
    "incident_start",
    "incident_end",
    "backend",
    "host",
    "vm",
    "uuid",
    "device",
    "outcome",
    "hangs",
    "first_hang_start",
    "last_hang_end",
    "guest_saw_errors_at",
)


def csv_text(incidents: list[Incident]) -> str:
    """One row per disk and incident: the disk's worst outcome, its hangs, and when its guest
    first saw an IO error (empty when it never did)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEAD)
    for i in incidents:
        outcomes = i.disk_outcomes()
        saw = {(g.host or "", g.vm, g.device): g.at for g in i.guests_saw_errors()}
        for key in sorted(outcomes):
            hangs = [r for r in i.hangs if disk_key(r) == key]
            at = saw.get(key)
            w.writerow(
                (
                    _utc(i.start, ms=True),
                    _utc(i.end, ms=True),
                    i.backend,
                    key[0],
                    key[1],
                    hangs[0].uuid,
                    key[2],
                    outcomes[key],
                    len(hangs),
                    _utc(min(r.start for r in hangs), ms=True),
                    _utc(max(r.end for r in hangs), ms=True),
                    "" if at is None else _utc(at, ms=True),
                )
            )
    return buf.getvalue()


def json_doc(incidents: list[Incident], sources: list[Source], window: Window) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "since": window.since,
        "until": window.until,
        "sources": [
            {"source": s.name, "read": not s.error, "hangs": len(s.records), "error": s.error}
            for s in sources
        ],
        "incidents": [i.to_json() for i in incidents],
    }


# --- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Storage incidents from the hang journal of one or more exporters: which storage "
        "failed, when, how many disks and VMs hung, and which guests saw IO errors.",
    )
    p.add_argument(
        "--exporter.url",
        dest="exporter_urls",
        action="append",
        default=[],
        metavar="URL",
        help="a running exporter (repeatable: a fleet's report; basic auth as https://user:pass@host:9738)",
    )
    p.add_argument(
        "--journal.file",
        dest="journal_files",
        action="append",
        default=[],
        metavar="PATH",
        help="a hang journal file, read directly (and PATH.1); repeatable",
    )
    p.add_argument("--exporter.ca-file", dest="ca_file", metavar="PATH", help="CA to trust for https")
    p.add_argument(
        "--since",
        metavar="TIME",
        help="Unix time, RFC 3339 time or duration before now (90s, 2h, 7d); default 24h",
    )
    p.add_argument("--until", metavar="TIME", help="as --since; default now")
    p.add_argument("--backend", metavar="BACKEND", help="only this storage backend")
    p.add_argument("--output", choices=("table", "json", "csv"), default="table")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per exporter (default 10)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.exporter_urls and not args.journal_files:
        print(f"{PROG}: give --exporter.url (repeatable) or --journal.file (see --help)", file=sys.stderr)
        return 2
    try:
        window = parse_window(args.since, args.until, time.time())
        for url in args.exporter_urls:
            api_url(url, "")
        if not args.timeout > 0:
            raise ValueError("--timeout must be > 0")
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        sources = list(
            pool.map(
                lambda u: read_exporter(u, window, args.backend, args.ca_file, args.timeout),
                args.exporter_urls,
            )
        )
    sources += [read_journal(path, window, args.backend) for path in args.journal_files]
    for s in sources:
        if s.error:
            print(f"{PROG}: {s.name}: {s.error}", file=sys.stderr)
    incidents = group_incidents(r for s in sources for r in s.records)
    if args.output == "json":
        sys.stdout.write(json.dumps(json_doc(incidents, sources, window), indent=2) + "\n")
    elif args.output == "csv":
        sys.stdout.write(csv_text(incidents))
    else:
        sys.stdout.write(table(incidents, sources, window))
    unread = sum(1 for s in sources if s.error)
    if unread == len(sources):
        return 2
    return 1 if unread else 0


if __name__ == "__main__":
    sys.exit(main())
