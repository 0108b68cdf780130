"""qemu-iohang-exporter: Prometheus metrics for QEMU disk IO hangs and error policies."""

__version__ = "0.1.0"
