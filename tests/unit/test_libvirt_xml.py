"""Live domain XML → disks and error policy (exporter/libvirt/domxml.py), from fixture XML.

The fixtures: the openEuler documentation's examples (``tests/fixtures/libvirt-xml/``), the
``virsh dumpxml`` of real domains under Debian's libvirt 9.0 (``tests/fixtures/libvirt-9.0/``,
written by ``tests/libvirt/capture.py``) and hand-written ``<qemu:override>`` cases.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.config import Config
from exporter.libvirt.domxml import (
    MAX_TEXT,
    Domain,
    DomainDisk,
    DomainDiskSource,
    parse_definition,
    parse_domain,
)
from exporter.libvirt.translate import model_disks
from exporter.model.disk_source import source_from_libvirt
from exporter.model.policy import DiskPolicy, PolicyConfig, Rule, verify
from exporter.model.state import VMState

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
XML = FIXTURES / "libvirt-xml"
CAPTURED = FIXTURES / "libvirt-9.0"


def load(path: Path) -> Domain:
    return parse_domain(path.read_text())


def only(domain: Domain, alias: str) -> DomainDisk:
    disk = next((d for d in domain.disks if d.alias == alias), None)
    assert disk is not None, f"{alias} not in {[d.alias for d in domain.disks]}"
    return disk


def source_text(disk: DomainDisk) -> str:
    """The disk's source as the exporter shows it (what `model_disks` resolves backends from)."""
    s = disk.source
    return source_from_libvirt(s.kind, s.protocol, s.hosts, s.name, s.path, s.pool).text


def matched(domain: Domain, **event: str) -> str | None:
    """The disk alias a ``BLOCK_IO_ERROR``'s data names, as the libvirt source matches it: the
    domain's disks in the model (`model_disks`), then `VMState.match_disk`."""
    vm = VMState(key="libvirt:t")
    vm.set_disks(model_disks(domain, Config()))
    return vm.match_disk({k.replace("_", "-"): v for k, v in event.items()})


def domain_xml(disks: str, extra: str = "", ns: bool = False) -> str:
    xmlns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" if ns else ""
    return (
        f"<domain type='qemu' id='1'{xmlns}><name>t</name>"
        "<uuid>0bbd3e5b-0977-42a1-8faa-419497c4871c</uuid>"
        f"<devices>{disks}</devices>{extra}</domain>"
    )


def disk_xml(driver: str = "", alias: str = "virtio-disk0", bus: str = "virtio", dev: str = "vda") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw' {driver}/>"
        f"<source file='/img' index='1'/><target dev='{dev}' bus='{bus}'/><alias name='{alias}'/></disk>"
    )


def one_disk(driver: str = "", **kw: str) -> DomainDisk:
    dom = parse_domain(domain_xml(disk_xml(driver, **kw)))
    assert len(dom.disks) == 1, dom.skipped
    return dom.disks[0]


# --- openEuler's documented XML -------------------------------------------------------------


def test_openeuler_virtio_blk_example() -> None:
    dom = load(XML / "openeuler-retry.xml")
    assert (dom.name, dom.uuid, dom.id) == ("oe-retry", "6f1c2a3e-9b1d-4c55-8d0e-2a4b6c8d0e1f", 7)
    vdb = only(dom, "virtio-disk1")
    assert (vdb.target, vdb.bus, vdb.kind, vdb.index) == ("vdb", "virtio", "virtio-blk", 2)
    assert (vdb.werror, vdb.rerror, vdb.retry_interval_ms, vdb.retry_timeout_ms) == (
        "retry",
        "retry",
        2000,
        10000,
    )
    assert vdb.policy_origin == "driver"
    # type='block' with <source file=...>, as the documentation writes it.
    assert vdb.source == DomainDiskSource(kind="block", path="/path/to/your/storage")
    assert source_text(vdb) == "/path/to/your/storage"
    assert vdb.policy() == DiskPolicy("retry", "retry", 2000, 10000, retry_feature=True)
    assert verify(vdb.policy(), PolicyConfig()).ok


