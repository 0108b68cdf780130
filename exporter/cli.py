"""Command line: exporter-toolkit style flags over an optional YAML config file.

Any configuration problem ends the process with one line naming the flag or file and key, and
exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from typing import NoReturn

from exporter import __version__
from exporter.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    CollectorsConfig,
    Config,
    ConfigError,
    load_file,
    validate_libvirt_uri,
    validate_listen_address,
    validate_telemetry_path,
)
from exporter.model.collectors import COLLECTORS, UnknownCollector

LIBVIRT_MISSING = (
    "--libvirt.uri needs the libvirt Python binding, which is not installed: "
    "pip install 'qemu-iohang-exporter[libvirt]' (it builds against libvirt: apt-get install libvirt-dev pkg-config gcc python3-dev)"
)

PROG = "qemu-iohang-exporter"


#: (flag after ``--health.``, `HealthConfig` field = ``health:`` key, help)
_HEALTH_FLAGS = (
    ("max-loop-lag", "max_loop_lag_seconds", "event-loop lag that makes /healthz 503 (default 5)"),
    ("loop-lag-window", "loop_lag_window_seconds", "how long /healthz remembers such a lag (default 10)"),
    (
        "reader-stall",
        "reader_stall_seconds",
        "QMP reader idle with data waiting for this long: unhealthy (default 10)",
    ),
)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus a message; operators want one line that names the flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: --collector.blockstat must not silently mean --collector.blockstats.
    p = OneLineParser(
        prog=PROG, description="Prometheus exporter for QEMU disk IO hangs, over QMP.", allow_abbrev=False
    )
    p.add_argument("--config.file", dest="config_file", metavar="PATH", help="YAML configuration file")
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="exporter-toolkit web config file: TLS, basic auth, extra headers",
    )
    p.add_argument(
        "--web.listen-address",
        dest="listen_address",
        metavar="ADDR",
        help="address to listen on for HTTP (default :9738)",
    )
    p.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        metavar="PATH",
        help="path under which to expose metrics (default /metrics)",
    )
    p.add_argument(
        "--qmp.socket",
        dest="sockets",
        action="append",
        metavar="PATH",
        help="QMP unix socket to watch (repeatable)",
    )
    p.add_argument(
        "--qmp.glob",
        dest="globs",
        action="append",
        metavar="PATTERN",
        help="glob of QMP sockets to watch (repeatable; default /run/qemu-iohang-exporter/*.qmp)",
    )
    p.add_argument(
        "--libvirt.uri",
        dest="libvirt_uris",
        action="append",
        metavar="URI",
        help="watch every running domain of this libvirt URI, e.g. qemu:///system (repeatable; "
        "needs the libvirt extra)",
    )
    p.add_argument(
        "--hang.state-file",
        dest="state_file",
        metavar="PATH",
        help="where open hangs are persisted across restarts",
    )
    p.add_argument(
        "--hang.journal-file",
        dest="journal_file",
        metavar="PATH",
        help="append every completed hang to this file as a JSON line (rotated to PATH.1 by size)",
    )
    for flag, key, meaning in _HEALTH_FLAGS:
        p.add_argument(f"--health.{flag}", dest=key, metavar="SECONDS", help=meaning)
    _add_collector_flags(p)
    p.add_argument("--log.level", dest="log_level", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--log.format", dest="log_format", choices=LOG_FORMATS, help="log format (default logfmt)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _add_collector_flags(p: argparse.ArgumentParser) -> None:
    """``--collector.NAME`` and ``--no-collector.NAME`` for each collector (node_exporter style;
    the ``no-`` form is left out of --help), and ``--collector.disable-defaults``."""
    for name, info in COLLECTORS.items():
        state = "default on" if info.default else "default off"
        p.add_argument(
            f"--collector.{name}",
            dest="collector_switches",
            action="append_const",
            const=(name, True),
            help=f"enable the {name} collector: {info.help} ({state})",
        )
        p.add_argument(
            f"--no-collector.{name}",
            dest="collector_switches",
            action="append_const",
            const=(name, False),
            help=argparse.SUPPRESS,
        )
    p.add_argument(
        "--collector.disable-defaults",
        dest="collectors_disable_defaults",
        action="store_true",
        help="start from no collector: only those enabled with --collector.NAME (or in the config file)",
    )


def resolve(args: argparse.Namespace) -> Config:
    """The file's settings, then each flag that was given on top."""
    cfg = load_file(args.config_file) if args.config_file else Config()
    if args.listen_address is not None:
        validate_listen_address("flag", "--web.listen-address", args.listen_address)
        cfg = dataclasses.replace(cfg, listen_address=args.listen_address)
    if args.telemetry_path is not None:
        validate_telemetry_path("flag", "--web.telemetry-path", args.telemetry_path)
        cfg = dataclasses.replace(cfg, telemetry_path=args.telemetry_path)
    if args.sockets or args.globs:
        qmp = dataclasses.replace(
            cfg.qmp,
            sockets=tuple(args.sockets or cfg.qmp.sockets),
            globs=tuple(args.globs or cfg.qmp.globs),
        )
        cfg = dataclasses.replace(cfg, qmp=qmp)
    if args.libvirt_uris:
        for uri in args.libvirt_uris:
            validate_libvirt_uri("flag", "--libvirt.uri", uri)
        uris = tuple(dict.fromkeys(args.libvirt_uris))
        cfg = dataclasses.replace(cfg, libvirt=dataclasses.replace(cfg.libvirt, uris=uris))
    if args.state_file is not None:
        cfg = dataclasses.replace(cfg, hang=dataclasses.replace(cfg.hang, state_file=args.state_file))
    if args.journal_file is not None:
        if not args.journal_file:
            raise ConfigError("flag", "--hang.journal-file", "expected a path")
        cfg = dataclasses.replace(cfg, hang=dataclasses.replace(cfg.hang, journal_file=args.journal_file))
    for flag, key, _ in _HEALTH_FLAGS:
        if getattr(args, key) is not None:
            seconds = _flag_seconds(f"--health.{flag}", getattr(args, key))
            cfg = dataclasses.replace(cfg, health=dataclasses.replace(cfg.health, **{key: seconds}))
    if args.collector_switches or args.collectors_disable_defaults:
        cfg = dataclasses.replace(
            cfg,
            collectors=CollectorsConfig(
                cfg.collectors.switches + tuple(args.collector_switches or ()),
                cfg.collectors.disable_defaults or args.collectors_disable_defaults,
            ),
        )
    if args.log_level is not None:
        cfg = dataclasses.replace(cfg, log_level=args.log_level)
    if args.log_format is not None:
        cfg = dataclasses.replace(cfg, log_format=args.log_format)
    return cfg


