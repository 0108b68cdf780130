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


# --- Storage that fails on demand, guests with continuous IO, extra monitors -------------------

MON2_ID = "mon2"


def monitor_args(socket_path: Path, chardev_id: str = MON2_ID) -> list[str]:
    """An extra QMP monitor, as a libvirt host adds one through ``<qemu:commandline>``."""
    return [
        "-chardev",
        f"socket,id={chardev_id},path={socket_path},server=on,wait=off",
        "-mon",
        f"chardev={chardev_id},mode=control",
    ]


def debugcon_args(log_path: Path) -> list[str]:
    """The ISA debug console on port 0x402, written to ``log_path``."""
    return ["-chardev", f"file,id=dbg,path={log_path}", "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate and reap ``proc`` (SIGKILL when it does not exit in time)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class FailingStorage:
    """nbdkit serving a raw image through the error filter: EIO on every request while
    ``error_file`` exists (domain.md §5)."""

    def __init__(self, image: Path, socket_path: Path, error_file: Path, log_path: Path) -> None:
        self.image = image
        self.socket = socket_path
        self.error_file = error_file
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def blockdev_arg(self, node_name: str = "nbd0") -> str:
        return f"driver=nbd,node-name={node_name},server.type=unix,server.path={self.socket}"

    def fail(self) -> None:
        self.error_file.touch()

    def recover(self) -> None:
        self.error_file.unlink(missing_ok=True)

    def start(self, timeout: float = 15.0) -> None:
        nbdkit = require_binary("nbdkit")
        self.socket.unlink(missing_ok=True)
        pidfile = self.socket.with_suffix(".pid")
        pidfile.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [nbdkit, "-f", "-U", str(self.socket), "-P", str(pidfile), "--filter=error", "file",
                 str(self.image), "error-rate=100%", f"error-file={self.error_file}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        # nbdkit writes the PID file only once it listens on the socket.
        deadline = time.monotonic() + timeout
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nbdkit did not start: {self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


@contextlib.contextmanager
def run_failing_storage(workdir: Path, image: Path, name: str = "nbd") -> Iterator[FailingStorage]:
    """nbdkit with the error filter; stopped and reaped on exit."""
    storage = FailingStorage(
        image, workdir / f"{name}.sock", workdir / f"{name}.fail", workdir / f"{name}.log"
    )
    try:
        storage.start()
        yield storage
    finally:
        storage.stop()


class QemuVM:
    """A running QEMU with its main QMP socket, an optional second monitor and debug console."""

    def __init__(
        self, proc: subprocess.Popen[bytes], qmp: Path, mon2: Path | None, debugcon: Path | None
    ) -> None:
        self.proc = proc
        self.qmp = qmp
        self.mon2 = mon2
        self.debugcon = debugcon

    def debug_output(self) -> str:
        if self.debugcon is None or not self.debugcon.exists():
            return ""
        return self.debugcon.read_text(errors="replace")


@contextlib.contextmanager
def run_vm(
    workdir: Path,
    args: Sequence[str],
    *,
    name: str = "testvm",
    second_monitor: bool = True,
    debugcon: bool = True,
) -> Iterator[QemuVM]:
    """QEMU with ``-qmp`` on ``workdir/vm.qmp``, a second QMP monitor on ``workdir/vm.mon2``
    and the debug console in ``workdir/debugcon.log``; killed and reaped on exit."""
    qmp = workdir / "vm.qmp"
    mon2 = workdir / "vm.mon2" if second_monitor else None
    dbg = workdir / "debugcon.log" if debugcon else None
    extra: list[str] = []
    if mon2 is not None:
        mon2.unlink(missing_ok=True)
        extra += monitor_args(mon2)
    if dbg is not None:
        extra += debugcon_args(dbg)
    with run_qemu(workdir, qmp, [*extra, *args], name=name) as proc:
        if mon2 is not None:
            wait_socket(mon2, proc)
        yield QemuVM(proc, qmp, mon2, dbg)
