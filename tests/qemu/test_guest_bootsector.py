"""The IO-loop boot sector is what its listing says (no QEMU needed)."""

from __future__ import annotations

from tests.guest.bootsector import BANNER, boot_sector, guest_status

# objdump -D -b binary -mi8086 --adjust-vma=0x7c00 of the first 0x63 bytes (pause 20000 us).
EXPECTED_CODE = bytes.fromhex(
    "fa 31c0 8ed8 8ec0 8ed0 bc007c fb fc 88160005 be637c ba0204"  # setup, banner pointer
    " ac 84c0 7403 ee ebf8"  # print loop
    " b80103 bb007c b90200 b600 8a160005 cd13 b057 7302 b077 ba0204 ee"  # write, 'W'/'w'
    " b80102 bb007e b90200 b600 8a160005 cd13 b052 7302 b072 ba0204 ee"  # read, 'R'/'r'
    " b486 b90000 ba204e cd15 e9bdff"  # int 15h wait, jmp loop
)


def test_boot_sector_bytes() -> None:
    sector = boot_sector(20_000)
    assert len(sector) == 512
    assert sector[-2:] == b"\x55\xaa"
    assert sector.startswith(EXPECTED_CODE + BANNER + b"\0")
    assert set(sector[len(EXPECTED_CODE) + len(BANNER) + 1 : -2]) == {0}


def test_pause_is_encoded_in_cx_dx() -> None:
    sector = boot_sector(0x0001_86A0)  # 100000 us
    assert bytes.fromhex("b486 b90100 baa086 cd15") in sector


def test_guest_status_follows_the_banner() -> None:
    assert guest_status("SeaBIOS log...\nBooting from Hard Disk...\n") == ""
    assert guest_status("SeaBIOS WR log" + BANNER.decode() + "WRWRwr") == "WRWRwr"
