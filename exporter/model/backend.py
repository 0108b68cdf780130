"""A disk's storage *backend*: what fails together, derived from what QEMU or libvirt says.

When disks start hanging the operator's first question is "is it the storage?": one NBD
server, one Ceph pool, one iSCSI target, one NFS export, one SAN LUN.  The ``backend`` label
names that shared part -- protocol, server (portal, monitors) and pool/export/target -- and
never the image or file name, so the label has as many values as a host has storage systems,
not as many as it has disks.  docs/metrics.md ("Storage backends") lists every rule with
examples.

Everything here is pure: the mount table (`parse_mountinfo`) and the operator's rules
(`BackendRule`) are passed in as data; reading ``/proc/self/mountinfo`` is the caller's job
(`exporter.storage`).  Credentials in QEMU file names (an RBD ``key=``, a URL's user and
password, a ``json:`` ``password-secret``) never reach a result.
"""

from __future__ import annotations

import json
import posixpath
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Longest backend label value; longer derivations are cut (an ``…`` marks the cut).
MAX_BACKEND = 128
#: Longest source text kept for rule matching.
MAX_SOURCE = 1024
#: Monitors / servers kept in a backend (sorted), beyond which ``+N`` says how many more.
MAX_HOSTS = 4
#: The backend when nothing can be told (no file name, a relative path, an unreadable mount table).
UNKNOWN = "unknown"

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
#: Filesystems whose mount source names a network server (mount source → backend).
_NET_FS = {
    "nfs": "nfs",
    "nfs4": "nfs",
    "cifs": "cifs",
    "smb3": "cifs",
    "glusterfs": "gluster",
    "fuse.glusterfs": "gluster",
    "ceph": "cephfs",
    "fuse.ceph-fuse": "cephfs",
    "fuse.sshfs": "ssh",
    "9p": "9p",
    "virtiofs": "virtiofs",
}
#: Memory-backed filesystems: whatever is on them fails with the host, not with a storage system.
_MEMORY_FS = frozenset({"tmpfs", "ramfs", "devtmpfs"})
#: Directories under /dev that are not an LVM volume group's.
_DEV_DIRS = frozenset(
    {
        "disk",
        "mapper",
        "block",
        "md",
        "fdset",
        "bus",
        "char",
        "cpu",
        "dri",
        "input",
        "net",
        "pts",
        "shm",
        "snd",
        "vfio",
        "zvol",
        "hugepages",
        "mqueue",
        "bsg",
        "nvme-fabrics",
        "drbd",
    }
)
_PARTITION = (
    re.compile(r"^(/dev/(?:[shv]d[a-z]+|xvd[a-z]+))\d+$"),
    re.compile(r"^(/dev/(?:nvme\d+n\d+|mmcblk\d+|loop\d+|nbd\d+|md\d+|rbd\d+))p\d+$"),
)
#: ``ip-<portal>-iscsi-<iqn>-lun-<n>`` under /dev/disk/by-path (udev's iSCSI names).
_ISCSI_BY_PATH = re.compile(r"^ip-(.+)-iscsi-(iqn\..+|eui\..+|naa\..+)-lun-\d+$")
#: A device-mapper name LVM made: ``<vg>-<lv>`` with dashes inside names doubled.
_LVM_DM = re.compile(r"^((?:[^-]|--)+)-((?:[^-]|--)+)$")


@dataclass(frozen=True)
class Source:
    """What a disk reads and writes, without credentials.

    ``text`` is the canonical, source-independent description that operator rules match
    (``nbd://10.0.0.5:10809/vm1``, ``rbd://mon1:6789/pool/image``, ``/var/lib/img/vm.qcow2``);
    it may name the image.  ``backend`` is what fails together for network storage; for a local
    path it is ``None`` and ``path`` is set: the backend then comes from the mount table.
    """

    text: str
    backend: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where a filesystem is mounted and from what."""

    mount_point: str
    fstype: str
    source: str


@dataclass(frozen=True)
class BackendRule:
    """An operator rule: a source (or derived backend) matching ``pattern`` has backend ``name``.

    ``pattern`` must match the whole text.  ``name`` may use the pattern's groups (``\\1``,
    ``\\g<site>``), so one rule can name many SAN arrays after a part of their device names.
    """

    pattern: re.Pattern[str]
    name: str

    def apply(self, text: str) -> str | None:
        m = self.pattern.fullmatch(text)
        return None if m is None else m.expand(self.name)


def clip(text: str, limit: int = MAX_BACKEND) -> str:
    """``text`` as a bounded label value: control characters replaced, at most ``limit`` long."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the backend ------------------------------------------------------------------------