def _flag_seconds(flag: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError("flag", flag, f"expected a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ConfigError("flag", flag, f"must be > 0, got {value}")
    return seconds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse, but an unknown ``--collector.NAME`` says which collectors exist."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        for prefix in ("--collector.", "--no-collector."):
            if flag.startswith(prefix):
                parser.error(f"{flag}: {UnknownCollector(flag.removeprefix(prefix))}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from exporter.web.webconfig import load_web_config

    try:
        config = resolve(args)
        web_config = load_web_config(args.web_config_file) if args.web_config_file else None
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if config.libvirt.uris:
        try:
            import libvirt  # noqa: F401
        except ImportError:
            print(f"{PROG}: {LIBVIRT_MISSING}", file=sys.stderr)
            return 2

    from exporter.app import Exporter
    from exporter.hang.journal import JournalError
    from exporter.runtime import logsetup
    from exporter.runtime.fd_limit import raise_soft_limit

    logsetup.setup(config.log_level, config.log_format)
    raise_soft_limit()  # every watched socket is a descriptor (exporter.runtime.fd_limit)
    try:
        exporter = Exporter(config, web_config=web_config)
    except JournalError as exc:  # e.g. its directory does not exist
        where = (
            "--hang.journal-file" if args.journal_file is not None else f"{config.origin}: hang.journal_file"
        )
        print(f"{PROG}: {where}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(exporter.run_until_signal())
    except OSError as exc:  # e.g. the listen address is in use
        print(f"{PROG}: {config.listen_address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
