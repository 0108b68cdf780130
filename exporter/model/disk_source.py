"""A disk's `DiskSource` from what QEMU or libvirt says about it.

QMP names a disk's storage by a QEMU block file name (``nbd://h:10809/e``, ``rbd:pool/img:...``,
``json:{...}`` open options, a path); libvirt by a ``<disk>``'s ``<source>``.  Both lead here
to one `DiskSource` per storage system, spelled alike (`exporter.model.addresses`), so a disk has
the same backend whichever source watches it.  Credentials in QEMU file names (an RBD
``key=``, a URL's user and password, a ``json:`` ``password-secret``) never reach a result.
"""

from __future__ import annotations

import json
import posixpath
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from exporter.model.addresses import (
    host_and_port,
    host_list,
    host_port,
    join_port,
    parse_port,
    spell_host,
    split_port,
)
from exporter.model.backend import MAX_SOURCE, UNKNOWN, DiskSource, clip

#: QEMU block drivers that are formats or filters: the data lives in their ``file`` child.
_LAYER_DRIVERS = frozenset(
    {
        "raw",
        "qcow2",
        "qcow",
        "qed",
        "vmdk",
        "vdi",
        "vhdx",
        "vpc",
        "parallels",
        "bochs",
        "cloop",
        "dmg",
        "luks",
        "throttle",
        "copy-on-read",
        "preallocate",
        "compress",
        "blklogwrites",
        "snapshot-access",
        "copy-before-write",
    }
)


def _clip_source(text: str) -> str:
    return clip(text, MAX_SOURCE)


# --- sources from QMP -------------------------------------------------------------------


def source_from_query_block(inserted: Mapping[str, Any]) -> DiskSource:
    """The source of a ``query-block`` entry's ``inserted``: its ``file`` (QEMU's filename of
    the top node: ``nbd://h:10809/e``, ``/path``, ``json:{...}``...), else ``image.filename``."""
    name = inserted.get("file")
    if not isinstance(name, str) or not name:
        image = inserted.get("image")
        name = image.get("filename") if isinstance(image, Mapping) else None
    if not isinstance(name, str) or not name:
        return DiskSource(text="")
    return source_from_filename(name)


def source_from_filename(name: str) -> DiskSource:
    """The source of a QEMU block filename (``bdrv_refresh_filename``'s spellings, and the legacy
    ``-drive file=`` pseudo-protocols ``nbd:``, ``rbd:``)."""
    name = name.strip()
    if name.startswith("json:"):
        try:
            doc = json.loads(name[5:])
        except ValueError:
            return DiskSource(text="json:", backend=UNKNOWN)
        return (
            source_from_options(doc) if isinstance(doc, dict) else DiskSource(text="json:", backend=UNKNOWN)
        )
    if name.startswith("/"):
        path = posixpath.normpath(name)
        return DiskSource(text=path, path=path)
    if name.startswith("rbd:"):
        return _rbd_legacy(name[4:])
    if name.startswith("nbd:") and not name.startswith("nbd://"):
        return _nbd_legacy(name[4:])
    if "://" in name:
        return _from_url(name)
    # A relative path (QEMU keeps -drive file=disk.img as given): its directory is unknown.
    return DiskSource(text=_clip_source(name), path=name)