def test_openeuler_virtio_scsi_example() -> None:
    sdb = only(load(XML / "openeuler-retry.xml"), "scsi0-0-0-0")
    assert (sdb.target, sdb.bus, sdb.kind, sdb.index) == ("sdb", "scsi", "scsi-hd", 1)
    assert sdb.policy() == DiskPolicy("retry", "retry", 2000, 10000, retry_feature=True)


def test_openeuler_retry_defaults_when_timing_omitted() -> None:
    # openEuler's libvirt omits retry_interval/retry_timeout when 0; QEMU's defaults apply.
    d = one_disk("error_policy='retry'")
    assert (d.werror, d.rerror, d.retry_interval_ms, d.retry_timeout_ms) == ("retry", "retry", 1000, 0)


# --- what an operator writes before the domain exists (parse_definition) --------------------

SEED_DISKS = (XML / "seed-disks.xml").read_text()
#: The seed's first example alone (virtio-blk), as a file whose root is that <disk>.
SEED_VIRTIO_DISK = SEED_DISKS[SEED_DISKS.index("<disk type=") : SEED_DISKS.index("</disk>") + len("</disk>")]
SEED_RETRY = ("retry", "retry", 2000, 10000)


def policies(dom: Domain) -> list[tuple[str, str, str, int | None, int | None]]:
    return [(d.alias, d.werror, d.rerror, d.retry_interval_ms, d.retry_timeout_ms) for d in dom.disks]


def test_seed_bare_disks_named_after_the_caller() -> None:
    # The documentation's two <disk> examples one after another: no root element, no domain.
    dom = parse_definition(SEED_DISKS, name="seed-disks")
    assert (dom.name, dom.uuid, dom.id, dom.skipped) == ("seed-disks", "", None, ())
    assert policies(dom) == [("vdb", *SEED_RETRY), ("sdb", *SEED_RETRY)]
    assert [(d.kind, source_text(d)) for d in dom.disks] == [
        ("virtio-blk", "/path/to/your/storage"),
        ("scsi-hd", "/path/to/your/storage"),
    ]
    assert all(verify(d.policy(), PolicyConfig()).ok for d in dom.disks)


@pytest.mark.parametrize(
    "text",
    [
        SEED_VIRTIO_DISK,  # one <disk> root
        f"<?xml version='1.0' encoding='UTF-8'?>\n{SEED_VIRTIO_DISK}\n",
        f"<devices>{SEED_VIRTIO_DISK}<controller type='scsi' model='virtio-scsi'/></devices>",
    ],
)
def test_one_bare_disk_or_a_devices_block(text: str) -> None:
    assert policies(parse_definition(text.encode(), name="f")) == [("vdb", *SEED_RETRY)]


def test_bare_disks_after_a_declaration_keep_its_encoding() -> None:
    text = f"<?xml version='1.0' encoding='ISO-8859-1'?>{SEED_VIRTIO_DISK}{SEED_VIRTIO_DISK}"
    text = text.replace("/path/to/your/storage", "/srv/caf\u00e9")
    dom = parse_definition(text.encode("latin-1"), name="f")
    assert [source_text(d) for d in dom.disks] == ["/srv/caf\u00e9"] * 2


def test_seed_domain_without_uuid() -> None:
    text = (XML / "seed-vm.xml").read_text()
    dom = parse_definition(text, name="ignored")  # a domain is named by its <name>
    assert (dom.name, dom.uuid, dom.id) == ("seed-vm", "", None)
    assert policies(dom) == [
        ("vda", "enospc", "report", None, None),
        ("vdb", *SEED_RETRY),
        ("sdb", *SEED_RETRY),
    ]
    # The same file as a running domain's live XML would be broken: libvirt always gives a uuid.
    with pytest.raises(ValueError, match="no valid <uuid>"):
        parse_domain(text)
    assert parse_domain(text, inactive=True) == dom


