#!/usr/bin/env bash
# `make demo-clean`: stop the demo's VMs and remove its TAP devices, bridge and state.
set -euo pipefail
cd "$(dirname "$0")/.."
state="${RECONCILER_STATE_DIR:-$PWD/.demo/state}"
for pidfile in "$state"/vms/*/qemu.pid; do
    [ -e "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
done
scope="$(.venv/bin/python -c 'import sys; from runtime.network import scope_for; print(scope_for(sys.argv[1]))' "$(realpath -m "$state")")"
for link in $(ip -br link | awk '{print $1}' | cut -d@ -f1 | grep -E "^rc${scope}-|^rcbr0$" || true); do
    ip link del "$link" || true
done
rm -rf "$state/vms" "$state/state.db"*
echo "demo VMs stopped and removed"
