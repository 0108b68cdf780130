"""The libvirt source: every running domain of a libvirt URI, QEMU's events forwarded by
libvirtd (`source`: the connection, its domains and their events), libvirt-python's blocking
calls and event thread kept off the loop (`calls`), events handed from that thread to the loop
in bounded memory (`inbox`), the pure translation of what libvirt reports into the model (run
states, block statistics, disks: `translate`), and the pure parser of a domain's XML: disks,
aliases, node names, error policy (`domxml`).

May import: ``exporter.model``, ``exporter.config``, ``exporter.storage``, ``exporter.runtime``
(backoff) and ``exporter.qmp.discovery`` (static labels); never ``exporter.hang``, ``metrics`` or
``web``.  Inside, ``source`` stands on the others and the pure ``translate`` and ``domxml`` on
none of the I/O.  ``import libvirt`` here is the libvirt-python
binding, not this package.
"""