def derive_backend(source: Source, mounts: Sequence[Mount] = (), rules: Sequence[BackendRule] = ()) -> str:
    """The backend label of a disk whose data lives at ``source``.

    The first rule whose pattern matches the source text, or else the backend derived without
    rules, decides; a rule's result is used as written.  Without a rule: network sources have
    their own backend, block devices name their volume group, iSCSI target or whole disk, and
    files the filesystem they are on (`mount_backend`).
    """
    default = _default_backend(source, mounts)
    for rule in rules:
        for text in (source.text, default):
            named = rule.apply(text)
            if named:
                return clip(named)
    return clip(default)


def _default_backend(source: Source, mounts: Sequence[Mount]) -> str:
    if source.backend is not None:
        return source.backend
    path = source.path
    if path is None or not path.startswith("/"):
        return UNKNOWN
    if path.startswith("/dev/"):
        return block_backend(path)
    mount = mount_of(path, mounts)
    return UNKNOWN if mount is None else mount_backend(mount)


def block_backend(dev: str) -> str:
    """The backend of a block device path: what else fails when it does.

    ``/dev/disk/by-path/ip-P-iscsi-IQN-lun-N`` → ``iscsi://P/IQN``; an LVM volume
    (``/dev/VG/LV``, ``/dev/mapper/VG-LV``) → ``lvm:VG``; a ZFS volume → ``zfs:POOL``; a
    partition → its whole disk (``/dev/sda3`` → ``block:/dev/sda``); anything else (a
    multipath map, a LUN) is its own backend, ``block:<path>``: only the operator knows which
    array it is on (rules).
    """
    dev = posixpath.normpath(dev)
    parts = dev.split("/")[2:]  # after "", "dev"
    if len(parts) == 3 and parts[:2] == ["disk", "by-path"]:
        m = _ISCSI_BY_PATH.match(parts[2])
        if m:
            return f"iscsi://{_host_port(m.group(1), 'iscsi')}/{m.group(2)}"
    if len(parts) >= 2 and parts[0] == "zvol":
        return f"zfs:{parts[1]}"
    if len(parts) == 2 and parts[0] == "mapper":
        m = _LVM_DM.match(parts[1])
        if m:
            return f"lvm:{m.group(1).replace('--', '-')}"
    if len(parts) == 2 and parts[0] not in _DEV_DIRS:
        return f"lvm:{parts[0]}"
    for pattern in _PARTITION:
        m = pattern.match(dev)
        if m:
            return f"block:{m.group(1)}"
    return f"block:{dev}"


