"""The backend of a local path: the filesystem it is on, or the block device it is.

A disk whose source is a path (``/var/lib/images/vm.qcow2``, ``/dev/vg0/vm``) fails with the
storage under it: the NFS server or Ceph cluster its filesystem is mounted from, the volume
group or iSCSI target its device belongs to.  The mount table comes in as text
(`parse_mountinfo`); reading ``/proc/self/mountinfo`` is the caller's job (`exporter.storage`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.model.addresses import host_list, host_port, spell_host

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


# --- the mount table --------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where a filesystem is mounted and from what."""

    mount_point: str
    fstype: str
    source: str


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
        return f"nfs://{spell_host(host)}{_slash(export)}"
    if kind == "cifs":
        bits = src.lstrip("/").split("/")
        share = bits[1] if len(bits) > 1 else ""
        return f"cifs://{spell_host(bits[0])}{_slash(share)}"
    if kind == "gluster":
        host, _, vol = _split_host_path(src)
        return f"gluster://{spell_host(host)}{_slash(vol.strip('/').split('/')[0])}"
    if kind == "cephfs":
        if "@" in src and "=" in src:  # new syntax: user@fsid.fsname=/path
            return f"cephfs://{src.split('@', 1)[1].split('=', 1)[0]}"
        mons, _, _path = src.rpartition(":/") if ":/" in src else (src, "", "")
        return f"cephfs://{host_list(mons.replace(';', ',').split(','), 'rbd')}"
    if kind == "ssh":
        host, _, _path = _split_host_path(src)
        return f"ssh://{spell_host(host.rpartition('@')[2])}"
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


# --- block devices ----------------------------------------------------------------------


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
            return f"iscsi://{host_port(m.group(1), 'iscsi')}/{m.group(2)}"
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
