"""A real QEMU (Debian qemu-system-x86; no guest OS needed, domain.md §5) and nbdkit storage
that fails on demand, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import functools
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.binaries import require_binary
from tests.support.procs import free_port, read_pid, stop_process
from tests.support.waits import wait_until

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
    """Wait until QEMU created ``path``; RuntimeError when QEMU exits first."""

    def there() -> bool:
        if proc.poll() is not None:
            stderr = proc.stderr.read() if proc.stderr else b""
            raise RuntimeError(f"qemu exited with {proc.returncode}: {stderr!r}")
        return path.exists()

    wait_until(there, timeout, f"{path} to appear", step=0.02)


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
        stop_process(proc, signal.SIGKILL)
        if proc.stderr:
            proc.stderr.close()


def blank_image(path: Path, size: int = 1 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


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


def _listening_or_exited(proc: subprocess.Popen[bytes], pid_file: Path) -> bool:
    return proc.poll() is not None or read_pid(pid_file) is not None


class FailingStorage:
    """nbdkit serving a raw image through the error filter: EIO on every request while
    ``error_file`` exists (domain.md §5).

    It listens on the unix socket ``socket_path``, or (None) on a free 127.0.0.1 TCP port
    (`port`), which a QEMU running as another user (libvirt's) can reach too."""

    def __init__(
        self, image: Path, error_file: Path, log_path: Path, socket_path: Path | None = None
    ) -> None:
        self.image = image
        self.error_file = error_file
        self.log_path = log_path
        self.socket = socket_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def blockdev_arg(self, node_name: str = "nbd0") -> str:
        assert self.socket is not None, "a TCP export: QEMU reaches it by port"
        return f"driver=nbd,node-name={node_name},server.type=unix,server.path={self.socket}"

    def fail(self) -> None:
        self.error_file.touch()

    def recover(self) -> None:
        self.error_file.unlink(missing_ok=True)

    @property
    def failing(self) -> bool:
        return self.error_file.exists()

    def injected_errors(self) -> int:
        """How many requests the error filter failed so far (it logs each one)."""
        return self.log().count("injecting EIO error")

    def start(self, timeout: float = 15.0, attempts: int = 5) -> None:
        """Listen; on TCP, another process taking the free port first means another try."""
        nbdkit = require_binary("nbdkit")
        pid_file = self.log_path.with_suffix(".pid")
        for _ in range(attempts):
            if self.socket is not None:
                self.socket.unlink(missing_ok=True)
                listen = ["-U", str(self.socket)]
            else:
                self.port = free_port()
                listen = ["-i", "127.0.0.1", "-p", str(self.port)]
            pid_file.unlink(missing_ok=True)
            with self.log_path.open("wb") as log:
                self.proc = proc = subprocess.Popen(
                    [nbdkit, "-f", "--exit-with-parent", *listen, "-P", str(pid_file), "--filter=error",
                     "file", str(self.image), "error-rate=100%", f"error-file={self.error_file}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            # nbdkit writes its PID file only once it listens.
            wait_until(functools.partial(_listening_or_exited, proc, pid_file), timeout, "nbdkit to listen")
            if proc.poll() is None:
                return
            if self.socket is not None or "Address already in use" not in self.log():
                raise RuntimeError(f"nbdkit exited with {proc.returncode}: {self.log()[-2000:]}")
        raise RuntimeError(f"nbdkit found no free port in {attempts} attempts: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def run_failing_storage(workdir: Path, image: Path, name: str = "nbd") -> Iterator[FailingStorage]:
    """nbdkit with the error filter; stopped and reaped on exit."""
    storage = FailingStorage(
        image, workdir / f"{name}.fail", workdir / f"{name}.log", workdir / f"{name}.sock"
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
