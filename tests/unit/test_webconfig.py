"""--web.config.file: every bad input is a ConfigError naming the key; basic auth and headers."""

from __future__ import annotations

import base64
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from exporter.config import ConfigError
from exporter.web import webconfig
from exporter.web.webconfig import (
    WebConfig,
    auth_middleware,
    load_web_config,
    parse_basic_authorization,
    parse_web_config,
)
from tests.support.binaries import require_binary

# Cost 4 keeps the tests fast; the middleware does not care about the cost.
ALICE_PW = "correct horse:battery"  # a ':' inside the password must survive parsing
ALICE_HASH = bcrypt.hashpw(ALICE_PW.encode(), bcrypt.gensalt(rounds=4)).decode()
BOB_PW = "hunter2"
BOB_HASH_2Y = "$2y$" + bcrypt.hashpw(BOB_PW.encode(), bcrypt.gensalt(rounds=4)).decode()[4:]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def _self_signed(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """server.crt/key, other.crt/key (a second pair), enc.key (encrypted), a directory."""
    d = tmp_path_factory.mktemp("pki")
    _self_signed(d, "server")
    _self_signed(d, "other")
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:x", "-out", "enc.key", cwd=d)
    (d / "garbage.pem").write_text("not a certificate\n")
    (d / "adir").mkdir()
    return d


def _parse(doc: str, base: Path) -> WebConfig:
    return parse_web_config(yaml.safe_load(doc), origin="web.yml", base_dir=base)


TLS = "tls_server_config: {cert_file: server.crt, key_file: server.key"


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ("[1]", "(top level)"),
        ("tls_config: {}", "tls_config"),
        ("rate_limit: {interval: 1s, burst: 2}", "rate_limit"),
        ("tls_server_config: server.crt", "tls_server_config"),
        (TLS + ", bogus: 1}", "tls_server_config.bogus"),
        (TLS + ", cipher_suites: [TLS_AES_128_GCM_SHA256]}", "tls_server_config.cipher_suites"),
        (TLS + ", curve_preferences: [X25519]}", "tls_server_config.curve_preferences"),
        (TLS + ", client_allowed_sans: [a]}", "tls_server_config.client_allowed_sans"),
        ("tls_server_config: {min_version: TLS13}", "tls_server_config.cert_file"),
        ("tls_server_config: {cert_file: server.crt}", "tls_server_config.key_file"),
        ("tls_server_config: {key_file: server.key}", "tls_server_config.cert_file"),
        ("tls_server_config: {cert_file: 7, key_file: server.key}", "tls_server_config.cert_file"),
        ("tls_server_config: {cert_file: missing.crt, key_file: server.key}", "tls_server_config.cert_file"),
        ("tls_server_config: {cert_file: server.crt, key_file: missing.key}", "tls_server_config.key_file"),
        ("tls_server_config: {cert_file: server.crt, key_file: adir}", "tls_server_config.key_file"),
        ("tls_server_config: {cert_file: garbage.pem, key_file: server.key}", "tls_server_config.cert_file"),
        ("tls_server_config: {cert_file: server.key, key_file: server.key}", "tls_server_config.cert_file"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.crt}", "tls_server_config.key_file"),
        ("tls_server_config: {cert_file: server.crt, key_file: other.key}", "tls_server_config.key_file"),
        ("tls_server_config: {cert_file: server.crt, key_file: enc.key}", "tls_server_config.key_file"),
        (TLS + ", cert: 'x'}", "tls_server_config.cert"),
        ("tls_server_config: {cert_file: server.crt, key: 5}", "tls_server_config.key"),
        (TLS + ", min_version: TLS14}", "tls_server_config.min_version"),
        (TLS + ", max_version: 1.2}", "tls_server_config.max_version"),
        (TLS + ", min_version: TLS13, max_version: TLS12}", "tls_server_config.min_version"),
        (TLS + ", prefer_server_cipher_suites: 'yes'}", "tls_server_config.prefer_server_cipher_suites"),
        (TLS + ", client_auth_type: Sometimes}", "tls_server_config.client_auth_type"),
        (TLS + ", client_auth_type: RequireAnyClientCert}", "tls_server_config.client_auth_type"),
        (TLS + ", client_auth_type: RequestClientCert}", "tls_server_config.client_auth_type"),
        (TLS + ", client_ca_file: other.crt}", "tls_server_config.client_auth_type"),
        (TLS + ", client_auth_type: RequireAndVerifyClientCert}", "tls_server_config.client_ca_file"),
        (
            TLS + ", client_auth_type: VerifyClientCertIfGiven, client_ca_file: garbage.pem}",
            "tls_server_config.client_ca_file",
        ),
        (
            TLS + ", client_auth_type: VerifyClientCertIfGiven, client_ca_file: nope.pem}",
            "tls_server_config.client_ca_file",
        ),
        ("http_server_config: {http3: true}", "http_server_config.http3"),
        ("http_server_config: {http2: 'no'}", "http_server_config.http2"),
        ("http_server_config: {headers: [a]}", "http_server_config.headers"),
        ("http_server_config: {headers: {Server: x}}", "http_server_config.headers.Server"),
        (
            "http_server_config: {headers: {strict-transport-security: max-age=1}}",
            "http_server_config.headers.strict-transport-security",
        ),
        (
            "http_server_config: {headers: {X-Frame-Options: allow}}",
            "http_server_config.headers.X-Frame-Options",
        ),
        (
            "http_server_config: {headers: {X-Content-Type-Options: sniff}}",
            "http_server_config.headers.X-Content-Type-Options",
        ),
        (
            'http_server_config: {headers: {Content-Security-Policy: "a\\r\\nSet-Cookie: x"}}',
            "http_server_config.headers.Content-Security-Policy",
        ),
        (
            "http_server_config: {headers: {X-XSS-Protection: 1}}",
            "http_server_config.headers.X-XSS-Protection",
        ),
        ("basic_auth_users: [alice]", "basic_auth_users"),
        ("basic_auth_users: {alice: s3cret-plaintext}", "basic_auth_users.alice"),
        ("basic_auth_users: {alice: 123456}", "basic_auth_users.alice"),
        ("basic_auth_users: {alice: }", "basic_auth_users.alice"),
        ("basic_auth_users: {alice: '$2y$10$tooshort'}", "basic_auth_users.alice"),
        ("basic_auth_users: {alice: '$2y$99$" + "a" * 53 + "'}", "basic_auth_users.alice"),
        ("basic_auth_users: {alice: '$2z$10$" + "a" * 53 + "'}", "basic_auth_users.alice"),
        ("basic_auth_users: {alice: '$2y$10$" + "a" * 53 + "'}", "basic_auth_users.alice"),  # bad salt
        ("basic_auth_users: {'a:b': '" + ALICE_HASH + "'}", "basic_auth_users.a:b"),
        ("basic_auth_users: {1: '" + ALICE_HASH + "'}", "basic_auth_users.1"),
    ],
)
def test_bad_input_names_the_key(pki: Path, doc: str, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        _parse(doc, pki)
    assert (ei.value.origin, ei.value.key) == ("web.yml", key), str(ei.value)


@pytest.mark.parametrize("secret", ["s3cret-plaintext", "123456", ALICE_HASH[:-1]])
def test_errors_never_echo_password_or_hash(pki: Path, secret: str) -> None:
    with pytest.raises(ConfigError) as ei:
        _parse(f"basic_auth_users: {{alice: '{secret}'}}", pki)
    assert secret not in str(ei.value)


def test_inline_key_is_not_echoed(pki: Path) -> None:
    key = (pki / "server.key").read_text()
    doc = {"tls_server_config": {"cert_file": "other.crt", "key": key}}
    with pytest.raises(ConfigError) as ei:
        parse_web_config(doc, origin="web.yml", base_dir=pki)
    assert ei.value.key == "tls_server_config.key"
    assert "PRIVATE" not in str(ei.value)


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_web_config(str(tmp_path / "nope.yml"))
    assert ei.value.key == "(file)"
    bad = tmp_path / "bad.yml"
    bad.write_text("basic_auth_users:\n  alice: [\n")
    with pytest.raises(ConfigError) as ei:
        load_web_config(str(bad))
    assert ei.value.key.startswith("line ")


def test_empty_file_means_plain_http_without_auth(tmp_path: Path) -> None:
    p = tmp_path / "web.yml"
    p.write_text("")
    cfg = load_web_config(str(p))
    assert cfg.ssl_context() is None
    assert not cfg.tls_enabled and not cfg.basic_auth_enabled
    assert auth_middleware(cfg) is None
    assert load_web_config(str(p)) == parse_web_config({"tls_server_config": {}}, origin=str(p))


def test_good_config_relative_to_file_dir(pki: Path, tmp_path: Path) -> None:
    # Relative names resolve against the config file's directory, not the CWD.
    p = pki / "web.yml"
    p.write_text(
        "tls_server_config:\n"
        "  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: other.crt\n"
        "  min_version: TLS13\n"
        "http_server_config:\n  http2: false\n"
        "  headers: {Strict-Transport-Security: max-age=31536000, X-Frame-Options: deny, X-XSS-Protection: '', X-Content-Type-Options: }\n"
        f"basic_auth_users:\n  alice: '{ALICE_HASH}'\n  bob: '{BOB_HASH_2Y}'\n"
    )
    cfg = load_web_config(str(p))
    assert cfg.tls is not None
    assert cfg.tls.cert_file == str(pki / "server.crt")
    assert cfg.headers == (("Strict-Transport-Security", "max-age=31536000"), ("X-Frame-Options", "deny"))
    assert cfg.http2 is False
    assert sorted(cfg.basic_auth_users) == ["alice", "bob"]
    ctx = cfg.ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ALICE_HASH not in repr(cfg) and "$2y$" not in repr(cfg)


def test_inline_cert_and_key(pki: Path) -> None:
    doc = {
        "tls_server_config": {
            "cert": (pki / "server.crt").read_text(),
            "key": (pki / "server.key").read_text(),
            "client_auth_type": "VerifyClientCertIfGiven",
            "client_ca": (pki / "other.crt").read_text(),
        }
    }
    cfg = parse_web_config(doc, origin="web.yml")
    ctx = cfg.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_OPTIONAL
    assert "BEGIN" not in repr(cfg)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", None),
        ("Basic", None),
        ("Basic !!!notbase64", None),
        ("Basic " + base64.b64encode(b"nocolon").decode(), None),
        ("Basic " + base64.b64encode(b"u:p:q").decode(), (b"u", b"p:q")),
        ("basic " + base64.b64encode(b":").decode(), (b"", b"")),
        ("Basic " + base64.b64encode("é:ü".encode()).decode(), ("é".encode(), "ü".encode())),
    ],
)
def test_parse_basic_authorization(header: str | None, expected: tuple[bytes, bytes] | None) -> None:
    assert parse_basic_authorization(header) == expected


