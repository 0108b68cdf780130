"""The source-neutral model, the ground floor: what is known about each VM (`state`), its
disks' policy and its verdict (`policy`), storage backends (`backend`; a disk's source from QEMU
or libvirt in `disk_source`, a local path's filesystem or device in `mounts`, servers spelled
alike in `addresses`), the typed events every source turns its input into (`events`) and how
sources report them (`sink`); and the fixed vocabularies the rest shares: the alerts' names,
thresholds and texts (`alerts`) and the metric collectors an operator switches (`collectors`).

May import: nothing of the exporter outside ``exporter.model``.  Sources import from here; the
model, hang tracking and metrics never see a raw QMP message, a socket path or a libvirt
object.
"""
