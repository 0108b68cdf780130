#!/usr/bin/env bash
# Debian/Ubuntu packages the test suite runs for real: QEMU, nbdkit, Prometheus (promtool),
# Alertmanager, systemd's analysis tools, openssl.  Installs only what is missing.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v promtool >/dev/null || need+=(prometheus)
{ command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null; } || need+=(prometheus-alertmanager)
command -v systemd-analyze >/dev/null || need+=(systemd)   # verifies the shipped unit files
command -v openssl >/dev/null || need+=(openssl)           # test certificates for TLS tests
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  echo "installing: ${need[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
