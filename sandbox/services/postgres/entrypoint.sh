#!/bin/sh
# Entrypoint of dativo/svc-postgres: a throw-away PostgreSQL 15 for tests and
# benchmarks. Runs as the `postgres` user (uid 999), never as root.
#
#   dativo-postgres [POSTGRES OPTION...]   start the server (the default)
#   dativo-postgres template               build time: make the template cluster
#   dativo-postgres check                  build time: smoke-test the image
#
# Environment (test-only defaults):
#   POSTGRES_USER      superuser to create              (default dativo)
#   POSTGRES_PASSWORD  its password, SCRAM-SHA-256       (default dativo)
#   POSTGRES_DB        database to create, owned by it   (default dativo)
#   PGDATA             data directory (default /var/lib/postgresql/data/pgdata;
#                      mount a tmpfs or a volume on /var/lib/postgresql/data)
#
# On start, when PGDATA holds no cluster yet, it is copied from a template
# cluster that `initdb` made at image build time (same flags as below), and
# the user and database are created in single-user mode: about 0.2 s instead
# of about 1 s for a fresh initdb. DATIVO_PG_INITDB=1 runs initdb instead. An
# existing cluster in PGDATA (a reused volume) is started as it is.
#
# Then `exec postgres`: PID 1, logging to stderr. It listens on 0.0.0.0:5432
# (and the socket in /var/run/postgresql) and prints
#     database system is ready to accept connections
# once, when it accepts TCP connections with the credentials above.
# Extra arguments go to postgres, e.g. `-c wal_level=logical`.
#
# Tuned for tests, NOT for production: fsync, synchronous_commit and
# full_page_writes are off, so a crash can lose or corrupt data.
set -eu

PG_BIN=/usr/lib/postgresql/15/bin
TEMPLATE=/var/lib/postgresql/template
export PATH="$PG_BIN:$PATH"
: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
: "${POSTGRES_USER:=dativo}"
: "${POSTGRES_PASSWORD:=dativo}"
: "${POSTGRES_DB:=dativo}"
export PGDATA

log() { printf 'dativo-postgres: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# The settings every cluster of this image gets (appended to postgresql.conf).
test_settings() {
    cat <<'CONF'

# --- dativo test service (sandbox/services/postgres) ----------------------
# Tuned for throw-away test databases, NOT for production: with fsync,
# synchronous_commit and full_page_writes off, a crash of the container or
# of the machine can lose or corrupt data. Tests create a new one every run.
listen_addresses = '*'
port = 5432
unix_socket_directories = '/var/run/postgresql'
fsync = off
synchronous_commit = off
full_page_writes = off
# The LLVM JIT provider is not in the image (libllvm is about 110 MB).
jit = off
logging_collector = off
log_destination = 'stderr'
log_timezone = 'UTC'
timezone = 'UTC'
password_encryption = 'scram-sha-256'
CONF
}

# Socket: trust (for `docker exec ... psql`); TCP: SCRAM passwords, any address.
hba_rules() {
    cat <<'HBA'
# dativo test service: trust on the socket inside the container, SCRAM
# passwords over TCP from anywhere (the port is published on 127.0.0.1).
# TYPE  DATABASE     USER  ADDRESS    METHOD
local   all          all              trust
local   replication  all              trust
host    all          all   0.0.0.0/0  scram-sha-256
host    all          all   ::/0       scram-sha-256
host    replication  all   0.0.0.0/0  scram-sha-256
host    replication  all   ::/0       scram-sha-256
HBA
}

# initdb DIR: a new cluster whose bootstrap superuser is `postgres` (no
# password: it logs in on the socket only), C collation, UTF-8.
make_cluster() {
    out=$(initdb --pgdata="$1" --username=postgres --auth=trust \
        --encoding=UTF8 --locale=C --no-sync --no-instructions 2>&1) \
        || { printf '%s\n' "$out" >&2; die "initdb failed"; }
    hba_rules >"$1/pg_hba.conf"
    test_settings >>"$1/postgresql.conf"
}

sql_ident() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }
sql_literal() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }

# Create POSTGRES_USER (superuser, password) and POSTGRES_DB in the cluster
# in DIR, in single-user mode: no server, no port, about 0.1 s.
add_credentials() {
    for value in "$POSTGRES_USER" "$POSTGRES_PASSWORD" "$POSTGRES_DB"; do
        case $value in
        '') die "POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB must not be empty" ;;
        *'
