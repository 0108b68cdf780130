"""/metrics gzip: both paths (inline for small pages, a thread for large ones) are plain gzip."""

from __future__ import annotations

import gzip

import pytest

from exporter.web import server as web


@pytest.mark.parametrize("size", [0, 1000, web._GZIP_INLINE_BYTES + 1, 8_000_000])
async def test_gzip_round_trips(size: int) -> None:
    line = b'qemu_block_read_bytes_total{device="virtio-disk0",vm="vm0042"} 1.2345e+09\n'
    data = (line * (size // len(line) + 1))[:size]
    packed = await web._gzip(data)
    assert gzip.decompress(packed) == data
    if size > 100_000:
        assert len(packed) < size / 10