def _from_url(url: str) -> DiskSource:
    if url.startswith("nvme://"):  # a PCI address, not host:port
        ctrl, _, ns = url[7:].partition("/")
        return DiskSource(text=_clip_source(f"nvme://{ctrl}/{ns}"), backend=clip(f"nvme://{ctrl}"))
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        return DiskSource(text=_clip_source(url.split("://", 1)[0] + "://"), backend=UNKNOWN)
    scheme = u.scheme.lower()
    proto, _, transport = scheme.partition("+")
    host = spell_host(u.hostname or "")
    path = urllib.parse.unquote(u.path)
    query = urllib.parse.parse_qs(u.query)
    if proto == "nbd":
        export = path.lstrip("/")
        if transport == "unix" or "socket" in query:
            sock = query.get("socket", [""])[0]
            return _nbd(unix=sock, export=export)
        return _nbd(host=host, port=port, export=export)
    if proto == "iscsi":
        iqn, _, lun = path.strip("/").partition("/")
        return _iscsi(join_port(host, port, "iscsi"), iqn, lun)
    if proto == "gluster":
        if transport == "unix":
            sock = query.get("socket", [""])[0]
            server = f"unix:{sock}"
        else:
            server = join_port(host, port, "gluster")
        vol, _, image = path.strip("/").partition("/")
        return _grouped("gluster", server, vol, image)
    if proto == "nfs":
        # QEMU's libnfs URL does not tell the export from the path below it: the server is all.
        return DiskSource(text=_clip_source(f"nfs://{host}{path}"), backend=f"nfs://{host}")
    # ssh, http(s), ftp(s), sheepdog, vxhs...: the server is what fails.
    server = join_port(host, port, proto)
    return DiskSource(text=_clip_source(f"{proto}://{server}{path}"), backend=f"{proto}://{server}")


def _nbd(*, host: str = "", port: int | None = None, unix: str = "", export: str = "") -> DiskSource:
    """NBD: the server (TCP address or unix socket).  An NBD export is one block device, that is
    one disk, so it is not part of the backend."""
    if unix:
        server = posixpath.normpath(unix)
        backend = f"nbd+unix:{server}"
    else:
        server = join_port(host, port, "nbd")
        backend = f"nbd://{server}"
    text = backend
    if export:
        text += f"?export={export}" if unix else f"/{export}"
    return DiskSource(text=_clip_source(text), backend=backend)


def _iscsi(portal: str, iqn: str, lun: str) -> DiskSource:
    """iSCSI: the portal and the target; the LUN is the disk."""
    backend = f"iscsi://{portal}/{iqn}" if iqn else f"iscsi://{portal}"
    return DiskSource(text=_clip_source(backend + (f"/{lun}" if lun else "")), backend=backend)


def _grouped(proto: str, servers: str, group: str, image: str) -> DiskSource:
    """Servers plus a pool or volume: RBD and GlusterFS; the image is the disk."""
    backend = f"{proto}://{servers}/{group}" if group else f"{proto}://{servers}"
    return DiskSource(text=_clip_source(backend + (f"/{image}" if image else "")), backend=backend)


def _rbd(pool: str, image: str, mons: Iterable[str], conf: str | None) -> DiskSource:
    """RBD: the cluster (its monitors, else the ceph.conf naming them) and the pool."""
    mon_list = [m for m in mons if m]
    servers = f"conf={posixpath.normpath(conf)}" if conf else "ceph"
    if mon_list:
        servers = host_list(mon_list, "rbd")
    return _grouped("rbd", servers, pool, image)


def _rbd_legacy(spec: str) -> DiskSource:
    """``rbd:pool[/ns]/image[@snap][:opt=value...]`` with ``\\:`` escapes (QEMU's rbd_parse_filename)."""
    fields = _split_escaped(spec, ":")
    names = fields[0]
    pool, _, rest = names.partition("/")
    image = rest.rpartition("/")[2].partition("@")[0]
    opts: dict[str, str] = {}
    for f in fields[1:]:
        k, _, v = f.partition("=")
        opts[k.strip()] = v
    mons = re.split(r"[;, ]+", opts.get("mon_host", opts.get("mon_addr", "")))
    return _rbd(pool, image, (_mon(m) for m in mons), opts.get("conf"))


def _mon(addr: str) -> str:
    """A Ceph monitor address (``h``, ``h:port``, ``[v6]:port``, ``v2:h:3300/0``) as host:port."""
    addr = re.sub(r"^v[12]:", "", addr.strip()).split("/")[0]
    return host_port(addr, "rbd") if addr else ""


