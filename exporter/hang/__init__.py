"""IO hang inference: the pure per-disk state machine (`machine`), what a finished hang leaves
(`outcome`: how it ended, the record), a tracker's saved state for the state file (`snapshot`)
and the checks on the numbers fed to them (`numbers`), the component that feeds the machine
from the model's events and keeps hangs across restarts (`tracking`), the per-backend blast
radius (`blast`), and after the outage the hang journal (`journal`) grouped into incidents
(`incidents`).

May import: ``exporter.model`` and ``exporter.config``.  Nothing here knows QMP, libvirt,
Prometheus or HTTP: metrics and the status page read hang tracking, never the other way.
"""
