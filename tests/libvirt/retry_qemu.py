#!/usr/bin/python3
"""A QEMU for lab domains whose failed requests libvirtd hears as openEuler's retry policy.

Debian's QEMU has no ``werror=retry`` (``shared/docs/domain.md`` §2), yet what the libvirt source
must survive (issue 26) is a continuous retry hang seen through a real libvirtd: one
``BLOCK_IO_ERROR`` with ``action: "retry"`` per failed attempt, forwarded to the exporter, while
libvirtd itself logs "unknown disk io error action 'retry'" per event and keeps the domain
running (§4.1: exactly what openEuler QEMU 8.2 under libvirt 9.0 does).  So this script is the
domain's ``<emulator>``: it runs the real QEMU with a ``report``-policy disk (the guest gets the
error and retries in its IO loop, one event per attempt, as QEMU's retry would) and sits on
QEMU's monitor, passing everything through unchanged except the ``action`` of
``BLOCK_IO_ERROR``, which libvirtd receives as ``"retry"``.

How: libvirt 9.0 hands QEMU its monitor as a listening socket (``-chardev
socket,id=charmonitor,fd=N,server=on,wait=off``, then connects to it).  This script gives QEMU one
end of a socketpair instead, keeps the listening socket, and a (double-forked) child accepts
libvirtd on it and relays both ways, file descriptors passed along (``SCM_RIGHTS``).  The script
then execs QEMU itself, so the pid libvirt records and signals is QEMU's.  Anything else
(libvirt probing the binary's capabilities) execs QEMU unchanged.  Standard library only: it
runs as ``libvirt-qemu`` under the system Python.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

QEMU = "/usr/bin/qemu-system-x86_64"
_EVENT = b'"event": "BLOCK_IO_ERROR"'
_REPORT, _RETRY = b'"action": "report"', b'"action": "retry"'


def monitor(args: list[str]) -> tuple[int, int] | None:
    """(index in ``args``, fd) of libvirt's monitor chardev given as a listening socket."""
    for i, arg in enumerate(args):
        if arg.startswith("socket,id=charmonitor,"):
            opts = dict(o.split("=", 1) for o in arg.split(",") if "=" in o)
            if "fd" in opts:
                return i, int(opts["fd"])
    return None


def rewrite(line: bytes) -> bytes:
    return line.replace(_REPORT, _RETRY) if _EVENT in line else line


def relay(listener: socket.socket, qemu: socket.socket) -> None:
    """Accept libvirtd once; relay until either side closes."""
    client, _ = listener.accept()
    listener.close()
    sel = selectors.DefaultSelector()
    sel.register(client, selectors.EVENT_READ)
    sel.register(qemu, selectors.EVENT_READ)
    partial = b""
    while True:
        for key, _ in sel.select():
            if key.fileobj is client:
                data, fds, _flags, _addr = socket.recv_fds(client, 65536, 16)
                if not data:
                    return
                if fds:
                    socket.send_fds(qemu, [data], fds)
                    for fd in fds:
                        os.close(fd)
                else:
                    qemu.sendall(data)
            else:
                data = qemu.recv(65536)
                if not data:
                    return
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                if lines:
                    client.sendall(b"".join(rewrite(line) + b"\n" for line in lines))


def main() -> None:
    args = sys.argv[1:]
    found = monitor(args)
    if found is None:
        os.execv(QEMU, [QEMU, *args])
    i, listen_fd = found
    ours, theirs = socket.socketpair()
    if os.fork() == 0:  # the relay, detached (double fork): QEMU never has to reap it
        if os.fork() == 0:
            theirs.close()
            try:
                relay(socket.socket(fileno=listen_fd), ours)
            finally:
                os._exit(0)
        os._exit(0)
    os.wait()
    ours.close()
    os.close(listen_fd)
    os.set_inheritable(theirs.fileno(), True)
    args[i] = f"socket,id=charmonitor,fd={theirs.fileno()}"
    os.execv(QEMU, [QEMU, *args])


if __name__ == "__main__":
    main()
