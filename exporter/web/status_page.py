"""The status page at ``/``: the snapshot of `exporter.web.status` as one server-rendered HTML page.

No front-end framework and no build step: the exporter is a single Python process on a
hypervisor, and the page must work in any browser behind the same TLS/basic auth as
``/metrics``.  Problems come first (hanging, failing, paused, violating, down), then the
compliant fleet folded into ``<details>``, then the storage incidents of the last 24 h (with the
hang journal, folded too) and the hangs of the last hour.  Every value that
comes from a VM (names, devices, sockets, policy strings) is HTML-escaped: a VM name is chosen
by whoever started the VM, not by the person reading the page.

It refreshes itself: a few lines of JavaScript fetch the page every few seconds and swap the
``<main>`` element, keeping open ``<details>`` open and the scroll position (a ``<meta
refresh>`` inside ``<noscript>`` does the same, less gently, without JavaScript).
"""

from __future__ import annotations

import functools
import html
import json
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from exporter.metrics import IO_ERROR_EVENTS
from exporter.web.status import REASON_TEXT

#: Seconds between refreshes of an open page.
REFRESH_SECONDS = 5

_CSS = """
:root{color-scheme:light dark;--ok:#2e7d32;--warn:#ef6c00;--bad:#c62828;--mut:#777}
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:.5rem .8rem}
h1{font-size:1.3rem;margin:.3rem 0}h2{font-size:1.1rem;margin:1.2rem 0 .4rem}
.chips span{display:inline-block;margin:.15rem .3rem .15rem 0;padding:.1rem .5rem;border-radius:1rem;
background:#8882}.chips .bad{background:var(--bad);color:#fff}.chips .warn{background:var(--warn);color:#fff}
.chips .ok{background:var(--ok);color:#fff}
.tw{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #8884;vertical-align:top}
th{font-weight:600;white-space:nowrap}td.n{white-space:nowrap}
.bar{min-width:7rem;height:.8rem;border-radius:.4rem;background:#8883;overflow:hidden}
.bar i{display:block;height:100%;background:var(--ok)}.bar i.w{background:var(--warn)}.bar i.c{background:var(--bad)}
.mut{color:var(--mut)}.good{color:var(--ok);font-weight:600}.bad{color:var(--bad)}
code{font-size:.9em}summary{cursor:pointer;font-weight:600}footer{margin:1.5rem 0;font-size:.85rem}
@media (max-width:40rem){thead{display:none}tr{display:flex;flex-wrap:wrap;border-bottom:1px solid #8884;
padding:.3rem 0}td{border:0;padding:.1rem .4rem}td:first-child{font-weight:600}td:last-child{flex-basis:100%}}
"""

_SCRIPT = """
setInterval(async () => {
  try {
    const r = await fetch(location.href, {cache: "no-store"});
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    const open = [...document.querySelectorAll("details[open]")].map(d => d.id);
    document.querySelector("main").replaceWith(doc.querySelector("main"));
    for (const id of open) { const d = document.getElementById(id); if (d) d.open = true; }
  } catch (e) {}
}, REFRESH_MS);
""".replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))

_esc = html.escape
_compact = functools.partial(json.dumps, separators=(",", ":"))


def seconds_text(s: float | None) -> str:
    """``1 h 02 m``, ``3 m 05 s``, ``7.2 s``: readable at a glance, exact enough for a hang."""
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m} m {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} m"


def _ms_text(ms: int | None, zero: str = "0") -> str:
    return "—" if ms is None else seconds_text(ms / 1000) if ms else zero


def _time(ts: float | None, shown: str = "%H:%M:%S") -> str:
    """A Unix time as UTC wall-clock time, with the full timestamp in ``datetime``."""
    if ts is None:
        return "—"
    t = time.gmtime(ts)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", t)
    return f'<time datetime="{iso}">{time.strftime(shown, t)}</time>'


