#!/usr/bin/env bash
# `make demo`: deploy fleet-example on the embedded defaults (SQLite state, a local bridge, QEMU)
# and show it running: validate, diff, apply, status, then ask the web service for a page on its
# VM address. Run as root (bridges and TAP devices). `make demo-clean` removes what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
export RECONCILER_STATE_DIR="${RECONCILER_STATE_DIR:-$PWD/.demo/state}"
# fleet-example's web reads a secret (fleet-example/secrets/web.sops.yaml) encrypted with sops
# for a TEST-ONLY age key that is committed to this repository: the demo decrypts it with that
# key. It protects nothing; a real fleet encrypts for its hosts' own key.
export SOPS_AGE_KEY_FILE="${SOPS_AGE_KEY_FILE:-$PWD/tests/secrets/age-key.txt}"
echo "== secrets are decrypted with the TEST-ONLY age key $SOPS_AGE_KEY_FILE (demo only)"

demo_repo="$PWD/.demo/fleet"
if [ ! -d "$demo_repo/.git" ]; then
    mkdir -p "$demo_repo"
    cp -r fleet-example/. "$demo_repo"
    git -C "$demo_repo" init -q -b main
    git -C "$demo_repo" add -A
    git -C "$demo_repo" -c user.email=demo@example.invalid -c user.name=demo commit -qm "fleet-example"
fi

if ! $bin/reconciler kernel ls 2>/dev/null | grep -q .; then
    echo "== registering Debian's cloud kernel"
    deb="$(bash deploy/fetch-debian-kernel.sh "$PWD/.demo/kernels")"
    $bin/reconciler kernel import "$deb"
fi

echo "== reconciler validate"
$bin/reconciler validate --repo "$demo_repo"
echo "== reconciler diff (exit 2 means changes)"
$bin/reconciler diff --repo "$demo_repo" | tail -n 1 || [ "${PIPESTATUS[0]}" -eq 2 ]
echo "== reconciler apply (builds the artifacts, boots the VMs under QEMU, waits for health)"
$bin/reconciler apply --repo "$demo_repo" | grep -v '^ ' | grep -v '^$'
echo "== reconciler status"
$bin/reconciler status
address="$($bin/reconciler status --format json | $bin/python -c \
    'import json,sys; print(next(v["address"] for v in json.load(sys.stdin)["vms"] if v["name"] == "web-0"))')"
echo "== curl http://$address:8080/"
curl -fsS "http://$address:8080/"
echo "== the fleet keeps running; keep it converged with the daemon, then edit and commit:"
echo "   SOPS_AGE_KEY_FILE=$SOPS_AGE_KEY_FILE RECONCILER_STATE_DIR=$RECONCILER_STATE_DIR \\"
echo "     $bin/reconciler daemon --repo $demo_repo"
echo "   (or one change at a time: reconciler diff / reconciler apply --repo $demo_repo)"
