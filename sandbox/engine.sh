#!/usr/bin/env bash
# Make sure a Docker engine answers.
#
# Fast path: `docker info` works -> exit 0. Otherwise (root only): install
# Debian's docker.io with apt when dockerd is missing, start dockerd detached
# from the caller (it outlives make), and wait for it to answer.
#
# Safe to run twice, and concurrently: a lock serialises starters, and a
# dockerd that is already starting (pidfile /var/run/docker.pid) is waited
# for, never duplicated.
#
# Environment:
#   DATIVO_ENGINE_WAIT   seconds to wait for the engine (default 60)
#   DATIVO_DOCKERD_ARGS  extra dockerd arguments (default none)
set -euo pipefail

LOG=/var/log/dativo-dockerd.log
PIDFILE=/var/run/docker.pid
LOCK=/var/run/dativo-engine.lock
WAIT=${DATIVO_ENGINE_WAIT:-60}

say() { echo "engine: $*"; }
die() { echo "engine: ERROR: $*" >&2; exit 1; }

server_version() {
    command -v docker >/dev/null 2>&1 || return 1
    local v
    v=$(timeout 20 docker info --format '{{.ServerVersion}}' 2>/dev/null) || return 1
    [ -n "$v" ] || return 1
    printf '%s\n' "$v"
}

# A dockerd that is running (maybe still starting): from its pidfile, else by
# exact process name. Prints the pid.
dockerd_pid() {
    local pid
    if [ -s "$PIDFILE" ]; then
        pid=$(cat "$PIDFILE" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
            && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
            echo "$pid"
            return 0
        fi
    fi
    pgrep -x dockerd 2>/dev/null | head -n 1 | grep . || return 1
}

if version=$(server_version); then
    say "Docker engine $version answers"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    die "no Docker engine answers, and installing or starting one needs root.
Start Docker yourself (or run: sudo $0), then retry."
fi

# Serialise concurrent starters; the second one finds the engine up, or the
# first one's dockerd starting.
exec 9>"$LOCK"
flock -w $((WAIT + 60)) 9 || die "timed out waiting for another engine.sh (lock $LOCK)"

if version=$(server_version); then
    say "Docker engine $version answers"
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    say "dockerd is not installed: installing Debian's docker.io with apt"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package's init script from starting its own daemon: this
    # script starts it, with its own log. Only if no policy is there already.
    policy=/usr/sbin/policy-rc.d
    own_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -q || die "apt-get update failed"
    # Recommends (apparmor, git, needrestart, ...) are not needed here.
    apt-get install -y -q --no-install-recommends docker.io \
        || die "apt-get install docker.io failed"
    if [ -n "$own_policy" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    command -v dockerd >/dev/null 2>&1 || die "docker.io is installed but dockerd is not on PATH"
fi

started=
if pid=$(dockerd_pid); then
    say "dockerd (pid $pid) is already running or starting; waiting for it"
else
    mkdir -p "$(dirname "$LOG")"
    say "starting dockerd in the background (log: $LOG)"
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) engine.sh starts dockerd" >>"$LOG"
    # A new session (setsid) that ignores SIGHUP (nohup), with no file
    # descriptor of ours: not the lock, not make's pipes, not our terminal.
    # shellcheck disable=SC2086
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec setsid nohup dockerd --pidfile "$PIDFILE" ${DATIVO_DOCKERD_ARGS:-} \
            >>"$LOG" 2>&1 </dev/null
    ) &
    started=$!
fi

why="no Docker engine answered within ${WAIT}s"
for _ in $(seq 1 "$WAIT"); do
    if version=$(server_version); then
        say "Docker engine $version answers"
        exit 0
    fi
    if [ -n "$started" ] && ! kill -0 "$started" 2>/dev/null; then
        why="dockerd exited right after starting"
        break
    fi
    sleep 1
done

echo "engine: ERROR: $why. Last lines of $LOG:" >&2
tail -n 40 "$LOG" >&2 2>/dev/null || true
exit 1