def test_bare_disk_with_a_value_qemu_refuses_is_skipped_with_the_reason() -> None:
    typo = SEED_VIRTIO_DISK.replace("error_policy='retry' rerror", "error_policy='retyr' rerror")
    dom = parse_definition(typo + SEED_DISKS, name="f")
    assert [d.alias for d in dom.disks] == ["vdb", "sdb"]
    assert [(s.target, s.reason) for s in dom.skipped] == [
        ("vdb", "error_policy='retyr' is not a libvirt error policy")
    ]


# --- upstream libvirt's <driver> -----------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "werror", "rerror"),
    [
        ("", "enospc", "report"),  # no policy: QEMU's defaults
        ("error_policy='stop'", "stop", "stop"),  # rerror_policy absent: covers reads too
        ("error_policy='report'", "report", "report"),
        ("error_policy='ignore'", "ignore", "ignore"),
        ("error_policy='enospace'", "enospc", "report"),  # enospace is write-only in QEMU
        ("error_policy='stop' rerror_policy='report'", "stop", "report"),
        ("rerror_policy='stop'", "enospc", "stop"),
        ("error_policy='retry' rerror_policy='report'", "retry", "report"),
        ("error_policy='enospace' rerror_policy='retry'", "enospc", "retry"),
        ("error_policy='default'", "enospc", "report"),
    ],
)
def test_driver_policy_in_qemu_spelling(driver: str, werror: str, rerror: str) -> None:
    d = one_disk(driver)
    assert (d.werror, d.rerror) == (werror, rerror)
    retrying = "retry" in (werror, rerror)
    assert d.policy().retry_feature is (True if retrying else None)  # unknown: the XML cannot tell
    assert (d.retry_interval_ms, d.retry_timeout_ms) == ((1000, 0) if retrying else (None, None))


def test_no_policy_is_a_violation_not_a_crash() -> None:
    d = one_disk()
    assert d.policy_origin == "default"
    violations = set(verify(d.policy(), PolicyConfig()).violations)
    assert {Rule.WERROR_NOT_RETRY, Rule.RERROR_NOT_RETRY} <= violations


def test_timing_without_retry_is_kept() -> None:
    # openEuler's libvirt passes the attributes to QEMU whatever the policy; QEMU accepted them.
    d = one_disk("error_policy='stop' retry_interval='300' retry_timeout='9000'")
    assert (d.werror, d.retry_interval_ms, d.retry_timeout_ms) == ("stop", 300, 9000)


# --- <qemu:override> -------------------------------------------------------------------------


def test_override_wins_over_driver() -> None:
    dom = load(XML / "override.xml")
    vda = only(dom, "ua-disk0")
    assert (vda.werror, vda.rerror, vda.retry_interval_ms, vda.retry_timeout_ms) == (
        "retry",
        "retry",
        1000,
        30000,
    )
    assert vda.policy_origin == "override"
    assert source_text(vda) == "iscsi://192.0.2.10:3260/iqn.2024-01.org.example:store/1"


def test_override_of_werror_only_keeps_driver_rerror() -> None:
    sda = only(load(XML / "override.xml"), "ua-disk1")
    assert (sda.kind, sda.werror, sda.rerror) == ("scsi-hd", "retry", "report")
    assert (sda.retry_interval_ms, sda.retry_timeout_ms) == (1000, 10000)
    assert sda.policy_origin == "override+driver"
    violations = verify(sda.policy(), PolicyConfig()).violations
    assert violations == (Rule.RERROR_NOT_RETRY,)


def test_override_remove_restores_qemu_default() -> None:
    vdc = only(load(XML / "override.xml"), "ua-disk2")
    assert (vdc.werror, vdc.rerror, vdc.retry_interval_ms, vdc.retry_timeout_ms) == (
        "enospc",
        "retry",
        500,
        0,
    )
    assert vdc.policy_origin == "default+driver"


