"""Run the built-in demo: a simulated fleet whose storage fails and recovers, plus the exporter.

scripts/demo.sh [--port 9738] [--duration SECONDS] [--with-prometheus]

Prints the status page URL first.  With --with-prometheus it also starts Debian's Prometheus
and Alertmanager (on free loopback ports, in a temporary directory removed at the end) with
the shipped rules (alerts/*.rules.yml), scraping the exporter every second, so the 50 %/80 %
retry_timeout alerts can be watched firing and resolving.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "qmpsim" / "fleets" / "demo.yaml"
SOCKET_DIR = "/tmp/qmpsim-demo"  # socket_dir of the demo fleet
RULES = sorted((REPO / "alerts").glob("*.rules.yml"))
JOB = "qemu-iohang"  # the job name the shipped rules select


def wait_http(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if p.poll() is not None:
                sys.exit(
                    f"demo: {p.args[3] if isinstance(p.args, list) else p.args} exited with {p.returncode}"
                )
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"demo: {url} did not answer within {timeout:.0f}s")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    sys.exit(f"demo: --with-prometheus needs {names[0]} (Debian package; run scripts/install-system-deps.sh)")


def start_prometheus(workdir: Path, exporter: str) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    """Alertmanager (one receiver that sends nowhere: the demo shows alerts in its UI) and
    Prometheus with the shipped rules.  Returns the processes and their URLs."""
    prom_bin = binary("prometheus")
    am_bin = binary("prometheus-alertmanager", "alertmanager")
    am_port, prom_port = free_port(), free_port()
    am_dir, prom_dir = workdir / "alertmanager", workdir / "prometheus"
    am_dir.mkdir()
    prom_dir.mkdir()
    (am_dir / "alertmanager.yml").write_text(
        yaml.safe_dump(
            {
                "route": {"receiver": "demo", "group_wait": "1s", "group_interval": "5s"},
                "receivers": [{"name": "demo"}],
            }
        )
    )
    (prom_dir / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": [str(r) for r in RULES],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [exporter]}]}],
            }
        )
    )
    am_log, prom_log = (am_dir / "alertmanager.log").open("wb"), (prom_dir / "prometheus.log").open("wb")
    am = subprocess.Popen(
        [
            am_bin,
            f"--config.file={am_dir / 'alertmanager.yml'}",
            f"--storage.path={am_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",
        ],
        stdout=am_log,
        stderr=subprocess.STDOUT,
        cwd=am_dir,
    )
    prom = subprocess.Popen(
        [
            prom_bin,
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--rules.alert.resend-delay=1s",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
        cwd=prom_dir,
    )
    am_url, prom_url = f"http://127.0.0.1:{am_port}", f"http://127.0.0.1:{prom_port}"
    wait_http(am_url + "/-/ready", [am])
    wait_http(prom_url + "/-/ready", [prom])
    return [am, prom], prom_url, am_url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=9738)
    ap.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    ap.add_argument(
        "--with-prometheus",
        action="store_true",
        help="also run Prometheus and Alertmanager with the shipped alert rules",
    )
    args = ap.parse_args()

    py = sys.executable
    fleet = subprocess.Popen([py, "-m", "qmpsim", "run", "--fleet", str(FLEET)], cwd=REPO)
    exporter = subprocess.Popen(
        [
            py,
            "-m",
            "exporter",
            f"--qmp.glob={SOCKET_DIR}/*.qmp",
            f"--web.listen-address=127.0.0.1:{args.port}",
        ],
        cwd=REPO,
    )
    procs = [fleet, exporter]
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="qih-demo-"))
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_http(url + "/healthz", procs)
        print(
            f"\nqemu-iohang-exporter demo is running.  Status page: open {url}/\n"
            "  7 simulated VMs: compliant, stop-policy, drive-policy, upstream (no retry feature),\n"
            "  flapping (storage down 7 s every 40 s, recovers), timeout (down 12 s every 45 s,\n"
            "  retry_timeout 5 s) and slow-storage (down 45 s every 60 s, retry_timeout 60 s).\n"
            f"  Metrics: {url}/metrics   JSON: {url}/api/v1/status\n"
            f"  Check:   .venv/bin/qemu-iohang-check --exporter.url={url}",
            flush=True,
        )
        if args.with_prometheus:
            started, prom_url, am_url = start_prometheus(workdir, f"127.0.0.1:{args.port}")
            procs += started
            print(
                f"  Prometheus (shipped rules, 1 s scrape): {prom_url}/alerts\n"
                f"  Alertmanager: {am_url}/#/alerts\n"
                "  QemuIOHangApproachingTimeout (50 %) and QemuIOHangNearTimeout (80 %) fire for the\n"
                "  timeout VM ~17 s after the start and every 45 s, and resolve when its hang ends.",
                flush=True,
            )
        print("Press Ctrl-C to stop.\n", flush=True)
        end = time.monotonic() + args.duration if args.duration else None
        while not stop and all(p.poll() is None for p in procs):
            if end is not None and time.monotonic() >= end:
                break
            time.sleep(0.2)
        failed = [p for p in procs if p.poll() not in (None, 0)]
        return 1 if failed else 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.poll() is None:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
