"""A disk's storage *backend*: what fails together, derived from what QEMU or libvirt says.

When disks start hanging the operator's first question is "is it the storage?": one NBD
server, one Ceph pool, one iSCSI target, one NFS export, one SAN LUN.  The ``backend`` label
names that shared part -- protocol, server (portal, monitors) and pool/export/target -- and
never the image or file name, so the label has as many values as a host has storage systems,
not as many as it has disks.  docs/metrics.md ("Storage backends") lists every rule with
examples.

Here: the label (`derive_backend`), what it is derived from (a `DiskSource`) and the operator's
rules (`BackendRule`).  A disk's `DiskSource` comes from QEMU's file name or libvirt's XML
(`exporter.model.disk_source`); a local path's backend from the mount table or the block
device (`exporter.model.mounts`); servers are spelled alike by `exporter.model.addresses`.
Everything is pure: the mount table and the rules are passed in as data; reading
``/proc/self/mountinfo`` is the caller's job (`exporter.storage`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.model.mounts import Mount, block_backend, mount_backend, mount_of

#: Longest backend label value; longer derivations are cut (an ``…`` marks the cut).
MAX_BACKEND = 128
#: Longest source text kept for rule matching.
MAX_SOURCE = 1024
#: The backend when nothing can be told (no file name, a relative path, an unreadable mount table).
UNKNOWN = "unknown"


@dataclass(frozen=True)
class DiskSource:
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


def derive_backend(
    source: DiskSource, mounts: Sequence[Mount] = (), rules: Sequence[BackendRule] = ()
) -> str:
    """The backend label of a disk whose data lives at ``source``.

    The first rule whose pattern matches the source text, or else the backend derived without
    rules, decides; a rule's result is used as written.  Without a rule: network sources have
    their own backend, block devices name their volume group, iSCSI target or whole disk, and
    files the filesystem they are on (`exporter.model.mounts.mount_backend`).
    """
    default = _default_backend(source, mounts)
    for rule in rules:
        for text in (source.text, default):
            named = rule.apply(text)
            if named:
                return clip(named)
    return clip(default)


def _default_backend(source: DiskSource, mounts: Sequence[Mount]) -> str:
    if source.backend is not None:
        return source.backend
    path = source.path
    if path is None or not path.startswith("/"):
        return UNKNOWN
    if path.startswith("/dev/"):
        return block_backend(path)
    mount = mount_of(path, mounts)
    return UNKNOWN if mount is None else mount_backend(mount)
