#!/usr/bin/env bash
# Bootstrap the Dativo base root filesystem into a tarball with mmdebstrap.
#
#   usage: sandbox/base/build.sh SUITE OUTPUT.tar
#
# Called by sandbox/build_images.py, which hashes this file, packages.txt and
# customize.sh (plus the suite and a recipe version) into the image tag, and
# caches OUTPUT.tar so a wiped engine re-imports without re-bootstrapping.
# The apt sources are Debian's defaults for a stable suite (main, -updates,
# -security); DATIVO_DEBIAN_MIRROR replaces them (any mmdebstrap MIRROR).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=${1:?usage: build.sh SUITE OUTPUT.tar}
out=${2:?usage: build.sh SUITE OUTPUT.tar}

if ! command -v mmdebstrap >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build.sh: mmdebstrap is missing: apt-get install mmdebstrap (as root)" >&2
        exit 1
    fi
    echo "build.sh: installing mmdebstrap with apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q mmdebstrap
fi

packages=$(sed -e 's/#.*//' "$here/packages.txt" | tr -s ' \t\n' '\n' | grep -v '^$' | paste -sd, -)
[ -n "$packages" ] || { echo "build.sh: no packages in packages.txt" >&2; exit 1; }

# Merged /usr set up the debootstrap way, with the usr-is-merged package:
# otherwise apt satisfies init-system-helpers' "usrmerge | usr-is-merged"
# with usrmerge, which drags in perl (about 50 MB).
hooks=()
merged_usr=/usr/share/mmdebstrap/hooks/merged-usr
if [ -d "$merged_usr" ]; then
    hooks=(--hook-dir="$merged_usr")
fi

mirrors=()
if [ -n "${DATIVO_DEBIAN_MIRROR:-}" ]; then
    mirrors=("$DATIVO_DEBIAN_MIRROR")
fi

exec mmdebstrap \
    --variant=minbase \
    --format=tar \
    --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    "${hooks[@]}" \
    --customize-hook="sh $(printf '%q' "$here/customize.sh") \"\$1\"" \
    "$suite" "$out" "${mirrors[@]}" </dev/null
