"""The storage backend derivation (`exporter.model.backend` and the modules beside it:
`disk_source`, `mounts`, `addresses`): QEMU file names, libvirt sources, the mount table and
operator rules, each with the examples docs/metrics.md shows.

The point of every case: disks on one storage system get one backend, disks on two get two,
and neither an image name nor a credential ever reaches the label."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import Config, parse
from exporter.libvirt.domxml import parse_domain
from exporter.libvirt.translate import model_disks
from exporter.model.backend import MAX_BACKEND, UNKNOWN, BackendRule, derive_backend
from exporter.model.disk_source import source_from_filename, source_from_libvirt, source_from_query_block
from exporter.model.mounts import Mount, parse_mountinfo
from exporter.storage import BackendResolver, MountTable

MOUNTINFO = (
    "22 1 8:3 / / rw,relatime shared:1 - ext4 /dev/sda3 rw,errors=remount-ro\n"
    "23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n"
    "25 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=4010000k\n"
    "40 22 0:40 / /var/lib/images rw,relatime shared:20 - nfs4 filer1.example:/export/vms rw,vers=4.2\n"
    "41 22 0:41 / /var/lib/images/gold rw,relatime shared:21 - nfs 10.1.0.7:/gold rw,vers=3\n"
    "42 22 253:2 / /srv/lvm rw,relatime shared:22 - xfs /dev/mapper/vg--data-images rw\n"
    "43 22 0:43 / /mnt/smb\\040share rw,relatime shared:23 - cifs //NAS01/vmstore/sub rw\n"
    "44 22 0:44 / /srv/gluster rw shared:24 - fuse.glusterfs gl1:/gvol0 rw,user_id=0\n"
    "45 22 0:45 / /srv/cephfs rw shared:25 - ceph 10.2.0.1:6789,10.2.0.2:6789:/vms rw,name=admin\n"
    "46 22 0:46 / /tank/vms rw shared:26 - zfs tank/vms rw,xattr\n"
    "47 22 0:47 / /run rw,nosuid shared:27 - tmpfs tmpfs rw\n"
    "48 22 8:17 / /srv/ssd rw shared:28 - ext4 /dev/sdb1 rw\n"
    "49 22 0:49 / /srv/nfs6 rw shared:29 - nfs [fd00::5]:/exp rw\n"
    "50 22 8:33 / /var/lib/images rw shared:30 - ext4 /dev/sdc1 rw\n"  # hides mount 40
    "garbage line\n"
)
MOUNTS = parse_mountinfo(MOUNTINFO)


def backend(filename: str, mounts: tuple[Mount, ...] = MOUNTS, rules: tuple[BackendRule, ...] = ()) -> str:
    return derive_backend(source_from_filename(filename), mounts, rules)


# --- QEMU file names (query-block inserted.file) -----------------------------------------

QEMU_EXAMPLES = [
    # NBD: the server; an export is one block device, i.e. one disk.
    ("nbd://host:10809/export", "nbd://host:10809", "nbd://host:10809/export"),
    ("nbd://10.0.0.5/vm1", "nbd://10.0.0.5:10809", "nbd://10.0.0.5:10809/vm1"),
    ("nbd://10.0.0.5:10810", "nbd://10.0.0.5:10810", "nbd://10.0.0.5:10810"),
    ("nbd+unix://?socket=/run/x.sock", "nbd+unix:/run/x.sock", "nbd+unix:/run/x.sock"),
    ("nbd+unix:///exp?socket=/run/x.sock", "nbd+unix:/run/x.sock", "nbd+unix:/run/x.sock?export=exp"),
    ("nbd:unix:/run/x.sock:exportname=e", "nbd+unix:/run/x.sock", "nbd+unix:/run/x.sock?export=e"),
    ("nbd:Storage1:10809", "nbd://storage1:10809", "nbd://storage1:10809"),
    ("nbd://[fd00::1]:10809/e", "nbd://[fd00::1]:10809", "nbd://[fd00::1]:10809/e"),
    (
        'json:{"driver": "nbd", "server.host": "::1", "server.port": "10809", "server.type": "inet"}',
        "nbd://[::1]:10809",
        "nbd://[::1]:10809",
    ),
    (
        'json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":"/run/n.sock"},"export":"d"}}',
        "nbd+unix:/run/n.sock",
        "nbd+unix:/run/n.sock?export=d",
    ),
    # RBD: monitors (sorted, default port) plus pool; never the image, never the key.
    (
        "rbd:vms/web-1-disk:id=admin:key=AQBSECRET==:mon_host=10.0.0.2\\;10.0.0.1\\:6790",
        "rbd://10.0.0.1:6790,10.0.0.2:6789/vms",
        "rbd://10.0.0.1:6790,10.0.0.2:6789/vms/web-1-disk",
    ),
    ("rbd:vms/ns1/img@snap:conf=/etc/ceph/c2.conf", "rbd://conf=/etc/ceph/c2.conf/vms", None),
    ("rbd:vms/img", "rbd://ceph/vms", "rbd://ceph/vms/img"),
    (
        'json:{"driver":"raw","file":{"driver":"rbd","pool":"p","image":"i","user":"admin",'
        '"key-secret":"sec0","server":[{"host":"m2","port":"6789"},{"host":"m1","port":"6789"}]}}',
        "rbd://m1:6789,m2:6789/p",
        "rbd://m1:6789,m2:6789/p/i",
    ),
    (
        'json:{"driver":"raw","file.driver":"rbd","file.pool":"p","file.image":"i",'
        '"file.server.0.host":"m2","file.server.1.host":"m1"}',
        "rbd://m1:6789,m2:6789/p",
        None,
    ),
    # iSCSI: portal plus target; the LUN is the disk; credentials dropped.
    (
        "iscsi://10.0.0.9:3260/iqn.2020-01.com.example:array1/3",
        "iscsi://10.0.0.9:3260/iqn.2020-01.com.example:array1",
        "iscsi://10.0.0.9:3260/iqn.2020-01.com.example:array1/3",
    ),
    (
        "iscsi://chap%secret@10.0.0.9/iqn.x:t/0",
        "iscsi://10.0.0.9:3260/iqn.x:t",
        "iscsi://10.0.0.9:3260/iqn.x:t/0",
    ),
    (
        'json:{"driver":"qcow2","file":{"driver":"iscsi","transport":"tcp","portal":"10.0.0.9",'
        '"target":"iqn.x:t","lun":"3","password-secret":"s"}}',
        "iscsi://10.0.0.9:3260/iqn.x:t",
        "iscsi://10.0.0.9:3260/iqn.x:t/3",
    ),
    # GlusterFS: servers plus volume.
    (
        "gluster://gl1/gvol0/dir/img.qcow2",
        "gluster://gl1:24007/gvol0",
        "gluster://gl1:24007/gvol0/dir/img.qcow2",
    ),
    (
        'json:{"driver":"gluster","volume":"v","path":"/a.img","server":[{"type":"inet","host":"g2","port":"24007"},'
        '{"type":"inet","host":"g1","port":"24007"}]}',
        "gluster://g1:24007,g2:24007/v",
        "gluster://g1:24007,g2:24007/v/a.img",
    ),
    # QEMU's own NFS client: the URL does not tell the export from the path, so the server.
    ("nfs://filer2/export/vm.img", "nfs://filer2", "nfs://filer2/export/vm.img"),
    (
        'json:{"driver":"nfs","server":{"type":"inet","host":"filer2"},"path":"/x/y.img"}',
        "nfs://filer2",
        None,
    ),
    # Other network protocols: the server.
    ("ssh://root:pw@backup1:2222/images/x", "ssh://backup1:2222", None),
    ('json:{"driver":"ssh","server":{"host":"backup1"},"path":"/x"}', "ssh://backup1:22", None),
    (
        "https://user:pw@cdn.example/isos/x.iso",
        "https://cdn.example:443",
        "https://cdn.example:443/isos/x.iso",
    ),
    ('json:{"driver":"https","url":"https://cdn.example/y.iso"}', "https://cdn.example:443", None),
    ("nvme://0000:44:00.0/1", "nvme://0000:44:00.0", "nvme://0000:44:00.0/1"),
    ('json:{"driver":"nvme","device":"0000:44:00.0","namespace":1}', "nvme://0000:44:00.0", None),
    # Local files: the filesystem they are on.
    ("/var/lib/images/web-1.qcow2", "block:/dev/sdc", "/var/lib/images/web-1.qcow2"),  # mount 50 hides 40
    ("/var/lib/images/gold/base.raw", "nfs://10.1.0.7/gold", None),
    ("/srv/lvm/a.qcow2", "lvm:vg-data", None),
    ("/mnt/smb share/vm.img", "cifs://nas01/vmstore", None),
    ("/srv/gluster/vm.img", "gluster://gl1/gvol0", None),
    ("/srv/cephfs/vm.img", "cephfs://10.2.0.1:6789,10.2.0.2:6789", None),
    ("/tank/vms/vm.img", "zfs:tank", None),
    ("/run/vm.img", "tmpfs", None),
    ("/srv/ssd/vm.img", "block:/dev/sdb", None),
    ("/srv/nfs6/vm.img", "nfs://[fd00::5]/exp", None),
    ("/home/u/../u/x.img", "block:/dev/sda", "/home/u/x.img"),
    (
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"/srv/ssd/x.qcow2"}}',
        "block:/dev/sdb",
        None,
    ),
    # Block devices: a volume group, an iSCSI target, a whole disk, else the device itself.
    ("/dev/vg0/lv1", "lvm:vg0", None),
    ("/dev/mapper/vg--data-web1", "lvm:vg-data", None),
    ("/dev/mapper/mpatha", "block:/dev/mapper/mpatha", None),
    (
        "/dev/mapper/3600508b4000156d700012000000b0000",
        "block:/dev/mapper/3600508b4000156d700012000000b0000",
        None,
    ),
    (
        "/dev/disk/by-path/ip-10.0.0.9:3260-iscsi-iqn.2020-01.com.example:array1-lun-3",
        "iscsi://10.0.0.9:3260/iqn.2020-01.com.example:array1",
        None,
    ),
    ("/dev/sdb2", "block:/dev/sdb", None),
    ("/dev/nvme0n1p2", "block:/dev/nvme0n1", None),
    ("/dev/nvme0n1", "block:/dev/nvme0n1", None),
    ("/dev/zvol/tank/vm1", "zfs:tank", None),
    ('json:{"driver":"raw","file":{"driver":"host_device","filename":"/dev/vg1/x"}}', "lvm:vg1", None),
    # What cannot be told.
    ("disk.img", UNKNOWN, "disk.img"),  # relative: QEMU's working directory is unknown
    ('json:{"driver":"quorum","children":[]}', "quorum", "json:quorum"),
    ("json:{not json", UNKNOWN, "json:"),
    ("", UNKNOWN, ""),
]


@pytest.mark.parametrize(("filename", "expected", "text"), QEMU_EXAMPLES)
def test_backend_of_qemu_file_names(filename: str, expected: str, text: str | None) -> None:
    source = source_from_filename(filename)
    assert derive_backend(source, MOUNTS) == expected
    if text is not None:
        assert source.text == text


@pytest.mark.parametrize("filename", [f for f, _b, _t in QEMU_EXAMPLES])
def test_no_credential_reaches_a_backend_or_a_source(filename: str) -> None:
    source = source_from_filename(filename)
    for secret in ("SECRET", "secret", "chap", ":pw@", "user:", "sec0"):
        assert secret not in source.text
        assert secret not in derive_backend(source, MOUNTS)


def test_disks_of_one_storage_share_a_backend_and_images_never_count() -> None:
    a = backend("nbd://10.0.0.5:10809/vm-1")
    b = backend("nbd://10.0.0.5:10809/vm-2")
    c = backend("nbd://10.0.0.6:10809/vm-1")
    assert a == b != c
    assert (
        backend("rbd:vms/a:mon_host=m1")
        == backend("rbd:vms/b:mon_host=m1")
        != backend("rbd:other/a:mon_host=m1")
    )
    # Monitors listed in another order are the same cluster.
    assert backend("rbd:vms/a:mon_host=m1\\;m2") == backend("rbd:vms/a:mon_host=m2\\;m1")
    assert backend("/var/lib/images/gold/a.img") == backend("/var/lib/images/gold/sub/b.img")


def test_query_block_entry_uses_file_then_image_filename() -> None:
    assert source_from_query_block({"file": "nbd://h:1/e"}).backend == "nbd://h:1"
    entry = {"image": {"filename": "nbd://h:2/e", "format": "raw"}}
    assert source_from_query_block(entry).backend == "nbd://h:2"
    assert derive_backend(source_from_query_block({"file": 3}), MOUNTS) == UNKNOWN


def test_many_monitors_are_bounded() -> None:
    mons = "\\;".join(f"10.0.0.{i}" for i in range(1, 11))
    got = backend(f"rbd:vms/a:mon_host={mons}")
    assert got == "rbd://10.0.0.10:6789,10.0.0.1:6789,10.0.0.2:6789,10.0.0.3:6789,+6/vms"


def test_nothing_known_about_mounts_gives_unknown_for_files() -> None:
    assert backend("/var/lib/images/a.img", mounts=()) == UNKNOWN
    # Network and block sources need no mount table.
    assert backend("nbd://h:1/e", mounts=()) == "nbd://h:1"
    assert backend("/dev/vg0/lv", mounts=()) == "lvm:vg0"


# --- libvirt <source> ------------------------------------------------------------------

LIBVIRT_DOMAIN = """
<domain type='kvm' id='3'>
  <name>web-1</name>
  <uuid>0b6a8e2c-4d7b-4f0e-9a63-2f1c1e5c7a10</uuid>
  <devices>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='export' index='1'><host name='10.0.0.5' port='10809'/></source>
      <target dev='vda' bus='virtio'/><alias name='virtio-disk0'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='nbd' index='2'><host transport='unix' socket='/run/x.sock'/></source>
      <target dev='vdb' bus='virtio'/><alias name='virtio-disk1'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='vms/web-1-disk' index='3'>
        <host name='m2' port='6789'/><host name='m1'/>
      </source>
      <auth username='admin'><secret type='ceph' uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/></auth>
      <target dev='vdc' bus='virtio'/><alias name='virtio-disk2'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='iscsi' name='iqn.2020-01.com.example:array1/3' index='4'><host name='10.0.0.9'/></source>
      <target dev='sda' bus='scsi'/><alias name='scsi0-0-0-0'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='gluster' name='gvol0/dir/img.qcow2' index='5'><host name='gl1'/></source>
      <target dev='vdd' bus='virtio'/><alias name='virtio-disk3'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/images/gold/data.qcow2' index='6'/>
      <target dev='vde' bus='virtio'/><alias name='virtio-disk4'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/mapper/mpathb' index='7'/>
      <target dev='vdf' bus='virtio'/><alias name='virtio-disk5'/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='default' volume='web-1.qcow2' index='8'/>
      <target dev='vdg' bus='virtio'/><alias name='virtio-disk6'/>
    </disk>
  </devices>