def _split_escaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` except where a backslash escapes it (QEMU's rbd option syntax)."""
    out, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _nbd_legacy(spec: str) -> DiskSource:
    """``nbd:unix:/sock[:exportname=e]`` or ``nbd:host:port[:exportname=e]``."""
    bits = spec.split(":exportname=", 1)
    export = bits[1] if len(bits) > 1 else ""
    addr = bits[0]
    if addr.startswith("unix:"):
        return _nbd(unix=addr[5:], export=export)
    host, port = split_port(addr)
    return _nbd(host=spell_host(host), port=port, export=export)


def source_from_options(opts: Mapping[str, Any]) -> DiskSource:
    """The source of a ``json:{...}`` filename: QEMU's open options, nested or flattened
    (``"server.host"``), with format and filter layers followed down their ``file`` child."""
    node: Mapping[str, Any] = _crumple(opts)
    for _depth in range(16):
        driver = str(node.get("driver", ""))
        child = node.get("file")
        if driver in _LAYER_DRIVERS or (not driver and child is not None):
            if isinstance(child, Mapping):
                node = child
                continue
            if isinstance(child, str):
                return source_from_filename(child)
            return DiskSource(text=f"json:{driver}", backend=UNKNOWN)
        return _from_driver(driver, node)
    return DiskSource(text="json:", backend=UNKNOWN)


def _from_driver(driver: str, o: Mapping[str, Any]) -> DiskSource:
    if driver in ("file", "host_device", "host_cdrom"):
        filename = o.get("filename")
        return (
            source_from_filename(filename)
            if isinstance(filename, str)
            else DiskSource(text=driver, backend=UNKNOWN)
        )
    if driver == "nbd":
        server = _mapping(o.get("server"))
        export = str(o.get("export", "") or "")
        path = server.get("path") or o.get("path")
        if server.get("type") == "unix" or path:
            return _nbd(unix=str(path or ""), export=export)
        return _nbd(
            host=spell_host(str(server.get("host", o.get("host", "")))),
            port=parse_port(server.get("port", o.get("port"))),
            export=export,
        )
    if driver == "rbd":
        servers = o.get("server")
        mons = [
            join_port(spell_host(str(s.get("host", ""))), parse_port(s.get("port")), "rbd")
            for s in (servers if isinstance(servers, list) else [])
            if isinstance(s, Mapping) and s.get("host")
        ]
        conf = o.get("conf")
        return _rbd(
            str(o.get("pool", "")), str(o.get("image", "")), mons, conf if isinstance(conf, str) else None
        )
    if driver == "iscsi":
        portal = str(o.get("portal", ""))
        host, port = split_port(portal)
        return _iscsi(
            join_port(spell_host(host), port, "iscsi"), str(o.get("target", "")), str(o.get("lun", ""))
        )
    if driver == "gluster":
        servers = o.get("server")
        hosts = []
        for s in servers if isinstance(servers, list) else []:
            if not isinstance(s, Mapping):
                continue
            if s.get("type") == "unix":
                hosts.append(f"unix:{s.get('path', '')}")
            elif s.get("host"):
                hosts.append(join_port(spell_host(str(s["host"])), parse_port(s.get("port")), "gluster"))
        return _grouped(
            "gluster",
            host_list(hosts, "gluster"),
            str(o.get("volume", "")),
            str(o.get("path", "")).strip("/"),
        )
    if driver == "nfs":
        server = _mapping(o.get("server"))
        host = spell_host(str(server.get("host", "")))
        return DiskSource(text=_clip_source(f"nfs://{host}{o.get('path', '')}"), backend=f"nfs://{host}")
    if driver == "ssh":
        server = _mapping(o.get("server"))
        srv = join_port(spell_host(str(server.get("host", ""))), parse_port(server.get("port")), "ssh")
        return DiskSource(text=_clip_source(f"ssh://{srv}{o.get('path', '')}"), backend=f"ssh://{srv}")
    if driver in ("http", "https", "ftp", "ftps"):
        url = o.get("url")
        return _from_url(url) if isinstance(url, str) else DiskSource(text=driver, backend=driver)
    if driver == "nvme":
        dev = str(o.get("device", ""))
        return DiskSource(
            text=_clip_source(f"nvme://{dev}/{o.get('namespace', '')}"), backend=f"nvme://{dev}"
        )
    # quorum, blkverify, null-co, vvfat...: no single storage to name; the driver says what it is.
    return DiskSource(text=f"json:{driver}", backend=driver or UNKNOWN)


def _crumple(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened QEMU options (``{"server.host": "h", "server.0.host": ...}``) nested again, as
    QEMU's ``qdict_crumple``: numbered keys become lists."""
    out: dict[str, Any] = {}
    for key, value in opts.items():
        v = _crumple(value) if isinstance(value, Mapping) else value
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = v
    crumpled = _listify(out)
    return crumpled if isinstance(crumpled, dict) else {}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        value = {k: _listify(v) for k, v in value.items()}
        if value and all(k.isascii() and k.isdigit() for k in value):  # QEMU: ASCII only
            return [value[k] for k in sorted(value, key=int)]
    elif isinstance(value, list):
        return [_listify(v) for v in value]
    return value


# --- sources from libvirt ---------------------------------------------------------------


def source_from_libvirt(
    kind: str,
    protocol: str | None,
    hosts: Sequence[str],
    name: str | None,
    path: str | None,
    pool: str | None,
) -> DiskSource:
    """The source of a libvirt ``<disk>``'s ``<source>`` (see `exporter.libvirt.domxml.DiskSource`):
    the same backend QMP's file name gives for the same storage."""
    if protocol is not None:
        proto = protocol.lower()
        servers = [h for h in hosts if h]
        name = (name or "").strip("/")
        if proto == "nbd":
            unix = next((h[5:] for h in servers if h.startswith("unix:")), "")
            if unix:
                return _nbd(unix=unix, export=name)
            host, port = split_port(servers[0]) if servers else ("", None)
            return _nbd(host=spell_host(host), port=port, export=name)
        if proto == "rbd":
            pool_name, _, image = name.partition("/")
            mons = [join_port(*host_and_port(h), "rbd") for h in servers]
            return _rbd(pool_name, image.rpartition("/")[2], mons, None)
        if proto == "iscsi":
            iqn, _, lun = name.partition("/")
            portal = join_port(*host_and_port(servers[0]), "iscsi") if servers else ""
            return _iscsi(portal, iqn, lun)
        if proto == "gluster":
            vol, _, image = name.partition("/")
            hs = [h if h.startswith("unix:") else join_port(*host_and_port(h), "gluster") for h in servers]
            return _grouped("gluster", host_list(hs, "gluster"), vol, image)
        server = join_port(*host_and_port(servers[0]), proto) if servers else ""
        if proto == "nfs":
            return DiskSource(text=_clip_source(f"nfs://{server}/{name}"), backend=f"nfs://{server}")
        return DiskSource(text=_clip_source(f"{proto}://{server}/{name}"), backend=f"{proto}://{server}")
    if pool is not None:
        # A libvirt storage pool is one storage system (one NFS export, iSCSI target, VG...).
        return DiskSource(text=f"pool:{pool}", backend=clip(f"pool:{pool}"))
    if path:
        if kind == "vhostuser":
            return DiskSource(text=_clip_source(path), backend=clip(f"vhostuser:{path}"))
        norm = posixpath.normpath(path) if path.startswith("/") else path
        return DiskSource(text=_clip_source(norm), path=norm)
    return DiskSource(text=kind, backend=kind if kind in ("nvme",) else UNKNOWN)