def test_backing_chain_nodes_map_to_the_disk() -> None:
    dom = load(XML / "override.xml")
    vdc = only(dom, "ua-disk2")
    assert (vdc.index, vdc.indexes) == (4, (4, 5))
    disk = model_disks(dom, Config())["ua-disk2"]
    assert (disk.node_name, disk.other_nodes) == (
        "libvirt-4-format",
        ("libvirt-4-storage", "libvirt-5-format", "libvirt-5-storage"),
    )
    assert matched(dom, device="", node_name="libvirt-5-format") == "ua-disk2"
    assert matched(dom, device="", node_name="libvirt-4-storage") == "ua-disk2"
    assert matched(dom, device="", node_name="libvirt-3-format") == "ua-disk0"
    assert matched(dom, device="", node_name="libvirt-9-format") is None
    assert matched(dom, device="", node_name="#block131") is None


def test_cdrom_skipped_silently() -> None:
    dom = load(XML / "override.xml")
    assert [d.alias for d in dom.disks] == ["ua-disk0", "ua-disk1", "ua-disk2"]
    assert dom.skipped == ()
    assert matched(dom, device="", node_name="libvirt-1-format") is None


def test_rbd_hosts_bounded_and_ipv6_bracketed() -> None:
    disk = only(load(XML / "override.xml"), "ua-disk1")
    assert disk.source.hosts == ("mon1:6789", "mon2:6789", "[2001:db8::3]:6789", "mon4")
    assert disk.source.host_count == 5
    # As the exporter shows it: monitors sorted, Ceph's default port spelled out.
    assert source_text(disk) == "rbd://[2001:db8::3]:6789,mon1:6789,mon2:6789,mon4:6789/pool/image"


def test_unbound_qemu_prefix_is_a_value_error() -> None:
    # An unbound prefix is not well-formed XML: a clear ValueError, not a guess.
    with pytest.raises(ValueError, match="not well-formed"):
        parse_domain(domain_xml(disk_xml(), "<qemu:override/>"))


@pytest.mark.parametrize(
    ("prop", "reason"),
    [
        ("<qemu:property name='werror' type='string' value='hang'/>", "not a QEMU error action"),
        ("<qemu:property name='retry_timeout' type='unsigned' value='-5'/>", "out of range"),
        ("<qemu:property name='retry_interval' type='unsigned' value='1s'/>", "not an integer"),
        ("<qemu:property name='rerror' type='string'/>", "has no value"),
    ],
)
def test_bad_override_skips_only_that_disk(prop: str, reason: str) -> None:
    override = (
        "<qemu:override><qemu:device alias='ua-bad'><qemu:frontend>"
        f"{prop}</qemu:frontend></qemu:device></qemu:override>"
    )
    dom = parse_domain(
        domain_xml(disk_xml(alias="ua-bad") + disk_xml(alias="ua-ok", dev="vdb"), override, ns=True)
    )
    assert [d.alias for d in dom.disks] == ["ua-ok"]
    assert len(dom.skipped) == 1
    assert dom.skipped[0].alias == "ua-bad" and dom.skipped[0].target == "vda"
    assert reason in dom.skipped[0].reason


def test_override_auto_is_kept_verbatim() -> None:
    override = (
        "<qemu:override><qemu:device alias='virtio-disk0'><qemu:frontend>"
        "<qemu:property name='werror' type='string' value='auto'/></qemu:frontend></qemu:device></qemu:override>"
    )
    d = parse_domain(domain_xml(disk_xml("error_policy='stop'"), override, ns=True)).disks[0]
    assert (d.werror, d.rerror) == ("auto", "stop")