def mount_of(path: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount ``path`` is on: the longest mount point containing it; of several mounts on
    one point the last, which hides the others."""
    path = posixpath.normpath(path)
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point
        inside = mp == "/" or path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    return best


def mount_backend(mount: Mount) -> str:
    """The backend of files on ``mount``, from its filesystem type and source.

    NFS ``server:/export`` → ``nfs://server/export``; CIFS ``//server/share/dir`` →
    ``cifs://server/share``; GlusterFS ``host:/vol`` → ``gluster://host/vol``; CephFS
    ``mon1,mon2:/dir`` → ``cephfs://mon1,mon2``; a filesystem on a block device → that
    device's backend (`block_backend`); ZFS ``pool/dataset`` → ``zfs:pool``; tmpfs →
    ``tmpfs``; anything else ``<fstype>:<source>``.
    """
    fstype, src = mount.fstype, mount.source
    kind = _NET_FS.get(fstype)
    if kind == "nfs":
        host, _, export = _split_host_path(src)
        return f"nfs://{_host(host)}{_slash(export)}"
    if kind == "cifs":
        bits = src.lstrip("/").split("/")
        share = bits[1] if len(bits) > 1 else ""
        return f"cifs://{_host(bits[0])}{_slash(share)}"
    if kind == "gluster":
        host, _, vol = _split_host_path(src)
        return f"gluster://{_host(host)}{_slash(vol.strip('/').split('/')[0])}"
    if kind == "cephfs":
        if "@" in src and "=" in src:  # new syntax: user@fsid.fsname=/path
            return f"cephfs://{src.split('@', 1)[1].split('=', 1)[0]}"
        mons, _, _path = src.rpartition(":/") if ":/" in src else (src, "", "")
        return f"cephfs://{_hosts(mons.replace(';', ',').split(','), 'rbd')}"
    if kind == "ssh":
        host, _, _path = _split_host_path(src)
        return f"ssh://{_host(host.rpartition('@')[2])}"
    if kind is not None:  # 9p, virtiofs: a tag, shared by whatever the host exports
        return f"{kind}:{src}"
    if src.startswith("/dev/"):
        return block_backend(src)
    if fstype == "zfs":
        return f"zfs:{src.split('/')[0]}"
    if fstype in _MEMORY_FS:
        return fstype
    return f"{fstype}:{src}"


def _split_host_path(src: str) -> tuple[str, str, str]:
    """``host:/path`` or ``[v6]:/path`` → (host, ":", path)."""
    if src.startswith("["):
        end = src.find("]")
        if end > 0:
            return src[1:end], ":", src[end + 1 :].lstrip(":")
    return src.partition(":")


def _slash(part: str) -> str:
    part = part.strip()
    if not part:
        return ""
    return part if part.startswith("/") else "/" + part


# --- sources from QMP -------------------------------------------------------------------


def source_from_query_block(inserted: Mapping[str, Any]) -> Source:
    """The source of a ``query-block`` entry's ``inserted``: its ``file`` (QEMU's filename of
    the top node: ``nbd://h:10809/e``, ``/path``, ``json:{...}``...), else ``image.filename``."""
    name = inserted.get("file")
    if not isinstance(name, str) or not name:
        image = inserted.get("image")
        name = image.get("filename") if isinstance(image, Mapping) else None
    if not isinstance(name, str) or not name:
        return Source(text="")
    return source_from_filename(name)


def source_from_filename(name: str) -> Source:
    """The source of a QEMU block filename (``bdrv_refresh_filename``'s spellings, and the legacy
    ``-drive file=`` pseudo-protocols ``nbd:``, ``rbd:``)."""
    name = name.strip()
    if name.startswith("json:"):
        try:
            doc = json.loads(name[5:])
        except ValueError:
            return Source(text="json:", backend=UNKNOWN)
        return source_from_options(doc) if isinstance(doc, dict) else Source(text="json:", backend=UNKNOWN)
    if name.startswith("/"):
        path = posixpath.normpath(name)
        return Source(text=path, path=path)
    if name.startswith("rbd:"):
        return _rbd_legacy(name[4:])
    if name.startswith("nbd:") and not name.startswith("nbd://"):
        return _nbd_legacy(name[4:])
    if "://" in name:
        return _from_url(name)
    # A relative path (QEMU keeps -drive file=disk.img as given): its directory is unknown.
    return Source(text=_clip_source(name), path=name)


def _from_url(url: str) -> Source:
    if url.startswith("nvme://"):  # a PCI address, not host:port
        ctrl, _, ns = url[7:].partition("/")
        return Source(text=_clip_source(f"nvme://{ctrl}/{ns}"), backend=clip(f"nvme://{ctrl}"))
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        return Source(text=_clip_source(url.split("://", 1)[0] + "://"), backend=UNKNOWN)
    scheme = u.scheme.lower()
    proto, _, transport = scheme.partition("+")
    host = _host(u.hostname or "")
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
        return _iscsi(_join_port(host, port, "iscsi"), iqn, lun)
    if proto == "gluster":
        if transport == "unix":
            sock = query.get("socket", [""])[0]
            server = f"unix:{sock}"
        else:
            server = _join_port(host, port, "gluster")
        vol, _, image = path.strip("/").partition("/")
        return _grouped("gluster", server, vol, image)
    if proto == "nfs":
        # QEMU's libnfs URL does not tell the export from the path below it: the server is all.
        return Source(text=_clip_source(f"nfs://{host}{path}"), backend=f"nfs://{host}")
    # ssh, http(s), ftp(s), sheepdog, vxhs...: the server is what fails.
    server = _join_port(host, port, proto)
    return Source(text=_clip_source(f"{proto}://{server}{path}"), backend=f"{proto}://{server}")


def _nbd(*, host: str = "", port: int | None = None, unix: str = "", export: str = "") -> Source:
    """NBD: the server (TCP address or unix socket).  An NBD export is one block device, that is
    one disk, so it is not part of the backend."""
    if unix:
        server = posixpath.normpath(unix)
        backend = f"nbd+unix:{server}"
    else:
        server = _join_port(host, port, "nbd")
        backend = f"nbd://{server}"
    text = backend
    if export:
        text += f"?export={export}" if unix else f"/{export}"
    return Source(text=_clip_source(text), backend=backend)


def _iscsi(portal: str, iqn: str, lun: str) -> Source:
    """iSCSI: the portal and the target; the LUN is the disk."""
    backend = f"iscsi://{portal}/{iqn}" if iqn else f"iscsi://{portal}"
    return Source(text=_clip_source(backend + (f"/{lun}" if lun else "")), backend=backend)


def _grouped(proto: str, servers: str, group: str, image: str) -> Source:
    """Servers plus a pool or volume: RBD and GlusterFS; the image is the disk."""
    backend = f"{proto}://{servers}/{group}" if group else f"{proto}://{servers}"
    return Source(text=_clip_source(backend + (f"/{image}" if image else "")), backend=backend)


def _rbd(pool: str, image: str, mons: Iterable[str], conf: str | None) -> Source:
    """RBD: the cluster (its monitors, else the ceph.conf naming them) and the pool."""
    mon_list = [m for m in mons if m]
    servers = f"conf={posixpath.normpath(conf)}" if conf else "ceph"
    if mon_list:
        servers = _hosts(mon_list, "rbd")
    return _grouped("rbd", servers, pool, image)


def _rbd_legacy(spec: str) -> Source:
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
    return _host_port(addr, "rbd") if addr else ""


def _nbd_legacy(spec: str) -> Source:
    """``nbd:unix:/sock[:exportname=e]`` or ``nbd:host:port[:exportname=e]``."""
    bits = spec.split(":exportname=", 1)
    export = bits[1] if len(bits) > 1 else ""
    addr = bits[0]
    if addr.startswith("unix:"):
        return _nbd(unix=addr[5:], export=export)
    host, port = _split_port(addr)
    return _nbd(host=_host(host), port=port, export=export)


def source_from_options(opts: Mapping[str, Any]) -> Source:
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
            return Source(text=f"json:{driver}", backend=UNKNOWN)
        return _from_driver(driver, node)
    return Source(text="json:", backend=UNKNOWN)


def _from_driver(driver: str, o: Mapping[str, Any]) -> Source:
    if driver in ("file", "host_device", "host_cdrom"):
        filename = o.get("filename")
        return (
            source_from_filename(filename)
            if isinstance(filename, str)
            else Source(text=driver, backend=UNKNOWN)
        )
    if driver == "nbd":
        server = _mapping(o.get("server"))
        export = str(o.get("export", "") or "")
        path = server.get("path") or o.get("path")
        if server.get("type") == "unix" or path:
            return _nbd(unix=str(path or ""), export=export)
        return _nbd(
            host=_host(str(server.get("host", o.get("host", "")))),
            port=_port(server.get("port", o.get("port"))),
            export=export,
        )
    if driver == "rbd":
        servers = o.get("server")
        mons = [
            _join_port(_host(str(s.get("host", ""))), _port(s.get("port")), "rbd")
            for s in (servers if isinstance(servers, list) else [])
            if isinstance(s, Mapping) and s.get("host")
        ]
        conf = o.get("conf")
        return _rbd(
            str(o.get("pool", "")), str(o.get("image", "")), mons, conf if isinstance(conf, str) else None
        )
    if driver == "iscsi":
        portal = str(o.get("portal", ""))
        host, port = _split_port(portal)
        return _iscsi(_join_port(_host(host), port, "iscsi"), str(o.get("target", "")), str(o.get("lun", "")))
    if driver == "gluster":
        servers = o.get("server")
        hosts = []
        for s in servers if isinstance(servers, list) else []:
            if not isinstance(s, Mapping):
                continue
            if s.get("type") == "unix":
                hosts.append(f"unix:{s.get('path', '')}")
            elif s.get("host"):
                hosts.append(_join_port(_host(str(s["host"])), _port(s.get("port")), "gluster"))
        return _grouped(
            "gluster", _hosts(hosts, "gluster"), str(o.get("volume", "")), str(o.get("path", "")).strip("/")
        )
    if driver == "nfs":
        server = _mapping(o.get("server"))
        host = _host(str(server.get("host", "")))
        return Source(text=_clip_source(f"nfs://{host}{o.get('path', '')}"), backend=f"nfs://{host}")
    if driver == "ssh":
        server = _mapping(o.get("server"))
        srv = _join_port(_host(str(server.get("host", ""))), _port(server.get("port")), "ssh")
        return Source(text=_clip_source(f"ssh://{srv}{o.get('path', '')}"), backend=f"ssh://{srv}")
    if driver in ("http", "https", "ftp", "ftps"):
        url = o.get("url")
        return _from_url(url) if isinstance(url, str) else Source(text=driver, backend=driver)
    if driver == "nvme":
        dev = str(o.get("device", ""))
        return Source(text=_clip_source(f"nvme://{dev}/{o.get('namespace', '')}"), backend=f"nvme://{dev}")
    # quorum, blkverify, null-co, vvfat...: no single storage to name; the driver says what it is.
    return Source(text=f"json:{driver}", backend=driver or UNKNOWN)


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
) -> Source:
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
            host, port = _split_port(servers[0]) if servers else ("", None)
            return _nbd(host=_host(host), port=port, export=name)
        if proto == "rbd":
            pool_name, _, image = name.partition("/")
            mons = [_join_port(*_host_and_port(h), "rbd") for h in servers]
            return _rbd(pool_name, image.rpartition("/")[2], mons, None)
        if proto == "iscsi":
            iqn, _, lun = name.partition("/")
            portal = _join_port(*_host_and_port(servers[0]), "iscsi") if servers else ""
            return _iscsi(portal, iqn, lun)
        if proto == "gluster":
            vol, _, image = name.partition("/")
            hs = [h if h.startswith("unix:") else _join_port(*_host_and_port(h), "gluster") for h in servers]
            return _grouped("gluster", _hosts(hs, "gluster"), vol, image)
        server = _join_port(*_host_and_port(servers[0]), proto) if servers else ""
        if proto == "nfs":
            return Source(text=_clip_source(f"nfs://{server}/{name}"), backend=f"nfs://{server}")
        return Source(text=_clip_source(f"{proto}://{server}/{name}"), backend=f"{proto}://{server}")
    if pool is not None:
        # A libvirt storage pool is one storage system (one NFS export, iSCSI target, VG...).
        return Source(text=f"pool:{pool}", backend=clip(f"pool:{pool}"))
    if path:
        if kind == "vhostuser":
            return Source(text=_clip_source(path), backend=clip(f"vhostuser:{path}"))
        norm = posixpath.normpath(path) if path.startswith("/") else path
        return Source(text=_clip_source(norm), path=norm)
    return Source(text=kind, backend=kind if kind in ("nvme",) else UNKNOWN)


