"""Configuration: the settings (`settings`), read from an optional YAML file (`parse`, with the
typed reader and its one-line errors in `reader`); `exporter.cli` merges the flags over it.

May import: ``exporter.model`` only.  Every other part of the exporter imports its settings
from here, so the configuration never imports a service back.
"""

from exporter.config.parse import (
    load_file,
    parse,
)
from exporter.config.reader import (
    DEFAULT_PORT,
    RESERVED_LABELS,
    ConfigError,
    Reader,
    check_label_name,
    read_yaml,
    validate_libvirt_uri,
    validate_listen_address,
    validate_telemetry_path,
)
from exporter.config.settings import (
    DEFAULT_JOURNAL_MAX_BYTES,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_SOCKET_GLOB,
    LOG_FORMATS,
    LOG_LEVELS,
    MIN_JOURNAL_MAX_BYTES,
    AlertingConfig,
    CollectorsConfig,
    Config,
    HangConfig,
    HealthConfig,
    LibvirtConfig,
    MountsConfig,
    QMPConfig,
    static_labels,
)

__all__ = [
    "DEFAULT_JOURNAL_MAX_BYTES",
    "DEFAULT_LISTEN_ADDRESS",
    "DEFAULT_PORT",
    "DEFAULT_SOCKET_GLOB",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MIN_JOURNAL_MAX_BYTES",
    "RESERVED_LABELS",
    "AlertingConfig",
    "CollectorsConfig",
    "Config",
    "ConfigError",
    "HangConfig",
    "HealthConfig",
    "LibvirtConfig",
    "MountsConfig",
    "QMPConfig",
    "Reader",
    "check_label_name",
    "load_file",
    "parse",
    "read_yaml",
    "static_labels",
    "validate_libvirt_uri",
    "validate_listen_address",
    "validate_telemetry_path",
]
