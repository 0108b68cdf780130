"""The status page and its JSON sit behind the web config's TLS and basic auth like /metrics:
the exporter subprocess with --web.config.file, a real TLS client, a simulated VM."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.parse
from pathlib import Path

import aiohttp
import pytest

from qmpsim import DiskSpec, SimVM
from tests.sim.test_check import check
from tests.sim.test_exporter_sim import running
from tests.sim.test_journal import report
from tests.sim.test_web_tls_auth import HASH, PASSWORD, _auth, _self_signed, tls_exporter
from tests.support.config import FAST
from tests.support.waits import wait_for


@pytest.fixture
def web_config(tmp_path: Path) -> Path:
    _self_signed(tmp_path, "server")
    p = tmp_path / "web.yml"
    p.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n"
    )
    return p


@pytest.mark.parametrize("path", ["/", "/api/v1/status"])
async def test_status_behind_tls_and_basic_auth(short_tmp: Path, web_config: Path, path: str) -> None:
    vm = SimVM(str(short_tmp / "a.qmp"), name="a", disks=[DiskSpec(id="virtio-disk0", werror="stop")])
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}
    async with running([vm]), tls_exporter(short_tmp, cfg, web_config) as exp, aiohttp.ClientSession() as s:
        for headers in ({}, _auth("prometheus", "wrong")):
            async with s.get(exp.url + path, ssl=exp.ssl_context, headers=headers) as r:
                assert r.status == 401, (headers, r.status)
                assert "werror_not_retry" not in await r.text()

        async def shown() -> str | None:
            async with s.get(exp.url + path, ssl=exp.ssl_context, headers=_auth("prometheus", PASSWORD)) as r:
                assert r.status == 200
                text = await r.text()
                return text if "werror_not_retry" in text else None

        await wait_for(shown, 15, f"{path} showing the violating VM")
        with pytest.raises(aiohttp.ClientError):  # no plain HTTP on the TLS port
            async with s.get(f"http://127.0.0.1:{exp.port}{path}", headers=_auth("prometheus", PASSWORD)):
                pass


async def test_check_reads_the_exporter_over_tls_with_basic_auth(short_tmp: Path, web_config: Path) -> None:
    vm = SimVM(str(short_tmp / "a.qmp"), name="a", disks=[DiskSpec(id="virtio-disk0", werror="stop")])
    cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST}}
    async with running([vm]), tls_exporter(short_tmp, cfg, web_config) as exp:
        ca = f"--exporter.ca-file={web_config.parent / 'server.crt'}"
        with_auth = f"https://prometheus:{urllib.parse.quote(PASSWORD, safe='')}@127.0.0.1:{exp.port}"

        async def violation_seen() -> subprocess.CompletedProcess[str] | None:
            r = await asyncio.to_thread(check, f"--exporter.url={with_auth}", ca, "--output=json")
            return r if r.returncode == 1 else None

        r = await wait_for(violation_seen, 15, "the check to read the violating disk")
        assert [(x["vm"], x["werror"], x["verdict"]) for x in json.loads(r.stdout)["rows"]] == [
            ("a", "stop", "violation")
        ]
        r = await asyncio.to_thread(check, f"--exporter.url={exp.url}", ca)
        assert r.returncode == 2 and "401" in r.stderr and PASSWORD not in r.stderr
        r = await asyncio.to_thread(check, f"--exporter.url={with_auth}")  # CA not trusted
        assert r.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
        assert urllib.parse.quote(PASSWORD, safe="") not in r.stderr  # credentials never printed


async def test_journal_endpoints_and_the_report_behind_tls_and_basic_auth(
    short_tmp: Path, web_config: Path
) -> None:
    """/api/v1/hangs and /api/v1/incidents answer only with the password; qemu-iohang-report
    reads them with the credentials in the URL and the CA file, and never prints them."""
    cfg = {
        "qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST},
        "hang": {"journal_file": str(short_tmp / "hangs.jsonl")},
    }
    async with tls_exporter(short_tmp, cfg, web_config) as exp, aiohttp.ClientSession() as s:
        for path in ("/api/v1/hangs", "/api/v1/incidents"):
            for headers in ({}, _auth("prometheus", "wrong")):
                async with s.get(exp.url + path, ssl=exp.ssl_context, headers=headers) as r:
                    assert r.status == 401, (path, headers, r.status)
            async with s.get(exp.url + path, ssl=exp.ssl_context, headers=_auth("prometheus", PASSWORD)) as r:
                assert r.status == 200 and (await r.json())["schema"] == 1
        quoted = urllib.parse.quote(PASSWORD, safe="")
        with_auth = f"https://prometheus:{quoted}@127.0.0.1:{exp.port}"
        ca = f"--exporter.ca-file={web_config.parent / 'server.crt'}"
        r = await asyncio.to_thread(report, f"--exporter.url={with_auth}", ca, "--output=json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sources"] == [
            {"source": f"127.0.0.1:{exp.port}", "read": True, "hangs": 0, "error": ""}
        ]
        r = await asyncio.to_thread(report, f"--exporter.url=https://127.0.0.1:{exp.port}", ca)
        assert r.returncode == 2 and "HTTP 401" in r.stderr and "Not read" in r.stdout
        r = await asyncio.to_thread(report, f"--exporter.url={with_auth}")  # CA not trusted
        assert r.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
        assert quoted not in r.stderr + r.stdout and PASSWORD not in r.stderr + r.stdout