def _table(head: Sequence[str], rows: list[str]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    return f'<div class="tw"><table><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _key(vm: str, device: str | None = None) -> str:
    """data- attributes naming the row's VM (and device): stable hooks for tests and scripts."""
    attrs = f' data-vm="{_esc(vm)}"'
    return attrs + (f' data-device="{_esc(device)}"' if device is not None else "")


def _policy_text(d: Mapping[str, Any]) -> str:
    return f"{_esc(str(d['werror']))}/{_esc(str(d['rerror']))}"


def _backends(items: list[dict[str, Any]]) -> str:
    rows = [
        f'<tr data-backend="{_esc(b["backend"])}"><td><code>{_esc(b["backend"])}</code></td>'
        f'<td class="n">{b["hanging"]}</td><td class="n">{b["failing"]}</td>'
        f'<td class="n">{b["disks"]}</td><td class="n">{b["vms_affected"]}</td></tr>'
        for b in items
    ]
    return _table(["storage backend", "hanging", "failing", "of disks", "VMs affected"], rows)


def _hanging(items: list[dict[str, Any]]) -> str:
    rows = []
    for h in items:
        timeout = h["retry_timeout_seconds"]
        if timeout > 0:
            frac = h["fraction"] or 0.0
            cls = "c" if frac >= 0.8 else "w" if frac >= 0.5 else ""
            left = max(0.0, timeout - h["elapsed_seconds"])
            limit = (
                f'<div class="bar" title="{frac:.0%} of retry_timeout"><i class="{cls}" '
                f'style="width:{frac * 100:.1f}%"></i></div>'
                f'<span class="timeout">{seconds_text(timeout)} timeout, {seconds_text(left)} left</span>'
            )
        else:
            limit = '<span class="timeout bad">never times out</span>'
        paused = ' <span class="mut">(VM paused)</span>' if h["paused"] else ""
        rows.append(
            f"<tr{_key(h['vm'], h['device'])}><td>{_esc(h['vm'])}</td><td>{_esc(h['device'])}</td>"
            f'<td><code>{_esc(h["backend"])}</code></td><td class="n">{_time(h["since"])}</td>'
            f'<td class="n elapsed">{seconds_text(h["elapsed_seconds"])}{paused}</td><td>{limit}</td></tr>'
        )
    return _table(["VM", "device", "backend", "since", "elapsed", "retry_timeout"], rows)


def _failing(items: list[dict[str, Any]]) -> str:
    rows = [
        f"<tr{_key(f['vm'], f['device'])}><td>{_esc(f['vm'])}</td><td>{_esc(f['device'])}</td>"
        f'<td class="n">{_time(f["since"])}</td><td class="n">{seconds_text(f["retry_timeout_seconds"])}</td></tr>'
        for f in items
    ]
    return _table(["VM", "device", "timed out at", "retry_timeout"], rows)


def _paused(items: list[dict[str, Any]]) -> str:
    rows = [f"<tr{_key(p['vm'])}><td>{_esc(p['vm'])}</td><td>{_esc(p['status'])}</td></tr>" for p in items]
    return _table(["VM", "run state"], rows)


def _violations(items: list[dict[str, Any]]) -> str:
    rows = []
    for v in items:
        rules = "".join(
            f'<div><code class="rule">{_esc(r["rule"])}</code> <span class="fix">{_esc(r["fix"])}</span></div>'
            for r in v["rules"]
        )
        rows.append(
            f"<tr{_key(v['vm'], v['device'])}><td>{_esc(v['vm'])}</td><td>{_esc(v['device'])}</td>"
            f'<td class="n">{_policy_text(v)}</td>'
            f'<td class="n">{_ms_text(v["retry_interval_ms"])} / {_ms_text(v["retry_timeout_ms"], "never")}</td>'
            f"<td>{rules}</td></tr>"
        )
    return _table(["VM", "device", "werror/rerror", "interval / timeout", "rule and what to change"], rows)


def _down(items: list[dict[str, Any]], connections: list[dict[str, Any]]) -> str:
    rows = []
    for d in items:
        errors = ", ".join(f"{_esc(k)} {n}" for k, n in sorted(d["connect_errors"].items()))
        reason = REASON_TEXT.get(d["reason"], d["reason"])
        rows.append(
            f"<tr{_key(d['vm'])}><td>{_esc(d['vm'])}</td><td><code>{_esc(d['socket'])}</code></td>"
            f'<td class="reason">{_esc(reason)}</td><td class="mut">{errors or "—"}</td></tr>'
        )
    for c in connections:
        if not c["up"]:
            errors = ", ".join(f"{_esc(k)} {n}" for k, n in sorted(c["connect_errors"].items()))
            rows.append(
                f'<tr data-uri="{_esc(c["uri"])}"><td>libvirt</td><td><code>{_esc(c["uri"])}</code></td>'
                f'<td class="reason">libvirt connection down</td><td class="mut">{errors or "—"}</td></tr>'
            )
    return _table(["VM", "socket", "reason", "connect errors so far"], rows)


def _compliant(c: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    pol = [
        f"<tr><td>{_policy_text(p)}</td><td>{_ms_text(p['retry_interval_ms'])}</td>"
        f"<td>{_ms_text(p['retry_timeout_ms'], 'never')}</td>"
        f'<td class="n">{p["disks"]}</td></tr>'
        for p in c["by_policy"]
    ]
    vms = [
        f'<li{_key(v["vm"])}>{_esc(v["vm"])} <span class="mut">'
        f"{_esc(', '.join(v['devices'])) or 'no disks'}</span></li>"
        for v in c["vms"]
    ]
    return (
        f'<details id="compliant"><summary>{_plural(summary["vms_compliant"], "VM")} without problems; '
        f"{summary['disks_compliant']} of {summary['disks']} disks comply</summary>"
        + _table(["werror/rerror", "retry_interval", "retry_timeout", "disks"], pol)
        + f'<ul class="vms">{"".join(vms)}</ul></details>'
    )


def _recent(items: list[dict[str, Any]]) -> str:
    rows = [
        f"<tr{_key(r['vm'], r['device'])}><td>{_esc(r['vm'])}</td><td>{_esc(r['device'])}</td>"
        f'<td class="n">{_time(r["start"])}</td><td class="n">{seconds_text(r["duration_seconds"])}</td>'
        f'<td class="outcome {"bad" if r["outcome"] != "recovered" else ""}">{_esc(r["outcome"])}</td></tr>'
        for r in items
    ]
    return _table(["VM", "device", "started", "length", "outcome"], rows)


#: The incidents span a day: their times show the date too.
_DAY_TIME = "%b %d %H:%M:%S"


def _incident_id(i: Mapping[str, Any]) -> str:
    """A stable id for an incident's ``<details>`` (kept open across refreshes)."""
    return f"incident-{int(i['start'] * 1000)}-{zlib.crc32(i['backend'].encode()):08x}"


def _incidents(items: list[dict[str, Any]]) -> str:
    """The storage incidents of the last 24 h, folded: one row per incident, its guests that
    saw IO errors folded again (an outage of a whole host lists thousands)."""
    if not items:
        return '<p class="mut">None.</p>'
    rows = []
    for i in items:
        guests = i["guests_saw_errors"]
        if guests:
            names = "".join(
                f"<li{_key(g['vm'], g['device'])}>{_esc(g['vm'])} {_esc(g['device'])} "
                f'<span class="mut">at {_time(g["at"])}</span></li>'
                for g in guests
            )
            saw = (
                f'<details id="{_incident_id(i)}"><summary class="bad">{_plural(len(guests), "guest")}'
                f'</summary><ul class="guests">{names}</ul></details>'
            )
        else:
            saw = '<span class="good">none</span>'
        rows.append(
            f'<tr data-backend="{_esc(i["backend"])}"><td><code>{_esc(i["backend"])}</code></td>'
            f'<td class="n">{_time(i["start"], _DAY_TIME)}</td><td class="n">{seconds_text(i["duration_seconds"])}</td>'
            f'<td class="n">{i["disks"]}</td><td class="n">{i["vms"]}</td><td class="n">{i["recovered"]}</td>'
            f'<td class="n">{i["timed_out"]}</td><td>{saw}</td></tr>'
        )
    hung = sum(i["disks"] for i in items)
    saw_errors = sum(len(i["guests_saw_errors"]) for i in items)
    summary = (
        f"{_plural(len(items), 'incident')}: {_plural(hung, 'disk')} hung, "
        f"{_plural(saw_errors, 'guest')} saw IO errors"
    )
    return (
        f'<details id="incidents-24h"><summary>{summary}</summary>'
        + _table(
            [
                "storage backend",
                "from",
                "lasted",
                "disks",
                "VMs",
                "recovered",
                "timed out",
                "guests that saw IO errors",
            ],
            rows,
        )
        + '<p class="mut">From the hang journal; the same as <code>qemu-iohang-report</code> and '
        '<a href="/api/v1/incidents">/api/v1/incidents</a>.</p></details>'
    )


#: What each blind interval's source means, for people (`exporter.runtime.blind`).
_BLIND_TEXT = {
    "event_loop": "the exporter did not run (event loop stopped or blocked)",
    "qmp": "the VM's QMP session was down",
    "libvirt": "the libvirt connection was down",
}


def _blind(items: list[dict[str, Any]]) -> str:
    rows = [
        f'<tr data-source="{_esc(b["source"])}"><td>{_esc(_BLIND_TEXT.get(b["source"], b["source"]))}</td>'
        f'<td><code>{_esc(b["name"]) or "—"}</code></td><td class="n">{_time(b["start"])}</td>'
        f'<td class="n">{seconds_text(b["seconds"])}</td></tr>'
        for b in items
    ]
    return (
        '<p class="mut">Events of these intervals were read late or missed: '
        f"<code>{IO_ERROR_EVENTS.sample_name}</code> is a lower bound across them, and a hang "
        "open before one and seen again after it is counted once.</p>"
        + _table(["what", "VM / connection", "from", "length"], rows)
    )


def _blind_parts(blind: Mapping[str, Any] | None) -> tuple[str, str]:
    """The summary chip and the section of the blind intervals ("" each without any)."""
    if not blind or not blind["intervals"]:
        return "", ""
    chip = (
        f'<span class="warn">{_plural(blind["intervals"], "blind interval")}, '
        f"{seconds_text(blind['seconds'])}</span>"
    )
    title = "Blind intervals: events may have been missed"
    return chip, _section("blind", title, blind["intervals"], _blind(blind["recent"]))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _section(id_: str, title: str, count: int, body: str) -> str:
    return f'<section id="{id_}"><h2>{title} <span class="count">({count})</span></h2>{body}</section>'


def render(status: Mapping[str, Any], telemetry_path: str = "/metrics") -> str:
    """The whole page for one snapshot of `exporter.web.status.build_status`."""
    s = status["summary"]
    chips = [
        f'<span class="{"bad" if s["disks_hanging"] else "ok"}">{s["disks_hanging"]} hanging</span>',
        f'<span class="{"bad" if s["disks_failing"] else "ok"}">{s["disks_failing"]} failing</span>',
        f'<span class="{"bad" if s["vms_paused_io_error"] else "ok"}">{s["vms_paused_io_error"]} paused on io-error</span>',
        f'<span class="{"warn" if s["disks_violating"] else "ok"}">{s["disks_violating"]} violating policy</span>',
        f'<span class="{"warn" if s["vms_down"] else "ok"}">{s["vms_down"]} down</span>',
        f"<span>{s['vms_up']}/{s['vms']} VMs up, {s['disks']} disks</span>",
    ]
    blind_chip, blind_section = _blind_parts(status.get("blind"))
    if blind_chip:
        chips.insert(5, blind_chip)
    # Problems first, worst kind first: a failing storage backend explains the rest.
    problems: tuple[tuple[str, str, Callable[[list[dict[str, Any]]], str]], ...] = (
        ("backends", "Storage backends with hanging or failing disks", _backends),
        ("hanging", "Hanging now", _hanging),
        ("failing", "Failing: retry_timeout passed, errors reach the guest", _failing),
        ("paused", "Paused on io-error", _paused),
        ("violations", "Disks violating the retry policy", _violations),
    )
    parts = [
        _section(key, title, len(status[key]), body(status[key]))
        for key, title, body in problems
        if status[key]
    ]
    down_conns = [c for c in status["connections"] if not c["up"]]
    if status["down"] or down_conns:
        parts.append(
            _section(
                "down",
                "Down",
                len(status["down"]) + len(down_conns),
                _down(status["down"], status["connections"]),
            )
        )
    if not parts:
        parts.append('<p id="all-good" class="good">No problems: every disk complies and nothing hangs.</p>')
    if blind_section:
        parts.append(blind_section)
    parts.append(_section("fleet", "Compliant fleet", s["vms_compliant"], _compliant(status["compliant"], s)))
    incidents = status.get("incidents")
    if incidents is not None:
        parts.append(
            _section("incidents", "Storage incidents in the last 24 h", len(incidents), _incidents(incidents))
        )
    recent = status["recent_hangs"]
    parts.append(
        _section(
            "recent",
            "Hangs in the last hour",
            len(recent),
            _recent(recent) if recent else '<p class="mut">None.</p>',
        )
    )
    pol = status["policy"]
    policy_text = (
        f"required retry: {_esc(', '.join(pol['required']))}; max retry_timeout: "
        f"{_esc(str(pol['max_timeout_seconds'])) + ' s' if pol['max_timeout_seconds'] is not None else 'none'}; "
        f"retry_timeout 0 allowed: {'no' if pol['require_nonzero_timeout'] else 'yes'}"
    )
    path = _esc(telemetry_path)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>'
        f"<title>QEMU IO hangs: {s['disks_hanging']} hanging, {s['disks_violating']} violating</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>QEMU IO hang status</h1><main>"
        f'<div class="chips" id="summary">{"".join(chips)}</div>'
        f'<p class="mut">As of {_time(status["generated_at"])} UTC; refreshes every {REFRESH_SECONDS} s. '
        f"Policy: {policy_text}.</p>" + "".join(parts) + "</main>"
        f'<footer class="mut">qemu-iohang-exporter {_esc(status["exporter_version"])} · '
        f'<a href="{path}">metrics</a> · <a href="/api/v1/status">status JSON</a> · '
        '<a href="/healthz">health</a></footer>'
        f"<script>{_SCRIPT}</script></body></html>"
    )


def status_routes(
    app: web.Application, snapshot: Callable[[bool], Mapping[str, Any]], telemetry_path: str
) -> None:
    """Serve ``/`` (this page) and ``/api/v1/status`` (the same snapshot as JSON).

    ``snapshot(details)`` is called once per request (the page needs no per-disk details); both run inline on the event loop, like a scrape:
    they read memory only."""

    async def page(request: web.Request) -> web.StreamResponse:
        body = render(snapshot(False), telemetry_path)
        return web.Response(
            text=body, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"}
        )

    async def api(request: web.Request) -> web.StreamResponse:
        return web.json_response(snapshot(True), headers={"Cache-Control": "no-store"}, dumps=_compact)

    app.router.add_get("/", page)
    app.router.add_get("/api/v1/status", api)
