"""Reading a YAML configuration: typed values out of a mapping, each problem a `ConfigError` that
names the file (or flag) and the dotted key, so that the command line prints one line and
exits 2 instead of a traceback.  Shared by the exporter's config file and the web config."""

from __future__ import annotations

import math
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PORT = 9738


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator (`origin: key: problem`)."""

    def __init__(self, origin: str, key: str, problem: str) -> None:
        super().__init__(f"{origin}: {key}: {problem}")
        self.origin = origin
        self.key = key
        self.problem = problem


# --- validation helpers -------------------------------------------------------------------


class Reader:
    """Reads typed values out of a YAML mapping, raising ConfigError with the dotted key."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.origin, key, problem)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(_join(key, str(k)), "keys must be strings")
            if k not in allowed:
                raise self.fail(_join(key, k), f"unknown key (expected one of {sorted(allowed)})")
        return value

    def string(self, value: Any, key: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {list(choices)}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of strings, got {_kind(value)}")
        return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))

    def seconds(self, value: Any, key: str, *, minimum: float = 0.0, strict: bool = True) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(key, f"expected a number of seconds, got {_kind(value)}")
        if value < minimum or (strict and value == minimum):
            op = ">" if strict else ">="
            raise self.fail(key, f"must be {op} {minimum:g}, got {value:g}")
        return float(value)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_kind(value)}")
        return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    return f"{type(value).__name__} {value!r}"


def validate_listen_address(origin: str, key: str, value: str) -> tuple[str, int]:
    """Split ``host:port`` (``:port`` = all interfaces, ``[::1]:port`` for IPv6)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(origin, key, f"{value!r} is not host:port (e.g. ':{DEFAULT_PORT}')")
    host = host.strip("[]")
    return host, int(port_s)


def validate_telemetry_path(origin: str, key: str, value: str) -> str:
    if not value.startswith("/") or value == "/":
        raise ConfigError(origin, key, f"{value!r} must be an absolute path other than '/'")
    return value


def read_yaml(path: str) -> Any:
    """Read a YAML document; a missing, unreadable or malformed file is a `ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", "not a text file") from None
    except OSError as exc:
        raise ConfigError(path, "(file)", exc.strerror or str(exc)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(syntax)"
        raise ConfigError(path, where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None


def validate_libvirt_uri(origin: str, key: str, uri: str) -> str:
    """A libvirt connection URI of the QEMU driver (``qemu:///system``, ``qemu+ssh://h/system``)."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme.split("+")[0] != "qemu":
        raise ConfigError(origin, key, f"{uri!r} is not a libvirt QEMU URI (e.g. 'qemu:///system')")
    return uri


#: Label names the exporter sets itself: a static label may not take one.
RESERVED_LABELS = frozenset(
    {
        "vm",
        "device",
        "backend",
        "drive",
        "node_name",
        "qdev_type",
        "werror",
        "rerror",
        "rule",
        "operation",
        "action",
        "outcome",
        "status",
        "uuid",
        "qemu_version",
        "socket",
        "reason",
        "command",
        "event",
        "le",
        "instance",
        "job",
    }
)


def check_label_name(origin: str, key: str, name: str) -> None:
    valid = name and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c == "_" for c in name)
    if not valid or not name.isascii() or name.startswith("__"):
        raise ConfigError(origin, key, f"{name!r} is not a valid Prometheus label name")
    if name in RESERVED_LABELS:
        raise ConfigError(origin, key, f"{name!r} is a label the exporter sets itself")