</domain>
"""


def test_libvirt_sources_get_the_backend_qmp_would_show(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    config = parse({"mounts": {"file": str(tmp_path / "mountinfo")}}, "test.yml")
    disks = model_disks(parse_domain(LIBVIRT_DOMAIN), config)
    got = {dev: d.backend for dev, d in disks.items()}
    assert got == {
        "virtio-disk0": backend("nbd://10.0.0.5:10809/export"),
        "virtio-disk1": backend("nbd+unix://?socket=/run/x.sock"),
        "virtio-disk2": backend("rbd:vms/web-1-disk:mon_host=m1\\;m2\\:6789"),
        "scsi0-0-0-0": backend("iscsi://10.0.0.9/iqn.2020-01.com.example:array1/3"),
        "virtio-disk3": backend("gluster://gl1/gvol0/dir/img.qcow2"),
        "virtio-disk4": "nfs://10.1.0.7/gold",
        "virtio-disk5": "block:/dev/mapper/mpathb",
        "virtio-disk6": "pool:default",
    }
    assert got["virtio-disk0"] == "nbd://10.0.0.5:10809"
    assert got["virtio-disk2"] == "rbd://m1:6789,m2:6789/vms"


def test_libvirt_source_without_anything() -> None:
    assert derive_backend(source_from_libvirt("network", None, (), None, None, None)) == UNKNOWN
    assert derive_backend(source_from_libvirt("vhostuser", None, (), None, "/run/v.sock", None)) == (
        "vhostuser:/run/v.sock"
    )


# --- rules -----------------------------------------------------------------------------


def rules(*raw: dict[str, str]) -> tuple[BackendRule, ...]:
    return parse({"backends": list(raw)}, "test.yml").backends


def test_rules_match_the_source_or_the_derived_backend_first_rule_wins() -> None:
    r = rules(
        {"regex": r"/dev/mapper/(san[0-9]+)-.*", "name": r"\1"},
        {"match": "/dev/mapper/mpath*", "name": "san-a"},
        {"match": "nfs://10.1.0.7/*", "name": "gold-filer"},
        {"match": "/dev/mapper/*", "name": "never-reached-for-mpath"},
    )
    # Without the rule, a device-mapper name "A-B" reads as LVM volume group A.
    assert backend("/dev/mapper/san7-lun12") == "lvm:san7"
    assert backend("/dev/mapper/san7-lun12", rules=r) == "san7"
    assert backend("/dev/mapper/mpatha", rules=r) == "san-a"  # matches the source text
    assert backend("/var/lib/images/gold/a.img", rules=r) == "gold-filer"  # matches the backend
    assert backend("nbd://h:1/e", rules=r) == "nbd://h:1"  # no rule: the derivation
    assert backend("/dev/mapper/other", rules=r) == "never-reached-for-mpath"


def test_rule_results_are_bounded() -> None:
    r = rules({"regex": "(.*)", "name": r"\1\1\1"})
    got = backend("/dev/mapper/" + "x" * 200, rules=r)
    assert len(got) == MAX_BACKEND and got.endswith("…")


@pytest.mark.parametrize(
    ("raw", "key", "problem"),
    [
        ("x", "backends", "expected a list"),
        ([{"regex": "(", "name": "x"}], "backends[0].regex", "invalid regular expression"),
        ([{"regex": "a", "name": r"\1"}], "backends[0].name", "group"),
        ([{"regex": "(?P<a>x)", "name": r"\g<b>"}], "backends[0].name", "group"),
        ([{"match": "a", "regex": "b", "name": "x"}], "backends[0]", "exactly one"),
        ([{"name": "x"}], "backends[0]", "exactly one"),
        ([{"match": "a"}], "backends[0].name", "missing"),
        ([{"match": "a", "name": ""}], "backends[0].name", "non-empty"),
        ([{"match": "a", "name": "x" * 200}], "backends[0].name", "at most"),
        ([{"match": "a", "name": "x", "extra": 1}], "backends[0].extra", "unknown key"),
        ([{"match": "a", "name": "x"}, 3], "backends[1]", "mapping"),
    ],
)
def test_bad_rules_name_file_and_key(raw: object, key: str, problem: str) -> None:
    with pytest.raises(Exception) as info:
        parse({"backends": raw}, "/etc/x.yml")
    assert str(info.value).startswith(f"/etc/x.yml: {key}: "), str(info.value)
    assert problem in str(info.value)


def test_bad_mounts_config_names_the_key() -> None:
    with pytest.raises(Exception, match=r"^x.yml: mounts.refresh_interval_seconds: "):
        parse({"mounts": {"refresh_interval_seconds": 0}}, "x.yml")


# --- the mount table -------------------------------------------------------------------


def test_mountinfo_parsing_unescapes_and_skips_garbage() -> None:
    assert Mount("/mnt/smb share", "cifs", "//NAS01/vmstore/sub") in MOUNTS
    assert len(MOUNTS) == 14
    assert parse_mountinfo("1 2 3:4 / /x rw shared:1 - ext4") == ()  # no source field


def test_mount_table_is_reread_after_the_refresh_interval(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text("22 1 8:3 / / rw - ext4 /dev/sda3 rw\n")
    now = [0.0]
    table = MountTable(str(path), 60.0, clock=lambda: now[0])
    resolver = BackendResolver(Config(), table)
    img = source_from_filename("/var/lib/images/a.img")
    assert resolver.backend(img) == "block:/dev/sda"
    path.write_text(path.read_text() + "40 22 0:40 / /var/lib/images rw - nfs4 f1:/vms rw\n")
    now[0] = 59.0
    assert resolver.backend(img) == "block:/dev/sda"  # cached
    now[0] = 60.0
    assert resolver.backend(img) == "nfs://f1/vms"
    path.unlink()
    now[0] = 120.0
    assert resolver.backend(img) == UNKNOWN  # unreadable: nothing is guessed


def test_the_real_mount_table_parses() -> None:
    mounts = MountTable("/proc/self/mountinfo", 60.0).mounts()
    assert any(m.mount_point == "/" for m in mounts)


# --- properties ------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_any_file_name_gives_a_bounded_printable_backend(name: str) -> None:
    got = derive_backend(source_from_filename(name), MOUNTS)
    assert 0 < len(got) <= MAX_BACKEND
    assert got.isprintable()


@given(
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none() | st.text(max_size=10) | st.integers(),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=10,
        ),
        max_size=6,
    )
)
def test_any_json_options_give_a_backend(opts: dict[str, object]) -> None:
    import json

    got = derive_backend(source_from_filename("json:" + json.dumps(opts)), MOUNTS)
    assert 0 < len(got) <= MAX_BACKEND
    assert re.fullmatch(r"[^\n]+", got)
