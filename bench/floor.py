"""The floor of the event path: the simplest loop that reads and decodes QMP events.

    python -m bench.floor --glob '/tmp/qib-*/f*/*.qmp' --out counts.json [--decoder orjson]

Connects to every socket, negotiates (greeting, ``qmp_capabilities``), then per connection
reads whatever is buffered (64 KiB at a time), splits it into lines and decodes each one with
``orjson.loads`` (or ``json.loads``), counting the events; no model, no hang tracking, no HTTP.
Every 0.1 s it writes ``{"connected": n, "events": total}`` to ``--out``.  The fleet benchmark
(``--scenarios floor``) storms a fleet while this runs and divides its CPU by the events it
read: the µs/event that the exporter, which does the same reading and decoding plus
everything else, is compared with (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
from collections.abc import Callable
from typing import Any

import orjson


class Floor:
    def __init__(self, decode: Callable[[bytes], Any]) -> None:
        self.decode = decode
        self.connected = 0
        self.events = 0

    async def watch(self, path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        await reader.readline()  # greeting
        writer.write(b'{"execute": "qmp_capabilities"}')
        await reader.readline()
        self.connected += 1
        decode = self.decode
        rest = b""
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                return
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            n = 0
            for line in lines:
                if "event" in decode(line):
                    n += 1
            self.events += n


def write_counts(path: str, counts: dict[str, int]) -> None:
    """Atomically (a few bytes, every 0.1 s: not worth a thread)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        json.dump(counts, f)
    os.replace(tmp, path)


async def amain(args: argparse.Namespace) -> None:
    floor = Floor(orjson.loads if args.decoder == "orjson" else json.loads)
    paths = sorted(glob.glob(args.glob))
    tasks = [asyncio.create_task(floor.watch(p)) for p in paths]
    while True:
        write_counts(args.out, {"sockets": len(paths), "connected": floor.connected, "events": floor.events})
        if all(t.done() for t in tasks):
            return
        await asyncio.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--glob", required=True, help="QMP sockets to read")
    p.add_argument("--out", required=True, help="where to write the counts")
    p.add_argument("--decoder", choices=("orjson", "json"), default="orjson")
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