# --- odd input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "reason"),
    [
        ("error_policy='hang'", "not a libvirt error policy"),
        ("rerror_policy=''", "not a libvirt error policy"),
        ("error_policy='retry' retry_interval='abc'", "not an integer"),
        ("error_policy='retry' retry_timeout='-1'", "out of range"),
        ("error_policy='retry' retry_timeout='99999999999999999999999'", "out of range"),
    ],
)
def test_bad_driver_values_skip_the_disk(driver: str, reason: str) -> None:
    dom = parse_domain(domain_xml(disk_xml(driver)))
    assert dom.disks == ()
    assert reason in dom.skipped[0].reason


def test_disk_without_alias_or_target_skipped() -> None:
    no_alias = "<disk type='file' device='disk'><source file='/a'/><target dev='vda' bus='virtio'/></disk>"
    no_target = "<disk type='file' device='disk'><source file='/b'/><alias name='virtio-disk1'/></disk>"
    dom = parse_domain(domain_xml(no_alias + no_target))
    assert dom.disks == ()
    assert [s.reason.split(" ")[0:2] for s in dom.skipped] == [["no", "<alias"], ["no", "<target"]]


def definition(text: str) -> Domain:
    return parse_definition(text, name="f")


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_domain, "", "not well-formed"),
        (parse_domain, "<domain><name>x</name>", "not well-formed"),
        (parse_domain, "<network><name>x</name></network>", "expected a <domain>"),
        (parse_domain, "<domain><uuid>0bbd3e5b-0977-42a1-8faa-419497c4871c</uuid></domain>", "no <name>"),
        (parse_domain, "<domain><name>x</name></domain>", "no valid <uuid>"),
        (parse_domain, "<domain><name>x</name><uuid>not-a-uuid</uuid></domain>", "no valid <uuid>"),
        # What an operator writes before the domain exists: a domain (uuid optional) or disks.
        (definition, "", "not well-formed"),
        (definition, "<disk type='file'>", "not well-formed"),
        (definition, SEED_VIRTIO_DISK + "<disk>", "not well-formed"),
        (definition, "<network><name>x</name></network>", "got <network>"),
        (definition, "<devices><interface type='network'/></devices>", "got <devices>"),
        (definition, "<interface/><interface/>", "got <interface>"),
        (definition, "<domain><name>a</name></domain><domain><name>b</name></domain>", "got <domain>"),
        (definition, "<domain><name>x</name><uuid>not-a-uuid</uuid></domain>", "no valid <uuid>"),
        (definition, "<domain><uuid>0bbd3e5b-0977-42a1-8faa-419497c4871c</uuid></domain>", "no <name>"),
    ],
)
def test_not_a_domain_raises_value_error(parse: Callable[[str], Domain], text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_entity_expansion_refused() -> None:
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
        + "]><domain><name>&i;</name><uuid>0bbd3e5b-0977-42a1-8faa-419497c4871c</uuid></domain>"
    )
    # expat refuses the amplification (a ValueError), or the name is clipped: never a hang.
    try:
        dom = parse_domain(bomb)
    except ValueError:
        return
    assert len(dom.name) <= MAX_TEXT


def test_domain_without_devices_and_bytes_input() -> None:
    dom = parse_domain(b"<domain><name>x</name><uuid>0BBD3E5B097742A18FAA419497C4871C</uuid></domain>")
    assert (dom.name, dom.uuid, dom.id, dom.disks) == ("x", "0bbd3e5b097742a18faa419497c4871c", None, ())


def test_long_source_clipped() -> None:
    long_path = "/" + "x" * 1000
    xml = domain_xml(
        f"<disk type='file' device='disk'><source file='{long_path}' index='1'/>"
        "<target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>"
    )
    disk = parse_domain(xml).disks[0]
    assert disk.source.path is not None and len(disk.source.path) == MAX_TEXT
    assert source_text(disk) == disk.source.path


