#!/usr/bin/env bash
# `make demo`: validate, plan and build fleet-example, then boot its web service's microVM image
# under QEMU and ask it for a page. (Converging the whole fleet with `reconciler apply` comes with
# the runtime; until then the demo boots one artifact by hand to show it running.)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
export RECONCILER_STATE_DIR="${RECONCILER_STATE_DIR:-$PWD/.demo/state}"

demo_repo="$PWD/.demo/fleet"
rm -rf "$demo_repo"
mkdir -p "$demo_repo"
cp -r fleet-example/. "$demo_repo"
git -C "$demo_repo" init -q -b main
git -C "$demo_repo" add -A
git -C "$demo_repo" -c user.email=demo@example.invalid -c user.name=demo commit -qm "fleet-example"

if ! $bin/reconciler kernel ls 2>/dev/null | grep -q .; then
    echo "== registering Debian's cloud kernel"
    deb="$(bash deploy/fetch-debian-kernel.sh "$PWD/.demo/kernels")"
    $bin/reconciler kernel import "$deb"
fi

echo "== reconciler validate"
$bin/reconciler validate --repo "$demo_repo"
echo "== reconciler diff (against an empty fleet; exit 2 means changes)"
$bin/reconciler diff --repo "$demo_repo" || [ $? -eq 2 ]
echo "== reconciler build"
$bin/reconciler build --repo "$demo_repo"
$bin/reconciler artifacts ls

artifact="$($bin/python - <<'PY'
import json, os, pathlib
cache = pathlib.Path(os.environ["RECONCILER_STATE_DIR"]) / "artifacts"
for manifest in cache.glob("*/manifest.json"):
    data = json.loads(manifest.read_text())
    if (data["workload"], data["target"]) == ("web", "microvm"):
        print(manifest.parent)
PY
)"
work="$PWD/.demo/vm"
rm -rf "$work" && mkdir -p "$work"
cp "$artifact/rootfs.ext4" "$work/rootfs.ext4"
port=18080
echo "== booting web's microVM under QEMU (TCG); forwarding 127.0.0.1:$port to the guest's 8080"
qemu-system-x86_64 -M microvm -accel tcg -m 512 -nodefaults -no-user-config -nographic \
    -no-reboot -serial "file:$work/console.log" \
    -kernel "$artifact/kernel" -initrd "$artifact/initramfs.cpio.gz" \
    -drive "id=root,file=$work/rootfs.ext4,format=raw,if=none" -device virtio-blk-device,drive=root \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:8080" -device virtio-net-device,netdev=n0 \
    -append "$(cat "$artifact/cmdline") $($bin/python -c 'from runtime.qemu.machine import tcg_kernel_args; print(tcg_kernel_args())') rc.ip=10.0.2.15/24 rc.gateway=10.0.2.2 rc.hostname=web-0 rc.env=\"GREETING=hello from the demo\"" \
    </dev/null >/dev/null 2>"$work/qemu.err" &
qemu=$!
trap 'kill $qemu 2>/dev/null || true' EXIT
for _ in $(seq 1 90); do
    if reply="$(curl -fsS -m 2 "http://127.0.0.1:$port/" 2>/dev/null)"; then
        echo "== the web service answered from its VM: $reply"
        echo "== guest console:"
        cat "$work/console.log"
        exit 0
    fi
    sleep 1
done
echo "the VM did not answer; console:" >&2
cat "$work/console.log" >&2
exit 1
