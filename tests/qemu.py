"""Start a real QEMU (Debian qemu-system-x86) for tests: no guest OS needed (domain.md §5)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.conftest import require_binary

BASE_ARGS = (
    "-machine",
    "q35",
    "-accel",
    "tcg,tb-size=8",
    "-m",
    "32M",
    "-display",
    "none",
    "-nodefaults",
    "-no-user-config",
)


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"qemu exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


@contextlib.contextmanager
def run_qemu(
    workdir: Path, qmp_socket: Path, args: Sequence[str], name: str | None = "testvm"
) -> Iterator[subprocess.Popen[bytes]]:
    """QEMU with a QMP monitor on ``qmp_socket``; killed and reaped on exit."""
    qemu = require_binary("qemu-system-x86_64")
    with contextlib.suppress(FileNotFoundError):
        qmp_socket.unlink()
    cmd = [
        qemu,
        *BASE_ARGS,
        *(["-name", name] if name else []),
        "-qmp",
        f"unix:{qmp_socket},server=on,wait=off",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_socket(qmp_socket, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def blank_image(path: Path, size: int = 1 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def env_ci() -> bool:
    return os.environ.get("CI") == "true"
