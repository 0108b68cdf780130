"""A real libvirtd for tests: the daemon itself, domains on Debian's QEMU, storage that fails on demand.

The libvirt event source must be tested against what libvirtd really sends (event shapes,
reconnects, taints), so nothing here is simulated (facts in ``shared/docs/domain.md`` §4.1):

* `Libvirtd` runs ``virtlogd`` and ``libvirtd`` directly (no systemd on these machines): by
  default a daemon of the session's own in a private mount namespace (its own ``/run/libvirt``,
  ``/var/lib/libvirt``, ...; URI ``qemu+unix:///system?socket=...``), so test sessions sharing a
  machine never touch each other's daemon; with ``QIH_LIBVIRT_LAB=system`` the machine's
  ``qemu:///system`` (reused when it answers).  It can SIGKILL the daemon and start it again
  while domains keep running (QEMU is not libvirtd's child: it survives).
* `FailingStorage` (``tests.support.qemu``) is ``nbdkit`` on a free 127.0.0.1 port with the error filter: every request fails
  with EIO while its error file exists.
* `LabDomain` is a ``<domain type='qemu'>`` (TCG, 32 MiB, no graphics) whose boot disk is that NBD
  export holding the project's IO-loop boot sector (``tests/guest/bootsector.py``): SeaBIOS boots
  it, and the guest writes and reads a sector in a loop, so the disk errors as soon as the storage
  fails and recovers as soon as it is back.

Domain names carry this process's pid, the lab only ever touches its own domains, and it stops
a daemon only when it started it.  Waiting always polls a condition against a deadline; nothing
sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from tests.guest.bootsector import write_disk_image
from tests.support.binaries import require_binary, skip_or_fail
from tests.support.procs import read_pid
from tests.support.qemu import FailingStorage
from tests.support.waits import wait_until

URI = "qemu:///system"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
#: Every domain this process defines starts with this (several sessions may share one libvirtd).
NAME_PREFIX = f"qihlab{os.getpid()}-"
#: ``Domain id=3 is tainted: custom-monitor`` (libvirt's qemuDomainObjTaintMsg).
TAINT_RE = re.compile(r"Domain id=\d+ is tainted: (\S+)")


def virsh(*args: str, uri: str = URI, timeout: float = 30.0, check: bool = True) -> str:
    """Run ``virsh -c URI ARGS`` and return its stdout; raise with stderr when it fails."""
    cmd = [require_binary("virsh"), "-q", "-c", uri, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (killed, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def fix_kvm_permissions() -> None:
    """Make ``/dev/kvm`` group ``kvm`` 0660, as Debian's udev rule would.

    Left root-only 0600, libvirt (QEMU runs as ``libvirt-qemu``) sees the KVM capability as
    changed and re-probes QEMU at every ``define``: ~35 s each instead of 0.04 s.
    """
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return
    with contextlib.suppress(KeyError, PermissionError):
        shutil.chown(kvm, group="kvm")
        kvm.chmod(0o660)


#: The directories a libvirtd of its own sees in place of the system's (bind mounts in a private
#: mount namespace); ``etc`` and ``cache`` start as copies (configuration, probed QEMU capabilities).
PRIVATE_DIRS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
    "etc": "/etc/libvirt",
}


def ensure_mount_points() -> None:
    """Create the directories the private daemon binds over where they are missing.

    ``mount --bind`` needs its target to exist, and on a machine where no libvirtd ever ran
    ``/run/libvirt`` does not (the packages' daemon or systemd-tmpfiles makes it at its first
    start; ``/run`` is a tmpfs emptied at every boot).  An empty directory is all this adds to the
    host: nothing is ever written into it outside the private namespace.
    """
    for target in map(Path, PRIVATE_DIRS.values()):
        if not target.is_dir():
            target.mkdir(mode=0o755, parents=True)


class Libvirtd:
    """The libvirtd (and virtlogd) the tests talk to.

    Two modes:

    * private (default): a libvirtd of this session's own, in a private mount namespace where
      ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt`` and
      ``/etc/libvirt`` are directories under ``workdir``.  It is still the system-mode daemon
      (QEMU as ``libvirt-qemu``, the same code paths as ``qemu:///system``), reached through
      ``qemu+unix:///system?socket=WORKDIR/run/libvirt-sock``.  Several test sessions on one
      machine (developers, CI jobs) then never see, kill or stop each other's daemon.
    * system (``private=False``): the machine's ``qemu:///system``; a libvirtd that already
      answers is reused (never killed or stopped), else one is started and stopped here.

    ``owned`` is True while the running libvirtd is one this object started: only such a daemon
    is ever killed or stopped.
    """

    def __init__(self, workdir: Path, private: bool = True, keepalive: tuple[int, int] | None = None) -> None:
        self.workdir = workdir
        self.private = private
        #: libvirtd.conf's (keepalive_interval, keepalive_count) for a private daemon: it gives
        #: up a client that answers no keepalive for about interval x (count + 1) seconds.
        self.keepalive = keepalive
        self.root = workdir / "root"
        self.uri = f"qemu+unix:///system?socket={self.root / 'run' / 'libvirt-sock'}" if private else URI
        self.pid_file = workdir / "libvirtd.pid"
        self.log_file = workdir / "libvirtd.log"
        self.virtlogd_pid_file = workdir / "virtlogd.pid"
        self.owned = False
        self.started_virtlogd = False
        self.restarts = 0

    # --- where things are -----------------------------------------------------------------

    @property
    def qemu_log_dir(self) -> Path:
        """Where libvirt writes ``NAME.log`` (the QEMU command line, taints) for each domain."""
        return self.root / "log" / "qemu" if self.private else QEMU_LOG_DIR

    @property
    def qemu_run_dir(self) -> Path:
        """Where libvirt keeps ``NAME.pid`` and the live ``NAME.xml`` of running domains."""
        return self.root / "run" / "qemu" if self.private else QEMU_RUN_DIR

    # --- state ----------------------------------------------------------------------------

    def responsive(self, timeout: float = 10.0) -> bool:
        """One ``virsh version`` round trip succeeds (the daemon accepts and serves clients)."""
        try:
            virsh("version", uri=self.uri, timeout=timeout)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    @property
    def pid(self) -> int | None:
        """The pid of the libvirtd this object started (None when reused or not running)."""
        pid = read_pid(self.pid_file) if self.owned else None
        return pid if pid is not None and pid_alive(pid) else None

    def virtlogd_pid(self) -> int | None:
        pid = read_pid(self.virtlogd_pid_file) if self.started_virtlogd else None
        return pid if pid is not None and pid_alive(pid) else None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""

    # --- lifecycle ------------------------------------------------------------------------

    def ensure_running(self, timeout: float = 60.0) -> None:
        """Private: start our daemon.  System: reuse a libvirtd that answers, else start one."""
        fix_kvm_permissions()
        if not self.private and self.responsive(timeout=10.0):
            return
        self.start(timeout)

    def start(self, timeout: float = 60.0) -> None:
        """Start virtlogd (unless it runs) and libvirtd, and wait until libvirtd answers."""
        libvirtd = require_binary("libvirtd")
        virtlogd = require_binary("virtlogd")
        fix_kvm_permissions()
        if self.private:
            prefix = self._private_namespace(virtlogd)
        else:
            prefix = []
            if not self._virtlogd_running(Path("/run/libvirt/virtlogd-sock")):
                subprocess.run(
                    [virtlogd, "-d", "--pid-file", str(self.virtlogd_pid_file)],
                    check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                self.started_virtlogd = True
        env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{self.log_file}")
        # -d forks into the background once the daemon initialised; the parent's exit status
        # says whether that worked (e.g. not when another libvirtd holds the driver lock).
        proc = subprocess.run(
            [*prefix, libvirtd, "-d", "--pid-file", str(self.pid_file)],
            env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"libvirtd -d failed ({proc.returncode}): {proc.stderr}\n{self.log_tail()}")
        self.owned = True
        try:
            wait_until(
                lambda: self.responsive(timeout=10.0), timeout, "libvirtd to answer `virsh version`", 0.1
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def _private_namespace(self, virtlogd: str) -> list[str]:
        """Create the private mount namespace (once, held by our virtlogd) and return the
        command prefix that runs a program inside it."""
        pid = self.virtlogd_pid()
        if pid is None:
            self._prepare_root()
            ensure_mount_points()
            mounts = "".join(
                f"mount --bind {self.root / name} {target}\n" for name, target in PRIVATE_DIRS.items()
            )
            script = f"set -e\n{mounts}exec {virtlogd} -d --pid-file {self.virtlogd_pid_file}\n"
            # unshare makes every mount private first: nothing here propagates to the host.
            subprocess.run(
                [require_binary("unshare"), "--mount", "--propagation", "private", "sh", "-c", script],
                check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            self.started_virtlogd = True
            pid = wait_until(self.virtlogd_pid, 15, "virtlogd to write its pid file")
            wait_until(
                lambda: self._virtlogd_running(self.root / "run" / "virtlogd-sock"), 15, "virtlogd's socket"
            )
        return [require_binary("nsenter"), f"--mount=/proc/{pid}/ns/mnt", "--"]

    def _prepare_root(self) -> None:
        """Directories for the private daemon: fresh state, a copy of the configuration (without
        the host's domains) and of the probed QEMU capabilities (else the first define probes)."""
        for name in PRIVATE_DIRS:
            d = self.root / name
            if d.exists():
                continue
            if name in ("etc", "cache") and Path(PRIVATE_DIRS[name]).is_dir():
                shutil.copytree(PRIVATE_DIRS[name], d, symlinks=True)
            else:
                d.mkdir(parents=True)
            d.chmod(0o755)
        for pattern in ("qemu/*.xml", "qemu/autostart/*"):
            for path in (self.root / "etc").glob(pattern):
                path.unlink()
        if self.keepalive is not None:
            interval, count = self.keepalive
            with (self.root / "etc" / "libvirtd.conf").open("a") as f:
                f.write(f"\n# the lab's\nkeepalive_interval = {interval}\nkeepalive_count = {count}\n")
        for sub in ("qemu",):
            (self.root / "log" / sub).mkdir(exist_ok=True)

    def _kill_leftover_qemus(self) -> None:
        """SIGKILL QEMUs our private daemon started and could not destroy (it was wedged): they
        would otherwise outlive the session, holding the private namespace."""
        for pid_file in self.qemu_run_dir.glob("*.pid"):
            pid = read_pid(pid_file)
            if pid is None or not pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                if b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                    os.kill(pid, signal.SIGKILL)

    def _virtlogd_running(self, sock: Path) -> bool:
        """virtlogd's socket accepts a connection (a stale socket file refuses)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2.0)
            try:
                s.connect(str(sock))
            except OSError:
                return False
        return True

    def require_owned(self) -> None:
        """Skip (fail under CI) when libvirtd was started by someone else: never kill theirs."""
        if not self.owned:
            skip_or_fail(
                "the system libvirtd was already running when the tests started (not started by "
                "them): not killing someone else's daemon; use the private lab (the default)"
            )

    def kill(self, timeout: float = 15.0) -> int:
        """SIGKILL libvirtd (as a crash would) and wait until it is gone; domains keep running.

        Returns the killed pid.
        """
        self.require_owned()
        pid = self.pid
        if pid is None:
            raise RuntimeError("libvirtd is not running")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), timeout, f"libvirtd {pid} to exit")
        return pid

    def revive(self) -> None:
        """Start a daemon of ours again if a test killed it and did not restart it."""
        if self.owned and self.pid is None:
            self.start()
            self.restarts += 1

    def restart(self, timeout: float = 60.0) -> None:
        """Start libvirtd again after `kill`; it reconnects to the domains' monitors itself."""
        self.require_owned()
        self.start(timeout)
        self.restarts += 1

    def stop(self, timeout: float = 20.0) -> None:
        """Stop what this object started: libvirtd (SIGTERM, then SIGKILL), then virtlogd (with
        it the private namespace goes away)."""
        if self.owned:
            pid = self.pid
            if pid is not None:
                _terminate(pid, timeout)
            self.owned = False
            if self.private:
                self._kill_leftover_qemus()
        pid = self.virtlogd_pid()
        if pid is not None:
            _terminate(pid, timeout)
        self.started_virtlogd = False


def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not pid_alive(pid), timeout, f"process {pid} to exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), timeout, f"process {pid} to exit after SIGKILL")


@dataclass(frozen=True)
class DiskOptions:
    """The boot disk of a lab domain."""

    error_policy: str | None = "stop"  # <driver error_policy=...>; None: attribute left out
    rerror_policy: str | None = None
    alias: str | None = "ua-boot"  # user alias (must start with ua-); None: libvirt names it
    bus: str = "virtio"  # virtio (virtio-blk) or scsi (scsi-hd on a virtio-scsi controller)
    # <qemu:override> frontend properties for the boot disk (needs ``alias``), e.g.
    # {"werror": ("string", "report")}; taints the domain custom-device.
    override: tuple[tuple[str, str, str], ...] = ()


def boot_target(disk: DiskOptions) -> str:
    return "vda" if disk.bus == "virtio" else "sda"


def second_monitor_xml(socket: Path) -> str:
    """``<qemu:commandline>`` adding a QMP monitor at ``socket`` (docs/libvirt.md)."""
    return (
        "<qemu:commandline>"
        "<qemu:arg value='-chardev'/>"
        f"<qemu:arg value='socket,id=iohang,path={socket},server=on,wait=off'/>"
        "<qemu:arg value='-mon'/><qemu:arg value='chardev=iohang,mode=control'/>"
        "</qemu:commandline>"
    )


def retry_emulator(directory: Path) -> Path:
    """``tests/libvirt/retry_qemu.py`` where QEMU's user can run it, for ``<emulator>``: Debian's
    QEMU whose ``report`` errors libvirtd receives as openEuler's ``retry`` (see the script)."""
    path = directory / "retry-qemu"
    shutil.copyfile(Path(__file__).with_name("retry_qemu.py"), path)
    path.chmod(0o755)
    return path


def domain_xml(
    name: str,
    storage_port: int,
    disk: DiskOptions,
    second_disk: Path | None = None,
    memory_mib: int = 32,
    emulator: Path | None = None,
) -> str:
    """A ``<domain type='qemu'>`` (TCG) booting from the NBD export at 127.0.0.1:``storage_port``."""
    target = boot_target(disk)
    policy = "".join(
        f" {attr}={quoteattr(value)}"
        for attr, value in (("error_policy", disk.error_policy), ("rerror_policy", disk.rerror_policy))
        if value is not None
    )
    alias = f"<alias name={quoteattr(disk.alias)}/>" if disk.alias else ""
    controller = "<controller type='scsi' model='virtio-scsi'/>" if disk.bus == "scsi" else ""
    extra = ""
    if second_disk is not None:
        extra = (
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file={quoteattr(str(second_disk))}/><target dev='vdb' bus='virtio'/></disk>"
        )
    override = ""
    if disk.override:
        if not disk.alias:
            raise ValueError("<qemu:override> needs the disk's user alias")
        props = "".join(
            f"<qemu:property name={quoteattr(n)} type={quoteattr(t)} value={quoteattr(v)}/>"
            for n, t, v in disk.override
        )
        override = (
            f"<qemu:override><qemu:device alias={quoteattr(disk.alias)}><qemu:frontend>{props}"
            "</qemu:frontend></qemu:device></qemu:override>"
        )
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {f"<emulator>{emulator}</emulator>" if emulator is not None else ""}
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'{policy}/>
      <source protocol='nbd'><host name='127.0.0.1' port='{storage_port}'/></source>
      <target dev='{target}' bus='{disk.bus}'/>
      {alias}
    </disk>
    {extra}
    {controller}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='null'/>
  </devices>
  {override}
</domain>
"""


class LabDomain:
    """One defined and started domain with its failing storage."""

    def __init__(self, name: str, storage: FailingStorage, libvirtd: Libvirtd, xml: str, target: str) -> None:
        self.name = name
        self.storage = storage
        self.libvirtd = libvirtd
        self.xml = xml
        self.target = target  # the boot disk's <target dev>: vda (virtio) or sda (scsi)

    # --- control --------------------------------------------------------------------------

    def virsh(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        return virsh(*args, uri=self.libvirtd.uri, check=check, timeout=timeout)

    def fail_storage(self) -> None:
        self.storage.fail()

    def restore_storage(self) -> None:
        self.storage.recover()

    def resume(self) -> None:
        self.virsh("resume", self.name)

    def destroy(self) -> None:
        """Hard power-off (``virsh destroy``); no error when it is not running."""
        if self.is_active():
            self.virsh("destroy", self.name, check=False)

    def undefine(self) -> None:
        self.virsh("undefine", self.name, check=False)

    # --- observation ----------------------------------------------------------------------

    def is_active(self) -> bool:
        out = self.virsh("domstate", self.name, check=False).strip()
        return out not in ("", "shut off")

    def domstate(self) -> tuple[str, str]:
        """``virsh domstate --reason``: e.g. ("paused", "I/O error"), ("running", "unpaused")."""
        out = self.virsh("domstate", "--reason", self.name).strip()
        match = re.fullmatch(r"(.+?) \((.+)\)", out)
        return (match.group(1), match.group(2)) if match else (out, "")

    def wait_state(self, state: str, reason: str | None = None, timeout: float = 20.0) -> tuple[str, str]:
        def check() -> tuple[str, str] | None:
            current = self.domstate()
            return current if current[0] == state and reason in (None, current[1]) else None

        try:
            return wait_until(check, timeout, f"{self.name} to be {state} ({reason})", 0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; now {self.domstate()}; log:\n{self.log_text()[-2000:]}") from None

    def domid(self) -> int | None:
        out = self.virsh("domid", self.name, check=False).strip()
        return int(out) if out.isdigit() else None

    def uuid(self) -> str:
        return self.virsh("domuuid", self.name).strip()

    def qemu_pid(self) -> int | None:
        """QEMU's pid from libvirt's pid file (QEMU is not libvirtd's child)."""
        return read_pid(self.libvirtd.qemu_run_dir / f"{self.name}.pid")

    def dumpxml(self) -> str:
        return self.virsh("dumpxml", self.name)

    def blkstat(self, target: str | None = None) -> dict[str, int]:
        """``virsh domblkstat`` of a disk: rd_req, wr_req, rd_bytes, ..."""
        out = self.virsh("domblkstat", self.name, target or self.target)
        stats: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].lstrip("-").isdigit():
                stats[parts[1]] = int(parts[2])
        return stats

    def wait_io(self, more: int = 5, timeout: float = 30.0) -> dict[str, int]:
        """Wait until the guest completed ``more`` further writes (the guest runs and its disk
        works): the boot sector writes and reads a sector in a loop."""
        start = self.blkstat().get("wr_req", 0)

        def check() -> dict[str, int] | None:
            stats = self.blkstat()
            return stats if stats.get("wr_req", 0) >= start + more else None

        return wait_until(check, timeout, f"{self.name} to complete {more} writes", 0.1)

    def wait_injected_errors(self, more: int = 5, timeout: float = 30.0) -> int:
        """Wait until the storage failed ``more`` further requests of this guest."""
        start = self.storage.injected_errors()

        def check() -> int | None:
            count = self.storage.injected_errors()
            return count if count >= start + more else None

        return wait_until(check, timeout, f"{more} more injected errors on {self.name}'s storage", 0.05)

    @property
    def log_path(self) -> Path:
        return self.libvirtd.qemu_log_dir / f"{self.name}.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def taint_lines(self) -> list[str]:
        """The ``Domain id=N is tainted: REASON`` lines of the domain log (one per taint and run)."""
        return [line for line in self.log_text().splitlines() if TAINT_RE.search(line)]

    def taints(self) -> set[str]:
        """The taint reasons in the domain log, e.g. {"custom-monitor"}."""
        return {m.group(1) for line in self.taint_lines() if (m := TAINT_RE.search(line))}


class LibvirtLab:
    """Starts domains (and their nbdkit) for one test and removes all of it at teardown."""

    def __init__(self, libvirtd: Libvirtd, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.libvirtd = libvirtd
        self.workdir = workdir
        self._stack = stack
        self.domains: list[LabDomain] = []
        self._count = 0

    def new_name(self, hint: str = "vm") -> str:
        self._count += 1
        return f"{NAME_PREFIX}{hint}{self._count}"

    def storage(self, name: str, pause_us: int = 20_000) -> FailingStorage:
        """The boot image (IO-loop boot sector) behind nbdkit with the error filter."""
        image = write_disk_image(self.workdir / f"{name}.img", pause_us=pause_us)
        # On TCP: QEMU runs as libvirt-qemu, which could not reach a socket under our directory.
        storage = FailingStorage(image, self.workdir / f"{name}.fail", self.workdir / f"{name}.nbdkit.log")
        self._stack.callback(storage.stop)  # registered first: stopped after the domain is gone
        storage.start()
        return storage

    def domain(
        self,
        disk: DiskOptions = DiskOptions(),  # frozen: a shared default is safe
        *,
        hint: str = "vm",
        second_disk: bool = False,
        start: bool = True,
        wait_booted: bool = True,
        pause_us: int = 20_000,
        qmp_monitor: Path | None = None,
        emulator: Path | None = None,
    ) -> LabDomain:
        """Define (and start) a domain booting the IO-loop guest from failing NBD storage.

        ``second_disk`` adds a local 1 MiB raw file as ``vdb`` (no error policy).  With
        ``wait_booted`` this returns once the guest has completed writes on its boot disk.
        ``qmp_monitor`` gives QEMU a second QMP monitor at that path (``<qemu:commandline>``,
        docs/libvirt.md; the domain is tainted ``custom-argv``); its directory must let
        libvirt-qemu create the socket.  ``emulator`` replaces QEMU (`retry_emulator`).
        """
        name = self.new_name(hint)
        storage = self.storage(name, pause_us)
        data = None
        if second_disk:
            data = self.workdir / f"{name}-data.img"
            with data.open("wb") as f:
                f.truncate(1 << 20)
            data.chmod(0o666)  # QEMU runs as libvirt-qemu (libvirt may also chown it)
        xml = domain_xml(name, storage.port, disk, data, emulator=emulator)
        if qmp_monitor is not None:
            xml = xml.replace("</domain>", second_monitor_xml(qmp_monitor) + "</domain>")
        xml_path = self.workdir / f"{name}.xml"
        xml_path.write_text(xml)
        dom = LabDomain(name, storage, self.libvirtd, xml, boot_target(disk))
        self._stack.callback(self._remove, dom)
        self.domains.append(dom)
        dom.virsh("define", str(xml_path))
        if start:
            self.start(dom, wait_booted)
        return dom

    def start(self, dom: LabDomain, wait_booted: bool = True) -> None:
        dom.virsh("start", dom.name)
        if wait_booted:
            dom.wait_io()

    def _remove(self, dom: LabDomain) -> None:
        """Destroy and undefine ``dom`` (also after a failed test; libvirtd may have been killed
        by that test, then it is started again first)."""
        with contextlib.suppress(Exception):
            self.libvirtd.revive()
        dom.restore_storage()
        with contextlib.suppress(Exception):
            dom.destroy()
        with contextlib.suppress(Exception):
            dom.undefine()
        with contextlib.suppress(FileNotFoundError, PermissionError):
            dom.log_path.unlink()


@contextlib.contextmanager
def lab_workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory QEMU (user libvirt-qemu) can traverse; removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def foreign_domains(uri: str) -> list[str]:
    """Domains on the daemon that this process did not define (another session's, or a user's)."""
    try:
        names = virsh("list", "--all", "--name", uri=uri, timeout=15).split()
    except (RuntimeError, subprocess.TimeoutExpired):
        return []
    return [n for n in names if not n.startswith(NAME_PREFIX)]


def private_lab_wanted() -> bool:
    """``QIH_LIBVIRT_LAB=system`` uses the machine's ``qemu:///system``; default: a private daemon."""
    mode = os.environ.get("QIH_LIBVIRT_LAB", "private")
    if mode not in ("private", "system"):
        raise ValueError(f"QIH_LIBVIRT_LAB={mode!r}: expected 'private' or 'system'")
    return mode == "private"


@contextlib.contextmanager
def running_libvirtd(
    workdir: Path, private: bool | None = None, keepalive: tuple[int, int] | None = None
) -> Iterator[Libvirtd]:
    """A libvirtd for the whole session (see `Libvirtd` for the two modes), stopped at the end
    when started here.

    A system daemon started here is left running at the end only when it holds domains of
    others (another session on the same machine reusing it).
    """
    for name in ("libvirtd", "virtlogd"):
        require_binary(name)
    for name in ("virsh", "nbdkit", "qemu-system-x86_64", "unshare", "nsenter"):
        require_binary(name)
    daemon = Libvirtd(
        workdir, private=private_lab_wanted() if private is None else private, keepalive=keepalive
    )
    try:
        daemon.ensure_running()
        yield daemon
    finally:
        try:
            with contextlib.suppress(Exception):
                daemon.revive()
            with contextlib.suppress(Exception):  # a wedged daemon must not keep it running
                for name in virsh("list", "--all", "--name", uri=daemon.uri, timeout=15).split():
                    if name.startswith(NAME_PREFIX):  # a test's cleanup failed: still ours
                        virsh("destroy", name, uri=daemon.uri, check=False, timeout=15)
                        virsh("undefine", name, uri=daemon.uri, check=False, timeout=15)
        finally:
            if daemon.private or not foreign_domains(daemon.uri):
                daemon.stop()
