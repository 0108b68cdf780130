"""``--web.config.file``: TLS, basic authentication and extra response headers.

The file uses the Prometheus exporter-toolkit web configuration format
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md), so one
file serves every exporter on a host.  Differences from the toolkit, all reported as a
`ConfigError` at startup rather than silently ignored:

* the file is read once at startup (the toolkit re-reads it on every request): restart the
  exporter to pick up a new certificate or a new user;
* ``client_auth_type`` ``RequestClientCert`` / ``RequireAnyClientCert`` (accept a client
  certificate without verifying it) cannot be expressed with Python's ``ssl`` module and are
  refused — use ``VerifyClientCertIfGiven`` or ``RequireAndVerifyClientCert``;
* ``cipher_suites``, ``curve_preferences``, ``client_allowed_sans`` and ``rate_limit`` are
  refused as unsupported;
* ``http2`` is accepted and ignored (aiohttp serves HTTP/1.1);
* a ``tls_server_config`` section that names no certificate is an error, not plain HTTP.

Relative file names are resolved against the directory of the web config file, like the toolkit.
Passwords and bcrypt hashes never appear in errors, reprs or logs.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import hashlib
import hmac
import re
import secrets
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import bcrypt
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from exporter.config import ConfigError, Reader, read_yaml

REALM = "qemu-iohang-exporter"

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = MappingProxyType(
    {
        "TLS10": ssl.TLSVersion.TLSv1,
        "TLS11": ssl.TLSVersion.TLSv1_1,
        "TLS12": ssl.TLSVersion.TLSv1_2,
        "TLS13": ssl.TLSVersion.TLSv1_3,
    }
)

# The exporter-toolkit's client_auth_type values that Python's ssl module can honour.
CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = MappingProxyType(
    {
        "NoClientCert": ssl.CERT_NONE,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }
)
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

# Same allowlist as the exporter-toolkit: header name -> allowed values (None = free text).
EXTRA_HEADERS: Mapping[str, tuple[str, ...] | None] = MappingProxyType(
    {
        "Strict-Transport-Security": None,
        "X-Content-Type-Options": ("nosniff",),
        "X-Frame-Options": ("deny", "sameorigin"),
        "X-XSS-Protection": None,
        "Content-Security-Policy": None,
    }
)

_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
_TLS_KEYS = {
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
}
_HTTP_KEYS = {"http2", "headers"}
_UNSUPPORTED = {
    "rate_limit": "rate limiting is not supported by qemu-iohang-exporter",
    "tls_server_config.cipher_suites": "not supported by qemu-iohang-exporter (Python uses OpenSSL's defaults)",
    "tls_server_config.curve_preferences": "not supported by qemu-iohang-exporter (Python uses OpenSSL's defaults)",
    "tls_server_config.client_allowed_sans": "not supported by qemu-iohang-exporter",
}

# $2a$ / $2b$ / $2y$, two-digit cost, 22 characters of salt and 31 of hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_HTPASSWD_HINT = "generate one with: htpasswd -nBC 10 '' | tr -d ':\\n'"
_CACHE_SIZE = 100


@dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config`` after validation; file names are absolute or relative to the CWD."""

    cert_file: str | None = None
    key_file: str | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca_file: str | None = None
    client_ca: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True)
