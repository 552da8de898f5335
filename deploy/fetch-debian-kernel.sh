#!/usr/bin/env bash
# Download Debian's cloud kernel package (linux-image-*-cloud-amd64) without installing it.
# Usage: deploy/fetch-debian-kernel.sh [DEST_DIR]   -> prints the path of the .deb
# The metapackage linux-image-cloud-amd64 only depends on the versioned package: resolve it.
set -euo pipefail
dest="${1:-.}"
mkdir -p "$dest"
cd "$dest"

versioned() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
package="$(versioned || true)"
if [ -z "$package" ]; then
    apt-get update -qq >&2
    package="$(versioned)"
fi
if [ -z "$package" ]; then
    echo "cannot resolve linux-image-cloud-amd64 in the apt lists; is this Debian?" >&2
    exit 1
fi
existing="$(ls -1 "${package}"_*.deb 2>/dev/null | head -n1 || true)"
if [ -z "$existing" ]; then
    # apt's sandbox user cannot write into every directory; downloading as root is fine here.
    apt-get download -q "$package" >&2 2>/dev/null || { apt-get update -qq >&2; apt-get download -q "$package" >&2; }
    existing="$(ls -1 "${package}"_*.deb | head -n1)"
fi
echo "$(pwd)/$existing"
