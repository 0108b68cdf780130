"""``qmpsim run``: run a fleet of simulated QEMUs with an optional HTTP control API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from .fleet import Fleet, FleetConfig, FleetError, generate_fleet, load_fleet


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmpsim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a fleet of simulated VMs")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--fleet", metavar="FLEET.yaml", help="fleet file")
    src.add_argument("--generate", type=int, metavar="N", help="N compliant VMs")
    run.add_argument("--disks", type=int, default=4, help="disks per generated VM")
    run.add_argument("--socket-dir", help="socket directory of generated VMs")
    run.add_argument("--interval-ms", type=int, default=1000, help="generated retry_interval")
    run.add_argument("--timeout-ms", type=int, default=10000, help="generated retry_timeout")
    run.add_argument("--in-flight", type=int, default=1, help="generated requests in flight")
    run.add_argument("--control-listen", type=_parse_listen, metavar="HOST:PORT")
    run.add_argument("--control-port-file", metavar="FILE", help="write the bound port here")
    return parser


def _write_port(path: str, port: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def _run(config: FleetConfig, args: argparse.Namespace) -> int:
    fleet = Fleet(config)
    await fleet.start()
    runner = None
    if args.control_listen is not None:
        from .control import start_control

        runner, port = await start_control(fleet, *args.control_listen)
        if args.control_port_file:
            _write_port(args.control_port_file, port)
        print(f"qmpsim: control API on http://{args.control_listen[0]}:{port}", flush=True)
    print(
        f"qmpsim: {len(fleet.vms)} VMs, {len(fleet.hung)} hung sockets in {config.socket_dir}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if runner is not None:
        await runner.cleanup()
    await fleet.stop(graceful=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.fleet is not None:
            config = load_fleet(args.fleet)
        else:
            if not args.socket_dir:
                raise FleetError("--generate needs --socket-dir")
            if args.generate < 1 or args.disks < 0:
                raise FleetError("--generate must be >= 1 and --disks >= 0")
            config = generate_fleet(
                args.generate,
                args.disks,
                args.socket_dir,
                args.interval_ms,
                args.timeout_ms,
                args.in_flight,
            )
    except FleetError as e:
        print(f"qmpsim: error: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(config, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
