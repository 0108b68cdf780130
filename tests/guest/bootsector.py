"""A 512-byte x86 boot sector that does continuous disk IO through BIOS ``int 13h``.

SeaBIOS loads it at ``0000:7C00`` from the boot disk (virtio-blk or scsi-hd) with the BIOS
drive number in ``DL``.  It prints a banner to QEMU's debug console (``isa-debugcon`` at port
``0x402``), then loops forever:

* write 1 sector (CHS 0/0/2, i.e. LBA 1) from ``0000:7C00`` (the boot sector itself), then
  print ``W`` on success or ``w`` on failure (carry flag set by the BIOS);
* read the same sector back into ``0000:7E00``, then print ``R`` or ``r``;
* wait ``pause_us`` microseconds with ``int 15h AH=86h`` so a failing disk produces a bounded
  stream of ``BLOCK_IO_ERROR`` events instead of tens of thousands per second.

The boot sector never overwrites itself (LBA 0).  SeaBIOS uses the same debug port for its own
log, hence the banner: the guest's status characters are what follows ``BANNER``.

No assembler is needed: the machine code below is written out byte by byte; each instruction
carries its assembly in the comment, and the few jumps are resolved by `_Code` from labels.
Check it with ``objdump -D -b binary -mi8086 --adjust-vma=0x7c00 boot.img``.
"""

from __future__ import annotations

from pathlib import Path

ORIGIN = 0x7C00
DEBUGCON_PORT = 0x402
BANNER = b"\nIOLOOP\n"
# Status characters printed after each operation.
WRITE_OK, WRITE_FAIL, READ_OK, READ_FAIL = "W", "w", "R", "r"
DRIVE_VAR = 0x0500  # free conventional memory: where the boot drive number is kept


class _Code:
    """Machine code with labels: short (rel8) and near (rel16) jumps and 16-bit addresses."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, str]] = []  # (offset, label, kind)

    def emit(self, *data: int) -> None:
        self.buf += bytes(data)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.buf)

    def rel8(self, opcode: int, target: str) -> None:
        self.emit(opcode, 0)
        self.fixups.append((len(self.buf) - 1, target, "rel8"))

    def rel16(self, opcode: int, target: str) -> None:
        self.emit(opcode, 0, 0)
        self.fixups.append((len(self.buf) - 2, target, "rel16"))

    def abs16(self, opcode: int, target: str) -> None:
        self.emit(opcode, 0, 0)
        self.fixups.append((len(self.buf) - 2, target, "abs16"))

    def link(self) -> bytes:
        out = bytearray(self.buf)
        for at, target, kind in self.fixups:
            dest = self.labels[target]
            if kind == "rel8":
                disp = dest - (at + 1)
                if not -128 <= disp <= 127:
                    raise ValueError(f"short jump to {target} out of range ({disp})")
                out[at] = disp & 0xFF
            elif kind == "rel16":
                out[at : at + 2] = ((dest - (at + 2)) & 0xFFFF).to_bytes(2, "little")
            else:
                out[at : at + 2] = (self.origin + dest).to_bytes(2, "little")
        return bytes(out)


def _lo_hi(value: int) -> tuple[int, int]:
    return value & 0xFF, (value >> 8) & 0xFF


def _io(c: _Code, ah: int, buffer: int, ok: str, fail: str, tag: str) -> None:
    """One int 13h CHS transfer of sector 0/0/2 and its status character."""
    c.emit(0xB8, 0x01, ah)  #                    mov ax, (ah << 8) | 1   ; AH=function, AL=1 sector
    c.emit(0xBB, *_lo_hi(buffer))  #             mov bx, buffer          ; ES:BX = data
    c.emit(0xB9, 0x02, 0x00)  #                  mov cx, 0x0002          ; CH=cylinder 0, CL=sector 2
    c.emit(0xB6, 0x00)  #                        mov dh, 0               ; head 0
    c.emit(0x8A, 0x16, *_lo_hi(DRIVE_VAR))  #    mov dl, [DRIVE_VAR]     ; boot drive
    c.emit(0xCD, 0x13)  #                        int 0x13                ; CF=1 on error
    c.emit(0xB0, ord(ok))  #                     mov al, ok
    c.rel8(0x73, tag)  #                         jnc tag
    c.emit(0xB0, ord(fail))  #                   mov al, fail
    c.label(tag)  #                            tag:
    c.emit(0xBA, *_lo_hi(DEBUGCON_PORT))  #      mov dx, 0x402
    c.emit(0xEE)  #                              out dx, al


def boot_sector(pause_us: int = 20_000) -> bytes:
    """The 512-byte boot sector (ends with the 0x55 0xAA signature)."""
    if not 0 <= pause_us < 1 << 32:
        raise ValueError("pause_us must fit in 32 bits")
    c = _Code(ORIGIN)
    c.emit(0xFA)  #                              cli
    c.emit(0x31, 0xC0)  #                        xor ax, ax
    c.emit(0x8E, 0xD8)  #                        mov ds, ax
    c.emit(0x8E, 0xC0)  #                        mov es, ax
    c.emit(0x8E, 0xD0)  #                        mov ss, ax
    c.emit(0xBC, *_lo_hi(ORIGIN))  #             mov sp, 0x7c00          ; stack below us
    c.emit(0xFB)  #                              sti                     ; int 15h/86h needs IRQs
    c.emit(0xFC)  #                              cld                     ; lodsb goes forward
    c.emit(0x88, 0x16, *_lo_hi(DRIVE_VAR))  #    mov [DRIVE_VAR], dl
    c.abs16(0xBE, "banner")  #                   mov si, banner
    c.emit(0xBA, *_lo_hi(DEBUGCON_PORT))  #      mov dx, 0x402
    c.label("print")  #                        print:
    c.emit(0xAC)  #                              lodsb                   ; al = [si++]
    c.emit(0x84, 0xC0)  #                        test al, al
    c.rel8(0x74, "loop")  #                      jz loop
    c.emit(0xEE)  #                              out dx, al
    c.rel8(0xEB, "print")  #                     jmp print
    c.label("loop")  #                         loop:
    _io(c, 0x03, ORIGIN, WRITE_OK, WRITE_FAIL, "wdone")  # write LBA 1 from 0x7c00
    _io(c, 0x02, 0x7E00, READ_OK, READ_FAIL, "rdone")  # read LBA 1 into 0x7e00
    c.emit(0xB4, 0x86)  #                        mov ah, 0x86            ; BIOS wait
    c.emit(0xB9, *_lo_hi(pause_us >> 16))  #     mov cx, pause_us >> 16
    c.emit(0xBA, *_lo_hi(pause_us))  #           mov dx, pause_us & 0xffff
    c.emit(0xCD, 0x15)  #                        int 0x15
    c.rel16(0xE9, "loop")  #                     jmp loop
    c.label("banner")  #                       banner:
    c.emit(*BANNER, 0)  #                        db "\nIOLOOP\n", 0
    code = c.link()
    if len(code) > 510:
        raise ValueError("boot sector code too long")
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def write_disk_image(path: Path, size: int = 1 << 20, pause_us: int = 20_000) -> Path:
    """A raw disk image of ``size`` bytes whose first sector is the IO-loop boot sector."""
    with path.open("wb") as f:
        f.write(boot_sector(pause_us))
        f.truncate(size)
    return path


def guest_status(debugcon_text: str) -> str:
    """The status characters the guest printed so far ('' before it booted)."""
    _head, sep, tail = debugcon_text.partition(BANNER.decode())
    return tail if sep else ""
