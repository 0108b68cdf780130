"""Servers as a backend spells them, whichever source named them.

QMP and libvirt write one server differently (``10.0.0.5`` and ``10.0.0.5:10809``,
``[FD00::5]`` and ``fd00::5``); a backend is only useful if both give the same label, so every
host and port in a backend goes through here: hosts in lower case with IPv6 in brackets,
the protocol's default port added, several servers of one system sorted and bounded.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Monitors / servers kept in a backend (sorted), beyond which ``+N`` says how many more.
MAX_HOSTS = 4

#: Default ports, added when a source omits them so that QMP and libvirt spell a server alike.
_DEFAULT_PORTS = {
    "nbd": 10809,
    "iscsi": 3260,
    "rbd": 6789,
    "gluster": 24007,
    "ssh": 22,
    "http": 80,
    "https": 443,
    "ftp": 21,
    "ftps": 990,
}


def spell_host(host: str) -> str:
    """A host as a backend spells it: lower case; an IPv6 address in brackets."""
    host = host.strip().strip("[]").lower()
    return f"[{host}]" if ":" in host else host


def parse_port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def split_port(addr: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, ``host`` → (host, port or None)."""
    addr = addr.strip()
    if addr.startswith("["):
        end = addr.find("]")
        host, rest = addr[1:end], addr[end + 1 :]
        return host, parse_port(rest[1:]) if rest.startswith(":") else None
    if addr.count(":") == 1:
        host, _, port = addr.partition(":")
        return host, parse_port(port)
    return addr, None


def host_and_port(addr: str) -> tuple[str, int | None]:
    host, port = split_port(addr)
    return spell_host(host), port


def join_port(host: str, port: int | None, proto: str) -> str:
    host = spell_host(host) if host else host
    port = port or _DEFAULT_PORTS.get(proto)
    return f"{host}:{port}" if port else host


def host_port(addr: str, proto: str) -> str:
    host, port = split_port(addr)
    return join_port(host, port, proto)


def host_list(hosts: Iterable[str], proto: str) -> str:
    """Several servers of one system (Ceph monitors, Gluster servers) in one stable spelling:
    sorted, de-duplicated, at most `MAX_HOSTS`."""
    uniq = sorted({h if h.startswith("unix:") else host_port(h, proto) for h in hosts if h.strip()})
    text = ",".join(uniq[:MAX_HOSTS])
    if len(uniq) > MAX_HOSTS:
        text += f",+{len(uniq) - MAX_HOSTS}"
    return text
