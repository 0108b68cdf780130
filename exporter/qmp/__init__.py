"""The QMP transport and discovery: the read-only client every outgoing QMP message passes
through (`readonly`: the allowlist, the reader in the transport callback) and the socket
discovery that keeps one `exporter.qmp_watch.VMWatcher` per socket (`discovery`).

May import: ``exporter.model``, ``exporter.config``, ``exporter.runtime`` and
``exporter.qmp_watch`` (the QMP source itself, which sits beside this package as the design
names it).
"""