# --- host and port spelling -------------------------------------------------------------


def _host(host: str) -> str:
    """A host as a backend spells it: lower case; an IPv6 address in brackets."""
    host = host.strip().strip("[]").lower()
    return f"[{host}]" if ":" in host else host


def _port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def _split_port(addr: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, ``host`` → (host, port or None)."""
    addr = addr.strip()
    if addr.startswith("["):
        end = addr.find("]")
        host, rest = addr[1:end], addr[end + 1 :]
        return host, _port(rest[1:]) if rest.startswith(":") else None
    if addr.count(":") == 1:
        host, _, port = addr.partition(":")
        return host, _port(port)
    return addr, None


def _host_and_port(addr: str) -> tuple[str, int | None]:
    host, port = _split_port(addr)
    return _host(host), port


def _join_port(host: str, port: int | None, proto: str) -> str:
    host = _host(host) if host else host
    port = port or _DEFAULT_PORTS.get(proto)
    return f"{host}:{port}" if port else host


def _host_port(addr: str, proto: str) -> str:
    host, port = _split_port(addr)
    return _join_port(host, port, proto)


def _hosts(hosts: Iterable[str], proto: str) -> str:
    """Several servers of one system (Ceph monitors, Gluster servers) in one stable spelling:
    sorted, de-duplicated, at most `MAX_HOSTS`."""
    uniq = sorted({h if h.startswith("unix:") else _host_port(h, proto) for h in hosts if h.strip()})
    text = ",".join(uniq[:MAX_HOSTS])
    if len(uniq) > MAX_HOSTS:
        text += f",+{len(uniq) - MAX_HOSTS}"
    return text


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


def _clip_source(text: str) -> str:
    return clip(text, MAX_SOURCE)


# --- the mount table --------------------------------------------------------------------


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """``/proc/<pid>/mountinfo`` (proc(5)): mount point (field 5, octal escapes), then after the
    ``-`` separator the filesystem type and the mount source.  Malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                fstype=_unescape(fields[sep + 1]),
                source=_unescape(fields[sep + 2]),
            )
        )
    return tuple(mounts)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