class WebConfig:
    """A validated ``--web.config.file``.  The default value means plain HTTP, no auth."""

    origin: str = "(none)"
    tls: TLSServerConfig | None = None
    headers: tuple[tuple[str, str], ...] = ()
    http2: bool = True
    # user -> bcrypt hash; kept out of repr so a logged config never shows a hash.
    basic_auth_users: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    _ssl: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def tls_enabled(self) -> bool:
        return self.tls is not None

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_users)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server context for ``web.TCPSite(ssl_context=...)``; None when TLS is off."""
        if self.tls is None:
            return None
        if self._ssl is None:  # built by hand rather than by load_web_config
            return build_ssl_context(self.origin, self.tls)
        return self._ssl


# --- loading ------------------------------------------------------------------------------


def load_web_config(path: str) -> WebConfig:
    """Read, validate and prepare a web config file; every problem is a `ConfigError`."""
    doc = read_yaml(path)
    return parse_web_config(doc, origin=path, base_dir=Path(path).parent)


def parse_web_config(doc: Any, origin: str, base_dir: Path | None = None) -> WebConfig:
    """Validate an already parsed document (relative file names are joined to ``base_dir``)."""
    r = Reader(origin)
    top = r.mapping(doc, "", _TOP_KEYS)
    _refuse_unsupported(r, top, "")

    tls = _parse_tls(r, top.get("tls_server_config"), base_dir or Path("."))
    http = r.mapping(top.get("http_server_config"), "http_server_config", _HTTP_KEYS)
    http2 = True
    if "http2" in http:
        http2 = r.boolean(http["http2"], "http_server_config.http2")
    headers = _parse_headers(r, http.get("headers"))
    users = _parse_users(r, top.get("basic_auth_users"))
    ctx = build_ssl_context(origin, tls) if tls is not None else None
    return WebConfig(
        origin=origin,
        tls=tls,
        headers=headers,
        http2=http2,
        basic_auth_users=MappingProxyType(users),
        _ssl=ctx,
    )


def _refuse_unsupported(r: Reader, section: Mapping[str, Any], prefix: str) -> None:
    for k in section:
        key = f"{prefix}.{k}" if prefix else k
        if key in _UNSUPPORTED:
            raise r.fail(key, _UNSUPPORTED[key])


def _parse_tls(r: Reader, value: Any, base_dir: Path) -> TLSServerConfig | None:
    t = r.mapping(value, "tls_server_config", _TLS_KEYS)
    if not t:
        return None
    _refuse_unsupported(r, t, "tls_server_config")
    pem = _parse_tls_pem(r, t, base_dir)
    auth = _parse_client_auth(r, t, has_ca=pem.client_ca_file is not None or pem.client_ca is not None)
    min_version, max_version = _parse_tls_versions(r, t)
    prefer = True
    if "prefer_server_cipher_suites" in t:
        prefer = r.boolean(t["prefer_server_cipher_suites"], "tls_server_config.prefer_server_cipher_suites")
    return replace(
        pem,
        client_auth_type=auth,
        min_version=min_version,
        max_version=max_version,
        prefer_server_cipher_suites=prefer,
    )


def _parse_tls_pem(r: Reader, t: Mapping[str, Any], base_dir: Path) -> TLSServerConfig:
    """The certificate, key and client CAs: each a file or inline PEM, not both."""

    def path(name: str) -> str | None:
        if t.get(name) is None:
            return None
        return str(base_dir / r.string(t[name], f"tls_server_config.{name}"))

    def inline(name: str) -> str | None:
        v = t.get(name)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            # Never echo the value: `key` is a private key.
            raise r.fail(f"tls_server_config.{name}", "expected a PEM string")
        return v

    cfg = TLSServerConfig(
        cert_file=path("cert_file"),
        key_file=path("key_file"),
        cert=inline("cert"),
        key=inline("key"),
        client_ca_file=path("client_ca_file"),
        client_ca=inline("client_ca"),
    )
    for file_key, text_key in (("cert_file", "cert"), ("key_file", "key"), ("client_ca_file", "client_ca")):
        if getattr(cfg, file_key) is not None and getattr(cfg, text_key) is not None:
            raise r.fail(f"tls_server_config.{text_key}", f"set only one of {text_key} and {file_key}")
    if cfg.cert_file is None and cfg.cert is None:
        raise r.fail("tls_server_config.cert_file", "required when tls_server_config is set (or cert)")
    if cfg.key_file is None and cfg.key is None:
        raise r.fail("tls_server_config.key_file", "required when tls_server_config is set (or key)")
    return cfg


def _parse_client_auth(r: Reader, t: Mapping[str, Any], has_ca: bool) -> str:
    """``client_auth_type``: one Python's ``ssl`` can honour, and client CAs exactly when it
    verifies client certificates."""
    auth = "NoClientCert"
    if t.get("client_auth_type") is not None:
        auth = r.string(t["client_auth_type"], "tls_server_config.client_auth_type")
        if auth in _UNVERIFIED_CLIENT_AUTH:
            raise r.fail(
                "tls_server_config.client_auth_type",
                f"{auth!r} (accept a client certificate without verifying it) is not supported; "
                "use VerifyClientCertIfGiven or RequireAndVerifyClientCert",
            )
        if auth not in CLIENT_AUTH_TYPES:
            raise r.fail(
                "tls_server_config.client_auth_type", f"{auth!r} is not one of {list(CLIENT_AUTH_TYPES)}"
            )
    if has_ca and auth == "NoClientCert":
        raise r.fail(
            "tls_server_config.client_auth_type",
            "client CAs are configured but client_auth_type is NoClientCert (use RequireAndVerifyClientCert)",
        )
    if not has_ca and auth != "NoClientCert":
        raise r.fail("tls_server_config.client_ca_file", f"required when client_auth_type is {auth}")
    return auth


def _parse_tls_versions(r: Reader, t: Mapping[str, Any]) -> tuple[str, str]:
    """``min_version`` and ``max_version`` (default TLS 1.2 to 1.3), in order."""
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        versions[name] = default
        if t.get(name) is not None:
            versions[name] = r.string(t[name], f"tls_server_config.{name}", tuple(TLS_VERSIONS))
    if TLS_VERSIONS[versions["min_version"]] > TLS_VERSIONS[versions["max_version"]]:
        raise r.fail("tls_server_config.min_version", "must not be above max_version")
    return versions["min_version"], versions["max_version"]


def _parse_headers(r: Reader, value: Any) -> tuple[tuple[str, str], ...]:
    base = "http_server_config.headers"
    h = r.mapping(value, base, set(value) if isinstance(value, dict) else set())
    out: list[tuple[str, str]] = []
    for name, v in h.items():
        key = f"{base}.{name}"
        if name not in EXTRA_HEADERS:
            raise r.fail(key, f"this header can not be configured (allowed: {sorted(EXTRA_HEADERS)})")
        if v is not None and not isinstance(v, str):
            raise r.fail(key, "expected a string")
        text = v or ""
        if "\r" in text or "\n" in text:
            raise r.fail(key, "must not contain line breaks")
        allowed = EXTRA_HEADERS[name]
        if allowed is not None and text and text not in allowed:
            raise r.fail(key, f"{text!r} is not one of {list(allowed)}")
        if text:  # blank means unset
            out.append((name, text))
    return tuple(out)


def _parse_users(r: Reader, value: Any) -> dict[str, bytes]:
    m = r.mapping(value, "basic_auth_users", set(value) if isinstance(value, dict) else set())
    users: dict[str, bytes] = {}
    for user, hashed in m.items():
        key = f"basic_auth_users.{user}"
        if ":" in user:
            raise r.fail(key, "user names can not contain ':' (basic auth splits on it)")
        # Never echo the value: a plaintext password pasted here must not reach a log.
        if not isinstance(hashed, str) or not (match := _BCRYPT_RE.fullmatch(hashed)):
            raise r.fail(key, f"not a bcrypt hash ($2a$, $2b$ or $2y$); {_HTPASSWD_HINT}")
        if not 4 <= int(match.group(1)) <= 31:
            raise r.fail(key, "bcrypt cost must be between 04 and 31")
        raw = hashed.encode("ascii")
        # Let bcrypt itself check salt and digest, at the cheapest cost so startup stays fast.
        if _checkpw_or_invalid(b"", raw[:4] + b"04" + raw[6:]) is None:
            raise r.fail(key, "not a valid bcrypt hash (bad salt or digest)")
        users[user] = raw
    return users


# --- TLS ----------------------------------------------------------------------------------


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _EncryptedKey


def _os_problem(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not a text file"
    return exc.strerror or str(exc)


def _read_pem(origin: str, key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(origin, key, f"{path}: {_os_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(origin, key, f"{path}: not a PEM file") from None


def build_ssl_context(origin: str, t: TLSServerConfig) -> ssl.SSLContext:
    """A server context from ``t``; unreadable or mismatched files raise `ConfigError`."""
    cert_key = "tls_server_config." + ("cert_file" if t.cert_file else "cert")
    key_key = "tls_server_config." + ("key_file" if t.key_file else "key")
    ca_key = "tls_server_config." + ("client_ca_file" if t.client_ca_file else "client_ca")

    cert_pem = _read_pem(origin, cert_key, t.cert_file) if t.cert_file else (t.cert or "")
    key_pem = _read_pem(origin, key_key, t.key_file) if t.key_file else (t.key or "")
    # Check the certificate on its own first, so a bad key is not blamed on the certificate.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_pem)
    except (ssl.SSLError, ValueError):
        raise ConfigError(origin, cert_key, "no valid PEM certificate") from None
    if "PRIVATE KEY-----" not in key_pem:
        raise ConfigError(origin, key_key, "no PEM private key")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[t.min_version]
    ctx.maximum_version = TLS_VERSIONS[t.max_version]
    if t.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    with contextlib.ExitStack() as stack:
        # load_cert_chain wants file names: spill inline PEM to a private temporary directory.
        cert_path = t.cert_file or _spill(stack, "cert.pem", cert_pem)
        key_path = t.key_file or _spill(stack, "key.pem", key_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_refuse_password)
        except _EncryptedKey:
            raise ConfigError(origin, key_key, "encrypted private keys are not supported") from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc.reason):
                raise ConfigError(origin, key_key, f"does not match the certificate in {cert_key}") from None
            raise ConfigError(origin, key_key, f"no valid PEM private key ({exc.reason})") from None
        except OSError as exc:  # the file vanished between the two reads
            raise ConfigError(origin, key_key, _os_problem(exc)) from None

    ctx.verify_mode = CLIENT_AUTH_TYPES[t.client_auth_type]
    if t.client_ca_file or t.client_ca:
        ca_pem = _read_pem(origin, ca_key, t.client_ca_file) if t.client_ca_file else (t.client_ca or "")
        try:
            ctx.load_verify_locations(cadata=ca_pem)
        except (ssl.SSLError, ValueError):
            raise ConfigError(origin, ca_key, "no valid PEM certificate") from None
    return ctx


def _spill(stack: contextlib.ExitStack, name: str, text: str) -> str:
    d = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qih-tls-")))  # mode 0700
    p = d / name
    p.touch(mode=0o600)
    p.write_text(text, encoding="ascii")
    return str(p)


# --- basic auth and headers ---------------------------------------------------------------


def parse_basic_authorization(header: str | None) -> tuple[bytes, bytes] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header, or None."""
    if not header:
        return None
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = binascii.a2b_base64(param.strip().encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    return user, password


def _checkpw_or_invalid(password: bytes, hashed: bytes) -> bool | None:
    """bcrypt's verdict, or None when it refuses the input (a malformed hash, or over 72 bytes)."""
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return None


def _checkpw(password: bytes, hashed: bytes) -> bool:
    return _checkpw_or_invalid(password, hashed) is True


class BasicAuth:
    """bcrypt verification with a small cache of successes (like the exporter-toolkit).

    Unknown users are checked against a dummy hash of the same cost, so response time does not
    reveal which user names exist.  Cache keys are HMACs under a per-process random key of the
    user, hash and password, so the cache never holds anything that can be reversed offline.
    bcrypt runs in a worker thread, one at a time, so the event loop keeps serving.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        cost = max((int(h[4:6]) for h in self._users.values()), default=10)
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        self._secret = secrets.token_bytes(32)
        self._ok: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = asyncio.Lock()

    def _cache_key(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (user, hashed, password):
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    async def check(self, authorization: str | None) -> bool:
        creds = parse_basic_authorization(authorization)
        if creds is None:
            return False
        user, password = creds
        try:
            hashed = self._users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            hashed = None
        known = hashed is not None
        if hashed is None:
            hashed = self._dummy
        key = self._cache_key(user, hashed, password)
        if key in self._ok:
            self._ok.move_to_end(key)
            return True
        async with self._lock:
            if key in self._ok:  # verified while we waited
                return True
            ok = await asyncio.to_thread(_checkpw, password, hashed) and known
        if ok:
            self._ok[key] = None
            while len(self._ok) > _CACHE_SIZE:
                self._ok.popitem(last=False)
        return ok


def auth_middleware(cfg: WebConfig) -> Middleware | None:
    """Basic auth plus the configured extra headers; None when the config asks for neither.

    Headers go on every response the middleware sees, including 401s and HTTP errors.
    """
    if not cfg.basic_auth_users and not cfg.headers:
        return None
    auth = BasicAuth(cfg.basic_auth_users) if cfg.basic_auth_users else None
    extra = cfg.headers
    challenge = f'Basic realm="{REALM}", charset="UTF-8"'

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if auth is not None and not await auth.check(request.headers.get(hdrs.AUTHORIZATION)):
                resp: web.StreamResponse = web.Response(
                    status=401, text="Unauthorized\n", headers={hdrs.WWW_AUTHENTICATE: challenge}
                )
            else:
                resp = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(extra)
            raise
        if not resp.prepared:
            resp.headers.update(extra)
        return resp

    return middleware
