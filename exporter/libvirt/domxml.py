"""Read a running domain's disks and their error policy from libvirt's live domain XML: pure, no I/O.

Under libvirt the exporter must not send QMP commands (``qemu-monitor-command`` taints the
domain ``custom-monitor``, ``shared/docs/domain.md`` §4.1), so the policy QMP mode reads with
``qom-get`` comes from the XML libvirt built QEMU's command line from instead:

* ``<driver error_policy=... rerror_policy=...>`` (upstream libvirt; openEuler's adds ``retry``
  and the ``retry_interval``/``retry_timeout`` attributes, in ms);
* ``<qemu:override><qemu:device alias=...><qemu:frontend><qemu:property .../>``, which libvirt
  copies verbatim onto QEMU's ``-device`` *after* its own properties, so it wins over ``<driver>``
  (how a retry-capable QEMU is configured under an upstream libvirt).

The values are given in QEMU's spelling (``enospc``, not libvirt's ``enospace``) because that is
what QMP mode reports and what `exporter.model.policy.verify` checks.  Each disk carries its
``<source index='N'>`` numbers: with ``-blockdev`` a ``BLOCK_IO_ERROR`` names only the node
(``libvirt-N-format`` / ``libvirt-N-storage``) and its ``device`` is ``""``.

The XML comes from libvirtd, but it describes whatever an operator wrote: a disk with a value
QEMU could not have accepted is skipped (and listed in `Domain.skipped` with the reason) rather
than guessed at; XML that is not a domain at all raises `ValueError`.  `parse_definition` reads
what ``qemu-iohang-check --xml`` is given before a domain exists: a domain file without a
``<uuid>``, or the bare ``<disk>`` elements openEuler's documentation shows.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from xml.parsers.expat import errors as expat_errors

from exporter.model.policy import DiskPolicy

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_Q = f"{{{QEMU_NS}}}"

#: Larger than any real domain XML (hundreds of disks are well under 1 MiB); refuses garbage early.
MAX_XML_BYTES = 16 << 20
#: Length bound for strings that end up in label values (source descriptions, names).
MAX_TEXT = 256
#: Hosts of one network source kept (Ceph monitors, Gluster servers); `DomainDiskSource.host_count`
#: says how many there were.
MAX_HOSTS = 4

#: libvirt's ``error_policy`` / ``rerror_policy`` values → QEMU's ``werror`` / ``rerror`` spelling.
#: ``retry`` exists only in openEuler's libvirt.
_LIBVIRT_TO_QEMU = {
    "stop": "stop",
    "report": "report",
    "ignore": "ignore",
    "enospace": "enospc",
    "retry": "retry",
}
#: What QEMU accepts for ``werror``/``rerror`` on ``-device`` (through ``<qemu:override>``).
#: ``auto`` is kept verbatim: it means "inherit the -drive policy", which `exporter.model.policy` reports
#: as not visible.
_QEMU_POLICIES = frozenset({"stop", "report", "ignore", "enospc", "retry", "auto"})
#: QEMU's own defaults when neither libvirt nor an override sets the property (hw/block: a
#: device's werror/rerror default to "auto", which with -blockdev resolves to the BlockBackend
#: defaults enospc / report).
QEMU_DEFAULT_WERROR = "enospc"
QEMU_DEFAULT_RERROR = "report"
#: openEuler QEMU's device defaults for the retry timing (``shared/docs/domain.md`` §1).
DEFAULT_RETRY_INTERVAL_MS = 1000
DEFAULT_RETRY_TIMEOUT_MS = 0
_MAX_MS = (1 << 63) - 1

#: ``<disk device=...>`` kinds that hold no guest data worth protecting (removable media), and
#: buses whose disks QMP mode skips too (usb-storage).
_SKIPPED_DEVICES = frozenset({"cdrom", "floppy"})
_SKIPPED_BUSES = frozenset({"usb", "fdc"})
#: ``<target bus=...>`` → the QEMU device type libvirt creates for a ``device='disk'``.
_BUS_KIND = {
    "virtio": "virtio-blk",
    "scsi": "scsi-hd",
    "sata": "ide-hd",
    "ide": "ide-hd",
    "xen": "xen-disk",
    "sd": "sd-card",
}


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


@dataclass(frozen=True)
class DomainDiskSource:
    """Where a disk's data lives, as far as a label should tell (never credentials or secrets).

    ``kind`` is the ``<disk type=...>``: ``network``, ``file``, ``block``, ``volume``, ``dir``,
    ``nvme``, ``vhostuser``...  ``hosts`` holds at most `MAX_HOSTS` entries (``host:port``,
    ``[v6]:port`` or ``unix:/path``); ``host_count`` says how many the XML listed.
    """

    kind: str
    protocol: str | None = None
    hosts: tuple[str, ...] = ()
    host_count: int = 0
    name: str | None = None  # network: NBD export, iSCSI "iqn/lun", RBD "pool/image"
    path: str | None = None  # file, dev, dir or socket path
    pool: str | None = None
    volume: str | None = None


@dataclass(frozen=True)
class DomainDisk:
    """One guest disk of a running domain, with the error policy QEMU was given."""

    alias: str  # QEMU device id (virtio-disk0, scsi0-0-0-0, ua-...): the `device` label
    target: str  # guest-facing name, e.g. vda
    bus: str  # virtio, scsi, sata...
    kind: str  # QEMU device type: virtio-blk, scsi-hd, scsi-block (device='lun'), ide-hd...
    index: int | None  # <source index='N'>; None without -blockdev (old libvirt) or no source
    # Indexes of the whole chain (top image first, then <backingStore> layers): an error on a
    # backing node still belongs to this disk.
    indexes: tuple[int, ...]
    source: DomainDiskSource
    werror: str  # QEMU spelling
    rerror: str
    retry_interval_ms: int | None  # None when unknown (not retry and not given in the XML)
    retry_timeout_ms: int | None
    # Where the werror/rerror values came from: "driver", "override", "default" (QEMU's own),
    # joined with "+" when the two differ, e.g. "driver+override".
    policy_origin: str

    def policy(self) -> DiskPolicy:
        """The policy in `exporter.model.policy` terms, as QMP mode would have read it."""
        # A running domain whose werror/rerror is "retry" proves QEMU accepted the value, so it
        # has the feature.  Otherwise libvirt's XML cannot tell (QMP mode asks
        # device-list-properties, which would taint the domain): None, unknown.
        retry = "retry" in (self.werror, self.rerror)
        return DiskPolicy(
            werror=self.werror,
            rerror=self.rerror,
            retry_interval_ms=self.retry_interval_ms,
            retry_timeout_ms=self.retry_timeout_ms,
            retry_feature=True if retry else None,
        )


@dataclass(frozen=True)
class SkippedDisk:
    """A ``<disk>`` that was not turned into a `DomainDisk`, and why (for one log line)."""

    target: str | None
    alias: str | None
    reason: str


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    id: int | None  # libvirt's domain id; None in inactive XML
    disks: tuple[DomainDisk, ...]
    skipped: tuple[SkippedDisk, ...] = ()


class _BadDisk(Exception):
    """A disk whose XML QEMU could not have started with; becomes a `SkippedDisk`."""


def parse_domain(xml: str | bytes, *, inactive: bool = False) -> Domain:
    """Parse a domain's live XML (``virDomainGetXMLDesc(0)``).

    ``inactive``: the XML may be a definition that is not running (``virsh dumpxml
    --inactive``, a migration destination's domain file), whose disks have no ``<alias>`` yet:
    such a disk is named by its target (``vda``) instead of being skipped.  Such a file may also
    lack the ``<uuid>`` (libvirt assigns one at ``virsh define``): the uuid is then "".

    Raises `ValueError` when the text is not well-formed XML, not a ``<domain>``, or lacks a
    name or (live XML) a UUID.  A single odd disk never fails the whole domain: it lands in
    ``skipped``.
    """
    root = _parse(xml, fragments=False)
    if root.tag != "domain":
        raise ValueError(f"expected a <domain> element, got <{root.tag}>")
    return _domain(root, inactive)


def parse_definition(xml: str | bytes, name: str) -> Domain:
    """Parse what an operator writes before a domain exists: a domain file (`parse_domain` with
    ``inactive``), or bare ``<disk>`` elements as openEuler's documentation gives them (one
    ``<disk>`` root, several top-level ``<disk>`` elements one after another, or a
    ``<devices>`` block), checked before they are pasted into a domain.  Bare disks belong to
    no domain: they are named ``name`` (the caller's choice, e.g. the file's name), uuid "".

    Raises `ValueError` as `parse_domain` does, and when the text holds neither a domain nor a
    ``<disk>``.
    """
    root = _parse(xml, fragments=True)
    if root.tag == "domain":
        return _domain(root, inactive=True)
    if root.tag == "disk":
        elems = [root]
    elif root.tag in ("devices", _FRAGMENTS):
        elems = root.findall("disk")
    else:
        elems = []
    if not elems:
        tags = [root.tag] if root.tag != _FRAGMENTS else [e.tag for e in root]
        got = ", ".join(f"<{t}>" for t in dict.fromkeys(tags)) or "no element"
        raise ValueError(f"expected one <domain> element or <disk> elements, got {got}")
    disks, skipped = _disks(elems, {}, {}, inactive=True)
    return Domain(name=_clip(name), uuid="", id=None, disks=disks, skipped=skipped)


#: The element `_parse` wraps top-level fragments in (a name no libvirt element has).
_FRAGMENTS = "_fragments_"
_JUNK_AFTER_ROOT = expat_errors.codes[expat_errors.XML_ERROR_JUNK_AFTER_DOC_ELEMENT]
_XML_DECL = re.compile(rb"^(\xef\xbb\xbf)?\s*<\?xml[^>]*\?>")
_UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")


def _parse(xml: str | bytes, *, fragments: bool) -> ET.Element:
    """The root element.  ``fragments``: text holding several top-level elements (``<disk>``
    after ``<disk>``, which is not an XML document) is parsed as the children of a `_FRAGMENTS`
    element instead of being refused."""
    what = "XML" if fragments else "domain XML"
    if len(xml) > MAX_XML_BYTES:
        raise ValueError(f"{what} is {len(xml)} bytes, more than {MAX_XML_BYTES}")
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        if not (fragments and exc.code == _JUNK_AFTER_ROOT):
            raise ValueError(f"{what} is not well-formed: {exc}") from None
    data = xml.encode() if isinstance(xml, str) else xml
    decl = _XML_DECL.match(data)  # must stay first: it names the encoding
    head = decl.group(0) if decl else b""
    try:
        return ET.fromstring(
            b"%s<%s>%s</%s>" % (head, _FRAGMENTS.encode(), data[len(head) :], _FRAGMENTS.encode())
        )
    except ET.ParseError as exc:
        raise ValueError(f"{what} is not well-formed: {exc}") from None


def _domain(root: ET.Element, inactive: bool) -> Domain:
    name = (root.findtext("name") or "").strip()
    if not name:
        raise ValueError("domain XML has no <name>")
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not _UUID.fullmatch(uuid) and (uuid or not inactive):
        raise ValueError(f"domain {name!r} has no valid <uuid> ({uuid[:40]!r})")
    overrides, override_problems = _frontend_overrides(root)
    disks, skipped = _disks(root.iterfind("devices/disk"), overrides, override_problems, inactive)
    return Domain(name=_clip(name), uuid=uuid, id=_int_attr(root, "id"), disks=disks, skipped=skipped)


def _disks(
    elems: Iterable[ET.Element],
    overrides: dict[str, _Override],
    override_problems: dict[str, str],
    inactive: bool,
) -> tuple[tuple[DomainDisk, ...], tuple[SkippedDisk, ...]]:
    disks: list[DomainDisk] = []
    skipped: list[SkippedDisk] = []
    for elem in elems:
        target_el = elem.find("target")
        target = target_el.get("dev") if target_el is not None else None
        alias_el = elem.find("alias")
        alias = alias_el.get("name") if alias_el is not None else None
        device = elem.get("device", "disk")
        bus = target_el.get("bus", "") if target_el is not None else ""
        if device in _SKIPPED_DEVICES or bus in _SKIPPED_BUSES:
            continue
        try:
            if not target:
                raise _BadDisk("no <target dev=...>")
            if not alias:
                if not inactive:
                    raise _BadDisk("no <alias name=...> (not a running domain's live XML?)")
                alias = target
            if alias in override_problems:
                raise _BadDisk(override_problems[alias])
            disks.append(_disk(elem, alias, _clip(target), bus, device, overrides.get(alias, {})))
        except _BadDisk as exc:
            skipped.append(SkippedDisk(target=target, alias=alias, reason=str(exc)))
    return tuple(disks), tuple(skipped)


def _int_attr(elem: ET.Element, attr: str) -> int | None:
    value = elem.get(attr)
    if value is None:
        return None
    try:
        number = int(value.strip(), 10)
    except ValueError:
        return None
    return number if number >= 0 else None


def _ms(value: str, what: str) -> int:
    """A non-negative millisecond count, as QEMU's uint64/int64 properties accept it."""
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise _BadDisk(f"{what}={value[:40]!r} is not an integer") from None
    if not 0 <= number <= _MAX_MS:
        raise _BadDisk(f"{what}={number} is out of range")
    return number


