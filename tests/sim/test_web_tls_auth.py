"""The exporter's HTTP app behind a real TLS listener on loopback, with basic auth, over
--web.config.file: a real TLS client trusting a certificate generated here with openssl."""

from __future__ import annotations

import base64
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from exporter.web.server import make_app
from exporter.web.webconfig import WebConfig, auth_middleware, load_web_config
from tests.support.binaries import require_binary
from tests.support.exporter import ExporterProcess
from tests.support.procs import REPO

PASSWORD = "s3cret:with colon"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def _self_signed(d: Path, name: str) -> None:
    subprocess.run(
        [
            require_binary("openssl"), "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        cwd=d, check=True, capture_output=True,
    )  # fmt: skip


def tls_exporter(workdir: Path, config: dict[str, object], web_config: Path) -> ExporterProcess:
    """The exporter behind ``web_config``'s TLS and basic auth, its readiness probed with both."""
    exp = ExporterProcess(workdir, config, [f"--web.config.file={web_config}"])
    exp.ssl_context = _trusting(web_config.parent)
    exp.ready_headers = _auth("prometheus", PASSWORD)
    return exp


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _self_signed(d, "server")
    _self_signed(d, "client")
    return d


async def _serve(cfg: WebConfig) -> tuple[web.AppRunner, int]:
    app = make_app(CollectorRegistry(), "/metrics")
    mw = auth_middleware(cfg)
    if mw is not None:
        app.middlewares.append(mw)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cfg.ssl_context())
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def _write_config(pki: Path, extra_tls: str = "") -> WebConfig:
    p = pki / "web.yml"
    p.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        + extra_tls
        + "http_server_config:\n  headers:\n    Strict-Transport-Security: max-age=31536000\n"
        + f"basic_auth_users:\n  prometheus: '{HASH}'\n"
    )
    return load_web_config(str(p))


def _auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _trusting(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "server.crt"))


@pytest.fixture
async def server(pki: Path) -> AsyncIterator[int]:
    runner, port = await _serve(_write_config(pki))
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_right_credentials_over_tls(pki: Path, server: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the second scrape is served from the verification cache
            async with s.get(
                f"https://127.0.0.1:{server}/metrics",
                ssl=_trusting(pki),
                headers=_auth("prometheus", PASSWORD),
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
                assert resp.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize(
    "headers",
    [{}, _auth("prometheus", "wrong"), _auth("root", PASSWORD)],
    ids=["none", "wrong-password", "unknown-user"],
)
async def test_wrong_credentials_over_tls(pki: Path, server: int, headers: dict[str, str]) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"https://127.0.0.1:{server}/healthz", ssl=_trusting(pki), headers=headers) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"


async def test_plain_http_to_tls_port_fails(server: int) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(
                f"http://127.0.0.1:{server}/metrics",
                headers=_auth("prometheus", PASSWORD),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                pytest.fail(f"plain HTTP got an answer: {resp.status}")


async def test_untrusted_certificate_is_refused(server: int) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with s.get(f"https://127.0.0.1:{server}/metrics", ssl=ssl.create_default_context()):
                pass


async def test_client_certificate_required(pki: Path) -> None:
    cfg = _write_config(pki, "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: client.crt\n")
    runner, port = await _serve(cfg)
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        with_cert = _trusting(pki)
        with_cert.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        async with aiohttp.ClientSession() as s:
            async with s.get(url, ssl=with_cert, headers=_auth("prometheus", PASSWORD)) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with s.get(url, ssl=_trusting(pki), headers=_auth("prometheus", PASSWORD)) as resp:
                    pytest.fail(f"no client certificate got an answer: {resp.status}")
    finally:
        await runner.cleanup()


async def test_min_version_is_enforced(pki: Path) -> None:
    runner, port = await _serve(_write_config(pki, "  min_version: TLS13\n"))
    try:
        old_client = _trusting(pki)
        old_client.maximum_version = ssl.TLSVersion.TLSv1_2
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"https://127.0.0.1:{port}/healthz", ssl=old_client):
                    pass
    finally:
        await runner.cleanup()


async def test_exporter_process_serves_tls_and_basic_auth(pki: Path, short_tmp: Path) -> None:
    """The real CLI with --web.config.file: HTTPS with basic auth, and a bad file exits 2."""
    _write_config(pki)
    exp = tls_exporter(short_tmp, {"qmp": {"sockets": [str(short_tmp / "x.qmp")]}}, pki / "web.yml")
    await exp.start()  # ready: /healthz answers over TLS, with the credentials
    url = exp.url + "/metrics"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url, ssl=_trusting(pki)) as r:
                assert r.status == 401
            async with s.get(url, ssl=_trusting(pki), headers=_auth("prometheus", PASSWORD)) as r:
                assert r.status == 200 and "qemu_exporter_build_info" in await r.text()
            async with s.get(url, ssl=_trusting(pki), headers=_auth("prometheus", "wrong")) as r:
                assert r.status == 401
            with pytest.raises(aiohttp.ClientError):
                async with s.get(url.replace("https", "http")) as r:
                    await r.read()
    finally:
        assert exp.stop() == 0

    bad = pki / "bad-web.yml"
    bad.write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
    r = subprocess.run(
        [sys.executable, "-m", "exporter", f"--web.config.file={bad}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "basic_auth_users.prometheus" in r.stderr, (
        r.stderr
    )
    assert "not-a-hash" not in r.stderr
