#!/bin/sh
# Stage PostgreSQL 15 out of a throw-away apt install, without the rest of it.
#
#   usage: harvest.sh BEFORE STAGING
#
# Runs in the Dockerfile's install stage, after `apt-get install postgresql-15`.
# BEFORE lists every file of the image before that install (find / -xdev);
# STAGING receives what the final image needs, at its final paths:
#
# * /usr/lib/postgresql/15 (server, initdb, psql, pg_isready, modules) and
#   /usr/share/postgresql/15 (catalog templates, extensions, time zone sets),
#   minus the LLVM JIT provider (llvmjit.so and its bitcode: with it comes
#   libllvm14, about 110 MB; the service runs with jit = off);
# * the shared libraries those binaries and modules link (their ldd closure)
#   that the base image does not already have.
#
# Left behind: perl and postgresql-common (the pg_ctlcluster wrappers, which
# the entrypoint does not use), LLVM, apt lists, debconf, docs.
set -eu
before=${1:?usage: harvest.sh BEFORE STAGING}
staging=${2:?usage: harvest.sh BEFORE STAGING}
pg=/usr/lib/postgresql/15

mkdir -p "$staging"
cp -a --parents "$pg" /usr/share/postgresql/15 "$staging"
rm -rf "$staging$pg/lib/llvmjit.so" "$staging$pg/lib/llvmjit_types.bc" "$staging$pg/lib/bitcode"

# Libraries, by their canonical (merged-/usr) path; both the soname link and
# the file it points to. `ldd` lists the whole closure, transitive ones too.
find "$staging$pg/bin" "$staging$pg/lib" -type f \( -perm -u+x -o -name '*.so' \) \
    -exec ldd {} + 2>/dev/null \
    | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' \
    | sort -u \
    | while read -r lib; do
        soname="$(readlink -f "$(dirname "$lib")")/$(basename "$lib")"
        target=$(readlink -f "$lib")
        for path in "$soname" "$target"; do
            if ! grep -qxF "$path" "$before"; then
                cp -a --parents "$path" "$staging"
                echo "harvest: $path" >&2
            fi
        done
    done