_Override = dict[str, str | None]  # property name → value; None = type='remove'


def _frontend_overrides(root: ET.Element) -> tuple[dict[str, _Override], dict[str, str]]:
    """``<qemu:override>`` frontend properties by device alias, for the four policy properties.

    Returns (overrides, problems): a device whose override QEMU could not have accepted is
    reported under its alias instead.
    """
    found: dict[str, _Override] = {}
    problems: dict[str, str] = {}
    for dev in root.iterfind(f"{_Q}override/{_Q}device"):
        alias = dev.get("alias")
        if not alias:
            continue
        props = found.setdefault(alias, {})
        for prop in dev.iterfind(f"{_Q}frontend/{_Q}property"):
            name = prop.get("name")
            if name not in ("werror", "rerror", "retry_interval", "retry_timeout"):
                continue
            if prop.get("type") == "remove":
                props[name] = None  # libvirt deletes the property: QEMU's default applies
                continue
            value = prop.get("value")
            if value is None:
                problems[alias] = f"<qemu:property name='{name}'> has no value"
                continue
            props[name] = value.strip()
    return found, problems


def _disk(
    elem: ET.Element, alias: str, target: str, bus: str, device: str, override: _Override
) -> DomainDisk:
    kind = "scsi-block" if device == "lun" else _BUS_KIND.get(bus, bus or "unknown")
    source_el = elem.find("source")
    index = _int_attr(source_el, "index") if source_el is not None else None
    indexes = [] if index is None else [index]
    backing = elem.find("backingStore")
    while backing is not None and len(indexes) < 256:
        backing_source = backing.find("source")
        i = _int_attr(backing, "index")
        if i is None and backing_source is not None:
            i = _int_attr(backing_source, "index")
        if i is not None:
            indexes.append(i)
        backing = backing.find("backingStore")

    driver = elem.find("driver")
    werror, rerror, origin_w, origin_r = QEMU_DEFAULT_WERROR, QEMU_DEFAULT_RERROR, "default", "default"
    interval: int | None = None
    timeout: int | None = None
    if driver is not None:
        error_policy = _policy_attr(driver, "error_policy")
        rerror_policy = _policy_attr(driver, "rerror_policy")
        # libvirt's qemuBuildDiskFrontendAttributeErrorPolicy: error_policy sets werror and,
        # unless rerror_policy is given, rerror too; "enospace" is write-only, so then rerror
        # stays QEMU's default.
        if error_policy is not None:
            werror, origin_w = error_policy, "driver"
            if rerror_policy is None and error_policy != "enospc":
                rerror, origin_r = error_policy, "driver"
        if rerror_policy is not None:
            rerror, origin_r = rerror_policy, "driver"
        if driver.get("retry_interval") is not None:
            interval = _ms(driver.get("retry_interval", ""), "retry_interval")
        if driver.get("retry_timeout") is not None:
            timeout = _ms(driver.get("retry_timeout", ""), "retry_timeout")

    # <qemu:override> reaches -device after libvirt's own properties: it wins.
    for prop, value in override.items():
        if prop in ("werror", "rerror"):
            if value is None:
                qemu_value, origin = (
                    (QEMU_DEFAULT_WERROR if prop == "werror" else QEMU_DEFAULT_RERROR),
                    "default",
                )
            elif value in _QEMU_POLICIES:
                qemu_value, origin = value, "override"
            else:
                raise _BadDisk(f"<qemu:override> {prop}={value[:40]!r} is not a QEMU error action")
            if prop == "werror":
                werror, origin_w = qemu_value, origin
            else:
                rerror, origin_r = qemu_value, origin
        elif prop == "retry_interval":
            interval = None if value is None else _ms(value, "<qemu:override> retry_interval")
        else:
            timeout = None if value is None else _ms(value, "<qemu:override> retry_timeout")

    if "retry" in (werror, rerror):
        # Accepted by QEMU, so the device has the properties; unset ones hold the defaults.
        interval = DEFAULT_RETRY_INTERVAL_MS if interval is None else interval
        timeout = DEFAULT_RETRY_TIMEOUT_MS if timeout is None else timeout
    origin = origin_w if origin_w == origin_r else f"{origin_w}+{origin_r}"
    return DomainDisk(
        alias=alias,
        target=target,
        bus=bus,
        kind=kind,
        index=index,
        indexes=tuple(indexes),
        source=_source(elem, source_el),
        werror=werror,
        rerror=rerror,
        retry_interval_ms=interval,
        retry_timeout_ms=timeout,
        policy_origin=origin,
    )


