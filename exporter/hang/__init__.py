"""IO hang inference: the pure per-disk state machine (`machine`) and the component that feeds
it from the model's events and keeps hangs across restarts (`tracking`)."""

from exporter.hang.machine import CompletedHang, DiskHangTracker, HangOutcome

__all__ = ["CompletedHang", "DiskHangTracker", "HangOutcome"]
