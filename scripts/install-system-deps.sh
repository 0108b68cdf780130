#!/usr/bin/env bash
# Debian/Ubuntu packages the test suite runs for real: QEMU, nbdkit, Prometheus (promtool),
# Alertmanager, systemd's analysis tools, openssl, Chromium (headless: the status page test),
# libvirt (a real libvirtd the libvirt tests start themselves) and what building PyPI
# libvirt-python needs.  Installs only what is missing.
set -euo pipefail
need=()
# installed <package>: true when dpkg has it installed (for packages no single command proves).
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v promtool >/dev/null || need+=(prometheus)
{ command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null; } || need+=(prometheus-alertmanager)
command -v systemd-analyze >/dev/null || need+=(systemd)   # verifies the shipped unit files
command -v openssl >/dev/null || need+=(openssl)           # test certificates for TLS tests
command -v chromium >/dev/null || need+=(chromium)         # the status page test's real browser
# libvirt: the daemon and QEMU driver (tests/libvirt runs a real libvirtd without systemd),
# virsh, and the headers PyPI libvirt-python compiles against (pkg-config finds them).
for pkg in libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config; do
  installed "$pkg" || need+=("$pkg")
done
# libvirt-python ships only as an sdist: it needs a C compiler and the Python headers of the
# interpreter that builds it (pyenv/uv builds bring their own; Debian's python3 needs python3-dev).
command -v gcc >/dev/null || need+=(gcc)
py=${PYTHON:-python3}
if ! "$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  need+=(python3-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  echo "installing: ${need[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