def _policy_attr(driver: ET.Element, attr: str) -> str | None:
    """A ``<driver>`` policy attribute in QEMU's spelling; None when absent (or libvirt's
    explicit ``default``)."""
    value = driver.get(attr)
    if value is None or value == "default":
        return None
    qemu = _LIBVIRT_TO_QEMU.get(value)
    if qemu is None:
        raise _BadDisk(f"{attr}={value[:40]!r} is not a libvirt error policy")
    return qemu


def _source(disk: ET.Element, source: ET.Element | None) -> DomainDiskSource:
    kind = _clip(disk.get("type", "unknown"))
    if source is None:
        return DomainDiskSource(kind=kind)
    protocol = source.get("protocol")
    if protocol is not None:
        hosts: list[str] = []
        host_els = source.findall("host")
        for host in host_els[:MAX_HOSTS]:
            if host.get("transport") == "unix" or host.get("socket"):
                hosts.append(_clip(f"unix:{host.get('socket', '')}"))
                continue
            name = host.get("name", "")
            if ":" in name:  # IPv6 literal
                name = f"[{name}]"
            port = host.get("port")
            hosts.append(_clip(f"{name}:{port}" if port else name))
        return DomainDiskSource(
            kind=kind,
            protocol=_clip(protocol),
            hosts=tuple(hosts),
            host_count=len(host_els),
            name=_optional_clip(source.get("name")),
        )
    if source.get("pool") is not None or source.get("volume") is not None:
        return DomainDiskSource(
            kind=kind,
            pool=_optional_clip(source.get("pool")),
            volume=_optional_clip(source.get("volume")),
        )
    # Whichever attribute holds the path, whatever the disk type says (openEuler's own example
    # pairs type='block' with <source file=...>).
    for attr in ("file", "dev", "dir", "path"):
        if source.get(attr):
            return DomainDiskSource(kind=kind, path=_optional_clip(source.get(attr)))
    return DomainDiskSource(kind=kind)


def _optional_clip(value: str | None) -> str | None:
    return None if value is None else _clip(value)
