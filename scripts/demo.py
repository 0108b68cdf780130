"""Run the built-in demo: a simulated fleet whose storage fails and recovers, plus the exporter.

scripts/demo.sh [--port 9738] [--duration SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "qmpsim" / "fleets" / "demo.yaml"
SOCKET_DIR = "/tmp/qmpsim-demo"  # socket_dir of the demo fleet


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=9738)
    ap.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
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
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_http(url + "/healthz", procs)
        print(
            f"\nqemu-iohang-exporter demo is running: open {url}/metrics\n"
            "  6 simulated VMs: compliant, stop-policy, drive-policy, upstream (no retry feature),\n"
            "  flapping (storage down 7 s every 40 s, recovers) and timeout (down 12 s every 45 s,\n"
            "  retry_timeout 5 s).  Try:  curl -s "
            f"{url}/metrics | grep -E 'qemu_block_(io_hang|retry_policy_ok|io_error)'\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        end = time.monotonic() + args.duration if args.duration else None
        while not stop and all(p.poll() is None for p in procs):
            if end is not None and time.monotonic() >= end:
                break
            time.sleep(0.2)
        failed = [p for p in procs if p.poll() not in (None, 0)]
        return 1 if failed else 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.poll() is None:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
