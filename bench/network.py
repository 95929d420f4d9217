"""Network forwarding benchmark: a granted destination, forwarded, vs a direct connection.

`make bench-network` (or `.venv/bin/python bench/network.py`) measures, in one run, against one
TCP server on 127.0.0.1 (a forked process):

1. direct     a client process connects to the server over TCP: the baseline;
2. forwarded  the same client connects to the Unix socket of the supervisor's forwarder
              (`dativo.supervisor._network.PluginNetwork`, running in this process exactly as
              in a run), which joins it to a new TCP connection to the server: what a plugin
              gets through a granted destination;
3. relayed    the client connects over TCP to the plugin host's loopback relay
              (`dativo.host._network.LoopbackRelay`, in its own process as in a container),
              which goes through the same forwarder: what a TCP-only client in a plugin gets.

For each: bulk throughput server -> client ("download", how a reader pulls rows) and client ->
server ("upload"), best of `--repeat`, the three paths interleaved; and the round-trip time of
small request/response exchanges (median), which is what a database query pays. The last line of
stdout is `RESULT {json}` with `"ratio"` = forwarded / direct download throughput (goal >= 0.7).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import MIB, emit_result, gbps, machine_info, progress, table

from dativo import _forward
from dativo.host._network import LoopbackRelay, destinations_from_env
from dativo.supervisor._network import PluginNetwork, pin

CHUNK = 1 * MIB
PING = 64  # bytes of each request and answer in the round-trip test
GOAL = 0.7


# --- the server --------------------------------------------------------------------------------


def _serve_one(conn: socket.socket) -> None:
    """First byte: `D` + u64 n (send n bytes), `U` (read until EOF, answer the count), `P`
    (echo PING-byte messages until EOF)."""
    mode = conn.recv(1)
    if mode == b"D":
        (total,) = struct.unpack("!Q", _exact(conn, 8))
        buffer = memoryview(bytearray(CHUNK))
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            conn.sendall(buffer[:n])
            sent += n
    elif mode == b"U":
        got = _drain(conn)
        conn.sendall(struct.pack("!Q", got))
    elif mode == b"P":
        buffer = bytearray(PING)
        while True:
            view = memoryview(buffer)
            got = 0
            while got < PING:
                n = conn.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            conn.sendall(buffer)


def _server(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            listener.close()
            try:
                _serve_one(conn)
            finally:
                os._exit(0)
        conn.close()
        while True:  # reap finished connection handlers
            try:
                done, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if done == 0:
                break


def _exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def _drain(sock: socket.socket) -> int:
    buffer = memoryview(bytearray(CHUNK))
    got = 0
    while n := sock.recv_into(buffer):
        got += n
    return got


def _fork(body: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            body(*args)
        except BaseException:
            import traceback

            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    return pid


# --- the client (a forked process, like a plugin) ----------------------------------------------


def _connect(where: tuple[str, Any]) -> socket.socket:
    kind, address = where
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        return sock
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _client(where: tuple[str, Any], test: str, size: int, rounds: int, out: int) -> None:
    """Run one measurement and write its figure (seconds, or microseconds per round trip)."""
    sock = _connect(where)
    with sock:
        if test == "download":
            started = time.perf_counter()
            sock.sendall(b"D" + struct.pack("!Q", size))
            got = _drain(sock)
            seconds = time.perf_counter() - started
            if got != size:
                raise RuntimeError(f"received {got} of {size} bytes")
            result = seconds
        elif test == "upload":
            buffer = memoryview(bytearray(CHUNK))
            started = time.perf_counter()
            sock.sendall(b"U")
            sent = 0
            while sent < size:
                n = min(CHUNK, size - sent)
                sock.sendall(buffer[:n])
                sent += n
            sock.shutdown(socket.SHUT_WR)
            (got,) = struct.unpack("!Q", _exact(sock, 8))
            seconds = time.perf_counter() - started
            if got != size:
                raise RuntimeError(f"server received {got} of {size} bytes")
            result = seconds
        else:
            sock.sendall(b"P")
            message = b"x" * PING
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                sock.sendall(message)
                _exact(sock, PING)
                times.append(time.perf_counter() - started)
            result = statistics.median(times) * 1e6
    os.write(out, struct.pack("!d", result))


def measure(where: tuple[str, Any], test: str, size: int, rounds: int) -> float:
    read_end, write_end = os.pipe()
    pid = _fork(_client, where, test, size, rounds, write_end)
    os.close(write_end)
    try:
        data = os.read(read_end, 8)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or len(data) != 8:
        raise RuntimeError(f"the {test} client over {where[0]} failed")
    return struct.unpack("!d", data)[0]


def _relay(env: dict[str, str], ready: int) -> None:
    relay = LoopbackRelay(destinations_from_env(env), logging.getLogger("bench.relay"))
    os.write(ready, b"1")
    try:
        time.sleep(3600)
    finally:
        relay.close()


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB per transfer (default 1024)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--rounds", type=int, default=2000, help="round trips (default 2000)")
    parser.add_argument(
        "--copy", action="store_true", help="forward with the recv/send fallback, not splice"
    )
    args = parser.parse_args()
    if args.copy:
        _forward._SPLICE = False
    size = args.size * MIB

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    server = _fork(_server, listener)
    listener.close()
    destination = f"127.0.0.1:{port}"
    sockdir = Path(tempfile.mkdtemp(prefix="dativo-bench-net-"))
    network = PluginNetwork(
        pin([destination], field_path="bench"), sockdir, role="reader", plugin="bench"
    )
    relay_pid = None
    try:
        (dest,) = network.destinations
        unix_path = str(sockdir / dest.socket_rel)
        relay_port = _free_port()
        env = {
            "DATIVO_NETWORK": f"{destination}={unix_path}",
            "DATIVO_NETWORK_TCP": f"{destination}=127.0.0.2:{relay_port}",
        }
        ready_r, ready_w = os.pipe()
        relay_pid = _fork(_relay, env, ready_w)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        network.start()  # its threads start after every fork of a long-lived child
        paths = {
            "direct": ("tcp", ("127.0.0.1", port)),
            "forwarded": ("unix", unix_path),
            "relayed": ("tcp", ("127.0.0.2", relay_port)),
        }
        results: dict[str, dict[str, float]] = {name: {} for name in paths}
        for test in ("download", "upload"):
            for where in paths.values():
                measure(where, test, 64 * MIB, 0)  # warm up
            progress(f"{test}: {args.repeat} x {args.size} MiB over each path, interleaved")
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.repeat):  # best of N: noise only ever slows a run down
                for name, where in paths.items():
                    samples[name].append(gbps(size, measure(where, test, size, 0)))
            for name in paths:
                results[name][test] = max(samples[name])
        progress(f"round trips: {args.rounds} x {PING} bytes each way, over each path")
        for name, where in paths.items():
            measure(where, "ping", 0, 200)  # warm up
            results[name]["rtt_us"] = min(measure(where, "ping", 0, args.rounds) for _ in range(3))
        stats = network.report()[destination]
    finally:
        network.close()
        for pid in (relay_pid, server):
            if pid is not None:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        for entry in sockdir.rglob("*"):
            if not entry.is_dir():
                entry.unlink()
        for entry in sorted(sockdir.rglob("*"), reverse=True):
            entry.rmdir()
        sockdir.rmdir()

    direct = results["direct"]
    rows = []
    for name in paths:
        r = results[name]
        rows.append(
            [
                name,
                r["download"],
                r["download"] / direct["download"],
                r["upload"],
                r["upload"] / direct["upload"],
                r["rtt_us"],
            ]
        )
    print(
        f"network forwarding: {args.size} MiB per transfer, best of {args.repeat}; "
        f"round trips of {PING} bytes, median of {args.rounds}"
    )
    print(
        table(
            ["path", "download GB/s", "vs direct", "upload GB/s", "vs direct", "round trip us"],
            rows,
        )
    )
    ratio = results["forwarded"]["download"] / direct["download"]
    print(f"ratio (forwarded / direct download): {ratio:.2f} (goal >= {GOAL})")
    print(
        f"forwarder counted {stats['connections']} connections, {stats['bytes_in']:,} bytes in, "
        f"{stats['bytes_out']:,} bytes out"
    )
    emit_result(
        "network",
        {
            "ratio": round(ratio, 3),
            "goal": GOAL,
            "upload_ratio": round(results["forwarded"]["upload"] / direct["upload"], 3),
            "relayed_ratio": round(results["relayed"]["download"] / direct["download"], 3),
            "direct_gbps": round(direct["download"], 3),
            "forwarded_gbps": round(results["forwarded"]["download"], 3),
            "relayed_gbps": round(results["relayed"]["download"], 3),
            "direct_upload_gbps": round(direct["upload"], 3),
            "forwarded_upload_gbps": round(results["forwarded"]["upload"], 3),
            "rtt_us": {name: round(results[name]["rtt_us"], 1) for name in paths},
            "splice": not args.copy,
            "size_mib": args.size,
            "repeat": args.repeat,
            **machine_info(),
        },
    )
    return 0


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


if __name__ == "__main__":
    sys.exit(main())