'*) die "POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB must be one line each" ;;
        esac
    done
    user=$(sql_ident "$POSTGRES_USER")
    password=$(sql_literal "$POSTGRES_PASSWORD")
    if [ "$POSTGRES_USER" = postgres ]; then
        sql="ALTER ROLE $user WITH LOGIN PASSWORD $password;"
    else
        sql="CREATE ROLE $user WITH SUPERUSER LOGIN PASSWORD $password;"
    fi
    if [ "$POSTGRES_DB" != postgres ]; then
        sql="$sql
CREATE DATABASE $(sql_ident "$POSTGRES_DB") OWNER $user STRATEGY = FILE_COPY;"
    fi
    # One statement per line; exit_on_error makes a failed one fail the run,
    # and no statement (it holds the password) is echoed to the log.
    out=$(printf '%s\n' "$sql" | postgres --single -D "$1" -c exit_on_error=on \
        -c log_min_error_statement=panic -c log_min_messages=warning postgres 2>&1) \
        || { printf '%s\n' "$out" >&2; die "creating the user and database failed"; }
}

# A cluster in PGDATA, unless one is there already.
prepare() {
    if [ -s "$PGDATA/PG_VERSION" ]; then
        log "using the existing cluster in $PGDATA (no new user or database)"
        return
    fi
    started=$(now_ms)
    mkdir -p "$PGDATA" 2>/dev/null \
        || die "cannot create $PGDATA as $(id -un) (uid $(id -u)); mount a writable tmpfs or volume"
    [ -z "$(ls -A "$PGDATA")" ] || die "$PGDATA is not empty and holds no cluster"
    chmod 700 "$PGDATA"
    if [ "${DATIVO_PG_INITDB:-0}" = 1 ] || [ ! -s "$TEMPLATE/PG_VERSION" ]; then
        how="initdb"
        make_cluster "$PGDATA"
    else
        how="the template cluster"
        cp -a "$TEMPLATE/." "$PGDATA/"
    fi
    add_credentials "$PGDATA"
    log "new cluster in $PGDATA from $how, user $POSTGRES_USER, database $POSTGRES_DB ($(($(now_ms) - started)) ms)"
}

# Build-time smoke test: a cluster from the template, the credentials, the
# server on a socket only (the build may share the host's network), queries
# that load modules linking harvested libraries (pgcrypto: libcrypto).
check() {
    missing=$(find "$PG_BIN" /usr/lib/postgresql/15/lib -type f \( -perm -u+x -o -name '*.so' \) \
        -exec ldd {} + 2>/dev/null | grep 'not found' || true)
    [ -z "$missing" ] || die "unresolved libraries:
$missing"
    dir=$(mktemp -d)
    PGDATA="$dir/pgdata"
    prepare
    postgres -D "$PGDATA" -c listen_addresses= -c unix_socket_directories="$dir" \
        -c log_min_messages=panic &
    pid=$!
    tries=0
    until pg_isready -q -h "$dir" -U "$POSTGRES_USER" -d "$POSTGRES_DB"; do
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || die "the server did not start"
        sleep 0.05
    done
    result=$(psql -h "$dir" -U "$POSTGRES_USER" -d "$POSTGRES_DB" -v ON_ERROR_STOP=1 -Atq -c "
        CREATE EXTENSION pgcrypto;
        CREATE TABLE t (id int PRIMARY KEY, v text);
        INSERT INTO t SELECT g, encode(digest(g::text, 'sha256'), 'hex') FROM generate_series(1, 1000) g;
        SELECT count(*) = 1000 AND current_setting('fsync') = 'off' FROM t;") \
        || die "the smoke test queries failed"
    [ "$result" = t ] || die "the smoke test query returned '$result', not 't'"
    kill -INT "$pid"
    wait "$pid" || true
    rm -rf "$dir"
    log "check passed: $(postgres --version)"
}

[ "$(id -u)" != 0 ] || die "refusing to run as root; the image runs as the postgres user"

case ${1:-} in
template)
    rm -rf "$TEMPLATE"
    make_cluster "$TEMPLATE"
    log "template cluster made in $TEMPLATE"
    ;;
check)
    check
    ;;
*)
    prepare
    log "starting $(postgres --version) on 0.0.0.0:5432; ready at 'database system is ready to accept connections'"
    exec postgres -D "$PGDATA" "$@"
    ;;
esac
