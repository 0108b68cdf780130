"""Fleet-scale benchmark of the exporter (see docs/performance.md)."""