@pytest.mark.parametrize(
    ("device", "bus", "kind"),
    [("disk", "sata", "ide-hd"), ("lun", "scsi", "scsi-block"), ("disk", "weird", "weird")],
)
def test_device_kind_from_bus(device: str, bus: str, kind: str) -> None:
    xml = domain_xml(
        f"<disk type='block' device='{device}'><source dev='/dev/sdz' index='1'/>"
        f"<target dev='sdz' bus='{bus}'/><alias name='d0'/></disk>"
    )
    d = parse_domain(xml).disks[0]
    assert (d.kind, source_text(d)) == (kind, "/dev/sdz")


@pytest.mark.parametrize(("device", "bus"), [("cdrom", "sata"), ("floppy", "fdc"), ("disk", "usb")])
def test_removable_media_skipped(device: str, bus: str) -> None:
    xml = domain_xml(
        f"<disk type='file' device='{device}'><target dev='x' bus='{bus}'/><alias name='m0'/></disk>"
    )
    dom = parse_domain(xml)
    assert (dom.disks, dom.skipped) == ((), ())


def test_node_names_of_source_indexes() -> None:
    dom = parse_domain(domain_xml(disk_xml(alias="d12").replace("index='1'", "index='12'")))
    assert matched(dom, device="", node_name="libvirt-12-format") == "d12"
    assert matched(dom, device="", node_name="libvirt-12-storage") == "d12"
    assert matched(dom, device="", node_name="libvirt-1-format") is None
    assert matched(dom, device="", node_name="nbd0") is None
    assert matched(dom, device="", node_name="libvirt-x-format") is None


def test_event_device_fallback_for_drive_mode() -> None:
    no_index = (
        "<disk type='file' device='disk'><driver name='qemu' error_policy='stop'/><source file='/a'/>"
        "<target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>"
    )
    dom = parse_domain(domain_xml(no_index))
    d = dom.disks[0]
    assert (d.index, model_disks(dom, Config())["virtio-disk0"].node_name) == (None, "")
    assert matched(dom, device="drive-virtio-disk0", node_name="#block131") == "virtio-disk0"
    assert (
        matched(dom, device="", qom_path="/machine/peripheral/virtio-disk0/virtio-backend") == "virtio-disk0"
    )
    assert matched(dom, device="", node_name="libvirt-1-format") is None


# --- captured from a real libvirtd (tests/libvirt/capture.py) --------------------------------


def test_captured_stop_policy_domain() -> None:
    dom = load(CAPTURED / "dumpxml-stop.xml")
    assert dom.id is not None and dom.id > 0
    boot = only(dom, "ua-boot")
    assert (boot.target, boot.bus, boot.kind) == ("vda", "virtio", "virtio-blk")
    assert (boot.werror, boot.rerror, boot.policy_origin) == ("stop", "stop", "driver")
    assert boot.source.protocol == "nbd" and boot.source.hosts[0].startswith("127.0.0.1:")
    assert source_text(boot).startswith("nbd://127.0.0.1:")
    assert boot.index is not None
    assert matched(dom, device="", node_name=f"libvirt-{boot.index}-format") == "ua-boot"
    # The local second disk: libvirt's own alias, no policy.
    data = only(dom, "virtio-disk1")
    assert (data.target, data.werror, data.rerror, data.policy_origin) == (
        "vdb",
        "enospc",
        "report",
        "default",
    )
    assert data.source.kind == "file" and data.source.path is not None
    assert data.index is not None and data.index != boot.index
    assert dom.skipped == ()


def test_captured_report_policy_domain() -> None:
    dom = load(CAPTURED / "dumpxml-report.xml")
    boot = only(dom, "ua-boot")
    assert (boot.werror, boot.rerror) == ("report", "report")
    assert boot.policy() == DiskPolicy(
        "report", "report", None, None, retry_feature=None
    )  # unknown: the XML cannot tell


def test_captured_override_domain() -> None:
    # Upstream QEMU 7.2 has no retry: the capture overrides with values it accepts.
    dom = load(CAPTURED / "dumpxml-override.xml")
    boot = only(dom, "ua-boot")
    assert (boot.werror, boot.rerror, boot.policy_origin) == ("ignore", "report", "override")
