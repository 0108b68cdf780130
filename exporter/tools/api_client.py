"""Reading a running exporter's JSON API from the command line (``qemu-iohang-check
--exporter.url``, ``qemu-iohang-report --exporter.url``): one URL per exporter, basic auth
credentials in the URL (``https://user:pass@host:9738``, never printed), a private CA file.

Blocking (urllib): the commands run it in a thread per exporter.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

#: The API paths an operator may paste as the URL itself: the base is what comes before them.
API_PATHS = ("/api/v1/status", "/api/v1/hangs", "/api/v1/incidents")


def api_url(url: str, path: str, query: Mapping[str, str] | None = None) -> str:
    """``path`` (one of `API_PATHS`) of the exporter at ``url``, without credentials.
    ValueError for what is not an http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    base = parts.path.rstrip("/")
    for known in API_PATHS:
        base = base.removesuffix(known)
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, base + path, urllib.parse.urlencode(query or {}), "")
    )


def safe_url(url: str, path: str) -> str:
    """`api_url` for messages: never the credentials, whatever ``url`` is."""
    try:
        return api_url(url, path)
    except ValueError:
        return url


def get_json(
    url: str,
    path: str,
    ca_file: str | None,
    timeout: float,
    query: Mapping[str, str] | None = None,
) -> Any:
    """GET ``path`` of the exporter at ``url`` as JSON.  urllib's errors (OSError,
    ``HTTPError`` with the exporter's ``{"error": ...}`` message read out) and ValueError for a
    body that is not JSON."""
    parts = urllib.parse.urlsplit(url)
    req = urllib.request.Request(api_url(url, path, query), headers={"Accept": "application/json"})
    if parts.username is not None:
        creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        req.add_header("Authorization", "Basic " + base64.b64encode(creds.encode()).decode())
    context = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"HTTP {exc.code}: {_error_text(exc)}") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The exporter's one-line reason (``{"error": ...}``), else the HTTP reason."""
    try:
        doc = json.loads(exc.read(4096) or b"null")
    except (OSError, ValueError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return str(exc.reason)
