#!/bin/sh
# mmdebstrap customize hook for the Dativo base image. $1 is the chroot.
# Runs after all packages are installed, before mmdebstrap's own cleanup.
set -eu
root="$1"

# Containers run with no-new-privileges, but leave nothing to escalate with:
# strip setuid/setgid bits from every file (su, passwd, chfn, mount, ...).
chroot "$root" find / -xdev -perm /6000 -type f -exec chmod a-s {} +

# Apt lists and caches: derived images run `apt-get update` if they need apt.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
    "$root"/var/cache/debconf/*-old "$root"/var/cache/ldconfig/aux-cache

# Documentation, except the copyright files (licences travel with the image).
find "$root"/usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
find "$root"/usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian \
    "$root"/usr/share/linda "$root"/usr/share/doc-base
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias \
    -exec rm -rf {} + 2>/dev/null || true

# Logs of the bootstrap itself.
find "$root"/var/log -type f -delete
