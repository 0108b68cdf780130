"""The exporter as a subprocess: HTTP behaviour, isolation of a hung socket, clean shutdown."""

from __future__ import annotations

import gzip
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.exposition import choose_encoder

from bench.prometheus import PROMETHEUS_2_ACCEPT, PROMETHEUS_3_ACCEPT
from tests.support.exporter import ExporterProcess
from tests.support.qemu import blank_image, run_qemu
from tests.support.scrape import Metrics

FAST = {
    "discovery_interval_seconds": 0.2,
    "poll_interval_seconds": 0.5,
    "connect_timeout_seconds": 1.0,
    "command_timeout_seconds": 1.0,
    "backoff_initial_seconds": 0.1,
    "backoff_max_seconds": 1.0,
}


def hung_socket(path: Path) -> socket.socket:
    """A socket that accepts connections (kernel backlog) and never says a word."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(64)
    return s


async def test_http_endpoints(short_tmp: Path) -> None:
    async with ExporterProcess(short_tmp, {"qmp": {"sockets": [str(short_tmp / "none.qmp")], **FAST}}) as exp:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(exp.url + "/") as r:
                assert r.status == 200 and 'href="/metrics"' in await r.text()
            async with s.get(exp.url + "/healthz") as r:
                assert r.status == 200
            async with s.get(exp.url + "/nope") as r:
                assert r.status == 404
            async with s.get(exp.url + "/metrics", headers={"Accept-Encoding": "gzip"}) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                text = gzip.decompress(await r.read()).decode()
                assert "qemu_exporter_build_info" in text
            async with s.get(
                exp.url + "/metrics",
                headers={
                    "Accept": "application/openmetrics-text; version=1.0.0",
                    "Accept-Encoding": "identity",
                },
            ) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await r.text()).endswith("# EOF\n")
            async with s.get(exp.url + "/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain")
        # An explicitly configured socket that does not exist: watched, down, reason counted.
        m = await exp.wait_metrics(
            lambda m: (
                (m.value("qemu_exporter_qmp_connect_errors_total", vm="none", reason="not_found") or 0) >= 1
            )
        )
        assert m.value("qemu_qmp_up", vm="none") == 0


@pytest.mark.parametrize(
    "accept",
    [
        None,
        PROMETHEUS_2_ACCEPT,
        PROMETHEUS_3_ACCEPT,
        "text/plain;version=1.0.0;escaping=allow-utf-8",
        "application/openmetrics-text;version=1.0.0;escaping=dots",
        "application/openmetrics-text;version=0.0.1",
    ],
)
async def test_content_negotiation_is_prometheus_clients(short_tmp: Path, accept: str | None) -> None:
    """The format and Content-Type are prometheus_client's choice for the header Prometheus
    2.x/3.x (OpenMetrics 1.0.0), a text 1.0.0 client, an escaping we hand to prometheus_client
    (dots), and an OpenMetrics version it does not serve (0.0.1: text 0.0.4); gzip of it too."""
    _encoder, content_type = choose_encoder(accept or "")
    openmetrics_page = "openmetrics" in content_type
    config = {"qmp": {"sockets": [str(short_tmp / "none.qmp")], **FAST}}
    async with ExporterProcess(short_tmp, config) as exp, aiohttp.ClientSession(auto_decompress=False) as s:
        for encoding in ("identity", "gzip"):
            headers = {"Accept-Encoding": encoding}
            if accept is not None:
                headers["Accept"] = accept
            async with s.get(exp.url + "/metrics", headers=headers) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == content_type
                body = await r.read()
            if encoding == "gzip":
                assert r.headers["Content-Encoding"] == "gzip"
                body = gzip.decompress(body)
            text = body.decode()
            assert text.endswith("\n# EOF\n") == openmetrics_page
            counter = "qemu_exporter_qmp_connect_attempts"
            if "escaping=dots" in content_type:
                counter = counter.replace("_", "__")
            suffix = "" if openmetrics_page else "_total"
            assert f"\n# TYPE {counter}{suffix} counter\n" in text


async def test_hung_socket_stalls_neither_scrapes_nor_other_vms(short_tmp: Path) -> None:
    hung = hung_socket(short_tmp / "hung.qmp")
    blank_image(short_tmp / "d.img")
    try:
        with run_qemu(
            short_tmp,
            short_tmp / "good.qmp",
            [
                "-drive",
                "file=d.img,format=raw,if=none,id=drive0",
                "-device",
                "virtio-blk-pci,drive=drive0,id=disk0",
            ],
            name="good",
        ):
            cfg = {"qmp": {"globs": [str(short_tmp / "*.qmp")], **FAST, "connect_timeout_seconds": 30.0}}
            async with ExporterProcess(short_tmp, cfg) as exp:
                m = await exp.wait_metrics(
                    lambda m: (
                        m.value("qemu_qmp_up", vm="good") == 1 and m.find("qemu_block_device_info", vm="good")
                    ),
                    what="the good VM",
                )
                # The hung socket is still in its 30 s connect attempt, yet scrapes are instant.
                assert m.value("qemu_qmp_up", vm="hung") == 0
                worst = 0.0
                for _ in range(20):
                    t0 = time.monotonic()
                    await exp.scrape()
                    worst = max(worst, time.monotonic() - t0)
                assert worst < 0.5, worst
    finally:
        hung.close()


async def test_sigterm_exits_cleanly(short_tmp: Path) -> None:
    exp = ExporterProcess(short_tmp, {"qmp": {"sockets": [str(short_tmp / "x.qmp")], **FAST}})
    await exp.start()
    m: Metrics = await exp.scrape()
    assert m.value("qemu_exporter_vms") == 1
    assert exp.stop(signal.SIGTERM) == 0
    assert "shutting down" in exp.log()
    assert "Traceback" not in exp.log()