# --- the middleware in a real aiohttp server on 127.0.0.1 ---------------------------------


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def _hello(request: web.Request) -> web.StreamResponse:
    return web.Response(text="hello\n")


async def _client(cfg: WebConfig) -> TestClient[web.Request, web.Application]:
    mw = auth_middleware(cfg)
    assert mw is not None
    app = web.Application(middlewares=[mw])
    app.router.add_get("/metrics", _hello)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    doc = {
        "basic_auth_users": {"alice": ALICE_HASH, "bob": BOB_HASH_2Y},
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
    }
    c = await _client(parse_web_config(doc, origin="web.yml"))
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        _basic("alice", "wrong"),
        _basic("alice", ALICE_PW.upper()),
        _basic("mallory", ALICE_PW),
        _basic("bob", ALICE_PW),
        _basic("alice", ALICE_PW + "x" * 80),  # > 72 bytes: bcrypt refuses, still a plain 401
        {"Authorization": "Basic %%%"},
        {"Authorization": "Bearer " + ALICE_PW},
    ],
)
async def test_wrong_credentials_get_401(
    client: TestClient[web.Request, web.Application], headers: dict[str, str]
) -> None:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith('Basic realm="qemu-iohang-exporter"')
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "hello" not in await resp.text()


async def test_right_credentials_get_through(client: TestClient[web.Request, web.Application]) -> None:
    for user, pw in (("alice", ALICE_PW), ("bob", BOB_PW)):
        resp = await client.get("/metrics", headers=_basic(user, pw))
        assert resp.status == 200, user
        assert await resp.text() == "hello\n"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "WWW-Authenticate" not in resp.headers


async def test_headers_on_http_errors_too(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/nope", headers=_basic("alice", ALICE_PW))
    assert resp.status == 404
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_successes_are_cached_failures_are_not(
    client: TestClient[web.Request, web.Application], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    real = webconfig._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(webconfig, "_checkpw", counting)
    for _ in range(3):
        assert (await client.get("/metrics", headers=_basic("alice", ALICE_PW))).status == 200
    assert len(calls) == 1
    for _ in range(2):
        assert (await client.get("/metrics", headers=_basic("alice", "wrong"))).status == 401
    assert len(calls) == 3
    # Unknown users still pay for a bcrypt comparison (no user enumeration by timing).
    assert (await client.get("/metrics", headers=_basic("mallory", "x"))).status == 401
    assert len(calls) == 4 and calls[-1] not in (ALICE_HASH.encode(), BOB_HASH_2Y.encode())


async def test_headers_only_config_needs_no_credentials() -> None:
    doc = {"http_server_config": {"headers": {"Strict-Transport-Security": "max-age=60"}}}
    c = await _client(parse_web_config(doc, origin="web.yml"))
    try:
        resp = await c.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Strict-Transport-Security"] == "max-age=60"
    finally:
        await c.close()
