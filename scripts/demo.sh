#!/usr/bin/env bash
# Set up and run the built-in demo (simulated VMs whose storage fails and recovers + the exporter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
