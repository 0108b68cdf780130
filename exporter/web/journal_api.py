"""``/api/v1/hangs`` and ``/api/v1/incidents``: the hang journal over HTTP.

    GET /api/v1/hangs?since=&until=&backend=&outcome=   {"schema": 1, "hangs": [...]}
    GET /api/v1/incidents?since=&until=                  {"schema": 1, "incidents": [...]}

``since``/``until`` as `exporter.hang.incidents.parse_time` reads them (a Unix time, an RFC 3339
time or a duration before now such as ``90s``, ``2h``; default the last 24 h).  A parameter that
is malformed, repeated or unknown (a typo must not silently widen a report) is answered 400
with one line saying which and why.  Both answer 404 with the setting to change when the
journal is off.  They sit behind the web config's TLS and basic auth like every endpoint.

Queries within the last day read memory; older ones read the files in a thread
(`HangJournal.records`), so the event loop is never held by a file.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from exporter.hang.incidents import OUTCOMES, SCHEMA, Window, incidents_json, parse_window, select
from exporter.hang.journal import HangJournal

_compact = functools.partial(json.dumps, separators=(",", ":"))

JOURNAL_OFF = "the hang journal is off: set hang.journal_file (or --hang.journal-file)"


class BadQuery(ValueError):
    """A query parameter the endpoint cannot answer (400)."""


def _params(query: Mapping[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    """Each allowed parameter given once; BadQuery for any other or a repeat."""
    out: dict[str, str] = {}
    for name, value in query.items():
        if name not in allowed:
            raise BadQuery(f"unknown parameter {name!r} (expected {', '.join(allowed)})")
        if name in out:
            raise BadQuery(f"parameter {name!r} given twice")
        out[name] = value
    return out


def _window(params: Mapping[str, str], now: float) -> Window:
    try:
        return parse_window(params.get("since"), params.get("until"), now)
    except ValueError as exc:
        raise BadQuery(str(exc)) from None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, dumps=_compact)


def _ok(doc: dict[str, Any]) -> web.Response:
    return web.json_response(doc, headers={"Cache-Control": "no-store"}, dumps=_compact)


def journal_routes(app: web.Application, journal: HangJournal | None, clock: Callable[[], float]) -> None:
    """Add the two endpoints to ``app``."""

    async def hangs(request: web.Request) -> web.StreamResponse:
        if journal is None:
            return _error(404, JOURNAL_OFF)
        try:
            params = _params(request.query, ("since", "until", "backend", "outcome"))
            window = _window(params, clock())
            outcome = params.get("outcome")
            if outcome is not None and outcome not in OUTCOMES:
                raise BadQuery(f"outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
            if params.get("backend") == "":
                raise BadQuery("backend: empty")
        except BadQuery as exc:
            return _error(400, str(exc))
        records = select(await journal.records(window), window, params.get("backend"), outcome)
        return _ok(
            {
                "schema": SCHEMA,
                "since": window.since,
                "until": window.until,
                "hangs": [r.to_json() for r in records],
            }
        )

    async def incidents(request: web.Request) -> web.StreamResponse:
        if journal is None:
            return _error(404, JOURNAL_OFF)
        try:
            window = _window(_params(request.query, ("since", "until")), clock())
        except BadQuery as exc:
            return _error(400, str(exc))
        records = select(await journal.records(window), window)
        return _ok(
            {
                "schema": SCHEMA,
                "since": window.since,
                "until": window.until,
                "incidents": incidents_json(records),
            }
        )

    app.router.add_get("/api/v1/hangs", hangs)
    app.router.add_get("/api/v1/incidents", incidents)
