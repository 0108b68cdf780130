"""The QMP transport and discovery, and what the QMP source reads: the read-only client every
outgoing QMP message passes through (`readonly`: the allowlist, the reader in the transport
callback), the socket discovery that keeps one `exporter.qmp_watch.VMWatcher` per socket
(`discovery`), how a session fails (`failures`: connect reasons, the silence watchdog,
`SessionLost`), QMP replies read into the model (`replies`: query-block, qom-get,
query-blockstats) and event messages decoded or held while a session is established
(`messages`).

May import: ``exporter.model``, ``exporter.config``, ``exporter.runtime`` and
``exporter.qmp_watch`` (the QMP source itself, which sits beside this package as the design
names it).
"""
